"""/metrics on a separate port, so it can stay open to Prometheus while the API needs keys."""

from __future__ import annotations

from typing import Any

from prometheus_client import start_http_server


def start_metrics_server(app: Any, host: str, port: int) -> None:
    registry = app.state.gateway.registry
    start_http_server(port, addr=host, registry=registry)
