"""The seam every node kind plugs into (TGI's `Backend`, vLLM's `EngineClient`).

A runner turns a request plan into an `Answer` for one target node: a stream of the gateway's
plain events (`start`, `delta`, `finish`), or, for a remote node, the upstream's own reply to
relay. It opens its streams and leases its replicas through the request's scope, so everything
it holds is released in one place; admission, fallback, deadlines, observation and the reply's
shape belong to the pipeline and the renderer, not to runners.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Protocol

from service.gateway.plan import RequestPlan
from service.gateway.scope import RequestScope
from service.graph.schema import Node
from service.protocol.internal import GenerateEvent

EventStream = AsyncIterator[GenerateEvent]


@dataclass(frozen=True)
class Target:
    """The node that answers: a graph node, or a model addressed by its id (raw, no node)."""

    node_id: str
    node: Node | None
    model: str | None  # the model of a model node or a raw model; None for ensembles
    octograph: dict[str, Any]  # how it was reached (the route object every reply carries)


@dataclass
class Answer:
    """Exactly one of: gateway events (local workers, ensembles); a finished upstream body;
    upstream chunk payloads (JSON bytes, already carrying the gateway's id and model)."""

    events: EventStream | None = None
    body: dict[str, Any] | None = None
    chunks: AsyncIterator[bytes] | None = None


class NodeRunner(Protocol):
    kind: str  # the label observers use: "model", "ensemble", "remote"

    def serves(self, plan: RequestPlan, target: Target) -> bool:
        """Whether this runner answers `target` for `plan` (the registry asks in order)."""
        ...

    async def open(self, plan: RequestPlan, target: Target, scope: RequestScope) -> Answer:
        """The answer's stream, opened up to its first event: failures before that raise (the
        pipeline may retry or fall back); after it, they come out of the stream."""
        ...
