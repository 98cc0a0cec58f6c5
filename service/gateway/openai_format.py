"""Worker events -> OpenAI response bodies and stream chunks (plain dicts, serialized once)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Literal

from service.protocol.internal import TokenLogprobEvent

Kind = Literal["chat", "completion"]


def _bytes(text: str) -> list[int]:
    return list(text.encode("utf-8"))


def chat_logprob_entries(lps: list[TokenLogprobEvent], top_k: int) -> list[dict[str, Any]]:
    return [
        {
            "token": lp["text"],
            "logprob": lp["logprob"],
            "bytes": _bytes(lp["text"]),
            "top_logprobs": [
                {"token": t["text"], "logprob": t["logprob"], "bytes": _bytes(t["text"])}
                for t in lp["top"][:top_k]
            ],
        }
        for lp in lps
    ]


@dataclass
class CompletionLogprobs:
    """The legacy completions `logprobs` object, accumulated token by token."""

    tokens: list[str] = field(default_factory=list)
    token_logprobs: list[float | None] = field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = field(default_factory=list)
    text_offset: list[int] = field(default_factory=list)
    offset: int = 0

    def add(self, lps: list[TokenLogprobEvent]) -> None:
        for lp in lps:
            text = lp["text"]
            self.tokens.append(text)
            self.token_logprobs.append(lp["logprob"])
            self.top_logprobs.append(
                {t["text"]: t["logprob"] for t in lp["top"]} if lp["logprob"] is not None else None
            )
            self.text_offset.append(self.offset)
            self.offset += len(text)

    def as_dict(self) -> dict[str, Any]:
        return {
            "tokens": self.tokens,
            "token_logprobs": self.token_logprobs,
            "top_logprobs": self.top_logprobs,
            "text_offset": self.text_offset,
        }


@dataclass
class Choice:
    index: int
    text: str = ""
    finish_reason: str | None = None
    completion_tokens: int = 0
    chat_logprobs: list[dict[str, Any]] = field(default_factory=list)
    completion_logprobs: CompletionLogprobs | None = None


@dataclass
class ResponseHeader:
    id: str
    model: str
    created: int = field(default_factory=lambda: int(time.time()))

    def chunk(self, kind: Kind, choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "chat.completion.chunk" if kind == "chat" else "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": choices,
            **extra,
        }


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def final_body(
    kind: Kind,
    header: ResponseHeader,
    choices: list[Choice],
    prompt_tokens: int,
    logprobs_on: bool,
    octograph: dict[str, Any],
) -> dict[str, Any]:
    out: list[dict[str, Any]] = []
    for c in sorted(choices, key=lambda c: c.index):
        if kind == "chat":
            out.append(
                {
                    "index": c.index,
                    "message": {"role": "assistant", "content": c.text},
                    "logprobs": {"content": c.chat_logprobs} if logprobs_on else None,
                    "finish_reason": c.finish_reason or "stop",
                }
            )
        else:
            lp = (
                c.completion_logprobs.as_dict() if (logprobs_on and c.completion_logprobs) else None
            )
            out.append(
                {
                    "index": c.index,
                    "text": c.text,
                    "logprobs": lp,
                    "finish_reason": c.finish_reason or "stop",
                }
            )
    completion_tokens = sum(c.completion_tokens for c in choices)
    return {
        "id": header.id,
        "object": "chat.completion" if kind == "chat" else "text_completion",
        "created": header.created,
        "model": header.model,
        "choices": out,
        "usage": usage(prompt_tokens, completion_tokens),
        "octograph": octograph,
    }
