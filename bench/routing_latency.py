"""Routing latency and accuracy on the real path: POST /v1/route -> gateway -> router worker
(vLLM on the built router model) -> one /internal/score call per route.

    .venv/bin/python bench/routing_latency.py                       # starts worker + gateway
    .venv/bin/python bench/routing_latency.py --gateway http://127.0.0.1:8000   # a running one
    .venv/bin/python bench/routing_latency.py --router-url http://127.0.0.1:PORT  # a worker
    .venv/bin/python bench/routing_latency.py --stack   # the whole default stack (octograph up)

Started mode: one vLLM worker on the graph's router model (built first if missing, as
`octograph up` does) and a gateway process whose graph is the default one with every model
pointed at that worker (/v1/route never generates, so the leaves need no engines of their own).

Sequential requests (one client, keep-alive), after a warm-up. Prints p50/p90/p99 of the time
the client sees and of the gateway's own `latency_ms`, leaf accuracy, and writes
bench/results/routing_latency.json. Target (issue 3): p50 <= 40 ms on the 2-core CPU.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from service.training.router_eval import latency_percentiles  # noqa: E402

RESULTS = REPO / "bench" / "results"


def load_rows(path: Path) -> list[dict[str, str]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def start_worker(config: Path, log_dir: Path) -> Any:
    """One vLLM worker on the graph's router model (built first when missing)."""
    from service.embedded import model_dirs, start_workers, stop_workers, wait_ready
    from service.graph.schema import RouterNode, load_graph

    graph = load_graph(config)
    router_models = sorted({n.model for n in graph.nodes.values() if isinstance(n, RouterNode)})
    if len(router_models) != 1:
        raise SystemExit(f"expected one router model, found {router_models}")
    name = router_models[0]
    only = graph.model_copy(update={"models": {name: graph.models[name]}, "nodes": {}})
    dirs = model_dirs(only, config)
    t0 = time.monotonic()
    # The whole graph, so the worker gets the environment and threads of its role (a
    # router-only model: 32-token blocks holding the system prefix, no capture, one thread).
    workers = start_workers(graph, {name: dirs[name]}, log_dir)
    try:
        wait_ready(workers, timeout_s=900)
    except BaseException:
        stop_workers(workers)
        raise
    print(f"router worker ready in {time.monotonic() - t0:.0f}s ({workers[0].url})")
    return workers


def start_gateway(config: Path, log_dir: Path, router_url: str) -> tuple[Any, str]:
    from service.embedded import free_port

    raw = yaml.safe_load(config.read_text())
    raw["models"] = {m: {"urls": [router_url]} for m in raw["models"]}
    cfg = log_dir / "graph.yaml"
    cfg.write_text(yaml.safe_dump(raw, sort_keys=False))
    port = free_port()
    gw = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "gateway", "--config", str(cfg), "--port", str(port)],
        cwd=REPO,
        stdout=open(log_dir / "gateway.log", "wb"),  # noqa: SIM115 - the child owns it
        stderr=subprocess.STDOUT,
        start_new_session=True,
        env=dict(os.environ),
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if gw.poll() is not None:
            raise RuntimeError((log_dir / "gateway.log").read_text())
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/readyz", timeout=1, trust_env=False).status_code == 200:
                return gw, url
        time.sleep(0.2)
    raise RuntimeError("gateway not ready:\n" + (log_dir / "gateway.log").read_text())


def start_stack(config: Path, log_dir: Path) -> tuple[Any, str]:
    """`octograph up` on the graph (every worker, as shipped), its own port and log dir."""
    from service.embedded import free_port

    port = free_port()
    up = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "up", "--config", str(config), "--port", str(port)],
        cwd=REPO,
        stdout=open(log_dir / "up.log", "wb"),  # noqa: SIM115 - the child owns it
        stderr=subprocess.STDOUT,
        start_new_session=True,
        env={**os.environ, "OCTOGRAPH_LOG_DIR": str(log_dir)},
    )
    url = f"http://127.0.0.1:{port}"
    t0 = time.monotonic()
    while time.monotonic() - t0 < 900:
        if up.poll() is not None:
            raise RuntimeError((log_dir / "up.log").read_text()[-3000:])
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/readyz", timeout=1, trust_env=False).status_code == 200:
                print(f"stack ready in {time.monotonic() - t0:.0f}s ({url})")
                return up, url
        time.sleep(0.5)
    raise RuntimeError("stack not ready:\n" + (log_dir / "up.log").read_text()[-3000:])


def measure(url: str, rows: list[dict[str, str]], warmup: int) -> dict[str, Any]:
    client_s: list[float] = []
    server_s: list[float] = []
    right = 0
    errors = []
    failed: list[str] = []
    with httpx.Client(base_url=url, timeout=30, trust_env=False) as client:
        for row in rows[:warmup]:
            client.post("/v1/route", json={"prompt": row["query"]})
        for row in rows:
            body = {"model": "auto", "messages": [{"role": "user", "content": row["query"]}]}
            t0 = time.perf_counter()
            resp = client.post("/v1/route", json=body)
            dt = time.perf_counter() - t0
            if resp.status_code != 200:
                # On an overloaded machine a health probe can time out and take the worker
                # out for a moment: count it, wait, go on (the figures say how many).
                failed.append(f"{resp.status_code} {resp.text[:120]}")
                time.sleep(1.0)
                continue
            client_s.append(dt)
            data = resp.json()
            server_s.append(float(data["latency_ms"]) / 1000)
            if data["node"] == row["node"]:
                right += 1
            else:
                errors.append([row["query"], row["node"], resp.headers["x-octograph-route"]])
    answered = len(client_s)
    return {
        "queries": len(rows),
        "answered": answered,
        "failed": failed,
        "accuracy": round(right / max(1, answered), 4),
        "client_ms": latency_percentiles(client_s),
        "gateway_routing_ms": latency_percentiles(server_s),
        "errors": errors,
    }


