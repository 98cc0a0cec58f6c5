"""`octograph ensemble eval`: bits per byte of an ensemble node's members and of the ensemble.

    octograph ensemble eval --node blend --text configs/eval/heldout.txt

Workers: `--url model=http://...` (or the graph's `urls`) are used as they are; otherwise a
worker is started for each member (vLLM on this machine, as `octograph up` does) and stopped
at the end.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from service.bytelevel.utf8 import is_complete
from service.graph.schema import EnsembleNode, GraphConfig, ModelNode


def add_ensemble_commands(sub: Any) -> None:
    en = sub.add_parser("ensemble", help="byte-level ensembles")
    esub = en.add_subparsers(dest="ensemble_cmd", required=True)
    ev = esub.add_parser("eval", help="bits per byte of each member and of the ensemble")
    ev.add_argument("--node", required=True, help="an ensemble node (or a model node)")
    ev.add_argument("--text", required=True, type=Path, help="UTF-8 text file to score")
    ev.add_argument("--config", type=Path, default=Path("configs/local.yaml"))
    ev.add_argument(
        "--url",
        action="append",
        default=[],
        metavar="MODEL=URL",
        help="use a running worker for MODEL (repeatable)",
    )
    ev.add_argument(
        "--max-bytes",
        type=int,
        default=None,
        help="score only the first N bytes (cut back to a character boundary)",
    )
    ev.add_argument(
        "--prune",
        type=float,
        default=0.0,
        help="drop covers below this fraction of the prefix mass (0: exact)",
    )
    ev.add_argument(
        "--speculate",
        type=int,
        default=0,
        help="children of each new path the workers fetch ahead (the gateway's speculation; "
        "0: off). It changes which engine step computes a row, never the scores",
    )
    ev.add_argument(
        "--speculate-min-p",
        type=float,
        default=None,
        help="share of the mass a speculated child's token needs (default: the gateway's)",
    )
    ev.add_argument(
        "--no-sessions",
        action="store_true",
        help="a new engine request per token path instead of extending the workers' streaming "
        "sessions. It changes how a row is computed, never the scores",
    )
    ev.add_argument("--json", action="store_true", help="print one JSON object")
    ev.set_defaults(func=_eval)


def _members(graph: GraphConfig, node_id: str) -> tuple[list[tuple[str, float]], str]:
    node = graph.nodes.get(node_id)
    if isinstance(node, EnsembleNode):
        return [(m.model, m.weight) for m in node.members], node.mode
    if isinstance(node, ModelNode):
        return [(node.model, 1.0)], "mix"
    raise SystemExit(f"error: '{node_id}' is not an ensemble or model node of this graph")


def _read_text(path: Path, max_bytes: int | None) -> bytes:
    data = path.read_bytes()
    data.decode("utf-8")  # refuse non-UTF-8 input early
    if max_bytes is not None and len(data) > max_bytes:
        data = data[:max_bytes]
        while data and not is_complete(data):
            data = data[:-1]
    return data


def _eval(args: argparse.Namespace) -> int:
    from service.embedded import WorkerProcess, start_workers, stop_workers, wait_ready
    from service.gateway.runners.ensemble import DEFAULT_SPECULATE_MIN_P
    from service.gateway.runners.ensemble_assets import load_member_assets
    from service.graph.schema import load_graph
    from service.models.resolve import resolve_model_dir
    from service.training.ensemble_eval import (
        WorkerOracle,
        bits_per_byte,
        ensemble_nats,
        score_members,
    )

    graph = load_graph(args.config)
    members, mode = _members(graph, args.node)
    text = _read_text(args.text, args.max_bytes)
    urls = dict(u.split("=", 1) for u in args.url)
    dirs = {}
    for model, _ in members:
        spec = graph.worker_models().get(model)
        if spec is None:
            raise SystemExit(f"error: model '{model}' is not served by an Octograph worker")
        name = spec.packaged or spec.path
        if not name:
            raise SystemExit(f"error: model '{model}' needs `packaged` or `path` (tokenizer)")
        dirs[model] = resolve_model_dir(name)
        if model not in urls and spec.urls:
            urls[model] = spec.urls[0]
    procs: list[WorkerProcess] = []
    to_start = {m: d for m, d in dirs.items() if m not in urls}
    try:
        if to_start:
            sys.stderr.write(f"starting workers: {', '.join(to_start)}\n")
            procs = start_workers(graph, to_start, Path(tempfile.mkdtemp(prefix="octo-eval-")))
        assets = {
            m: load_member_assets(m, d, graph.worker_models()[m].max_model_len)
            for m, d in dirs.items()
        }
        if procs:
            wait_ready(procs)
            urls.update({p.name: p.url for p in procs})
        min_p = DEFAULT_SPECULATE_MIN_P if args.speculate_min_p is None else args.speculate_min_p
        oracles = {
            m: WorkerOracle(
                urls[m],
                speculate=args.speculate,
                speculate_min_p=min_p,
                sessions=not args.no_sessions,
            )
            for m, _ in members
        }
        plan = []
        for model, _ in members:
            start = assets[model].prompts.start_id
            plan.append(
                (model, assets[model].table, oracles[model], [start] if start is not None else [])
            )
        scores, wall = score_members(plan, text, args.prune)
        worker_counts = {
            m: {
                "fetched": o.fetched,
                "speculated": o.speculated,
                "speculation_hits": o.speculation_hits,
                "extended": o.extended,
            }
            for m, o in oracles.items()
        }
        for o in oracles.values():
            o.close()
    finally:
        if procs:
            stop_workers(procs)
    report = _report(args.node, mode, members, scores, text, wall, ensemble_nats, bits_per_byte)
    for entry in report["members"]:
        entry.update(worker_counts[entry["model"]])
    if args.json:
        _say(json.dumps(report, indent=2))
    else:
        _print(report)
    return 0


def _report(
    node: str,
    mode: str,
    members: list[tuple[str, float]],
    scores: Any,
    text: bytes,
    wall: float,
    ensemble_nats: Any,
    bits_per_byte: Any,
) -> dict[str, Any]:
    n = len(text)
    weights = [w for _, w in members]
    out: dict[str, Any] = {
        "node": node,
        "bytes": n,
        "mode": mode,
        "weights": weights,
        "members": [],
        "ensemble": {},
    }
    for s in scores:
        out["members"].append(
            {
                "model": s.model,
                "bpb": bits_per_byte(s.nats(text), n),
                "seconds": s.seconds,
                "bytes_per_s": n / s.seconds if s.seconds else None,
                "oracle_calls": s.oracle_calls,
                "queries": s.queries,
                "new_paths": s.new_paths,
                "leaked_nats_per_byte": s.leaked_nats / max(n, 1),
            }
        )
    if len(scores) > 1:
        t0 = time.perf_counter()
        rules = {
            f"{mode} (node)": (mode, weights, 0.0),
            "mix uniform": ("mix", [1.0] * len(scores), 0.0),
            "product": ("product", weights, 0.0),
            "adaptive (BMA)": ("adaptive", weights, 0.0),
            "fixed-share 0.01": ("adaptive", weights, 0.01),
        }
        for label, (m, w, alpha) in rules.items():
            out["ensemble"][label] = bits_per_byte(ensemble_nats(scores, text, m, w, alpha), n)
        out["mixing_seconds"] = time.perf_counter() - t0
    out["wall_seconds"] = wall
    out["bytes_per_s"] = n / wall if wall else None
    best = min(m["bpb"] for m in out["members"])
    node_bpb = out["ensemble"].get(f"{mode} (node)", best)
    out["ensemble_bpb"] = node_bpb
    out["better_than_best_member"] = node_bpb < best
    return out


def _say(line: str) -> None:
    sys.stdout.write(line + "\n")


def _print(r: dict[str, Any]) -> None:
    _say(
        f"node {r['node']}: {r['bytes']} bytes, members scored concurrently in "
        f"{r['wall_seconds']:.1f}s ({r['bytes_per_s']:.1f} bytes/s)"
    )
    _say(
        f"{'member':<24}{'bits/byte':>10}{'bytes/s':>10}{'calls':>7}{'queries':>9}"
        f"{'paths':>7}{'leak/B':>9}"
    )
    for m in r["members"]:
        _say(
            f"{m['model']:<24}{m['bpb']:>10.4f}{m['bytes_per_s']:>10.1f}{m['oracle_calls']:>7}"
            f"{m['queries']:>9}{m['new_paths']:>7}{m['leaked_nats_per_byte']:>9.2e}"
        )
    for label, bpb in r["ensemble"].items():
        _say(f"{'ensemble ' + label:<24}{bpb:>10.4f}")
    if r["ensemble"]:
        verdict = "lower" if r["better_than_best_member"] else "NOT lower"
        _say(
            f"ensemble ({r['mode']}, weights {r['weights']}): {r['ensemble_bpb']:.4f} bits/byte, "
            f"{verdict} than the best member's "
            f"{min(m['bpb'] for m in r['members']):.4f}"
        )
