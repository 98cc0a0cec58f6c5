"""Fuzz the public API from its own OpenAPI schema (schemathesis + hypothesis): whatever the
body, the gateway answers with a 2xx or an OpenAI error body, never a 5xx or a traceback.

Marked slow. The gateway and its fake workers run as real servers in a background thread (the
schemathesis pytest plugin drives synchronous tests)."""

from __future__ import annotations

import asyncio
import itertools
import threading
from collections import Counter
from collections.abc import Iterator
from typing import Any

import hypothesis
import pytest
import schemathesis
from schemathesis.generation import GenerationMode

from service.config import GatewaySettings
from service.gateway.app import build_gateway_app
from service.graph.schema import parse_graph
from service.serving import Lifecycle
from service.worker.app import build_worker_app
from service.worker.fake_engine import FakeEngine
from tests.conftest import FAKE_GRAPH, Served, serve_app

pytestmark = pytest.mark.slow


class BackgroundStack:
    """Fake workers + gateway served from their own event loop on a daemon thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.served: list[Served] = []
        self.url = ""

    def __enter__(self) -> BackgroundStack:
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(30)
        return self

    async def _start(self) -> None:
        graph = parse_graph(FAKE_GRAPH)
        urls: dict[str, list[str]] = {}
        for name, spec in graph.models.items():
            engine = FakeEngine(name=name, max_model_len=spec.max_model_len)
            worker = await serve_app(build_worker_app(engine, Lifecycle()))
            self.served.append(worker)
            urls[name] = [worker.url]
        app = build_gateway_app(GatewaySettings(), graph, lifecycle=Lifecycle(), urls=urls)
        gateway = await serve_app(app)
        self.served.append(gateway)
        self.url = gateway.url

    def __exit__(self, *exc: Any) -> None:
        async def stop() -> None:
            for s in reversed(self.served):
                await s.stop()

        asyncio.run_coroutine_threadsafe(stop(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture(scope="module")
def stack_url() -> Iterator[str]:
    with BackgroundStack() as stack:
        yield stack.url


def check_response(case: Any, stack_url: str) -> int:
    response = case.call(base_url=stack_url, timeout=30)
    assert response.status_code < 500, (case.path, response.status_code, response.text[:500])
    if response.status_code >= 400:
        error = response.json()["error"]
        assert error["message"] and error["type"]
        assert "Traceback" not in error["message"] and "/work/" not in error["message"]
    return int(response.status_code)


def test_no_body_makes_the_gateway_fail(stack_url: str) -> None:
    # Driven by hand rather than through schemathesis' pytest plugin, which does not load
    # under this pytest version.
    schema = schemathesis.openapi.from_url(f"{stack_url}/openapi.json")
    operations = [op.ok() for op in schema.get_all_operations() if op.ok().path.startswith("/v1/")]
    assert {op.path for op in operations} >= {"/v1/chat/completions", "/v1/completions"}
    statuses: Counter[int] = Counter()
    for operation, mode in itertools.product(operations, GenerationMode):
        if mode is GenerationMode.NEGATIVE and operation.method.upper() != "POST":
            continue  # nothing to make invalid in a GET without parameters

        @hypothesis.given(case=operation.as_strategy(generation_mode=mode))
        @hypothesis.settings(
            max_examples=50,
            deadline=None,
            suppress_health_check=list(hypothesis.HealthCheck),
            database=None,
        )
        def fuzz(case: Any) -> None:
            statuses[check_response(case, stack_url)] += 1

        fuzz()
    print(f"fuzz: status counts {dict(statuses)}")
    # Both valid bodies (served) and invalid ones (refused with a 4xx) were really sent.
    assert statuses[200] > 0 and sum(n for s, n in statuses.items() if s >= 400) > 0, statuses
