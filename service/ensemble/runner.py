"""Runs an ensemble node: the byte loop over its members' workers (DESIGN.md "Byte-level
ensembles"). Until byte-level scoring lands, ensemble nodes answer 501."""

from __future__ import annotations

from typing import Any

from service.errors import NotImplementedFeature
from service.observability.metrics import GatewayMetrics
from service.router.graph import EnsembleNode, GraphConfig
from service.worker.pool import WorkerPools


class EnsembleRunner:
    def __init__(self, graph: GraphConfig, pools: WorkerPools, metrics: GatewayMetrics) -> None:
        self.graph = graph
        self.pools = pools
        self.metrics = metrics

    async def open(self, node_id: str, node: EnsembleNode, request: Any, ctx: Any) -> Any:
        raise NotImplementedFeature(f"ensemble node '{node_id}' is not available yet")
