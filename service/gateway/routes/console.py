"""The graph console: the page (`/console`, static shell, open like /livez) and its JSON API
(`/console/api/*`, behind the API keys like /v1). Thin: the answers are built in
service/gateway/console/view.py from the graph, the pools and the recorder."""

from __future__ import annotations

from importlib import resources
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response

from service.errors import NotFound
from service.gateway.console.view import graph_view, read_stats
from service.gateway.routes.deps import StateDep
from service.protocol.console import ConsoleGraph, ConsoleStatsResponse
from service.protocol.openai import ErrorResponse

router = APIRouter(prefix="/console")

_MEDIA_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".svg": "image/svg+xml",
}
# The page carries no data, only code; still, forbid framing and inline script from elsewhere.
_SHELL_HEADERS = {
    "cache-control": "no-cache",
    "x-content-type-options": "nosniff",
    "content-security-policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; frame-ancestors 'none'"
    ),
}


def _asset(name: str) -> Response:
    """A file shipped in service/gateway/console/static (package data); anything else is a 404."""
    suffix = name[name.rfind(".") :] if "." in name else ""
    media = _MEDIA_TYPES.get(suffix)
    file = resources.files("service.gateway.console").joinpath("static", name)
    if media is None or "/" in name or name.startswith(".") or not file.is_file():
        raise NotFound(f"no console asset '{name}'")
    return Response(file.read_bytes(), media_type=media, headers=_SHELL_HEADERS)


@router.get("", include_in_schema=False)
async def page() -> Response:
    return _asset("index.html")


@router.get("/static/{name}", include_in_schema=False)
async def static(name: str) -> Response:
    return _asset(name)


_errors: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorResponse},
    404: {"model": ErrorResponse},
}


@router.get("/api/graph", responses=_errors)
async def graph(state: StateDep) -> ConsoleGraph:
    """Every node with its kind, model, children (and their functional tokens), fallback,
    ensemble members, and the health of the models it needs (replicas up/total)."""
    runtime = state.runtime  # one graph for the whole answer, even across a reload
    return graph_view(runtime.graph, runtime.pools)


@router.get("/api/stats", responses=_errors)
async def stats(
    request: Request,
    state: StateDep,
    node: Annotated[
        str | None, Query(description="only this node and the decisions through it")
    ] = None,
    limit: Annotated[
        int, Query(ge=1, le=1000, description="most recent decisions to return")
    ] = 200,
) -> ConsoleStatsResponse:
    """Per node: requests and errors in the last minute, p50/p99 latency; recent routing
    decisions (newest first) with their route, per-hop scores and routing latency. With
    shared state (OCTOGRAPH_REDIS_URL), every gateway replica's (`scope: deployment`), else
    or when Redis cannot be read, the answering replica's. With API keys set, decisions are
    listed to admin keys only (they carry every client's traffic)."""
    graph = state.runtime.graph  # one graph for the whole answer, even across a reload
    if node is not None and node not in graph.nodes:
        raise NotFound(f"the node '{node}' does not exist")
    # Set by the middleware once the key is known; absent means no, whatever the reason.
    admin = bool(request.scope.get("state", {}).get("sees_every_client", False))
    return await read_stats(state.console, graph, node, limit, show_decisions=admin)
