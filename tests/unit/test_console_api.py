"""The graph console: its recorder alone (bounded, windowed), and its API on a fake stack
(shapes, health, stats after real requests, auth, the OpenAPI schema)."""

from __future__ import annotations

import asyncio
import time

import pytest

from service.errors import BadRequest, Unavailable, UpstreamError
from service.gateway.console.stats import ConsoleStats, classify, percentile
from service.gateway.routing import RouteResult
from service.graph.functional_tokens import assign_tokens
from tests.conftest import sse_events


class Clock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def decision(route: list[str], probs: list[dict[str, float]], seconds: float = 0.01) -> RouteResult:
    return RouteResult(node=route[-1], route=route, scores=probs, seconds=seconds)


# -- the recorder alone ---------------------------------------------------------------------


def test_percentile_nearest_rank() -> None:
    assert percentile([], 0.5) is None
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 0.5) == 50.0
    assert percentile(values, 0.99) == 99.0
    assert percentile([7.0], 0.99) == 7.0


def test_requests_are_counted_over_a_sliding_window() -> None:
    clock = Clock()
    stats = ConsoleStats(["math"], window_s=60, clock=clock)
    for i in range(10):
        stats.record_request("math", 0.1 * (i + 1), "ok")
        clock.t += 1
    stats.record_request("math", 5.0, "error")
    snap = stats.node("math")
    assert snap.requests_window == 11 and snap.errors_window == 1
    # Latency of successful requests only.
    assert snap.p50_s == pytest.approx(0.5) and snap.p99_s == pytest.approx(1.0)
    clock.t += 120  # two minutes later: the window is empty, the totals stay
    snap = stats.node("math")
    assert (snap.requests_window, snap.errors_window, snap.p50_s) == (0, 0, None)
    assert (snap.requests_total, snap.errors_total) == (11, 1)


def test_memory_is_bounded() -> None:
    clock = Clock()
    stats = ConsoleStats(
        ["root", "math"], window_s=60, latency_samples=50, max_decisions=200, clock=clock
    )
    for i in range(5000):
        clock.t += 0.05
        stats.record_request("math", 0.01, "ok")
        stats.record_decision(decision(["root", "math"], [{"math": 0.9}], seconds=i))
        stats.record_request(f"made-up-{i}", 0.01, "ok")  # ids outside the graph are dropped
    series = stats._series["math"]
    assert len(series.latencies) == 50
    assert len(series.buckets) <= 61
    assert len(stats.decisions()) == 200
    assert stats.decisions()[0].seconds == 4999  # newest first
    assert set(stats._series) == {"root", "math"}
    # 20 requests a second over a 60 s window (the current second is partial).
    assert 59 * 20 <= stats.node("math").requests_window <= 60 * 20


def test_decisions_count_for_routers_and_filter_by_node() -> None:
    stats = ConsoleStats(["root", "science", "physics", "math"])
    stats.record_decision(
        decision(
            ["root", "science", "physics"], [{"science": 0.8, "math": 0.2}, {"physics": 1.0}], 0.004
        )
    )
    stats.record_decision(decision(["root", "math"], [{"science": 0.1, "math": 0.9}]))
    stats.record_decision(RouteResult(node="math", route=["math"]))  # addressed directly
    routes = [d.route for d in stats.decisions()]
    assert routes == [("root", "math"), ("root", "science", "physics")]
    assert [d.route for d in stats.decisions("science")] == [("root", "science", "physics")]
    assert stats.decisions(limit=1)[0].node == "math"
    assert stats.node("root").requests_window == 2
    assert stats.node("science").requests_window == 1
    assert stats.node("science").p50_s == pytest.approx(0.004)
    assert stats.node("physics").requests_window == 0  # counted when its request finishes


def test_a_fallback_counts_an_error_on_the_node_that_failed() -> None:
    stats = ConsoleStats(["root", "math", "general"])
    stats.record_request("general", 0.2, "ok", ["root", "math", "fallback:general"])
    assert stats.node("math").errors_window == 1
    assert stats.node("general").requests_window == 1
    assert stats.node("general").errors_window == 0


