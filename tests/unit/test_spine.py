"""The request spine, end to end on one gateway serving every node kind: local model nodes,
a byte-level ensemble, a remote (`kind: openai`) node and routers, with fake workers and a fake
OpenAI-compatible upstream served on loopback.

Each test pins a guarantee the spine owns (and that drifted when each node kind had its own
path): every accepted sampling field honoured or refused by name, echo with several prompts,
fallback between any two kinds, leases released however a request ends, node defaults applied
the same way for every kind, every README metric recorded, and admission by cost.
"""

from __future__ import annotations

import asyncio
import copy
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from service.gateway.plan import RequestContext, plan_completion
from service.graph.schema import parse_graph
from service.protocol.openai import CompletionRequest
from tests.conftest import sse_events


def chat(model: str, **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hello there"}], **extra}


async def settle(condition: Callable[[], bool], timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.02)


# -- the plan: every accepted field honoured or refused by name ----------------------------------

SAMPLING = {
    "temperature": 0.5,
    "top_p": 0.9,
    "max_tokens": 5,
    "seed": -7,
    "stop": ["zzz"],
    "presence_penalty": 0.5,
    "frequency_penalty": -0.25,
    "repetition_penalty": 1.2,
    "min_tokens": 2,
    "logit_bias": {"17": 3.0},
    "ignore_eos": True,
    "n": 2,
}


async def test_every_sampling_field_reaches_a_local_worker(spine: Any) -> None:
    stack = await spine()
    r = await stack.post(chat("general", **SAMPLING))
    assert r.status_code == 200, r.text
    sent = stack.engines["alpha"].requests[-1].sampling
    assert sent.temperature == 0.5 and sent.top_p == 0.9 and sent.max_tokens == 5
    assert sent.seed == -7 and sent.stop == ["zzz"] and sent.n == 2 and sent.ignore_eos
    assert sent.presence_penalty == 0.5 and sent.frequency_penalty == -0.25
    assert sent.repetition_penalty == 1.2 and sent.min_tokens == 2
    assert sent.logit_bias == {17: 3.0}


@pytest.mark.parametrize(
    "field", ["presence_penalty", "frequency_penalty", "repetition_penalty", "logit_bias"]
)
async def test_token_fields_on_a_byte_level_node_are_a_400_naming_them(
    spine: Any, field: str
) -> None:
    stack = await spine()
    r = await stack.post(chat("blend", max_tokens=4, **{field: SAMPLING[field]}))
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == field and field in r.json()["error"]["message"]


async def test_every_sampling_field_reaches_a_remote_node(spine: Any) -> None:
    stack = await spine()
    body = chat("remote", store=True, service_tier="priority", vllm_xargs={"x": 1}, **SAMPLING)
    r = await stack.post(body)
    assert r.status_code == 200, r.text
    seen = stack.upstream.calls[-1]
    for name in ("temperature", "top_p", "max_tokens", "seed", "stop", "n"):
        assert seen[name] == SAMPLING[name], name
    assert seen["presence_penalty"] == 0.5 and seen["logit_bias"] == {"17": 3.0}
    # Fields the gateway does not support never reach the operator's upstream.
    assert not {"store", "service_tier", "vllm_xargs"} & seen.keys()


# -- echo ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
async def test_echo_with_several_prompts_and_n_prefixes_each_choice_with_its_prompt(
    spine: Any, stream: bool
) -> None:
    stack = await spine()
    body = {
        "model": "general",
        "prompt": ["alpha one", "beta two", "gamma three"],
        "n": 2,
        "echo": True,
        "max_tokens": 3,
        "stream": stream,
    }
    r = await stack.post(body, "/v1/completions")
    assert r.status_code == 200, r.text
    texts: dict[int, str] = {}
    if stream:
        for ev in sse_events(r.text):
            if ev != "DONE":
                for c in ev["choices"]:
                    texts[c["index"]] = texts.get(c["index"], "") + c["text"]
    else:
        texts = {c["index"]: c["text"] for c in r.json()["choices"]}
    assert sorted(texts) == list(range(6))
    for index, text in texts.items():
        prompt = body["prompt"][index // 2]  # type: ignore[index]
        assert text.startswith(prompt), (index, text)
        assert text.endswith(prompt.split()[-1]) is False or len(text) > len(prompt)


# -- node defaults, one mapping for every kind --------------------------------------------------


async def test_node_max_tokens_default_applies_to_local_completions(spine: Any) -> None:
    stack = await spine()
    r = await stack.post({"model": "capped", "prompt": "count with me"}, "/v1/completions")
    assert r.status_code == 200, r.text
    sent = stack.engines["alpha"].requests[-1].sampling
    assert sent.max_tokens == 3 and sent.temperature == 0.25
    assert r.json()["usage"]["completion_tokens"] <= 3
    # The client's own value wins; with neither, the OpenAI default for completions (16).
    await stack.post({"model": "capped", "prompt": "x", "max_tokens": 9}, "/v1/completions")
    assert stack.engines["alpha"].requests[-1].sampling.max_tokens == 9
    await stack.post({"model": "general", "prompt": "x"}, "/v1/completions")
    assert stack.engines["alpha"].requests[-1].sampling.max_tokens == 16


async def test_node_max_tokens_default_applies_to_remote_completions(spine: Any) -> None:
    stack = await spine()
    r = await stack.post({"model": "remote", "prompt": "count with me"}, "/v1/completions")
    assert r.status_code == 200, r.text
    assert stack.upstream.calls[-1]["max_tokens"] == 7


# -- fallback between any two kinds ---------------------------------------------------------------


async def test_a_failing_local_node_falls_back_to_a_remote_node(spine: Any) -> None:
    stack = await spine()
    stack.steer("general")
    stack.engines["alpha"]._ready = False  # the worker answers 503: "still loading"
    for streamed in (False, True):
        r = await stack.post(chat("to_remote", stream=streamed))
        assert r.status_code == 200, r.text
        assert r.headers["x-octograph-route"] == "to_remote>general>fallback:remote"
        if not streamed:
            assert r.json()["octograph"]["route"][-1] == "fallback:remote"
    assert stack.upstream.calls, "the remote node answered"
    # Released when each reply ends (a stream's just after its last byte is sent).
    await settle(lambda: all(v == 0 for v in stack.inflight().values()))


async def test_a_failing_remote_node_falls_back_to_a_local_node(spine: Any) -> None:
    stack = await spine()
    stack.steer("remote")
    stack.upstream.fail_statuses = [500, 500, 500, 500]
    r = await stack.post(chat("auto"))
    assert r.status_code == 200, r.text
    assert r.headers["x-octograph-route"] == "root>remote>fallback:general"
    assert r.json()["choices"][0]["message"]["content"].startswith("fake answer")


# -- leases: released however a request ends ----------------------------------------------------


async def test_a_failing_later_prompt_leaks_no_replica_lease(spine: Any) -> None:
    stack = await spine()
    too_long = " ".join(["word"] * 600)  # past alpha's 512-token context: the worker's 400
    for _ in range(5):
        r = await stack.post(
            {"model": "general", "prompt": ["fine", too_long], "max_tokens": 2},
            "/v1/completions",
        )
        assert r.status_code == 400, r.text
    assert all(v == 0 for v in stack.inflight().values()), stack.inflight()
    assert stack.state.pipeline.admission.inflight == 0
    assert stack.state.pipeline.admission.by_node == {}


async def test_a_reply_never_read_releases_everything(spine: Any) -> None:
    """A streamed reply whose client leaves before the first chunk: the stream generator never
    starts, so nothing may depend on its `finally` (the old leak)."""
    stack = await spine()
    pipeline = stack.state.pipeline
    for model in ("general", "remote", "blend"):
        req = CompletionRequest(model=model, prompt=["a b", "c d"], stream=True, max_tokens=3)
        plan = plan_completion(req, RequestContext("r", time.monotonic() + 30))
        reply = await pipeline.handle(plan)
        assert reply.stream is not None
        assert sum(stack.inflight().values()) > 0 or model == "blend"
        await reply.aclose()
        assert all(v == 0 for v in stack.inflight().values()), (model, stack.inflight())
        assert pipeline.admission.inflight == 0 and pipeline.admission.by_node == {}
        assert stack.sample("octograph_requests_total", node=model, status_class="cancelled") == 1.0


async def test_client_disconnects_release_leases_on_every_kind(spine: Any) -> None:
    stack = await spine()
    stack.engines["alpha"].token_delay_s = 0.05
    stack.engines["beta"].token_delay_s = 0.05
    for model in ("general", "remote", "blend"):
        async with httpx.AsyncClient(base_url=stack.url, timeout=30, trust_env=False) as c:
            body = chat(model, stream=True, max_tokens=40)
            async with c.stream("POST", "/v1/chat/completions", json=body) as r:
                assert r.status_code == 200
                async for _ in r.aiter_bytes():
                    break  # leave after the first chunk
        await settle(lambda: all(v == 0 for v in stack.inflight().values()))
        await settle(lambda: stack.state.pipeline.admission.inflight == 0)


# -- observation: every README metric moves ------------------------------------------------------


async def test_every_request_metric_is_recorded_with_its_labels(spine: Any) -> None:
    stack = await spine()
    stack.steer("general")
    cases = [
        (chat("general"), "general"),  # local, direct
        (chat("general", stream=True), "general"),
        (chat("auto"), "general"),  # routed
        (chat("remote"), "remote"),
        (chat("remote", stream=True, stream_options={"include_usage": True}), "remote"),
        (chat("blend", max_tokens=8), "blend"),
        (chat("blend", max_tokens=8, stream=True), "blend"),
    ]
    for body, node in cases:
        r = await stack.post(body)
        assert r.status_code == 200, r.text
        assert r.headers["x-octograph-route"].endswith(node)
    for node, count in (("general", 3), ("remote", 2), ("blend", 2)):
        assert stack.sample("octograph_requests_total", node=node, status_class="2xx") == count
        assert stack.sample("octograph_request_duration_seconds_count", node=node) == count
        assert stack.sample("octograph_ttft_seconds_count", node=node) == count
        assert stack.sample("octograph_completion_tokens_total", node=node) > 0
    assert stack.sample("octograph_ensemble_bytes_per_second", node="blend") > 0
    assert stack.sample("octograph_routing_decisions_total", router="root", node="general") == 1
    # One failing request: the worker's engine is down and no fallback is left.
    stack.engines["alpha"]._ready = False
    r = await stack.post(chat("general"))
    assert r.status_code == 503
    assert stack.sample("octograph_requests_total", node="general", status_class="5xx") == 1
    assert (
        stack.sample("octograph_request_errors_total", node="general", reason="service_unavailable")
        == 1
    )
    assert stack.sample("octograph_gateway_inflight_requests") == 0


# -- admission by cost --------------------------------------------------------------------------


async def test_a_fan_out_over_the_request_cap_is_a_400(spine: Any) -> None:
    stack = await spine()
    r = await stack.post(
        {"model": "general", "prompt": ["x"] * 64, "n": 8, "max_tokens": 1}, "/v1/completions"
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    assert "512 sequences" in r.json()["error"]["message"]
    r = await stack.post({"model": "general", "prompt": [[1, 2]] * 2000}, "/v1/completions")
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    assert stack.engines["alpha"].requests == []  # nothing reached a worker


async def test_a_request_takes_at_most_half_a_workers_batch(spine: Any) -> None:
    """A fan-out that filled a worker's batch would queue every other client's request in the
    engine for whole generations; at most half of it leaves room to join the next step."""
    stack = await spine()
    stack.engines["alpha"].max_num_seqs = 8
    pool = stack.state.pools.workers["alpha"]
    replica = pool.replicas[0]
    replica.info = None  # the next probe reads the worker's info again, batch included
    await settle(lambda: replica.info is not None)
    assert replica.info.max_num_seqs == 8 and pool.request_sequence_cap() == 4
    body = {"model": "general", "prompt": ["a", "b"], "n": 3, "max_tokens": 1}
    r = await stack.post(body, "/v1/completions")  # 6 sequences > 4
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == "n" and "at most 4 sequences" in error["message"], error
    assert stack.engines["alpha"].requests == []  # refused before any worker call
    r = await stack.post({**body, "n": 2}, "/v1/completions")  # 4: served
    assert r.status_code == 200, r.text
    assert len(r.json()["choices"]) == 4


async def test_a_larger_fan_out_gets_a_later_place_in_the_engines_queue(spine: Any) -> None:
    stack = await spine()
    for prompts, n in ((["a"], 1), (["a", "b"], 1), (["a", "b"], 4), (["a"] * 16, 4)):
        body = {"model": "general", "prompt": prompts, "n": n, "max_tokens": 1}
        r = await stack.post(body, "/v1/completions")
        assert r.status_code == 200, r.text
    places = [r.priority for r in stack.engines["alpha"].requests]
    assert places == [0] + [1] * 2 + [3] * 2 + [6] * 16, places


async def test_admission_weighs_a_request_by_its_cost(spine: Any) -> None:
    stack = await spine(max_inflight_per_node=8)
    gate = asyncio.Event()
    stack.engines["alpha"].gate = gate
    body = {"model": "general", "prompt": ["a", "b", "c"], "n": 2, "max_tokens": 1}
    first = asyncio.create_task(stack.post(body, "/v1/completions"))  # 6 sequences
    await settle(lambda: stack.state.pipeline.admission.by_node.get("general") == 6)
    second = await stack.post(body, "/v1/completions")  # 6 more would be 12 > 8
    assert second.status_code == 429 and "Retry-After" in second.headers
    small = asyncio.create_task(stack.post({**body, "prompt": "d"}, "/v1/completions"))
    await settle(lambda: stack.state.pipeline.admission.by_node.get("general") == 8)
    gate.set()
    assert (await first).status_code == 200 and (await small).status_code == 200
    assert stack.sample("octograph_admission_rejected_total", scope="node") == 1


async def test_a_workers_busy_connections_never_mark_it_down(spine: Any) -> None:
    stack = await spine()
    gate = asyncio.Event()
    stack.engines["alpha"].gate = gate
    replica = stack.state.pools.workers["alpha"].replicas[0]
    streams = replica.client._streams
    streams.max_connections = 2
    streams.connect_timeout_s = 0.2
    streams._slots = None  # the pool's semaphore is built lazily with max_connections
    held = [asyncio.create_task(stack.post(chat("general"))) for _ in range(2)]
    await settle(lambda: len(stack.engines["alpha"].running) == 2)
    r = await stack.post(chat("general"))
    assert r.status_code == 429, r.text
    assert "127.0.0.1" not in r.text  # the worker's address never reaches a client
    assert replica.healthy and replica.failures == 0
    gate.set()
    assert all(t.status_code == 200 for t in await asyncio.gather(*held))


def test_plan_copies_nothing_it_does_not_need() -> None:
    """The plan is built once from the request; sampling is mapped in one method."""
    req = CompletionRequest(model="m", prompt=["a", "b"], n=3, echo=True, max_tokens=2)
    plan = plan_completion(req, RequestContext("client-id", time.monotonic() + 5))
    assert plan.cost == 6 and plan.reply.echo == ("a", "b")
    assert [plan.reply.prompt_of(i) for i in range(6)] == [0, 0, 0, 1, 1, 1]
    assert plan.reply.response_id.startswith("cmpl-") and "client-id" not in plan.reply.response_id
    copied = copy.copy(plan.sampling(parse_graph(GRAPH_MIN).nodes["n"].sampling))  # type: ignore[union-attr]
    assert copied.max_tokens == 2 and copied.temperature == 0.1 and copied.n == 3


GRAPH_MIN = """
models:
  w: {engine: fake}
nodes:
  n: {kind: model, model: w, sampling: {temperature: 0.1, max_tokens: 50}}
"""
