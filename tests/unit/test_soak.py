"""Soak: thousands of mixed requests against the gateway with fake workers leave nothing behind.

Marked slow (about a minute on two cores). The mix is the traffic a gateway really sees: plain
and streamed answers, clients that hang up mid-stream, bad requests and unknown models. The
test then checks what a leak would show: resident memory growth, asyncio tasks still alive,
admission slots still held, engine requests still running, open upstream connections.
"""

from __future__ import annotations

import asyncio
import gc
import os
from collections import Counter
from typing import Any

import httpx
import pytest

from tests.conftest import StackFactory

pytestmark = pytest.mark.slow

TOTAL = 2_000
CONCURRENCY = 32
WARMUP = 200
# Resident memory may grow while allocator arenas and caches warm up; a per-request leak of
# even 10 KB would show as 18 MB here.
MAX_RSS_GROWTH_MB = 16.0


def rss_mb() -> float:
    with open(f"/proc/{os.getpid()}/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


async def one_request(client: httpx.AsyncClient, i: int) -> str:
    kind = i % 5
    user = [{"role": "user", "content": f"question number {i}"}]
    if kind == 0:
        r = await client.post("/v1/chat/completions", json={"model": "math", "messages": user})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"]
        return "ok"
    if kind == 1:
        body = {"model": "general", "messages": user, "stream": True}
        async with client.stream("POST", "/v1/chat/completions", json=body) as r:
            assert r.status_code == 200
            text = (await r.aread()).decode()
        assert text.rstrip().endswith("data: [DONE]")
        assert '"error"' not in text
        return "streamed"
    if kind == 2:
        body = {"model": "physics", "messages": user, "stream": True, "max_tokens": 200}
        async with client.stream("POST", "/v1/chat/completions", json=body) as r:
            assert r.status_code == 200
            async for _ in r.aiter_bytes():
                break  # hang up after the first chunk
        return "aborted"
    if kind == 3:
        r = await client.post(
            "/v1/chat/completions", json={"model": "math", "messages": user, "temperature": 9}
        )
        assert r.status_code == 400, r.text
        assert r.json()["error"]["type"] == "invalid_request_error"
        return "bad_request"
    r = await client.post("/v1/completions", json={"model": "nope", "prompt": "x"})
    assert r.status_code == 404, r.text
    return "unknown_model"


async def run_batch(client: httpx.AsyncClient, start: int, count: int) -> Counter[str]:
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(start, start + count):
        queue.put_nowait(i)
    outcomes: Counter[str] = Counter()

    async def worker() -> None:
        while not queue.empty():
            outcomes[await one_request(client, queue.get_nowait())] += 1

    await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    return outcomes


async def settle(check: Any, timeout_s: float = 5.0) -> None:
    for _ in range(int(timeout_s / 0.05)):
        if check():
            return
        await asyncio.sleep(0.05)


async def test_soak_mixed_traffic_leaks_nothing(make_stack: StackFactory) -> None:
    stack = await make_stack(
        engine_kwargs={"token_delay_s": 0.001, "reply_words": 24},
        max_inflight=256,
        max_inflight_per_node=128,
    )
    limits = httpx.Limits(max_connections=CONCURRENCY, max_keepalive_connections=CONCURRENCY)
    async with httpx.AsyncClient(base_url=stack.url, timeout=30, limits=limits) as client:
        await run_batch(client, 0, WARMUP)
        await settle(lambda: not stack.app.state.gateway.pipeline.admission.inflight)
        gc.collect()
        tasks_before = len(asyncio.all_tasks())
        rss_before = rss_mb()

        outcomes = await run_batch(client, WARMUP, TOTAL)

        engines = [e for es in stack.engines.values() for e in es]
        pipeline = stack.app.state.gateway.pipeline
        await settle(
            lambda: not pipeline.admission.inflight and not any(e.running for e in engines)
        )
        gc.collect()
        rss_after = rss_mb()
        tasks_after = len(asyncio.all_tasks())

    assert sum(outcomes.values()) == TOTAL
    assert set(outcomes) == {"ok", "streamed", "aborted", "bad_request", "unknown_model"}
    assert pipeline.admission.inflight == 0, "admission slots leaked"
    assert pipeline.admission.by_node == {} and pipeline.admission.by_key == {}
    assert [e.running for e in engines if e.running] == [], "engine requests still running"
    aborted = sum(len(e.aborted) for e in engines)
    assert aborted >= outcomes["aborted"] * 0.9, (aborted, outcomes)  # hang-ups reach workers
    assert tasks_after <= tasks_before + 2, (tasks_before, tasks_after)
    growth = rss_after - rss_before
    print(f"soak: {dict(outcomes)} rss {rss_before:.1f} -> {rss_after:.1f} MB (+{growth:.1f})")
    assert growth < MAX_RSS_GROWTH_MB, f"resident memory grew {growth:.1f} MB"
    metrics = (await stack.client.get("/metrics")).text
    inflight_lines = [
        ln for ln in metrics.splitlines() if ln.startswith("octograph_gateway_inflight_requests")
    ]
    assert inflight_lines and all(ln.endswith(" 0.0") for ln in inflight_lines), inflight_lines
