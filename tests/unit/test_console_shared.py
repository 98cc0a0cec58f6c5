"""The console sees the whole deployment (issue 22): two gateway replicas share one real
`redis-server` (started here on a free port, no persistence), each publishes what its console
records and reads the merged view back; the stream and lists stay bounded and the keys expire;
with Redis gone a replica shows its own view and says so. And who sees the decisions: with API
keys set, admin keys only (issue 17)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families
from redis.asyncio import Redis

from service.config import GatewaySettings
from service.gateway.auth import ExposureError, check_exposure
from service.gateway.console.stats import ConsoleStats
from service.gateway.routing import RouteResult
from service.gateway.shared.console_feed import (
    DECISIONS_KEY,
    TOTALS_KEY,
    ConsoleFeed,
    bucket_key,
    latency_key,
)
from service.graph.functional_tokens import assign_tokens
from tests.redis_server import RedisServer, free_port


@pytest.fixture
async def redis_client(redis_server: RedisServer) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_server.url, socket_timeout=5, socket_connect_timeout=5)
    yield client
    await client.aclose()


def steer(stack: Any, *wanted: str) -> None:
    ids = {49_000 + k: node for node, k in assign_tokens(stack.graph).items()}
    stack.engine("routerm").score_hook = lambda _text, cands: {
        i: (-0.01 if ids.get(i) in wanted else -5.0) for i in cands
    }


def chat(model: str, content: str = "quarks?") -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": content}]}


async def metric(stack: Any, name: str, **labels: str) -> float:
    text = (await stack.client.get("/metrics")).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return 0.0


def rows(body: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {n["node"]: n for n in body["nodes"]}


# -- two replicas, one Redis ----------------------------------------------------------------


async def test_two_replicas_see_each_others_decisions_and_counters(
    make_stack: Any, redis_server: RedisServer
) -> None:
    a = await make_stack(redis_url=redis_server.url)
    b = await make_stack(redis_url=redis_server.url)
    steer(a, "science", "physics")
    steer(b, "math")
    assert (await a.client.post("/v1/chat/completions", json=chat("auto"))).status_code == 200
    assert (
        await b.client.post("/v1/chat/completions", json=chat("auto", "1+1"))
    ).status_code == 200
    assert (await b.client.post("/v1/chat/completions", json=chat("physics"))).status_code == 200
    r = await b.client.post("/v1/route", json={"model": "auto", "prompt": "2+2"})
    assert r.json()["node"] == "math"

    # What b recorded is in Redis once its feed flushes (every 250 ms; here at once), and
    # a's own events go first when a reads.
    assert await b.app.state.gateway.console.feed.flush()
    for stack in (a, b):
        body = (await stack.client.get("/console/api/stats")).json()
        assert (body["scope"], body["shared_view"]) == ("deployment", "ok")
        nodes = rows(body)
        assert nodes["root"]["requests_1m"] == 3  # one routed on a, two on b
        assert nodes["science"]["requests_1m"] == 1
        assert nodes["physics"]["requests_1m"] == 2  # routed on a, addressed on b
        assert nodes["math"]["requests_1m"] == 1  # the chat; /v1/route runs nothing
        assert nodes["root"]["requests_total"] == 3
        assert nodes["physics"]["p50_ms"] is not None
        assert nodes["biology"]["requests_1m"] == 0 and nodes["biology"]["p50_ms"] is None
        routes = [d["route"] for d in body["decisions"]]
        assert sorted(routes) == [
            ["root", "math"],
            ["root", "math"],
            ["root", "science", "physics"],
        ]
        assert routes[-1] == ["root", "science", "physics"]  # a's came first: newest first
        only = (await stack.client.get("/console/api/stats", params={"node": "science"})).json()
        assert [d["route"] for d in only["decisions"]] == [["root", "science", "physics"]]
        assert [n["node"] for n in only["nodes"]] == ["science"]

    # Each replica's own view is unchanged underneath: a routed one request.
    assert a.app.state.gateway.console.node("root").requests_window == 1
    assert b.app.state.gateway.console.node("root").requests_window == 2


async def test_without_redis_the_view_is_this_replica(make_stack: Any) -> None:
    stack = await make_stack()
    assert stack.app.state.gateway.console.feed is None
    body = (await stack.client.get("/console/api/stats")).json()
    assert (body["scope"], body["shared_view"], body["decisions_hidden"]) == (
        "this replica",
        "off",
        False,
    )


# -- bounds and expiry ----------------------------------------------------------------------


def decision(i: int) -> RouteResult:
    return RouteResult(
        node="math", route=["root", "math"], scores=[{"math": 0.9, "general": 0.1}], seconds=i
    )


async def test_the_stream_and_lists_stay_bounded_and_every_key_expires(
    redis_client: Redis, redis_server: RedisServer
) -> None:
    metrics = _metrics()
    feed = ConsoleFeed(
        Redis.from_url(redis_server.url, socket_timeout=5),
        metrics,
        window_s=2,
        latency_samples=10,
        max_decisions=20,
        idle_ttl_s=3,
        margin_s=1,
    )
    stats = ConsoleStats(["root", "math"], feed=feed)
    for i in range(100):
        stats.record_decision(decision(i))
        stats.record_request("math", 0.01 * i, "ok")
        if i % 30 == 0:
            assert await feed.flush()
    assert await feed.flush()
    assert await redis_client.xlen(DECISIONS_KEY) == 20
    assert await redis_client.llen(latency_key("math")) == 10
    view = await feed.read(["root", "math"])
    assert view is not None
    assert [d.seconds for d in view.decisions(limit=3)] == [99, 98, 97]  # newest first
    assert view.node("root").requests_total == 100
    assert view.node("math").requests_total == 100
    # Every key carries a TTL no longer than promised (window + margin, or the idle TTL).
    keys = [k.decode() for k in await redis_client.keys("octograph:console:*")]
    assert DECISIONS_KEY in keys and TOTALS_KEY in keys and latency_key("math") in keys
    assert any(k.startswith(bucket_key(0)[:-1]) for k in keys)
    for key in keys:
        ttl = await redis_client.ttl(key)
        assert 0 < ttl <= 3, (key, ttl)
    # And they do expire (Redis's own clock; polled, not timed).
    for _ in range(200):
        if not await redis_client.keys("octograph:console:*"):
            break
        await asyncio.sleep(0.05)
    assert await redis_client.keys("octograph:console:*") == []
    await feed.redis.aclose()


async def test_full_buffers_drop_and_count_never_block(redis_server: RedisServer) -> None:
    metrics = _metrics()
    now = time.time()
    feed = ConsoleFeed(
        Redis.from_url(redis_server.url, socket_timeout=5),
        metrics,
        max_decisions=3,
        max_pending_events=5,
        wall_clock=lambda: now,  # one second: one counter cell per node
    )
    ids = [f"n{i}" for i in range(8)]
    stats = ConsoleStats(ids, feed=feed)
    for _ in range(5):  # 5 decisions (3 fit), each a request and a latency on the router n0
        stats.record_decision(RouteResult(node="n1", route=["n0", "n1"], scores=[{"n1": 1.0}]))
    for node in ids:  # n0's cell exists, n1..n4 make 5 cells, n5..n7 find no room
        stats.record_request(node, 0.01, "ok")
    # 2 decisions pushed out; latencies: n0..n4 past the 5 of n0; 3 counter cells
    assert metrics.console_feed_dropped._value.get() == 2 + 5 + 3
    assert await feed.flush()
    view = await feed.read(ids)
    assert view is not None and len(view.decisions()) == 3
    assert view.node("n0").requests_window == 6  # 5 routed + 1 request: the cell existed
    await feed.redis.aclose()


async def test_a_dead_redis_drops_and_counts_the_batch() -> None:
    metrics = _metrics()
    dead = f"redis://127.0.0.1:{free_port()}/0"
    feed = ConsoleFeed(
        Redis.from_url(dead, socket_timeout=0.5, socket_connect_timeout=0.5), metrics
    )
    stats = ConsoleStats(["root", "math"], feed=feed)
    stats.record_decision(decision(1))  # one decision + one count + one latency on root
    assert not await feed.flush()
    assert metrics.console_feed_dropped._value.get() == 3
    assert metrics.shared_state_errors.labels("console_publish")._value.get() == 1
    assert await feed.read(["root"]) is None  # nothing pending: the read itself fails
    assert metrics.shared_state_errors.labels("console_read")._value.get() == 1
    stats.record_decision(decision(2))
    assert await feed.read(["root"]) is None  # its flush fails first: no second wait
    assert metrics.shared_state_errors.labels("console_publish")._value.get() == 2
    assert metrics.shared_state_errors.labels("console_read")._value.get() == 2
    assert metrics.console_feed_dropped._value.get() == 6
    await feed.redis.aclose()


def _metrics() -> Any:
    from service.observability.metrics import GatewayMetrics

    return GatewayMetrics(CollectorRegistry())


# -- Redis gone mid-run -----------------------------------------------------------------------


async def test_redis_stopped_mid_run_shows_this_replica_and_says_so(
    make_stack: Any, redis_server: RedisServer
) -> None:
    stack = await make_stack(redis_url=redis_server.url, redis_timeout_s=0.5)
    steer(stack, "math")
    assert (await stack.client.post("/v1/chat/completions", json=chat("auto"))).status_code == 200
    body = (await stack.client.get("/console/api/stats")).json()
    assert body["scope"] == "deployment" and rows(body)["root"]["requests_1m"] == 1

    redis_server.stop()
    # Requests never wait on Redis: they are served, and counted in this replica's view.
    assert (await stack.client.post("/v1/chat/completions", json=chat("auto"))).status_code == 200
    body = (await stack.client.get("/console/api/stats")).json()
    assert (body["scope"], body["shared_view"]) == ("this replica", "unreachable")
    assert rows(body)["root"]["requests_1m"] == 2
    assert len(body["decisions"]) == 2
    assert await metric(stack, "octograph_shared_state_errors_total", operation="console_read") >= 1
    assert await metric(stack, "octograph_console_feed_dropped_total") >= 1
    assert (
        await metric(stack, "octograph_shared_state_errors_total", operation="console_publish") >= 1
    )

    # Back (empty, no persistence): the deployment's view again, from what came since.
    redis_server.start()
    body: dict[str, Any] = {}
    for _ in range(100):  # the pool reconnects on its next call
        assert (
            await stack.client.post("/v1/chat/completions", json=chat("auto"))
        ).status_code == 200
        body = (await stack.client.get("/console/api/stats")).json()
        if body["scope"] == "deployment":
            break
        await asyncio.sleep(0.05)
    assert (body["scope"], body["shared_view"]) == ("deployment", "ok")
    assert rows(body)["root"]["requests_1m"] >= 1


# -- who sees the decisions -----------------------------------------------------------------


async def test_decisions_are_listed_to_admin_keys_only(make_stack: Any) -> None:
    stack = await make_stack(api_keys=["tenant-key"], admin_keys=["ops-key"])
    steer(stack, "math")
    tenant = {"Authorization": "Bearer tenant-key"}
    admin = {"Authorization": "Bearer ops-key"}
    secret_prompt = "my payroll numbers"
    r = await stack.client.post(
        "/v1/chat/completions", json=chat("auto", secret_prompt), headers=tenant
    )
    assert r.status_code == 200
    # An admin key is an API key too.
    r = await stack.client.post("/v1/chat/completions", json=chat("auto"), headers=admin)
    assert r.status_code == 200

    seen = await stack.client.get("/console/api/stats", headers=tenant)
    body = seen.json()
    assert body["decisions"] == [] and body["decisions_hidden"] is True
    assert rows(body)["root"]["requests_1m"] == 2  # counters are aggregates: shown
    seen = await stack.client.get("/console/api/stats", headers=admin)
    body = seen.json()
    assert body["decisions_hidden"] is False
    assert [d["route"] for d in body["decisions"]] == [["root", "math"], ["root", "math"]]
    bad = {"Authorization": "Bearer not-a-key"}
    assert (await stack.client.get("/console/api/stats", headers=bad)).status_code == 401


async def test_with_keys_and_no_admin_key_nobody_lists_decisions(make_stack: Any) -> None:
    stack = await make_stack(api_keys=["tenant-key"])
    steer(stack, "math")
    auth = {"Authorization": "Bearer tenant-key"}
    r = await stack.client.post("/v1/chat/completions", json=chat("auto"), headers=auth)
    assert r.status_code == 200
    body = (await stack.client.get("/console/api/stats", headers=auth)).json()
    assert body["decisions"] == [] and body["decisions_hidden"] is True
    # An open (loopback) gateway has no tenants: everything is shown.
    open_stack = await make_stack()
    steer(open_stack, "math")
    assert (
        await open_stack.client.post("/v1/chat/completions", json=chat("auto"))
    ).status_code == 200
    body = (await open_stack.client.get("/console/api/stats")).json()
    assert len(body["decisions"]) == 1 and body["decisions_hidden"] is False


def test_admin_keys_alone_make_the_gateway_keyed() -> None:
    check_exposure(GatewaySettings(host="0.0.0.0", admin_keys=["ops-key"]))
    with pytest.raises(ExposureError):
        check_exposure(GatewaySettings(host="0.0.0.0"))


async def test_the_flush_loop_outlives_an_unexpected_error() -> None:
    feed = ConsoleFeed(Redis.from_url(f"redis://127.0.0.1:{free_port()}/0"), _metrics())
    feed.flush_interval_s = 0.01
    calls: list[int] = []

    async def flaky_flush() -> bool:
        calls.append(1)
        if len(calls) == 1:
            raise ValueError("a bug")
        return True

    feed.flush = flaky_flush  # type: ignore[method-assign]
    feed.start()
    for _ in range(500):
        if len(calls) >= 3:
            break
        await asyncio.sleep(0.01)
    await feed.close()
    assert len(calls) >= 3  # the loop went on after the error
    await feed.redis.aclose()
