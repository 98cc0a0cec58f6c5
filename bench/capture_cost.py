"""What exact byte-level scoring costs per query on each packaged model, next to the other ways
of getting a next-token distribution out of vLLM, measured in one run on one engine per model:

* ``forward only``: ``max_tokens=1``, no logprobs (the floor every method pays);
* ``capture + reduction``: the worker's byte-dist path (service.worker.byte_dist over
  service.worker.capture): the exact full distribution, reduced to 257 buckets, root query
  (``partial = ""``, a pass over the whole vocabulary: the worst case);
* ``  cached path, new partial``: the same path again with a one-byte partial: no forward, a
  slice of the prepared array (the covering tree's usual pattern);
* ``logprobs=256``: vLLM's top-256 (not exact: the tail is unknown);
* ``logprobs=-1``: vLLM's full vocabulary as Python ``Logprob`` objects (exact).

Queries are what the covering tree sends: a path that extends a cached trunk (256 tokens, two
full KV blocks, warmed once) by one token, ``--batch`` of them in flight together. Every method
gets its own fresh tokens, so each query prefills the same amount. The engine runs like the
worker (bf16, prefix caching, the capture processor loaded) with ``max_logprobs=-1``.

    .venv/bin/python bench/capture_cost.py [--models smollm2 gemma3] [--batch 8] [--rounds 3]

Prints a table (median ms per query over rounds) and writes bench/results/capture_cost.json.
Timings on a shared 2-core box are noisy: compare the columns of one run, not runs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")

import numpy as np  # noqa: E402

from service.bytelevel.byte_tables import TokenByteTable  # noqa: E402
from service.bytelevel.reduction import Prepared, reduce_prepared  # noqa: E402
from service.models import packaged  # noqa: E402
from service.protocol.internal import ByteDistRequest, ByteQuery  # noqa: E402
from service.worker.byte_dist import ByteDistScorer  # noqa: E402
from service.worker.capture import (  # noqa: E402
    LOGITS_PROCESSOR_FQCN,
    CaptureChannel,
    full_distributions,
    vocab_sizes,
)

TRUNK_TOKENS = 256
TEXT = (
    "Octopuses have a complex nervous system and excellent sight, and are among the most "
    "intelligent and behaviourally diverse of all invertebrates. They inhabit various regions "
    "of the ocean, including coral reefs, pelagic waters, and the seabed; some live in the "
    "intertidal zone and others at abyssal depths. Most species grow quickly, mature early, and "
    "are short-lived. Strategies to defend themselves against predators include the expulsion "
    "of ink, the use of camouflage and threat displays, the ability to jet quickly through the "
    "water and hide, and even deceit. All octopuses are venomous, but only the blue-ringed "
    "octopuses are known to be deadly to humans. Octopuses appear in mythology as sea monsters "
    "like the kraken of Norway and the Akkorokamui of the Ainu, and possibly the Gorgon of "
    "ancient Greece. A battle with an octopus appears in Victor Hugo's book Toilers of the Sea, "
    "inspiring other works such as Ian Fleming's Octopussy. "
) * 3


class Bench:
    def __init__(self, name: str, engine: Any, channel: CaptureChannel, table: TokenByteTable):
        self.name = name
        self.engine = engine
        self.channel = channel
        self.table = table
        sizes = vocab_sizes(engine)
        self.sizes = sizes
        ids = table.encode(TEXT.encode())
        assert len(ids) > TRUNK_TOKENS, "trunk text too short"
        self.trunk = ids[:TRUNK_TOKENS]
        # Fresh one-token extensions: ordinary word tokens, never reused across queries.
        self._fresh = iter(sorted(set(ids[TRUNK_TOKENS:]) | set(range(1000, 20000))))

        async def fetch(prefixes: list[list[int]]) -> list[Any]:
            return await full_distributions(engine, channel, prefixes, timeout_s=600)

        self.scorer = ByteDistScorer(
            table,
            fetch,
            token_id_limit=min(sizes.tokenizer, sizes.model),
            max_model_len=4096,
        )

    def fresh_paths(self, n: int) -> list[list[int]]:
        return [self.trunk + [next(self._fresh)] for _ in range(n)]

    async def one_token(self, path: list[int], logprobs: int | None) -> None:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = SamplingParams(max_tokens=1, temperature=0.0, detokenize=False, logprobs=logprobs)
        final = None
        async for out in self.engine.generate(
            TokensPrompt(prompt_token_ids=path), params, request_id=uuid.uuid4().hex
        ):
            final = out
        assert final is not None
        if logprobs is not None:
            step = final.outputs[0].logprobs[0]
            expected = self.sizes.model if logprobs == -1 else logprobs
            assert len(step) >= expected, (len(step), expected)

    async def batch_of(self, paths: list[list[int]], logprobs: int | None) -> None:
        await asyncio.gather(*(self.one_token(p, logprobs) for p in paths))

    async def byte_dist(self, paths: list[list[int]], partial: bytes = b"") -> None:
        request = ByteDistRequest(
            request_id="bench",
            queries=[ByteQuery(token_ids=p, partial=partial.hex()) for p in paths],
        )
        response = await self.scorer.score(request)
        assert len(response.results) == len(paths)


async def timed(run: Awaitable[None]) -> float:
    t0 = time.perf_counter()  # a coroutine does nothing until awaited: creating it is free
    await run
    return time.perf_counter() - t0


def reduction_only_ms(table: TokenByteTable, vocab: int, repeats: int = 5) -> dict[str, float]:
    """The numpy part alone: prepare (gather into byte order, float64) + root reduction, and a
    cached path's one-byte-partial query."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal(vocab).astype(np.float32) * 3
    row = (x - np.logaddexp.reduce(x.astype(np.float64))).astype(np.float32)
    prep_root, partial_one = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        prepared = Prepared(table, row)
        reduce_prepared(table, prepared, b"")
        prep_root.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        reduce_prepared(table, prepared, b" ")
        partial_one.append(time.perf_counter() - t0)
    return {
        "prepare_and_root_ms": 1e3 * statistics.median(prep_root),
        "partial_space_ms": 1e3 * statistics.median(partial_one),
    }


