"""Issue 22 item 1: per-key limits shared through one real Redis by every gateway replica.

- The store (service/gateway/shared/limits.py) against a real redis-server: two stores (two
  gateways) share RPM, TPM and in-flight leases; a lease is renewed while its request runs and
  expires on its own when its gateway stops renewing it.
- Two real gateway processes (`octograph gateway`) and a fake worker process: a key limited to R
  sequences per minute gets R across both, not 2R; its in-flight limit holds across both; a
  gateway killed (SIGKILL) mid-stream frees its lease within the lease TTL.
- Redis stopped mid-run: `fail_open` admits on the process's own counts (a metric, one log line
  per outage), `fail_closed` answers 503 with the OpenAI error body; Redis back = shared again.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry
from redis.asyncio import Redis

from service.errors import Overloaded
from service.gateway.shared import limits as limits_module
from service.gateway.shared.limits import SharedKeyLimits, lease_keys, window_keys
from service.observability.metrics import GatewayMetrics
from tests.conftest import spawn_cli
from tests.redis_server import RedisServer, free_port

REPO = Path(__file__).resolve().parents[2]
KEY = "0123456789abcdef"  # what admission sees: a digest of the API key
CHAT = {"model": "general", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 2}
AUTH = {"authorization": "Bearer k1"}
LEASE_TTL_S = 2.0  # short, so expiry shows in a test (the default is 30 s)


def store(redis: Redis, **kw: Any) -> SharedKeyLimits:
    kw.setdefault("max_inflight_per_key", None)
    kw.setdefault("rate_limit_rpm", None)
    kw.setdefault("rate_limit_tpm", None)
    kw.setdefault("lease_ttl_s", 30.0)
    kw.setdefault("fail_closed", False)
    return SharedKeyLimits(redis, GatewayMetrics(CollectorRegistry()), **kw)


@pytest.fixture
async def redis_pair(redis_server: RedisServer) -> AsyncIterator[tuple[Redis, Redis]]:
    """Two clients, as two gateways would have."""
    a = Redis.from_url(redis_server.url, socket_timeout=5, socket_connect_timeout=5)
    b = Redis.from_url(redis_server.url, socket_timeout=5, socket_connect_timeout=5)
    yield a, b
    await a.aclose()
    await b.aclose()


async def until(check: Any, bound_s: float, every_s: float = 0.05) -> bool:
    """Poll an async `check` until it is true or `bound_s` (generous) has passed."""
    deadline = time.monotonic() + bound_s
    while time.monotonic() < deadline:
        if await check():
            return True
        await asyncio.sleep(every_s)
    return False


# ------------------------------------------------------------------ the store on a real Redis


async def test_two_stores_share_one_rpm_window(redis_pair: tuple[Redis, Redis]) -> None:
    a, b = (store(r, rate_limit_rpm=5) for r in redis_pair)
    for i in range(5):
        assert await (a if i % 2 else b).admit(KEY, 1) is None  # no in-flight limit: no lease
    for s in (a, b):
        with pytest.raises(Overloaded) as refused:
            await s.admit(KEY, 1)
        assert refused.value.code == "rate_limit_exceeded"
        assert 1.0 <= refused.value.retry_after_s <= 60.0
    # Another key has its own window; everything expires on its own.
    assert await a.admit("fedcba9876543210", 5) is None
    pttl = await redis_pair[0].pttl(window_keys(KEY)[0])
    assert 0 < pttl <= 60_000
    assert await redis_pair[0].get(window_keys(KEY)[1]) == b"5"


async def test_two_stores_share_token_counts(redis_pair: tuple[Redis, Redis]) -> None:
    a, b = (store(r, rate_limit_tpm=100) for r in redis_pair)
    a.start()
    b.start()
    try:
        await a.admit(KEY, 1)
        a.spend(KEY, 60)  # sent by the background task, batched
        b.spend(KEY, 50)
        r = redis_pair[0]
        assert await until(lambda: _equals(r.get(window_keys(KEY)[3]), b"110"), 10)
        for s in (a, b):
            with pytest.raises(Overloaded) as refused:
                await s.admit(KEY, 1)
            assert refused.value.code == "tokens_rate_limit_exceeded"
            assert "110 of 100" in refused.value.message
    finally:
        await a.stop()
        await b.stop()


async def _equals(pending: Any, expected: Any) -> bool:
    return bool(await pending == expected)


async def test_leases_are_shared_released_and_renewed(redis_pair: tuple[Redis, Redis]) -> None:
    a, b = (store(r, max_inflight_per_key=3, lease_ttl_s=1.0) for r in redis_pair)
    a.start()
    b.start()
    try:
        first = await a.admit(KEY, 2)
        assert first is not None and first in a.live
        with pytest.raises(Overloaded) as refused:
            await b.admit(KEY, 2)
        assert refused.value.code == "key_concurrency_exceeded"
        assert "2 sequences in flight" in refused.value.message
        second = await b.admit(KEY, 1)
        assert second is not None
        # Held well past the 1 s TTL: both gateways renew their leases (every TTL/3).
        await asyncio.sleep(2.5)
        with pytest.raises(Overloaded):
            await b.admit(KEY, 1)
        assert await redis_pair[0].get(lease_keys(KEY)[1]) == b"3"
        # A release frees the slot for the other gateway (sent in the background), even after
        # Redis forgot the scripts (a restart): the batch loads them and runs again.
        await redis_pair[0].script_flush()
        a.release(KEY, first)
        assert first not in a.live
        assert await until(lambda: _admits(b, KEY, 2), 10)
    finally:
        await a.stop()
        await b.stop()


async def _admits(s: SharedKeyLimits, key: str, cost: int) -> bool:
    try:
        await s.admit(key, cost)
    except Overloaded:
        return False
    return True


async def test_a_lease_no_one_renews_expires_on_its_own(redis_pair: tuple[Redis, Redis]) -> None:
    a, b = (store(r, max_inflight_per_key=1, lease_ttl_s=0.5) for r in redis_pair)
    assert await a.admit(KEY, 1) is not None  # a's background task never runs: no renewal
    assert not await _admits(b, KEY, 1)
    assert await until(lambda: _admits(b, KEY, 1), 10)
    # And the Redis keys themselves expire (nothing is left behind by a vanished gateway).
    r = redis_pair[0]
    assert await until(lambda: _equals(r.exists(*lease_keys(KEY)), 0), 10)


# ------------------------------------------------------------------ two gateway processes


@dataclass
class Deployment:
    """One fake worker and two gateways sharing one Redis, each its own OS process."""

    gateways: list[subprocess.Popen[bytes]]
    urls: list[str]
    worker: subprocess.Popen[bytes]
    logs: Path

    def log(self, i: int) -> str:
        return (self.logs / f"gateway{i}.log").read_text(errors="replace")[-3000:]


def _wait_ready(url: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"exited {proc.returncode}: {log.read_text(errors='replace')}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url + "/readyz", timeout=1, trust_env=False).status_code == 200:
                return
        time.sleep(0.1)
    raise TimeoutError(f"{url} not ready: {log.read_text(errors='replace')[-2000:]}")


def _stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGTERM)
    for p in procs:
        try:
            p.wait(15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            p.wait(5)


@contextlib.contextmanager
def deployment(tmp: Path, redis_url: str, **limits: str) -> Iterator[Deployment]:
    worker_port = free_port()
    graph = tmp / "graph.yaml"
    graph.write_text(
        "models:\n"
        f"  fake: {{urls: ['http://127.0.0.1:{worker_port}'], max_model_len: 4096}}\n"
        "nodes:\n"
        "  general: {kind: model, model: fake}\n"
    )
    # Long, slow replies unless max_tokens says otherwise: a stream lasts ~20 s.
    worker = spawn_cli(
        ["worker", "--fake", "--model", "fake", "--port", str(worker_port),
         "--fake-reply-words", "400", "--fake-token-delay", "0.05"],
        tmp / "worker.log",
        {"OCTOGRAPH_WORKER_LOG_LEVEL": "WARNING"},
    )  # fmt: skip
    env = {
        "OCTOGRAPH_API_KEYS": json.dumps(["k1"]),
        "OCTOGRAPH_REDIS_URL": redis_url,
        "OCTOGRAPH_REDIS_TIMEOUT_S": "2",
        "OCTOGRAPH_REDIS_LEASE_TTL_S": str(LEASE_TTL_S),
        "OCTOGRAPH_LOG_LEVEL": "WARNING",
        **{f"OCTOGRAPH_{k.upper()}": v for k, v in limits.items()},
    }
    gateways, urls = [], []
    try:
        for i in range(2):
            port = free_port()
            gateways.append(
                spawn_cli(
                    ["gateway", "--config", str(graph), "--port", str(port)],
                    tmp / f"gateway{i}.log",
                    env,
                )
            )
            urls.append(f"http://127.0.0.1:{port}")
        _wait_ready(f"http://127.0.0.1:{worker_port}", worker, tmp / "worker.log")
        for i, (url, proc) in enumerate(zip(urls, gateways, strict=True)):
            _wait_ready(url, proc, tmp / f"gateway{i}.log")
        yield Deployment(gateways, urls, worker, tmp)
    finally:
        _stop([*gateways, worker])


async def _chat(client: httpx.AsyncClient, url: str, **extra: Any) -> httpx.Response:
    return await client.post(url + "/v1/chat/completions", json={**CHAT, **extra}, headers=AUTH)


@contextlib.asynccontextmanager
async def _open_stream(client: httpx.AsyncClient, url: str) -> AsyncIterator[httpx.Response]:
    """A long stream, open (admitted, first chunk read) for the block's duration."""
    body = {**CHAT, "stream": True, "max_tokens": 400}
    async with client.stream("POST", url + "/v1/chat/completions", json=body, headers=AUTH) as r:
        assert r.status_code == 200, (await r.aread()).decode()
        # One iterator held to the end: a `break` out of `async for` would close the response.
        chunks = r.aiter_bytes()
        await anext(chunks)
        yield r
        await chunks.aclose()


