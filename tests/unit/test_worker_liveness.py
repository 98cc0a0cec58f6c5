"""A worker whose engine dies after start-up is not alive (issue 17, item 5): /livez turns 503
(Kubernetes restarts the pod), /readyz and new work 503, and the death hook runs once (the CLI
drains and exits non-zero with it). An engine still loading or failing to start is not dead:
/livez stays 200 there (a model load takes minutes; a start failure is a readiness matter)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from service.embedded import WorkerProcess, wait_ready
from service.serving import Lifecycle
from service.worker.app import ENGINE_DEAD, build_worker_app
from service.worker.fake_engine import FakeEngine
from tests.conftest import serve_app

GENERATE = {"request_id": "r1", "prompt": "hello there", "sampling": {"max_tokens": 3}}


async def _until(pred, what: str, timeout: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await pred():
        assert loop.time() < deadline, what
        await asyncio.sleep(0.02)


async def test_a_dead_engine_fails_liveness_and_calls_the_death_hook() -> None:
    engine = FakeEngine(name="a", max_model_len=256)
    deaths: list[int] = []
    app = build_worker_app(
        engine, Lifecycle(), on_engine_death=lambda: deaths.append(1), watch_interval_s=0.02
    )
    served = await serve_app(app)
    url = served.url
    try:
        async with httpx.AsyncClient(timeout=10, trust_env=False) as c:

            async def ready() -> bool:
                return (await c.get(f"{url}/readyz")).status_code == 200

            await _until(ready, "worker ready")
            assert (await c.get(f"{url}/livez")).status_code == 200
            engine._ready = False  # what vLLM's `errored` says once the engine core has died

            async def dead() -> bool:
                return (await c.get(f"{url}/livez")).status_code == 503

            await _until(dead, "/livez 503 after the engine died")
            assert (await c.get(f"{url}/livez")).json() == {"status": "engine dead"}
            assert (await c.get(f"{url}/readyz")).status_code == 503
            r = await c.post(f"{url}/internal/generate", json=GENERATE)
            assert r.status_code == 503 and r.json()["error"]["message"] == ENGINE_DEAD
            await asyncio.sleep(0.1)
            assert deaths == [1]
            assert app.state.worker.engine_died
    finally:
        await served.stop()


async def test_loading_and_failed_start_are_not_dead() -> None:
    gate = asyncio.Event()

    class Slow(FakeEngine):
        async def start(self) -> None:
            await gate.wait()
            raise RuntimeError("no weights")

    engine = Slow(name="a", max_model_len=256)
    deaths: list[int] = []
    served = await serve_app(
        build_worker_app(
            engine, Lifecycle(), on_engine_death=lambda: deaths.append(1), watch_interval_s=0.02
        )
    )
    try:
        async with httpx.AsyncClient(timeout=10, trust_env=False) as c:
            assert (await c.get(f"{served.url}/livez")).status_code == 200  # loading
            gate.set()
            await asyncio.sleep(0.2)
            assert (await c.get(f"{served.url}/livez")).status_code == 200  # failed start
            r = await c.get(f"{served.url}/readyz")
            assert r.status_code == 503 and "failed to start" in r.json()["status"]
            assert deaths == []
    finally:
        await served.stop()


async def test_octograph_up_stops_waiting_for_a_worker_whose_engine_failed_to_start(
    tmp_path: Path,
) -> None:
    """`octograph up` used to wait its whole start timeout (900 s) on such a worker."""

    class Broken(FakeEngine):
        async def start(self) -> None:
            raise RuntimeError("no weights")

    served = await serve_app(build_worker_app(Broken(name="a"), Lifecycle()))
    log = tmp_path / "worker-a.log"
    log.write_text("engine failed to start: the worker's own words\n")
    stand_in = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    port = int(served.url.rsplit(":", 1)[1])
    try:
        worker = WorkerProcess("a", port, stand_in, log)
        started = time.monotonic()
        with pytest.raises(RuntimeError, match="engine failed to start") as failed:
            await asyncio.to_thread(wait_ready, [worker], 120)
        assert "the worker's own words" in str(failed.value)  # its log comes with it
        assert time.monotonic() - started < 60, "waited as if the worker could still start"
    finally:
        stand_in.kill()
        stand_in.wait()
        await served.stop()
