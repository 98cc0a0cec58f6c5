"""Request-time routing against fake workers: the fake router model's scores are steered per
test (FakeEngine.score_hook), so multi-hop descent, renormalisation over a router's own
children, the threshold fallback and the API surface can be checked exactly."""

from __future__ import annotations

import time

import pytest

from service.gateway.plan import RequestContext
from service.gateway.routing import decide, scored_routers
from service.graph.functional_tokens import assign_tokens
from service.graph.schema import RouterNode, parse_graph
from tests.conftest import FAKE_GRAPH

FUNCTIONAL_BASE = 49_000  # FakeEngine: <nexa_k> is token 49_000 + k


def steer(stack, logprobs: dict[str, float], default: float = -9.0) -> list[list[int]]:
    """The router model gives node `n` the logprob `logprobs[n]`; returns the candidate ids of
    every score call, so tests can count calls and see which tokens were asked for."""
    by_id = {FUNCTIONAL_BASE + k: node for node, k in assign_tokens(stack.graph).items()}
    calls: list[list[int]] = []

    def hook(_text: str, ids: list[int]) -> dict[int, float]:
        calls.append(list(ids))
        return {i: logprobs.get(by_id.get(i, ""), default) for i in ids}

    stack.engine("routerm").score_hook = hook
    return calls


async def route(stack, query: str, model: str = "auto") -> dict:
    r = await stack.client.post("/v1/route", json={"model": model, "prompt": query})
    assert r.status_code == 200, r.text
    body = r.json()
    assert r.headers["x-octograph-route"] == ">".join(body["octograph"]["route"])
    return body


@pytest.mark.asyncio
async def test_two_hops_descend_to_a_leaf_in_one_score_call(make_stack) -> None:
    stack = await make_stack()
    calls = steer(stack, {"science": -0.1, "math": -3.0, "physics": -2.0, "biology": -0.2})
    body = await route(stack, "how do cells divide")
    assert body["node"] == "biology"
    assert body["octograph"]["route"] == ["root", "science", "biology"]
    # The router prompt is the same at every hop: one forward scores both routers' tokens.
    assert len(calls) == 1
    tokens = assign_tokens(stack.graph)
    assert sorted(calls[0]) == sorted(FUNCTIONAL_BASE + tokens[n] for n in (
        "math", "science", "general", "physics", "biology"
    ))  # fmt: skip
    root_scores, science_scores = body["octograph"]["scores"]
    assert set(root_scores) == {"math", "science", "general"}
    assert set(science_scores) == {"physics", "biology"}
    assert sum(root_scores.values()) == pytest.approx(1.0, abs=1e-4)
    assert sum(science_scores.values()) == pytest.approx(1.0, abs=1e-4)
    assert science_scores["biology"] > 0.8


@pytest.mark.asyncio
async def test_one_hop_to_a_model_node(make_stack) -> None:
    stack = await make_stack()
    steer(stack, {"math": -0.01, "science": -4.0, "general": -5.0})
    body = await route(stack, "integrate x^2")
    assert body["octograph"]["route"] == ["root", "math"]
    assert len(body["octograph"]["scores"]) == 1


@pytest.mark.asyncio
async def test_addressing_an_inner_router_starts_there(make_stack) -> None:
    stack = await make_stack()
    calls = steer(stack, {"math": -0.01, "physics": -0.5, "biology": -2.0})
    body = await route(stack, "anything", model="science")
    assert body["octograph"]["route"] == ["science", "physics"]
    tokens = assign_tokens(stack.graph)
    # Only the science router's tokens: the root's (math is the best overall) are not asked.
    assert sorted(calls[0]) == sorted(FUNCTIONAL_BASE + tokens[n] for n in ("physics", "biology"))


@pytest.mark.asyncio
async def test_low_confidence_goes_to_the_fallback(make_stack) -> None:
    graph = FAKE_GRAPH.replace("fallback: general}", "fallback: general, threshold: 0.6}")
    stack = await make_stack(graph)
    # Flat: the best child (math, 0.36) is under the threshold.
    steer(stack, {"math": -1.0, "science": -1.1, "general": -1.2})
    body = await route(stack, "hmm")
    assert body["octograph"]["route"] == ["root", "general"]
    # Confident: above the threshold, the best child wins.
    steer(stack, {"math": -0.01, "science": -6.0, "general": -6.0})
    body = await route(stack, "2+2")
    assert body["octograph"]["route"] == ["root", "math"]


