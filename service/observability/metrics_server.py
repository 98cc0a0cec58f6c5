"""/metrics on a separate port, so it can stay open to Prometheus while the API needs keys (the
gateway) or the worker secret (a worker), and a network policy can let Prometheus reach that
port only."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.metrics_core import Metric


class _Merged:
    """Several registries served as one (a worker's own metrics + vLLM's, in the default
    registry). No `describe`: the outer registry does not check names across them."""

    def __init__(self, registries: Sequence[CollectorRegistry]) -> None:
        self._registries = registries

    def collect(self) -> Iterator[Metric]:
        for registry in self._registries:
            yield from registry.collect()


def serve_registries(registries: Sequence[CollectorRegistry], host: str, port: int) -> None:
    """prometheus_client's own server (a daemon thread) over `registries`."""
    merged = CollectorRegistry()
    merged.register(_Merged(registries))
    start_http_server(port, addr=host, registry=merged)


def start_metrics_server(app: Any, host: str, port: int) -> None:
    registry = app.state.gateway.registry
    start_http_server(port, addr=host, registry=registry)