def test_classify() -> None:
    assert classify(None) == "ok"
    assert classify(Unavailable("down")) == "error"
    assert classify(BadRequest("too long")) == "client_error"
    assert classify(asyncio.CancelledError()) == "cancelled"
    assert classify(asyncio.CancelledError(), deadline_passed=True) == "error"
    assert classify(RuntimeError("bug")) == "error"


def test_observer_records_once_however_the_request_ends() -> None:
    """The request's observer is what feeds the console now (one per request, the end
    recorded exactly once): ok, failed, and a client that went away."""
    from prometheus_client import CollectorRegistry

    from service.gateway.observer import Observers, RequestObserver
    from service.observability.metrics import GatewayMetrics

    clock = Clock()
    stats = ConsoleStats(["math"], clock=clock)
    sinks = Observers(GatewayMetrics(CollectorRegistry()), stats, frozenset({"math"}))
    for failure in (None, UpstreamError("worker died"), asyncio.CancelledError()):
        obs = RequestObserver(sinks, "r", time.monotonic(), time.monotonic() + 100)
        obs.routed(RouteResult(node="math", route=["math"]))
        obs.running("math", "model")
        obs.finished(failure)
        obs.finished(None)  # a second end is ignored
    snap = stats.node("math")
    assert (snap.requests_total, snap.errors_total) == (3, 1)


# -- the API on a fake stack ----------------------------------------------------------------


async def test_graph_shape_tokens_and_health(make_stack) -> None:
    stack = await make_stack()
    r = await stack.client.get("/console/api/graph")
    assert r.status_code == 200
    body = r.json()
    assert body["root"] == "root"
    nodes = {n["id"]: n for n in body["nodes"]}
    assert set(nodes) == set(stack.graph.nodes)
    tokens = assign_tokens(stack.graph)
    root = nodes["root"]
    assert root["kind"] == "router" and root["model"] == "routerm"
    assert root["fallback"] == "general"
    assert root["children"] == [
        {"node": c, "token": f"<nexa_{tokens[c]}>"} for c in ("math", "science", "general")
    ]
    assert nodes["physics"]["kind"] == "model" and nodes["physics"]["children"] == []
    for n in nodes.values():
        assert n["health"] == "healthy"
        assert all(m["up"] == m["total"] == 1 for m in n["models"])
    assert {m["model"] for m in body["models"]} == {"alpha", "beta", "routerm"}


async def test_health_follows_the_replicas(make_stack) -> None:
    stack = await make_stack(replicas={"beta": 2})
    await stack.workers["beta"][0].stop()
    nodes: dict[str, dict[str, object]] = {}
    for _ in range(100):  # probes every 0.2 s
        body = (await stack.client.get("/console/api/graph")).json()
        nodes = {n["id"]: n for n in body["nodes"]}
        if nodes["physics"]["health"] == "degraded":
            break
        await asyncio.sleep(0.05)
    assert nodes["physics"]["health"] == "degraded"
    assert nodes["physics"]["models"] == [{"model": "beta", "up": 1, "total": 2}]
    assert nodes["math"]["health"] == "healthy"
    await stack.workers["beta"][1].stop()
    for _ in range(100):
        body = (await stack.client.get("/console/api/graph")).json()
        nodes = {n["id"]: n for n in body["nodes"]}
        if nodes["biology"]["health"] == "down":
            break
        await asyncio.sleep(0.05)
    assert nodes["biology"]["health"] == "down"


def _steer(stack, *wanted: str) -> None:
    ids = {49_000 + k: node for node, k in assign_tokens(stack.graph).items()}
    stack.engine("routerm").score_hook = lambda _text, cands: {
        i: (-0.01 if ids.get(i) in wanted else -5.0) for i in cands
    }


