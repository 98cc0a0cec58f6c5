"""A small OpenAI-compatible server with canned replies: the upstream of remote-node tests and
of the overhead benchmark's `--upstream openai` mode. Like FakeEngine, words are tokens.

Test hooks (attributes of FakeUpstream): refuse with given statuses, answer slowly, drop the
connection mid-stream, send an in-stream error, hold streams on a gate, require an API key.

    python -m service.gateway.clients.fake_upstream --port 9000 [--words 12] [--spaced]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

MODEL = "upstream-model"


class DroppedConnection(Exception):
    """Raised inside a streaming body: uvicorn then closes the connection mid-response."""


@dataclass
class FakeUpstream:
    model: str = MODEL
    words: int = 12
    api_key: str | None = None  # required as `Authorization: Bearer <key>` when set
    spaced: bool = False  # json.dumps' default separators (', ', ': ') instead of compact
    fail_statuses: list[int] = field(default_factory=list)  # answer the next calls with these
    delay_s: float = 0.0  # before the response headers
    token_delay_s: float = 0.0  # between streamed chunks
    drop_after_chunks: int | None = None  # stream this many chunks, then drop the connection
    error_after_chunks: int | None = None  # stream this many chunks, then an error event
    gate: asyncio.Event | None = None  # streams wait on it before their first chunk
    calls: list[dict[str, Any]] = field(default_factory=list)  # request bodies, in order
    headers_seen: list[dict[str, str]] = field(default_factory=list)
    open_streams: int = 0
    closed_streams: int = 0  # streams that ended early (client went away)
    _n: int = 0

    def dumps(self, obj: Any) -> bytes:
        if self.spaced:
            return json.dumps(obj).encode()
        return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()

    def reply_words(self, body: dict[str, Any]) -> list[str]:
        limit = body.get("max_completion_tokens") or body.get("max_tokens") or self.words
        base = ["Hello", "from", "the", "upstream"]
        filler = [f"w{i}" for i in range(max(0, self.words - len(base)))]
        return (base + filler)[: min(limit, self.words)]

    def app(self) -> FastAPI:
        app = FastAPI()

        @app.get("/v1/models")
        async def models(request: Request) -> Response:
            if (denied := self._auth(request)) is not None:
                return denied
            return JSONResponse({"object": "list", "data": [{"id": self.model, "object": "model"}]})

        @app.post("/v1/chat/completions")
        async def chat(request: Request) -> Response:
            return await self._handle(request, "chat")

        @app.post("/v1/completions")
        async def completions(request: Request) -> Response:
            return await self._handle(request, "completion")

        return app

    def _auth(self, request: Request) -> Response | None:
        if self.api_key is None:
            return None
        if request.headers.get("authorization") == f"Bearer {self.api_key}":
            return None
        body = {
            "error": {
                "message": "Incorrect API key provided",
                "type": "invalid_request_error",
                "param": None,
                "code": "invalid_api_key",
            }
        }
        return JSONResponse(body, status_code=401)

    async def _handle(self, request: Request, kind: str) -> Response:
        body = json.loads(await request.body())
        self.calls.append(body)
        self.headers_seen.append(dict(request.headers))
        if (denied := self._auth(request)) is not None:
            return denied
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        if self.fail_statuses:
            status = self.fail_statuses.pop(0)
            err = {
                "error": {
                    "message": f"upstream says {status}",
                    "type": "server_error",
                    "param": None,
                    "code": None,
                }
            }
            headers = {"retry-after": "3"} if status == 429 else None
            return JSONResponse(err, status_code=status, headers=headers)
        self._n += 1
        rid = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-up{self._n}"
        if body.get("stream"):
            return StreamingResponse(self._stream(kind, rid, body), media_type="text/event-stream")
        return Response(self.dumps(self._full(kind, rid, body)), media_type="application/json")

    def _logprobs(self, kind: str, word: str) -> dict[str, Any]:
        if kind == "chat":
            entry = {
                "token": word,
                "logprob": -0.5,
                "bytes": list(word.encode()),
                "top_logprobs": [{"token": word, "logprob": -0.5, "bytes": list(word.encode())}],
            }
            return {"content": [entry]}
        return {
            "tokens": [word],
            "token_logprobs": [-0.5],
            "top_logprobs": [{word: -0.5}],
            "text_offset": [0],
        }

    def _full(self, kind: str, rid: str, body: dict[str, Any]) -> dict[str, Any]:
        words = self.reply_words(body)
        text = " ".join(words)
        choice: dict[str, Any] = {
            "index": 0,
            "logprobs": None,
            "finish_reason": "length" if len(words) < self.words else "stop",
        }
        if kind == "chat":
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        prompt_tokens = len(json.dumps(body.get("messages") or body.get("prompt")).split())
        return {
            "id": rid,
            "object": "chat.completion" if kind == "chat" else "text_completion",
            "created": int(time.time()),
            "model": self.model,
            "choices": [choice],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": len(words),
                "total_tokens": prompt_tokens + len(words),
            },
        }

    async def _stream(self, kind: str, rid: str, body: dict[str, Any]) -> AsyncIterator[bytes]:
        self.open_streams += 1
        finished = False
        try:
            if self.gate is not None:
                await self.gate.wait()
            words = self.reply_words(body)
            head = {
                "id": rid,
                "object": "chat.completion.chunk" if kind == "chat" else "text_completion",
                "created": int(time.time()),
                "model": self.model,
            }
            want_lp = bool(body.get("logprobs"))
            for i, word in enumerate(words):
                if self.drop_after_chunks is not None and i >= self.drop_after_chunks:
                    raise DroppedConnection()
                if self.error_after_chunks is not None and i >= self.error_after_chunks:
                    err = {
                        "error": {
                            "message": "engine died",
                            "type": "InternalServerError",
                            "code": 500,
                        }
                    }
                    yield b"data: " + self.dumps(err) + b"\n\n"
                    yield b"data: [DONE]\n\n"
                    finished = True
                    return
                if self.token_delay_s and i:
                    await asyncio.sleep(self.token_delay_s)
                text = word if i == 0 else " " + word
                choice: dict[str, Any] = {"index": 0}
                if kind == "chat":
                    delta = {"role": "assistant", "content": text} if i == 0 else {"content": text}
                    choice["delta"] = delta
                else:
                    choice["text"] = text
                choice["logprobs"] = self._logprobs(kind, text) if want_lp else None
                choice["finish_reason"] = None
                yield b"data: " + self.dumps({**head, "choices": [choice]}) + b"\n\n"
            last: dict[str, Any] = {
                "index": 0,
                "logprobs": None,
                "finish_reason": "length" if len(words) < self.words else "stop",
            }
            if kind == "chat":
                last["delta"] = {}
            else:
                last["text"] = ""
            yield b"data: " + self.dumps({**head, "choices": [last]}) + b"\n\n"
            if (body.get("stream_options") or {}).get("include_usage"):
                usage = {
                    "prompt_tokens": 5,
                    "completion_tokens": len(words),
                    "total_tokens": 5 + len(words),
                }
                yield b"data: " + self.dumps({**head, "choices": [], "usage": usage}) + b"\n\n"
            yield b"data: [DONE]\n\n"
            finished = True
        finally:
            self.open_streams -= 1
            if not finished:
                self.closed_streams += 1


def main() -> None:
    import uvicorn

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=9000)
    p.add_argument("--words", type=int, default=12, help="tokens per reply")
    p.add_argument("--spaced", action="store_true", help="json.dumps separators with spaces")
    args = p.parse_args()
    upstream = FakeUpstream(words=args.words, spaced=args.spaced)
    uvicorn.run(
        upstream.app(), host=args.host, port=args.port, log_level="warning", access_log=False
    )


if __name__ == "__main__":
    main()
