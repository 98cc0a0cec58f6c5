"""The front door of the two generation endpoints, as plain ASGI in front of FastAPI.

`POST /v1/chat/completions` and `POST /v1/completions` are almost every request a gateway
sees, and this is their only implementation: the body is read (within `body_timeout_s`),
validated straight from bytes (pydantic's JSON parser), planned once, handed to the pipeline,
and the reply goes to `send` as bytes. Through FastAPI they paid for routing, dependency
resolution, a Response object and, for streams, anyio task groups: about a third of the
gateway's CPU per request (bench/gateway_overhead.py --profile). FastAPI serves the rest and
describes these two operations in the OpenAPI document (app.py); errors render through the one
taxonomy (`errors.render`), so a client cannot tell which lane served it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import orjson
from pydantic import BaseModel, ValidationError

from service.errors import (
    BadRequest,
    MethodNotAllowed,
    PayloadTooLarge,
    RequestTimeout,
    ServiceError,
)
from service.gateway.middleware import ASGIApp, Receive, Scope, Send, send_error
from service.gateway.plan import RequestContext, RequestPlan, plan_chat, plan_completion
from service.gateway.reply import Reply
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

Planner = Callable[[Any, RequestContext], RequestPlan]


class ClientGone(Exception):
    """The client disconnected before the reply was complete."""


class FrontDoor:
    def __init__(self, app: ASGIApp, state: GatewayState) -> None:
        self.app = app
        self.state = state
        self.lanes: dict[str, tuple[type[BaseModel], Planner]] = {
            "/v1/chat/completions": (ChatCompletionRequest, plan_chat),
            "/v1/completions": (CompletionRequest, plan_completion),
        }

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        lane = self.lanes.get(scope["path"]) if scope["type"] == "http" else None
        if lane is None:
            await self.app(scope, receive, send)
            return
        if scope["method"] != "POST":
            await send_error(send, MethodNotAllowed("method not allowed on this route"))
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
            # A body cut short leaves the connection mid-request: it closes after the answer.
            cut = isinstance(exc, RequestTimeout | PayloadTooLarge)
            await send_error(send, exc, [(b"connection", b"close")] if cut else None)

    async def _serve(
        self,
        lane: tuple[type[BaseModel], Planner],
        scope: Scope,
        receive: Receive,
        send: Callable[[dict[str, Any]], Awaitable[None]],
    ) -> None:
        schema, planner = lane
        settings = self.state.settings
        body = await _read_body(receive, settings.body_timeout_s)
        try:
            request = schema.model_validate_json(body)
        except ValidationError as exc:
            message, param = validation_message(exc.errors(include_url=False))
            raise BadRequest(message, param=param) from None
        state = scope.get("state", {})
        ctx = RequestContext(
            request_id=state.get("request_id") or "req",
            deadline=time.monotonic() + settings.request_timeout_s,
            key=state.get("api_key"),
        )
        plan = planner(request, ctx)
        # The graph's runtime, read once: a reload during this request changes nothing for it,
        # and the runtime is not released before the request ends (graph_runtime.py).
        with self.state.runtimes.use() as runtime:
            async with _CancelOnDisconnect(receive) as watch:
                reply = await watch.run(runtime.pipeline.handle(plan))
                try:
                    await self._send_reply(reply, watch, send)
                finally:
                    await watch.shield(reply.aclose())  # releases everything, however it ended

    async def _send_reply(
        self,
        reply: Reply,
        watch: _CancelOnDisconnect,
        send: Callable[[dict[str, Any]], Awaitable[None]],
    ) -> None:
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
        while True:
            chunk = await watch.run(anext(stream, None))
            if chunk is None:
                break
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b""})


async def _read_body(receive: Receive, timeout_s: float) -> bytes:
    """The whole body within `timeout_s`: a client that sends headers and then stalls gets a
    408 instead of holding a connection (it holds no admission slot: admission comes after)."""
    chunks = []
    try:
        async with asyncio.timeout(timeout_s):
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    raise ClientGone()
                chunks.append(message.get("body", b""))
                if not message.get("more_body", False):
                    return b"".join(chunks)
    except TimeoutError:
        raise RequestTimeout(f"the request body did not arrive within {timeout_s:g}s") from None


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
