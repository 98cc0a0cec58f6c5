"""A deterministic engine with the real engine's contract and no model.

Used by fast gateway tests and by the overhead benchmark (a worker that answers instantly, so
what is measured is the gateway). Words are tokens; the reply is a canned sentence that echoes
the prompt's last word, so tests can tell requests apart.
"""

from __future__ import annotations

import asyncio
import json
import math
import zlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from service.chat_template import check_context
from service.errors import BadRequest, UpstreamError
from service.protocol.internal import (
    ByteDistRequest,
    ByteDistResponse,
    ByteDistResult,
    GenerateEvent,
    GenerateRequest,
    ScoreRequest,
    ScoreResponse,
    ScoreResult,
    WorkerInfo,
)
from service.worker.engine import PreparedPrompt

VOCAB = 50_000
EOS = 0


def fake_token_id(word: str) -> int:
    return 1 + zlib.crc32(word.encode()) % (VOCAB - 1)


@dataclass
class FakeEngine:
    name: str = "fake"
    max_model_len: int = 2048
    reply_words: int = 12
    token_delay_s: float = 0.0
    max_num_seqs: int | None = None  # a batch to report (the fake has none unless told)
    # Test hooks: an event the stream waits on before its first token, and a record of calls.
    gate: asyncio.Event | None = None
    aborted: list[str] = field(default_factory=list)
    generated: list[str] = field(default_factory=list)
    requests: list[GenerateRequest] = field(default_factory=list)  # as the worker received them
    running: set[str] = field(default_factory=set)
    # Routing tests steer choices: (prompt text, candidate ids) -> logprob per id.
    fail_after_tokens: int | None = None  # raise mid-stream after this many tokens
    stall_after_tokens: int | None = None  # go silent (until cancelled) after this many
    score_hook: Callable[[str, list[int]], dict[int, float]] | None = None
    scored: list[str] = field(default_factory=list)
    _ready: bool = False

    @property
    def ready(self) -> bool:
        return self._ready

    @property
    def tokenizer(self) -> Any:
        return self  # vLLM's text-format tool parsers only need one to be there

    def info(self) -> WorkerInfo:
        return WorkerInfo(
            model=self.name,
            model_dir="",
            vocab_size=VOCAB,
            tokenizer_kind="whitespace",
            max_model_len=self.max_model_len,
            eos_token_ids=[EOS],
            has_chat_template=True,
            engine="fake",
            capture=False,
            functional_tokens={f"<nexa_{i}>": 49_000 + i for i in range(64)}
            | {"<nexa_end>": 49_999},
            max_num_seqs=self.max_num_seqs,
        )

    async def start(self) -> None:
        self._ready = True

    async def shutdown(self) -> None:
        self._ready = False

    def num_running(self) -> int:
        return len(self.running)

    async def prepare(self, request: GenerateRequest) -> PreparedPrompt:
        if request.prompt_token_ids is not None:
            ids, text = list(request.prompt_token_ids), ""
        elif request.messages is not None:
            if not request.messages:
                raise BadRequest("messages must not be empty", param="messages")
            text = "\n".join(f"{m.role}: {m.content}" for m in request.messages) + "\nassistant:"
            ids = [fake_token_id(w) for w in text.split()]
        elif request.prompt is not None:
            text = request.prompt
            ids = [fake_token_id(w) for w in text.split()]
        else:
            raise BadRequest("exactly one of messages, prompt, prompt_token_ids is required")
        max_tokens = check_context(len(ids), request.sampling.max_tokens, self.max_model_len)
        self.requests.append(request)
        return PreparedPrompt(request, ids, text, max_tokens)

    def reply(self, prepared: PreparedPrompt, index: int) -> list[str]:
        structured = prepared.request.sampling.structured
        if structured is not None:  # a minimal instance of the schema, one "token" a word
            return [json.dumps(minimal_instance(structured.json_schema), separators=(",", ":"))]
        words = prepared.prompt_text.split() or ["tokens"]
        last = words[-2] if len(words) > 1 and words[-1] == "assistant:" else words[-1]
        base = f"fake answer {index} about {last}".split()
        filler = [f"w{i}" for i in range(max(0, self.reply_words - len(base)))]
        return (base + filler)[: self.reply_words]

    async def generate(self, prepared: PreparedPrompt) -> AsyncIterator[GenerateEvent]:
        rid = prepared.request.request_id
        self.generated.append(rid)
        self.running.add(rid)
        sampling = prepared.request.sampling
        done = False
        try:
            start: GenerateEvent = {
                "type": "start",
                "prompt_tokens": len(prepared.prompt_token_ids),
            }
            if sampling.prompt_logprobs is not None:
                start["prompt_text"] = prepared.prompt_text
                start["prompt_logprobs"] = [
                    {"id": t, "text": w, "logprob": None if i == 0 else -1.0, "top": []}
                    for i, (t, w) in enumerate(
                        zip(prepared.prompt_token_ids, prepared.prompt_text.split(), strict=False)
                    )
                ]
            yield start
            if self.gate is not None:
                await self.gate.wait()
            for index in range(sampling.n):
                words = self.reply(prepared, index)
                emitted = 0
                text_so_far = ""
                reason = "length"
                for i, word in enumerate(words[: prepared.max_tokens]):
                    piece = word if i == 0 else " " + word
                    stop_at = _first_stop(text_so_far + piece, sampling.stop)
                    if stop_at is not None:
                        piece = (text_so_far + piece)[:stop_at][len(text_so_far) :]
                        if piece:
                            yield {"type": "delta", "index": index, "text": piece, "token_ids": []}
                        reason = "stop"
                        break
                    if self.token_delay_s:
                        await asyncio.sleep(self.token_delay_s)
                    if self.fail_after_tokens is not None and emitted >= self.fail_after_tokens:
                        raise UpstreamError("injected failure")
                    if self.stall_after_tokens is not None and emitted >= self.stall_after_tokens:
                        await asyncio.Event().wait()
                    text_so_far += piece
                    emitted += 1
                    tid = fake_token_id(word)
                    delta: GenerateEvent = {
                        "type": "delta",
                        "index": index,
                        "text": piece,
                        "token_ids": [tid],
                    }
                    if sampling.logprobs is not None:
                        top = [
                            {"id": tid + k, "text": piece, "logprob": -0.5 - k}
                            for k in range(sampling.logprobs)
                        ]
                        delta["logprobs"] = [
                            {"id": tid, "text": piece, "logprob": -0.5, "top": top}  # type: ignore[typeddict-item]
                        ]
                    yield delta
                else:
                    reason = "stop" if emitted < prepared.max_tokens else "length"
                yield {
                    "type": "finish",
                    "index": index,
                    "finish_reason": reason,
                    "completion_tokens": emitted,
                }
            done = True
        finally:
            self.running.discard(rid)
            if not done:
                self.aborted.append(rid)

    async def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)

    async def score(self, request: ScoreRequest) -> ScoreResponse:
        results = []
        for q in request.queries:
            if q.messages is not None:
                text = " ".join(m.content for m in q.messages)
            else:
                text = q.prompt or " ".join(map(str, q.prompt_token_ids or []))
            ids = q.token_ids or []
            self.scored.append(text)
            if self.score_hook is not None:
                results.append(
                    ScoreResult(
                        prompt_tokens=len(text.split()),
                        token_logprobs=self.score_hook(text, ids),
                        top=[],
                    )
                )
                continue
            # Deterministic scores that depend on the prompt: lets routing tests steer choices.
            raw = {t: -float((zlib.crc32(f"{text}|{t}".encode()) % 1000) / 100) for t in ids}
            norm = math.log(sum(math.exp(v) for v in raw.values())) if raw else 0.0
            results.append(
                ScoreResult(
                    prompt_tokens=len(text.split()),
                    token_logprobs={t: v - norm for t, v in raw.items()},
                    top=[],
                )
            )
        return ScoreResponse(results=results)

    async def byte_dist(self, request: ByteDistRequest) -> ByteDistResponse:
        results = []
        for i, q in enumerate(request.queries):
            try:
                partial = bytes.fromhex(q.partial)
            except ValueError:
                raise BadRequest("partial must be hex", param=f"queries.{i}.partial") from None
            results.append(fake_byte_dist(partial))
        return ByteDistResponse(results=results)


