"""The gateway app factory: wires settings, graph, worker pools, router and pipeline."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import FastAPI
from prometheus_client import CollectorRegistry

from service.config import GatewaySettings
from service.console.stats import ConsoleStats
from service.gateway.auth import ApiKeys
from service.gateway.fast_lane import FastLane
from service.gateway.middleware import GatewayMiddleware
from service.gateway.pipeline import Pipeline
from service.gateway.routes import console as console_routes
from service.gateway.routes import health, openai_routes
from service.http_errors import install_error_handlers
from service.observability.metrics import GatewayMetrics
from service.remote.client import upstream_clients
from service.router.graph import GraphConfig, RouterNode
from service.router.policy import Router
from service.serving import Lifecycle
from service.worker.client import make_http_client
from service.worker.pool import WorkerPools


@dataclass
class GatewayState:
    settings: GatewaySettings
    graph: GraphConfig
    pools: WorkerPools
    pipeline: Pipeline
    lifecycle: Lifecycle
    registry: CollectorRegistry
    metrics: GatewayMetrics
    console: ConsoleStats  # recent requests and routing decisions shown at /console

    @property
    def required_models(self) -> set[str]:
        return {n.model for n in self.graph.nodes.values() if isinstance(n, RouterNode)}


def worker_urls(
    graph: GraphConfig, overrides: dict[str, list[str]] | None = None
) -> dict[str, list[str]]:
    urls = {name: list(spec.urls) for name, spec in graph.worker_models().items()}
    for name, us in (overrides or {}).items():
        urls[name] = us
    return urls


def build_gateway_app(
    settings: GatewaySettings,
    graph: GraphConfig,
    *,
    lifecycle: Lifecycle | None = None,
    urls: dict[str, list[str]] | None = None,
) -> FastAPI:
    lifecycle = lifecycle or Lifecycle()
    registry = CollectorRegistry()
    metrics = GatewayMetrics(registry)
    http = make_http_client(settings.worker_connect_timeout_s, settings.worker_read_timeout_s)
    pools = WorkerPools(
        worker_urls(graph, urls),
        http,
        metrics,
        health_interval_s=settings.health_interval_s,
        cooldown_s=settings.cooldown_s,
        upstreams=upstream_clients(graph),  # kind: openai models (service/remote/)
    )
    router = Router(graph, pools, metrics)
    from service.ensemble.runner import EnsembleRunner

    ensembles = EnsembleRunner(graph, pools, metrics)
    pipeline = Pipeline(graph, pools, router, metrics, settings, ensembles=ensembles)
    # Series only for the graph's ids: the recorder's memory is bounded by the graph.
    console = ConsoleStats([*graph.nodes, *graph.models])
    pipeline.console = console
    state = GatewayState(settings, graph, pools, pipeline, lifecycle, registry, metrics, console)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await pools.probe_once()
        pools.start()
        yield
        await pools.stop()
        await http.aclose()

    app = FastAPI(
        title="Octograph",
        version="0.1.0",
        description="One OpenAI-compatible endpoint in front of a graph of language models.",
        lifespan=lifespan,
    )
    app.state.gateway = state
    install_error_handlers(app)
    app.include_router(health.router)
    app.include_router(openai_routes.router)
    app.include_router(console_routes.router)
    # Added before GatewayMiddleware, so it runs inside it (auth, admission, request ids).
    app.add_middleware(FastLane, state=state)
    keys = ApiKeys(
        [k.get_secret_value() for k in settings.api_keys],
        settings.api_keys_file,
        rate_limit_rpm=settings.rate_limit_rpm,
    )
    app.add_middleware(
        GatewayMiddleware,
        keys=keys,
        lifecycle=lifecycle,
        metrics=metrics,
        max_inflight=settings.max_inflight,
        max_body_bytes=settings.max_body_bytes,
        metrics_open=settings.metrics_port is None and not keys.enabled,
    )
    return app
