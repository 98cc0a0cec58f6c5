"""`octograph up` supervises its workers (issue 17, items 4, 5, 10): a worker that exits while
the gateway serves is started again after a backoff; every run has its own worker secret; the
workers get an allowlisted environment. Fake-engine workers keep this fast."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import psutil
import pytest

from service.embedded import Backoff, Supervisor, WorkerProcess, worker_base_env
from service.zygote import shown_args
from tests.conftest import free_port

REPO = Path(__file__).resolve().parents[2]
CONFIG = """
models:
  a: {engine: fake}
  b: {engine: fake}
nodes:
  general: {kind: model, model: a}
  other: {kind: model, model: b}
"""


def wait_until(pred: Callable[[], bool], what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for: {what}")


def test_backoff_doubles_up_to_the_cap_and_resets_after_a_long_run() -> None:
    b = Backoff(initial_s=1, max_s=8, reset_after_s=60)
    assert [b.delay(uptime_s=0.5) for _ in range(6)] == [1, 2, 4, 8, 8, 8]
    assert b.delay(uptime_s=61) == 1  # it ran a minute: a new failure, not a crash loop
    assert b.delay(uptime_s=2) == 2
    b.failures = 10_000  # no overflow however long it loops
    assert b.delay(uptime_s=0) == 8


def _dying(tmp_path: Path, code: int = 3) -> WorkerProcess:
    cmd = [sys.executable, "-c", f"import sys; sys.exit({code})"]
    log = tmp_path / "w.log"
    proc = subprocess.Popen(cmd, start_new_session=True)
    return WorkerProcess("w", 1, proc, log, cmd, dict(os.environ), started_at=0.0)


def test_supervisor_restarts_a_crash_looping_worker_with_growing_delays(tmp_path: Path) -> None:
    now = [0.0]
    w = _dying(tmp_path)
    w.proc.wait()
    sup = Supervisor([w], backoff=lambda: Backoff(1, 60, 60), clock=lambda: now[0])
    starts: list[float] = []
    for _ in range(4):
        first = w.proc.pid
        sup.check()  # notices the exit, schedules the restart
        delay = {0: 1.0, 1: 2.0, 2: 4.0, 3: 8.0}[len(starts)]
        now[0] += delay - 0.01
        sup.check()
        assert w.proc.pid == first, "restarted before its backoff was over"
        now[0] += 0.01
        sup.check()
        assert w.proc.pid != first and w.restarts == len(starts) + 1
        starts.append(now[0])
        w.proc.wait()
    assert [round(b - a, 2) for a, b in zip(starts, starts[1:], strict=False)] == [2.0, 4.0, 8.0]


def test_supervisor_leaves_running_workers_alone(tmp_path: Path) -> None:
    cmd = [sys.executable, "-c", "import time; time.sleep(30)"]
    proc = subprocess.Popen(cmd, start_new_session=True)
    w = WorkerProcess("w", 1, proc, tmp_path / "w.log", cmd, {})
    try:
        sup = Supervisor([w])
        sup.check()
        assert w.proc is proc and w.restarts == 0
    finally:
        proc.kill()
        proc.wait()


def test_worker_env_is_an_allowlist() -> None:
    env = worker_base_env(
        {
            "PATH": "/bin",
            "HOME": "/h",
            "LD_PRELOAD": "libtcmalloc.so",
            "OCTOGRAPH_WORKER_THREADS": "2",
            "OCTOGRAPH_WORKER_SECRET_FILE": "/somewhere/else",
            "OCTOGRAPH_CACHE_DIR": "/c",
            "VLLM_CPU_KVCACHE_SPACE": "1",
            "HF_HUB_OFFLINE": "1",
            "OMP_NUM_THREADS": "2",
            "OCTOGRAPH_API_KEYS": "sk-gateway",
            "OPENAI_API_KEY": "sk-upstream",
            "AWS_SECRET_ACCESS_KEY": "x",
            "GITHUB_TOKEN": "x",
        }
    )
    assert set(env) == {
        "PATH",
        "HOME",
        "LD_PRELOAD",
        "OCTOGRAPH_WORKER_THREADS",
        "OCTOGRAPH_CACHE_DIR",
        "VLLM_CPU_KVCACHE_SPACE",
        "HF_HUB_OFFLINE",
        "OMP_NUM_THREADS",
    }


def _workers(up: psutil.Process) -> dict[str, psutil.Process]:
    """The worker processes of an `octograph up`, by served name."""
    out = {}
    for child in up.children(recursive=True):
        try:
            cmd = shown_args(child.cmdline())
        except psutil.Error:
            continue
        if "worker" in cmd and "--served-name" in cmd and child.status() != psutil.STATUS_ZOMBIE:
            out[cmd[cmd.index("--served-name") + 1]] = child
    return out


def _port(worker: psutil.Process) -> int:
    cmd = shown_args(worker.cmdline())
    return int(cmd[cmd.index("--port") + 1])


def test_up_secret_env_and_restart_of_a_killed_worker(tmp_path: Path) -> None:
    cfg = tmp_path / "graph.yaml"
    cfg.write_text(CONFIG)
    port = free_port()
    env = {
        **os.environ,
        "OCTOGRAPH_LOG_DIR": str(tmp_path / "logs"),
        "OCTOGRAPH_SHUTDOWN_GRACE_S": "5",
        "OCTOGRAPH_HEALTH_INTERVAL_S": "0.2",
        "OCTOGRAPH_COOLDOWN_S": "0.5",
        "OPENAI_API_KEY": "sk-upstream-must-not-leak",
        "OCTOGRAPH_WORKER_FAKE_REPLY_WORDS": "5",
    }
    up = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "up", "--config", str(cfg), "--port", str(port)],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        assert up.poll() is None, "octograph up exited early"
        try:
            return httpx.get(f"{url}/readyz", timeout=1, trust_env=False).status_code == 200
        except httpx.HTTPError:
            return False

    def chat(model: str) -> int:
        body = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
        try:
            r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=10, trust_env=False)
        except httpx.HTTPError:
            return 0
        return r.status_code

    try:
        wait_until(ready, "octograph up ready", timeout=60)
        workers = _workers(psutil.Process(up.pid))
        assert set(workers) == {"a", "b"}

        # The secret: a 0600 file in a private directory, required by the workers.
        worker_env = workers["a"].environ()
        secret_file = Path(worker_env["OCTOGRAPH_WORKER_SECRET_FILE"])
        assert secret_file.stat().st_mode & 0o777 == 0o600
        assert secret_file.parent.stat().st_mode & 0o777 == 0o700
        info = f"http://127.0.0.1:{_port(workers['a'])}/internal/info"
        assert httpx.get(info, trust_env=False).status_code == 401
        auth = {"authorization": f"Bearer {secret_file.read_text().strip()}"}
        assert httpx.get(info, headers=auth, trust_env=False).status_code == 200
        # The environment: an allowlist (no upstream key), plus what the worker needs.
        assert "OPENAI_API_KEY" not in worker_env and "PATH" in worker_env
        assert worker_env["OCTOGRAPH_WORKER_FAKE_REPLY_WORDS"] == "5"
        assert chat("general") == 200

        # kill -9 a worker: it comes back on the same port, and the gateway uses it again.
        old = workers["a"]
        old_port = _port(old)
        os.killpg(old.pid, signal.SIGKILL)
        t0 = time.monotonic()

        def restarted() -> bool:
            new = _workers(psutil.Process(up.pid)).get("a")
            return new is not None and new.pid != old.pid and _port(new) == old_port

        wait_until(restarted, "worker a restarted", timeout=30)
        wait_until(lambda: chat("general") == 200, "requests to the restarted worker", 30)
        print(f"worker restarted and serving again {time.monotonic() - t0:.1f}s after kill -9")
        assert chat("other") == 200  # the other worker was never touched

        up.send_signal(signal.SIGTERM)
        out = up.communicate(timeout=60)[0].decode()
        assert up.returncode == 0, out
        assert "worker 'a' exited" in out and "worker 'a' restarted" in out
        assert not secret_file.exists() and not secret_file.parent.exists()
    finally:
        if up.poll() is None:
            up.kill()
            up.wait()


def test_up_refuses_several_gateway_processes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`octograph up` serves one gateway process: OCTOGRAPH_PROCESSES is refused, not ignored."""
    from service.config import StartupError
    from service.embedded import run_embedded

    config = tmp_path / "graph.yaml"
    config.write_text(CONFIG)
    monkeypatch.setenv("OCTOGRAPH_PROCESSES", "2")
    with pytest.raises(StartupError, match="one gateway process"):
        run_embedded(config, host="127.0.0.1", port=free_port())
