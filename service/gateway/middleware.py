"""Pure-ASGI middleware (not BaseHTTPMiddleware, which breaks streaming and cancellation):
request ids, auth, body-size limit and draining, in that order. Admission is not here: it
weighs a request by its cost, known only once its body has arrived (pipeline.py)."""

from __future__ import annotations

import re
import uuid
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from service.errors import PayloadTooLarge, ServiceError, Unavailable, render
from service.gateway.auth import ApiKeys
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
    ) -> None:
        self.app = app
        self.keys = keys
        self.lifecycle = lifecycle
        self.max_body = max_body_bytes
        self.open_paths = OPEN_PATHS | ({"/metrics"} if metrics_open else set())

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
        if path not in self.open_paths and not path.startswith(OPEN_PREFIXES):
            key, error = self.keys.authenticate(_header(scope, b"authorization"))
            if error is not None:
                await send_error(send_with_id, error, [(b"www-authenticate", b"Bearer")])
                return
            scope["state"]["api_key"] = key  # who, for per-key limits (admission.py)
        length = _header(scope, b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body:
            await send_error(
                send_with_id,
                PayloadTooLarge(f"the request body is larger than {self.max_body} bytes"),
            )
            return
        if not path.startswith(ADMITTED_PREFIXES):
            await self.app(scope, _limited(receive, self.max_body), send_with_id)
            return
        if self.lifecycle.draining:
            await send_error(
                send_with_id, Unavailable("the gateway is shutting down", code="draining")
            )
            return
        # Counted for the drain (in-flight requests finish before the process exits).
        self.lifecycle.enter()
        try:
            await self.app(scope, _limited(receive, self.max_body), send_with_id)
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


def _limited(receive: Receive, limit: int) -> Receive:
    """Counts streamed (chunked) bodies too: Content-Length is not always sent."""
    seen = 0

    async def wrapped() -> Message:
        nonlocal seen
        message = await receive()
        if message["type"] == "http.request":
            seen += len(message.get("body", b""))
            if seen > limit:
                raise PayloadTooLarge(f"the request body is larger than {limit} bytes")
        return message

    return wrapped