async def test_two_gateways_share_a_keys_requests_per_minute(
    redis_server: RedisServer,
    tmp_path: Path,
) -> None:
    rpm = 6
    with deployment(tmp_path, redis_server.url, rate_limit_rpm=str(rpm)) as d:
        async with httpx.AsyncClient(timeout=30, trust_env=False) as c:
            codes = [(await _chat(c, d.urls[i % 2])).status_code for i in range(2 * rpm)]
            refused = await _chat(c, d.urls[0])
            # Per process this key would get 2 x rpm; shared, it gets rpm across both.
            assert codes.count(200) == rpm, (codes, d.log(0))
            assert codes[:rpm] == [200] * rpm and set(codes[rpm:]) == {429}
            assert refused.json()["error"]["code"] == "rate_limit_exceeded"
            assert 1 <= int(refused.headers["retry-after"]) <= 60
            metrics = (await c.get(d.urls[1] + "/metrics", headers=AUTH)).text
            assert 'octograph_admission_rejected_total{scope="rate"}' in metrics
            assert "octograph_shared_limits_up 1.0" in metrics


async def test_two_gateways_share_a_keys_in_flight_limit(
    redis_server: RedisServer,
    tmp_path: Path,
) -> None:
    with deployment(tmp_path, redis_server.url, max_inflight_per_key="2") as d:
        async with httpx.AsyncClient(timeout=60, trust_env=False) as c:
            async with _open_stream(c, d.urls[0]), _open_stream(c, d.urls[1]):
                # Both slots are taken, one on each gateway: either refuses a third, and still
                # does once the lease TTL has passed (the leases are renewed while streams run).
                for _ in range(3):
                    for url in d.urls:
                        r = await _chat(c, url)
                        assert r.status_code == 429, r.text
                        assert r.json()["error"]["code"] == "key_concurrency_exceeded"
                    await asyncio.sleep(LEASE_TTL_S / 2)
            # The streams ended (the client left): their leases are released.
            assert await until(lambda: _served(c, d.urls[1]), 10), d.log(1)


