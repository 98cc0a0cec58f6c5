"""HTTP client for one URL of an OpenAI-compatible upstream (one replica of a `kind: openai`
model). Every call has the model's connect/read timeouts, bodies and SSE events are read with a
size bound, and failures come back as ServiceErrors from the one taxonomy (service/errors.py),
tagged with whether another replica may be tried and whether the replica looks unhealthy."""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import orjson

from service.errors import (
    BadRequest,
    DeadlineExceeded,
    Overloaded,
    PayloadTooLarge,
    ServiceError,
    Unavailable,
    UpstreamError,
)
from service.gateway.clients.http11 import (
    ConnectFailed,
    Http11Pool,
    ProtocolFailure,
    ReadTimeout,
    StreamResponse,
)
from service.graph.schema import GraphConfig, GraphError, OpenAIModelSpec

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 32 * 1024 * 1024  # a non-streamed reply (n=8 long completions with logprobs)


class UpstreamFailure(Exception):
    """A call that failed before anything reached the client.

    `retry`: another replica may answer (connect errors, 429, 5xx, a dropped connection);
    `unhealthy`: count it against this replica (cooldown), like a failing local worker."""

    def __init__(self, error: ServiceError, *, retry: bool, unhealthy: bool) -> None:
        super().__init__(error.message)
        self.error = error
        self.retry = retry
        self.unhealthy = unhealthy


def _error_parts(raw: bytes) -> tuple[str | None, str | None, str | None]:
    """(message, code, param) from the error bodies upstreams send: OpenAI/vLLM/llama.cpp
    `{"error": {...}}`, TGI/Ollama `{"error": "..."}`, older vLLM `{"message": ...}`."""
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None, None, None
    if not isinstance(body, dict):
        return None, None, None
    err = body.get("error", body)
    if isinstance(err, str):
        return err, None, None
    if not isinstance(err, dict):
        return None, None, None
    message, code, param = err.get("message"), err.get("code"), err.get("param")
    return (
        str(message) if message is not None else None,
        code if isinstance(code, str) else None,
        param if isinstance(param, str) else None,
    )


MAX_RELAYED_MESSAGE = 500  # characters of an upstream's message about the client's request


def failure_from_status(model: str, status: int, raw: bytes) -> UpstreamFailure:
    """An upstream's HTTP error -> the gateway's error. The client's own mistakes (400, 413,
    422) keep the upstream's message (its text only, bounded); anything else gets the
    gateway's own words, and the upstream's body goes to the log, not to the client (it is the
    operator's account and infrastructure talking). The gateway's configuration problems (a
    refused key, an unknown upstream model) become 502s that say what to fix. (A 429's
    Retry-After is the gateway's own 1 s: the lean client does not keep response headers.)"""
    message, code, param = _error_parts(raw)
    if status not in (400, 413, 422):
        log.warning(
            "upstream error",
            extra={"model": model, "status": status, "body": raw[:2000].decode("utf-8", "replace")},
        )
    elif message is not None and len(message) > MAX_RELAYED_MESSAGE:
        message = message[:MAX_RELAYED_MESSAGE] + "…"
    if status == 429:
        error: ServiceError = Overloaded(
            f"the upstream of model '{model}' is rate limiting", code="upstream_rate_limited"
        )
        return UpstreamFailure(error, retry=True, unhealthy=True)
    if status >= 500:
        cls = Unavailable if status == 503 else UpstreamError
        error = cls(f"the upstream of model '{model}' failed (HTTP {status})")
        return UpstreamFailure(error, retry=True, unhealthy=True)
    if status in (400, 422):
        error = BadRequest(
            message or f"the upstream refused the request ({status})", param=param, code=code
        )
    elif status == 413:
        error = PayloadTooLarge(message or "the request is too large for the upstream")
    elif status in (401, 403):
        error = UpstreamError(
            f"the upstream of model '{model}' refused the gateway's credentials (HTTP {status}); "
            "check the model's api_key_env / api_key_file",
            code="upstream_auth",
        )
    elif status == 404:
        error = UpstreamError(
            f"the upstream of model '{model}' does not know the model or path (HTTP 404); "
            "check the model's base_url and model name",
            code="upstream_not_found",
        )
    else:
        error = UpstreamError(f"the upstream of model '{model}' answered HTTP {status}")
    return UpstreamFailure(error, retry=False, unhealthy=False)


