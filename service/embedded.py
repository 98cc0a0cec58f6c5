"""`octograph up`: the whole graph on one machine. Prepares models, starts one worker process
per model, waits until they are ready (with progress), then serves the gateway in this process.
On Ctrl-C/SIGTERM the gateway drains, then the workers get SIGTERM (their process groups, so
vLLM's engine-core children go too), then SIGKILL after a grace period: no orphans."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import httpx

from service.affinity import format_cpu_list, usable_cpus
from service.config import GatewaySettings
from service.graph.schema import EnsembleNode, GraphConfig, ModelNode, RouterNode, load_graph

READY_TIMEOUT_S = 900.0
# KV block size of workers that score (WorkerSettings.block_size): routers keep their 64-token
# system prefix cached, ensemble members the shared trunk of their byte-level token paths (a
# Gemma-3 path that extends an 80-token trunk by one token: 145 ms with 32-token blocks, 175-179
# with vLLM's 128).
SCORING_BLOCK_SIZE = 32
STOP_GRACE_S = 20.0
# A model that only routes needs no byte-level capture, and its OpenMP team should sleep rather
# than spin between the short scoring forwards: spinning threads stole the cores the gateway
# and the client needed, and /v1/route's tail grew (p90 62 vs ~200 ms with 2 threads).
ROUTER_ONLY_ENV = {"OCTOGRAPH_WORKER_ENABLE_CAPTURE": "false", "OMP_WAIT_POLICY": "PASSIVE"}
# ...and one thread is enough: a scoring forward over a query's few tokens is bound by per-op
# overhead, not arithmetic, and a second thread only adds its wake-ups (16-layer router alone
# on the 2 cores, /v1/route: p50 50.6 / p90 77 / p99 85 ms with one thread, 56 / 94 / 162
# with two).
ROUTER_ONLY_THREADS = 1


@dataclass
class WorkerProcess:
    name: str
    port: int
    proc: subprocess.Popen[bytes]
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def say(msg: str) -> None:
    print(f"[octograph] {msg}", file=sys.stderr, flush=True)


def model_dirs(graph: GraphConfig, config_path: Path) -> dict[str, Path]:
    """Prepare what is missing (packaged models, router builds) and return each model's dir."""
    from service.models import packaged

    needed = sorted(
        {
            s.packaged
            for s in graph.worker_models().values()
            if s.packaged and not s.urls and s.engine == "vllm"
        }
    )
    if needed:
        for r in packaged.prepare_models(needed, progress=True):
            if r.status != "ready":
                say(f"prepared {r.name} in {r.seconds:.0f}s")
    dirs: dict[str, Path] = {}
    for name, spec in graph.worker_models().items():  # kind: openai models run elsewhere
        if spec.urls:
            continue
        if spec.engine == "fake":
            dirs[name] = Path(name)
        elif spec.packaged:
            dirs[name] = packaged.model_dir(spec.packaged)
        elif spec.path:
            path = Path(os.path.expandvars(spec.path)).expanduser()
            if not path.is_absolute() and not path.exists():
                path = packaged.default_cache_dir() / spec.path
            if not (path / "config.json").is_file() and spec.build is not None:
                from service.training.router_build import build_router_from_spec

                say(f"building router model '{name}' (first run only)")
                build_router_from_spec(graph, config_path, spec.build, path)
            dirs[name] = path
    return dirs


def _roles(graph: GraphConfig, model: str) -> tuple[bool, bool, bool]:
    """Whether `model` routes, is an ensemble member, answers (itself or as a member)."""
    routers = {n.model for n in graph.nodes.values() if isinstance(n, RouterNode)}
    members = {
        m.model for n in graph.nodes.values() if isinstance(n, EnsembleNode) for m in n.members
    }
    answering = {n.model for n in graph.nodes.values() if isinstance(n, ModelNode)} | members
    return model in routers, model in members, model in answering


def worker_env(graph: GraphConfig, model: str) -> dict[str, str]:
    """Environment a model's worker gets on top of ours, from the model's role in the graph."""
    routes, member, answers = _roles(graph, model)
    env: dict[str, str] = {}
    if routes or member:
        env["OCTOGRAPH_WORKER_BLOCK_SIZE"] = str(SCORING_BLOCK_SIZE)
    if routes and not answers:
        env.update(ROUTER_ONLY_ENV)
    return env


@dataclass(frozen=True)
class Placement:
    """Where a worker's engine runs: its torch threads, and the cores its engine processes
    are pinned to (None: unpinned; see service.affinity for why pinning matters)."""

    threads: int
    cpus: frozenset[int] | None = None


