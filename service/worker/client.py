"""HTTP client for one worker replica. Every call has explicit timeouts; the connection pool is
shared and bounded; errors come back as ServiceErrors from the one taxonomy."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any, TypeVar

import httpx
import orjson
from pydantic import BaseModel

from service.errors import (
    DeadlineExceeded,
    ServiceError,
    Unavailable,
    UpstreamError,
    error_from_status,
)
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


class WorkerUnreachable(Unavailable):
    """Connecting failed or the worker refused before answering: safe to retry elsewhere."""


def make_http_client(
    connect_s: float, read_s: float, max_connections: int = 512
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


async def _error_from_response(response: httpx.Response) -> ServiceError:
    try:
        body = orjson.loads(await response.aread())
        err = body.get("error", {}) if isinstance(body, dict) else {}
        message = str(err.get("message") or response.reason_phrase)
        code = err.get("code")
    except (orjson.JSONDecodeError, httpx.HTTPError):
        message, code = f"worker answered {response.status_code}", None
    if response.status_code == 503:
        return WorkerUnreachable(message)
    return error_from_status(response.status_code, message, code)


class WorkerClient:
    def __init__(self, base_url: str, http: httpx.AsyncClient) -> None:
        self.base_url = base_url.rstrip("/")
        self._http = http

    def __repr__(self) -> str:
        return f"WorkerClient({self.base_url})"

    async def stream_generate(
        self, request: GenerateRequest, headers: dict[str, str] | None = None
    ) -> AsyncIterator[GenerateEvent]:
        """Yields the worker's events. Raises WorkerUnreachable before the first event when the
        worker cannot be reached (the caller may retry elsewhere), other ServiceErrors after."""
        body = request.model_dump_json(exclude_none=True).encode()
        req = self._http.build_request(
            "POST",
            f"{self.base_url}/internal/generate",
            content=body,
            headers={"content-type": "application/json", **(headers or {})},
        )
        try:
            response = await self._http.send(req, stream=True)
        except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as exc:
            raise WorkerUnreachable(
                f"worker {self.base_url} unreachable: {type(exc).__name__}"
            ) from None
        except httpx.HTTPError as exc:
            raise UpstreamError(f"worker request failed: {type(exc).__name__}") from None
        try:
            if response.status_code != 200:
                raise await _error_from_response(response)
            async for line in response.aiter_lines():
                if line:
                    yield orjson.loads(line)
        except httpx.ReadTimeout:
            raise DeadlineExceeded("the worker stopped sending tokens (read timeout)") from None
        except httpx.HTTPError as exc:
            raise UpstreamError(f"the worker stream broke: {type(exc).__name__}") from None
        finally:
            await response.aclose()

    async def _post(
        self, path: str, request: BaseModel, out: type[T], headers: dict[str, str] | None = None
    ) -> T:
        try:
            response = await self._http.post(
                f"{self.base_url}{path}",
                content=request.model_dump_json(exclude_none=True).encode(),
                headers={"content-type": "application/json", **(headers or {})},
            )
        except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as exc:
            raise WorkerUnreachable(
                f"worker {self.base_url} unreachable: {type(exc).__name__}"
            ) from None
        except httpx.TimeoutException:
            raise DeadlineExceeded(f"worker {self.base_url} timed out") from None
        except httpx.HTTPError as exc:
            raise UpstreamError(f"worker request failed: {type(exc).__name__}") from None
        if response.status_code != 200:
            raise await _error_from_response(response)
        return out.model_validate_json(response.content)

    async def score(
        self, request: ScoreRequest, headers: dict[str, str] | None = None
    ) -> ScoreResponse:
        return await self._post("/internal/score", request, ScoreResponse, headers)

    async def byte_dist(
        self, request: ByteDistRequest, headers: dict[str, str] | None = None
    ) -> ByteDistResponse:
        return await self._post("/internal/byte-dist", request, ByteDistResponse, headers)

    async def info(self) -> WorkerInfo:
        try:
            response = await self._http.get(f"{self.base_url}/internal/info", timeout=5.0)
        except httpx.HTTPError as exc:
            raise WorkerUnreachable(f"worker {self.base_url}: {type(exc).__name__}") from None
        if response.status_code != 200:
            raise await _error_from_response(response)
        return WorkerInfo.model_validate_json(response.content)

    async def ready(self, timeout_s: float = 2.0) -> bool:
        try:
            response = await self._http.get(f"{self.base_url}/readyz", timeout=timeout_s)
        except httpx.HTTPError:
            return False
        return response.status_code == 200

    async def abort(self, request_id: str) -> None:
        # Best effort: closing the stream already aborts on the worker.
        with contextlib.suppress(httpx.HTTPError):
            await self._http.post(f"{self.base_url}/internal/abort/{request_id}", timeout=2.0)


def parse_json(data: bytes) -> Any:
    return orjson.loads(data)