# The fake's byte-level model, for /internal/byte-dist: a tiny fixed vocabulary (FAKE_BYTE_TOKENS,
# indexed by token id; id 0 is the stop token) with one fixed next-token distribution for every
# path, so that gateway tests can work out the expected next-byte distributions by hand. Only
# printable ASCII and "\n" have mass as single bytes; "é" (C3 A9) exists only as a two-byte
# token, which makes `partial = "c3"` a real mid-token query.
FAKE_BYTE_STOP_ID = 0
FAKE_BYTE_TOKENS: tuple[bytes, ...] = (
    (b"",)
    + tuple(bytes([b]) for b in range(256))
    + (b" the", b"the", b"ing", b" a", "é".encode(), b"\n\n")
)


def _fake_byte_score(token_id: int, data: bytes) -> float:
    if token_id == FAKE_BYTE_STOP_ID:
        return 0.0
    if len(data) > 1:
        return 1.0
    c = data[0]
    if c == 0x20:
        return 2.0
    if c in b"et":
        return 1.5
    if 0x61 <= c <= 0x7A:
        return 1.0
    if 0x21 <= c <= 0x7E or c == 0x0A:
        return 0.0
    return -math.inf  # other control bytes and lone non-ASCII bytes: never


def fake_byte_logprobs() -> list[float]:
    """The fake's next-token log-probabilities (natural log), indexed by FAKE_BYTE_TOKENS id."""
    scores = [_fake_byte_score(i, t) for i, t in enumerate(FAKE_BYTE_TOKENS)]
    norm = math.log(math.fsum(math.exp(s) for s in scores))
    return [s - norm for s in scores]


