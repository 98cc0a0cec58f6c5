"""Slowloris: a normal request's latency with and without 2 x MAX_INFLIGHT stalled bodies.

    .venv/bin/python bench/slowloris.py [--max-inflight 256] [--requests 100] [--path chat|route]

Starts a fake worker and a gateway (`octograph worker --fake`, `octograph gateway`, own
processes, default limits unless given), then times `--requests` sequential normal requests
(one keep-alive connection) in two phases:

  quiet    nothing else connected
  stalled  2 x MAX_INFLIGHT extra connections have each sent their headers and a
           Content-Length of 100 bytes, then one byte of body, and stall

and prints p50 / p99 / max and the status codes side by side. Then it waits out
OCTOGRAPH_BODY_TIMEOUT_S and reports what the stalled connections got (408 each, expected).
Issue 17 item 1: before the fix, the stalled connections held the admission slots and every
normal request of the second phase was a 429 ("the gateway is at capacity").
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
CHAT = {"model": "general", "messages": [{"role": "user", "content": "Say something."}]}
ROUTE = {"model": "auto", "prompt": "Say something."}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def spawn(cmd: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        cmd,
        cwd=REPO,
        stdout=open(log, "wb"),  # noqa: SIM115
        stderr=subprocess.STDOUT,
        env={**os.environ, **env},
        start_new_session=True,
    )


def wait_ready(url: str, proc: subprocess.Popen[bytes], timeout: float = 120) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"exited early ({proc.returncode}): {proc.args}")
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise TimeoutError(url)


async def read_response(reader: asyncio.StreamReader) -> int:
    """The status of one response, read to its end (Content-Length or chunked)."""
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    lower = head.lower()
    if b"content-length:" in lower:
        length = int(lower.split(b"content-length:", 1)[1].split(b"\r\n", 1)[0])
        await reader.readexactly(length)
    else:
        while size := int((await reader.readuntil(b"\r\n")).strip(), 16):
            await reader.readexactly(size + 2)
        await reader.readexactly(2)
    return status


async def timed(port: int, path: str, body: bytes, n: int) -> tuple[list[float], dict[int, int]]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    request = (
        f"POST {path} HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\n\r\n"
    ).encode() + body
    times, codes = [], {}
    for _ in range(n):
        t0 = time.perf_counter()
        writer.write(request)
        status = await read_response(reader)
        times.append((time.perf_counter() - t0) * 1000)
        codes[status] = codes.get(status, 0) + 1
        if status != 200:  # an error may close the connection
            writer.close()
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.close()
    return times, codes


async def stall(port: int, path: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        f"POST {path} HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n"
        "content-length: 100\r\n\r\n{".encode()
    )
    await writer.drain()
    return reader, writer


def summary(times: list[float], codes: dict[int, int]) -> dict[str, Any]:
    s = sorted(times)
    return {
        "p50_ms": round(statistics.median(s), 2),
        "p99_ms": round(s[min(len(s) - 1, round(0.99 * (len(s) - 1)))], 2),
        "max_ms": round(s[-1], 2),
        "codes": codes,
    }


async def measure(args: argparse.Namespace, port: int, body_timeout_s: float) -> dict[str, Any]:
    path = "/v1/chat/completions" if args.path == "chat" else "/v1/route"
    body = json.dumps(CHAT if args.path == "chat" else ROUTE).encode()
    await timed(port, path, body, 10)  # warm-up
    quiet = summary(*await timed(port, path, body, args.requests))
    t0 = time.monotonic()
    stalled = [await stall(port, path) for _ in range(2 * args.max_inflight)]
    await asyncio.sleep(0.2)
    busy = summary(*await timed(port, path, body, args.requests))
    busy["within_s"] = round(time.monotonic() - t0, 2)
    statuses = await asyncio.wait_for(
        asyncio.gather(*(read_response(r) for r, _ in stalled), return_exceptions=True),
        body_timeout_s + 30,
    )
    ended = {}
    for s in statuses:
        key = s if isinstance(s, int) else type(s).__name__
        ended[key] = ended.get(key, 0) + 1
    for _, w in stalled:
        w.close()
    return {
        "quiet": quiet,
        "stalled": busy,
        "stalled_connections": len(stalled),
        "stalled_answers": ended,
        "stalled_answered_after_s": round(time.monotonic() - t0, 2),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--max-inflight", type=int, default=256)
    ap.add_argument("--body-timeout", type=float, default=15.0)
    ap.add_argument("--requests", type=int, default=100)
    ap.add_argument("--path", choices=("chat", "route"), default="chat")
    args = ap.parse_args()
    py = sys.executable
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        wport, gport = free_port(), free_port()
        graph = tmp / "graph.yaml"
        graph.write_text(
            "models:\n"
            f"  fake: {{urls: ['http://127.0.0.1:{wport}'], max_model_len: 4096}}\n"
            f"  routerm: {{urls: ['http://127.0.0.1:{wport}']}}\n"
            "root: root\n"
            "nodes:\n"
            "  root: {kind: router, model: routerm, children: [general], fallback: general}\n"
            "  general: {kind: model, model: fake}\n"
        )
        worker = spawn(
            [py, "-m", "service.cli", "worker", "--fake", "--model", "fake", "--port", str(wport)],
            tmp / "worker.log",
            {"OCTOGRAPH_WORKER_LOG_LEVEL": "WARNING"},
        )
        gateway = spawn(
            [py, "-m", "service.cli", "gateway", "--config", str(graph), "--port", str(gport)],
            tmp / "gateway.log",
            {
                "OCTOGRAPH_LOG_LEVEL": "WARNING",
                "OCTOGRAPH_MAX_INFLIGHT": str(args.max_inflight),
                "OCTOGRAPH_BODY_TIMEOUT_S": str(args.body_timeout),
            },
        )
        try:
            wait_ready(f"http://127.0.0.1:{wport}/readyz", worker)
            wait_ready(f"http://127.0.0.1:{gport}/readyz", gateway)
            result = asyncio.run(measure(args, gport, args.body_timeout))
        finally:
            for p in (gateway, worker):
                p.terminate()
            for p in (gateway, worker):
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
    q, s = result["quiet"], result["stalled"]
    print(f"{args.path}: {args.requests} sequential requests, MAX_INFLIGHT={args.max_inflight}")
    print(f"{'':22}{'quiet':>14}{'2x stalled':>14}")
    for k in ("p50_ms", "p99_ms", "max_ms"):
        print(f"{k:22}{q[k]:>14}{s[k]:>14}")
    print(f"{'status codes':22}{json.dumps(q['codes']):>14}{json.dumps(s['codes']):>14}")
    print(
        f"{result['stalled_connections']} stalled connections answered "
        f"{json.dumps(result['stalled_answers'])} after {result['stalled_answered_after_s']}s "
        f"(body timeout {args.body_timeout:g}s)"
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