async def test_stats_after_requests(make_stack) -> None:
    stack = await make_stack()
    _steer(stack, "science", "physics")
    chat = {"model": "auto", "messages": [{"role": "user", "content": "quarks?"}]}
    assert (await stack.client.post("/v1/chat/completions", json=chat)).status_code == 200
    r = await stack.client.post("/v1/chat/completions", json={**chat, "stream": True})
    assert sse_events(r.text)[-1] == "DONE"
    r = await stack.client.post("/v1/route", json={"model": "auto", "prompt": "quarks?"})
    assert r.json()["node"] == "physics"
    math = {"model": "math", "messages": [{"role": "user", "content": "1+1"}]}
    assert (await stack.client.post("/v1/chat/completions", json=math)).status_code == 200

    r = await stack.client.get("/console/api/stats")
    assert r.status_code == 200
    body = r.json()
    assert body["window_s"] == 60
    rows = {n["node"]: n for n in body["nodes"]}
    assert set(rows) == set(stack.graph.nodes)
    assert rows["physics"]["requests_1m"] == 2 and rows["physics"]["errors_1m"] == 0
    assert rows["physics"]["p50_ms"] > 0 and rows["physics"]["p99_ms"] >= rows["physics"]["p50_ms"]
    assert rows["root"]["requests_1m"] == 3  # two chats and one /v1/route were routed
    assert rows["math"]["requests_1m"] == 1  # addressed by id: a request, no decision
    assert rows["biology"]["requests_1m"] == 0 and rows["biology"]["p50_ms"] is None
    decisions = body["decisions"]
    assert len(decisions) == 3
    d = decisions[0]
    assert d["route"] == ["root", "science", "physics"] and d["node"] == "physics"
    assert set(d["scores"][0]) == {"math", "science", "general"}
    assert max(d["scores"][0], key=d["scores"][0].get) == "science"
    assert d["scores"][1]["physics"] > 0.9
    assert d["latency_ms"] >= 0 and d["at"] > 1.6e9

    r = await stack.client.get("/console/api/stats", params={"node": "math"})
    body = r.json()
    assert [n["node"] for n in body["nodes"]] == ["math"]
    assert body["decisions"] == []  # math was addressed directly, never routed to
    r = await stack.client.get("/console/api/stats", params={"node": "science", "limit": 1})
    assert len(r.json()["decisions"]) == 1
    r = await stack.client.get("/console/api/stats", params={"node": "nope"})
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"


async def test_errors_are_counted_per_node(make_stack) -> None:
    stack = await make_stack()
    stack.engine("alpha").fail_after_tokens = 2
    math = {"model": "math", "messages": [{"role": "user", "content": "1+1"}]}
    r = await stack.client.post("/v1/chat/completions", json={**math, "stream": True})
    assert any(isinstance(e, dict) and "error" in e for e in sse_events(r.text))
    r = await stack.client.post("/v1/chat/completions", json=math)
    assert r.status_code >= 500
    # Refused by the worker (context too long): the client's fault, not the node's.
    stack.engine("alpha").fail_after_tokens = None
    long = {"model": "math", "messages": [{"role": "user", "content": "x " * 400}]}
    assert (await stack.client.post("/v1/chat/completions", json=long)).status_code == 400
    row = (await stack.client.get("/console/api/stats", params={"node": "math"})).json()["nodes"][0]
    assert (row["requests_1m"], row["errors_1m"], row["errors_total"]) == (3, 2, 2)