async def _served(c: httpx.AsyncClient, url: str) -> bool:
    return (await _chat(c, url)).status_code == 200


async def test_a_killed_gateway_frees_its_leases_within_the_ttl(
    redis_server: RedisServer,
    tmp_path: Path,
) -> None:
    with deployment(tmp_path, redis_server.url, max_inflight_per_key="1") as d:
        async with httpx.AsyncClient(timeout=60, trust_env=False) as c:
            victim = d.gateways[0]
            with contextlib.suppress(httpx.HTTPError):
                async with _open_stream(c, d.urls[0]):
                    refused = await _chat(c, d.urls[1])
                    assert refused.status_code == 429, refused.text
                    assert refused.json()["error"]["code"] == "key_concurrency_exceeded"
                    os.killpg(victim.pid, signal.SIGKILL)  # mid-stream: nothing is released
                    victim.wait(10)
            killed_at = time.monotonic()
            # The survivor admits the key again once the dead gateway's lease expires.
            assert await until(lambda: _served(c, d.urls[1]), 5 * LEASE_TTL_S + 10, 0.1)
            print(f"lease freed {time.monotonic() - killed_at:.2f} s after the kill")


# ------------------------------------------------------------------ Redis stopped mid-run


async def test_fail_open_admits_on_this_processes_counts_while_redis_is_down(
    make_stack: Any,
    redis_server: RedisServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    stack = await make_stack(
        api_keys=["k1"], rate_limit_rpm=4, redis_url=redis_server.url, redis_timeout_s=1.0
    )
    c = stack.client
    assert (await c.post("/v1/chat/completions", json=CHAT, headers=AUTH)).status_code == 200
    assert (await c.post("/v1/chat/completions", json=CHAT, headers=AUTH)).status_code == 200
    redis_server.stop()
    caplog.set_level(logging.WARNING, logger=limits_module.__name__)
    # The process's own view: 2 of 4 taken, so 2 more pass, the next is refused.
    codes = [
        (await c.post("/v1/chat/completions", json=CHAT, headers=AUTH)).status_code
        for _ in range(4)
    ]
    assert codes == [200, 200, 429, 429]
    state = stack.app.state.gateway
    errors = state.registry.get_sample_value(
        "octograph_shared_state_errors_total", {"operation": "limits_admit"}
    )
    assert errors is not None and errors >= 1
    assert state.registry.get_sample_value("octograph_shared_limits_up") == 0
    down = [r for r in caplog.records if "Redis unreachable" in r.getMessage()]
    assert len(down) == 1 and "fail_open" in down[0].getMessage()  # once per outage

    redis_server.start()  # the same port, empty: the shared window starts again

    async def shared_again() -> bool:
        r = await c.post("/v1/chat/completions", json=CHAT, headers=AUTH)
        return (
            r.status_code == 200
            and state.registry.get_sample_value("octograph_shared_limits_up") == 1
        )

    assert await until(shared_again, 20, 0.2)
    assert any("reachable again" in r.getMessage() for r in caplog.records)
    assert len([r for r in caplog.records if "Redis unreachable" in r.getMessage()]) == 1


async def test_fail_closed_refuses_with_503_while_redis_is_down(
    make_stack: Any,
    redis_server: RedisServer,
) -> None:
    stack = await make_stack(
        api_keys=["k1"],
        max_inflight_per_key=4,
        redis_url=redis_server.url,
        redis_failure="fail_closed",
    )
    c = stack.client
    assert (await c.post("/v1/chat/completions", json=CHAT, headers=AUTH)).status_code == 200
    redis_server.stop()
    for _ in range(3):
        r = await c.post("/v1/chat/completions", json=CHAT, headers=AUTH)
        assert r.status_code == 503, r.text
        error = r.json()["error"]
        assert error["type"] == "service_unavailable"
        assert error["code"] == "shared_state_unavailable"
    state = stack.app.state.gateway
    assert (
        state.registry.get_sample_value(
            "octograph_admission_rejected_total", {"scope": "shared_state"}
        )
        == 3
    )
    assert state.pipeline.admission.inflight == 0 and state.pipeline.admission.by_key == {}
    redis_server.start()
    assert await until(lambda: _served_in_process(c), 20, 0.2)


async def _served_in_process(c: httpx.AsyncClient) -> bool:
    r = await c.post("/v1/chat/completions", json=CHAT, headers=AUTH)
    return r.status_code == 200


async def test_back_to_back_requests_at_the_in_flight_limit_are_never_refused(
    make_stack: Any,
    redis_server: RedisServer,
) -> None:
    # Two gateways (in this process) on one Redis, a key allowed one sequence in flight: a
    # client that sends its next request as soon as it has an answer always finds its slot
    # free, whichever gateway it reaches (the release is written right after the answer).
    settings = {"api_keys": ["k1"], "max_inflight_per_key": 1, "redis_url": redis_server.url}
    stacks = [await make_stack(**settings), await make_stack(**settings)]
    codes = [
        (
            await stacks[i % 2].client.post("/v1/chat/completions", json=CHAT, headers=AUTH)
        ).status_code
        for i in range(20)
    ]
    assert codes == [200] * 20
    for stack in stacks:
        assert stack.app.state.gateway.pipeline.admission.shared.live == {}


async def test_without_a_redis_url_limits_stay_in_the_process(make_stack: Any) -> None:
    stack = await make_stack(api_keys=["k1"], rate_limit_rpm=2)
    assert stack.app.state.gateway.pipeline.admission.shared is None
    c = stack.client
    codes = [
        (await c.post("/v1/chat/completions", json=CHAT, headers=AUTH)).status_code
        for _ in range(3)
    ]
    assert codes == [200, 200, 429]


# ------------------------------------------------------------------ make test provides Redis


@pytest.mark.parametrize(("ci", "code"), [("true", 1), ("", 0)])
def test_redis_tools_fail_in_ci_when_they_cannot_install(
    tmp_path: Path, ci: str, code: int
) -> None:
    # A PATH with the shell's basics and neither redis-server nor apt-get.
    for tool in ("bash", "id", "cut", "printf"):
        found = subprocess.run(["bash", "-c", f"command -v {tool}"], capture_output=True, text=True)
        if found.stdout.strip().startswith("/"):
            (tmp_path / tool).symlink_to(found.stdout.strip())
    out = subprocess.run(
        [str(tmp_path / "bash"), str(REPO / "scripts" / "redis-tools.sh")],
        env={"PATH": str(tmp_path), "CI": ci},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == code, out.stderr
    assert "redis-server" in out.stderr
    assert "bash scripts/redis-tools.sh" in (REPO / "Makefile").read_text()
