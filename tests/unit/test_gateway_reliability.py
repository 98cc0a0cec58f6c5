"""Reliability properties of the gateway, each with a test that fails without it
(style-and-reliability.md Part B). Fake engines; syncs on events, not sleeps."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from tests.conftest import sse_events

pytestmark = pytest.mark.asyncio
CHAT = {"model": "general", "messages": [{"role": "user", "content": "q"}]}


async def _wait_for(predicate, timeout: float = 2.0) -> float:
    t0 = time.monotonic()
    while not predicate():
        if time.monotonic() - t0 > timeout:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.005)
    return time.monotonic() - t0


async def test_admission_bound_gives_fast_429_with_retry_after(make_stack):
    stack = await make_stack(max_inflight=2)
    gate = asyncio.Event()
    stack.engine("alpha").gate = gate
    held = [
        asyncio.create_task(stack.client.post("/v1/chat/completions", json=CHAT)) for _ in range(2)
    ]
    await _wait_for(lambda: stack.lifecycle.inflight == 2)
    t0 = time.monotonic()
    rejected = await asyncio.gather(
        *(stack.client.post("/v1/chat/completions", json=CHAT) for _ in range(3))
    )
    assert time.monotonic() - t0 < 0.5
    assert [r.status_code for r in rejected] == [429, 429, 429]
    assert all(r.headers["retry-after"] == "1" for r in rejected)
    assert rejected[0].json()["error"]["type"] == "rate_limit_error"
    gate.set()
    done = await asyncio.gather(*held)
    assert [r.status_code for r in done] == [200, 200]
    metrics = (await stack.client.get("/metrics")).text
    assert 'octograph_admission_rejected_total{scope="gateway"} 3.0' in metrics


async def test_per_node_admission(make_stack):
    stack = await make_stack(max_inflight_per_node=1)
    gate = asyncio.Event()
    stack.engine("alpha").gate = gate
    held = asyncio.create_task(stack.client.post("/v1/chat/completions", json=CHAT))
    await _wait_for(lambda: stack.engine("alpha").running)
    r = await stack.client.post("/v1/chat/completions", json=CHAT)
    assert r.status_code == 429 and "node 'general'" in r.json()["error"]["message"]
    other = await stack.client.post("/v1/chat/completions", json={**CHAT, "model": "physics"})
    assert other.status_code == 200  # another node is not affected
    gate.set()
    assert (await held).status_code == 200


async def test_stream_disconnect_aborts_worker_and_frees_slot(make_stack):
    stack = await make_stack()
    engine = stack.engine("alpha")
    engine.token_delay_s = 0.05
    engine.reply_words = 1000
    async with (
        httpx.AsyncClient(base_url=stack.url, timeout=10) as client,
        client.stream(
            "POST", "/v1/chat/completions", json={**CHAT, "stream": True, "max_tokens": 200}
        ) as r,
    ):
        async for _ in r.aiter_lines():
            break  # first chunk arrived; now the client goes away
    closed_at = time.monotonic()
    await _wait_for(lambda: engine.aborted, timeout=1.0)
    abort_latency = time.monotonic() - closed_at
    assert abort_latency < 1.0
    await _wait_for(lambda: stack.lifecycle.inflight == 0, timeout=1.0)
    assert not engine.running


async def test_non_streaming_disconnect_aborts_worker(make_stack):
    stack = await make_stack()
    engine = stack.engine("alpha")
    gate = asyncio.Event()
    engine.gate = gate
    async with httpx.AsyncClient(base_url=stack.url, timeout=10) as client:
        task = asyncio.create_task(client.post("/v1/chat/completions", json=CHAT))
        await _wait_for(lambda: engine.running)
        task.cancel()  # closes the connection
        with pytest.raises(asyncio.CancelledError):
            await task
    await _wait_for(lambda: engine.aborted, timeout=1.0)
    await _wait_for(lambda: stack.lifecycle.inflight == 0, timeout=1.0)


async def test_failure_mid_stream_gives_error_event_then_done(make_stack):
    stack = await make_stack(engine_kwargs={"fail_after_tokens": 3})
    r = await stack.client.post("/v1/chat/completions", json={**CHAT, "stream": True})
    events = sse_events(r.text)
    assert events[-1] == "DONE"
    assert "error" in events[-2]
    text = "".join(
        e["choices"][0]["delta"].get("content", "") for e in events[:-2] if e.get("choices")
    )
    assert text == "fake answer 0"  # what was sent stays sent; no retry, no duplicate


async def test_failure_non_streaming_is_5xx_with_error_body(make_stack):
    stack = await make_stack(engine_kwargs={"fail_after_tokens": 3})
    r = await stack.client.post("/v1/chat/completions", json=CHAT)
    assert r.status_code == 502
    assert r.json()["error"]["type"] == "upstream_error"


async def test_stalled_stream_hits_idle_timeout(make_stack):
    stack = await make_stack(stream_idle_timeout_s=0.3, engine_kwargs={"stall_after_tokens": 2})
    t0 = time.monotonic()
    r = await stack.client.post("/v1/chat/completions", json={**CHAT, "stream": True})
    elapsed = time.monotonic() - t0
    events = sse_events(r.text)
    assert events[-1] == "DONE" and events[-2]["error"]["type"] == "timeout"
    assert 0.25 < elapsed < 2.0
    await _wait_for(lambda: stack.engine("alpha").aborted)


async def test_request_deadline_gives_504(make_stack):
    stack = await make_stack(request_timeout_s=0.3)
    stack.engine("alpha").gate = asyncio.Event()  # never released
    t0 = time.monotonic()
    r = await stack.client.post("/v1/chat/completions", json=CHAT)
    assert r.status_code == 504
    assert time.monotonic() - t0 < 1.5
    await _wait_for(lambda: stack.engine("alpha").aborted)


async def test_unreachable_replica_is_retried_once_and_marked_down(make_stack):
    stack = await make_stack(replicas={"alpha": 2}, health_interval_s=30)
    bad = stack.workers["alpha"][0]
    await bad.stop()  # refuses connections from now on; health has not noticed yet
    pool = stack.app.state.gateway.pools["alpha"]
    results = [await stack.client.post("/v1/chat/completions", json=CHAT) for _ in range(4)]
    assert all(r.status_code == 200 for r in results)
    assert not pool.replicas[0].healthy
    metrics = (await stack.client.get("/metrics")).text
    assert 'octograph_retries_total{node="general"} 1.0' in metrics


async def test_no_healthy_replica_gives_503(make_stack):
    stack = await make_stack(health_interval_s=30)
    await stack.workers["alpha"][0].stop()
    r = await stack.client.post("/v1/chat/completions", json=CHAT)
    assert r.status_code == 503
    assert r.json()["error"]["type"] == "service_unavailable"


async def test_readiness_reflects_workers_and_draining(make_stack):
    stack = await make_stack(health_interval_s=0.1, cooldown_s=0.1)
    assert (await stack.client.get("/readyz")).status_code == 200
    await stack.workers["beta"][0].stop()
    await _wait_for(lambda: not stack.app.state.gateway.pools["beta"].ready)
    r = await stack.client.get("/readyz")  # a leaf model down: still ready, and says so
    assert r.status_code == 200 and r.json()["models"]["beta"] is False
    await stack.workers["routerm"][0].stop()
    await _wait_for(lambda: not stack.app.state.gateway.pools["routerm"].ready)
    r = await stack.client.get("/readyz")  # the router model down: nothing can route
    assert r.status_code == 503 and r.json()["models"]["routerm"] is False
    stack.lifecycle.draining = True
    assert (await stack.client.get("/readyz")).json()["status"] == "draining"
    assert (await stack.client.get("/livez")).status_code == 200
    r = await stack.client.post("/v1/chat/completions", json=CHAT)
    assert r.status_code == 503


async def test_body_too_large_is_413(make_stack):
    stack = await make_stack(max_body_bytes=10_000)
    big = {"model": "general", "messages": [{"role": "user", "content": "x" * 20_000}]}
    r = await stack.client.post("/v1/chat/completions", json=big)
    assert r.status_code == 413
    assert stack.engine("alpha").generated == []


async def test_auth_deny_by_default_and_health_open(make_stack, tmp_path, caplog):
    keys = tmp_path / "keys"
    keys.write_text("# comment\nsecret-one\n")
    stack = await make_stack(api_keys_file=str(keys))
    for path in ("/v1/models", "/metrics", "/docs", "/openapi.json"):
        r = await stack.client.get(path)
        assert r.status_code == 401, path
    assert (await stack.client.get("/livez")).status_code == 200
    ok = await stack.client.get("/v1/models", headers={"authorization": "Bearer secret-one"})
    assert ok.status_code == 200
    bad = await stack.client.get("/v1/models", headers={"authorization": "Bearer nope"})
    assert bad.status_code == 401 and bad.json()["error"]["type"] == "authentication_error"
    # Rotation without restart: the file is re-read when it changes.
    await asyncio.sleep(1.1)
    keys.write_text("secret-two\n")
    import os

    os.utime(keys, (time.time() + 5, time.time() + 5))
    await asyncio.sleep(1.1)
    assert (
        await stack.client.get("/v1/models", headers={"authorization": "Bearer secret-two"})
    ).status_code == 200
    assert (
        await stack.client.get("/v1/models", headers={"authorization": "Bearer secret-one"})
    ).status_code == 401
    assert "secret-one" not in caplog.text and "secret-two" not in caplog.text


async def test_rate_limit_per_key(make_stack):
    stack = await make_stack(api_keys=["k1", "k2"], rate_limit_rpm=2)
    h1 = {"authorization": "Bearer k1"}
    codes = [
        (await stack.client.post("/v1/chat/completions", json=CHAT, headers=h1)).status_code
        for _ in range(3)
    ]
    assert codes == [200, 200, 429]
    r = await stack.client.post(
        "/v1/chat/completions", json=CHAT, headers={"authorization": "Bearer k2"}
    )
    assert r.status_code == 200