async def _raw_get(url: str, path: str) -> tuple[int, bytes]:
    """GET `path` byte for byte as written (no client-side normalisation of the path)."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(f"GET {path} HTTP/1.1\r\nhost: {host}\r\nconnection: close\r\n\r\n".encode())
    data = await reader.read()
    writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


async def test_page_and_assets_open_api_behind_keys(make_stack) -> None:
    stack = await make_stack(api_keys=["s3cret"])
    page = await stack.client.get("/console")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "/console/static/console.js" in page.text
    assert "frame-ancestors 'none'" in page.headers["content-security-policy"]
    for name, media in (("console.js", "text/javascript"), ("console.css", "text/css")):
        r = await stack.client.get(f"/console/static/{name}")
        assert r.status_code == 200 and r.headers["content-type"].startswith(media)
    assert (await stack.client.get("/console/static/missing.js")).status_code == 404
    assert (await stack.client.get("/console/static/stats.py")).status_code == 404
    # Only the static shell is open: data, and paths that merely start like it, are not.
    for path in ("/console/api/graph", "/console/api/stats", "/console/", "/v1/models"):
        r = await stack.client.get(path)
        assert r.status_code == 401, path
        assert "nodes" not in r.text
    # A path under the open static prefix that climbs out of it (sent raw: httpx would
    # normalise the dots away) passes the key check by its prefix, then matches no route:
    # 404, and no data.
    for path in (
        "/console/static/../api/graph",
        "/console/static/%2e%2e/api/graph",
        "/console/static/../../v1/models",
    ):
        status, body = await _raw_get(stack.url, path)
        assert status == 404, path
        assert b"nodes" not in body and b'"data"' not in body, path
    r = await stack.client.get("/console/api/graph")
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    auth = {"Authorization": "Bearer s3cret"}
    assert (await stack.client.get("/console/api/graph", headers=auth)).status_code == 200
    assert (await stack.client.get("/console/api/stats", headers=auth)).status_code == 200
    bad = {"Authorization": "Bearer nope"}
    assert (await stack.client.get("/console/api/stats", headers=bad)).status_code == 401


async def test_openapi_documents_the_console_api(make_stack) -> None:
    stack = await make_stack()
    schema = (await stack.client.get("/openapi.json")).json()
    paths = schema["paths"]
    assert "/console" not in paths and "/console/static/{name}" not in paths
    graph_ref = paths["/console/api/graph"]["get"]["responses"]["200"]["content"][
        "application/json"
    ]["schema"]["$ref"]
    assert graph_ref.endswith("/ConsoleGraph")
    stats_op = paths["/console/api/stats"]["get"]
    assert {p["name"] for p in stats_op["parameters"]} == {"node", "limit"}
    assert stats_op["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].endswith(
        "/ConsoleStatsResponse"
    )
    components = schema["components"]["schemas"]
    for name in ("ConsoleNode", "ConsoleChild", "ModelHealth", "NodeStats", "RoutingDecision"):
        assert name in components


class _Replica:
    def __init__(self, up: bool) -> None:
        self.up = up

    def available(self, _now: float) -> bool:
        return self.up


def test_graph_view_marks_remote_nodes_and_combines_member_health() -> None:
    from types import SimpleNamespace

    from service.gateway.console.view import graph_view
    from service.graph.schema import parse_graph

    graph = parse_graph("""
models:
  local: {engine: fake}
  other: {engine: fake}
  hosted: {kind: openai, base_url: "http://127.0.0.1:9/v1", model: big-model}
  routerm: {engine: fake}
root: root
nodes:
  root: {kind: router, model: routerm, children: [near, far, both]}
  near: {kind: model, model: local}
  far: {kind: model, model: hosted}
  both:
    kind: ensemble
    members: [{model: local, weight: 3}, {model: other, weight: 1}]
""")
    pools = SimpleNamespace(
        pools={
            "local": SimpleNamespace(replicas=[_Replica(True), _Replica(False)]),
            "other": SimpleNamespace(replicas=[_Replica(False)]),
            "hosted": SimpleNamespace(replicas=[_Replica(True)]),
            # routerm: no pool at all
        }
    )
    nodes = {n.id: n for n in graph_view(graph, pools).nodes}  # type: ignore[arg-type]
    assert nodes["far"].remote and nodes["far"].health == "healthy"
    assert not nodes["near"].remote and nodes["near"].health == "degraded"
    assert nodes["both"].health == "down"  # one member without a replica takes it down
    assert [(m.model, m.weight) for m in nodes["both"].members] == [("local", 3), ("other", 1)]
    assert nodes["root"].health == "unknown"
