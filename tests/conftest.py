"""Shared fixtures: a gateway and fake workers as real uvicorn servers on loopback, all in the
test's event loop (so tests can hold FakeEngine gates and inspect calls directly)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

from service.config import GatewaySettings
from service.gateway.app import build_gateway_app
from service.graph.schema import GraphConfig, parse_graph
from service.serving import Lifecycle
from service.worker.app import build_worker_app
from service.worker.fake_engine import FakeEngine

# The hook that makes a skip fail the run under CI=true (unless allowlisted): tests/ci_skips.py.
from tests.ci_skips import pytest_runtest_makereport  # noqa: F401

# `redis_server`: a throwaway real redis-server for any test that asks for it.
pytest_plugins = ["tests.redis_server"]

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

FAKE_GRAPH = """
models:
  alpha: {urls: ["http://placeholder"], max_model_len: 256}
  beta:  {urls: ["http://placeholder"], max_model_len: 256}
  routerm: {urls: ["http://placeholder"]}
root: root
nodes:
  root: {kind: router, model: routerm, children: [math, science, general], fallback: general}
  science: {kind: router, model: routerm, children: [physics, biology]}
  math:
    kind: model
    model: alpha
    system_prompt: "You are a math tutor."
    sampling: {temperature: 0.2}
  physics: {kind: model, model: beta}
  biology: {kind: model, model: beta}
  general: {kind: model, model: alpha}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Served:
    server: uvicorn.Server
    task: asyncio.Task[None]
    url: str

    async def stop(self) -> None:
        self.server.should_exit = True
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.task, 5)


async def serve_app(app: Any, port: int | None = None) -> Served:
    port = port or free_port()
    config = uvicorn.Config(
        app, host="127.0.0.1", port=port, log_config=None, lifespan="on", access_log=False
    )
    server = uvicorn.Server(config)
    server.install_signal_handlers = lambda: None  # type: ignore[method-assign]
    task = asyncio.create_task(server.serve())
    for _ in range(500):
        if server.started:
            break
        if task.done():
            task.result()
        await asyncio.sleep(0.01)
    return Served(server, task, f"http://127.0.0.1:{port}")


@dataclass
class Stack:
    gateway: Served
    client: httpx.AsyncClient
    engines: dict[str, list[FakeEngine]]
    workers: dict[str, list[Served]]
    lifecycle: Lifecycle
    app: Any
    settings: GatewaySettings
    graph: GraphConfig
    extra: list[Served] = field(default_factory=list)

    @property
    def url(self) -> str:
        return self.gateway.url

    def engine(self, model: str, replica: int = 0) -> FakeEngine:
        return self.engines[model][replica]

    async def close(self) -> None:
        await self.client.aclose()
        await self.gateway.stop()
        for ws in self.workers.values():
            for w in ws:
                await w.stop()


StackFactory = Callable[..., Any]


@pytest.fixture
async def make_stack() -> AsyncIterator[StackFactory]:
    stacks: list[Stack] = []

    async def factory(
        graph_yaml: str = FAKE_GRAPH,
        replicas: dict[str, int] | None = None,
        engine_kwargs: dict[str, Any] | None = None,
        **settings_kw: Any,
    ) -> Stack:
        graph = parse_graph(graph_yaml)
        engines: dict[str, list[FakeEngine]] = {}
        workers: dict[str, list[Served]] = {}
        urls: dict[str, list[str]] = {}
        for name, spec in graph.models.items():
            engines[name], workers[name], urls[name] = [], [], []
            for _ in range((replicas or {}).get(name, 1)):
                eng = FakeEngine(
                    name=name, max_model_len=spec.max_model_len, **(engine_kwargs or {})
                )
                served = await serve_app(build_worker_app(eng, Lifecycle()))
                engines[name].append(eng)
                workers[name].append(served)
                urls[name].append(served.url)
        settings_kw.setdefault("health_interval_s", 0.2)
        settings_kw.setdefault("cooldown_s", 0.5)
        settings = GatewaySettings(**settings_kw)
        lifecycle = Lifecycle()
        app = build_gateway_app(settings, graph, lifecycle=lifecycle, urls=urls)
        gateway = await serve_app(app)
        client = httpx.AsyncClient(base_url=gateway.url, timeout=30, trust_env=False)
        stack = Stack(gateway, client, engines, workers, lifecycle, app, settings, graph)
        stacks.append(stack)
        return stack

    yield factory
    for s in stacks:
        await s.close()


def sse_events(body: str) -> list[Any]:
    """Parse an SSE body into JSON objects; the final [DONE] becomes the string 'DONE'."""
    import json

    out: list[Any] = []
    for block in body.split("\n\n"):
        block = block.strip()
        if not block.startswith("data: "):
            continue
        data = block[len("data: ") :]
        out.append("DONE" if data == "[DONE]" else json.loads(data))
    return out


def spawn_cli(
    args: list[str], log: Path, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """`octograph ARGS` as a real process in a session of its own (killable as a group), its
    output in `log`, with this environment plus `env`."""
    return subprocess.Popen(
        [sys.executable, "-m", "service.cli", *args],
        cwd=Path(__file__).resolve().parents[1],
        env={**os.environ, **(env or {})},
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
