"""Reliability properties of the gateway, each with a test that fails without it
(style-and-reliability.md Part B). Fake engines; syncs on events, not sleeps: a test waits for
a condition with a generous deadline (a busy 2-core machine is slow, not wrong), and wall-clock
bounds are only lower bounds (a timeout must not fire early)."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import time

import httpx
import pytest

from service.gateway import auth
from service.observability.logging import JsonFormatter
from tests.conftest import sse_events

pytestmark = pytest.mark.asyncio
CHAT = {"model": "general", "messages": [{"role": "user", "content": "q"}]}


async def _wait_for(predicate, timeout: float = 10.0) -> float:
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
    rejected = await asyncio.wait_for(
        asyncio.gather(*(stack.client.post("/v1/chat/completions", json=CHAT) for _ in range(3))),
        10,
    )
    # Fast: refused while the two admitted requests are still held (nothing queued behind them).
    assert not any(t.done() for t in held)
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
    await _wait_for(lambda: engine.aborted)
    await _wait_for(lambda: stack.lifecycle.inflight == 0)
    # Aborted, not finished (the reply had 200 tokens to go at 50 ms each).
    assert not engine.running and engine.aborted == engine.generated


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
    await _wait_for(lambda: engine.aborted)
    await _wait_for(lambda: stack.lifecycle.inflight == 0)


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
    # The stalled worker never sends again: only the idle timer can end this stream (deadline).
    r = await asyncio.wait_for(
        stack.client.post("/v1/chat/completions", json={**CHAT, "stream": True}), 10
    )
    elapsed = time.monotonic() - t0
    events = sse_events(r.text)
    assert events[-1] == "DONE" and events[-2]["error"]["type"] == "timeout"
    assert elapsed >= 0.3  # not before the idle timeout
    await _wait_for(lambda: stack.engine("alpha").aborted)


async def test_request_deadline_gives_504(make_stack):
    stack = await make_stack(request_timeout_s=0.3)
    stack.engine("alpha").gate = asyncio.Event()  # never released
    t0 = time.monotonic()
    # The gate is never released: only the request deadline can answer (test deadline 10 s).
    r = await asyncio.wait_for(stack.client.post("/v1/chat/completions", json=CHAT), 10)
    assert r.status_code == 504
    assert r.json()["error"]["type"] == "timeout"
    assert time.monotonic() - t0 >= 0.3  # not before the deadline
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


async def test_draining_is_503_draining_and_in_flight_streams_finish(make_stack):
    """README (Operating, Shutdown): while draining, /readyz turns 503, new requests get
    503 `draining`, streams in flight finish. Every worker is up, so the 503s are the drain's."""
    stack = await make_stack()
    assert (await stack.client.get("/readyz")).status_code == 200
    engine = stack.engine("alpha")
    gate = asyncio.Event()
    engine.gate = gate
    in_flight = asyncio.create_task(
        stack.client.post("/v1/chat/completions", json={**CHAT, "stream": True})
    )
    await _wait_for(lambda: engine.running)
    stack.lifecycle.draining = True
    r = await stack.client.get("/readyz")
    assert r.status_code == 503 and r.json()["status"] == "draining"
    assert (await stack.client.get("/livez")).status_code == 200
    for path, body in (
        ("/v1/chat/completions", CHAT),
        ("/v1/completions", {"model": "general", "prompt": "q"}),
    ):
        r = await stack.client.post(path, json=body)
        assert r.status_code == 503, path
        error = r.json()["error"]
        assert (error["type"], error["code"]) == ("service_unavailable", "draining"), error
    gate.set()
    done = await asyncio.wait_for(in_flight, 10)
    events = sse_events(done.text)
    assert done.status_code == 200 and events[-1] == "DONE"
    assert not any(isinstance(e, dict) and "error" in e for e in events)


async def test_body_too_large_is_413(make_stack):
    stack = await make_stack(max_body_bytes=10_000)
    big = {"model": "general", "messages": [{"role": "user", "content": "x" * 20_000}]}
    r = await stack.client.post("/v1/chat/completions", json=big)
    assert r.status_code == 413
    assert stack.engine("alpha").generated == []


