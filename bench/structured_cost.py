"""What a constraint costs: the same requests with and without a JSON schema, side by side in
one run (interleaved), on a local node (tokens/s, vLLM's structured outputs) and on the `blend`
ensemble (bytes/s, the byte-level llguidance grammar).

    .venv/bin/python bench/structured_cost.py [--samples 3]

Starts its own smollm2 + gemma3 workers and an in-process gateway; prints a table and writes
bench/results/structured_cost.json. Rates, not totals: a constrained output ends when its
JSON does, so it is shorter.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import uvicorn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from service.config import GatewaySettings  # noqa: E402
from service.embedded import free_port, start_workers, stop_workers, wait_ready  # noqa: E402
from service.gateway.app import build_gateway_app  # noqa: E402
from service.graph.schema import parse_graph  # noqa: E402
from service.models import packaged  # noqa: E402

SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 24},
        "country": {"type": "string", "maxLength": 24},
        "days": {"type": "integer", "minimum": 1, "maximum": 30},
        "season": {"enum": ["spring", "summer", "autumn", "winter"]},
    },
    "required": ["city", "country", "days", "season"],
    "additionalProperties": False,
}
PROMPT = "Plan a short trip: which city, which country, how many days and which season?"


def graph_text(urls: dict[str, str]) -> str:
    return f"""
models:
  smollm2: {{packaged: smollm2, urls: ["{urls["smollm2"]}"], max_model_len: 2048}}
  gemma3: {{packaged: gemma3, urls: ["{urls["gemma3"]}"], max_model_len: 2048}}
nodes:
  blend:
    kind: ensemble
    members: [{{model: smollm2, weight: 0.5}}, {{model: gemma3, weight: 0.5}}]
  chat: {{kind: model, model: smollm2}}
"""


async def one(client: httpx.AsyncClient, node: str, constrained: bool, seed: int) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": node,
        "messages": [{"role": "user", "content": PROMPT}],
        "temperature": 1.0,
        "seed": seed,
        "max_tokens": 160 if node == "blend" else 96,
    }
    if constrained:
        body["response_format"] = {
            "type": "json_schema",
            "json_schema": {"name": "trip", "schema": SCHEMA, "strict": True},
        }
    t0 = time.perf_counter()
    r = await client.post("/v1/chat/completions", json=body)
    seconds = time.perf_counter() - t0
    r.raise_for_status()
    out = r.json()
    units = out["usage"]["completion_tokens"]  # bytes for the ensemble, tokens for a model
    valid = None
    if constrained:
        try:
            json.loads(out["choices"][0]["message"]["content"])
            valid = True
        except json.JSONDecodeError:
            valid = False
    return {"units": units, "seconds": seconds, "rate": units / seconds, "valid": valid}


async def run(samples: int) -> dict[str, Any]:
    graph_dirs = {n: packaged.model_dir(n) for n in ("smollm2", "gemma3")}
    base = parse_graph(
        "models:\n  smollm2: {packaged: smollm2}\n  gemma3: {packaged: gemma3}\n"
        "nodes:\n  blend: {kind: ensemble, members: [{model: smollm2}, {model: gemma3}]}\n"
    )
    procs = start_workers(base, graph_dirs, Path(tempfile.mkdtemp(prefix="octograph-bench-")))
    try:
        await asyncio.to_thread(wait_ready, procs, 600)
        urls = {p.name: p.url for p in procs}
        app = build_gateway_app(GatewaySettings(), parse_graph(graph_text(urls)))
        port = free_port()
        server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, access_log=False)
        )
        task = asyncio.create_task(server.serve())
        while not server.started:
            await asyncio.sleep(0.05)
        rows: dict[str, list[dict[str, Any]]] = {}
        async with httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{port}", timeout=900, trust_env=False
        ) as client:
            for node in ("chat", "blend"):  # warm-up: first requests pay for compilation
                await one(client, node, True, 99)
                await one(client, node, False, 99)
            for seed in range(samples):
                for node in ("chat", "blend"):
                    for constrained in (False, True):
                        key = f"{node} {'schema' if constrained else 'free'}"
                        rows.setdefault(key, []).append(await one(client, node, constrained, seed))
        server.should_exit = True
        await task
    finally:
        stop_workers(procs)
    summary = {}
    for key, rs in rows.items():
        summary[key] = {
            "rate_median": statistics.median(r["rate"] for r in rs),
            "rates": [round(r["rate"], 2) for r in rs],
            "valid": [r["valid"] for r in rs],
        }
    return summary


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--samples", type=int, default=3)
    args = p.parse_args()
    summary = asyncio.run(run(args.samples))
    print(f"{'':16s}{'median rate':>14s}  rates (chat: tokens/s, blend: bytes/s)")
    for key, s in summary.items():
        print(f"{key:16s}{s['rate_median']:14.2f}  {s['rates']}  valid={s['valid']}")
    for node in ("chat", "blend"):
        free, constrained = summary[f"{node} free"], summary[f"{node} schema"]
        ratio = constrained["rate_median"] / free["rate_median"]
        print(f"{node}: constrained / free = {ratio:.3f}")
    out = REPO / "bench" / "results" / "structured_cost.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2))
    print(f"wrote {out.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
