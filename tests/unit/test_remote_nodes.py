"""Remote nodes (`kind: openai` models): a graph with local fake workers and fake
OpenAI-compatible upstreams (service/gateway/clients/fake_upstream.py) served in-process,
driven through the gateway with the official `openai` client and with raw HTTP where bytes
matter."""

from __future__ import annotations

import asyncio
import copy
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import httpx
import openai
import pytest

from service.config import GatewaySettings
from service.gateway.app import build_gateway_app
from service.gateway.clients.fake_upstream import MODEL, FakeUpstream
from service.gateway.clients.upstream import sse_payload
from service.gateway.runners.relay import ChunkRewriter
from service.graph.functional_tokens import assign_tokens
from service.graph.schema import GraphConfig, GraphError, parse_graph
from service.serving import Lifecycle
from service.worker.app import build_worker_app
from service.worker.fake_engine import FakeEngine
from tests.conftest import Served, serve_app, sse_events

KEY_ENV = "OCTOGRAPH_TEST_UPSTREAM_KEY"
KEY = "sk-test-123"

GRAPH = """
models:
  routerm: {{urls: ["http://placeholder"]}}
  local: {{urls: ["http://placeholder"], max_model_len: 256}}
  hosted:
    kind: openai
    base_url: {urls}
    model: {model}
    api_key_env: {key_env}
    read_timeout_s: {read_timeout_s}
    max_concurrency: {max_concurrency}
    headers: {{X-Team: octo}}
root: root
nodes:
  root: {{kind: router, model: routerm, children: [remote, general], fallback: general}}
  remote:
    kind: model
    model: hosted
    system_prompt: "You are the remote node."
    sampling: {{temperature: 0.3, max_tokens: 50}}
  general: {{kind: model, model: local}}
"""


@dataclass
class RemoteStack:
    gateway: Served
    url: str
    upstreams: list[FakeUpstream]
    graph: GraphConfig
    app: Any
    engines: dict[str, FakeEngine]
    served: list[Served]

    @property
    def pool(self) -> Any:
        return self.app.state.gateway.pools.upstreams["hosted"]

    def openai(self) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0)

    def steer(self, *wanted: str) -> None:
        """The fake router model picks these nodes (FakeEngine.score_hook)."""
        ids = {49_000 + k: node for node, k in assign_tokens(self.graph).items()}
        self.engines["routerm"].score_hook = lambda _text, cands: {
            i: (-0.01 if ids.get(i) in wanted else -5.0) for i in cands
        }


@pytest.fixture
async def remote_stack(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Callable[..., Any]]:
    served: list[Served] = []
    monkeypatch.setenv(KEY_ENV, KEY)

    async def factory(
        n_upstreams: int = 1,
        read_timeout_s: float = 5.0,
        max_concurrency: int = 8,
        **upstream_kw: Any,
    ) -> RemoteStack:
        upstreams = [  # each its own copy (fail_statuses is a list the fake pops)
            FakeUpstream(api_key=KEY, **copy.deepcopy(upstream_kw)) for _ in range(n_upstreams)
        ]
        urls = []
        for up in upstreams:
            s = await serve_app(up.app())
            served.append(s)
            urls.append(f"{s.url}/v1")
        graph = parse_graph(
            GRAPH.format(
                urls=json.dumps(urls),
                model=MODEL,
                key_env=KEY_ENV,
                read_timeout_s=read_timeout_s,
                max_concurrency=max_concurrency,
            )
        )
        engines, worker_urls = {}, {}
        for name, spec in graph.worker_models().items():
            engines[name] = FakeEngine(name=name, max_model_len=spec.max_model_len)
            s = await serve_app(build_worker_app(engines[name], Lifecycle()))
            served.append(s)
            worker_urls[name] = [s.url]
        # A long cooldown: a replica marked down stays down for the test's assertions.
        settings = GatewaySettings(health_interval_s=1.0, cooldown_s=30)
        app = build_gateway_app(settings, graph, urls=worker_urls)
        gateway = await serve_app(app)
        served.append(gateway)
        return RemoteStack(gateway, gateway.url, upstreams, graph, app, engines, served)

    yield factory
    for s in reversed(served):
        await s.stop()