@pytest.mark.asyncio
async def test_auto_chat_carries_the_route_and_routing_metrics(make_stack) -> None:
    stack = await make_stack()
    steer(stack, {"science": -0.1, "physics": -0.1, "biology": -3.0})
    chat = {"model": "auto", "messages": [{"role": "user", "content": "why is the sky blue"}]}
    r = await stack.client.post("/v1/chat/completions", json=chat)
    assert r.status_code == 200
    assert r.headers["x-octograph-route"] == "root>science>physics"
    octo = r.json()["octograph"]
    assert octo["route"] == ["root", "science", "physics"]
    assert [set(s) for s in octo["scores"]] == [
        {"math", "science", "general"}, {"physics", "biology"}
    ]  # fmt: skip
    # The leaf's own worker answered (physics runs on model beta).
    assert stack.engine("beta").generated
    metrics = (await stack.client.get("/metrics")).text
    assert 'octograph_routing_decisions_total{node="science",router="root"} 1.0' in metrics
    assert 'octograph_routing_decisions_total{node="physics",router="science"} 1.0' in metrics
    assert "octograph_routing_latency_seconds_count 1.0" in metrics


@pytest.mark.asyncio
async def test_direct_node_is_not_routed(make_stack) -> None:
    stack = await make_stack()
    calls = steer(stack, {})
    body = await route(stack, "x", model="physics")
    assert body["octograph"]["route"] == ["physics"] and not calls


