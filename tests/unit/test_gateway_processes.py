"""Issue 22 item 4: `octograph gateway --processes N`, N gateway processes on one port.

Real processes: a fake worker (`octograph worker --fake`) and `octograph gateway --processes 2`.
What each child served is read from its own Prometheus files (prometheus_client's multiprocess
directory keeps one file per pid), so "both children served some" and "/metrics is one view"
are checked against the same numbers the gateway reports, with no debugging header."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from pydantic import SecretStr

from service.config import GatewaySettings, StartupError
from service.gateway.processes import (
    PER_KEY_LIMITS,
    REFUSED_EXIT,
    GatewayProcesses,
    check_processes,
    handles_signal,
)
from service.observability.multiprocess import merged_registry
from tests.conftest import free_port, spawn_cli
from tests.redis_server import RedisServer

REPO = Path(__file__).resolve().parents[2]
TOKEN_DELAY_S = 0.05  # the fake worker's pace: a 1-token answer is quick, a long stream is not
SHORT = {"model": "general", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
REQUESTS_TOTAL = 'octograph_requests_total{node="general",status_class="2xx"}'


def wait_for(check: Callable[[], bool], what: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def children_of(pid: int) -> set[int]:
    """Live (not zombie) processes whose parent is `pid`, from /proc."""
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        state, ppid = stat.rpartition(")")[2].split()[:2]
        if int(ppid) == pid and state != "Z":
            found.add(int(entry.name))
    return found


def listeners(port: int) -> int:
    """Sockets listening on 127.0.0.1:`port` (one per gateway process that serves)."""
    count = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, _, state = line.split()[1:4]
        if local.endswith(f":{port:04X}") and state == "0A":
            count += 1
    return count


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def stop(proc: subprocess.Popen[bytes], *, children: Collection[int] = ()) -> None:
    """Ends `proc`: SIGTERM, then SIGKILL; then any of `children` still running (a gateway
    process is killed only while its command line names `proc` as its parent, so a reused pid
    is left alone)."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    for pid in children:
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"--supervised-by" in cmdline and str(proc.pid).encode() in cmdline:
            os.kill(pid, signal.SIGKILL)


def series_name(name: str, labels: dict[str, str]) -> str:
    """As the exposition writes it: `name{a="x",b="y"}`, or the bare name."""
    if not labels:
        return name
    return name + "{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}"


@dataclass
class Gateway:
    proc: subprocess.Popen[bytes]
    url: str
    port: int
    metrics_port: int
    tmp: Path
    log: Path

    @property
    def metrics_dir(self) -> Path:
        dirs = list(self.tmp.glob("octograph-metrics-*"))
        assert len(dirs) == 1, dirs
        return dirs[0]

    def children(self) -> set[int]:
        return children_of(self.proc.pid)

    def wait_serving(self, processes: int = 2) -> set[int]:
        """Until `processes` children listen on the port; returns their pids."""

        def serving() -> bool:
            assert self.proc.poll() is None, self.log.read_text()
            return len(self.children()) == processes and listeners(self.port) == processes

        wait_for(serving, f"{processes} gateway processes listening")
        return self.children()

    def metrics(self, port: int | None = None) -> dict[str, float]:
        r = httpx.get(f"http://127.0.0.1:{port or self.port}/metrics", trust_env=False)
        assert r.status_code == 200, r.text
        return {
            series_name(s.name, s.labels): s.value
            for family in text_string_to_metric_families(r.text)
            for s in family.samples
        }

    def per_process(self, sample: str, kind: str) -> dict[int, float]:
        """`sample` as each process alone reports it, from its own files (`kind`: counter,
        gauge_livesum...) in the multiprocess directory."""
        out = {}
        for file in self.metrics_dir.glob(f"{kind}_*.db"):
            pid = int(file.stem.rpartition("_")[2])
            alone = self.tmp / f"one-{pid}-{time.monotonic_ns()}"
            alone.mkdir()
            shutil.copy(file, alone)
            out[pid] = sum(
                s.value
                for family in merged_registry(alone).collect()
                for s in family.samples
                if s.name == sample
            )
        return out