CHAT = {"model": "remote", "messages": [{"role": "user", "content": "hi there"}]}


async def _post(stack: RemoteStack, body: dict[str, Any], path: str = "/v1/chat/completions"):
    async with httpx.AsyncClient(base_url=stack.url, timeout=30, trust_env=False) as client:
        return await client.post(path, json=body)


# -- the graph file ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "node", "message"),
    [
        ("api_key: sk-inline", "", "keys are never written in the graph file"),
        ("headers: {Authorization: Bearer x}", "", "credentials are never written"),
        ("api_key_env: A\n    api_key_file: /f", "", "one of api_key_env and api_key_file"),
        ("", "blend: {kind: ensemble, members: [{model: w}, {model: up}]}", "no next-token"),
        ("", "r: {kind: router, model: up, children: [a]}", "cannot be a router model"),
    ],
)
def test_graph_refuses_misuse_of_openai_models(extra: str, node: str, message: str) -> None:
    text = (
        "models:\n  w: {engine: fake}\n  up:\n    kind: openai\n    base_url: http://h/v1\n"
        f"    model: m\n    {extra}\nnodes:\n  a: {{kind: model, model: up}}\n  {node}\n"
    )
    with pytest.raises(GraphError, match=message):
        parse_graph(text)


def test_graph_openai_model_kind_parses() -> None:
    graph = parse_graph(
        "models:\n  w: {engine: fake}\n  up: {kind: openai, base_url: 'http://h/v1', model: m}\n"
        "nodes:\n  a: {kind: model, model: up}\n"
    )
    assert list(graph.worker_models()) == ["w"]
    spec = graph.openai_models()["up"]
    assert spec.base_url == ["http://h/v1"] and spec.health_path == "/models"