@pytest.mark.asyncio
async def test_unknown_model_is_404_and_empty_query_400(make_stack) -> None:
    stack = await make_stack()
    r = await stack.client.post("/v1/route", json={"model": "nope", "prompt": "x"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    r = await stack.client.post(
        "/v1/route", json={"model": "auto", "messages": [{"role": "system", "content": "x"}]}
    )
    assert r.status_code == 400


@pytest.mark.asyncio
async def test_router_model_without_the_tokens_is_a_clear_error() -> None:
    """A worker serving a model that was not built as a router (no <nexa_k> tokens)."""
    from service.errors import ServiceError
    from service.gateway.routing import Router
    from service.observability.metrics import GatewayMetrics
    from service.worker.fake_engine import FakeEngine

    info = FakeEngine(name="routerm").info()
    info.functional_tokens = {}

    class Pool:
        def info(self):
            return info

    class Pools:
        def __getitem__(self, _model: str) -> Pool:
            return Pool()

    from prometheus_client import CollectorRegistry

    router = Router(parse_graph(FAKE_GRAPH), Pools(), GatewayMetrics(CollectorRegistry()))
    with pytest.raises(ServiceError, match="octograph router build"):
        await router.route("root", "x", RequestContext("r", time.monotonic() + 5))


def test_decide_renormalises_over_children_and_handles_missing_scores() -> None:
    graph = parse_graph(FAKE_GRAPH)
    root = graph.nodes["root"]
    assert isinstance(root, RouterNode)
    best, probs = decide(root, {"math": -5.0, "science": -5.0, "general": -5.0 + 0.6931})
    assert best == "general" and probs["general"] == pytest.approx(0.5, abs=1e-3)
    # A worker that returned no score for any child: uniform, then the first child.
    best, probs = decide(root, {"math": float("-inf"), "science": float("-inf"),
                                "general": float("-inf")})  # fmt: skip
    assert best == "math" and probs["math"] == pytest.approx(1 / 3)


def test_scored_routers_follow_the_same_model_and_prompt() -> None:
    graph = parse_graph(FAKE_GRAPH)
    assert scored_routers(graph, "root") == ["root", "science"]
    other = FAKE_GRAPH.replace(
        "science: {kind: router, model: routerm,",
        "science: {kind: router, model: routerm, prompt_format: octopus-v4,",
    )
    assert scored_routers(parse_graph(other), "root") == ["root"]


OCTOPUS_GRAPH = """
models:
  alpha: {urls: ["http://placeholder"], max_model_len: 256}
  octopus: {urls: ["http://placeholder"]}
root: root
nodes:
  root:
    kind: router
    model: octopus
    prompt_format: octopus-v4
    tokens: {math: 4, general: 16}
    children: [math, general]
    fallback: general
  math: {kind: model, model: alpha}
  general: {kind: model, model: alpha}
"""


@pytest.mark.asyncio
async def test_octopus_v4_checkpoint_tokens_and_prompt(make_stack) -> None:
    from service.graph.router_prompt import OCTOPUS_SYSTEM_PROMPT

    stack = await make_stack(OCTOPUS_GRAPH)
    calls: list[list[int]] = []

    def hook(_text: str, ids: list[int]) -> dict[int, float]:
        calls.append(list(ids))
        return {i: (-0.1 if i == FUNCTIONAL_BASE + 4 else -4.0) for i in ids}

    engine = stack.engine("octopus")
    engine.score_hook = hook
    body = await route(stack, "what is 3 * 7")
    assert body["octograph"]["route"] == ["root", "math"]
    # The released checkpoint's token numbers and its own system prompt.
    assert sorted(calls[0]) == [FUNCTIONAL_BASE + 4, FUNCTIONAL_BASE + 16]
    assert engine.scored[-1].startswith(OCTOPUS_SYSTEM_PROMPT)


OCTOPUS_REFORMAT_GRAPH = """
models:
  alpha: {urls: ["http://placeholder"], max_model_len: 256}
  octopus: {urls: ["http://placeholder"]}
root: root
nodes:
  root:
    kind: router
    model: octopus
    prompt_format: octopus-v4
    reformat: true
    tokens: {math: 3, general: 7}
    children: [math, general]
    fallback: general
  math: {kind: model, model: alpha}
  general: {kind: model, model: alpha}
"""


@pytest.mark.asyncio
async def test_reformat_true_generates_and_parses_the_octopus_call(make_stack) -> None:
    """`reformat: true` (Octopus-v4 routers): after the token is chosen, the router model
    writes the reformatted query after `<nexa_k>('` (k from the node's `tokens:` map, greedy,
    stopped at `<nexa_end>`), and the parsed query is reported by /v1/route and by the reply's
    `octograph` field. The fake router model answers as the released checkpoint does."""
    from service.graph.functional_tokens import END_TOKEN
    from service.graph.router_prompt import OCTOPUS_SYSTEM_PROMPT

    stack = await make_stack(OCTOPUS_REFORMAT_GRAPH)
    octopus = stack.engine("octopus")
    seen: list[str] = []

    def hook(text: str, ids: list[int]) -> dict[int, float]:
        seen.append(text)
        return {i: (-0.05 if i == FUNCTIONAL_BASE + 3 else -4.0) for i in ids}

    octopus.score_hook = hook
    # What Octopus-v4 writes after `<nexa_3>('`: the query, the closing `')`, the end token
    # (the gateway's stop), then anything (cut by the stop).
    octopus.reply = lambda _prepared, _index: [  # type: ignore[method-assign]
        "What",
        "is",
        "the",
        "derivative",
        "of",
        "x^3?')" + END_TOKEN,
        "ignored",
    ]
    query = "hey, quick one: derivative of x cubed??"
    body = await route(stack, query)
    assert body["node"] == "math" and body["octograph"]["route"] == ["root", "math"]
    assert body["octograph"]["reformatted_query"] == "What is the derivative of x^3?"
    # The generation the gateway asked the router model for.
    request = octopus.requests[-1]
    assert request.assistant_prefix == "<nexa_3>('"
    assert request.sampling.temperature == 0.0 and request.sampling.stop == [END_TOKEN]
    assert [(t.role, t.content) for t in request.messages or []] == [
        ("system", OCTOPUS_SYSTEM_PROMPT),
        ("user", query),
    ]
    # The same on the generation path: the reply carries it, the leaf answers.
    r = await stack.client.post(
        "/v1/chat/completions",
        json={"model": "auto", "messages": [{"role": "user", "content": query}]},
    )
    assert r.status_code == 200, r.text
    assert r.json()["octograph"]["reformatted_query"] == "What is the derivative of x^3?"
    assert r.headers["x-octograph-route"] == "root>math"
    # Without `reformat`, nothing is generated on the router model.
    plain = await make_stack(OCTOPUS_REFORMAT_GRAPH.replace("reformat: true", "reformat: false"))
    plain.engine("octopus").score_hook = hook
    body = await route(plain, query)
    assert body["octograph"]["reformatted_query"] is None
    assert plain.engine("octopus").generated == []