@contextmanager
def running_gateway(tmp_path: Path, env: dict[str, str] | None = None) -> Iterator[Gateway]:
    """A fake worker and `octograph gateway --processes 2 --metrics-port ...` in front of it,
    with `env` added to the gateway's environment; both stopped at the end."""
    worker_port, port, metrics_port = free_port(), free_port(), free_port()
    graph = tmp_path / "graph.yaml"
    graph.write_text(
        "models:\n"
        f"  fake: {{urls: ['http://127.0.0.1:{worker_port}'], max_model_len: 4096}}\n"
        "nodes:\n"
        "  general: {kind: model, model: fake}\n"
    )
    worker = spawn_cli(
        ["worker", "--fake", "--model", "fake", "--port", str(worker_port),
         "--fake-token-delay", str(TOKEN_DELAY_S), "--fake-reply-words", "200"],
        tmp_path / "worker.log",
    )  # fmt: skip
    log = tmp_path / "gateway.log"
    proc = spawn_cli(
        ["gateway", "--config", str(graph), "--port", str(port), "--processes", "2",
         "--metrics-port", str(metrics_port)],
        log,
        # TMPDIR: the multiprocess directory (tempfile) lands where the test can see it.
        env={"TMPDIR": str(tmp_path), "OCTOGRAPH_LOG_JSON": "false", **(env or {})},
    )  # fmt: skip
    gw = Gateway(proc, f"http://127.0.0.1:{port}", port, metrics_port, tmp_path, log)
    seen: set[int] = set()
    try:
        wait_for(lambda: worker.poll() is None and _ready(f"http://127.0.0.1:{worker_port}"),
                 "the fake worker")  # fmt: skip
        seen |= gw.wait_serving()
        wait_for(lambda: _ready(gw.url), "gateway readiness")
        yield gw
    finally:
        seen |= gw.children()
        stop(proc, children=seen)
        stop(worker)


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[Gateway]:
    with running_gateway(tmp_path) as gw:
        yield gw


def _ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/readyz", timeout=1, trust_env=False).status_code == 200
    except httpx.HTTPError:
        return False


def chat(
    url: str, body: dict[str, object] = SHORT, headers: dict[str, str] | None = None
) -> httpx.Response:
    """One request on a connection of its own (the kernel picks a process per connection)."""
    return httpx.post(
        f"{url}/v1/chat/completions", json=body, headers=headers, timeout=30, trust_env=False
    )


def test_both_processes_serve_and_metrics_are_one_view(gateway: Gateway) -> None:
    pids = gateway.children()
    sent = 40
    for _ in range(sent):
        r = chat(gateway.url)
        assert r.status_code == 200, r.text
    served = gateway.per_process("octograph_requests_total", "counter")
    assert set(served) == pids
    assert sum(served.values()) == sent
    assert all(n > 0 for n in served.values()), served  # the kernel used both sockets
    # Whichever process answers a scrape, and the parent's --metrics-port: the total.
    for _ in range(4):
        assert gateway.metrics()[REQUESTS_TOTAL] == sent
    assert gateway.metrics(gateway.metrics_port)[REQUESTS_TOTAL] == sent


def test_a_killed_process_is_restarted_and_its_counts_stay(gateway: Gateway) -> None:
    for _ in range(10):
        assert chat(gateway.url).status_code == 200
    # A long stream holds one in-flight sequence in one process: kill that very process.
    with httpx.stream("POST", f"{gateway.url}/v1/chat/completions", trust_env=False, timeout=30,
                      json={**SHORT, "max_tokens": 150, "stream": True}) as stream:  # fmt: skip
        lines = stream.iter_lines()  # kept: a dropped iterator closes the connection
        next(lines)
        inflight = gateway.per_process("octograph_gateway_inflight_requests", "gauge_livesum")
        holder = next(pid for pid, n in inflight.items() if n == 1)
        assert gateway.metrics()["octograph_gateway_inflight_requests"] == 1
        os.kill(holder, signal.SIGKILL)
        with pytest.raises(httpx.HTTPError):
            for _ in lines:
                pass
    pids = gateway.wait_serving()
    assert holder not in pids
    for _ in range(10):  # served throughout, by the survivor and then by both
        assert chat(gateway.url).status_code == 200
    view = gateway.metrics()
    # The dead process's requests still count; its in-flight stream no longer does.
    assert view[REQUESTS_TOTAL] == 20
    assert view["octograph_gateway_inflight_requests"] == 0
    assert "restarting it" in gateway.log.read_text()


