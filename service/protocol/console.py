"""Wire schemas of the console API (`/console/api/*`): the graph with its health, and live
per-node stats with recent routing decisions. Response models only; the page and scripts read
them, nothing writes them."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

Health = Literal["healthy", "degraded", "down", "unknown"]


class ModelHealth(BaseModel):
    model: str
    up: int = Field(..., description="replicas that passed their last probe, not cooling down")
    total: int = Field(..., description="replicas configured")


class ConsoleChild(BaseModel):
    node: str
    token: str = Field(..., description="the functional token naming this child, e.g. <nexa_3>")


class ConsoleMember(BaseModel):
    model: str
    weight: float


class ConsoleNode(BaseModel):
    id: str
    kind: str = Field(..., description="router | model | ensemble")
    model: str | None = Field(None, description="the model it runs (routers: the router model)")
    remote: bool = Field(
        False, description="its model is served by an OpenAI-compatible upstream (kind: openai)"
    )
    description: str = ""
    children: list[ConsoleChild] = Field(default_factory=list)
    fallback: str | None = None
    members: list[ConsoleMember] = Field(default_factory=list, description="ensemble members")
    mode: str | None = Field(None, description="ensemble mixing mode")
    health: Health
    models: list[ModelHealth] = Field(
        default_factory=list, description="replicas up/total of every model this node needs"
    )


class ConsoleGraph(BaseModel):
    root: str | None
    nodes: list[ConsoleNode]
    models: list[ModelHealth]


class NodeStats(BaseModel):
    node: str
    requests_1m: int = Field(..., description="requests in the last window (default 60 s)")
    errors_1m: int
    requests_total: int
    errors_total: int
    p50_ms: float | None = Field(None, description="median latency over the window")
    p99_ms: float | None = None


class RoutingDecision(BaseModel):
    at: float = Field(..., description="unix time (seconds)")
    start: str
    route: list[str]
    scores: list[dict[str, float]] = Field(..., description="per hop: child -> probability")
    node: str
    latency_ms: float = Field(..., description="time spent routing (all hops)")
    reformatted_query: str | None = None


StatsScope = Literal["deployment", "this replica"]
SharedView = Literal["off", "ok", "unreachable"]


class ConsoleStatsResponse(BaseModel):
    window_s: float
    scope: StatsScope = Field(
        ...,
        description="whose traffic this is: every gateway replica's (shared state in Redis) "
        "or only the replica that answered",
    )
    shared_view: SharedView = Field(
        ...,
        description="the deployment's view in Redis: off (no OCTOGRAPH_REDIS_URL), ok, or "
        "unreachable (this replica's own view is shown instead)",
    )
    nodes: list[NodeStats]
    decisions: list[RoutingDecision] = Field(..., description="newest first")
    decisions_hidden: bool = Field(
        False,
        description="routing decisions carry every client's traffic: with API keys set, only "
        "admin keys (OCTOGRAPH_ADMIN_KEYS) see them; true when this key is not one",
    )