def run_once(args: argparse.Namespace, rows: list[dict[str, str]]) -> dict[str, Any]:
    """Start what the mode needs (with this process's environment), measure, stop it."""
    workers: list[Any] = []
    gw: subprocess.Popen[bytes] | None = None
    try:
        if args.gateway:
            url = args.gateway
        elif args.stack:
            log_dir = Path(tempfile.mkdtemp(prefix="octograph-bench-route-"))
            gw, url = start_stack(args.config, log_dir)
            # Past /readyz the gateway still loads the ensembles' byte tables (~10 s of CPU)
            # and the workers settle: measuring then timed the start-up, not routing.
            time.sleep(args.settle)
        else:
            log_dir = Path(tempfile.mkdtemp(prefix="octograph-bench-route-"))
            router_url = args.router_url
            if router_url is None:
                workers = start_worker(args.config, log_dir)
                router_url = workers[0].url
            gw, url = start_gateway(args.config, log_dir, router_url)
        result = measure(url, rows, args.warmup)
    finally:
        if gw is not None:
            with contextlib.suppress(ProcessLookupError):
                # `octograph up` drains its gateway on SIGTERM, then stops its workers.
                os.killpg(gw.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                gw.wait(timeout=60)
        if workers:
            from service.embedded import stop_workers

            stop_workers(workers)
    result["load_average"] = os.getloadavg()
    return result


def report(label: str, result: dict[str, Any], show_misses: bool) -> None:
    c, s = result["client_ms"], result["gateway_routing_ms"]
    print(
        f"{label}POST /v1/route over {result['answered']}/{result['queries']} queries "
        f"(sequential, after warm-up; load average {result['load_average'][0]:.1f}):"
    )
    print(f"  client   p50 {c['p50']:.1f} ms  p90 {c['p90']:.1f} ms  p99 {c['p99']:.1f} ms")
    print(f"  routing  p50 {s['p50']:.1f} ms  p90 {s['p90']:.1f} ms  p99 {s['p99']:.1f} ms")
    print(f"  leaf accuracy {result['accuracy']:.1%}  (issue 21: p50 <= 15 ms, accuracy >= 95%)")
    for failure in result["failed"]:
        print(f"  failed: {failure}")
    if show_misses:
        for q, want, got in result["errors"]:
            print(f"  miss: {want:10s} -> {got:24s} {q}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", type=Path, default=REPO / "configs/local.yaml")
    ap.add_argument("--data", type=Path, default=REPO / "configs/routing/eval.jsonl")
    ap.add_argument("--gateway", help="use a running gateway instead of starting one")
    ap.add_argument("--router-url", help="use a running router worker; start only the gateway")
    ap.add_argument(
        "--stack",
        action="store_true",
        help="start the whole default stack (`octograph up`: every worker sharing the cores, "
        "as shipped) and measure through its gateway",
    )
    ap.add_argument(
        "--compare-dtype",
        action="store_true",
        help="run twice in one go: every worker in bfloat16 (the settings before issue 21's "
        "router dtype), then as shipped (the router in float32 on a CPU without bfloat16 "
        "arithmetic), and print both",
    )
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument(
        "--settle", type=float, default=30.0, help="--stack: seconds between /readyz and measuring"
    )
    ap.add_argument("--limit", type=int, help="only the first N queries")
    args = ap.parse_args()
    if args.compare_dtype and (args.gateway or args.router_url):
        ap.error("--compare-dtype starts its own workers: not with --gateway / --router-url")
    rows = load_rows(args.data)[: args.limit]
    from service.affinity import has_native_bf16

    print(f"this CPU computes in bfloat16 natively: {has_native_bf16()}")
    results: dict[str, Any] = {}
    if args.compare_dtype:
        saved = os.environ.get("OCTOGRAPH_WORKER_DTYPE")
        os.environ["OCTOGRAPH_WORKER_DTYPE"] = "bfloat16"
        try:
            results["bfloat16"] = run_once(args, rows)
        finally:
            os.environ.pop("OCTOGRAPH_WORKER_DTYPE")
            if saved is not None:
                os.environ["OCTOGRAPH_WORKER_DTYPE"] = saved
    results["shipped"] = run_once(args, rows)
    for label, result in results.items():
        report(f"[{label}] " if len(results) > 1 else "", result, show_misses=label == "shipped")
    if len(results) > 1:
        before = results["bfloat16"]["client_ms"]["p50"]
        now = results["shipped"]["client_ms"]["p50"]
        print(f"client p50: bfloat16 {before:.1f} ms, shipped {now:.1f} ms ({before / now:.2f}x)")
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = results["shipped"] if len(results) == 1 else results
    (RESULTS / "routing_latency.json").write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
