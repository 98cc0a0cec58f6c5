"""Real SmolLM2 worker: tokens/s and requests/s through the gateway vs straight to the worker,
at several concurrencies, measured side by side (interleaved rounds) in one run. Optionally the
same load against vLLM's own OpenAI server (`--vllm-server`), the reference to match.

    .venv/bin/python bench/engine_throughput.py [--concurrency 1 8 32] [--vllm-server]

Prints a table and writes bench/results/engine_throughput.json. Also reports the time from
starting the worker to ready, and from `octograph up`-style start to gateway ready.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from service.embedded import free_port  # noqa: E402
from service.models import packaged  # noqa: E402

PROMPT = [{"role": "user", "content": "Write one sentence about the sea."}]


def spawn(cmd: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        cmd,
        cwd=REPO,
        stdout=open(log, "wb"),
        stderr=subprocess.STDOUT,  # noqa: SIM115
        env={**os.environ, **(env or {})},
        start_new_session=True,
    )


def wait_http(url: str, proc: subprocess.Popen[bytes], timeout: float = 600) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited: {proc.args}")
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return time.monotonic() - t0
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    raise TimeoutError(url)


async def run_load(
    client: httpx.AsyncClient,
    url: str,
    body: dict[str, Any],
    concurrency: int,
    total: int,
    parse: str,
) -> dict[str, float]:
    latencies: list[float] = []
    tokens = 0
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(total):
        queue.put_nowait(i)

    async def one() -> None:
        nonlocal tokens
        while not queue.empty():
            queue.get_nowait()
            t0 = time.perf_counter()
            if parse == "ndjson":
                async with client.stream("POST", url, json=body) as r:
                    async for line in r.aiter_lines():
                        if line:
                            ev = json.loads(line)
                            if ev["type"] == "finish":
                                tokens += ev["completion_tokens"]
            else:
                r = await client.post(url, json=body)
                r.raise_for_status()
                tokens += r.json()["usage"]["completion_tokens"]
            latencies.append(time.perf_counter() - t0)

    t0 = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(concurrency)))
    wall = time.perf_counter() - t0
    return {
        "requests": total,
        "wall_s": wall,
        "req_per_s": total / wall,
        "tokens_per_s": tokens / wall,
        "p50_ms": statistics.median(latencies) * 1000,
    }


async def measure(
    targets: dict[str, tuple[str, dict[str, Any], str]],
    concurrencies: list[int],
    rounds: int,
    per_round: int,
) -> dict[str, Any]:
    results: dict[str, Any] = {}
    limits = httpx.Limits(max_connections=256, max_keepalive_connections=256)
    async with httpx.AsyncClient(timeout=300, limits=limits, trust_env=False) as client:
        for url, body, parse in targets.values():  # warm-up
            await run_load(client, url, body, 2, 4, parse)
        for c in concurrencies:
            total = max(per_round, c * 2)
            acc: dict[str, list[dict[str, float]]] = {n: [] for n in targets}
            for _ in range(rounds):  # interleaved: drift in machine load hits both sides
                for name, (url, body, parse) in targets.items():
                    acc[name].append(await run_load(client, url, body, c, total, parse))
            results[str(c)] = {
                name: {
                    "req_per_s": sum(r["requests"] for r in runs) / sum(r["wall_s"] for r in runs),
                    "tokens_per_s": statistics.mean(r["tokens_per_s"] for r in runs),
                    "p50_ms": statistics.median(r["p50_ms"] for r in runs),
                }
                for name, runs in acc.items()
            }
    return results


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--per-round", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--vllm-server", action="store_true", help="also measure vLLM's own server")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="octograph-bench-"))
    model_dir = packaged.model_dir("smollm2")
    wport, gport = free_port(), free_port()
    procs: list[subprocess.Popen[bytes]] = []
    out: dict[str, Any] = {"max_tokens": args.max_tokens, "threads": args.threads}
    try:
        t0 = time.monotonic()
        procs.append(
            spawn(
                [
                    sys.executable,
                    "-m",
                    "service.cli",
                    "worker",
                    "--model",
                    str(model_dir),
                    "--served-name",
                    "smollm2",
                    "--port",
                    str(wport),
                    "--threads",
                    str(args.threads),
                ],
                tmp / "worker.log",
            )
        )
        out["worker_ready_s"] = wait_http(f"http://127.0.0.1:{wport}/readyz", procs[-1])
        cfg = tmp / "graph.yaml"
        cfg.write_text(f'models:\n  smollm2: {{urls: ["http://127.0.0.1:{wport}"]}}\n')
        procs.append(
            spawn(
                [
                    sys.executable,
                    "-m",
                    "service.cli",
                    "gateway",
                    "--config",
                    str(cfg),
                    "--port",
                    str(gport),
                ],
                tmp / "gateway.log",
            )
        )
        out["gateway_ready_s"] = wait_http(f"http://127.0.0.1:{gport}/readyz", procs[-1])
        out["total_ready_s"] = time.monotonic() - t0
        sampling = {"max_tokens": args.max_tokens, "temperature": 0.0, "ignore_eos": True}
        targets: dict[str, tuple[str, dict[str, Any], str]] = {
            "direct": (
                f"http://127.0.0.1:{wport}/internal/generate",
                {"request_id": "bench", "messages": PROMPT, "sampling": sampling},
                "ndjson",
            ),
            "gateway": (
                f"http://127.0.0.1:{gport}/v1/chat/completions",
                {
                    "model": "smollm2",
                    "messages": PROMPT,
                    "max_tokens": args.max_tokens,
                    "temperature": 0.0,
                    "ignore_eos": True,
                },
                "json",
            ),
        }
        out["results"] = asyncio.run(
            measure(targets, args.concurrency, args.rounds, args.per_round)
        )
    finally:
        for p in procs:
            os.killpg(p.pid, 15)
        for p in procs:
            p.wait(timeout=30)
    if args.vllm_server:
        vport = free_port()
        p = spawn(
            [
                sys.executable,
                "-m",
                "vllm.entrypoints.openai.api_server",
                "--model",
                str(model_dir),
                "--served-model-name",
                "smollm2",
                "--port",
                str(vport),
                "--max-model-len",
                "2048",
            ],
            tmp / "vllm.log",
            env={"OMP_NUM_THREADS": str(args.threads), "VLLM_CPU_KVCACHE_SPACE": "2"},
        )
        try:
            out["vllm_server_ready_s"] = wait_http(f"http://127.0.0.1:{vport}/health", p)
            ref = {
                "vllm-server": (
                    f"http://127.0.0.1:{vport}/v1/chat/completions",
                    {
                        "model": "smollm2",
                        "messages": PROMPT,
                        "max_tokens": args.max_tokens,
                        "temperature": 0.0,
                        "ignore_eos": True,
                    },
                    "json",
                )
            }
            ref_res = asyncio.run(measure(ref, args.concurrency, args.rounds, args.per_round))
            for c, row in ref_res.items():
                out["results"][c].update(row)
        finally:
            os.killpg(p.pid, 15)
            p.wait(timeout=60)

    print(
        f"worker ready in {out['worker_ready_s']:.1f}s; gateway ready "
        f"{out['gateway_ready_s']:.1f}s later; chat, {args.max_tokens} tokens, "
        f"{args.threads} engine threads"
    )
    names = list(next(iter(out["results"].values())))
    print(
        f"{'conc':>4} "
        + " ".join(f"{n + ' tok/s':>16} {n + ' req/s':>16}" for n in names)
        + f" {'gateway/direct':>15}"
    )
    for c, row in out["results"].items():
        ratio = row["gateway"]["tokens_per_s"] / row["direct"]["tokens_per_s"]
        cells = " ".join(
            f"{row[n]['tokens_per_s']:16.1f} {row[n]['req_per_s']:16.2f}" for n in names
        )
        print(f"{c:>4} {cells} {ratio:15.3f}")
        row["gateway_over_direct"] = ratio
    dest = REPO / "bench" / "results"
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "engine_throughput.json").write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
