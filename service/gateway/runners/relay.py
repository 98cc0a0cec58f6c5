"""Upstream chunks -> the gateway's chunks, without decoding each one.

An upstream that speaks OpenAI already sends the chunks the client wants; only three things are
the gateway's own: the response `id`, the `model` the client addressed, and the `octograph`
route object. The first chunk is decoded once: it gives the upstream's exact `"id":"..."` and
`"model":"..."` bytes and carries the route object. Later chunks start with the same head
(`{"id":...,"object":...,"created":...,"model":...` in vLLM, OpenAI, Ollama), so one prefix
compare and a concatenation give the gateway's chunk: 0.35 us against 1.1 us for an orjson
decode + encode of a small chunk (more with logprobs). Upstreams that order keys differently
get the two fields swapped by byte search; a chunk that matches neither (an id that changes
mid-stream) takes the slow path, decode + encode, so the output is right either way.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import orjson

from service.errors import UpstreamError
from service.gateway.clients.upstream import failure_from_event, is_error_event


class ChunkRewriter:
    def __init__(self, response_id: str, model: str, octograph: dict[str, Any]) -> None:
        self.response_id = response_id
        self.model = model
        self.octograph = octograph
        # (upstream bytes, gateway bytes) per field; None = slow path for every chunk.
        self._swaps: list[tuple[bytes, bytes]] | None = None
        # The chunk's head up to the last of the two fields, upstream's and ours: servers that
        # write `id`, `object`, `created`, `model` first (vLLM, OpenAI, Ollama, TGI) repeat the
        # same head in every chunk of a stream, so one prefix test replaces both fields.
        self._head: tuple[bytes, bytes] | None = None
        self.slow_chunks = 0  # how often the byte swap did not apply (tests, benchmarks)

    def first(self, payload: bytes) -> bytes:
        obj = _object(payload)
        swaps: list[tuple[bytes, bytes]] | None = []
        ends = []
        for key, ours in ((b"id", self.response_id), (b"model", self.model)):
            theirs = obj.get(key.decode())
            needle = _field_bytes(payload, key, theirs) if isinstance(theirs, str) else None
            if needle is None or swaps is None:
                swaps = None
                continue
            swaps.append((needle, b'"' + key + b'":' + orjson.dumps(ours)))
            ends.append(payload.find(needle) + len(needle))
        self._swaps = swaps
        if swaps is not None:
            head = payload[: max(ends)]
            self._head = (head, _swap(head, swaps) or head)
        obj["id"], obj["model"], obj["octograph"] = self.response_id, self.model, self.octograph
        return orjson.dumps(obj)

    def __call__(self, payload: bytes) -> bytes:
        head = self._head
        if head is not None and payload.startswith(head[0]):
            return head[1] + payload[len(head[0]) :]
        if self._swaps is not None and (out := _swap(payload, self._swaps)) is not None:
            return out
        self.slow_chunks += 1
        obj = _object(payload)
        obj["id"], obj["model"] = self.response_id, self.model
        return orjson.dumps(obj)

    def body(self, raw: bytes) -> dict[str, Any]:
        """A non-streamed reply: one object, decoded once (the route object goes in anyway)."""
        obj = _object(raw)
        obj["id"], obj["model"], obj["octograph"] = self.response_id, self.model, self.octograph
        return obj


def _swap(payload: bytes, swaps: list[tuple[bytes, bytes]]) -> bytes | None:
    out = payload
    for needle, ours in swaps:
        at = out.find(needle)
        if at < 0:
            return None
        out = out[:at] + ours + out[at + len(needle) :]
    return out


def _object(payload: bytes) -> dict[str, Any]:
    try:
        obj = orjson.loads(payload)
    except orjson.JSONDecodeError:
        raise UpstreamError("the upstream sent a chunk that is not JSON") from None
    if not isinstance(obj, dict):
        raise UpstreamError("the upstream sent a chunk that is not a JSON object")
    return obj


def _field_bytes(payload: bytes, key: bytes, value: str) -> bytes | None:
    """The exact bytes of `"key":"value"` in the upstream's encoding (compact or with a space
    after the colon; orjson's escaping matches json.dumps(ensure_ascii=False) and pydantic's)."""
    encoded = orjson.dumps(value)
    for sep in (b":", b": "):
        needle = b'"' + key + b'"' + sep + encoded
        if needle in payload:
            return needle
    return None


async def rewritten(
    first: bytes | None, payloads: AsyncIterator[bytes], rewriter: ChunkRewriter, model_id: str
) -> AsyncIterator[bytes]:
    """The upstream's chunk payloads with the gateway's id, model and route object. An error
    event from the upstream after the first byte ends the stream as the gateway's error."""
    if first is not None:
        yield rewriter.first(first)
    async for payload in payloads:
        if is_error_event(payload):
            raise failure_from_event(model_id, payload).error
        yield rewriter(payload)
