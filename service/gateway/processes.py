"""`octograph gateway --processes N`: N gateway processes serving one host:port.

The parent binds no API socket. It checks that host:port is free, then starts N children
(`octograph gateway --supervised-by <parent pid> ...`), each binding host:port with
SO_REUSEPORT (service/serving.py), so the kernel spreads new connections across them. It
restarts a child that exits (after a backoff), turns each SIGTERM/SIGINT it gets into one
SIGTERM per child (every child drains as a lone gateway does; a second signal cuts the drain
short, as it does for one), passes SIGHUP on to children that handle it, and returns once every
child has exited. Metrics: prometheus_client's multiprocess mode in a fresh directory per run
(service/observability/multiprocess.py); with --metrics-port the parent serves the merged view
itself, so that port answers while a child restarts.

Shared between the processes: the port, the metrics view, and (with OCTOGRAPH_REDIS_URL) the
per-key limits and the console's view. Per process: MAX_INFLIGHT and MAX_INFLIGHT_PER_NODE (each
process admits up to them, as N replicas would), the workers' health probes, the keys file's
reload, and without Redis the console's live stats. Per-key limits without Redis would be per
process too, i.e. N times the limit a key was promised: refused (check_processes).
"""

from __future__ import annotations

import ctypes
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from wsgiref.simple_server import WSGIServer

from service.config import GatewaySettings, StartupError
from service.embedded import Backoff
from service.observability.multiprocess import MULTIPROC_DIR_ENV, mark_dead, merged_registry

log = logging.getLogger(__name__)

POLL_S = 0.1
# The children's own drain ends by grace + 1 s (uvicorn's graceful shutdown, serving.py); the
# parent kills what is still alive this much later.
STOP_MARGIN_S = 5.0
# The CLI's exit code for a configuration it refuses (service/cli.py). A child that exits with
# it while no other child serves stops the parent with it: every restart would refuse again
# (a bad secret file, say). While others serve it is restarted like any other, since what it
# refused may be fixed (a graph file edited half-way, which the running processes' reload
# refuses and keeps serving the previous graph around).
REFUSED_EXIT = 2
PR_SET_PDEATHSIG = 1  # linux/prctl.h

PER_KEY_LIMITS = {
    "rate_limit_rpm": "OCTOGRAPH_RATE_LIMIT_RPM",
    "rate_limit_tpm": "OCTOGRAPH_RATE_LIMIT_TPM",
    "max_inflight_per_key": "OCTOGRAPH_MAX_INFLIGHT_PER_KEY",
}


def check_processes(settings: GatewaySettings) -> None:
    """Per-key limits are counted in Redis when OCTOGRAPH_REDIS_URL is set, else in each
    process: with N processes and no Redis a key would get N times its limit, so that
    configuration is refused rather than served with limits it does not keep."""
    if settings.processes == 1 or settings.redis_url is not None:
        return
    per_key = [env for name, env in PER_KEY_LIMITS.items() if getattr(settings, name) is not None]
    if per_key:
        raise StartupError(
            f"--processes {settings.processes} (OCTOGRAPH_PROCESSES) with {', '.join(per_key)} "
            "needs OCTOGRAPH_REDIS_URL: without Redis each process counts a key on its own, so "
            f"a key would get {settings.processes} times its limit. Set OCTOGRAPH_REDIS_URL, or "
            "run one process"
        )


def check_port_free(host: str, port: int) -> None:
    """Refuse a port something already listens on. Children bind with SO_REUSEPORT, which would
    otherwise quietly share the port with another gateway of the same user (one left from
    another run, say) and split the traffic with it. This bind, without SO_REUSEPORT, fails on
    any listener."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT is not a user
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise StartupError(f"cannot serve on {host}:{port}: {exc.strerror}") from None


def die_with_parent(parent_pid: int) -> None:
    """In a child: get SIGTERM (and drain) when the parent dies, even by SIGKILL, so no gateway
    process outlives its supervisor holding the port. The check after the call catches a
    parent that died before it."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG)")
    if os.getppid() != parent_pid:
        raise StartupError(f"the supervising gateway process {parent_pid} is gone")


