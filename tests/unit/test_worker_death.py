"""A worker *process* killed mid-stream (SIGKILL, no goodbye): the client gets an SSE error
event then [DONE], the replica is marked down within seconds, new requests go to the node's
other replica, and the dead one is probed back once it returns. Fake-engine worker processes
keep this fast; the gateway runs in the test's loop so its state can be read directly."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from service.config import GatewaySettings
from service.gateway.app import build_gateway_app
from service.graph.schema import parse_graph
from service.serving import Lifecycle
from tests.conftest import free_port, serve_app, sse_events

REPO = Path(__file__).resolve().parents[2]
GRAPH = """
models:
  alpha: {urls: ["http://placeholder"], max_model_len: 256}
nodes:
  general: {kind: model, model: alpha}
"""


def start_worker(port: int) -> subprocess.Popen[bytes]:
    env = {**os.environ, "OCTOGRAPH_WORKER_FAKE_TOKEN_DELAY_S": "0.05"}
    cmd = [sys.executable, "-m", "service.cli", "worker", "--fake", "--model", "alpha"]
    return subprocess.Popen(
        [*cmd, "--port", str(port), "--fake-reply-words", "200"],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


async def wait_ready(url: str, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    async with httpx.AsyncClient(timeout=1, trust_env=False) as client:
        while time.monotonic() < deadline:
            try:
                if (await client.get(f"{url}/readyz")).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.1)
    raise AssertionError(f"{url} not ready")


async def wait_for(predicate, timeout_s: float) -> float:  # type: ignore[no-untyped-def]
    t0 = time.monotonic()
    while not predicate():
        assert time.monotonic() - t0 < timeout_s, "condition not reached in time"
        await asyncio.sleep(0.05)
    return time.monotonic() - t0


async def test_killed_worker_process_mid_stream() -> None:
    ports = [free_port(), free_port()]
    procs = [start_worker(p) for p in ports]
    urls = [f"http://127.0.0.1:{p}" for p in ports]
    try:
        for url in urls:
            await wait_ready(url)
        settings = GatewaySettings(health_interval_s=0.2, cooldown_s=0.5)
        app = build_gateway_app(
            settings, parse_graph(GRAPH), lifecycle=Lifecycle(), urls={"alpha": urls}
        )
        gateway = await serve_app(app)
        pool = app.state.gateway.pools["alpha"]
        body = {
            "model": "general",
            "stream": True,
            "max_tokens": 60,
            "messages": [{"role": "user", "content": "hello"}],
        }
        async with httpx.AsyncClient(base_url=gateway.url, timeout=30, trust_env=False) as client:
            await wait_for(lambda: all(r.healthy for r in pool.replicas), 10)
            # Streams on both replicas (least-inflight picks alternate), then kill one process.
            async with (
                client.stream("POST", "/v1/chat/completions", json=body) as r1,
                client.stream("POST", "/v1/chat/completions", json=body) as r2,
            ):
                it1, it2 = r1.aiter_text(), r2.aiter_text()
                head = [await anext(it1), await anext(it2)]
                os.killpg(procs[0].pid, signal.SIGKILL)
                down = pool.replicas[0]
                marked_down = asyncio.create_task(wait_for(lambda: not down.healthy, 5))
                tails = ["".join([c async for c in it1]), "".join([c async for c in it2])]
            bodies = [h + t for h, t in zip(head, tails, strict=True)]
            events = [sse_events(b) for b in bodies]
            assert all(e[-1] == "DONE" for e in events)
            broken = [e for e in events if any("error" in x for x in e if x != "DONE")]
            assert len(broken) == 1, "exactly the stream on the killed worker breaks"
            # A connection lost after the first byte is the upstream's failure: 502's type.
            assert broken[0][-2]["error"]["type"] == "upstream_error", broken[0][-2]

            marked_down_s = await marked_down
            print(f"replica marked down {marked_down_s:.2f}s after the kill")
            # While it is down, requests are served by the other replica.
            for _ in range(3):
                r = await client.post(
                    "/v1/chat/completions", json={**body, "stream": False, "max_tokens": 5}
                )
                assert r.status_code == 200, r.text

            procs[0] = start_worker(ports[0])  # it comes back on the same address
            await wait_ready(urls[0])
            await wait_for(lambda: down.healthy, 10)
        await gateway.stop()
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(5)