def test_sigterm_drains_every_process_and_leaves_none(gateway: Gateway) -> None:
    pids = gateway.children()
    metrics_dir = gateway.metrics_dir
    # SIGHUP (graph reload) goes on to children that handle it, and kills none of them.
    gateway.proc.send_signal(signal.SIGHUP)
    time.sleep(0.5)
    assert gateway.children() == pids
    tokens = 30
    with httpx.stream("POST", f"{gateway.url}/v1/chat/completions", trust_env=False, timeout=30,
                      json={**SHORT, "max_tokens": tokens, "stream": True}) as stream:  # fmt: skip
        lines = stream.iter_lines()
        first = next(lines)
        gateway.proc.send_signal(signal.SIGTERM)
        rest = list(lines)
    events = [line for line in [first, *rest] if line]
    chunks = [line for line in events if line.startswith("data: {")]
    assert len(chunks) >= tokens and events[-1] == "data: [DONE]"  # the stream ran to its end
    assert gateway.proc.wait(60) == 0, gateway.log.read_text()
    assert not [pid for pid in pids if alive(pid)]
    assert not metrics_dir.exists()


def test_per_key_limits_hold_across_processes_with_redis(
    tmp_path: Path,
    redis_server: RedisServer,  # noqa: F811 (fixture)
) -> None:
    """One sequence in flight per key: a stream holds it in one process, and the same key is
    refused in the other process too, since the lease is in Redis."""
    auth = {"authorization": "Bearer k1"}
    env = {"OCTOGRAPH_REDIS_URL": redis_server.url, "OCTOGRAPH_API_KEYS": '["k1"]',
           "OCTOGRAPH_MAX_INFLIGHT_PER_KEY": "1"}  # fmt: skip
    with running_gateway(tmp_path, env) as gateway:
        body = {**SHORT, "max_tokens": 150, "stream": True}
        with httpx.stream("POST", f"{gateway.url}/v1/chat/completions", json=body,
                          headers=auth, trust_env=False, timeout=30) as stream:  # fmt: skip
            lines = stream.iter_lines()  # kept: a dropped iterator closes the connection
            next(lines)
            refused = [chat(gateway.url, headers=auth) for _ in range(20)]
        assert all(r.status_code == 429 for r in refused), [r.text for r in refused]
        assert all("key_concurrency_exceeded" in r.text for r in refused)
        by_process = gateway.per_process("octograph_admission_rejected_total", "counter")
        assert sum(by_process.values()) == 20
        assert len(by_process) == 2 and all(n > 0 for n in by_process.values()), by_process
        assert chat(gateway.url, headers=auth).status_code == 200  # the stream's lease is back
        # One series for the gateway (not one per process): 1, every process reaches Redis.
        assert gateway.metrics(gateway.metrics_port)["octograph_shared_limits_up"] == 1


def test_a_port_in_use_is_refused_even_by_a_reuseport_listener(tmp_path: Path) -> None:
    """Children bind with SO_REUSEPORT; without the parent's check they would share the port
    with any other such listener of this user (a gateway left from another run)."""
    port = free_port()
    with socket.socket() as other:
        other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        other.bind(("127.0.0.1", port))
        other.listen()
        log = tmp_path / "gateway.log"
        proc = spawn_cli(["gateway", "--port", str(port), "--processes", "2"], log)
        try:
            assert proc.wait(60) == 2
        finally:
            stop(proc)
    out = log.read_text()
    assert f"cannot serve on 127.0.0.1:{port}" in out and "Traceback" not in out


def test_per_key_limits_without_redis_are_refused_with_several_processes(tmp_path: Path) -> None:
    log = tmp_path / "gateway.log"
    # OCTOGRAPH_PROCESSES: the setting, as a container would set it.
    proc = spawn_cli(["gateway", "--port", str(free_port())], log,
                 env={"OCTOGRAPH_PROCESSES": "2", "OCTOGRAPH_RATE_LIMIT_RPM": "60"})  # fmt: skip
    try:
        assert proc.wait(60) == 2
    finally:
        stop(proc)
    out = log.read_text()
    assert "OCTOGRAPH_RATE_LIMIT_RPM" in out and "needs OCTOGRAPH_REDIS_URL" in out, out
    assert "Traceback" not in out


