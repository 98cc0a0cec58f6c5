"""The gateway app factory: wires settings, the graph's runtime (graph_runtime.py), its reload
(graph_reload.py), admission, the console and the routes."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from fastapi import FastAPI
from prometheus_client import CollectorRegistry
from pydantic import BaseModel

from service.config import GatewaySettings
from service.gateway.admission import Admission
from service.gateway.auth import ApiKeys
from service.gateway.clients.pool import WorkerPools
from service.gateway.clients.worker import make_http_client
from service.gateway.console.stats import ConsoleStats
from service.gateway.front_door import FrontDoor
from service.gateway.graph_reload import GraphReloader
from service.gateway.graph_runtime import (
    GatewayServices,
    GraphRuntime,
    GraphRuntimes,
    build_runtime,
    worker_urls,
)
from service.gateway.middleware import GatewayMiddleware
from service.gateway.pipeline import Pipeline
from service.gateway.routes import console as console_routes
from service.gateway.routes import health, openai_routes
from service.gateway.runners.ensemble import EnsembleRunner
from service.gateway.shared.console_feed import ConsoleFeed
from service.gateway.shared.limits import shared_key_limits
from service.gateway.shared.redis_client import make_redis
from service.graph.schema import GraphConfig
from service.http_errors import install_error_handlers
from service.internal_auth import is_loopback_host, read_secret_file
from service.observability.metrics import GatewayMetrics
from service.observability.multiprocess import exposition_registry
from service.protocol.openai import ChatCompletionRequest, CompletionRequest, ErrorResponse
from service.serving import Lifecycle

log = logging.getLogger(__name__)


@dataclass
class GatewayState:
    settings: GatewaySettings
    runtimes: GraphRuntimes  # the graph's runtime; a reload swaps it (graph_runtime.py)
    admission: Admission
    lifecycle: Lifecycle
    registry: CollectorRegistry
    metrics: GatewayMetrics
    console: ConsoleStats  # recent requests and routing decisions shown at /console
    reloader: GraphReloader | None = None  # None: the graph came from no file (tests)

    @property
    def runtime(self) -> GraphRuntime:
        """The current runtime. A request reads it once (`runtimes.use()` when it holds
        replicas or streams) and keeps it: a reload mid-request changes nothing for it."""
        return self.runtimes.current

    # The current runtime's parts, for tests and tools (a request reads `runtime` once).
    @property
    def graph(self) -> GraphConfig:
        return self.runtimes.current.graph

    @property
    def pools(self) -> WorkerPools:
        return self.runtimes.current.pools

    @property
    def pipeline(self) -> Pipeline:
        return self.runtimes.current.pipeline

    @property
    def ensembles(self) -> EnsembleRunner:
        return self.runtimes.current.ensembles

    @property
    def required_models(self) -> set[str]:
        return self.runtimes.current.required_models


def build_gateway_app(
    settings: GatewaySettings,
    graph: GraphConfig,
    *,
    lifecycle: Lifecycle | None = None,
    urls: dict[str, list[str]] | None = None,
    graph_file: Path | None = None,
    reload_on_sighup: bool = False,
) -> FastAPI:
    """`graph_file`: the file `graph` was loaded from, watched for changes (every
    `graph_reload_interval_s`); `reload_on_sighup`: SIGHUP reloads it too (the gateway
    process only: a signal handler belongs to the process, not to an app a test builds)."""
    lifecycle = lifecycle or Lifecycle()
    registry = CollectorRegistry()
    metrics = GatewayMetrics(registry)
    http = make_http_client(settings.worker_connect_timeout_s, settings.worker_read_timeout_s)
    # The console's Redis client (None without OCTOGRAPH_REDIS_URL); admission has its own.
    redis = make_redis(settings)
    secret_file = settings.worker_secret_file
    worker_secret = read_secret_file(secret_file) if secret_file is not None else None
    all_urls = worker_urls(graph, urls)
    if worker_secret is None and any(
        not is_loopback_host(urlsplit(u).hostname or "") for us in all_urls.values() for u in us
    ):
        log.warning(
            "no worker secret (OCTOGRAPH_WORKER_SECRET_FILE): workers off this machine are "
            "called without one, so their internal API must be open to anyone who reaches it"
        )
    admission = Admission(
        metrics,
        max_inflight=settings.max_inflight,
        max_inflight_per_node=settings.max_inflight_per_node,
        max_inflight_per_key=settings.max_inflight_per_key,
        rate_limit_rpm=settings.rate_limit_rpm,
        rate_limit_tpm=settings.rate_limit_tpm,
        # Per-key limits in Redis with OCTOGRAPH_REDIS_URL (its own connection pool, so the
        # admission path never waits behind other shared state's traffic).
        shared=(shared_limits := shared_key_limits(settings, metrics)),
    )
    # Series only for the graph's ids: the recorder's memory is bounded by the graph (a reload
    # re-tracks them when it swaps the graph in: graph_reload.py).
    ids = [*graph.nodes, *graph.models]
    # With Redis, the console also publishes to (and reads) the whole deployment's view.
    feed = ConsoleFeed(redis, metrics, timeout_s=settings.redis_timeout_s) if redis else None
    console = ConsoleStats(ids, feed=feed)
    services = GatewayServices(
        settings, metrics, admission, console, http, worker_secret, dict(urls or {})
    )
    # Router, runners, observers, pipeline, upstream clients: everything built from the graph.
    runtimes = GraphRuntimes(
        build_runtime(graph, services), metrics, health_interval_s=settings.health_interval_s
    )
    metrics.graph_generation.set(runtimes.current.generation)
    metrics.graph_loaded_at.set(runtimes.current.loaded_at)
    reloader = None
    if graph_file is not None:
        reloader = GraphReloader(
            graph_file, runtimes, services, interval_s=settings.graph_reload_interval_s
        )
        reloader.baseline()
    # /metrics (here and on --metrics-port): this process's registry, or with --processes N
    # every gateway process's metrics as one view.
    shown = exposition_registry(registry)
    state = GatewayState(
        settings, runtimes, admission, lifecycle, shown, metrics, console, reloader
    )

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await runtimes.start()
        if shared_limits is not None:
            shared_limits.start()
        if feed is not None:
            feed.start()
        if reloader is not None and (settings.graph_reload_interval_s > 0 or reload_on_sighup):
            reloader.start()
        if reloader is not None and reload_on_sighup:
            asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, reloader.request_reload)
        try:
            yield
        finally:
            if reloader is not None and reload_on_sighup:
                asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
            if reloader is not None:
                await reloader.stop()
            await runtimes.aclose()  # every runtime's pools and ensemble threads
            await http.aclose()
            if shared_limits is not None:
                await shared_limits.stop()
            if feed is not None:
                await feed.close()
            if redis is not None:
                await redis.aclose()

    app = FastAPI(
        title="Octograph",
        version="0.1.0",
        description="One OpenAI-compatible endpoint in front of a graph of language models.",
        lifespan=lifespan,
    )
    app.state.gateway = state
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    install_error_handlers(app)
    app.include_router(health.router)
    app.include_router(openai_routes.router)
    app.include_router(console_routes.router)
    # Added before GatewayMiddleware, so it runs inside it (auth, request ids, draining).
    app.add_middleware(FrontDoor, state=state)
    keys = ApiKeys(
        [k.get_secret_value() for k in settings.api_keys],
        settings.api_keys_file,
        admin_keys=[k.get_secret_value() for k in settings.admin_keys],
    )
    app.add_middleware(
        GatewayMiddleware,
        keys=keys,
        lifecycle=lifecycle,
        max_body_bytes=settings.max_body_bytes,
        body_timeout_s=settings.body_timeout_s,
        metrics_open=settings.metrics_port is None and not keys.enabled,
        allow_open=settings.allow_open,
    )
    return app


GENERATION_OPERATIONS: dict[str, tuple[str, type[BaseModel], str]] = {
    "/v1/chat/completions": ("chat_completions", ChatCompletionRequest, "Chat completion"),
    "/v1/completions": ("completions", CompletionRequest, "Text completion"),
}


def _openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's document plus the two generation operations, which the front door serves
    (front_door.py) and no FastAPI handler does: described here, not implemented twice."""
    if app.openapi_schema is not None:
        return app.openapi_schema
    from fastapi.openapi.utils import get_openapi

    schema = get_openapi(
        title=app.title, version=app.version, description=app.description, routes=app.routes
    )
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    error_ref = {"$ref": "#/components/schemas/ErrorResponse"}
    components.setdefault("ErrorResponse", ErrorResponse.model_json_schema(ref_template=_REF))
    for path, (op_id, model, summary) in GENERATION_OPERATIONS.items():
        model_schema = model.model_json_schema(ref_template=_REF)
        for name, sub in model_schema.pop("$defs", {}).items():
            components.setdefault(name, sub)
        components[model.__name__] = model_schema
        schema.setdefault("paths", {})[path] = {
            "post": {
                "operationId": op_id,
                "summary": summary,
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {
                            "schema": {"$ref": f"#/components/schemas/{model.__name__}"}
                        }
                    },
                },
                "responses": {
                    "200": {
                        "description": "a JSON body, or an SSE stream with `stream: true`",
                        "content": {"application/json": {}, "text/event-stream": {}},
                    },
                    **{
                        code: {
                            "description": "error",
                            "content": {"application/json": {"schema": error_ref}},
                        }
                        for code in ("400", "404", "429", "503")
                    },
                },
            }
        }
    app.openapi_schema = schema
    return schema


_REF = "#/components/schemas/{model}"
