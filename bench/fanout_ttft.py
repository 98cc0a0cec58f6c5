"""Another client's time to first token beside a fan-out request, in engine steps.

    flock /tmp/octograph-heavy.lock .venv/bin/python bench/fanout_ttft.py [--max-tokens 160]

One real SmolLM2 worker sized as `octograph up` sizes an answering model (its batch,
`max_num_seqs`, is 32; service/embedded.py `role_settings`) and a gateway in front of it.

The gateway lets one request run at most half a worker's batch (`LocalRunner`,
`ModelPool.request_sequence_cap`): 16 sequences here. The bench shows why, on the engine
itself (straight to the worker's /internal/generate, which has no such cap): a fan-out of F
sequences (requests of n <= 16, as the gateway would send them) is started and, once it is
decoding, a probe client sends a one-token request; its time to first token (TTFT) is compared
with the same probe on an idle engine, and the difference is expressed in engine steps (the
fan-out's median gap between two tokens of one sequence while the probe runs). F = 16 (the
cap), 32 (a whole batch) and 64 (the gateway's old per-request maximum).

A second probe arrives 20 ms after a fan-out with long prompts (~870 tokens, seeded: no prefix
cache) is submitted, i.e. during its prefill: the engine schedules at most 2,048 tokens a step,
the running requests' prefill chunks first, then waiting requests in priority order. The
fan-out's requests carry the queue place the gateway gives them (`queue_priority`, the probe's
is 0), and side by side at place 0 (first come first served, as before priorities). The
excess is in prefill steps (the fan-out's prefill time over the 2,048-token steps it needed).

Through the gateway: a request of 32 sequences is refused (400) and one of 16 is served.
Prints a table; writes bench/results/fanout_ttft.json. Figures are this run's only (the VM's
speed drifts); the excess in steps is the comparable figure.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import signal
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.engine_throughput import spawn, stop, uptime, wait_http  # noqa: E402
from service.embedded import free_port, role_settings, worker_env  # noqa: E402
from service.gateway.plan import queue_priority  # noqa: E402
from service.graph.schema import parse_graph  # noqa: E402
from service.models import packaged  # noqa: E402

PROBE = [{"role": "user", "content": "Say one word."}]
FAN_OUT = [{"role": "user", "content": "Write a long story about a lighthouse keeper."}]
LONG = " ".join(["The tide came in over the rocks and the keeper counted the waves."] * 60)
PER_REQUEST_N = 16  # the internal API's n bound: a larger fan-out is several requests
GRAPH = """models:
  smollm2: {{packaged: smollm2, urls: [{url}]}}
nodes:
  chat: {{kind: model, model: smollm2}}
"""


class FanOut:
    """F sequences as ceil(F/16) concurrent requests; records each sequence's token times."""

    def __init__(
        self, url: str, total: int, messages: list[dict[str, str]], max_tokens: int, fifo: bool
    ) -> None:
        self.url, self.total, self.messages, self.max_tokens = url, total, messages, max_tokens
        self.fifo = fifo
        self.started_at = 0.0
        self.prompt_tokens = 0
        self.token_times: dict[tuple[int, int], list[float]] = {}
        self.tasks: list[asyncio.Task[None]] = []

    def start(self, client: httpx.AsyncClient) -> None:
        self.started_at = time.monotonic()
        left, k = self.total, 0
        while left > 0:
            n = min(PER_REQUEST_N, left)
            self.tasks.append(asyncio.create_task(self._one(client, k, n)))
            left -= n
            k += 1

    async def _one(self, client: httpx.AsyncClient, k: int, n: int) -> None:
        body = {
            "request_id": f"fan-{uuid.uuid4().hex}",
            "messages": self.messages,
            "sampling": {"n": n, "max_tokens": self.max_tokens, "ignore_eos": True, "seed": k},
            # The place the gateway would give it (--fifo: every request first come first served).
            "priority": 0 if self.fifo else queue_priority(self.total),
        }
        async with client.stream("POST", self.url, json=body) as r:
            r.raise_for_status()
            async for line in r.aiter_lines():
                if line:
                    ev = json.loads(line)
                    if ev["type"] == "start":
                        self.prompt_tokens = ev["prompt_tokens"]
                    elif ev["type"] == "delta":
                        self.token_times.setdefault((k, ev["index"]), []).append(time.monotonic())

    def started(self) -> int:
        return len(self.token_times)

    def prefill_s(self) -> float:
        """From the fan-out's start to the first token of its last sequence to start."""
        return max(times[0] for times in self.token_times.values()) - self.started_at

    def step_s(self, since: float, until: float) -> float | None:
        """Median gap between two tokens of one sequence within [since, until]."""
        gaps = [
            b - a
            for times in self.token_times.values()
            for a, b in zip(times, times[1:], strict=False)
            if a >= since and b <= until
        ]
        return statistics.median(gaps) if gaps else None

    async def stop(self) -> None:
        for t in self.tasks:
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