def plan_placement(
    graph: GraphConfig, names: Sequence[str], cpus: Sequence[int]
) -> dict[str, Placement]:
    """Share `cpus` among the workers of `names`.

    A model that only routes gets one thread and no pinning (short forwards between the
    others' steps). The other workers get disjoint, equal slices of the cores, one thread per
    core, when there are at least two of them and a core each: an ensemble step runs its
    members' forwards at once, and unpinned they slow each other down (affinity.py). Otherwise
    every worker gets its share of the cores as threads, unpinned.
    """
    placement: dict[str, Placement] = {}
    pinned = []
    for name in names:
        routes, _, answers = _roles(graph, name)
        if routes and not answers:
            placement[name] = Placement(ROUTER_ONLY_THREADS)
        else:
            pinned.append(name)
    if len(pinned) >= 2 and len(cpus) >= len(pinned):
        per = len(cpus) // len(pinned)
        for i, name in enumerate(pinned):
            placement[name] = Placement(per, frozenset(cpus[i * per : (i + 1) * per]))
    else:
        for name in pinned:
            placement[name] = Placement(max(1, len(cpus) // max(1, len(names))))
    return placement


def start_workers(graph: GraphConfig, dirs: dict[str, Path], log_dir: Path) -> list[WorkerProcess]:
    log_dir.mkdir(parents=True, exist_ok=True)
    workers = []
    placement = plan_placement(graph, list(dirs), usable_cpus())
    for name, path in dirs.items():
        port = free_port()
        log_path = log_dir / f"worker-{name}.log"
        log_file: IO[bytes] = open(log_path, "wb")  # noqa: SIM115 - owned by the child
        cmd = [
            sys.executable,
            "-m",
            "service.cli",
            "worker",
            "--model",
            str(path),
            "--served-name",
            name,
            "--port",
            str(port),
            "--threads",
            str(placement[name].threads),
            "--max-model-len",
            str(graph.worker_models()[name].max_model_len),
        ]
        cpus = placement[name].cpus
        if cpus is not None:
            cmd += ["--cpus", format_cpu_list(cpus)]
        if graph.worker_models()[name].engine == "fake":
            cmd.append("--fake")
        env = {**os.environ, "OCTOGRAPH_WORKER_LOG_JSON": "true", **worker_env(graph, name)}
        proc = subprocess.Popen(
            cmd,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=env,
        )
        workers.append(WorkerProcess(name, port, proc, log_path))
    return workers


def wait_ready(workers: list[WorkerProcess], timeout_s: float = READY_TIMEOUT_S) -> None:
    t0 = time.monotonic()
    pending = {w.name: w for w in workers}
    last_line = ""
    with httpx.Client(timeout=2.0, trust_env=False) as client:
        while pending:
            for name, w in list(pending.items()):
                if w.proc.poll() is not None:
                    tail = w.log_path.read_text(errors="replace")[-3000:]
                    raise RuntimeError(f"worker '{name}' exited ({w.proc.returncode}):\n{tail}")
                with contextlib.suppress(httpx.HTTPError):
                    if client.get(f"{w.url}/readyz").status_code == 200:
                        del pending[name]
            elapsed = time.monotonic() - t0
            done = len(workers) - len(pending)
            line = (
                f"workers ready {done}/{len(workers)} "
                f"[{'#' * done}{'.' * len(pending)}] {elapsed:5.0f}s  "
                f"waiting: {', '.join(pending) or '-'}"
            )
            if sys.stderr.isatty():
                print(f"\r{line}", end="", file=sys.stderr, flush=True)
            elif line.split("s  ")[1] != last_line:
                say(line)
                last_line = line.split("s  ")[1]
            if elapsed > timeout_s:
                raise TimeoutError(
                    f"workers not ready after {timeout_s:.0f}s: {', '.join(pending)}"
                )
            if pending:
                time.sleep(0.5)
    if sys.stderr.isatty():
        print(file=sys.stderr)


def stop_workers(workers: list[WorkerProcess], grace_s: float = STOP_GRACE_S) -> None:
    for w in workers:
        if w.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(w.proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for w in workers:
        with contextlib.suppress(subprocess.TimeoutExpired):
            w.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        # The group may hold vLLM's engine-core child even after the worker itself exited.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(w.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            w.proc.wait(timeout=5)


def _interrupt(*_: object) -> None:
    raise KeyboardInterrupt


def run_embedded(config_path: Path, *, host: str, port: int) -> int:
    from service.gateway.app import build_gateway_app
    from service.observability.logging import setup_logging
    from service.serving import Lifecycle, serve

    settings = GatewaySettings(config=config_path, host=host, port=port)
    setup_logging(settings.log_level, settings.log_json)
    graph = load_graph(config_path)
    dirs = model_dirs(graph, config_path)
    log_dir = Path(os.environ.get("OCTOGRAPH_LOG_DIR", ".octograph/logs"))
    say(f"starting {len(dirs)} workers: {', '.join(dirs)} (logs in {log_dir}/)")
    t0 = time.monotonic()
    workers = start_workers(graph, dirs, log_dir)
    # SIGTERM during start-up must still reap the workers.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        wait_ready(workers)
        say(f"all workers ready in {time.monotonic() - t0:.1f}s; gateway on http://{host}:{port}")
        lifecycle = Lifecycle()
        app = build_gateway_app(
            settings, graph, lifecycle=lifecycle, urls={w.name: [w.url] for w in workers}
        )
        serve(app, host, port, lifecycle, settings.shutdown_grace_s)
    except KeyboardInterrupt:
        say("interrupted")
    except (RuntimeError, TimeoutError) as exc:
        say(f"error: {exc}")
        return 1
    finally:
        say("stopping workers")
        stop_workers(workers)
        say("stopped")
    return 0
