"""A real vLLM worker whose engine-core process is killed (issue 17, item 5): the worker notices
(vLLM's process sentinel), fails liveness and exits non-zero, and `octograph up` starts it
again; the gateway then serves from the new worker. One smollm2 worker under `octograph up`
(its own, not the shared session workers: this test kills it)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import psutil
import pytest

from service.cli import ENGINE_DEAD_EXIT
from service.models import packaged
from service.zygote import shown_args
from tests.conftest import free_port

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
CONFIG = """
models:
  smollm2: {packaged: smollm2, max_model_len: 512}
nodes:
  general: {kind: model, model: smollm2}
"""


def wait_until(pred: Callable[[], bool], what: str, timeout: float) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if pred():
            return time.monotonic() - t0
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for: {what}")


def worker_of(up: psutil.Process) -> psutil.Process | None:
    """The worker front end: forked from up's zygote, so a grandchild; its engine core, forked
    from it, carries the same title until vLLM renames it."""
    serving: dict[int, psutil.Process] = {}
    for child in up.children(recursive=True):
        try:
            if "--served-name" in shown_args(child.cmdline()) and (
                child.status() != psutil.STATUS_ZOMBIE
            ):
                serving[child.pid] = child
        except psutil.Error:
            continue
    for child in serving.values():
        with contextlib.suppress(psutil.Error):
            if child.ppid() not in serving:
                return child
    return None


def engine_core_of(worker: psutil.Process) -> psutil.Process:
    """vLLM's engine-core child (it names itself `VLLM::EngineCore`)."""
    for child in worker.children(recursive=True):
        try:
            if "EngineCore" in child.name() or "EngineCore" in " ".join(child.cmdline()):
                return child
        except psutil.Error:
            continue
    raise AssertionError(f"no EngineCore child under {worker.pid}: {worker.children(True)}")


def test_killed_engine_core_makes_the_worker_exit_and_up_restarts_it() -> None:
    if not packaged.is_prepared("smollm2"):
        pytest.fail("packaged model smollm2 not prepared: run `octograph models prepare`")
    tmp = Path(tempfile.mkdtemp(prefix="octograph-death-"))
    cfg = tmp / "graph.yaml"
    cfg.write_text(CONFIG)
    port = free_port()
    log_path = tmp / "up.log"
    up = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "up", "--config", str(cfg), "--port", str(port)],
        cwd=REPO,
        env={**os.environ, "OCTOGRAPH_LOG_DIR": str(tmp / "logs"), "OCTOGRAPH_LOG_JSON": "false"},
        stdout=open(log_path, "wb"),  # noqa: SIM115 - the child owns it
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"

    def gateway_status(path: str = "/readyz") -> int:
        assert up.poll() is None, f"octograph up exited:\n{log_path.read_text()[-3000:]}"
        try:
            return httpx.get(f"{url}{path}", timeout=2, trust_env=False).status_code
        except httpx.HTTPError:
            return 0

    def chat() -> int:
        body = {
            "model": "general",
            "max_tokens": 4,
            "messages": [{"role": "user", "content": "Say hi."}],
        }
        try:
            r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60, trust_env=False)
        except httpx.HTTPError:
            return 0
        return r.status_code

    try:
        wait_until(lambda: gateway_status() == 200, "octograph up ready", timeout=900)
        assert chat() == 200
        worker = worker_of(psutil.Process(up.pid))
        assert worker is not None
        worker_args = shown_args(worker.cmdline())
        worker_port = int(worker_args[worker_args.index("--port") + 1])
        core = engine_core_of(worker)
        print(f"worker {worker.pid}, engine core {core.pid} ({core.name()})")

        core.send_signal(signal.SIGKILL)
        t_kill = time.monotonic()
        livez: list[int] = []

        def worker_gone_or_not_alive() -> bool:
            if not worker.is_running() or worker.status() == psutil.STATUS_ZOMBIE:
                return True
            try:
                code = httpx.get(f"http://127.0.0.1:{worker_port}/livez", timeout=2).status_code
            except httpx.HTTPError:
                return False
            livez.append(code)
            return code == 503

        noticed = wait_until(worker_gone_or_not_alive, "worker exit or /livez 503", 60)
        print(f"engine death noticed {noticed:.1f}s after kill -9 (livez seen: {livez[-3:]})")
        exited = wait_until(lambda: not worker.is_running(), "worker exit", 60)
        print(f"worker exited {time.monotonic() - t_kill:.1f}s after the kill ({exited:.1f})")
        wait_until(
            lambda: f"worker 'smollm2' exited ({ENGINE_DEAD_EXIT})" in log_path.read_text(),
            f"up reports exit code {ENGINE_DEAD_EXIT}",
            30,
        )

        def new_worker() -> bool:
            w = worker_of(psutil.Process(up.pid))
            return w is not None and w.pid != worker.pid

        wait_until(new_worker, "a new worker process", 60)
        back = wait_until(lambda: chat() == 200, "chat served by the restarted worker", 900)
        print(f"serving again {time.monotonic() - t_kill:.1f}s after the kill (+{back:.1f}s)")
        assert "worker 'smollm2' restarted" in log_path.read_text()
    finally:
        with_term = up.poll() is None
        if with_term:
            os.killpg(up.pid, signal.SIGTERM)
        try:
            code = up.wait(timeout=90)
        except subprocess.TimeoutExpired:
            os.killpg(up.pid, signal.SIGKILL)
            code = up.wait()
        print(log_path.read_text()[-2000:])
    assert code == 0
