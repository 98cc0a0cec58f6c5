"""The console API's answers, built from the graph, the worker pools and the recorder. Plain
functions so the routes stay thin and the shapes are testable without HTTP."""

from __future__ import annotations

import time
from typing import Any, Protocol

from service.gateway.clients.pool import WorkerPools
from service.gateway.console.stats import ConsoleStats, Decision, NodeSnapshot
from service.graph.functional_tokens import assign_tokens, token_name
from service.graph.schema import EnsembleNode, GraphConfig, ModelNode, RouterNode
from service.protocol.console import (
    ConsoleChild,
    ConsoleGraph,
    ConsoleMember,
    ConsoleNode,
    ConsoleStatsResponse,
    Health,
    ModelHealth,
    NodeStats,
    RoutingDecision,
    SharedView,
    StatsScope,
)


class StatsSource(Protocol):
    """This process's ConsoleStats, or the deployment's view read from Redis."""

    @property
    def window_s(self) -> float: ...

    def node(self, node: str) -> NodeSnapshot: ...

    def decisions(self, node: str | None = None, limit: int | None = None) -> list[Decision]: ...


def model_health(pools: WorkerPools, model: str) -> ModelHealth:
    pool = pools.pools.get(model)
    if pool is None:
        return ModelHealth(model=model, up=0, total=0)
    now = time.monotonic()
    return ModelHealth(
        model=model, up=sum(r.available(now) for r in pool.replicas), total=len(pool.replicas)
    )


def overall(models: list[ModelHealth]) -> Health:
    """A node needs every one of its models: one model without a replica takes it down."""
    if not models or all(m.total == 0 for m in models):
        return "unknown"  # no pool of ours to ask
    if any(m.up == 0 for m in models):
        return "down"
    if any(m.up < m.total for m in models):
        return "degraded"
    return "healthy"


def _is_remote(graph: GraphConfig, model: str) -> bool:
    return getattr(graph.models.get(model), "kind", None) == "openai"


def _models_of(graph: GraphConfig, pools: WorkerPools, nid: str, node: Any) -> list[str]:
    """The worker pools whose health is this node's health."""
    if isinstance(node, EnsembleNode):
        return list(dict.fromkeys(m.model for m in node.members))
    if isinstance(node, RouterNode | ModelNode):
        return [node.model]
    # Node kinds this module does not know yet: their own pool if one has their id, else
    # their model if it is one of the graph's; else the health is unknown.
    if nid in pools.pools:
        return [nid]
    model = getattr(node, "model", None)
    return [model] if isinstance(model, str) and model in graph.models else []


def graph_view(graph: GraphConfig, pools: WorkerPools) -> ConsoleGraph:
    tokens = assign_tokens(graph)
    health = {m: model_health(pools, m) for m in graph.models}
    nodes = []
    for nid, node in graph.nodes.items():
        needs = _models_of(graph, pools, nid, node)
        models = [health.get(m) or model_health(pools, m) for m in needs]
        entry = ConsoleNode(
            id=nid,
            kind=node.kind,
            model=getattr(node, "model", None),
            remote=any(_is_remote(graph, m) for m in needs),
            description=node.description,
            health=overall(models),
            models=models,
        )
        if isinstance(node, RouterNode):
            entry.children = [
                ConsoleChild(node=c, token=token_name(tokens[c])) for c in node.children
            ]
            entry.fallback = node.fallback
        if isinstance(node, EnsembleNode):
            entry.members = [ConsoleMember(model=m.model, weight=m.weight) for m in node.members]
            entry.mode = node.mode
        nodes.append(entry)
    return ConsoleGraph(root=graph.root, nodes=nodes, models=list(health.values()))


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)


async def read_stats(
    stats: ConsoleStats,
    graph: GraphConfig,
    node: str | None = None,
    limit: int | None = None,
    *,
    show_decisions: bool = True,
) -> ConsoleStatsResponse:
    """The deployment's view when shared state is on and Redis answers, else this process's
    own, and the answer says which."""
    if stats.feed is None:
        return stats_view(stats, graph, node, limit, show_decisions=show_decisions)
    shared = await stats.feed.read(list(graph.nodes))
    if shared is None:
        return stats_view(
            stats, graph, node, limit, shared_view="unreachable", show_decisions=show_decisions
        )
    return stats_view(
        shared,
        graph,
        node,
        limit,
        scope="deployment",
        shared_view="ok",
        show_decisions=show_decisions,
    )


def stats_view(
    stats: StatsSource,
    graph: GraphConfig,
    node: str | None = None,
    limit: int | None = None,
    *,
    scope: StatsScope = "this replica",
    shared_view: SharedView = "off",
    show_decisions: bool = True,
) -> ConsoleStatsResponse:
    ids = [node] if node is not None else list(graph.nodes)
    rows = []
    for nid in ids:
        s = stats.node(nid)
        rows.append(
            NodeStats(
                node=nid,
                requests_1m=s.requests_window,
                errors_1m=s.errors_window,
                requests_total=s.requests_total,
                errors_total=s.errors_total,
                p50_ms=_ms(s.p50_s),
                p99_ms=_ms(s.p99_s),
            )
        )
    decisions = [
        RoutingDecision(
            at=d.at,
            start=d.start,
            route=list(d.route),
            scores=list(d.scores),
            node=d.node,
            latency_ms=round(d.seconds * 1000, 3),
            reformatted_query=d.reformatted_query,
        )
        for d in (stats.decisions(node, limit) if show_decisions else [])
    ]
    return ConsoleStatsResponse(
        window_s=stats.window_s,
        scope=scope,
        shared_view=shared_view,
        nodes=rows,
        decisions=decisions,
        decisions_hidden=not show_decisions,
    )
