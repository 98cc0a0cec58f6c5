"""The one place where failures become HTTP responses (gateway and workers alike)."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.errors import (
    BadRequest,
    NotFound,
    Overloaded,
    ServiceError,
    error_from_status,
)

log = logging.getLogger(__name__)


def error_response(error: ServiceError, headers: dict[str, str] | None = None) -> JSONResponse:
    hdrs = dict(headers or {})
    if isinstance(error, Overloaded):
        hdrs["Retry-After"] = str(max(1, round(error.retry_after_s)))
    return JSONResponse(error.to_body(), status_code=error.status, headers=hdrs)


def validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    """Built from exc.errors(), never str(exc): that one can carry server file paths."""
    errors = exc.errors()
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
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return (f"{param}: {msg}{more}" if param else f"{msg}{more}"), param


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServiceError)
    async def _service_error(_: Request, exc: ServiceError) -> Response:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> Response:
        message, param = validation_message(exc)
        return error_response(BadRequest(message, param=param))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> Response:
        if exc.status_code == 404:
            return error_response(NotFound("no such route"))
        if exc.status_code == 405:
            err = BadRequest("method not allowed on this route")
            return JSONResponse(err.to_body(), status_code=405)
        return error_response(error_from_status(exc.status_code, str(exc.detail)))

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> Response:
        log.exception("unhandled error", exc_info=exc)
        return error_response(ServiceError("internal error; the gateway log has the details"))