async def bench_model(name: str, batch: int, rounds: int) -> dict[str, Any]:
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    model_dir = packaged.model_dir(name)
    table = TokenByteTable.from_tokenizer_file(model_dir / "tokenizer.json")
    channel = CaptureChannel()
    channel.start()
    t0 = time.perf_counter()
    engine = AsyncLLM.from_engine_args(
        AsyncEngineArgs(
            model=str(model_dir),
            max_model_len=4096,
            dtype="bfloat16",
            enable_prefix_caching=True,
            logits_processors=[LOGITS_PROCESSOR_FQCN],
            max_logprobs=-1,
            kv_cache_memory_bytes=1 << 30,
        )
    )
    start_s = time.perf_counter() - t0
    try:
        bench = Bench(name, engine, channel, table)
        # Warm the trunk's KV blocks and every code path once (first calls compile/allocate).
        await bench.batch_of([bench.trunk], None)
        await bench.batch_of(bench.fresh_paths(2), None)
        await bench.byte_dist(bench.fresh_paths(2))
        await bench.batch_of(bench.fresh_paths(2), 256)
        await bench.batch_of(bench.fresh_paths(2), -1)

        methods: dict[str, Callable[[list[list[int]]], Awaitable[None]]] = {
            "forward only": lambda paths: bench.batch_of(paths, None),
            "capture + reduction": lambda paths: bench.byte_dist(paths),
            "logprobs=256 (top-k, inexact)": lambda paths: bench.batch_of(paths, 256),
            "logprobs=-1 (full, exact)": lambda paths: bench.batch_of(paths, -1),
        }
        samples: dict[str, list[float]] = {m: [] for m in methods}
        samples["  cached path, new partial"] = []
        for _ in range(rounds):
            # Interleaved rounds: load from other processes hits every method alike.
            for method, run in methods.items():
                paths = bench.fresh_paths(batch)
                elapsed = await timed(run(paths))
                samples[method].append(elapsed / batch)
                if method == "capture + reduction":
                    again = await timed(bench.byte_dist(paths, b" "))
                    samples["  cached path, new partial"].append(again / batch)
        per_query_ms = {m: 1e3 * statistics.median(v) for m, v in samples.items()}
        return {
            "model": name,
            "vocab": bench.sizes.tokenizer,
            "logits_row": bench.sizes.model,
            "engine_start_s": start_s,
            "batch": batch,
            "rounds": rounds,
            "trunk_tokens": TRUNK_TOKENS,
            "per_query_ms": per_query_ms,
            "reduction_only": reduction_only_ms(table, bench.sizes.tokenizer),
            "capture_frame_bytes": 4 * bench.sizes.model,
            "forwards": bench.scorer.stats.forwards,
            "channel": vars(channel.stats),
        }
    finally:
        engine.shutdown()
        channel.close()


def print_table(results: list[dict[str, Any]]) -> None:
    names = [r["model"] for r in results]
    print()
    print(
        f"per-query cost, ms (median of rounds; batch {results[0]['batch']}, "
        f"path = cached {TRUNK_TOKENS}-token trunk + 1 new token)"
    )
    header = f"{'method':34s}" + "".join(f"{n:>22s}" for n in names)
    print(header)
    print("-" * len(header))
    for method in results[0]["per_query_ms"]:
        cells = []
        for r in results:
            ms = r["per_query_ms"][method]
            base = r["per_query_ms"]["forward only"]
            cells.append(f"{ms:9.2f} ({ms / base:5.2f}x fwd)")
        print(f"{method:34s}" + "".join(f"{c:>22s}" for c in cells))
    print()
    for r in results:
        red = r["reduction_only"]
        print(
            f"{r['model']}: vocab {r['vocab']}, logits row {r['logits_row']}; numpy reduction "
            f"alone: prepare+root {red['prepare_and_root_ms']:.2f} ms, one-byte partial "
            f"{red['partial_space_ms']:.2f} ms; capture frame {r['capture_frame_bytes'] / 1024:.0f}"
            f" KiB over the unix socket; engine start {r['engine_start_s']:.0f} s"
        )


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["smollm2", "gemma3"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    results = []
    out = REPO / "bench" / "results" / "capture_cost.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    for name in args.models:  # one engine at a time: the box has 2 cores
        results.append(await bench_model(name, args.batch, args.rounds))
        # Written after each model: a later model's engine may not start on a crowded box.
        out.write_text(json.dumps(results, indent=2))
        print(json.dumps(results[-1]), flush=True)
    print_table(results)
    print(f"\nwrote {out.relative_to(REPO)}")


if __name__ == "__main__":  # vLLM spawns processes that re-import the main module
    asyncio.run(main())
