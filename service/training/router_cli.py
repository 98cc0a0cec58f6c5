"""`octograph router build|eval`: make the graph's router model, and measure how well it routes.

octograph router build --graph configs/local.yaml            # skipped when unchanged
octograph router eval --graph configs/local.yaml --data configs/routing/eval.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def add_router_commands(sub: Any) -> None:
    rt = sub.add_parser("router", help="the functional-token router model")
    rsub = rt.add_subparsers(dest="router_cmd", required=True)

    b = rsub.add_parser("build", help="build the router model of a graph (idempotent)")
    b.add_argument("--graph", type=Path, default=Path("configs/local.yaml"))
    b.add_argument("--model", help="which router model of the graph (default: the only one)")
    b.add_argument("--base", help="packaged model name or model dir (default: build.base)")
    b.add_argument("--train", help="JSON-lines training data (default: build.train)")
    b.add_argument("--out", type=Path, help="output model dir (default: the model's path)")
    b.add_argument("--seed", type=int)
    b.add_argument("--epochs", type=int, help="full-batch optimiser steps")
    b.add_argument("--lr", type=float)
    b.add_argument("--weight-decay", type=float)
    b.add_argument("--threads", type=int, help="torch threads of the feature pass (default 1)")
    b.add_argument("--layers", type=int, help="keep the first N transformer layers (0: all)")
    b.add_argument(
        "--tune-top-mlp",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also train the top layer's MLP (scoring-only routers)",
    )
    b.add_argument(
        "--tune-top-attention",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also train the top layer's attention query/output projections (scoring-only routers)",
    )
    b.add_argument(
        "--quantize",
        choices=["none", "int8"],
        help="int8: the decoder's Linears saved as int8 (W8A8) and trained against as such",
    )
    b.add_argument("--force", action="store_true", help="rebuild even when nothing changed")
    b.set_defaults(func=_build)

    e = rsub.add_parser("eval", help="routing accuracy per node, confusion matrix, latency")
    e.add_argument("--graph", type=Path, default=Path("configs/local.yaml"))
    e.add_argument("--data", type=Path, default=Path("configs/routing/eval.jsonl"))
    e.add_argument("--model", help="which router model of the graph (default: the only one)")
    e.add_argument("--router-dir", type=Path, help="model dir (default: the model's path)")
    e.add_argument(
        "--gateway",
        help="evaluate through a running gateway's POST /v1/route (the real path) instead of "
        "running the router model in-process with transformers",
    )
    e.add_argument("--limit", type=int, help="only the first N queries")
    e.add_argument("--json", action="store_true", help="print one JSON object")
    e.set_defaults(func=_eval)


def _out(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def _pick_model(graph: Any, wanted: str | None) -> str:
    from service.training.router_build import router_models

    names = router_models(graph)
    if wanted is not None:
        if wanted not in graph.models:
            raise SystemExit(f"error: the graph has no model '{wanted}'")
        return wanted
    if len(names) != 1:
        raise SystemExit(f"error: pick one router model with --model (buildable: {names})")
    return names[0]


def _build(args: argparse.Namespace) -> int:
    from service.graph.schema import ModelSpec, load_graph
    from service.training.router_build import (
        RouterBuildError,
        build_router_from_spec,
        router_model_dir,
    )

    graph = load_graph(args.graph)
    name = _pick_model(graph, args.model)
    spec = graph.models[name]
    if not isinstance(spec, ModelSpec) or spec.build is None:
        raise SystemExit(f"error: model '{name}' has no `build:` section in {args.graph}")
    out = args.out or router_model_dir(spec, name)
    try:
        result = build_router_from_spec(
            graph,
            args.graph,
            spec.build,
            out,
            model_name=name,
            force=args.force,
            base=args.base,
            train=args.train,
            seed=args.seed,
            epochs=args.epochs,
            lr=args.lr,
            weight_decay=args.weight_decay,
            threads=args.threads,
            layers=args.layers,
            tune_top_mlp=args.tune_top_mlp,
            tune_top_attention=args.tune_top_attention,
            quantize=args.quantize,
        )
    except RouterBuildError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 1
    if result.built:
        _out(f"built router model '{name}' in {result.seconds:.1f}s -> {result.out_dir}")
    else:
        _out(f"router model '{name}' is up to date (same inputs) -> {result.out_dir}")
    tokens = ", ".join(f"{n}={t}" for n, t in result.tokens.items())
    _out(f"  tokens: {tokens}")
    _out(f"  {result.examples} training examples; train accuracy {result.train_accuracy}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from service.graph.schema import ModelSpec, load_graph
    from service.training.router_build import router_model_dir
    from service.training.router_eval import (
        evaluate_gateway,
        evaluate_in_process,
        format_report,
        load_eval_rows,
    )

    graph = load_graph(args.graph)
    rows = load_eval_rows(args.data, graph)[: args.limit]
    if args.gateway:
        report = evaluate_gateway(graph, rows, args.gateway)
    else:
        name = _pick_model(graph, args.model)
        spec = graph.models[name]
        if not isinstance(spec, ModelSpec):
            raise SystemExit(f"error: model '{name}' is not a local model")
        model_dir = args.router_dir or router_model_dir(spec, name)
        if not (model_dir / "config.json").is_file():
            raise SystemExit(f"error: no router model at {model_dir}: run `octograph router build`")
        report = evaluate_in_process(graph, rows, model_dir)
    _out(json.dumps(report.as_dict(), indent=2) if args.json else format_report(report))
    return 0