def handles_signal(pid: int, sig: int) -> bool:
    """Whether process `pid` has a handler for `sig` (the SigCgt mask in /proc). A signal whose
    default action is to terminate (SIGHUP) is only passed on to a child that catches it."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("SigCgt:"):
                    return bool(int(line.split()[1], 16) >> (sig - 1) & 1)
    except OSError:
        pass
    return False


def child_command(settings: GatewaySettings, parent_pid: int) -> list[str]:
    """One child: this gateway's settings (the environment is inherited; what came from flags is
    passed as flags), as one of `processes`."""
    cmd = [sys.executable, "-m", "service.cli", "gateway", "--supervised-by", str(parent_pid),
           "--processes", str(settings.processes), "--config", str(settings.config),
           "--host", settings.host, "--port", str(settings.port)]  # fmt: skip
    if settings.metrics_port is not None:
        # Told so that /metrics on the API port stays behind the keys; the parent serves it.
        cmd += ["--metrics-port", str(settings.metrics_port)]
    return cmd


@dataclass
class Child:
    slot: int
    proc: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    restart_at: float | None = None
    backoff: Backoff = field(default_factory=Backoff)


@dataclass
class GatewayProcesses:
    """The parent's bookkeeping: `supervise` until a stop signal (or a child refusing its
    configuration with no other child running), then `stop`, which always runs. The signal
    handlers only count signals; the loop acts on them, so a signal never lands half-way
    through a restart."""

    command: list[str]
    env: dict[str, str]
    metrics_dir: Path
    count: int
    grace_s: float
    clock: Callable[[], float] = time.monotonic
    children: list[Child] = field(init=False)
    stop_signals: int = 0
    hangups: int = 0
    _hangups_passed: int = 0

    def __post_init__(self) -> None:
        self.children = [Child(slot) for slot in range(self.count)]

    def on_stop_signal(self, sig: int, frame: FrameType | None) -> None:
        self.stop_signals += 1

    def on_hangup(self, sig: int, frame: FrameType | None) -> None:
        self.hangups += 1

    def supervise(self) -> int | None:
        """Returns None on a stop signal, REFUSED_EXIT when a child refused its configuration
        and no other child is running."""
        for child in self.children:
            self._start(child)
        while not self.stop_signals:
            now = self.clock()
            for child in self.children:
                if self.check(child, now) == REFUSED_EXIT and not self.running():
                    log.error("gateway process refused its configuration and none runs; "
                              "stopping", extra={"slot": child.slot})  # fmt: skip
                    return REFUSED_EXIT
            self._pass_hangups()
            time.sleep(POLL_S)
        return None

    def check(self, child: Child, now: float) -> int | None:
        """One look at one child: restarts it when its restart is due, schedules the restart of
        one that has exited. Returns the exit code of a child that has just exited."""
        if child.proc is None:
            if child.restart_at is not None and now >= child.restart_at:
                try:
                    self._start(child)
                except OSError as exc:  # cannot fork or exec now: the backoff's next turn
                    child.restart_at = now + child.backoff.delay(0.0)
                    log.error("cannot start a gateway process",
                              extra={"slot": child.slot, "error": str(exc)})  # fmt: skip
            return None
        code = child.proc.poll()
        if code is None:
            return None
        self._reaped(child, code)
        delay = child.backoff.delay(now - child.started_at)
        child.restart_at = now + delay
        log.warning("gateway process exited; restarting it",
                    extra={"slot": child.slot, "code": code, "in_s": delay})  # fmt: skip
        return code

    def running(self) -> bool:
        return any(child.proc is not None for child in self.children)

    def stop(self) -> bool:
        """SIGTERM to every child once per stop signal received (at least once), SIGKILL to any
        child still alive STOP_MARGIN_S after its drain should have ended; reaps them all.
        True when each child ended by its drain (exit 0) or by the SIGTERM itself (it had not
        started serving yet)."""
        deadline = self.clock() + self.grace_s + 1 + STOP_MARGIN_S
        terms_sent = 0
        clean = True
        while live := [c for c in self.children if c.proc is not None]:
            if terms_sent < max(1, self.stop_signals):
                terms_sent = max(1, self.stop_signals)
                for child in live:
                    self._signal(child, signal.SIGTERM)
            killing = self.clock() >= deadline
            for child in live:
                assert child.proc is not None
                if killing and child.proc.poll() is None:
                    log.error("gateway process did not stop in time; killing it",
                              extra={"slot": child.slot, "pid": child.proc.pid})  # fmt: skip
                    child.proc.kill()
                    child.proc.wait()
                code = child.proc.poll()
                if code is not None:
                    clean &= code in (0, -signal.SIGTERM)
                    self._reaped(child, code)
            time.sleep(POLL_S)
        return clean

    def _start(self, child: Child) -> None:
        child.restart_at = None
        child.started_at = self.clock()
        # Its own session: a terminal's Ctrl-C reaches the parent alone, which passes it on
        # once (a second SIGINT straight from the terminal would cut the child's drain short).
        child.proc = subprocess.Popen(self.command, env=self.env, start_new_session=True)
        log.info("gateway process started", extra={"slot": child.slot, "pid": child.proc.pid})

    def _reaped(self, child: Child, code: int) -> None:
        assert child.proc is not None
        mark_dead(child.proc.pid, self.metrics_dir)
        log.info("gateway process ended",
                 extra={"slot": child.slot, "pid": child.proc.pid, "code": code})  # fmt: skip
        child.proc = None

    def _signal(self, child: Child, sig: int) -> None:
        assert child.proc is not None
        if child.proc.poll() is None:  # not reaped yet, so the pid is still this child's
            child.proc.send_signal(sig)

    def _pass_hangups(self) -> None:
        if self.hangups == self._hangups_passed:
            return
        self._hangups_passed = self.hangups
        for child in self.children:
            if child.proc is None:
                continue
            if handles_signal(child.proc.pid, signal.SIGHUP):
                self._signal(child, signal.SIGHUP)
            else:  # SIGHUP's default action would kill it
                log.warning("gateway process does not handle SIGHUP; not passed on",
                            extra={"slot": child.slot, "pid": child.proc.pid})  # fmt: skip


@contextmanager
def _signals_to(processes: GatewayProcesses) -> Iterator[None]:
    handlers = {
        signal.SIGTERM: processes.on_stop_signal,
        signal.SIGINT: processes.on_stop_signal,
        signal.SIGHUP: processes.on_hangup,
    }
    previous = {sig: signal.signal(sig, handler) for sig, handler in handlers.items()}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _serve_merged_metrics(directory: Path, host: str, port: int) -> WSGIServer:
    from prometheus_client import start_http_server

    try:
        server, _ = start_http_server(port, addr=host, registry=merged_registry(directory))
    except OSError as exc:
        raise StartupError(f"cannot serve metrics on {host}:{port}: {exc.strerror}") from None
    return server


def run_gateway_processes(settings: GatewaySettings) -> int:
    """The parent of `settings.processes` gateway processes; returns the exit code."""
    check_port_free(settings.host, settings.port)
    # mkdtemp: a new, empty directory per run, so no file of an earlier run is summed in.
    metrics_dir = Path(tempfile.mkdtemp(prefix="octograph-metrics-"))
    processes = GatewayProcesses(
        command=child_command(settings, os.getpid()),
        env={**os.environ, MULTIPROC_DIR_ENV: str(metrics_dir)},
        metrics_dir=metrics_dir,
        count=settings.processes,
        grace_s=settings.shutdown_grace_s,
    )
    metrics_server: WSGIServer | None = None
    refused: int | None = None
    clean = False
    log.info("starting gateway processes",
             extra={"processes": settings.processes, "port": settings.port,
                    "metrics_dir": str(metrics_dir)})  # fmt: skip
    with _signals_to(processes):
        try:
            if settings.metrics_port is not None:
                metrics_server = _serve_merged_metrics(
                    metrics_dir, settings.host, settings.metrics_port
                )
            refused = processes.supervise()
        finally:
            clean = processes.stop()
            if metrics_server is not None:
                metrics_server.shutdown()
                metrics_server.server_close()
            shutil.rmtree(metrics_dir, ignore_errors=True)
    log.info("gateway processes stopped", extra={"clean": clean})
    if refused is not None:
        return refused
    return 0 if clean else 1
