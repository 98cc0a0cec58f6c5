"""Fuzz the public API from its own OpenAPI schema (schemathesis + hypothesis): whatever the
body, the gateway answers with a 2xx or an OpenAI error body, never a 5xx or a traceback.
Generation is really reached: `model` is pinned to the served ids (one run keeps it free), and
a floor on the share of valid generation bodies answered 200 says so.

Marked slow. The gateway and its fake workers run as real servers in a background thread (the
schemathesis pytest plugin drives synchronous tests)."""

from __future__ import annotations

import asyncio
import copy
import itertools
import threading
from collections import Counter
from collections.abc import Iterator
from typing import Any

import httpx
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


GENERATION = {
    "/v1/chat/completions": "ChatCompletionRequest",
    "/v1/completions": "CompletionRequest",
}
# Valid (positive-mode) bodies on a served id that must be answered 200, per generation
# operation. Valid by the schema is not always servable: an empty prompt, `top_logprobs`
# without `logprobs`, a `max_tokens` beyond the context, 5+ stop strings, `byte_exact` on a
# model without tokenizer files (the schema cannot say these) are refused with a 400 by design.
# Measured, 100 examples each, four runs: chat 48-67% 200s, completions 23-50% (most of its
# 400s: "the prompt is empty"); unpinned, both 0%. The floors sit well under the spread and
# catch what this test is for: generation barely reached.
CONSTRAINT_FIELDS = ("tools", "tool_choice", "parallel_tool_calls", "response_format", "logit_bias")
MIN_SERVED_SHARE = {"/v1/chat/completions": 0.25, "/v1/completions": 0.12}


def pinned_schema(raw: dict[str, Any], served: list[str]) -> dict[str, Any]:
    """The gateway's own OpenAPI document with `model` of the generation operations (and of
    /v1/route) pinned to the ids it serves (GET /v1/models): a free string is almost always an
    unknown model (404), which would fuzz the model lookup instead of generation."""
    schema = copy.deepcopy(raw)
    components = schema["components"]["schemas"]
    for name in (*GENERATION.values(), "RouteRequest"):
        components[name]["properties"]["model"] = {"type": "string", "enum": served}
        # Constraints have their own tests (test_structured.py): random tools and schemas are
        # almost always refused, which would fuzz their validation instead of generation.
        for field in CONSTRAINT_FIELDS:
            components[name]["properties"].pop(field, None)
    # Tool turns likewise (a tool message needs its tool_call_id, which the schema cannot say).
    message = components["ChatMessage"]["properties"]
    message["role"]["enum"] = [r for r in message["role"]["enum"] if r != "tool"]
    message.pop("tool_calls", None)
    message.pop("tool_call_id", None)
    return schema


def fuzz_operation(
    operation: Any, mode: GenerationMode, counts: Counter[int], stack_url: str, examples: int
) -> None:
    @hypothesis.given(case=operation.as_strategy(generation_mode=mode))
    @hypothesis.settings(
        max_examples=examples,
        deadline=None,
        suppress_health_check=list(hypothesis.HealthCheck),
        database=None,
    )
    def fuzz(case: Any) -> None:
        counts[check_response(case, stack_url)] += 1

    fuzz()


def run(
    schema: Any, stack_url: str, examples: int
) -> dict[tuple[str, str, GenerationMode], Counter[int]]:
    """Every /v1/ operation in both modes; status counts per (method, path, mode)."""
    operations = [op.ok() for op in schema.get_all_operations() if op.ok().path.startswith("/v1/")]
    assert {op.path for op in operations} >= set(GENERATION)
    statuses: dict[tuple[str, str, GenerationMode], Counter[int]] = {}
    for operation, mode in itertools.product(operations, GenerationMode):
        if mode is GenerationMode.NEGATIVE and operation.method.upper() != "POST":
            continue  # nothing to make invalid in a GET without parameters
        counts = statuses.setdefault((operation.method.upper(), operation.path, mode), Counter())
        fuzz_operation(operation, mode, counts, stack_url, examples)
    return statuses


def test_no_body_makes_the_gateway_fail(stack_url: str) -> None:
    # Driven by hand rather than through schemathesis' pytest plugin, which does not load
    # under this pytest version.
    raw = httpx.get(f"{stack_url}/openapi.json", timeout=30).json()
    served = [m["id"] for m in httpx.get(f"{stack_url}/v1/models", timeout=30).json()["data"]]
    assert {"auto", "general", "alpha"} <= set(served)
    # Pinned: bodies name a served node or model, so generation itself is fuzzed.
    pinned = run(schemathesis.openapi.from_dict(pinned_schema(raw, served)), stack_url, 100)
    # Unpinned, as the schema says (any string): the lookup of unknown models is fuzzed too.
    free = run(schemathesis.openapi.from_dict(raw), stack_url, 30)
    for name, statuses in (("pinned", pinned), ("free", free)):
        for (method, path, mode), counts in statuses.items():
            print(f"fuzz {name} {method} {path} {mode.value}: {dict(sorted(counts.items()))}")
    for path, floor in MIN_SERVED_SHARE.items():
        counts = pinned[("POST", path, GenerationMode.POSITIVE)]
        share = counts[200] / sum(counts.values())
        assert share >= floor, (path, f"{share:.0%} of valid bodies served", dict(counts))
        # Invalid bodies were really sent, and refused with a 4xx (never a 5xx: check_response).
        assert sum(
            n for s, n in pinned[("POST", path, GenerationMode.NEGATIVE)].items() if s >= 400
        )
    assert free[("GET", "/v1/models", GenerationMode.POSITIVE)][200] > 0
