"""The worker's HTTP app: one model, stateless internal API (DESIGN.md "Workers")."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Annotated

import orjson
from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest

from service.errors import Overloaded, ServiceError, Unavailable
from service.http_errors import install_error_handlers
from service.internal_auth import InternalAuth
from service.observability.metrics import WorkerMetrics
from service.protocol.internal import (
    ByteDistRequest,
    ByteDistResponse,
    GenerateEvent,
    GenerateRequest,
    ScoreRequest,
    ScoreResponse,
    WorkerInfo,
)
from service.serving import Lifecycle
from service.worker.engine import Engine, PreparedPrompt
from service.worker.tool_calls import with_tool_calls

log = logging.getLogger(__name__)

# Paths that never need the worker secret: the kubelet's probes (and /metrics while it shares
# the API port; a worker with its own metrics port serves /metrics there only).
PROBE_PATHS = ("/livez", "/readyz")
# How often the engine's health is checked once it has started (vLLM notices a dead engine
# core through its process sentinel, with or without requests in flight).
ENGINE_WATCH_INTERVAL_S = 1.0
ENGINE_DEAD = "the engine died; this worker must be restarted"


class WorkerState:
    def __init__(self, engine: Engine, lifecycle: Lifecycle, max_inflight: int) -> None:
        self.engine = engine
        self.lifecycle = lifecycle
        self.max_inflight = max_inflight
        self.registry = CollectorRegistry()
        self.metrics = WorkerMetrics(self.registry)
        self.start_error: str | None = None
        self.started = False  # engine.start() returned: from now on, not ready = dead
        self.stopping = False
        self.engine_died = False

    @property
    def engine_dead(self) -> bool:
        """The engine started, then stopped working (engine-core process killed, CUDA error):
        nothing in this process can bring it back, so liveness fails and the worker exits."""
        return self.engine_died or (self.started and not self.stopping and not self.engine.ready)

    def admit(self) -> None:
        if self.lifecycle.draining:
            raise Unavailable("this worker is shutting down")
        if self.engine_dead:
            raise Unavailable(ENGINE_DEAD)
        if not self.engine.ready:
            raise Unavailable(self.start_error or "the engine is still loading")
        if self.lifecycle.inflight >= self.max_inflight:
            raise Overloaded("this worker is at capacity")


async def get_state(request: Request) -> WorkerState:
    # async: FastAPI runs a plain `def` dependency in a thread, a hand-off per request.
    state: WorkerState = request.app.state.worker
    return state


StateDep = Annotated[WorkerState, Depends(get_state)]


async def ndjson_stream(state: WorkerState, prepared: PreparedPrompt) -> AsyncIterator[bytes]:
    """The engine's events as NDJSON. A failure mid-stream becomes an error line: the status
    line has already gone out."""
    state.lifecycle.enter()
    state.metrics.inflight.inc()
    events = state.engine.generate(prepared)
    if prepared.request.tool_parser is not None:
        events = with_tool_calls(events, prepared.request, state.engine.tokenizer)
    try:
        async for event in events:
            if event["type"] == "delta":
                state.metrics.tokens.inc(len(event.get("token_ids", ())))
            yield orjson.dumps(event) + b"\n"
    except ServiceError as exc:
        err: GenerateEvent = {"type": "error", "status": exc.status, "message": exc.message}
        yield orjson.dumps(err) + b"\n"
    except Exception:
        log.exception("generation failed", extra={"request_id": prepared.request.request_id})
        crash: GenerateEvent = {"type": "error", "status": 500, "message": "generation failed"}
        yield orjson.dumps(crash) + b"\n"
    finally:
        # Runs on client disconnect too (the response task is cancelled): closing the engine
        # iterator aborts the engine request.
        await events.aclose()  # type: ignore[attr-defined]
        state.metrics.inflight.dec()
        state.lifecycle.leave()


def build_worker_app(
    engine: Engine,
    lifecycle: Lifecycle,
    *,
    max_inflight: int = 256,
    secret: str | None = None,
    metrics_on_api_port: bool = True,
    on_engine_death: Callable[[], None] | None = None,
    watch_interval_s: float = ENGINE_WATCH_INTERVAL_S,
) -> FastAPI:
    """The worker app. `secret`: every path but the probes (and /metrics when
    `metrics_on_api_port`) needs it (service/internal_auth.py). `on_engine_death`: called once
    when a started engine dies (the CLI makes the process drain and exit non-zero, as vLLM's
    own server does); /livez answers 503 from then on either way."""
    state = WorkerState(engine, lifecycle, max_inflight)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        # Load in the background: /livez answers during a minutes-long model load.
        async def load_then_watch() -> None:
            try:
                await engine.start()
            except Exception as exc:  # surfaced through /readyz, never a crash loop of 500s
                log.exception("engine failed to start")
                state.start_error = f"engine failed to start: {type(exc).__name__}"
                return
            state.started = True
            while not state.engine_dead:
                await asyncio.sleep(watch_interval_s)
            state.engine_died = True
            log.error(ENGINE_DEAD)
            if on_engine_death is not None:
                on_engine_death()

        loader = asyncio.create_task(load_then_watch())
        yield
        state.stopping = True
        loader.cancel()
        await engine.shutdown()

    app = FastAPI(title="Octograph worker", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.worker = state
    install_error_handlers(app)
    if secret is not None:
        open_paths = (*PROBE_PATHS, "/metrics") if metrics_on_api_port else PROBE_PATHS
        app.add_middleware(InternalAuth, secret=secret, open_paths=open_paths)

    @app.get("/livez")
    async def livez(state: StateDep) -> Response:
        # Liveness = this process can still serve. A dead engine cannot come back without a
        # restart, so it is the one dependency liveness checks (Kubernetes restarts the pod).
        if state.engine_dead:
            return JSONResponse({"status": "engine dead"}, status_code=503)
        return JSONResponse({"status": "alive"})

    @app.get("/readyz")
    async def readyz(state: StateDep) -> Response:
        if state.lifecycle.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        if state.engine_dead:
            return JSONResponse({"status": "engine dead"}, status_code=503)
        if not state.engine.ready:
            detail = state.start_error or "loading"
            return JSONResponse({"status": detail}, status_code=503)
        return JSONResponse({"status": "ready", "running": state.engine.num_running()})

    if metrics_on_api_port:

        @app.get("/metrics")
        async def metrics(state: StateDep) -> Response:
            body = generate_latest(state.registry) + generate_latest(REGISTRY)
            return Response(body, media_type=CONTENT_TYPE_LATEST)

    @app.get("/internal/info")
    async def info(state: StateDep) -> WorkerInfo:
        return state.engine.info()

    @app.post("/internal/generate")
    async def generate(body: GenerateRequest, state: StateDep) -> Response:
        state.admit()
        prepared = await state.engine.prepare(body)
        return StreamingResponse(ndjson_stream(state, prepared), media_type="application/x-ndjson")

    @app.post("/internal/score")
    async def score(body: ScoreRequest, state: StateDep) -> ScoreResponse:
        state.admit()
        return await state.engine.score(body)

    @app.post("/internal/byte-dist")
    async def byte_dist(body: ByteDistRequest, state: StateDep) -> ByteDistResponse:
        state.admit()
        response = await state.engine.byte_dist(body)
        extended, fetched = response.extended, response.fetched
        state.metrics.byte_dist_rows.labels("session_step").inc(extended)
        state.metrics.byte_dist_rows.labels("new_request").inc(max(fetched - extended, 0))
        return response

    @app.post("/internal/abort/{request_id}")
    async def abort(request_id: str, state: StateDep) -> dict[str, str]:
        await state.engine.abort(request_id)
        return {"status": "aborted"}

    return app