def _logsumexp(values: list[float]) -> float:
    top = max(values, default=-math.inf)
    if top == -math.inf:
        return -math.inf
    return top + math.log(math.fsum(math.exp(v - top) for v in values))


def fake_byte_dist(partial: bytes) -> ByteDistResult:
    """What the fake worker answers for `partial` (any path): the same reduction a real worker
    computes, by brute force over FAKE_BYTE_TOKENS."""
    lps = fake_byte_logprobs()
    buckets: list[list[float]] = [[] for _ in range(257)]
    exact: dict[int, list[float]] = {}
    k = len(partial)
    for token_id, data in enumerate(FAKE_BYTE_TOKENS):
        if token_id == FAKE_BYTE_STOP_ID:
            if not partial:
                buckets[256].append(lps[token_id])
            continue
        if len(data) <= k or not data.startswith(partial):
            continue
        buckets[data[k]].append(lps[token_id])
        if len(data) == k + 1 and lps[token_id] > -math.inf:
            exact[data[k]] = [float(token_id), lps[token_id]]
    return ByteDistResult(cont_lp=[_logsumexp(b) for b in buckets], exact=exact)


def _first_stop(text: str, stops: list[str]) -> int | None:
    hits = [text.find(s) for s in stops if s and s in text]
    return min(hits) if hits else None


def minimal_instance(schema: dict[str, Any]) -> Any:
    """The smallest value a (simple) JSON schema accepts: what the fake engine answers under a
    structured-output constraint, so gateway tests can check the shaping of the reply."""
    if "const" in schema:
        return schema["const"]
    if "enum" in schema:
        return schema["enum"][0]
    for key in ("anyOf", "oneOf", "allOf"):
        if key in schema:
            return minimal_instance(schema[key][0])
    kind = schema.get("type", "object")
    kind = kind[0] if isinstance(kind, list) else kind
    if kind == "object":
        props = schema.get("properties", {})
        return {k: minimal_instance(props.get(k, {})) for k in schema.get("required", [])}
    if kind == "array":
        return [minimal_instance(schema.get("items", {})) for _ in range(schema.get("minItems", 0))]
    return {"string": "x", "integer": 0, "number": 0, "boolean": True, "null": None}.get(kind, {})
