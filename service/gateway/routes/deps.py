"""Dependency aliases shared by the routes."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Annotated

from fastapi import Depends, Request

from service.gateway.pipeline import Pipeline, RequestContext

if TYPE_CHECKING:
    from service.gateway.app import GatewayState


def get_state(request: Request) -> GatewayState:
    state: GatewayState = request.app.state.gateway
    return state


def get_pipeline(request: Request) -> Pipeline:
    return get_state(request).pipeline


def get_context(request: Request) -> RequestContext:
    settings = get_state(request).settings
    rid = request.scope.get("state", {}).get("request_id") or "req"
    return RequestContext(request_id=rid, deadline=time.monotonic() + settings.request_timeout_s)


StateDep = Annotated["GatewayState", Depends(get_state)]
PipelineDep = Annotated[Pipeline, Depends(get_pipeline)]
ContextDep = Annotated[RequestContext, Depends(get_context)]
