"""Liveness, readiness and metrics: each probe has one job."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service.gateway.routes.deps import StateDep

router = APIRouter()


@router.get("/livez", include_in_schema=False)
async def livez() -> dict[str, str]:
    """Process alive; never touches a worker."""
    return {"status": "alive"}


@router.get("/readyz", include_in_schema=False)
async def readyz(state: StateDep) -> Response:
    """Graph loaded, not draining, and the required models have a healthy replica: the router
    models (without them nothing routes), or every model of a graph without routers. A leaf
    model being down is not a reason to pull every gateway replica out of the Service: its
    requests get a 503 or the router's fallback instead."""
    runtime = state.runtime  # one graph for the whole answer, even across a reload
    models = {name: pool.ready for name, pool in runtime.pools.pools.items()}
    if state.lifecycle.draining:
        return JSONResponse({"status": "draining", "models": models}, status_code=503)
    required = runtime.required_models & set(models)
    ready = all(models[m] for m in required)
    return JSONResponse(
        {"status": "ready" if ready else "waiting for workers", "models": models},
        status_code=200 if ready else 503,
    )


@router.get("/metrics", include_in_schema=False)
async def metrics(state: StateDep) -> Response:
    return Response(generate_latest(state.registry), media_type=CONTENT_TYPE_LATEST)
