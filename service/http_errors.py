"""FastAPI's side of the one error renderer (`errors.render`), for gateway and workers alike."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.errors import (
    BadRequest,
    MethodNotAllowed,
    NotFound,
    ServiceError,
    error_from_status,
    render,
)

log = logging.getLogger(__name__)


def error_response(error: ServiceError, headers: dict[str, str] | None = None) -> Response:
    status, base, body = render(error)
    hdrs = {k.decode(): v.decode() for k, v in base}
    hdrs.update(headers or {})
    return Response(body, status_code=status, headers=hdrs)


def validation_message(errors: Sequence[Any]) -> tuple[str, str | None]:
    """Built from the errors list, never str(exc): that one can carry server file paths."""
    if not errors:
        return "invalid request", None
    first = errors[0]
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    msg = str(first.get("msg", "invalid value"))
    if first.get("type") == "json_invalid":
        return "the request body is not valid JSON", None
    if first.get("type") in ("model_attributes_type", "model_type") or (not loc and "dict" in msg):
        return "the request body must be a JSON object", None
    if first.get("type") in ("string_unicode", "unicode_error") or "surrogate" in msg:
        return "the request body is not valid UTF-8 text", param
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return (f"{param}: {msg}{more}" if param else f"{msg}{more}"), param


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServiceError)
    async def _service_error(_: Request, exc: ServiceError) -> Response:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> Response:
        message, param = validation_message(exc.errors())
        return error_response(BadRequest(message, param=param))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> Response:
        if isinstance(exc.__cause__, ServiceError):
            # Raised while FastAPI read the body (the middleware's size and time bounds), which
            # FastAPI wraps in a 400 "error parsing the body": the cause is the answer.
            return error_response(exc.__cause__, {"connection": "close"})
        if exc.status_code == 404:
            return error_response(NotFound("no such route"))
        if exc.status_code == 405:
            return error_response(MethodNotAllowed("method not allowed on this route"))
        return error_response(error_from_status(exc.status_code, str(exc.detail)))

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> Response:
        log.exception("unhandled error", exc_info=exc)
        return error_response(ServiceError("internal error; the gateway log has the details"))
