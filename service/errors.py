"""The one error taxonomy. Every failure a client can see is a ServiceError subclass, and it is
rendered in exactly one place: `render` gives the status, headers and OpenAI error body of a
JSON reply, `sse_event` the same body as a stream's error event (TGI's `InferError` -> status
and SSE event). Gateway and workers, every lane and every node kind, use these two.
"""

from __future__ import annotations

import re
from typing import ClassVar

import orjson


class ServiceError(Exception):
    status: ClassVar[int] = 500
    type: ClassVar[str] = "internal_error"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = sanitize_message(message)
        self.param = param
        self.code = code

    def to_body(self) -> dict[str, object]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


class BadRequest(ServiceError):
    status, type = 400, "invalid_request_error"


class ContextLengthExceeded(BadRequest):
    def __init__(self, message: str, *, param: str | None = "messages"):
        super().__init__(message, param=param, code="context_length_exceeded")


class Unauthorized(ServiceError):
    status, type = 401, "authentication_error"


class MethodNotAllowed(ServiceError):
    status, type = 405, "invalid_request_error"


class NotFound(ServiceError):
    status, type = 404, "not_found_error"


class PayloadTooLarge(ServiceError):
    status, type = 413, "invalid_request_error"


class UnsupportedMediaType(ServiceError):
    status, type = 415, "invalid_request_error"


class Overloaded(ServiceError):
    status, type = 429, "rate_limit_error"

    def __init__(self, message: str, *, retry_after_s: float = 1.0, code: str = "overloaded"):
        super().__init__(message, code=code)
        self.retry_after_s = retry_after_s


class UpstreamError(ServiceError):
    """A worker failed or answered with an error we cannot hand to the client as a 4xx."""

    status, type = 502, "upstream_error"


class Unavailable(ServiceError):
    status, type = 503, "service_unavailable"


class DeadlineExceeded(ServiceError):
    status, type = 504, "timeout"


class RequestTimeout(ServiceError):
    """The client did not send its request body in time."""

    status, type = 408, "timeout"


_ADDRESS = re.compile(r"0x[0-9a-fA-F]{6,}")
_URL = re.compile(r"\b[a-zA-Z][a-zA-Z0-9+.\-]*://[^\s'\"<>()]+")
_IPV4 = re.compile(r"(?<![\w.])(?:\d{1,3}\.){3}\d{1,3}(?::\d{1,5})?(?![\w.])")
_PATH = re.compile(r"(?<![\w.])/(?:[\w.\-]+/)+[\w.\-]*")


def sanitize_message(message: str) -> str:
    """Strip memory addresses, URLs, IP addresses and file-system paths: messages reach
    untrusted clients (a worker's or an upstream's address is the operator's business)."""
    message = _ADDRESS.sub("0x…", message)
    message = _URL.sub("<url>", message)
    message = _IPV4.sub("<address>", message)
    return _PATH.sub("<path>", message)


def error_from_status(status: int, message: str, code: str | None = None) -> ServiceError:
    """Rebuild a ServiceError from a status code (e.g. a worker's error reply)."""
    if status == Overloaded.status:
        return Overloaded(message, code=code or "overloaded")
    for cls in (BadRequest, NotFound, PayloadTooLarge, Unavailable, DeadlineExceeded):
        if cls.status == status:
            return cls(message, code=code)
    return UpstreamError(message, code=code)


def render(error: ServiceError) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    """(status, headers, body) of the JSON reply for `error`: the only place a failure becomes
    an HTTP response (ASGI middleware, the front door and FastAPI's handlers all call it)."""
    headers = [(b"content-type", b"application/json")]
    if isinstance(error, Overloaded):
        headers.append((b"retry-after", str(max(1, round(error.retry_after_s))).encode()))
    return error.status, headers, orjson.dumps(error.to_body())


def sse_event(error: ServiceError) -> bytes:
    """The same body as a stream's error event, for failures after the first byte."""
    return b"data: " + orjson.dumps(error.to_body()) + b"\n\n"
