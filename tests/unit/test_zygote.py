"""The zygote (service/zygote.py): `octograph up` forks its workers from one process that
imported what they import. A forked worker must behave like a spawned one: its own session,
its log, exactly the environment it was given, its command line in `ps`, and its exit status
reported to the parent that supervises it. Fake-engine workers keep this fast."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest

from service.embedded import CLI_PREFIX, ZygoteLauncher
from service.zygote import ForkedProcess, Zygote, ZygoteError, shown_args
from tests.conftest import free_port

LIGHT = ["service.cli", "service.worker.app", "service.worker.fake_engine"]


def _get(url: str, **kw: object) -> httpx.Response | None:
    try:
        return httpx.get(url, timeout=1, trust_env=False, **kw)  # type: ignore[arg-type]
    except httpx.HTTPError:
        return None


def _wait_serving(url: str, proc: ForkedProcess, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"the forked worker exited ({proc.returncode})"
        r = _get(f"{url}/readyz")
        if r is not None and r.status_code == 200:
            return
        time.sleep(0.1)
    pytest.fail(f"{url} not ready in {timeout_s}s")


def _fake_worker_argv(port: int, name: str = "w") -> list[str]:
    return ["worker", "--fake", "--model", name, "--served-name", name, "--port", str(port)]


def test_a_forked_worker_has_its_own_session_log_environment_and_title(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("s3cret\n")
    secret.chmod(0o600)
    # The zygote's environment holds a secret file setting; the worker's given one does not,
    # and carries a setting of its own: what the worker does shows which one it runs with.
    zygote_env = {"PATH": os.environ["PATH"], "OCTOGRAPH_WORKER_SECRET_FILE": str(secret)}
    worker_env = {"PATH": os.environ["PATH"], "OCTOGRAPH_WORKER_MAX_NUM_SEQS": "7"}
    zygote = Zygote.start(LIGHT, zygote_env, tmp_path / "zygote.log")
    port = free_port()
    log = tmp_path / "worker.log"
    try:
        assert zygote.wait_ready(60) >= 0
        proc = zygote.fork(_fake_worker_argv(port), worker_env, log, title="octograph worker x")
        url = f"http://127.0.0.1:{port}"
        _wait_serving(url, proc)
        worker = psutil.Process(proc.pid)
        assert worker.ppid() == zygote.pid
        assert os.getpgid(proc.pid) == proc.pid and os.getsid(proc.pid) == proc.pid
        assert shown_args(worker.cmdline()) == ["octograph", "worker", "x"]
        # No secret in its environment: the internal API answers without a bearer token, and
        # the worker's own setting is the one it runs with.
        info = _get(f"{url}/internal/info")
        assert info is not None and info.status_code == 200, info
        assert info.json()["max_num_seqs"] == 7
        assert "Uvicorn running" in log.read_text()
        # Its exit status reaches the parent: killed by SIGKILL is -9, as Popen reports it.
        os.killpg(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=10) == -signal.SIGKILL
    finally:
        zygote.close()
    assert zygote.proc.returncode == 0  # stdin closed: it ended on its own


def test_exit_codes_and_a_failing_command_are_reported(tmp_path: Path) -> None:
    zygote = Zygote.start(["service.cli"], {"PATH": os.environ["PATH"]}, tmp_path / "z.log")
    good = tmp_path / "graph.yaml"
    good.write_text("models:\n  a: {engine: fake}\nnodes:\n  n: {kind: model, model: a}\n")
    try:
        ok = zygote.fork(["graph", "check", str(good)], {}, tmp_path / "ok.log")
        bad = zygote.fork(["graph", "check", str(tmp_path / "absent.yaml")], {}, tmp_path / "b.log")
        assert ok.wait(timeout=30) == 0
        assert "ok: 1 models" in (tmp_path / "ok.log").read_text()
        assert bad.wait(timeout=30) not in (0, None)
        # A request the zygote cannot read is refused, and the zygote keeps serving.
        assert zygote.proc.stdin is not None
        zygote.proc.stdin.write(b'{"argv": 3}\n')
        zygote.proc.stdin.flush()
        with pytest.raises(ZygoteError, match="bad request"):
            zygote.fork(["graph", "check", str(good)], {}, tmp_path / "ok2.log")
        again = zygote.fork(["graph", "check", str(good)], {}, tmp_path / "ok3.log")
        assert again.wait(timeout=30) == 0
    finally:
        zygote.close()


def test_a_gone_zygote_falls_back_to_spawning_and_its_children_stay_supervised(
    tmp_path: Path,
) -> None:
    zygote = Zygote.start(LIGHT, {"PATH": os.environ["PATH"]}, tmp_path / "z.log")
    launcher = ZygoteLauncher(zygote)
    cmd = [sys.executable, *CLI_PREFIX, *_fake_worker_argv(free_port())]
    forked = launcher.launch(cmd, {"PATH": os.environ["PATH"]}, tmp_path / "a.log")
    spawned = None
    try:
        assert isinstance(forked, ForkedProcess)
        _wait_serving(f"http://127.0.0.1:{cmd[-1]}", forked)
        zygote.close()  # the zygote ends; the worker it forked lives on
        assert forked.poll() is None and psutil.pid_exists(forked.pid)
        with pytest.raises(ZygoteError):
            zygote.fork(["graph", "--help"], {}, tmp_path / "x.log")
        cmd2 = [sys.executable, *CLI_PREFIX, *_fake_worker_argv(free_port(), "v")]
        spawned = launcher.launch(cmd2, {"PATH": os.environ["PATH"]}, tmp_path / "b.log")
        assert isinstance(spawned, subprocess.Popen)
        # Without its zygote, a forked worker's exit is still seen (status unknown: -1).
        os.killpg(forked.pid, signal.SIGKILL)
        assert forked.wait(timeout=10) == -1
    finally:
        for proc in (forked, spawned):
            if proc is not None and proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)


def test_workers_are_forked_on_cpu_builds_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A GPU build's workers are spawned: importing torch and vLLM may initialise CUDA, which a
    forked child cannot use. Fake-engine graphs fork anyway (nothing of vLLM is imported)."""
    from service.embedded import SpawnLauncher, start_launcher
    from service.graph.schema import load_graph
    from service.worker import vllm_engine

    repo = Path(__file__).resolve().parents[2]
    graph = load_graph(repo / "configs/local.yaml")
    monkeypatch.setattr(vllm_engine, "is_vllm_cpu_build", lambda: False)
    env = {"PATH": os.environ["PATH"]}
    assert isinstance(start_launcher(graph, ["smollm2"], env, tmp_path), SpawnLauncher)
    fake = graph.model_copy(
        update={
            "models": {"smollm2": graph.models["smollm2"].model_copy(update={"engine": "fake"})}
        }
    )
    launcher = start_launcher(fake, ["smollm2"], env, tmp_path)
    try:
        assert isinstance(launcher, ZygoteLauncher)
    finally:
        launcher.close()
