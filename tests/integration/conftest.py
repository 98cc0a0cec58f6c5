"""Real engines: vLLM workers on the packaged models, started once per test session and shared
by every slow test (engine start is the expensive part), plus gateways as real processes."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from service.embedded import WorkerProcess, free_port, start_workers, stop_workers, wait_ready
from service.graph.schema import parse_graph
from service.models import packaged

REPO = Path(__file__).resolve().parents[2]


@dataclass
class RealWorkers:
    procs: dict[str, WorkerProcess]

    def url(self, model: str) -> str:
        return self.procs[model].url


@pytest.fixture(scope="session")
def real_workers() -> Iterator[RealWorkers]:
    """smollm2 + gemma3 workers (one thread each on this 2-core machine), configured as
    `octograph up` configures the shipped graph's: both are ensemble members, so their KV
    blocks are 32 tokens (service.embedded.worker_env)."""
    for name in ("smollm2", "gemma3"):
        if not packaged.is_prepared(name):
            pytest.fail(f"packaged model {name} not prepared: run `octograph models prepare`")
    graph = parse_graph(
        "models:\n"
        "  smollm2: {packaged: smollm2, max_model_len: 2048}\n"
        "  gemma3: {packaged: gemma3, max_model_len: 2048}\n"
        "nodes:\n"
        "  blend: {kind: ensemble, members: [{model: smollm2}, {model: gemma3}]}\n"
    )
    dirs = {n: packaged.model_dir(n) for n in ("smollm2", "gemma3")}
    log_dir = Path(tempfile.mkdtemp(prefix="octograph-it-"))
    procs = start_workers(graph, dirs, log_dir)
    try:
        wait_ready(procs, timeout_s=600)
        yield RealWorkers({p.name: p for p in procs})
    finally:
        stop_workers(procs)


@dataclass
class GatewayProcess:
    url: str
    proc: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def start_gateway(config_text: str, env: dict[str, str] | None = None) -> GatewayProcess:
    tmp = Path(tempfile.mkdtemp(prefix="octograph-gw-"))
    cfg = tmp / "graph.yaml"
    cfg.write_text(config_text)
    port = free_port()
    log_path = tmp / "gateway.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "gateway", "--config", str(cfg), "--port", str(port)],
        cwd=REPO,
        stdout=open(log_path, "wb"),  # noqa: SIM115 - the child owns it
        stderr=subprocess.STDOUT,
        env={**os.environ, "OCTOGRAPH_HEALTH_INTERVAL_S": "0.5", **(env or {})},
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"gateway exited:\n{log_path.read_text()}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                return GatewayProcess(url, proc, log_path)
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"gateway not ready:\n{log_path.read_text()}")


def stop_gateway(gw: GatewayProcess) -> int:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(gw.proc.pid, signal.SIGTERM)
    try:
        return gw.proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(gw.proc.pid, signal.SIGKILL)
        return -9


GatewayFactory = Callable[..., GatewayProcess]


@pytest.fixture
def real_gateway() -> Iterator[GatewayFactory]:
    started: list[GatewayProcess] = []

    def factory(config_text: str, env: dict[str, str] | None = None) -> GatewayProcess:
        gw = start_gateway(config_text, env)
        started.append(gw)
        return gw

    yield factory
    for gw in started:
        stop_gateway(gw)
