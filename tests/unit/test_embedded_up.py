"""`octograph up` as a user runs it: workers as subprocesses, readiness, a request, then SIGTERM:
in-flight streams finish, new requests are refused, exit 0, no orphan processes.
Fake engines (subprocess workers without weights) keep this fast."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import psutil

from tests.conftest import free_port

REPO = Path(__file__).resolve().parents[2]
CONFIG = """
models:
  a: {engine: fake}
  b: {engine: fake}
nodes:
  general: {kind: model, model: a}
"""


def wait_ready(url: str, proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "octograph up exited early"
        try:
            if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise AssertionError("not ready")


def wait_until(predicate: Callable[[], bool], what: str, timeout: float = 30) -> None:
    """Poll `predicate` until it holds; fail naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"not reached in {timeout:.0f}s: {what}"
        time.sleep(0.05)


def readyz_status(url: str) -> int | None:
    try:
        return httpx.get(f"{url}/readyz", timeout=2).status_code
    except httpx.HTTPError:
        return None


def test_up_serves_then_drains_and_reaps(tmp_path: Path) -> None:
    cfg = tmp_path / "graph.yaml"
    cfg.write_text(CONFIG)
    port = free_port()
    env = {
        **os.environ,
        "OCTOGRAPH_LOG_DIR": str(tmp_path / "logs"),
        "OCTOGRAPH_SHUTDOWN_GRACE_S": "20",
        "OCTOGRAPH_WORKER_FAKE_TOKEN_DELAY_S": "0.05",
        "OCTOGRAPH_WORKER_FAKE_REPLY_WORDS": "200",
    }
    t0 = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "up", "--config", str(cfg), "--port", str(port)],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, proc)
        startup_s = time.monotonic() - t0
        children = psutil.Process(proc.pid).children(recursive=True)
        assert len(children) >= 2
        r = httpx.post(
            f"{url}/v1/chat/completions",
            json={
                "model": "general",
                "max_tokens": 8,
                "messages": [{"role": "user", "content": "hello world"}],
            },
            timeout=30,
        )
        assert r.status_code == 200 and "world" in r.json()["choices"][0]["message"]["content"]

        # A slow stream (80 tokens at 50 ms: ~4 s) in flight while SIGTERM arrives: it must
        # finish, and it keeps the gateway draining (not gone) while the checks below run.
        result: dict[str, object] = {}
        first_chunk = threading.Event()

        def stream() -> None:
            body = ""
            with httpx.stream(
                "POST",
                f"{url}/v1/completions",
                timeout=30,
                json={"model": "general", "prompt": "slow", "stream": True, "max_tokens": 80},
            ) as resp:
                for text in resp.iter_text():
                    body += text
                    first_chunk.set()
            result["body"] = body

        th = threading.Thread(target=stream)
        th.start()
        assert first_chunk.wait(10)
        proc.send_signal(signal.SIGTERM)
        # The signal handler flips readiness: wait for it (no fixed sleep), then new work is
        # refused with 503 `draining` while the stream is still in flight.
        wait_until(lambda: readyz_status(url) == 503, "/readyz 503 after SIGTERM")
        refused = httpx.post(
            f"{url}/v1/chat/completions",
            json={"model": "general", "messages": [{"role": "user", "content": "late"}]},
        )
        assert refused.status_code == 503
        assert refused.json()["error"]["code"] == "draining"
        assert th.is_alive(), "the stream ended before the drain was observed"
        th.join(timeout=30)
        body = str(result.get("body", ""))
        assert body.rstrip().endswith("data: [DONE]") and '"finish_reason":"length"' in body
        code = proc.wait(timeout=40)
        assert code == 0

        def orphans() -> list[int]:
            return [
                c.pid for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE
            ]

        wait_until(lambda: not orphans(), "every worker process gone", timeout=10)
        print(f"up -> ready in {startup_s:.1f}s (fake workers)")
    finally:
        # A failed test must not leave its workers behind: kill the whole tree, not only `up`.
        if proc.poll() is None:
            with contextlib.suppress(psutil.Error):
                for child in psutil.Process(proc.pid).children(recursive=True):
                    child.kill()
            proc.kill()


def test_worker_env_follows_the_model_role() -> None:
    from service.embedded import (
        ROUTER_ONLY_THREADS,
        SCORING_BLOCK_SIZE,
        Placement,
        plan_placement,
        worker_env,
    )
    from service.graph.schema import parse_graph

    graph = parse_graph(
        """
models:
  r: {engine: fake}
  both: {engine: fake}
  leaf: {engine: fake}
  member: {engine: fake}
  plain: {engine: fake}
root: root
nodes:
  root: {kind: router, model: r, children: [a, sub], fallback: a}
  sub: {kind: router, model: both, children: [a, b, c, blend]}
  a: {kind: model, model: leaf}
  b: {kind: model, model: both}
  c: {kind: model, model: plain}
  blend: {kind: ensemble, members: [{model: member}, {model: leaf}]}
"""
    )
    assert worker_env(graph, "plain") == {}
    # An ensemble member scores token paths that share trunks: small blocks, capture on.
    assert worker_env(graph, "member") == {"OCTOGRAPH_WORKER_BLOCK_SIZE": str(SCORING_BLOCK_SIZE)}
    assert worker_env(graph, "leaf") == {"OCTOGRAPH_WORKER_BLOCK_SIZE": str(SCORING_BLOCK_SIZE)}
    router_only = worker_env(graph, "r")
    assert router_only["OCTOGRAPH_WORKER_BLOCK_SIZE"] == str(SCORING_BLOCK_SIZE)
    assert router_only["OCTOGRAPH_WORKER_ENABLE_CAPTURE"] == "false"
    # A router model that also answers keeps byte-level capture (it may be an ensemble member).
    assert worker_env(graph, "both") == {"OCTOGRAPH_WORKER_BLOCK_SIZE": str(SCORING_BLOCK_SIZE)}
    # Placement: a model that only routes runs one thread, unpinned; the others get disjoint
    # slices of the cores when there is a core each...
    names = ["r", "both", "leaf", "member", "plain"]
    eight = plan_placement(graph, names, list(range(8)))
    assert eight["r"] == Placement(ROUTER_ONLY_THREADS) and ROUTER_ONLY_THREADS == 1
    slices = [eight[n].cpus for n in names[1:]]
    assert all(s is not None and len(s) == 2 for s in slices)
    assert frozenset().union(*(s for s in slices if s)) == frozenset(range(8))
    assert all(eight[n].threads == 2 for n in names[1:])
    # ...and share the cores out as threads, unpinned, when there is not.
    two = plan_placement(graph, names, [0, 1])
    assert all(two[n] == Placement(1) for n in names)
    # One answering worker has nobody to be kept apart from.
    alone = plan_placement(graph, ["r", "leaf"], list(range(8)))
    assert alone == {"r": Placement(1), "leaf": Placement(4)}
