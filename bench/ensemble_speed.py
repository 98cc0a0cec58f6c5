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

`--samples` (3) repeats both with a different prompt and seed each time, members then ensemble,
interleaved (how many token paths a text needs varies severalfold with the sampled text, and
this machine's speed drifts by tens of percent within minutes); figures are pooled (all bytes
over all seconds).

Prints both, the ratio ensemble / slower member (end to end, and after the first
distribution, i.e. without the prompt set-up), and what the ensemble's time went into:
worker byte-dist calls per member (count, queries, time) and the rest (trees, mixing).
Writes bench/results/ensemble_speed.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
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
from service.gateway.clients.pool import WorkerPools  # noqa: E402
from service.gateway.clients.worker import make_http_client  # noqa: E402
from service.gateway.plan import RequestContext, plan_completion  # noqa: E402
from service.gateway.runners.base import Target  # noqa: E402
from service.gateway.runners.byte_oracle import PoolReducer  # noqa: E402
from service.gateway.runners.ensemble import EnsembleRunner  # noqa: E402
from service.gateway.scope import RequestScope  # noqa: E402
from service.graph.schema import EnsembleNode, load_graph  # noqa: E402
from service.observability.metrics import GatewayMetrics  # noqa: E402
from service.protocol.internal import GenerateRequest, SamplingOptions  # noqa: E402
from service.protocol.openai import CompletionRequest  # noqa: E402

# Time spent waiting on each model's byte-dist calls (the bench wraps the reducer).
CALLS: dict[str, dict[str, float]] = {}
_original_call = PoolReducer._call


async def _timed_call(self: PoolReducer, queries: list[Any]) -> Any:
    t0 = time.perf_counter()
    fetched = self.fetched
    try:
        return await _original_call(self, queries)
    finally:
        seconds = time.perf_counter() - t0
        entry = CALLS.setdefault(
            self.pool.name,
            {
                "calls": 0,
                "queries": 0,
                "seconds": 0.0,
                "fetching_calls": 0,
                "rows": 0,
                "fetching_seconds": 0.0,
            },
        )
        entry["calls"] += 1
        entry["queries"] += len(queries)
        entry["seconds"] += seconds
        if self.fetched > fetched:  # the call waited on the model: one engine step or more
            entry["fetching_calls"] += 1
            entry["rows"] += self.fetched - fetched
            entry["fetching_seconds"] += seconds


PoolReducer._call = _timed_call  # type: ignore[method-assign]

# --speculate-with, when given (a list: set once from the command line).
SPECULATE_WITH: list[str] = []

# One prompt per sample, so no sample finds its prompt's paths cached by an earlier one.
PROMPTS = (
    "The old lighthouse keeper climbed the stairs every evening at dusk. On the night "
    "of the storm, he noticed",
    "Every spring the river rose over the low fields, and the farmers moved their sheep "
    "to the hills. That year, however,",
    "The letter arrived on a Tuesday, three weeks late and stained with rain. When she "
    "finally opened it, she found",
)