def test_missing_key_env_fails_at_start_naming_the_model(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOPE_KEY", raising=False)
    graph = parse_graph(
        "models:\n  up: {kind: openai, base_url: 'http://h/v1', model: m, api_key_env: NOPE_KEY}\n"
    )
    with pytest.raises(GraphError, match="model 'up': environment variable NOPE_KEY is not set"):
        build_gateway_app(GatewaySettings(), graph)


# -- success: the official client against the gateway ----------------------------------------


async def test_chat_non_stream_passes_through(remote_stack) -> None:
    stack = await remote_stack()
    async with stack.openai() as client:
        raw = await client.chat.completions.with_raw_response.create(
            model="remote", messages=[{"role": "user", "content": "hi there"}], seed=7
        )
    resp = raw.parse()
    assert raw.headers["x-octograph-route"] == "remote"
    assert resp.choices[0].message.content == "Hello from the upstream w0 w1 w2 w3 w4 w5 w6 w7"
    assert resp.choices[0].finish_reason == "stop"
    assert resp.usage is not None and resp.usage.completion_tokens == 12
    assert resp.id.startswith("chatcmpl-") and "-up" not in resp.id  # the gateway's id
    assert resp.model == "remote"
    assert resp.model_extra is not None and resp.model_extra["octograph"]["route"] == ["remote"]
    sent = stack.upstreams[0].calls[0]
    assert sent["model"] == MODEL and sent["seed"] == 7
    assert sent["temperature"] == 0.3 and sent["max_tokens"] == 50  # the node's defaults
    assert sent["messages"][0] == {"role": "system", "content": "You are the remote node."}
    seen = stack.upstreams[0].headers_seen[0]
    assert seen["authorization"] == f"Bearer {KEY}" and seen["x-team"] == "octo"


async def test_chat_stream_with_usage_and_logprobs(remote_stack) -> None:
    stack = await remote_stack()
    async with stack.openai() as client:
        stream = await client.chat.completions.create(
            model="remote",
            messages=[{"role": "user", "content": "hi"}],
            stream=True,
            stream_options={"include_usage": True},
            logprobs=True,
            top_logprobs=1,
            temperature=0.9,
        )
        chunks = [c async for c in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Hello from the upstream w0 w1 w2 w3 w4 w5 w6 w7"
    assert {c.id for c in chunks} == {chunks[0].id} and chunks[0].id.startswith("chatcmpl-")
    assert {c.model for c in chunks} == {"remote"}
    assert chunks[0].model_extra["octograph"]["route"] == ["remote"]
    assert "octograph" not in (chunks[1].model_extra or {})
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 12
    lp = chunks[0].choices[0].logprobs
    assert lp is not None and lp.content[0].token == "Hello"
    assert stack.upstreams[0].calls[0]["temperature"] == 0.9  # the client's value wins


async def test_stream_chunks_pass_through_as_bytes(remote_stack) -> None:
    """An upstream writing JSON with spaces keeps its spaces: chunks were not re-encoded."""
    stack = await remote_stack(spaced=True)
    r = await _post(stack, {**CHAT, "stream": True})
    blocks = [b for b in r.text.split("\n\n") if b]
    assert blocks[-1] == "data: [DONE]"
    later = blocks[1:-1]
    assert later and all('"choices": [' in b for b in later)  # the upstream's own bytes
    ids = {json.loads(b[6:])["id"] for b in blocks[:-1]}
    assert len(ids) == 1 and ids.pop().startswith("chatcmpl-")


async def test_completions_auto_routed_stream_and_not(remote_stack) -> None:
    stack = await remote_stack()
    stack.steer("remote")
    async with stack.openai() as client:
        full = await client.completions.create(model="auto", prompt="Once upon", max_tokens=3)
        stream = await client.completions.create(
            model="auto", prompt="Once upon", max_tokens=3, stream=True
        )
        parts = [c async for c in stream]
    assert full.choices[0].text == "Hello from the" and full.choices[0].finish_reason == "length"
    assert full.model == "auto" and full.id.startswith("cmpl-")
    assert full.model_extra["octograph"]["route"] == ["root", "remote"]
    assert "".join(p.choices[0].text for p in parts) == "Hello from the"
    assert stack.upstreams[0].calls[0]["prompt"] == "Once upon"
    assert "messages" not in stack.upstreams[0].calls[0]


async def test_mixed_graph_local_node_still_local(remote_stack) -> None:
    stack = await remote_stack()
    stack.steer("general")
    r = await _post(stack, {**CHAT, "model": "auto"})
    assert r.status_code == 200 and r.headers["x-octograph-route"] == "root>general"
    assert r.json()["choices"][0]["message"]["content"].startswith("fake answer")
    assert stack.upstreams[0].calls == []


async def test_raw_model_id_reaches_upstream_without_node_prompt(remote_stack) -> None:
    stack = await remote_stack()
    r = await _post(stack, {**CHAT, "model": "hosted"})
    assert r.status_code == 200 and r.json()["model"] == "hosted"
    assert stack.upstreams[0].calls[0]["messages"] == CHAT["messages"]


# -- failures ---------------------------------------------------------------------------------


@pytest.mark.parametrize("status", [429, 500, 503])
async def test_retryable_failure_moves_to_the_other_replica(remote_stack, status: int) -> None:
    stack = await remote_stack(n_upstreams=2)
    bad, good = stack.upstreams
    bad.fail_statuses = [status]
    # Round-robin: one of two requests picks the failing replica first, whichever is first.
    assert [(await _post(stack, CHAT)).status_code for _ in range(2)] == [200, 200]
    assert len(bad.calls) == 1 and len(good.calls) == 2
    down = [rep for rep in stack.pool.replicas if not rep.healthy]
    assert len(down) == 1 and down[0].failures == 1  # the failing one cools down
    assert down[0].url == stack.graph.openai_models()["hosted"].base_url[0]
    metrics = (await httpx.AsyncClient(base_url=stack.url).get("/metrics")).text
    assert 'octograph_retries_total{node="remote"} 1.0' in metrics


async def test_429_everywhere_is_a_429_with_retry_after(remote_stack) -> None:
    stack = await remote_stack(fail_statuses=[429, 429])
    async with stack.openai() as client:
        with pytest.raises(openai.RateLimitError) as info:
            await client.chat.completions.create(**CHAT)
    assert info.value.response.headers["retry-after"] == "1"
    assert info.value.body["type"] == "rate_limit_error"  # type: ignore[index]
    assert "upstream of model 'hosted' is rate limiting" in info.value.message


async def test_500_on_every_replica_falls_back_to_the_local_node(remote_stack) -> None:
    stack = await remote_stack(n_upstreams=2, fail_statuses=[500])
    stack.steer("remote")
    r = await _post(stack, {**CHAT, "model": "auto"})
    assert r.status_code == 200
    assert r.headers["x-octograph-route"] == "root>remote>fallback:general"
    assert r.json()["choices"][0]["message"]["content"].startswith("fake answer")
    assert all(not rep.healthy for rep in stack.pool.replicas)
    # Within the cooldown, a direct request gets a 503 at once, without calling upstream.
    calls = sum(len(up.calls) for up in stack.upstreams)
    direct = await _post(stack, CHAT)
    assert direct.status_code == 503 and "no healthy replica" in direct.json()["error"]["message"]
    assert sum(len(up.calls) for up in stack.upstreams) == calls


async def test_500_direct_is_a_502_in_the_gateway_error_body(remote_stack) -> None:
    stack = await remote_stack(fail_statuses=[500])
    r = await _post(stack, CHAT)
    assert r.status_code == 502
    err = r.json()["error"]
    assert err["type"] == "upstream_error" and "HTTP 500" in err["message"]
    assert set(err) == {"message", "type", "param", "code"}


async def test_client_error_keeps_the_upstream_message_and_is_not_retried(remote_stack) -> None:
    stack = await remote_stack(n_upstreams=2)
    for up in stack.upstreams:
        up.fail_statuses = [400]
    r = await _post(stack, CHAT)
    assert r.status_code == 400 and r.json()["error"]["message"] == "upstream says 400"
    assert sum(len(up.calls) for up in stack.upstreams) == 1
    assert all(rep.healthy for rep in stack.pool.replicas)


async def test_slow_upstream_times_out_with_504(remote_stack) -> None:
    stack = await remote_stack(read_timeout_s=0.3, delay_s=3.0)
    t0 = time.monotonic()
    async with stack.openai() as client:
        with pytest.raises(openai.APIStatusError) as info:
            await asyncio.wait_for(client.chat.completions.create(**CHAT), 30)
    # The upstream does answer (200, after 3 s): a 504 means the gateway gave up first, so no
    # wall-clock upper bound is needed; the lower one says it did not give up early.
    assert time.monotonic() - t0 >= 0.3
    assert info.value.status_code == 504 and info.value.body["type"] == "timeout"  # type: ignore[index]
    assert not stack.pool.replicas[0].healthy  # counted against the replica


async def test_dropped_connection_mid_stream_ends_with_error_event(remote_stack) -> None:
    stack = await remote_stack(drop_after_chunks=3)
    r = await _post(stack, {**CHAT, "stream": True})
    events = sse_events(r.text)
    assert events[-1] == "DONE"
    texts = [e["choices"][0]["delta"].get("content", "") for e in events[:-2]]
    assert "".join(texts) == "Hello from the"
    assert events[-2]["error"]["type"] == "upstream_error"
    assert "broke" in events[-2]["error"]["message"]
    async with stack.openai() as client:  # the official client raises on the error event
        stream = await client.chat.completions.create(**CHAT, stream=True)
        with pytest.raises(openai.APIError, match="broke"):
            async for _ in stream:
                pass


async def test_dropped_before_first_chunk_is_retried_then_an_http_error(remote_stack) -> None:
    """Nothing reached the client: the drop is retried on the other replica, and when that one
    drops too the client gets a plain HTTP error, not a broken stream."""
    stack = await remote_stack(n_upstreams=2, drop_after_chunks=0)
    r = await _post(stack, {**CHAT, "stream": True})
    assert r.status_code == 502 and r.json()["error"]["type"] == "upstream_error"
    assert [len(up.calls) for up in stack.upstreams] == [1, 1]
    assert all(not rep.healthy for rep in stack.pool.replicas)


async def test_in_stream_error_event_is_mapped(remote_stack) -> None:
    stack = await remote_stack(error_after_chunks=2)
    events = sse_events((await _post(stack, {**CHAT, "stream": True})).text)
    assert events[-1] == "DONE"
    assert events[-2]["error"]["type"] == "upstream_error"
    # The upstream's own words stay in the gateway's log (issue 17 item 10).
    message = events[-2]["error"]["message"]
    assert "hosted" in message and "engine died" not in message


async def test_bad_key_is_a_502_that_names_the_setting(remote_stack) -> None:
    stack = await remote_stack(n_upstreams=2)
    for up in stack.upstreams:
        up.api_key = "sk-other"
    r = await _post(stack, CHAT)
    assert r.status_code == 502
    err = r.json()["error"]
    assert err["code"] == "upstream_auth" and "api_key_env" in err["message"]
    assert KEY not in r.text
    assert sum(len(up.calls) for up in stack.upstreams) == 1  # not retried
    assert all(rep.healthy for rep in stack.pool.replicas)  # the server itself is fine


async def test_concurrency_limit_refuses_with_429(remote_stack) -> None:
    stack = await remote_stack(max_concurrency=1)
    gate = asyncio.Event()
    stack.upstreams[0].gate = gate
    async with httpx.AsyncClient(base_url=stack.url, timeout=10, trust_env=False) as client:
        held = asyncio.create_task(
            client.post("/v1/chat/completions", json={**CHAT, "stream": True})
        )
        while stack.upstreams[0].open_streams == 0:
            await asyncio.sleep(0.01)
        r = await client.post("/v1/chat/completions", json=CHAT)
        assert r.status_code == 429 and "max_concurrency" in r.json()["error"]["message"]
        gate.set()
        assert (await held).status_code == 200
    r = await _post(stack, CHAT)
    assert r.status_code == 200  # the slot was released


async def test_client_disconnect_closes_the_upstream_stream(remote_stack) -> None:
    stack = await remote_stack(words=100000, token_delay_s=0.005)
    up = stack.upstreams[0]
    body = {**CHAT, "stream": True, "max_tokens": 100000}
    async with (
        httpx.AsyncClient(base_url=stack.url, timeout=10, trust_env=False) as client,
        client.stream("POST", "/v1/chat/completions", json=body) as r,
    ):
        async for _ in r.aiter_lines():
            break  # the first chunk arrived; now the client goes away
    t0 = time.monotonic()  # deadlines for conditions, generous: a busy machine is slow
    while up.closed_streams == 0:
        assert time.monotonic() - t0 < 10.0, "the upstream stream was not closed"
        await asyncio.sleep(0.01)
    while stack.app.state.gateway.pipeline.admission.inflight:
        assert time.monotonic() - t0 < 10.0, "the node's admission slot was not released"
        await asyncio.sleep(0.01)
    assert stack.pool.replicas[0].inflight == 0


async def test_readyz_reports_the_upstream(remote_stack) -> None:
    stack = await remote_stack()
    r = await httpx.AsyncClient(base_url=stack.url).get("/readyz")
    assert r.json()["models"]["hosted"] is True


# -- the pieces -------------------------------------------------------------------------------


def test_sse_payload_reads_data_lines_only() -> None:
    assert sse_payload(b'data: {"a":1}') == b'{"a":1}'
    assert sse_payload(b"data:[DONE]\r") == b"[DONE]"  # no space, CRLF line ends
    assert sse_payload(b": keep-alive") is None
    assert sse_payload(b"event: message") is None


def test_chunk_rewriter_swaps_bytes_and_falls_back_to_decoding() -> None:
    rw = ChunkRewriter("chatcmpl-gw", "auto", {"route": ["a"]})
    first = json.loads(rw.first(b'{"id": "up-1", "model": "m", "choices": []}'))
    assert first == {
        "id": "chatcmpl-gw",
        "model": "auto",
        "choices": [],
        "octograph": {"route": ["a"]},
    }
    out = rw(b'{"id": "up-1", "model": "m", "choices": [{"delta": {"content": "\\"id\\": x"}}]}')
    assert out == (
        b'{"id":"chatcmpl-gw", "model":"auto", "choices": [{"delta": {"content": "\\"id\\": x"}}]}'
    )
    assert rw.slow_chunks == 0
    changed = json.loads(rw(b'{"id":"up-2","model":"m","choices":[]}'))
    assert changed["id"] == "chatcmpl-gw" and rw.slow_chunks == 1
