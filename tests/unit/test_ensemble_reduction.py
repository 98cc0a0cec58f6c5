"""Byte-bucketed reductions against a token-by-token reference, and the local oracle."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from numpy.typing import NDArray

from service.bytelevel.byte_tables import TokenByteTable
from service.bytelevel.reduction import (
    LocalReductionOracle,
    Prepared,
    ReductionQuery,
    reduce_logprobs,
    reduce_prepared,
    segment_lse,
)
from tests.unit.ensemble_fixtures import HashModel, real_available, real_table, tiny_table


def _reference(
    table: TokenByteTable, lp: NDArray[np.float64], partial: bytes
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    cont = np.full(257, -math.inf)
    exact = np.full(256, -math.inf)
    k = len(partial)
    for tid in range(table.vocab_size):
        tb = table.token_bytes(tid)
        if not tb or not tb.startswith(partial) or len(tb) == k:
            continue
        cont[tb[k]] = np.logaddexp(cont[tb[k]], lp[tid])
        if len(tb) == k + 1 and table.exact_id(tb) == tid:
            exact[tb[k]] = lp[tid]
    if not partial:
        cont[256] = np.logaddexp.reduce(lp[table.stop_ids])
    return cont, exact


def _close(a: NDArray[np.float64], b: NDArray[np.float64]) -> bool:
    same_inf = np.array_equal(np.isneginf(a), np.isneginf(b))
    fin = np.isfinite(b)
    return same_inf and bool(np.allclose(a[fin], b[fin], rtol=0, atol=1e-10))


def _random_lp(vocab: int, seed: int, scale: float = 3.0) -> NDArray[np.float64]:
    x = np.random.default_rng(seed).standard_normal(vocab) * scale
    return x - np.logaddexp.reduce(x)


@settings(max_examples=40, deadline=None)
@given(
    st.sampled_from(["byte_level", "sentencepiece"]),
    st.integers(0, 10_000),
    st.integers(0, 3),
    st.integers(0, 2**16),
)
def test_reduction_matches_reference(kind: str, pick: int, cut: int, seed: int) -> None:
    table = tiny_table(kind)
    lp = _random_lp(table.vocab_size, seed)
    # Partials that occur: prefixes of real tokens (plus the empty one).
    token = table.token_bytes(int(table.sorted_ids[pick % len(table.sorted_ids)]))
    partial = token[:cut]
    red = reduce_logprobs(table, lp, partial)
    cont, exact = _reference(table, lp, partial)
    assert _close(red.cont_lp, cont) and _close(red.exact_lp, exact)
    if partial:
        assert red.cont_lp[256] == -math.inf


@pytest.mark.parametrize("kind", ["byte_level", "sentencepiece"])
def test_buckets_partition_the_prefix_mass(kind: str) -> None:
    table = tiny_table(kind)
    lp = _random_lp(table.vocab_size, 1)
    prep = Prepared(table, lp)
    for partial in [b"t", b"th", b" t", b"\xe4"]:
        red = reduce_prepared(table, prep, partial)
        lo, hi = table.prefix_range(partial)
        total = np.logaddexp.reduce(lp[table.sorted_ids[lo:hi]]) if hi > lo else -math.inf
        equal = table.exact_id(partial)
        equal_lp = [lp[i] for i in range(table.vocab_size) if table.token_bytes(i) == partial]
        parts = np.logaddexp.reduce(np.concatenate([red.cont_lp[:256], equal_lp]))
        assert parts == pytest.approx(total, abs=1e-12) or (equal is None and hi == lo)


def test_float32_input_and_unreduced_vocab_checks() -> None:
    table = tiny_table("byte_level")
    lp = _random_lp(table.vocab_size, 2)
    a = reduce_logprobs(table, lp, b"th")
    b = reduce_logprobs(table, lp.astype(np.float32), b"th")
    assert np.allclose(a.cont_lp, b.cont_lp, atol=1e-5, equal_nan=False)
    with pytest.raises(ValueError):
        Prepared(table, lp[:10])


def test_segment_lse_edges() -> None:
    vals = np.array([0.0, -1000.0, -1001.0, -math.inf, 5.0])
    bounds = np.array([0, 1, 1, 3, 4, 5])
    out = segment_lse(vals, bounds)
    assert out[0] == 0.0
    assert out[1] == -math.inf  # empty
    # Far below the shared shift: recomputed with its own maximum, not underflowed to -inf.
    assert out[2] == pytest.approx(-1000.0 + math.log1p(math.exp(-1.0)))
    assert out[3] == -math.inf
    assert out[4] == 5.0
    assert np.all(segment_lse(np.array([-math.inf, -math.inf]), np.array([0, 1, 2])) == -math.inf)


def test_local_oracle_batches_and_caches() -> None:
    table = tiny_table("sentencepiece")
    model = HashModel(table.vocab_size, seed=3, order=3)
    oracle = LocalReductionOracle(table, model, max_paths=2)
    qs = [ReductionQuery((1, 5), b""), ReductionQuery((1, 5), b"t"), ReductionQuery((1, 6), b"")]
    out = oracle.reduce(qs)
    assert oracle.forwards == 2 and oracle.calls == 1 and len(out) == 3
    for q, r in zip(qs, out, strict=True):
        ref = reduce_logprobs(table, model.one(q.path), q.partial)
        assert np.array_equal(r.cont_lp, ref.cont_lp)
    oracle.reduce([ReductionQuery((1, 5), b"th")])
    assert oracle.forwards == 2  # cached
    oracle.reduce([ReductionQuery((1, 7), b"")])  # evicts (1, 6), the least recently used
    oracle.reduce([ReductionQuery((1, 6), b"")])
    assert oracle.forwards == 4


@pytest.mark.parametrize("name", ["smollm2", "gemma3"])
def test_real_vocab_reductions(name: str) -> None:
    if not real_available(name):
        pytest.skip(f"{name} tokenizer not prepared")
    table = real_table(name)
    lp = _random_lp(table.vocab_size, 4, scale=2.0).astype(np.float32)
    prep = Prepared(table, lp)
    lp64 = lp.astype(np.float64)
    sorted_bytes = [table.token_bytes(int(i)) for i in table.sorted_ids]
    for partial in [b"", b" ", b" th", b"\xe4\xb8"]:
        red = reduce_prepared(table, prep, partial)
        lo, hi = table.prefix_range(partial)
        for c in (ord("e"), ord("a"), 0x96, 0xAD):
            ids = [
                int(table.sorted_ids[p])
                for p in range(lo, hi)
                if len(sorted_bytes[p]) > len(partial) and sorted_bytes[p][len(partial)] == c
            ]
            want = np.logaddexp.reduce(lp64[ids]) if ids else -math.inf
            assert red.cont_lp[c] == pytest.approx(want, abs=1e-9)
        if not partial:
            assert red.cont_lp[256] == pytest.approx(np.logaddexp.reduce(lp64[table.stop_ids]))
