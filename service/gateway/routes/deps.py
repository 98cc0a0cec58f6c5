"""Dependency aliases shared by the routes.

The dependencies are `async def` on purpose: FastAPI runs a plain `def` dependency in a worker
thread (anyio.to_thread), a thread hand-off per dependency per request that cost the gateway
about as much as everything else together (bench/gateway_overhead.py). They never block."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Annotated

from fastapi import Depends, Request

from service.gateway.pipeline import Pipeline
from service.gateway.plan import RequestContext

if TYPE_CHECKING:
    from service.gateway.app import GatewayState


def _state(request: Request) -> GatewayState:
    state: GatewayState = request.app.state.gateway
    return state


async def get_state(request: Request) -> GatewayState:
    return _state(request)


async def get_pipeline(request: Request) -> AsyncIterator[Pipeline]:
    """The current graph runtime's pipeline, held (not released by a reload) until the
    route's answer is done."""
    with _state(request).runtimes.use() as runtime:
        yield runtime.pipeline


async def get_context(request: Request) -> RequestContext:
    settings = _state(request).settings
    state = request.scope.get("state", {})
    return RequestContext(
        request_id=state.get("request_id") or "req",
        deadline=time.monotonic() + settings.request_timeout_s,
        key=state.get("api_key"),
    )


StateDep = Annotated["GatewayState", Depends(get_state)]
PipelineDep = Annotated[Pipeline, Depends(get_pipeline)]
ContextDep = Annotated[RequestContext, Depends(get_context)]
