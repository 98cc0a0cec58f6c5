"""HTTP client for one worker replica. Every call has explicit timeouts; the connection pool is
shared and bounded; errors come back as ServiceErrors from the one taxonomy."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import TypeVar

import httpx
import orjson
from pydantic import BaseModel, ValidationError

from service.errors import (
    DeadlineExceeded,
    Overloaded,
    ServiceError,
    Unavailable,
    UpstreamError,
    error_from_status,
)
from service.gateway.clients.http11 import (
    ConnectFailed,
    Http11Pool,
    PoolExhausted,
    ProtocolFailure,
    ReadTimeout,
    StreamResponse,
)
from service.internal_auth import auth_header
from service.protocol.internal import (
    ByteDistRequest,
    ByteDistResponse,
    GenerateEvent,
    GenerateRequest,
    ScoreRequest,
    ScoreResponse,
    WorkerInfo,
)

T = TypeVar("T", bound=BaseModel)
log = logging.getLogger(__name__)


class WorkerUnreachable(Unavailable):
    """Connecting failed or the worker refused before answering: safe to retry elsewhere."""


MAX_CONNECTIONS = 512  # per worker replica
# A byte-dist answer is ~5 KB a query and a request carries at most 512 queries.
MAX_JSON_ANSWER = 16 << 20


def make_http_client(
    connect_s: float, read_s: float, max_connections: int = MAX_CONNECTIONS
) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        timeout=httpx.Timeout(connect=connect_s, read=read_s, write=10.0, pool=connect_s),
        limits=httpx.Limits(
            max_connections=max_connections,
            max_keepalive_connections=max_connections,
            keepalive_expiry=30.0,
        ),
        # Workers are on private addresses; never pick up proxy settings from the environment.
        trust_env=False,
    )


_JSON = {"content-type": "application/json"}


def _error_from_body(status: int, raw: bytes, reason: str = "", model: str = "") -> ServiceError:
    if status == 401:
        # The worker refused the gateway, not the client: never a 401 to the client (whose key
        # was fine), and loud in the log, since every call to that worker fails.
        log.error(
            "a worker refused the gateway's worker secret: set the same "
            "OCTOGRAPH_WORKER_SECRET_FILE on the gateway and its workers",
            extra={"model": model},
        )
        return UpstreamError(f"a worker for '{model}' refused the gateway (worker secret)")
    try:
        body = orjson.loads(raw)
        err = body.get("error", {}) if isinstance(body, dict) else {}
        message = str(err.get("message") or reason or f"worker answered {status}")
        code = err.get("code")
    except orjson.JSONDecodeError:
        message, code = f"worker answered {status}", None
    if status == 503:
        return WorkerUnreachable(message)
    return error_from_status(status, message, code)


async def _error_from_response(response: httpx.Response, model: str) -> ServiceError:
    try:
        raw = await response.aread()
    except httpx.HTTPError:
        raw = b""
    return _error_from_body(response.status_code, raw, response.reason_phrase, model)


class WorkerClient:
    def __init__(
        self,
        base_url: str,
        http: httpx.AsyncClient,
        *,
        model: str = "",
        max_streams: int = MAX_CONNECTIONS,
        secret: str | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.model = model  # named in errors instead of the worker's address
        self._http = http
        # The workers' shared secret, on every call (service/internal_auth.py).
        self._auth: dict[str, str] = auth_header(secret) if secret else {}
        # The generate stream (the hot path) has its own lean keep-alive pool, with the shared
        # client's timeouts (service/gateway/clients/http11.py says why).
        timeout = http.timeout
        self._streams = Http11Pool(
            self.base_url,
            connect_timeout_s=timeout.connect or 5.0,
            read_timeout_s=timeout.read or 300.0,
            max_connections=max_streams,
        )

    def __repr__(self) -> str:
        return f"WorkerClient({self.base_url})"

    async def stream_generate(
        self, request: GenerateRequest, headers: dict[str, str] | None = None
    ) -> AsyncIterator[GenerateEvent]:
        """Yields the worker's events. Raises WorkerUnreachable before the first event when the
        worker cannot be reached (the caller may retry elsewhere), other ServiceErrors after.
        Closing this iterator early drops the connection: that is what aborts the worker."""
        body = request.model_dump_json(exclude_none=True).encode()
        response = await self._send("/internal/generate", body, headers)
        try:
            if response.status != 200:
                raise _error_from_body(response.status, await response.read(), model=self.model)
            loads = orjson.loads
            while lines := await response.next_lines():
                for line in lines:
                    yield loads(line)
        except ReadTimeout:
            raise DeadlineExceeded("the worker stopped sending tokens (read timeout)") from None
        except ProtocolFailure as exc:
            log.warning("worker stream broke", extra={"replica": self.base_url, "error": str(exc)})
            raise UpstreamError("the worker stream broke") from None
        except orjson.JSONDecodeError:
            raise UpstreamError("the worker sent a malformed event") from None
        finally:
            response.close()

    async def aclose(self) -> None:
        await self._streams.aclose()

    async def score(
        self, request: ScoreRequest, headers: dict[str, str] | None = None
    ) -> ScoreResponse:
        # On every routed request (the router's one forward): over the lean pool, as the
        # generate stream (httpx cost ~2.6 ms of event-loop CPU a call).
        return await self._exchange("/internal/score", request, ScoreResponse, headers)

    async def byte_dist(
        self, request: ByteDistRequest, headers: dict[str, str] | None = None
    ) -> ByteDistResponse:
        # Once per ensemble member per generated byte (10% of a byte's time through httpx).
        return await self._exchange("/internal/byte-dist", request, ByteDistResponse, headers)

    async def _exchange(
        self, path: str, request: BaseModel, out: type[T], headers: dict[str, str] | None
    ) -> T:
        """One JSON request, one JSON answer (at most MAX_JSON_ANSWER bytes) over the pool."""
        body = request.model_dump_json(exclude_none=True).encode()
        raw = await self._post_lean(path, body, headers, MAX_JSON_ANSWER)
        try:
            return out.model_validate_json(raw)
        except ValidationError:
            raise UpstreamError(f"the worker sent a malformed answer to {path}") from None

    async def _send(self, path: str, body: bytes, headers: dict[str, str] | None) -> StreamResponse:
        """POST over the HTTP/1.1 pool, up to the answer's status and headers."""
        try:
            return await self._streams.post_stream(
                path, body, {**_JSON, **(headers or {}), **self._auth}
            )
        except PoolExhausted:
            # Load (one client's fan-out, a burst), not a dead replica: never marks it down.
            raise Overloaded(
                f"model worker for '{self.model}' is at capacity; retry shortly"
            ) from None
        except ConnectFailed:
            log.warning("worker unreachable", extra={"replica": self.base_url})
            raise WorkerUnreachable(f"a worker for '{self.model}' is unreachable") from None
        except ReadTimeout:
            raise DeadlineExceeded(f"a worker for '{self.model}' did not answer in time") from None
        except ProtocolFailure as exc:
            log.warning(
                "worker request failed", extra={"replica": self.base_url, "error": str(exc)}
            )
            raise UpstreamError("a worker request failed") from None

    async def _post_lean(
        self, path: str, body: bytes, headers: dict[str, str] | None, limit: int
    ) -> bytes:
        """POST over the HTTP/1.1 pool; the whole answer (at most `limit` bytes) on 200."""
        response = await self._send(path, body, headers)
        try:
            raw = await response.read(limit)
        except ReadTimeout:
            raise DeadlineExceeded(f"a worker for '{self.model}' did not answer in time") from None
        except ProtocolFailure as exc:
            log.warning(
                "worker request failed", extra={"replica": self.base_url, "error": str(exc)}
            )
            raise UpstreamError("a worker request failed") from None
        finally:
            response.close()
        if response.status != 200:
            raise _error_from_body(response.status, raw, model=self.model)
        return raw

    async def info(self) -> WorkerInfo:
        try:
            response = await self._http.get(
                f"{self.base_url}/internal/info", timeout=5.0, headers=self._auth
            )
        except httpx.HTTPError as exc:
            raise WorkerUnreachable(f"a worker for '{self.model}': {type(exc).__name__}") from None
        if response.status_code != 200:
            raise await _error_from_response(response, self.model)
        return WorkerInfo.model_validate_json(response.content)

    async def ready(self, timeout_s: float = 2.0) -> bool:
        try:
            response = await self._http.get(
                f"{self.base_url}/readyz", timeout=timeout_s, headers=self._auth
            )
        except httpx.HTTPError:
            return False
        return response.status_code == 200
