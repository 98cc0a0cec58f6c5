"""Memory (PSS) and start time of the embedded default stack, today's settings beside the new
ones, in one run.

    flock /tmp/octograph-heavy.lock .venv/bin/python bench/footprint.py
    flock /tmp/octograph-heavy.lock .venv/bin/python bench/footprint.py --profiles new
    flock /tmp/octograph-heavy.lock .venv/bin/python bench/footprint.py --baseline-ref e017b20

Each profile starts the stack exactly as `octograph up` does (`python -m service.cli up`, its
own port and log dir), waits for the gateway's /readyz, and measures the PSS of every process of
the tree (psutil `memory_full_info().pss`: shared pages count once, split among the processes
that map them, so the sum is what the stack costs the machine):

- `idle`: a few seconds after /readyz, before any traffic;
- `served`: after the traffic the README's benches bring (a chat to `general`, a byte-level
  `blend` chat, `POST /v1/route`, then --burst concurrent 16-token chats to `general`, the
  engine bench's concurrency 32): every lazily loaded table is in and the KV blocks that load
  touches are resident.

Then the stack is stopped with SIGTERM (as Ctrl-C: drain, then the workers; SIGINT is ignored
by a process started in the background) and every process that was seen
must be gone (no orphans; stragglers are killed and reported).

Profiles (environment on top of ours; `octograph up`'s role settings yield to what a user sets):
- `today`: every worker as before issue 21 (2 GiB KV space each, 64 sequences, 256 MiB
  byte-dist cache), whatever the role;
- `new`: the per-role defaults of `octograph up` (service/embedded.py, role_settings).
With --baseline-ref REF the first profile listed runs the code of that git commit (a temporary
worktree, same venv): the whole before/after, code included. `--profiles new,new
--baseline-ref REF` compares what REF shipped with what this tree ships.

Also prints how long each worker's start phases took (`octograph up`'s own lines, from the
workers' logs: service/embedded.py StartWatch), the KV capacity vLLM reports, and writes
bench/results/footprint.json.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"

PROFILES: dict[str, dict[str, str]] = {
    "today": {
        "OCTOGRAPH_WORKER_KV_CACHE_GIB": "2",
        "OCTOGRAPH_WORKER_MAX_NUM_SEQS": "64",
        "OCTOGRAPH_WORKER_BYTE_DIST_CACHE_MIB": "256",
        "OCTOGRAPH_WORKER_EXECUTOR": "mp",
    },
    "new": {},
}


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def shown_args(cmdline: list[str]) -> list[str]:
    """Arguments as /proc shows them; a worker forked from the zygote has one space-separated
    title padded with NULs (service.zygote.shown_args; inlined: this bench also runs older
    trees' stacks)."""
    if len(cmdline) > 1 and any(cmdline[1:]):
        return cmdline
    return " ".join(cmdline).split()


def role_of(proc: psutil.Process, up_pid: int, fronts: dict[int, str]) -> str:
    """A readable name for one process of the stack."""
    if proc.pid == up_pid:
        return "gateway (octograph up)"
    try:
        cmd = shown_args(proc.cmdline())
    except psutil.Error:
        return "?"
    if proc.pid in fronts:
        return f"{fronts[proc.pid]}: worker front end"
    owner = "?"
    with contextlib.suppress(psutil.Error):
        for parent in proc.parents():
            if parent.pid in fronts:
                owner = fronts[parent.pid]
                break
    title = cmd[0] if cmd else proc.name()
    if "zygote" in cmd:
        return "zygote (workers' shared imports)"
    if title.startswith("VLLM::"):
        return f"{owner}: {title}"
    if any("resource_tracker" in c for c in cmd):
        return f"{owner}: multiprocessing resource tracker"
    return f"{owner}: {' '.join(cmd)[:60]}"


def worker_fronts(up: psutil.Process) -> dict[int, str]:
    fronts: dict[int, str] = {}
    for child in up.children(recursive=True):  # forked workers are the zygote's children
        with contextlib.suppress(psutil.Error):
            cmd = shown_args(child.cmdline())
            if "worker" in cmd and "--served-name" in cmd:
                fronts[child.pid] = cmd[cmd.index("--served-name") + 1]
    return fronts


def snapshot(up: psutil.Process) -> list[dict[str, Any]]:
    """PSS (and RSS, USS) of every process of the tree rooted at `up`, sorted by role."""
    fronts = worker_fronts(up)
    rows = []
    for proc in [up, *up.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):
            mem = proc.memory_full_info()
            rows.append(
                {
                    "pid": proc.pid,
                    "role": role_of(proc, up.pid, fronts),
                    "pss_mb": mem.pss / 1e6,
                    "rss_mb": mem.rss / 1e6,
                    "uss_mb": mem.uss / 1e6,
                    "swap_mb": getattr(mem, "swap", 0) / 1e6,
                }
            )
    rows.sort(key=lambda r: (r["role"] != "gateway (octograph up)", r["role"]))
    return rows


async def traffic(url: str, burst: int) -> dict[str, Any]:
    """The README's load: one chat each to general and blend, one route, then `burst`
    concurrent 16-token chats to general. Returns what each answered."""
    out: dict[str, Any] = {}
    async with httpx.AsyncClient(base_url=url, timeout=300, trust_env=False) as client:

        async def chat(model: str, text: str, max_tokens: int, **extra: Any) -> httpx.Response:
            body = {
                "model": model,
                "messages": [{"role": "user", "content": text}],
                "max_tokens": max_tokens,
                **extra,
            }
            return await client.post("/v1/chat/completions", json=body)

        t0 = time.perf_counter()
        r = await chat("general", "What is the capital of France?", 32)
        out["general"] = {"status": r.status_code, "s": round(time.perf_counter() - t0, 2)}
        t0 = time.perf_counter()
        r = await chat("blend", "Name a prime.", 40)
        out["blend"] = {"status": r.status_code, "s": round(time.perf_counter() - t0, 2)}
        t0 = time.perf_counter()
        r = await client.post("/v1/route", json={"prompt": "how do black holes form"})
        out["route"] = {
            "status": r.status_code,
            "node": r.json().get("node") if r.status_code == 200 else None,
            "s": round(time.perf_counter() - t0, 3),
        }
        t0 = time.perf_counter()
        replies = await asyncio.gather(
            *(
                chat(
                    "general",
                    f"Write a long story about the number {i}.",
                    16,
                    ignore_eos=True,
                    temperature=0,
                )
                for i in range(burst)
            )
        )
        ok = [r for r in replies if r.status_code == 200]
        tokens = sum(r.json()["usage"]["completion_tokens"] for r in ok)
        out["burst"] = {
            "concurrency": burst,
            "ok": len(ok),
            "statuses": sorted({r.status_code for r in replies}),
            "tokens": tokens,
            "s": round(time.perf_counter() - t0, 2),
        }
    return out


def wait_ready(url: str, proc: subprocess.Popen[bytes], log: Path, timeout_s: float) -> float:
    t0 = time.monotonic()
    with httpx.Client(timeout=2, trust_env=False) as client:
        while time.monotonic() - t0 < timeout_s:
            if proc.poll() is not None:
                raise RuntimeError(f"octograph up exited ({proc.returncode}):\n{log.read_text()}")
            with contextlib.suppress(httpx.HTTPError):
                if client.get(f"{url}/readyz").status_code == 200:
                    return time.monotonic() - t0
            time.sleep(0.25)
    raise TimeoutError(f"not ready after {timeout_s:.0f}s:\n{log.read_text()[-3000:]}")


KV_RE = re.compile(r"KV cache size: ([\d,]+) tokens")
CONC_RE = re.compile(r"Maximum concurrency for ([\d,]+) tokens per request: ([\d.]+)x")


def worker_log_facts(log_dir: Path) -> dict[str, dict[str, Any]]:
    """KV capacity vLLM reported, per worker."""
    facts: dict[str, dict[str, Any]] = {}
    for path in sorted(log_dir.glob("worker-*.log")):
        text = path.read_text(errors="replace")
        name = path.stem.removeprefix("worker-")
        f: dict[str, Any] = {}
        if m := KV_RE.findall(text):
            f["kv_tokens"] = int(m[-1].replace(",", ""))
        if m := CONC_RE.findall(text):
            f["max_concurrency_at"] = {"tokens": int(m[-1][0].replace(",", "")), "x": m[-1][1]}
        facts[name] = f
    return facts


@dataclass
class Run:
    profile: str
    ref: str | None
    ready_s: float = 0.0
    idle: list[dict[str, Any]] = field(default_factory=list)
    served: list[dict[str, Any]] = field(default_factory=list)
    traffic: dict[str, Any] = field(default_factory=dict)
    workers: dict[str, dict[str, Any]] = field(default_factory=dict)
    orphans: list[str] = field(default_factory=list)
    up_lines: list[str] = field(default_factory=list)


def stop(proc: subprocess.Popen[bytes], seen: dict[int, str], timeout_s: float = 60) -> list[str]:
    """Stop the stack (SIGTERM), wait for it, then check that every process seen is gone."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=timeout_s)
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    orphans = []
    deadline = time.monotonic() + 5
    for pid, role in seen.items():
        while time.monotonic() < deadline and psutil.pid_exists(pid):
            with contextlib.suppress(psutil.Error):
                if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                    break
            time.sleep(0.1)
        with contextlib.suppress(psutil.Error):
            p = psutil.Process(pid)
            if p.status() != psutil.STATUS_ZOMBIE:
                orphans.append(f"{pid} {role}")
                p.kill()
    return orphans


def run_profile(
    profile: str, args: argparse.Namespace, cwd: Path, ref: str | None, log_root: Path
) -> Run:
    run = Run(profile, ref)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log_dir = log_root / (f"{profile}-{ref}" if ref else profile)
    log_dir.mkdir(parents=True)
    env = {**os.environ, **PROFILES[profile], "OCTOGRAPH_LOG_DIR": str(log_dir)}
    config = (REPO / args.config).resolve()
    up_log = log_dir / "up.log"
    cmd = [sys.executable, "-m", "service.cli", "up", "--config", str(config), "--port", str(port)]
    print(f"[{profile}] starting: {' '.join(cmd[1:])}" + (f"  (code of {ref})" if ref else ""))
    with open(up_log, "wb") as out:
        proc = subprocess.Popen(
            cmd, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, env=env
        )
    seen: dict[int, str] = {}
    try:
        run.ready_s = wait_ready(url, proc, up_log, args.ready_timeout)
        print(f"[{profile}] /readyz 200 after {run.ready_s:.1f}s")
        up = psutil.Process(proc.pid)
        time.sleep(args.settle)
        run.idle = snapshot(up)
        seen.update({r["pid"]: r["role"] for r in run.idle})
        if args.burst >= 0:
            run.traffic = asyncio.run(traffic(url, args.burst))
            time.sleep(args.settle)
            run.served = snapshot(up)
            seen.update({r["pid"]: r["role"] for r in run.served})
    finally:
        with contextlib.suppress(psutil.Error):
            for child in psutil.Process(proc.pid).children(recursive=True):
                seen.setdefault(child.pid, child.name())
        seen.setdefault(proc.pid, "octograph up")
        run.orphans = stop(proc, seen)
        run.workers = worker_log_facts(log_dir)
        lines = up_log.read_text(errors="replace").splitlines()
        run.up_lines = [line for line in lines if "[octograph]" in line]
    return run


def total(rows: list[dict[str, Any]]) -> float:
    return sum(r["pss_mb"] for r in rows)


def by_role(rows: list[dict[str, Any]]) -> dict[str, float]:
    out: dict[str, float] = {}
    for r in rows:
        out[r["role"]] = out.get(r["role"], 0.0) + r["pss_mb"]
    return out


def print_table(runs: list[Run]) -> None:
    for phase in ("idle", "served"):
        tables = [by_role(getattr(r, phase)) for r in runs]
        if not any(tables):
            continue
        roles = sorted({k for t in tables for k in t}, key=lambda k: (k[:1] != "g", k))
        heads = [f"{r.profile}{f' @{r.ref}' if r.ref else ''}" for r in runs]
        print(
            f"\nPSS, MB ({phase}: "
            + (
                "a few seconds after /readyz, no traffic)"
                if phase == "idle"
                else "after the README's load)"
            )
        )
        width = max(len(k) for k in roles) + 2
        print(f"{'process':{width}}" + "".join(f"{h:>16}" for h in heads))
        for role in roles:
            print(f"{role:{width}}" + "".join(f"{t.get(role, 0.0):16.0f}" for t in tables))
        print(f"{'TOTAL':{width}}" + "".join(f"{total(getattr(r, phase)):16.0f}" for r in runs))
    print()
    for r in runs:
        name = f"{r.profile}{f' @{r.ref}' if r.ref else ''}"
        orphans = r.orphans or "none"
        print(f"[{name}] ready (/readyz 200) after {r.ready_s:.1f}s; orphans: {orphans}")
        for line in r.up_lines:
            if "ready in" in line or "phases" in line:
                print(f"    {line}")
        for w, f in r.workers.items():
            kv = f.get("kv_tokens")
            conc = f.get("max_concurrency_at")
            desc = f"KV {kv:,} tokens" if kv else "KV ?"
            if conc:
                desc += f" ({conc['x']}x {conc['tokens']}-token sequences)"
            print(f"    {w:8} {desc}")
        if r.traffic:
            print(f"    traffic: {json.dumps(r.traffic)}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="configs/local.yaml")
    ap.add_argument("--profiles", default="today,new", help="comma-separated: today, new")
    ap.add_argument("--baseline-ref", help="run the first profile listed on this git commit's code")
    ap.add_argument("--burst", type=int, default=32, help="concurrent chats; -1: no traffic")
    ap.add_argument("--settle", type=float, default=5.0, help="seconds before each snapshot")
    ap.add_argument("--ready-timeout", type=float, default=600.0)
    args = ap.parse_args()
    profiles = [p.strip() for p in args.profiles.split(",") if p.strip()]
    for p in profiles:
        if p not in PROFILES:
            raise SystemExit(f"unknown profile {p!r}; known: {', '.join(PROFILES)}")
    log_root = Path(tempfile.mkdtemp(prefix="octograph-footprint-"))
    worktree: Path | None = None
    runs: list[Run] = []
    try:
        for i, p in enumerate(profiles):
            cwd, ref = REPO, None
            if i == 0 and args.baseline_ref:
                worktree = log_root / "baseline"
                subprocess.run(
                    ["git", "worktree", "add", "--detach", str(worktree), args.baseline_ref],
                    cwd=REPO,
                    check=True,
                    capture_output=True,
                )
                cwd, ref = worktree, args.baseline_ref
            runs.append(run_profile(p, args, cwd, ref, log_root))
    finally:
        if worktree is not None:
            subprocess.run(
                ["git", "worktree", "remove", "--force", str(worktree)], cwd=REPO, check=False
            )
    print_table(runs)
    RESULTS.mkdir(parents=True, exist_ok=True)
    result = {
        "load_average": os.getloadavg(),
        "logs": str(log_root),
        "runs": [r.__dict__ for r in runs],
    }
    (RESULTS / "footprint.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nlogs in {log_root}/; bench/results/footprint.json written")
    shutil.rmtree(log_root / "baseline", ignore_errors=True)
    return 1 if any(r.orphans for r in runs) else 0


if __name__ == "__main__":
    raise SystemExit(main())
