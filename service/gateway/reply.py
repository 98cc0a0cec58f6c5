"""The reply: a request's answer rendered as one OpenAI JSON body or an SSE stream.

One renderer for every node kind. It reads the plan's `ReplyShape` (kind, n, echo, logprobs,
usage, ids) and the runner's `Answer` (gateway events, or an upstream's reply to relay), tells
the request's observer about the first byte and the end, and renders failures through the one
error taxonomy (`errors.render` / `errors.sse_event`). Hot path: events are plain dicts, chunks
are dicts serialized once with orjson; no pydantic model is built per chunk.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import orjson

from service.errors import DeadlineExceeded, ServiceError, UpstreamError, sse_event
from service.gateway.observer import RequestObserver
from service.gateway.plan import ReplyShape
from service.gateway.runners.base import Answer
from service.gateway.scope import RequestScope, close_quietly
from service.gateway.tools import tool_calls, with_ids
from service.protocol.internal import GenerateEvent, TokenLogprobEvent

log = logging.getLogger(__name__)
DONE = b"data: [DONE]\n\n"


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
    tool_calls: list[dict[str, Any]] | None = None  # parsed on the worker (tool_choice auto)


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def final_body(
    shape: ReplyShape, choices: list[Choice], prompt_tokens: int, octograph: dict[str, Any]
) -> dict[str, Any]:
    out: list[dict[str, Any]] = []
    for c in sorted(choices, key=lambda c: c.index):
        if shape.kind == "chat":
            message: dict[str, Any] = {"role": "assistant", "content": c.text}
            reason = c.finish_reason or "stop"
            calls = tool_calls(shape.tool_call, c.text) if shape.tool_call else c.tool_calls
            if calls is not None:
                content = c.text if c.tool_calls is not None and c.text else None
                message = {"role": "assistant", "content": content, "tool_calls": calls}
                reason = "tool_calls"
            out.append(
                {
                    "index": c.index,
                    "message": message,
                    "logprobs": {"content": c.chat_logprobs} if shape.logprobs else None,
                    "finish_reason": reason,
                }
            )
        else:
            lp = (
                c.completion_logprobs.as_dict()
                if (shape.logprobs and c.completion_logprobs)
                else None
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
        "id": shape.response_id,
        "object": "chat.completion" if shape.kind == "chat" else "text_completion",
        "created": shape.created,
        "model": shape.model,
        "choices": out,
        "usage": usage(prompt_tokens, completion_tokens),
        "octograph": octograph,
    }


@dataclass
class Reply:
    """What the front door sends: a JSON body or an SSE stream, plus headers. `aclose` ends the
    request, however it went: the stream is closed, the scope releases everything the request
    held, and the observer records the end (a stream never read counts as cancelled)."""

    headers: dict[str, str]
    scope: RequestScope
    observer: RequestObserver
    body: dict[str, Any] | None = None
    stream: AsyncIterator[bytes] | None = None
    status: int = 200

    async def aclose(self) -> None:
        try:
            if self.stream is not None:
                await close_quietly(self.stream)
        finally:
            await self.scope.aclose()
            self.observer.finished(asyncio.CancelledError())  # no-op once it has ended


# -- JSON ------------------------------------------------------------------------------------


async def collect(
    shape: ReplyShape, answer: Answer, octograph: dict[str, Any], observer: RequestObserver
) -> tuple[dict[str, Any], int]:
    """(the JSON body, completion tokens) of an answer."""
    if answer.body is not None:  # a remote node's reply, already in the gateway's ids
        observer.first_byte()
        reported = answer.body.get("usage")
        if not isinstance(reported, dict):
            return answer.body, 0
        observer.prompt_tokens = _count(reported.get("prompt_tokens"))
        return answer.body, _count(reported.get("completion_tokens"))
    assert answer.events is not None
    events = answer.events
    choices: dict[int, Choice] = {}
    prompt_tokens = 0
    prompt_lps: dict[int, list[Any]] = {}
    chat = shape.kind == "chat"
    try:
        async for ev in events:
            t = ev["type"]
            if t == "start":
                prompt_tokens += ev.get("prompt_tokens", 0)
                if "prompt_logprobs" in ev:
                    prompt_lps[ev.get("index", 0)] = ev["prompt_logprobs"]
                continue
            c = choices.get(ev["index"])
            if c is None:
                c = choices[ev["index"]] = Choice(ev["index"])
                if observer.first_byte_at is None:
                    observer.first_byte()
            if t == "delta":
                c.text += ev.get("text", "")
                if "tool_calls" in ev:
                    c.tool_calls = [*(c.tool_calls or []), *with_ids(ev["tool_calls"])]
                if shape.logprobs and "logprobs" in ev:
                    if chat:
                        c.chat_logprobs.extend(
                            chat_logprob_entries(ev["logprobs"], shape.top_logprobs)
                        )
                    else:
                        c.completion_logprobs = c.completion_logprobs or CompletionLogprobs()
                        c.completion_logprobs.add(ev["logprobs"])
            elif t == "finish":
                c.finish_reason = ev.get("finish_reason")
                c.completion_tokens = ev.get("completion_tokens", 0)
    finally:
        await close_quietly(events)
    if shape.echo is not None:
        _echo(shape, choices, prompt_lps)
    body = final_body(shape, list(choices.values()), prompt_tokens, octograph)
    observer.prompt_tokens = prompt_tokens
    return body, body["usage"]["completion_tokens"]


def _count(value: Any) -> int:
    """A token count an upstream reported (anything else counts 0)."""
    return value if isinstance(value, int) and value > 0 else 0


def _echo(shape: ReplyShape, choices: dict[int, Choice], prompt_lps: dict[int, list[Any]]) -> None:
    assert shape.echo is not None
    for c in choices.values():
        job = shape.prompt_of(c.index)
        c.text = (shape.echo[job] if job < len(shape.echo) else "") + c.text
        if shape.logprobs and job in prompt_lps:
            echoed = CompletionLogprobs()
            echoed.add(prompt_lps[job])
            if c.completion_logprobs:
                echoed.add(
                    [
                        _as_event(c.completion_logprobs, i)
                        for i in range(len(c.completion_logprobs.tokens))
                    ]
                )
            c.completion_logprobs = echoed


def _as_event(lps: CompletionLogprobs, i: int) -> Any:
    return {
        "id": -1,
        "text": lps.tokens[i],
        "logprob": lps.token_logprobs[i],
        "top": [
            {"id": -1, "text": k, "logprob": v} for k, v in (lps.top_logprobs[i] or {}).items()
        ],
    }


# -- SSE -------------------------------------------------------------------------------------


def _sse(obj: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


async def to_sse(
    shape: ReplyShape,
    answer: Answer,
    octograph: dict[str, Any],
    *,
    deadline: float,
    observer: RequestObserver,
) -> AsyncIterator[bytes]:
    """The SSE body. Always ends with `data: [DONE]`; a failure after the first byte becomes an
    error event; the observer hears of the first chunk and of the end. (One generator: each
    layer of async generators costs every chunk.)"""
    failure: BaseException | None = None
    chunks = _SseChunks(shape, octograph)
    render = chunks.render if answer.events is not None else _frame
    source: AsyncIterator[Any] = answer.events if answer.events is not None else answer.chunks  # type: ignore[assignment]
    try:
        async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
            async for item in source:
                chunk = render(item)
                if chunk is None:
                    continue
                if observer.first_byte_at is None:
                    observer.first_byte()
                yield chunk
            if shape.include_usage and answer.events is not None:
                yield chunks.usage_chunk()
    except TimeoutError:
        failure = DeadlineExceeded("the request deadline passed")
        yield sse_event(failure)
    except ServiceError as exc:
        failure = exc
        yield sse_event(exc)
    except Exception as exc:
        log.exception("stream failed")
        failure = exc
        yield sse_event(UpstreamError("the stream failed"))
    except BaseException as exc:  # cancelled: the client left
        failure = exc
        raise
    finally:
        await close_quietly(source)
        observer.prompt_tokens = chunks.prompt_tokens
        observer.finished(failure, chunks.completion_tokens if answer.events is not None else None)
    yield DONE


def _frame(payload: bytes) -> bytes:
    """A remote node's chunk (JSON, the gateway's ids already in) as an SSE event."""
    return b"data: " + payload + b"\n\n"


class _SseChunks:
    """Gateway events -> OpenAI stream chunks, one event at a time."""

    def __init__(self, shape: ReplyShape, octograph: dict[str, Any]) -> None:
        self.shape = shape
        self.chat = shape.kind == "chat"
        self.held: dict[int, str] = {}  # tool-call choices: text held until the call is whole
        self.octograph: dict[str, Any] | None = octograph  # goes in the first chunk only
        self.started: set[int] = set()
        self.prompt_tokens = 0
        self.completion_tokens = 0

    def render(self, ev: GenerateEvent) -> bytes | None:
        shape = self.shape
        t = ev["type"]
        if t == "start":
            self.prompt_tokens += ev.get("prompt_tokens", 0)
            return None
        idx = ev["index"]
        choice: dict[str, Any]
        if t == "delta" and shape.tool_call is not None:
            self.held[idx] = self.held.get(idx, "") + ev.get("text", "")
            return None
        if t == "delta":
            text = ev.get("text", "")
            if self.chat:
                delta: dict[str, Any] = {"content": text}
                if idx not in self.started:
                    delta["role"] = "assistant"
                if "tool_calls" in ev:  # parsed on the worker: whole calls, one delta
                    calls = with_ids(ev["tool_calls"])
                    delta["content"] = text or None
                    delta["tool_calls"] = [{"index": i, **c} for i, c in enumerate(calls)]
                choice = {"index": idx, "delta": delta, "finish_reason": None}
                if shape.logprobs:
                    choice["logprobs"] = {
                        "content": chat_logprob_entries(ev.get("logprobs", []), shape.top_logprobs)
                    }
            else:
                if shape.echo is not None and idx not in self.started:
                    # The prompt this choice continues goes ahead of its first text.
                    job = shape.prompt_of(idx)
                    text = (shape.echo[job] if job < len(shape.echo) else "") + text
                choice = {"index": idx, "text": text, "finish_reason": None}
                if shape.logprobs:
                    lp = CompletionLogprobs()
                    lp.add(ev.get("logprobs", []))
                    choice["logprobs"] = lp.as_dict()
            self.started.add(idx)
        else:  # finish
            self.completion_tokens += ev.get("completion_tokens", 0)
            reason = ev.get("finish_reason")
            if shape.tool_call is not None:
                return self._tool_call_chunks(idx, reason)
            if self.chat:
                choice = {"index": idx, "delta": {}, "finish_reason": reason}
            else:
                choice = {"index": idx, "text": "", "finish_reason": reason}
        extra: dict[str, Any] = {}
        if self.octograph is not None:
            extra["octograph"] = self.octograph
            self.octograph = None
        if shape.include_usage:
            extra["usage"] = None
        return _sse(shape.chunk([choice], **extra))

    def _tool_call_chunks(self, idx: int, reason: str | None) -> bytes:
        """A tool-call choice, whole: one delta with every call (id, name, arguments), then
        its finish (`tool_calls`); text that is not a whole call goes out as content."""
        assert self.shape.tool_call is not None
        text = self.held.pop(idx, "")
        calls = tool_calls(self.shape.tool_call, text)
        delta: dict[str, Any] = {"role": "assistant"}
        if calls is None:
            delta["content"] = text
        else:
            delta["content"] = None
            delta["tool_calls"] = [{"index": i, **call} for i, call in enumerate(calls)]
            reason = "tool_calls"
        extra: dict[str, Any] = {}
        if self.octograph is not None:
            extra["octograph"] = self.octograph
            self.octograph = None
        if self.shape.include_usage:
            extra["usage"] = None
        body = self.shape.chunk([{"index": idx, "delta": delta, "finish_reason": None}], **extra)
        end = {"index": idx, "delta": {}, "finish_reason": reason}
        tail = self.shape.chunk([end], **({"usage": None} if self.shape.include_usage else {}))
        return _sse(body) + _sse(tail)

    def usage_chunk(self) -> bytes:
        return _sse(self.shape.chunk([], usage=usage(self.prompt_tokens, self.completion_tokens)))