async def test_auth_deny_by_default_and_health_open(make_stack, tmp_path, caplog, monkeypatch):
    # Everything logged, at every level, and through the JSON formatter the processes use
    # (service/observability/logging.py): a key must appear in neither.
    caplog.set_level(logging.DEBUG)
    json_out = io.StringIO()
    json_handler = logging.StreamHandler(json_out)
    json_handler.setFormatter(JsonFormatter())
    json_handler.setLevel(logging.DEBUG)
    logging.getLogger().addHandler(json_handler)
    monkeypatch.setattr(auth, "FILE_CHECK_INTERVAL_S", 0.0)  # re-check the file every request
    keys = tmp_path / "keys"
    keys.write_text("# comment\nsecret-one\n")
    try:
        stack = await make_stack(api_keys_file=str(keys))
        for path in ("/v1/models", "/metrics", "/docs", "/openapi.json", "/console/api/graph"):
            r = await stack.client.get(path)
            assert r.status_code == 401, path
        # Generation without a key (both served by the front door): 401 before any work.
        generation = (
            ("/v1/chat/completions", CHAT),
            ("/v1/completions", {"model": "general", "prompt": "q"}),
        )
        for path, body in generation:
            for headers in ({}, {"authorization": "Bearer wrong-key-zq"}, {"authorization": "x"}):
                r = await stack.client.post(path, json=body, headers=headers)
                assert r.status_code == 401, (path, headers)
                assert r.headers["www-authenticate"] == "Bearer"
                assert r.json()["error"]["type"] == "authentication_error"
        assert stack.engine("alpha").generated == []
        # Health stays open under keys (probes carry no key).
        assert (await stack.client.get("/livez")).status_code == 200
        ready = await stack.client.get("/readyz")
        assert ready.status_code == 200 and ready.json()["status"] == "ready"
        auth_ok = {"authorization": "Bearer secret-one"}
        ok = await stack.client.get("/v1/models", headers=auth_ok)
        assert ok.status_code == 200
        for path, body in generation:
            assert (await stack.client.post(path, json=body, headers=auth_ok)).status_code == 200
        bad = await stack.client.get("/v1/models", headers={"authorization": "Bearer nope"})
        assert bad.status_code == 401 and bad.json()["error"]["type"] == "authentication_error"
        # Rotation without restart: the file is re-read when it changes.
        keys.write_text("secret-two\n")
        os.utime(keys, (time.time() + 5, time.time() + 5))
        assert (
            await stack.client.get("/v1/models", headers={"authorization": "Bearer secret-two"})
        ).status_code == 200
        assert (
            await stack.client.get("/v1/models", headers={"authorization": "Bearer secret-one"})
        ).status_code == 401
    finally:
        logging.getLogger().removeHandler(json_handler)
    # The capture sees INFO and below: the key file's loads were logged (count only).
    assert "api keys loaded" in caplog.text
    assert any(r.levelno <= logging.INFO for r in caplog.records)
    logged = caplog.text + json_out.getvalue()
    for secret in ("secret-one", "secret-two", "wrong-key-zq"):
        assert secret not in logged, secret


async def test_json_log_formatter_redacts_credentials():
    """The JSON formatter drops what looks like a credential, in the message and in fields."""
    record = logging.makeLogRecord(
        {
            "name": "t",
            "levelno": logging.DEBUG,
            "levelname": "DEBUG",
            "msg": "headers: authorization=Bearer sk-live-123 from %s",
            "args": ("client",),
            "authorization": "Bearer sk-field-456",
            "api_key": "sk-plain-789",
            "detail": "retrying with Bearer sk-extra-000",
        }
    )
    out = JsonFormatter().format(record)
    for secret in ("sk-live-123", "sk-field-456", "sk-plain-789", "sk-extra-000"):
        assert secret not in out, out
    parsed = json.loads(out)
    assert parsed["level"] == "debug" and parsed["msg"].endswith("from client")


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
