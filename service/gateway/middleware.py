"""Pure-ASGI middleware (not BaseHTTPMiddleware, which breaks streaming and cancellation):
request ids, Host (keyless mode), auth, Content-Type, body-size limit and body deadline, and
draining, in that order. Admission is not here: it weighs a request by its cost, known only once
its body has arrived (pipeline.py). Every route's body (the front door's lanes and FastAPI's,
such as /v1/route) must arrive within `body_timeout_s` of the request's start: a client that
sends headers and then stalls gets a 408 and holds nothing.

Browser-borne requests: a POST to /v1/* must say `Content-Type: application/json` (415
otherwise), which an HTML form or a "simple" cross-origin fetch cannot send, so a web page
cannot drive the API (CSRF). A gateway without API keys also answers only to loopback Host
values (localhost, *.localhost, 127.0.0.0/8, [::1]): a DNS-rebinding page that reaches it
under its own host name gets a 400 (unless OCTOGRAPH_ALLOW_OPEN=true)."""

from __future__ import annotations

import asyncio
import contextlib
import re
import uuid
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from service.errors import (
    BadRequest,
    PayloadTooLarge,
    RequestTimeout,
    ServiceError,
    Unavailable,
    UnsupportedMediaType,
    render,
)
from service.gateway.auth import ApiKeys
from service.internal_auth import is_loopback_host
from service.serving import Lifecycle

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

OPEN_PATHS = frozenset({"/livez", "/readyz", "/console"})
# The console's static shell (code, no data) loads without a key; it then asks for one.
OPEN_PREFIXES = ("/console/static/",)
ADMITTED_PREFIXES = ("/v1/",)
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._\-]{1,64}$")
JSON_PREFIXES = ("/v1/",)
# An oversized body announced by Content-Length is read and thrown away (up to this much, for
# at most DISCARD_TIMEOUT_S) before the 413 goes out: a client that writes its whole body before
# reading (Python's urllib and requests do) would otherwise meet a reset connection, not the
# 413. Beyond the bound, or with `Expect: 100-continue` (the client waits for us), the 413 goes
# out at once and the connection closes.
MAX_DISCARD_BYTES = 16 << 20
DISCARD_TIMEOUT_S = 10.0


async def send_error(
    send: Send, error: ServiceError, extra: list[tuple[bytes, bytes]] | None = None
) -> None:
    status, headers, body = render(error)
    await send(
        {"type": "http.response.start", "status": status, "headers": [*headers, *(extra or [])]}
    )
    await send({"type": "http.response.body", "body": body})


class GatewayMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        *,
        keys: ApiKeys,
        lifecycle: Lifecycle,
        max_body_bytes: int,
        metrics_open: bool,
        allow_open: bool = False,
        body_timeout_s: float = 15.0,
    ) -> None:
        self.app = app
        self.body_timeout_s = body_timeout_s
        self.keys = keys
        self.lifecycle = lifecycle
        self.max_body = max_body_bytes
        self.open_paths = OPEN_PATHS | ({"/metrics"} if metrics_open else set())
        self.allow_open = allow_open

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = self._request_id(scope)
        scope.setdefault("state", {})["request_id"] = request_id
        rid_header = (b"x-request-id", request_id.encode())

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], rid_header]
            await send(message)

        path: str = scope["path"]
        if not self.keys.enabled and not self.allow_open and path not in OPEN_PATHS:
            host = _header(scope, b"host")
            if host is not None and not loopback_host_header(host):
                await send_error(
                    send_with_id,
                    BadRequest(
                        "this gateway has no API keys, so it answers only to localhost; "
                        "configure API keys to serve it under another host name",
                        code="host_not_allowed",
                    ),
                )
                return
        if path not in self.open_paths and not path.startswith(OPEN_PREFIXES):
            key, error = self.keys.authenticate(_header(scope, b"authorization"))
            if error is not None:
                await send_error(send_with_id, error, [(b"www-authenticate", b"Bearer")])
                return
            scope["state"]["api_key"] = key  # who, for per-key limits (admission.py)
            # May see other clients' traffic (the console's decisions): an admin key.
            scope["state"]["sees_every_client"] = self.keys.sees_every_client(key)
        if scope["method"] == "POST" and path.startswith(JSON_PREFIXES):
            content_type = _header(scope, b"content-type") or ""
            if content_type.split(";", 1)[0].strip().lower() != "application/json":
                await send_error(
                    send_with_id,
                    UnsupportedMediaType(
                        "send the request body as JSON with 'Content-Type: application/json'",
                        code="unsupported_media_type",
                    ),
                    [(b"connection", b"close")],
                )
                return
        length = _header(scope, b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body:
            expects_continue = (_header(scope, b"expect") or "").lower() == "100-continue"
            if int(length) <= MAX_DISCARD_BYTES and not expects_continue:
                await _discard_body(receive)
            await send_error(
                send_with_id,
                PayloadTooLarge(f"the request body is larger than {self.max_body} bytes"),
                [(b"connection", b"close")],
            )
            return
        if not path.startswith(ADMITTED_PREFIXES):
            await self.app(
                scope, _limited(receive, self.max_body, self.body_timeout_s), send_with_id
            )
            return
        if self.lifecycle.draining:
            await send_error(
                send_with_id, Unavailable("the gateway is shutting down", code="draining")
            )
            return
        # Counted for the drain (in-flight requests finish before the process exits).
        self.lifecycle.enter()
        try:
            await self.app(
                scope, _limited(receive, self.max_body, self.body_timeout_s), send_with_id
            )
        finally:
            self.lifecycle.leave()

    @staticmethod
    def _request_id(scope: Scope) -> str:
        given = _header(scope, b"x-request-id")
        if given and _REQUEST_ID.match(given):
            return given
        return uuid.uuid4().hex


def _header(scope: Scope, name: bytes) -> str | None:
    for k, v in scope.get("headers", ()):
        if k == name:
            return bytes(v).decode("latin-1")
    return None


def loopback_host_header(host: str) -> bool:
    """Whether a Host header names this machine's loopback (port ignored)."""
    host = host.strip().lower()
    if host.startswith("["):
        name = host[1 : host.find("]")] if "]" in host else host[1:]
    else:
        name = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
    name = name.rstrip(".")
    return name == "localhost" or name.endswith(".localhost") or is_loopback_host(name)


async def _discard_body(receive: Receive) -> None:
    """Reads the request body to its end and drops it (bounded by the caller's check of
    Content-Length and by DISCARD_TIMEOUT_S)."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(DISCARD_TIMEOUT_S):
            while True:
                message = await receive()
                if message["type"] != "http.request" or not message.get("more_body", False):
                    return


def _limited(receive: Receive, limit: int, timeout_s: float) -> Receive:
    """The body as the app reads it, bounded in size (streamed, chunked bodies too:
    Content-Length is not always sent) and in time: it must have arrived within `timeout_s` of
    the request's start (RequestTimeout, a 408, after that). Once it has, `receive` is the
    server's own (a wait for the disconnect has no deadline)."""
    seen = 0
    arrived = False
    deadline = asyncio.get_running_loop().time() + timeout_s

    async def wrapped() -> Message:
        nonlocal seen, arrived
        if arrived:
            return await receive()
        try:
            async with asyncio.timeout_at(deadline):
                message = await receive()
        except TimeoutError:
            raise RequestTimeout(f"the request body did not arrive within {timeout_s:g}s") from None
        if message["type"] == "http.request":
            seen += len(message.get("body", b""))
            if seen > limit:
                raise PayloadTooLarge(f"the request body is larger than {limit} bytes")
            arrived = not message.get("more_body", False)
        else:
            arrived = True
        return message

    return wrapped
