"""`octograph up` starts at most one worker per core at a time (service/start_gate.py): the
others are queued processes that wait, before importing anything heavy, until wait_ready opens
their gate as earlier workers become ready. Fake-engine workers keep this fast."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
import psutil
import pytest

from service.embedded import start_workers, stop_workers, wait_ready
from service.graph.schema import parse_graph
from service.start_gate import wait_for_gate

GRAPH = parse_graph(
    "models:\n"
    "  small: {engine: fake}\n"
    "  big: {engine: fake}\n"
    "  mid: {engine: fake}\n"
    "nodes:\n"
    "  a: {kind: model, model: small}\n"
    "  b: {kind: model, model: big}\n"
    "  c: {kind: model, model: mid}\n"
)


def _serving(url: str) -> bool:
    try:
        return httpx.get(f"{url}/livez", timeout=1, trust_env=False).status_code == 200
    except httpx.HTTPError:
        return False


def test_queued_workers_start_one_per_free_core_costliest_first(tmp_path: Path) -> None:
    # Fake workers have no model files: the start cost is read from these stand-in dirs.
    dirs = {}
    for name, size in (("small", 10), ("big", 3000), ("mid", 500)):
        d = tmp_path / name
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"\0" * size)
        dirs[name] = d
    workers = start_workers(GRAPH, dirs, tmp_path / "logs", start_slots=1)
    try:
        assert [w.name for w in workers] == ["big", "mid", "small"]
        first, queued = workers[0], workers[1:]
        assert first.gate is None and all(w.gate is not None for w in queued)
        assert all("--start-gate" not in w.cmd for w in workers)  # a restart never waits
        wait_ready([first], timeout_s=60)
        # Nothing opened the queued gates yet: those processes live but serve nothing.
        for w in queued:
            assert w.proc.poll() is None
            assert not _serving(w.url)
            assert "Uvicorn running" not in w.log_path.read_text(errors="replace")
        wait_ready(workers, timeout_s=120)
        assert all(_serving(w.url) for w in workers)
        # One at a time: each queued worker began after the one before it was ready.
        assert first.started_at < queued[0].started_at < queued[1].started_at
        assert not any(w.gate.exists() for w in queued if w.gate is not None)
    finally:
        stop_workers(workers)
    assert all(w.proc.poll() is not None for w in workers)


def test_a_queued_worker_exits_when_its_starter_is_gone(tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    waiter_py = tmp_path / "waiter.py"
    waiter_py.write_text(
        "import sys\n"
        "from pathlib import Path\n"
        "from service.start_gate import wait_for_gate\n"
        f"wait_for_gate(Path({str(gate)!r}), starter=int(sys.argv[1]), poll_s=0.05)\n"
    )
    starter_py = tmp_path / "starter.py"
    starter_py.write_text(
        "import subprocess, sys\n"
        "import os\n"
        f"p = subprocess.Popen([sys.executable, {str(waiter_py)!r}, str(os.getpid())],\n"
        "                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)\n"
        "print(p.pid, flush=True)\n"
    )
    repo = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(repo)}
    out = subprocess.run(
        [sys.executable, str(starter_py)], capture_output=True, text=True, env=env, timeout=30
    ).stdout
    waiter = psutil.Process(int(out.strip()))
    # The starter exited without opening the gate: the waiter notices and exits too.
    try:
        waiter.wait(timeout=10)
    except psutil.TimeoutExpired:
        waiter.kill()
        pytest.fail("the queued process kept waiting for a gate nobody can open")


def test_an_open_gate_lets_the_waiter_through(tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    gate.touch()
    wait_for_gate(gate, starter=os.getppid(), poll_s=0.01)  # returns at once
