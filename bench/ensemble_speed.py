"""Ensemble generation speed vs. the slower member's own token-level generation, in one run.

    .venv/bin/python bench/ensemble_speed.py [--bytes 200] [--tokens 64] [--node blend]
        [--url smollm2=http://127.0.0.1:PORT --url gemma3=http://...]

Without --url it starts one vLLM worker per member (as `octograph up` does) and stops them.

* ensemble: the gateway's own byte loop (`EnsembleRunner`, the code `/v1/chat/completions`
  runs for an ensemble node, minus the client's HTTP hop), sampling `--bytes` bytes at
  temperature 1 from a completion prompt; bytes/s = UTF-8 bytes produced / wall time from the
  request's start (prompt set-up included) to its last byte.
* members: each member's worker generating `--tokens` tokens for the same prompt
  (`POST /internal/generate`, ignore_eos), bytes/s = bytes of the text produced / wall time.

Prints both, the ratio ensemble / slower member (end to end, and after the first
distribution, i.e. without the prompt set-up), and what the ensemble's time went into:
worker byte-dist calls per member (count, queries, time) and the rest (trees, mixing).
Writes bench/results/ensemble_speed.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import orjson
from prometheus_client import CollectorRegistry

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from service.embedded import WorkerProcess, start_workers, stop_workers, wait_ready  # noqa: E402
from service.ensemble.remote import PoolReducer  # noqa: E402
from service.ensemble.runner import EnsembleRunner  # noqa: E402
from service.gateway.pipeline import RequestContext  # noqa: E402
from service.observability.metrics import GatewayMetrics  # noqa: E402
from service.protocol.internal import GenerateRequest, SamplingOptions  # noqa: E402
from service.router.graph import EnsembleNode, load_graph  # noqa: E402
from service.worker.client import make_http_client  # noqa: E402
from service.worker.pool import WorkerPools  # noqa: E402

# Time spent waiting on each model's byte-dist calls (the bench wraps the reducer).
CALLS: dict[str, dict[str, float]] = {}
_original_call = PoolReducer._call


async def _timed_call(self: PoolReducer, queries: list[Any]) -> Any:
    t0 = time.perf_counter()
    try:
        return await _original_call(self, queries)
    finally:
        entry = CALLS.setdefault(self.pool.name, {"calls": 0, "queries": 0, "seconds": 0.0})
        entry["calls"] += 1
        entry["queries"] += len(queries)
        entry["seconds"] += time.perf_counter() - t0


PoolReducer._call = _timed_call  # type: ignore[method-assign]

PROMPT = (
    "The old lighthouse keeper climbed the stairs every evening at dusk. On the night "
    "of the storm, he noticed"
)


async def token_speed(url: str, model: str, tokens: int) -> dict[str, Any]:
    req = GenerateRequest(
        request_id=f"bench-{model}",
        prompt=PROMPT,
        sampling=SamplingOptions(max_tokens=tokens, temperature=1.0, seed=0, ignore_eos=True),
    )
    text = ""
    async with httpx.AsyncClient(timeout=600, trust_env=False) as http:
        t0 = time.perf_counter()
        async with http.stream(
            "POST",
            f"{url}/internal/generate",
            content=req.model_dump_json(exclude_none=True),
            headers={"content-type": "application/json"},
        ) as r:
            if r.status_code != 200:
                raise RuntimeError(f"{model}: {r.status_code} {(await r.aread())[:300]!r}")
            async for line in r.aiter_lines():
                if line:
                    ev = orjson.loads(line)
                    if ev["type"] == "delta":
                        text += ev.get("text", "")
        seconds = time.perf_counter() - t0
    n = len(text.encode())
    return {
        "model": model,
        "bytes": n,
        "seconds": seconds,
        "bytes_per_s": n / seconds,
        "tokens": tokens,
    }


async def ensemble_speed(
    graph: Any, node_id: str, urls: dict[str, str], max_bytes: int, prune: float | None, seed: int
) -> dict[str, Any]:
    node = graph.nodes[node_id]
    assert isinstance(node, EnsembleNode)
    http = make_http_client(5.0, 600.0)
    metrics = GatewayMetrics(CollectorRegistry())
    pools = WorkerPools(
        {m: [u] for m, u in urls.items()}, http, metrics, health_interval_s=5.0, cooldown_s=1.0
    )
    for _ in range(60):  # a busy worker may miss a 2 s readiness probe
        await pools.probe_once()
        if pools.all_ready:
            break
        await asyncio.sleep(0.5)
    runner = EnsembleRunner(graph, pools, metrics)
    if prune is not None:
        runner.prune = prune
    for m in node.members:  # tokenizer tables load once per gateway, not per request
        await runner.assets.get(m.model)
    req = GenerateRequest(
        request_id="bench-ensemble",
        prompt=PROMPT,
        sampling=SamplingOptions(max_tokens=max_bytes, temperature=1.0, seed=seed),
    )
    ctx = RequestContext("bench-ensemble", time.monotonic() + 3600)
    text = ""
    t0 = time.perf_counter()
    stream = await runner.open(node_id, node, req, ctx)
    t_open = time.perf_counter() - t0
    # What the prompt's set-up cost (the re-opened tail, byte by byte, and the first forwards).
    open_calls = {m: dict(v) for m, v in CALLS.items()}
    async for ev in stream:
        if ev["type"] == "delta":
            text += ev.get("text", "")
    seconds = time.perf_counter() - t0
    runner.close()
    await http.aclose()
    n = len(text.encode())
    return {
        "node": node_id,
        "seed": seed,
        "prune": runner.prune,
        "bytes": n,
        "seconds": seconds,
        "bytes_per_s": n / seconds,
        "open_seconds": t_open,
        "open_byte_dist": open_calls,
        "text": text,
        "byte_dist": CALLS,
        "trees": runner.totals.by_model,
    }


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    graph = load_graph(args.config)
    node = graph.nodes[args.node]
    assert isinstance(node, EnsembleNode), f"{args.node} is not an ensemble node"
    urls = dict(u.split("=", 1) for u in args.url)
    procs: list[WorkerProcess] = []
    missing = [m.model for m in node.members if m.model not in urls]
    try:
        if missing:
            from service.models.resolve import resolve_model_dir

            dirs = {}
            for m in missing:
                spec = graph.models[m]
                dirs[m] = resolve_model_dir(spec.packaged or spec.path or m)
            procs = start_workers(graph, dirs, Path(tempfile.mkdtemp(prefix="octo-bench-")))
            wait_ready(procs)
            urls.update({p.name: p.url for p in procs})
        members = [await token_speed(urls[m.model], m.model, args.tokens) for m in node.members]
        ens = await ensemble_speed(graph, args.node, urls, args.bytes, args.prune, args.seed)
    finally:
        if procs:
            stop_workers(procs)
    slower = min(members, key=lambda m: m["bytes_per_s"])
    steady = ens["bytes"] / max(ens["seconds"] - ens["open_seconds"], 1e-9)
    return {
        "members": members,
        "ensemble": ens,
        "slower_member": slower["model"],
        "ratio": ens["bytes_per_s"] / slower["bytes_per_s"],
        "steady_bytes_per_s": steady,
        "steady_ratio": steady / slower["bytes_per_s"],
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", type=Path, default=REPO / "configs/local.yaml")
    p.add_argument("--node", default="blend")
    p.add_argument("--bytes", type=int, default=200)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument(
        "--seed",
        type=int,
        default=int(time.time()) % 100_000,
        help="sampling seed (a new one each run by default: a repeated seed finds "
        "the workers' path caches warm and measures nothing)",
    )
    p.add_argument(
        "--prune",
        type=float,
        default=None,
        help="override the runner's cover-pruning threshold (0: exact)",
    )
    p.add_argument("--url", action="append", default=[], metavar="MODEL=URL")
    args = p.parse_args()
    result = asyncio.run(main_async(args))
    for m in result["members"]:
        print(
            f"member {m['model']:<10} token-level: {m['bytes']:5d} bytes in "
            f"{m['seconds']:6.2f}s = {m['bytes_per_s']:7.1f} bytes/s"
        )
    e = result["ensemble"]
    print(
        f"ensemble {e['node']:<8} byte-level : {e['bytes']:5d} bytes in {e['seconds']:6.2f}s "
        f"= {e['bytes_per_s']:7.1f} bytes/s (first distribution after {e['open_seconds']:.2f}s, "
        f"prune {e['prune']:g})"
    )
    for model, c in e["byte_dist"].items():
        o = e["open_byte_dist"].get(model, {"calls": 0, "seconds": 0.0})
        print(
            f"  byte-dist {model:<10}: {int(c['calls'])} calls, {int(c['queries'])} queries, "
            f"{c['seconds']:.2f}s waiting ({c['seconds'] / max(e['seconds'], 1e-9):.0%} of "
            f"the ensemble's time; {int(o['calls'])} calls, {o['seconds']:.2f}s before the "
            "first distribution)"
        )
    for model, t in e["trees"].items():
        print(
            f"  tree {model:<10}: {int(t['steps'])} steps, {int(t['new_paths'])} new paths "
            f"(forwards), {int(t['recoveries'])} rebuilds, pruned mass {t['pruned_mass']:.3g}"
        )
    print(
        f"ratio ensemble / slower member ({result['slower_member']}): {result['ratio']:.3f} "
        f"end to end; {result['steady_ratio']:.3f} after the first distribution "
        f"({result['steady_bytes_per_s']:.1f} bytes/s)"
    )
    out = REPO / "bench/results/ensemble_speed.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
