"""The two generation endpoints as plain ASGI, in front of FastAPI's router.

`POST /v1/chat/completions` and `POST /v1/completions` are almost every request a gateway
sees; through FastAPI they paid for routing, dependency resolution, body parsing into Python
objects then validation, a Response object and, for streams, anyio task groups: about a third
of the gateway's CPU per request (bench/gateway_overhead.py --profile). Here the body is
validated straight from bytes (pydantic's JSON parser), the pipeline runs as it does behind
FastAPI, and the reply goes to `send` as bytes. Everything else, and the OpenAPI schema of
these two routes, stays with FastAPI; errors render through the same taxonomy
(`send_error`, `validation_message`), so a client cannot tell which lane served it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import orjson
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError

from service.errors import BadRequest, ServiceError
from service.gateway.middleware import ASGIApp, Receive, Scope, Send, send_error
from service.gateway.pipeline import Reply, RequestContext
from service.http_errors import validation_message
from service.protocol.openai import ChatCompletionRequest, CompletionRequest

if TYPE_CHECKING:
    from service.gateway.app import GatewayState

log = logging.getLogger(__name__)

_JSON = (b"content-type", b"application/json")
_SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]

Handler = Callable[[BaseModel, RequestContext], Awaitable[Reply]]


class ClientGone(Exception):
    """The client disconnected before the reply was complete."""


class FastLane:
    def __init__(self, app: ASGIApp, state: GatewayState) -> None:
        self.app = app
        self.state = state
        pipeline = state.pipeline
        self.lanes: dict[str, tuple[type[BaseModel], Handler]] = {
            "/v1/chat/completions": (ChatCompletionRequest, pipeline.chat),  # type: ignore[dict-item]
            "/v1/completions": (CompletionRequest, pipeline.completion),  # type: ignore[dict-item]
        }

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        lane = self.lanes.get(scope["path"]) if scope["type"] == "http" else None
        if lane is None or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracked(message: dict[str, Any]) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self._serve(lane, scope, receive, tracked)
        except ClientGone:
            pass
        except Exception as exc:
            if started:  # mid-stream: the pipeline's stream reports its own errors as events
                log.exception("stream failed after its headers were sent")
                return
            if not isinstance(exc, ServiceError):
                log.exception("unhandled error", exc_info=exc)
                exc = ServiceError("internal error; the gateway log has the details")
            await send_error(send, exc)

    async def _serve(
        self,
        lane: tuple[type[BaseModel], Handler],
        scope: Scope,
        receive: Receive,
        send: Callable[[dict[str, Any]], Awaitable[None]],
    ) -> None:
        schema, handler = lane
        body = await _read_body(receive)
        try:
            request = schema.model_validate_json(body)
        except ValidationError as exc:
            errors = [{**e, "loc": ("body", *e["loc"])} for e in exc.errors(include_url=False)]
            message, param = validation_message(RequestValidationError(errors))
            raise BadRequest(message, param=param) from None
        rid = scope.get("state", {}).get("request_id") or "req"
        ctx = RequestContext(
            request_id=rid, deadline=time.monotonic() + self.state.settings.request_timeout_s
        )
        async with _CancelOnDisconnect(receive) as watch:
            reply = await watch.run(handler(request, ctx))
            headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in reply.headers.items()]
            if reply.stream is None:
                payload = orjson.dumps(reply.body)
                await send(
                    {
                        "type": "http.response.start",
                        "status": 200,
                        "headers": [
                            _JSON,
                            (b"content-length", str(len(payload)).encode()),
                            *headers,
                        ],
                    }
                )
                await send({"type": "http.response.body", "body": payload})
                return
            await send(
                {"type": "http.response.start", "status": 200, "headers": [*_SSE_HEADERS, *headers]}
            )
            stream = reply.stream
            try:
                while True:
                    chunk = await watch.run(anext(stream, None))
                    if chunk is None:
                        break
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
            finally:
                # The generator's finally blocks abort the worker request when we stop early.
                await watch.shield(_aclose(stream))
            await send({"type": "http.response.body", "body": b""})


async def _read_body(receive: Receive) -> bytes:
    chunks = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone()
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


async def _aclose(stream: Any) -> None:
    close = getattr(stream, "aclose", None)
    if close is not None:
        await close()


class _CancelOnDisconnect:
    """One watcher task for the whole request: a disconnect cancels whatever the request task
    is awaiting inside `run` (the pipeline, or the next stream chunk), which aborts the worker
    request; polling for the disconnect would miss it under load."""

    def __init__(self, receive: Receive) -> None:
        self._receive = receive
        self._gone = False
        self._in_run = False
        self._task = asyncio.current_task()
        self._watcher: asyncio.Task[None] | None = None

    async def __aenter__(self) -> _CancelOnDisconnect:
        self._watcher = asyncio.get_running_loop().create_task(self._watch())
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._watcher is not None:
            self._watcher.cancel()

    async def _watch(self) -> None:
        while True:
            message = await self._receive()
            if message["type"] == "http.disconnect":
                self._gone = True
                if self._in_run and self._task is not None:
                    self._task.cancel()
                return

    async def run(self, work: Awaitable[Any]) -> Any:
        if self._gone:
            _close(work)
            raise ClientGone()
        self._in_run = True
        try:
            return await work
        except asyncio.CancelledError:
            if not self._gone:
                raise
            assert self._task is not None
            self._task.uncancel()
            raise ClientGone() from None
        finally:
            self._in_run = False

    async def shield(self, work: Awaitable[Any]) -> None:
        self._in_run = False  # a disconnect now must not cancel the clean-up
        await work


def _close(work: Awaitable[Any]) -> None:
    close = getattr(work, "close", None)
    if close is not None:
        close()
