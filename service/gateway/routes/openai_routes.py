"""The OpenAI-compatible routes FastAPI serves: `/v1/models` and `/v1/route`. The two
generation endpoints are the front door's (front_door.py); app.py describes them for OpenAPI."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import Response

from service.gateway.plan import query_text
from service.gateway.routes.deps import ContextDep, PipelineDep, StateDep
from service.gateway.routes.json_response import FastJSONResponse
from service.protocol.openai import ErrorResponse, ModelCard, ModelList, RouteRequest

router = APIRouter(
    prefix="/v1", responses={400: {"model": ErrorResponse}, 404: {"model": ErrorResponse}}
)


@router.get("/models")
async def list_models(state: StateDep) -> ModelList:
    """`auto`, every node of the graph and every model."""
    created = int(state.lifecycle.started_at)
    graph = state.runtime.graph  # one graph for the whole list, even across a reload
    cards = []
    if graph.root:
        cards.append(
            ModelCard(
                id="auto",
                created=created,
                kind="auto",
                description=f"routed from '{graph.root}'",
            )
        )
    for nid, node in graph.nodes.items():
        cards.append(
            ModelCard(id=nid, created=created, kind=node.kind, description=node.description)
        )
    for mid in graph.models:
        if mid not in graph.nodes:
            cards.append(ModelCard(id=mid, created=created, kind="raw-model"))
    return ModelList(data=cards)


@router.post("/route")
async def route(body: RouteRequest, pipeline: PipelineDep, ctx: ContextDep) -> Response:
    """Routing alone, no generation: how routing is inspected, tested and benchmarked."""
    turns = [(str(m.role), m.text()) for m in body.messages] if body.messages else None
    result = await pipeline.route_only(body.model, query_text(turns, body.prompt), ctx)
    return FastJSONResponse(
        {
            "node": result.node,
            "octograph": result.as_dict(),
            "latency_ms": round(result.seconds * 1000, 3),
        },
        headers={"x-octograph-route": result.header},
    )
