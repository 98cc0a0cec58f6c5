"""The gateway app factory: wires settings, graph, worker pools, router and pipeline."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from fastapi import FastAPI
from prometheus_client import CollectorRegistry
from pydantic import BaseModel

from service.config import GatewaySettings
from service.gateway.admission import Admission
from service.gateway.auth import ApiKeys
from service.gateway.clients.pool import WorkerPools
from service.gateway.clients.upstream import upstream_clients
from service.gateway.clients.worker import make_http_client
from service.gateway.console.stats import ConsoleStats
from service.gateway.front_door import FrontDoor
from service.gateway.middleware import GatewayMiddleware
from service.gateway.observer import Observers
from service.gateway.pipeline import Pipeline
from service.gateway.routes import console as console_routes
from service.gateway.routes import health, openai_routes
from service.gateway.routing import Router
from service.gateway.runners.base import NodeRunner
from service.gateway.runners.ensemble import EnsembleRunner
from service.gateway.runners.local import LocalRunner
from service.gateway.runners.remote import RemoteRunner
from service.graph.schema import GraphConfig, RouterNode
from service.http_errors import install_error_handlers
from service.internal_auth import is_loopback_host, read_secret_file
from service.observability.metrics import GatewayMetrics
from service.protocol.openai import ChatCompletionRequest, CompletionRequest, ErrorResponse
from service.serving import Lifecycle

log = logging.getLogger(__name__)


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
    ensembles: EnsembleRunner

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
    pools = WorkerPools(
        all_urls,
        http,
        metrics,
        health_interval_s=settings.health_interval_s,
        cooldown_s=settings.cooldown_s,
        upstreams=upstream_clients(graph),  # kind: openai models (runners/remote.py)
        worker_secret=worker_secret,
    )
    router = Router(graph, pools, metrics)
    idle = settings.stream_idle_timeout_s
    ensembles = EnsembleRunner(graph, pools, metrics, idle_timeout_s=idle)
    # The registry of node kinds, asked in order: a new kind is one runner and one line here.
    runners: list[NodeRunner] = [
        ensembles,
        RemoteRunner(graph, pools, metrics),
        LocalRunner(pools, metrics, idle, tool_parsers=graph.tool_parsers()),
    ]
    admission = Admission(
        metrics,
        max_inflight=settings.max_inflight,
        max_inflight_per_node=settings.max_inflight_per_node,
        max_inflight_per_key=settings.max_inflight_per_key,
        rate_limit_rpm=settings.rate_limit_rpm,
        rate_limit_tpm=settings.rate_limit_tpm,
    )
    # Series only for the graph's ids: the recorder's memory is bounded by the graph.
    ids = [*graph.nodes, *graph.models]
    console = ConsoleStats(ids)
    observers = Observers(metrics, console, frozenset(ids), spend=admission.spend_tokens)
    pipeline = Pipeline(
        graph,
        router,
        runners,
        admission,
        observers,
        max_request_sequences=settings.max_request_sequences,
    )
    state = GatewayState(
        settings, graph, pools, pipeline, lifecycle, registry, metrics, console, ensembles
    )

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await pools.probe_once()
        pools.start()
        yield
        ensembles.close()
        await pools.stop()
        await http.aclose()

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
    keys = ApiKeys([k.get_secret_value() for k in settings.api_keys], settings.api_keys_file)
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
