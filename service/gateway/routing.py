"""Routing at request time: from a starting node, descend through router nodes by scoring the
functional tokens of the current router's children on the router model until a node that
answers (model or ensemble). The router prompt does not depend on the hop, so one score call
(one forward pass) returns the tokens of every router below the start that shares its model and
prompt format: a two-hop route costs one call, not two."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

from service.errors import NotFound, ServiceError, Unavailable, error_from_status
from service.gateway.clients.pool import WorkerPools, first_answer
from service.gateway.clients.worker import WorkerClient
from service.gateway.plan import RequestContext
from service.graph.functional_tokens import (
    END_TOKEN,
    assign_tokens,
    parse_octopus_output,
    token_name,
)
from service.graph.router_prompt import ROUTER_QUERY_CHARS, router_messages
from service.graph.schema import GraphConfig, RouterNode
from service.observability.metrics import GatewayMetrics
from service.protocol.internal import (
    GenerateRequest,
    SamplingOptions,
    ScoreQuery,
    ScoreRequest,
)

__all__ = ["ROUTER_QUERY_CHARS", "RouteResult", "Router", "decide", "router_messages"]

MAX_HOPS = 16


@dataclass
class RouteResult:
    node: str
    route: list[str] = field(default_factory=list)
    scores: list[dict[str, float]] = field(default_factory=list)
    reformatted_query: str | None = None
    fallback: str | None = None  # where to go if `node` cannot serve (the last router's fallback)
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "route": self.route,
            "scores": self.scores,
            "reformatted_query": self.reformatted_query,
        }

    @property
    def header(self) -> str:
        return ">".join(self.route)


def decide(node: RouterNode, raw: dict[str, float]) -> tuple[str, dict[str, float]]:
    """One hop: softmax over this router's children only (the router model scores every
    functional token, but only these are allowed), then the threshold sends a low-confidence
    query to the router's fallback."""
    top = max(raw.values())
    if top == -math.inf:
        probs = {child: 1.0 / len(raw) for child in raw}
    else:
        z = sum(math.exp(v - top) for v in raw.values())
        probs = {child: math.exp(v - top) / z for child, v in raw.items()}
    best = max(probs, key=lambda c: probs[c])
    if probs[best] < node.threshold and node.fallback is not None:
        best = node.fallback
    return best, {k: round(v, 6) for k, v in probs.items()}


def scored_routers(graph: GraphConfig, start: str) -> list[str]:
    """`start` and the routers below it that read the same prompt on the same model: the
    router prompt does not depend on the hop, so one forward pass scores all their tokens."""
    first = graph.nodes[start]
    assert isinstance(first, RouterNode)
    out, stack = [], [start]
    while stack:
        nid = stack.pop()
        node = graph.nodes[nid]
        if (
            isinstance(node, RouterNode)
            and node.model == first.model
            and node.prompt_format == first.prompt_format
            and nid not in out
        ):
            out.append(nid)
            stack.extend(reversed(node.children))
    return out


class Router:
    def __init__(self, graph: GraphConfig, pools: WorkerPools, metrics: GatewayMetrics) -> None:
        self.graph = graph
        self.pools = pools
        self.metrics = metrics
        self.tokens = assign_tokens(graph)

    async def route(self, start: str, query: str, ctx: RequestContext) -> RouteResult:
        headers = ctx.worker_headers
        t0 = time.perf_counter()
        result = RouteResult(node=start, route=[start])
        node_id = start
        # child -> raw logprob of its token, filled by one score call for several hops.
        scored: dict[str, float] = {}
        for _ in range(MAX_HOPS):
            node = self.graph.nodes.get(node_id)
            if not isinstance(node, RouterNode):
                break
            if not all(c in scored for c in node.children):
                scored = await self._score(node_id, node, query, ctx.engine_id, headers)
            choice, probs = decide(node, {c: scored[c] for c in node.children})
            result.scores.append(probs)
            self.metrics.routing.labels(node_id, choice).inc()
            if node.reformat:
                result.reformatted_query = await self._reformat(
                    node, query, choice, ctx.engine_id, headers
                )
            result.fallback = node.fallback
            node_id = choice
            result.route.append(choice)
        result.node = node_id
        result.seconds = time.perf_counter() - t0
        self.metrics.routing_latency.observe(result.seconds)
        return result

    async def _score(
        self, node_id: str, node: RouterNode, query: str, engine_id: str, headers: dict[str, str]
    ) -> dict[str, float]:
        """Raw logprobs of the functional tokens of `node`'s children and of the children of
        the routers below it that share its model and prompt: one /internal/score call."""
        pool = self.pools[node.model]
        info = pool.info()
        if info is None:
            raise Unavailable(f"router model '{node.model}' is not ready")
        ids: dict[str, int] = {}
        for rid in scored_routers(self.graph, node_id):
            for child in self.graph.router_children(rid):
                name = token_name(self.tokens[child])
                if name not in info.functional_tokens:
                    raise ServiceError(
                        f"router model '{node.model}' has no token {name} for node '{child}'; "
                        "rebuild it with `octograph router build`"
                    )
                ids[child] = info.functional_tokens[name]
        query_req = ScoreRequest(
            request_id=engine_id,
            queries=[
                ScoreQuery(
                    messages=router_messages(query, node.prompt_format),
                    token_ids=sorted(set(ids.values())),
                )
            ],
        )
        response, retries = await first_answer(pool, lambda c: c.score(query_req, headers))
        if retries:
            self.metrics.retries.labels(node_id).inc()
        lps = response.results[0].token_logprobs
        return {child: lps.get(tid, -math.inf) for child, tid in ids.items()}

    async def _reformat(
        self, node: RouterNode, query: str, choice: str, engine_id: str, headers: dict[str, str]
    ) -> str | None:
        pool = self.pools[node.model]
        token = token_name(self.tokens.get(choice, 0))
        request = GenerateRequest(
            request_id=engine_id + "-reformat",
            messages=router_messages(query, node.prompt_format),
            assistant_prefix=f"{token}('",
            sampling=SamplingOptions(max_tokens=96, temperature=0.0, stop=[END_TOKEN]),
        )

        async def generate(client: WorkerClient) -> str:
            text = ""
            async for event in client.stream_generate(request, headers):
                if event["type"] == "delta":
                    text += event.get("text", "")
                elif event["type"] == "error":
                    raise error_from_status(int(event.get("status", 502)), event.get("message", ""))
            return text

        text, _ = await first_answer(pool, generate)
        call = parse_octopus_output(f"{token}('{text}{END_TOKEN}")
        return call.query if call else None


def resolve_start(graph: GraphConfig, model: str) -> str:
    if model == "auto":
        if graph.root is None:
            raise NotFound("this graph has no root router, so model 'auto' is not available")
        return graph.root
    if model in graph.nodes:
        return model
    raise NotFound(f"the model '{model}' does not exist", code="model_not_found")
