"""`octograph up` reads each worker's start phase from its log (service.embedded.StartWatch):
the progress line names it, and the ready line says how long each phase took."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from service.embedded import StartWatch, WorkerProcess


def test_phases_follow_the_log(tmp_path: Path) -> None:
    log = tmp_path / "worker-m.log"
    log.write_bytes(b"")
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    w = WorkerProcess("m", 1, proc, log, started_at=100.0)
    watch = StartWatch(w)
    assert watch.poll(101.0) == "python + vLLM import"
    with open(log, "ab") as f:
        f.write(b"(MainProcess) INFO [model.py:733] Resolved architecture: LlamaForCausalLM\n")
        f.write(b"(EngineCore pid=1) INFO [core.py:133] Initializing a V1 LLM eng")  # half a line
    assert watch.poll(110.0) == "tokenizer + engine process"
    with open(log, "ab") as f:
        f.write(b"ine (v0.32.0) with config\n(EngineCore) Starting to load model /m...\n")
    assert watch.poll(115.0) == "weights"
    with open(log, "ab") as f:
        f.write(b"Warming up model for the compilation...\n")
        f.write(b'{"level":"info","msg":"engine ready"}\n')
    assert watch.poll(130.0) == "ready"
    # Phases seen in one read start together; the summary covers each one up to readiness.
    assert watch.summary(31.0) == (
        "python + vLLM import 10.0s, tokenizer + engine process 5.0s, model runner start 0.0s, "
        "weights 15.0s, compile + warm-up 1.0s"
    )


def test_a_missing_log_is_the_first_phase(tmp_path: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    w = WorkerProcess("m", 1, proc, tmp_path / "absent.log", started_at=0.0)
    assert StartWatch(w).poll(5.0) == "python + vLLM import"