def failure_from_exception(model: str, exc: Exception) -> UpstreamFailure:
    """A call that broke -> the gateway's error; what broke (addresses, OS errors) is logged."""
    log.warning("upstream call failed", extra={"model": model, "error": f"{exc!r}"[:500]})
    if isinstance(exc, ConnectFailed):  # nothing reached the upstream
        error: ServiceError = Unavailable(f"the upstream of model '{model}' is unreachable")
        return UpstreamFailure(error, retry=True, unhealthy=True)
    if isinstance(exc, ReadTimeout):
        # Not retried: a second attempt would wait as long again, past most deadlines.
        error = DeadlineExceeded(f"the upstream of model '{model}' timed out (read timeout)")
        return UpstreamFailure(error, retry=False, unhealthy=True)
    error = UpstreamError(f"the upstream of model '{model}' broke the connection")
    return UpstreamFailure(error, retry=True, unhealthy=True)


def sse_payload(line: bytes) -> bytes | None:
    """The payload of an SSE `data:` line; None for anything else (blank lines, comments such
    as `: ping` keep-alives, `event:`/`id:`/`retry:`). An OpenAI stream puts each event's JSON
    on one `data:` line (JSON has no raw newlines), so a line is an event."""
    if line.endswith(b"\r"):
        line = line[:-1]
    if line.startswith(b"data: "):
        return line[6:]
    if line.startswith(b"data:"):
        return line[5:]
    return None


@dataclass
class UpstreamStream:
    """An open streaming reply: the first event's payload (already read, so a failure before it
    could still be retried) and the rest. `payloads` ends at [DONE]; a stream that breaks or
    ends without [DONE] raises; closing it closes the connection."""

    first: bytes | None
    payloads: AsyncIterator[bytes]


class UpstreamClient:
    """The hot path (POST chat/completions, streamed or not) goes through the lean HTTP/1.1
    pool the worker client uses (service/gateway/clients/http11.py: httpx cost about 60% of the
    gateway's CPU per proxied request); httpx stays for the health probe."""

    def __init__(
        self,
        model: str,
        base_url: str,
        spec: OpenAIModelSpec,
        api_key: str | None,
    ) -> None:
        self.model = model  # the gateway's id for the model (errors, logs)
        self._base_url = base_url.rstrip("/")
        self._health_path = spec.health_path
        headers = dict(spec.headers)
        if api_key:
            headers["authorization"] = f"Bearer {api_key}"
        self._headers = {"content-type": "application/json", **headers}
        self._pool = Http11Pool(
            self._base_url,
            connect_timeout_s=spec.connect_timeout_s,
            read_timeout_s=spec.read_timeout_s,
            max_connections=spec.max_concurrency,
        )
        self._http = httpx.AsyncClient(
            headers=headers,
            timeout=httpx.Timeout(spec.connect_timeout_s, read=spec.read_timeout_s),
            limits=httpx.Limits(max_connections=2, max_keepalive_connections=1),
            trust_env=False,  # no proxy from the environment: upstream proxies are unsupported
        )
        self._auth_warned = False

    @property
    def base_url(self) -> str:
        return self._base_url

    def __repr__(self) -> str:
        return f"UpstreamClient({self.model} @ {self._base_url})"

    async def aclose(self) -> None:
        await self._pool.aclose()
        await self._http.aclose()

    async def ready(self, timeout_s: float = 2.0) -> bool:
        """Up when the server answers the health path below 500. A refused key (401/403) is
        still up: requests then fail with a 502 that names the problem, which says more than
        a node that is merely down."""
        if self._health_path is None:
            return True
        try:
            response = await self._http.get(self._base_url + self._health_path, timeout=timeout_s)
        except httpx.HTTPError:
            return False
        if response.status_code in (401, 403) and not self._auth_warned:
            self._auth_warned = True
            log.warning(
                "upstream refused the API key",
                extra={"model": self.model, "replica": self._base_url},
            )
        return response.status_code < 500

    async def _send(self, path: str, body: bytes, headers: dict[str, str]) -> StreamResponse:
        try:
            response = await self._pool.post_stream(path, body, {**self._headers, **headers})
        except (ConnectFailed, ReadTimeout, ProtocolFailure) as exc:
            raise failure_from_exception(self.model, exc) from None
        if response.status != 200:
            try:
                raw = await response.read(64 * 1024)
            except (ReadTimeout, ProtocolFailure):
                raw = b""
            finally:
                response.close()
            raise failure_from_status(self.model, response.status, raw)
        return response

    async def post(self, path: str, body: bytes, headers: dict[str, str]) -> bytes:
        """A non-streamed call: the whole reply body (bounded)."""
        response = await self._send(path, body, headers)
        try:
            return await response.read(MAX_BODY_BYTES)
        except (ReadTimeout, ProtocolFailure) as exc:
            raise failure_from_exception(self.model, exc) from None
        finally:
            response.close()

    async def open_stream(self, path: str, body: bytes, headers: dict[str, str]) -> UpstreamStream:
        """A streamed call, open up to its first event; an error event there is raised."""
        response = await self._send(path, body, headers)
        payloads = self._payloads(response)
        try:
            first = await anext(payloads, None)
            if first is not None and is_error_event(first):
                raise failure_from_event(self.model, first)
        except UpstreamError as exc:
            # Dropped before the first event: nothing reached the client, another replica may.
            raise UpstreamFailure(exc, retry=True, unhealthy=True) from None
        except DeadlineExceeded as exc:
            raise UpstreamFailure(exc, retry=False, unhealthy=True) from None
        except BaseException:
            await payloads.aclose()  # type: ignore[attr-defined]
            raise
        return UpstreamStream(first, payloads)

    async def _payloads(self, response: StreamResponse) -> AsyncIterator[bytes]:
        """Event payloads up to [DONE], read a network batch at a time. Closing this generator
        closes the response; one that is read to its end keeps the connection for reuse."""
        try:
            while lines := await response.next_lines():
                for line in lines:
                    payload = sse_payload(line)
                    if payload is None:
                        continue
                    if payload == b"[DONE]":
                        await response.next_lines()  # the body's end: the connection is reusable
                        return
                    yield payload
        except ReadTimeout:
            raise DeadlineExceeded(
                f"the upstream of model '{self.model}' went silent (read timeout)"
            ) from None
        except ProtocolFailure as exc:
            raise UpstreamError(
                f"the upstream stream of model '{self.model}' broke ({exc})"
            ) from None
        finally:
            response.close()
        raise UpstreamError(f"the upstream stream of model '{self.model}' ended without [DONE]")


