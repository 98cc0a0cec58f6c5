"""A gateway with fake workers served from a background thread (its own event loop), for
synchronous browser tests: the browser driver blocks, so the servers cannot share its thread.

The graph is the default one, configs/local.yaml (root -> math, code, science -> physics,
chemistry, biology, health, law, finance, humanities, general; the ensemble `blend`), with every
model replaced by a fake engine. The router model's scores are steered by keywords so a test
knows the route.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from service.config import GatewaySettings
from service.gateway.app import build_gateway_app
from service.graph.functional_tokens import assign_tokens
from service.graph.schema import GraphConfig, ModelSpec, parse_graph
from service.serving import Lifecycle
from service.worker.app import build_worker_app
from service.worker.fake_engine import FakeEngine
from tests.conftest import Served, serve_app

DEFAULT_GRAPH_FILE = Path(__file__).resolve().parents[2] / "configs" / "local.yaml"


def default_graph_with_fake_models(path: Path = DEFAULT_GRAPH_FILE) -> str:
    """The default graph's YAML with each model an `engine: fake` of the same context length:
    the nodes (ids, kinds, children, fallbacks, members) stay exactly what ships."""
    data = yaml.safe_load(path.read_text())
    data["models"] = {
        name: {"engine": "fake", "max_model_len": (spec or {}).get("max_model_len", 2048)}
        for name, spec in data["models"].items()
    }
    return yaml.safe_dump(data, sort_keys=False)


CONSOLE_GRAPH = default_graph_with_fake_models()

# Keyword in the prompt -> the nodes the router should prefer at each hop.
STEERING: dict[str, set[str]] = {
    "quantum": {"science", "physics"},
    "molecule": {"science", "chemistry"},
    "integral": {"math"},
    "python": {"code"},
}


def steering_hook(graph: GraphConfig) -> Callable[[str, list[int]], dict[int, float]]:
    """FakeEngine.score_hook: a confident choice for prompts with a known keyword, a flat one
    (the first child, then the rest) otherwise. Functional token k is id 49_000 + k."""
    by_id = {49_000 + k: node for node, k in assign_tokens(graph).items()}

    def hook(text: str, ids: list[int]) -> dict[int, float]:
        wanted: set[str] = set()
        for word, nodes in STEERING.items():
            if word in text.lower():
                wanted |= nodes
        return {i: (-0.05 if by_id.get(i) in wanted else -4.0) for i in ids}

    return hook


@dataclass
class ThreadedStack:
    graph_yaml: str = CONSOLE_GRAPH
    token_delay_s: float = 0.04
    reply_words: int = 24
    router_model: str = "router"  # the model whose scores are steered by STEERING
    settings_kw: dict[str, Any] = field(default_factory=dict)
    url: str = ""
    engines: dict[str, FakeEngine] = field(default_factory=dict)
    _loop: asyncio.AbstractEventLoop | None = None
    _thread: threading.Thread | None = None
    _served: list[Served] = field(default_factory=list)
    _workers: dict[str, Served] = field(default_factory=dict)

    def start(self, timeout_s: float = 30.0) -> ThreadedStack:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._up(), self._loop).result(timeout_s)
        return self

    async def _up(self) -> None:
        graph = parse_graph(self.graph_yaml)
        urls: dict[str, list[str]] = {}
        for name, spec in graph.models.items():
            if not isinstance(spec, ModelSpec):
                continue  # an OpenAI-compatible upstream (kind: openai): the gateway calls it
            engine = FakeEngine(
                name=name,
                max_model_len=spec.max_model_len,
                token_delay_s=self.token_delay_s,
                reply_words=self.reply_words,
            )
            if name == self.router_model:
                engine.score_hook = steering_hook(graph)
            self.engines[name] = engine
            served = await serve_app(build_worker_app(engine, Lifecycle()))
            self._served.append(served)
            self._workers[name] = served
            urls[name] = [served.url]
        kw = {"health_interval_s": 0.5, "cooldown_s": 1.0, **self.settings_kw}
        app = build_gateway_app(GatewaySettings(**kw), graph, lifecycle=Lifecycle(), urls=urls)
        gateway = await serve_app(app)
        self._served.append(gateway)
        self.url = gateway.url
        # Ready when every worker answered a probe (the workers load in the background).
        for _ in range(300):
            if app.state.gateway.pools.all_ready:
                return
            await asyncio.sleep(0.05)
        raise RuntimeError("fake workers did not become ready")

    def stop_worker(self, model: str) -> None:
        """Take a model's worker down (the gateway's probes notice it)."""
        assert self._loop is not None
        asyncio.run_coroutine_threadsafe(self._workers[model].stop(), self._loop).result(30)

    def stop(self) -> None:
        if self._loop is None:
            return

        async def down() -> None:
            for served in reversed(self._served):
                await served.stop()

        asyncio.run_coroutine_threadsafe(down(), self._loop).result(30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(10)
        self._loop.close()
        self._loop = None
