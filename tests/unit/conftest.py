"""Fixtures shared by unit tests: `spine`, one gateway serving every node kind (local model
nodes, a byte-level ensemble on toy models, a remote `kind: openai` node, routers) with fake
workers and a fake OpenAI-compatible upstream on loopback."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from service.config import GatewaySettings
from service.gateway.app import build_gateway_app
from service.gateway.clients.fake_upstream import MODEL, FakeUpstream
from service.graph.functional_tokens import assign_tokens
from service.graph.schema import GraphConfig, parse_graph
from service.serving import Lifecycle
from service.worker.app import build_worker_app
from service.worker.fake_engine import FakeEngine
from tests.conftest import Served, serve_app
from tests.unit.test_ensemble_runner import assets_for, exact_byte_dist

KEY_ENV = "OCTOGRAPH_TEST_SPINE_KEY"
KEY = "sk-spine"

GRAPH = """
models:
  routerm: {{urls: ["http://placeholder"]}}
  alpha: {{urls: ["http://placeholder"], max_model_len: 512}}
  beta: {{urls: ["http://placeholder"], max_model_len: 512}}
  hosted: {{kind: openai, base_url: {urls}, model: {model}, api_key_env: {key_env}}}
root: root
nodes:
  root: {{kind: router, model: routerm, children: [general, remote, blend], fallback: general}}
  to_remote: {{kind: router, model: routerm, children: [general], fallback: remote}}
  general: {{kind: model, model: alpha}}
  capped: {{kind: model, model: alpha, sampling: {{max_tokens: 3, temperature: 0.25}}}}
  remote: {{kind: model, model: hosted, sampling: {{max_tokens: 7}}}}
  blend:
    kind: ensemble
    members: [{{model: alpha, weight: 0.7}}, {{model: beta, weight: 0.3}}]
"""


@dataclass
class SpineStack:
    url: str
    app: Any
    graph: GraphConfig
    engines: dict[str, FakeEngine]
    upstream: FakeUpstream

    @property
    def state(self) -> Any:
        return self.app.state.gateway

    def steer(self, *wanted: str) -> None:
        """The fake router model picks these nodes."""
        ids = {49_000 + k: node for node, k in assign_tokens(self.graph).items()}
        self.engines["routerm"].score_hook = lambda _text, cands: {
            i: (-0.01 if ids.get(i) in wanted else -5.0) for i in cands
        }

    def sample(self, name: str, **labels: str) -> float:
        value = self.state.registry.get_sample_value(name, labels)
        return 0.0 if value is None else float(value)

    def inflight(self) -> dict[str, int]:
        return {
            r.url: r.inflight for pool in self.state.pools.pools.values() for r in pool.replicas
        }

    async def post(self, body: dict[str, Any], path: str = "/v1/chat/completions") -> Any:
        async with httpx.AsyncClient(base_url=self.url, timeout=30, trust_env=False) as c:
            return await c.post(path, json=body)


@pytest.fixture
async def spine(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Callable[..., Any]]:
    served: list[Served] = []
    monkeypatch.setenv(KEY_ENV, KEY)

    async def factory(**settings_kw: Any) -> SpineStack:
        upstream = FakeUpstream(api_key=KEY)
        up = await serve_app(upstream.app())
        served.append(up)
        graph = parse_graph(
            GRAPH.format(urls=json.dumps([f"{up.url}/v1"]), model=MODEL, key_env=KEY_ENV)
        )
        engines, urls = {}, {}
        for name, spec in graph.worker_models().items():
            engines[name] = FakeEngine(name=name, max_model_len=spec.max_model_len)
            s = await serve_app(build_worker_app(engines[name], Lifecycle()))
            served.append(s)
            urls[name] = [s.url]
        for name in ("alpha", "beta"):
            engines[name].byte_dist = exact_byte_dist(name)  # type: ignore[method-assign]
        settings_kw.setdefault("health_interval_s", 0.2)
        settings_kw.setdefault("cooldown_s", 30)
        app = build_gateway_app(GatewaySettings(**settings_kw), graph, urls=urls)
        app.state.gateway.ensembles.assets.factory = assets_for
        gateway = await serve_app(app)
        served.append(gateway)
        return SpineStack(gateway.url, app, graph, engines, upstream)

    yield factory
    for s in reversed(served):
        await s.stop()