def is_error_event(payload: bytes) -> bool:
    """An in-stream error (vLLM, llama.cpp send `data: {"error": ...}`). Chunks start with
    another key (`{"id"`, `{"choices"`), so a prefix test is enough and costs nothing."""
    return payload[:12].replace(b" ", b"").startswith(b'{"error"')


def failure_from_event(model: str, payload: bytes) -> UpstreamFailure:
    code: object = None
    try:
        body = orjson.loads(payload)
        err = body.get("error") if isinstance(body, dict) else None
        code = err.get("code") if isinstance(err, dict) else None
    except orjson.JSONDecodeError:
        pass
    status = code if isinstance(code, int) and 400 <= code < 600 else 502
    return failure_from_status(model, status, payload)


def api_key(name: str, spec: OpenAIModelSpec, environ: dict[str, str] | None = None) -> str | None:
    """Read once at start-up (nothing reads the environment later). Missing = a start-up error
    naming the model, not a stream of 401s later."""
    env = os.environ if environ is None else environ
    if spec.api_key_env:
        key = env.get(spec.api_key_env, "").strip()
        if not key:
            raise GraphError(f"model '{name}': environment variable {spec.api_key_env} is not set")
        return key
    if spec.api_key_file:
        path = Path(os.path.expandvars(spec.api_key_file)).expanduser()
        try:
            key = path.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise GraphError(f"model '{name}': cannot read api_key_file: {exc.strerror}") from None
        if not key:
            raise GraphError(f"model '{name}': api_key_file is empty")
        return key
    return None


def upstream_clients(graph: GraphConfig) -> dict[str, list[UpstreamClient]]:
    """One client per URL of every `kind: openai` model (the replicas of its pool)."""
    out: dict[str, list[UpstreamClient]] = {}
    for name, spec in graph.openai_models().items():
        key = api_key(name, spec)
        out[name] = [UpstreamClient(name, url, spec, key) for url in spec.base_url]
    return out