async def probe(client: httpx.AsyncClient, url: str) -> tuple[float, float]:
    """(sent, first token) monotonic times of a one-token request."""
    body = {"request_id": f"probe-{uuid.uuid4().hex}", "messages": PROBE,
            "sampling": {"max_tokens": 1, "temperature": 0.0}}  # fmt: skip
    t0 = time.monotonic()
    async with client.stream("POST", url, json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if line and json.loads(line)["type"] == "delta":
                return t0, time.monotonic()
    raise RuntimeError("the probe got no token")


async def settle(condition: Any, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.01)
    return True


async def measure(wurl: str, gurl: str, batch: int, args: argparse.Namespace) -> dict[str, Any]:
    gen = f"{wurl}/internal/generate"
    out: dict[str, Any] = {"batch": batch}
    limits = httpx.Limits(max_connections=64)
    async with httpx.AsyncClient(timeout=600, limits=limits, trust_env=False) as client:
        await probe(client, gen)  # warm-up
        alone = [_ttft(await probe(client, gen)) for _ in range(args.probes)]
        out["alone_ttft_s"] = alone
        print(f"probe alone: TTFT p50 {statistics.median(alone) * 1e3:.1f} ms", flush=True)
        out["decoding"] = []
        for total in [] if args.skip_decoding else args.fan_out:
            fan = FanOut(gen, total, FAN_OUT, args.max_tokens, fifo=False)
            fan.start(client)
            ok = await settle(lambda f=fan, t=total: f.started() >= min(t, batch), 120)
            await asyncio.sleep(0.5)  # well into decoding
            t0 = time.monotonic()
            probes = []
            for _ in range(args.probes):
                probes.append(await probe(client, gen))
                await asyncio.sleep(0.1)
            step = fan.step_s(t0, time.monotonic())
            await fan.stop()
            row = _row(total, [_ttft(p) for p in probes], alone, step, ok)
            out["decoding"].append(row)
            print(_line("decoding", row), flush=True)
            await asyncio.sleep(1.0)  # the engine drains the aborted sequences
        out["prefill"] = []
        budget = (await client.get(f"{wurl}/internal/info")).json()["max_num_batched_tokens"]
        for total in args.fan_out:
            for fifo in (True, False):  # side by side: first come first served, then priorities
                ttfts, prefill_steps = [], []
                for _ in range(max(1, args.probes // 2)):
                    fan = FanOut(gen, total, [{"role": "user", "content": LONG}], 8, fifo)
                    fan.start(client)
                    await asyncio.sleep(0.02)
                    sent, first = await probe(client, gen)
                    ttfts.append(first - sent)
                    await settle(lambda f=fan, t=total: f.started() >= min(t, batch), 300)
                    # A prefill step: the fan-out's prefill time over the steps it needed.
                    steps = math.ceil(min(total, batch) * fan.prompt_tokens / budget)
                    prefill_steps.append(fan.prefill_s() / steps)
                    await fan.stop()
                    await asyncio.sleep(0.5)
                row = _row(total, ttfts, alone, statistics.median(prefill_steps), True)
                row["queue"] = "fifo" if fifo else "priority"
                row["prompt_tokens"] = fan.prompt_tokens
                out["prefill"].append(row)
                print(_line(f"prefill/{row['queue']}", row), flush=True)
        # The gateway's side: a request over the cap is refused, one at it is served.
        completions = f"{gurl}/v1/completions"
        body = {"model": "chat", "prompt": ["Say one word."] * 4, "max_tokens": 1}
        over = await client.post(completions, json={**body, "n": 8})  # 32 sequences
        at = await client.post(completions, json={**body, "n": 4})  # 16
        out["gateway"] = {
            "cost32_status": over.status_code,
            "cost32_message": over.json().get("error", {}).get("message"),
            "cost16_status": at.status_code,
        }
        print(f"gateway: 4 prompts x n=8 -> {over.status_code} "
              f"({out['gateway']['cost32_message']}); 4 x n=4 -> {at.status_code}",
              flush=True)  # fmt: skip
    return out


def _ttft(times: tuple[float, float]) -> float:
    return times[1] - times[0]


def _row(
    total: int,
    ttfts: list[float],
    alone: list[float],
    step: float | None,
    ok: bool,
) -> dict[str, Any]:
    p50, base = statistics.median(ttfts), statistics.median(alone)
    return {
        "fan_out": total,
        "ttft_s": ttfts,
        "ttft_p50_s": p50,
        "ttft_max_s": max(ttfts),
        "step_s": step,
        "excess_steps_p50": (p50 - base) / step if step else None,
        "excess_steps_max": (max(ttfts) - base) / step if step else None,
        "all_started": ok,
    }


def _line(kind: str, row: dict[str, Any]) -> str:
    step = row["step_s"]
    steps = "" if step is None else (
        f"step {step * 1e3:.1f} ms, excess {row['excess_steps_p50']:.1f} steps p50 "
        f"/ {row['excess_steps_max']:.1f} max"
    )  # fmt: skip
    return (
        f"{kind:>8} fan-out {row['fan_out']:>3}: probe "
        f"TTFT p50 {row['ttft_p50_s'] * 1e3:7.1f} ms max {row['ttft_max_s'] * 1e3:7.1f} ms  {steps}"
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--fan-out", type=int, nargs="+", default=[16, 32, 64])
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--probes", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-decoding", action="store_true", help="only the prefill probes")
    args = ap.parse_args()
    model_dir = packaged.model_dir("smollm2")
    if not packaged.is_prepared("smollm2"):
        print("smollm2 is not prepared: run `make setup` (octograph models prepare)")
        return 2
    wport, gport = free_port(), free_port()
    tmp = Path(tempfile.mkdtemp(prefix="octograph-fanout-"))
    cfg = tmp / "graph.yaml"
    cfg.write_text(GRAPH.format(url=f"http://127.0.0.1:{wport}"))
    graph = parse_graph(cfg.read_text())
    env = {
        **worker_env(graph, "smollm2"),
        **role_settings(graph, "smollm2", model_dir),
        "OMP_NUM_THREADS": str(args.threads),
        "HF_HUB_OFFLINE": "1",
        "VLLM_NO_USAGE_STATS": "1",
        "OCTOGRAPH_WORKER_ENABLE_CAPTURE": "false",
    }
    batch = int(env["OCTOGRAPH_WORKER_MAX_NUM_SEQS"])
    print(f"before: {uptime()}; worker batch {batch}, env {env}", flush=True)
    procs = []
    try:
        wcmd = [sys.executable, "-m", "service.cli", "worker", "--model", str(model_dir),
                "--served-name", "smollm2", "--port", str(wport), "--threads", str(args.threads),
                "--max-model-len", "2048"]  # fmt: skip
        procs.append(spawn(wcmd, tmp / "worker.log", env))
        wait_http(f"http://127.0.0.1:{wport}/readyz", procs[0], tmp / "worker.log")
        gcmd = [sys.executable, "-m", "service.cli", "gateway", "--config", str(cfg),
                "--port", str(gport)]  # fmt: skip
        procs.append(spawn(gcmd, tmp / "gateway.log", {"OCTOGRAPH_LOG_LEVEL": "WARNING"}))
        wait_http(f"http://127.0.0.1:{gport}/readyz", procs[1], tmp / "gateway.log")
        out = asyncio.run(
            measure(f"http://127.0.0.1:{wport}", f"http://127.0.0.1:{gport}", batch, args)
        )
    finally:
        stop(procs)
        print(f"logs in {tmp}", flush=True)
    out["uptime_after"] = uptime()
    results = REPO / "bench" / "results"
    results.mkdir(exist_ok=True)
    (results / "fanout_ttft.json").write_text(json.dumps(out, indent=2))
    print(f"after: {out['uptime_after']}")
    return 0


def _terminated(*_: object) -> None:
    raise KeyboardInterrupt  # unwinds through main's finally: the worker and gateway stop


if __name__ == "__main__":
    os.environ.setdefault("OCTOGRAPH_LOG_JSON", "false")
    signal.signal(signal.SIGTERM, _terminated)
    raise SystemExit(main())
