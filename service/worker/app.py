"""The worker's HTTP app: one model, stateless internal API (DESIGN.md "Workers")."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated

import orjson
from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest

from service.errors import Overloaded, ServiceError, Unavailable
from service.http_errors import install_error_handlers
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

log = logging.getLogger(__name__)


class WorkerState:
    def __init__(self, engine: Engine, lifecycle: Lifecycle, max_inflight: int) -> None:
        self.engine = engine
        self.lifecycle = lifecycle
        self.max_inflight = max_inflight
        self.registry = CollectorRegistry()
        self.metrics = WorkerMetrics(self.registry)
        self.start_error: str | None = None

    def admit(self) -> None:
        if self.lifecycle.draining:
            raise Unavailable("this worker is shutting down")
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


def build_worker_app(engine: Engine, lifecycle: Lifecycle, *, max_inflight: int = 256) -> FastAPI:
    state = WorkerState(engine, lifecycle, max_inflight)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        # Load in the background: /livez answers during a minutes-long model load.
        async def load() -> None:
            try:
                await engine.start()
            except Exception as exc:  # surfaced through /readyz, never a crash loop of 500s
                log.exception("engine failed to start")
                state.start_error = f"engine failed to start: {type(exc).__name__}"

        loader = asyncio.create_task(load())
        yield
        loader.cancel()
        await engine.shutdown()

    app = FastAPI(title="Octograph worker", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.worker = state
    install_error_handlers(app)

    @app.get("/livez")
    async def livez() -> dict[str, str]:
        return {"status": "alive"}

    @app.get("/readyz")
    async def readyz(state: StateDep) -> Response:
        if state.lifecycle.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        if not state.engine.ready:
            detail = state.start_error or "loading"
            return JSONResponse({"status": detail}, status_code=503)
        return JSONResponse({"status": "ready", "running": state.engine.num_running()})

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
        return await state.engine.byte_dist(body)

    @app.post("/internal/abort/{request_id}")
    async def abort(request_id: str, state: StateDep) -> dict[str, str]:
        await state.engine.abort(request_id)
        return {"status": "aborted"}

    return app
