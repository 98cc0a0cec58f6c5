"""OpenAI-compatible routes. Thin: parse, call the pipeline once, send JSON or SSE."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse

from service.gateway.pipeline import Reply
from service.gateway.routes.deps import ContextDep, PipelineDep, StateDep
from service.gateway.routes.json_response import FastJSONResponse
from service.protocol.openai import (
    ChatCompletionRequest,
    CompletionRequest,
    ErrorResponse,
    ModelCard,
    ModelList,
    RouteRequest,
)

router = APIRouter(
    prefix="/v1", responses={400: {"model": ErrorResponse}, 404: {"model": ErrorResponse}}
)
T = TypeVar("T")


class ClientGone(Exception):
    pass


async def with_cancellation(request: Request, work: Awaitable[T]) -> T:
    """Run `work` until done or until the client disconnects (then cancel it, which aborts the
    upstream worker requests). Not request.is_disconnected(): polling misses it under load.

    `work` runs in this task; one watcher task cancels it on a disconnect (one task per request
    rather than two plus asyncio.wait: this is on every request's path)."""
    this = asyncio.current_task()
    assert this is not None
    gone = False

    async def watch() -> None:
        nonlocal gone
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                gone = True
                # Only ever delivered inside `await work`: nothing else here awaits.
                this.cancel()
                return

    watcher = asyncio.get_running_loop().create_task(watch())
    try:
        return await work
    except asyncio.CancelledError:
        if not gone:
            raise
        this.uncancel()
        raise ClientGone() from None
    finally:
        watcher.cancel()


def send(reply: Reply) -> Response:
    if reply.stream is not None:
        return StreamingResponse(
            reply.stream,
            media_type="text/event-stream",
            headers={**reply.headers, "cache-control": "no-cache", "x-accel-buffering": "no"},
        )
    return FastJSONResponse(reply.body, headers=reply.headers)


async def _reply(request: Request, work: Awaitable[Reply]) -> Response:
    try:
        return send(await with_cancellation(request, work))
    except ClientGone:
        return Response(status_code=499)


@router.get("/models")
async def list_models(state: StateDep) -> ModelList:
    """`auto`, every node of the graph and every model."""
    created = int(state.lifecycle.started_at)
    cards = []
    if state.graph.root:
        cards.append(
            ModelCard(
                id="auto",
                created=created,
                kind="auto",
                description=f"routed from '{state.graph.root}'",
            )
        )
    for nid, node in state.graph.nodes.items():
        cards.append(
            ModelCard(id=nid, created=created, kind=node.kind, description=node.description)
        )
    for mid in state.graph.models:
        if mid not in state.graph.nodes:
            cards.append(ModelCard(id=mid, created=created, kind="raw-model"))
    return ModelList(data=cards)


@router.post("/chat/completions")
async def chat_completions(
    body: ChatCompletionRequest, request: Request, pipeline: PipelineDep, ctx: ContextDep
) -> Response:
    return await _reply(request, pipeline.chat(body, ctx))


@router.post("/completions")
async def completions(
    body: CompletionRequest, request: Request, pipeline: PipelineDep, ctx: ContextDep
) -> Response:
    return await _reply(request, pipeline.completion(body, ctx))


@router.post("/route")
async def route(body: RouteRequest, pipeline: PipelineDep, ctx: ContextDep) -> Response:
    """Routing alone, no generation: how routing is inspected, tested and benchmarked."""
    result = await pipeline.route_only(body, ctx)
    return FastJSONResponse(
        {
            "node": result.node,
            "octograph": result.as_dict(),
            "latency_ms": round(result.seconds * 1000, 3),
        },
        headers={"x-octograph-route": result.header},
    )