async def token_speed(url: str, model: str, tokens: int, seed: int) -> dict[str, Any]:
    req = GenerateRequest(
        request_id=f"bench-{model}-{seed}",
        prompt=PROMPTS[seed % len(PROMPTS)],
        sampling=SamplingOptions(max_tokens=tokens, temperature=1.0, seed=seed, ignore_eos=True),
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
    graph: Any,
    node_id: str,
    urls: dict[str, str],
    max_bytes: int,
    prune: float | None,
    speculate: int | None,
    speculate_min_p: float | None,
    seed: int,
    prompt: str,
    sessions: bool = True,
) -> dict[str, Any]:
    node = graph.nodes[node_id]
    assert isinstance(node, EnsembleNode)
    http = make_http_client(5.0, 600.0)
    metrics = GatewayMetrics(CollectorRegistry())
    pools = WorkerPools({m: [u] for m, u in urls.items()}, http, metrics, cooldown_s=1.0)
    for _ in range(60):  # a busy worker may miss a 2 s readiness probe
        await pools.probe_once()
        if pools.all_ready:
            break
        await asyncio.sleep(0.5)
    runner = EnsembleRunner(graph, pools, metrics)
    if prune is not None:
        runner.prune = prune
    if speculate is not None:
        runner.speculate = speculate
    if speculate_min_p is not None:
        runner.speculate_min_p = speculate_min_p
    if SPECULATE_WITH:
        runner.speculate_with = SPECULATE_WITH[0]
    runner.sessions = sessions
    for m in node.members:  # tokenizer tables load once per gateway, not per request
        await runner.assets.get(m.model)
    # The request as the gateway plans it, run through the ensemble runner's seam.
    req = CompletionRequest(
        model=node_id, prompt=prompt, max_tokens=max_bytes, temperature=1.0, seed=seed
    )
    plan = plan_completion(req, RequestContext("bench-ensemble", time.monotonic() + 3600))
    target = Target(node_id, node, None, {"route": [node_id], "scores": []})
    scope = RequestScope()
    text = ""
    first_byte: float | None = None
    CALLS.clear()
    t0 = time.perf_counter()
    answer = await runner.open(plan, target, scope)
    t_open = time.perf_counter() - t0
    # What the prompt's set-up cost (the re-opened tail, byte by byte, and the first forwards).
    open_calls = {m: dict(v) for m, v in CALLS.items()}
    assert answer.events is not None
    async for ev in answer.events:
        if ev["type"] == "delta":
            if first_byte is None:
                first_byte = time.perf_counter() - t0
            text += ev.get("text", "")
    seconds = time.perf_counter() - t0
    await scope.aclose()
    runner.close()
    await http.aclose()
    n = len(text.encode())
    return {
        "node": node_id,
        "seed": seed,
        "prune": runner.prune,
        "speculate": {
            m.model: runner.speculate if m.speculate is None else m.speculate for m in node.members
        },
        "speculate_min_p": runner.speculate_min_p,
        "speculate_with": runner.speculate_with,
        "sessions": sessions,
        "bytes": n,
        "seconds": seconds,
        "bytes_per_s": n / seconds,
        "open_seconds": t_open,
        "first_byte_seconds": first_byte,
        "open_byte_dist": open_calls,
        "text": text,
        "byte_dist": {m: dict(v) for m, v in CALLS.items()},
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
        # A fresh engine's first requests run slower (allocations, first-seen batch shapes):
        # one short generation per member first, so that cost lands in neither figure.
        for m in node.members:
            await token_speed(urls[m.model], m.model, 8, 10_000)
        # Samples interleave members and ensemble, so drift in the machine's speed hits both.
        members: list[dict[str, Any]] = []
        samples: list[dict[str, Any]] = []
        compared: list[dict[str, Any]] = []
        for i in range(args.samples):
            for m in node.members:
                members.append(await token_speed(urls[m.model], m.model, args.tokens, i))
            runs = [(samples, args.speculate, args.seed + i, True)]
            if args.compare_speculate is not None or args.compare_sessions:
                # Its own seed (a repeated one would find the first run's paths cached), and
                # first on every other sample (the second run finds the prompt's paths cached).
                other = (
                    compared,
                    args.speculate if args.compare_sessions else args.compare_speculate,
                    args.seed + i + 50_000,
                    not args.compare_sessions,
                )
                runs = [other, *runs] if i % 2 == 0 else [*runs, other]
            for into, speculate, seed, sessions in runs:
                into.append(
                    await ensemble_speed(
                        graph,
                        args.node,
                        urls,
                        args.bytes,
                        args.prune,
                        speculate,
                        args.speculate_min_p,
                        seed,
                        PROMPTS[i % len(PROMPTS)],
                        sessions,
                    )
                )
    finally:
        if procs:
            stop_workers(procs)
    pooled = {m.model: _pooled([r for r in members if r["model"] == m.model]) for m in node.members}
    slower = min(pooled, key=lambda name: pooled[name]["bytes_per_s"])
    ens = _pooled(samples)
    steady_seconds = sum(e["seconds"] - e["open_seconds"] for e in samples)
    steady = ens["bytes"] / max(steady_seconds, 1e-9)
    first_bytes = [e["first_byte_seconds"] for e in samples if e["first_byte_seconds"]]
    comparison = None
    if compared:
        other = _pooled(compared)
        other_first = [e["first_byte_seconds"] for e in compared if e["first_byte_seconds"]]
        comparison = {
            "label": "without sessions"
            if args.compare_sessions
            else f"speculate {args.compare_speculate}",
            "speculate": args.compare_speculate,
            "samples": compared,
            "ensemble_pooled": other,
            "ratio": other["bytes_per_s"] / pooled[slower]["bytes_per_s"],
            "byte_dist_pooled": _pooled_calls(compared),
            "first_byte_seconds_mean": sum(other_first) / max(len(other_first), 1),
        }
    return {
        "comparison": comparison,
        "executor": os.environ.get("OCTOGRAPH_WORKER_EXECUTOR", "uni (role_settings)"),
        "byte_dist_pooled": _pooled_calls(samples),
        "first_byte_seconds_mean": sum(first_bytes) / max(len(first_bytes), 1),
        "members": members,
        "members_pooled": pooled,
        "samples": samples,
        "ensemble_pooled": ens,
        "slower_member": slower,
        "ratio": ens["bytes_per_s"] / pooled[slower]["bytes_per_s"],
        "steady_bytes_per_s": steady,
        "steady_ratio": steady / pooled[slower]["bytes_per_s"],
    }


def _pooled_calls(samples: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Byte-dist calls per member summed over the samples, with the worker's counts."""
    out: dict[str, dict[str, float]] = {}
    for e in samples:
        for model, c in e["byte_dist"].items():
            entry = out.setdefault(model, {})
            for k, v in c.items():
                entry[k] = entry.get(k, 0.0) + v
        for model, t in e["trees"].items():
            entry = out.setdefault(model, {})
            for k in ("new_paths", "speculated", "speculation_hits", "steps", "extended"):
                entry[k] = entry.get(k, 0.0) + t.get(k, 0.0)
    return out


def _pooled(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """All bytes over all seconds."""
    total_bytes = sum(r["bytes"] for r in runs)
    seconds = sum(r["seconds"] for r in runs)
    return {"bytes": total_bytes, "seconds": seconds, "bytes_per_s": total_bytes / seconds}


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
    p.add_argument(
        "--samples",
        type=int,
        default=3,
        help="ensemble texts (seeds seed, seed+1, ...) and member runs, interleaved; pooled",
    )
    p.add_argument(
        "--speculate",
        type=int,
        default=None,
        help="override the runner's children speculated per new path (0: off) for members "
        "that do not set their own",
    )
    p.add_argument(
        "--speculate-min-p",
        type=float,
        default=None,
        help="override the share of the mass a speculated child's token needs",
    )
    p.add_argument(
        "--speculate-with",
        choices=("step", "background"),
        default=None,
        help="speculated children ride in a needed engine step, or run on their own",
    )
    p.add_argument(
        "--compare-speculate",
        type=int,
        default=None,
        metavar="N",
        help="also run each sample's ensemble with speculate N (own seed, order alternating), "
        "pooled and printed beside the main figures",
    )
    p.add_argument(
        "--compare-sessions",
        action="store_true",
        help="also run each sample's ensemble without the workers' streaming sessions (a new "
        "engine request per token path; own seed, order alternating), printed beside",
    )
    p.add_argument("--url", action="append", default=[], metavar="MODEL=URL")
    args = p.parse_args()
    if args.speculate_with:
        SPECULATE_WITH.append(args.speculate_with)
    result = asyncio.run(main_async(args))
    for m in result["members"]:
        print(
            f"member {m['model']:<10} token-level: {m['bytes']:5d} bytes in "
            f"{m['seconds']:6.2f}s = {m['bytes_per_s']:7.1f} bytes/s"
        )
    for e in result["samples"]:
        print_sample(e)
    for model, m in result["members_pooled"].items():
        print(f"pooled member {model:<10}: {m['bytes_per_s']:7.1f} bytes/s")
    e = result["ensemble_pooled"]
    print(
        f"pooled ensemble         : {e['bytes_per_s']:7.1f} bytes/s "
        f"({e['bytes']} bytes in {e['seconds']:.1f}s)"
    )
    comparison = result["comparison"]
    if comparison is not None:
        for e in comparison["samples"]:
            print_sample(e)
        print_calls(comparison["byte_dist_pooled"], f"{comparison['label']} ")
        c = comparison["ensemble_pooled"]
        print(
            f"pooled ensemble, {comparison['label']}: {c['bytes_per_s']:7.1f} "
            f"bytes/s, ratio {comparison['ratio']:.3f}, first byte "
            f"{comparison['first_byte_seconds_mean']:.2f}s"
        )
    print_calls(result["byte_dist_pooled"], "")
    print(f"time to first byte (mean)  : {result['first_byte_seconds_mean']:.2f}s")
    print(
        f"ratio ensemble / slower member ({result['slower_member']}): {result['ratio']:.3f} "
        f"end to end; {result['steady_ratio']:.3f} after the first distribution "
        f"({result['steady_bytes_per_s']:.1f} bytes/s)"
    )
    out = REPO / "bench/results/ensemble_speed.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    return 0


def print_calls(calls: dict[str, dict[str, float]], label: str) -> None:
    """Per member: calls, those that waited on the model (rows each: the batch size), time."""
    for model, c in calls.items():
        fetching = max(c.get("fetching_calls", 0.0), 1.0)
        plain = max(c["calls"] - c.get("fetching_calls", 0.0), 1.0)
        print(
            f"pooled byte-dist {label}{model:<10}: {int(c['calls'])} calls, "
            f"{int(c.get('fetching_calls', 0))} waited on the model "
            f"({c.get('rows', 0) / fetching:.2f} rows each, "
            f"{1000 * c.get('fetching_seconds', 0) / fetching:.0f} ms each; the others "
            f"{1000 * (c['seconds'] - c.get('fetching_seconds', 0)) / plain:.0f} ms); "
            f"{int(c.get('new_paths', 0))} new paths, {int(c.get('speculated', 0))} speculated, "
            f"{int(c.get('speculation_hits', 0))} of them used, "
            f"{int(c.get('extended', 0))} rows as a session's extension"
        )


def print_sample(e: dict[str, Any]) -> None:
    print(
        f"ensemble {e['node']:<8} seed {e['seed']}: {e['bytes']:5d} bytes in {e['seconds']:6.2f}s "
        f"= {e['bytes_per_s']:7.1f} bytes/s (first distribution after {e['open_seconds']:.2f}s, "
        f"prune {e['prune']:g}, speculate {e['speculate']} (min p "
        f"{e['speculate_min_p']:g}, {e['speculate_with']}), sessions "
        f"{'on' if e.get('sessions', True) else 'off'}, first byte after "
        f"{e['first_byte_seconds'] or 0:.2f}s)"
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


if __name__ == "__main__":
    raise SystemExit(main())