@pytest.mark.parametrize("limit", sorted(PER_KEY_LIMITS))
def test_each_per_key_limit_needs_redis_with_several_processes(limit: str) -> None:
    limits: dict[str, Any] = {limit: 10}
    with pytest.raises(StartupError, match=PER_KEY_LIMITS[limit]):
        check_processes(GatewaySettings(processes=2, **limits))
    check_processes(GatewaySettings(processes=1, **limits))  # one process: its own
    redis = SecretStr("redis://127.0.0.1:6379/0")
    check_processes(GatewaySettings(processes=2, redis_url=redis, **limits))  # shared
    check_processes(GatewaySettings(processes=2))  # gateway-wide limits: per process


def test_handles_signal_reads_the_caught_mask() -> None:
    previous = signal.signal(signal.SIGUSR2, lambda *_: None)
    try:
        assert handles_signal(os.getpid(), signal.SIGUSR2)
        signal.signal(signal.SIGUSR2, signal.SIG_DFL)
        assert not handles_signal(os.getpid(), signal.SIGUSR2)
    finally:
        signal.signal(signal.SIGUSR2, previous)


def _supervisor(command: list[str], tmp_path: Path, now: list[float]) -> GatewayProcesses:
    return GatewayProcesses(
        command=command,
        env=dict(os.environ),
        metrics_dir=tmp_path,
        count=1,
        grace_s=1.0,
        clock=lambda: now[0],
    )


def test_a_process_that_exits_is_restarted_after_a_growing_backoff(tmp_path: Path) -> None:
    now = [100.0]
    processes = _supervisor([sys.executable, "-c", "raise SystemExit(1)"], tmp_path, now)
    child = processes.children[0]
    child.restart_at = now[0]  # due
    try:
        for backoff in (1.0, 2.0):
            assert processes.check(child, now[0]) is None and child.proc is not None  # started
            child.proc.wait(30)
            now[0] += 0.5
            assert processes.check(child, now[0]) == 1
            assert child.proc is None and child.restart_at == now[0] + backoff
            now[0] += backoff - 0.01
            assert processes.check(child, now[0]) is None and child.proc is None  # not yet due
            now[0] += 0.01
    finally:
        assert processes.stop()


def test_a_refusal_stops_the_parent_only_when_no_other_process_runs(tmp_path: Path) -> None:
    """The first process to create the marker file refuses (exit 2); every other one, and that
    one again once restarted, runs."""
    marker = tmp_path / "refused-once"
    script = (
        "import os, sys, time\n"
        "try:\n"
        f"    os.close(os.open({str(marker)!r}, os.O_CREAT | os.O_EXCL))\n"
        f"    sys.exit({REFUSED_EXIT})\n"
        "except FileExistsError:\n"
        "    time.sleep(60)\n"
    )
    processes = GatewayProcesses(command=[sys.executable, "-c", script], env=dict(os.environ),
                                 metrics_dir=tmp_path, count=2, grace_s=1.0)  # fmt: skip
    stopper = threading.Timer(4.0, processes.on_stop_signal, (signal.SIGTERM, None))
    stopper.start()
    try:
        assert processes.supervise() is None  # the other process ran: restarted, not stopped
        assert all(child.proc is not None for child in processes.children)
    finally:
        stopper.cancel()
        assert processes.stop()  # both running, both ended by the SIGTERM
    alone = _supervisor([sys.executable, "-c", f"raise SystemExit({REFUSED_EXIT})"], tmp_path,
                        [0.0])  # fmt: skip
    try:
        assert alone.supervise() == REFUSED_EXIT  # nothing else runs: restarting cannot help
    finally:
        alone.stop()


def test_a_process_that_cannot_be_started_is_tried_again_later(tmp_path: Path) -> None:
    now = [100.0]
    processes = _supervisor([str(tmp_path / "no-such-program")], tmp_path, now)
    child = processes.children[0]
    child.restart_at = now[0]
    assert processes.check(child, now[0]) is None
    assert child.proc is None and child.restart_at is not None and child.restart_at > now[0]
