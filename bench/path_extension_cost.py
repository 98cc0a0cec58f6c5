"""What extending a token path by one token costs on each ensemble member, three ways, in one run
on one engine per model (pinned to one core, as `octograph up` pins ensemble members):

* ``new request``: a ``max_tokens=1`` capture request for the path (service.worker.capture):
  prefix caching serves the trunk's whole 32-token KV blocks, the rest is prefilled again;
* ``session step``: the path as the next chunk of a streaming-input session whose frontier is
  its parent (service.worker.path_sessions): one token computed;
* ``decode step``: the model generating the same number of tokens (the floor a step can reach).

Each way walks the same ``--steps`` one-token extensions of a ~70-token trunk of English text.
It also checks the rows against each other: the mean negative log-likelihood of the text's
true next token under the new-request rows and the session rows (they must agree to ~1e-3:
the same distributions, computed with differently built KV), and the largest probability
difference between the two.

    .venv/bin/python bench/path_extension_cost.py [--models smollm2 gemma3] [--steps 40]

Prints one line per model (median ms per extension) and writes
bench/results/path_extension_cost.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from service.affinity import on_cpus  # noqa: E402
from service.config import WorkerSettings  # noqa: E402
from service.models import packaged  # noqa: E402
from service.worker import capture  # noqa: E402
from service.worker.capture import LOGITS_PROCESSOR_FQCN, CaptureChannel  # noqa: E402
from service.worker.path_sessions import PathSessions  # noqa: E402
from service.worker.vllm_engine import build_engine, configure_cpu_environment  # noqa: E402

TEXT = (
    "Octopuses have a complex nervous system and excellent sight, and are among the most "
    "intelligent and behaviourally diverse of all invertebrates. They inhabit various regions "
    "of the ocean, including coral reefs, pelagic waters, and the seabed; some live in the "
    "intertidal zone and others at abyssal depths. Most species grow quickly, mature early."
) * 4
TRUNK_TOKENS = 70


async def bench_model(name: str, steps: int, cpu: int) -> dict[str, Any]:
    from transformers import AutoTokenizer
    from vllm import SamplingParams
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.inputs import TokensPrompt
    from vllm.sampling_params import RequestOutputKind

    model_dir = packaged.model_dir(name)
    ids = AutoTokenizer.from_pretrained(str(model_dir))(TEXT)["input_ids"]
    trunk, rest = ids[:TRUNK_TOKENS], ids[TRUNK_TOKENS : TRUNK_TOKENS + steps]
    channel = CaptureChannel()
    channel.start()
    args = AsyncEngineArgs(
        model=str(model_dir),
        max_model_len=4096,
        dtype="bfloat16",
        enable_prefix_caching=True,
        block_size=32,  # as members run (service/embedded.py SCORING_BLOCK_SIZE)
        logits_processors=[LOGITS_PROCESSOR_FQCN],
        kv_cache_memory_bytes=1 << 30,
        max_num_seqs=8,
    )
    engine = on_cpus(frozenset({cpu}), lambda: build_engine(args, "uni"))
    sessions = PathSessions(engine, channel, max_sessions=1)
    try:
        # Warm-up: first calls allocate and meet new shapes.
        await capture.full_distributions(engine, channel, [ids[:40]], timeout_s=300)
        await capture.full_distributions(engine, channel, [ids[:41]], timeout_s=300)

        new_ms, new_rows = [], []
        for i in range(steps):
            t0 = time.perf_counter()
            [row] = await capture.full_distributions(engine, channel, [trunk + rest[:i]])
            new_ms.append(1e3 * (time.perf_counter() - t0))
            new_rows.append(row)

        session_ms, session_rows = [], []
        for i in range(steps):
            t0 = time.perf_counter()
            [row], _ = await sessions.fetch([trunk + rest[:i]])
            session_ms.append(1e3 * (time.perf_counter() - t0))
            session_rows.append(row)
        extended = sessions.stats.extended

        decode = SamplingParams(
            max_tokens=steps,
            temperature=0.0,
            ignore_eos=True,
            detokenize=False,
            output_kind=RequestOutputKind.DELTA,
        )
        decode_ms = []
        t0 = time.perf_counter()
        async for _ in engine.generate(
            TokensPrompt(prompt_token_ids=ids[:60]), decode, request_id="bench-decode"
        ):
            now = time.perf_counter()
            decode_ms.append(1e3 * (now - t0))
            t0 = now
    finally:
        await sessions.close()
        engine.shutdown()
        channel.close()

    def nll(rows: list[Any]) -> float:
        return -float(np.mean([rows[i][rest[i]] for i in range(len(rest))]))

    diff = [
        float(np.max(np.abs(np.exp(a) - np.exp(b))))
        for a, b in zip(new_rows, session_rows, strict=True)
    ]
    return {
        "model": name,
        "steps": steps,
        "cpu": cpu,
        "new_request_ms": statistics.median(new_ms[1:]),
        "session_step_ms": statistics.median(session_ms[1:]),
        "session_first_chunk_ms": session_ms[0],
        "decode_step_ms": statistics.median(decode_ms[2:]),
        "session_extensions": extended,
        "true_token_nll_new_request": nll(new_rows),
        "true_token_nll_session": nll(session_rows),
        "max_prob_diff_median": statistics.median(diff),
        "max_prob_diff_max": max(diff),
    }


async def main_async(args: argparse.Namespace) -> list[dict[str, Any]]:
    configure_cpu_environment(WorkerSettings(model="bench", threads=1))
    return [await bench_model(name, args.steps, args.cpu) for name in args.models]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["smollm2", "gemma3"])
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--cpu", type=int, default=os.cpu_count() - 1 if os.cpu_count() else 0)
    args = p.parse_args()
    results = asyncio.run(main_async(args))
    for r in results:
        print(
            f"{r['model']:<8} one-token extension: new request {r['new_request_ms']:.1f} ms | "
            f"session step {r['session_step_ms']:.1f} ms ({r['session_extensions']} "
            f"extensions) | decode step {r['decode_step_ms']:.1f} ms; true-token NLL "
            f"{r['true_token_nll_new_request']:.4f} vs {r['true_token_nll_session']:.4f}, "
            f"max prob diff median {r['max_prob_diff_median']:.1e} (max "
            f"{r['max_prob_diff_max']:.1e})"
        )
    out = REPO / "bench/results/path_extension_cost.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
