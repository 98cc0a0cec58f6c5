"""The worker's byte-level scoring (service.worker.byte_dist) without an engine: a seeded hash
"model" stands in for vLLM's captured distributions, and every answer is checked against a
brute-force reduction that walks the vocabulary token by token (no sorted ranges)."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Sequence
from typing import Literal

import httpx
import numpy as np
import pytest
from numpy.typing import NDArray
from pydantic import ValidationError

from service.bytelevel.byte_tables import TokenByteTable
from service.errors import BadRequest, ContextLengthExceeded, DeadlineExceeded
from service.protocol.internal import ByteDistRequest, ByteDistResponse, ByteQuery
from service.serving import Lifecycle
from service.worker.app import build_worker_app
from service.worker.byte_dist import (
    MAX_SPECULATED_IN_FLIGHT,
    ByteDistScorer,
    decode_logprobs,
    likeliest_extensions,
)
from service.worker.fake_engine import (
    FAKE_BYTE_STOP_ID,
    FAKE_BYTE_TOKENS,
    FakeEngine,
    fake_byte_dist,
    fake_byte_logprobs,
)
from tests.unit.byte_reference import reference_reduction, renormalised
from tests.unit.ensemble_fixtures import HashModel, tiny_table

KINDS = ["byte_level", "sentencepiece"]


class Source:
    """The `fetch` a scorer gets: float32 rows like the capture path, with call records and
    optional gating/failure for the concurrency tests."""

    def __init__(self, vocab_size: int) -> None:
        self.model = HashModel(vocab_size, seed=7, order=3)
        self.calls: list[list[tuple[int, ...]]] = []
        self.gate: asyncio.Event | None = None
        self.gate_from = 0  # calls before this one pass the gate
        self.fail: Exception | None = None
        self.fail_once = False

    def row(self, path: Sequence[int]) -> NDArray[np.float32]:
        return self.model.one(tuple(path)).astype(np.float32)

    async def __call__(self, prefixes: list[list[int]]) -> list[NDArray[np.float32]]:
        self.calls.append([tuple(p) for p in prefixes])
        if self.gate is not None and len(self.calls) > self.gate_from:
            await self.gate.wait()
        if self.fail is not None:
            failure = self.fail
            if self.fail_once:
                self.fail = None
            raise failure
        return [self.row(p) for p in prefixes]


def make_scorer(kind: str, **kwargs: int) -> tuple[ByteDistScorer, Source, TokenByteTable]:
    table = tiny_table(kind)
    source = Source(table.vocab_size)
    options = {"token_id_limit": table.vocab_size, "max_model_len": 64} | kwargs
    return ByteDistScorer(table, source, **options), source, table


def request(
    *queries: tuple[list[int], bytes],
    include_logprobs: bool = False,
    speculate: int = 0,
    speculate_with: Literal["step", "background"] = "background",
) -> ByteDistRequest:
    return ByteDistRequest(
        request_id="r",
        queries=[ByteQuery(token_ids=ids, partial=p.hex()) for ids, p in queries],
        include_logprobs=include_logprobs,
        speculate=speculate,
        speculate_with=speculate_with,
    )


def partials_for(table: TokenByteTable) -> list[bytes]:
    """Empty, one byte, two bytes of real multi-byte tokens, and bytes no token starts with."""
    long_tokens = sorted(
        (table.token_bytes(t) for t in range(table.vocab_size) if len(table.token_bytes(t)) >= 3),
        key=lambda b: (-len(b), b),
    )
    chosen = [b"", b" ", b"t", long_tokens[0][:1], long_tokens[0][:2], long_tokens[0][:-1]]
    return chosen + [b"\xff\xfe\xfd"]


@pytest.mark.parametrize("kind", KINDS)
async def test_results_equal_brute_force_reduction(kind: str) -> None:
    scorer, source, table = make_scorer(kind)
    paths = [[1], [5, 9, 11], [5, 9, 12]]
    partials = partials_for(table)
    queries = [(p, b) for p in paths for b in partials]
    response = await scorer.score(request(*queries))
    assert len(response.results) == len(queries)
    for (path, partial), result in zip(queries, response.results, strict=True):
        ref_cont, ref_exact = reference_reduction(table, renormalised(source.row(path)), partial)
        got = np.array(result.cont_lp)
        assert got.shape == (257,)
        assert np.array_equal(np.isneginf(got), np.isneginf(ref_cont)), (path, partial)
        finite = np.isfinite(ref_cont)
        np.testing.assert_allclose(got[finite], ref_cont[finite], rtol=0, atol=1e-9)
        assert {c: (int(v[0]), v[1]) for c, v in result.exact.items()}.keys() == ref_exact.keys()
        for c, (token_id, lp) in ref_exact.items():
            assert int(result.exact[c][0]) == token_id
            assert result.exact[c][1] == pytest.approx(lp, abs=1e-9)


@pytest.mark.parametrize("kind", KINDS)
async def test_normalisation_and_stop_only_at_empty_partial(kind: str) -> None:
    scorer, source, table = make_scorer(kind)
    path = [3, 4]
    partials = partials_for(table)
    response = await scorer.score(request(*[(path, b) for b in partials]))
    lp = renormalised(source.row(path))
    for partial, result in zip(partials, response.results, strict=True):
        cont = np.array(result.cont_lp)
        total = np.logaddexp.reduce(cont)
        if not partial:
            assert cont[256] > -np.inf  # the tiny tokenizers have stop specials
            assert abs(total) <= 1e-6, f"{kind}: root 257-vector sums to exp({total})"
            continue
        assert cont[256] == -np.inf
        # Given `partial`, the buckets split the mass of the tokens strictly extending it.
        extending = [
            t
            for t in range(table.vocab_size)
            if table.token_bytes(t).startswith(partial) and len(table.token_bytes(t)) > len(partial)
        ]
        expected = np.logaddexp.reduce(lp[extending]) if extending else -np.inf
        if expected == -np.inf:
            assert total == -np.inf
        else:
            assert total == pytest.approx(expected, abs=1e-9)
            conditional = cont[:256] - expected  # the next-byte distribution inside the token
            assert abs(np.logaddexp.reduce(conditional)) <= 1e-6


async def test_paths_are_fetched_once_and_cached() -> None:
    scorer, source, _ = make_scorer("byte_level")
    await scorer.score(request(([1, 2], b""), ([1, 2], b" "), ([1, 3], b""), ([1, 2], b"t")))
    assert source.calls == [[(1, 2), (1, 3)]]  # one fetch, duplicates folded
    await scorer.score(request(([1, 2], b"th"), ([1, 3], b"a"), ([9], b"")))
    assert source.calls[1:] == [[(9,)]]  # only the new path
    assert scorer.stats.forwards == 3
    assert scorer.stats.cache_hits == 2


async def test_cache_is_bounded_in_bytes() -> None:
    table = tiny_table("byte_level")
    per_path = table.vocab_size * 8 - len(table.special_ids) * 8  # float64, specials left out
    scorer, source, _ = make_scorer("byte_level", cache_bytes=3 * per_path + 10)
    for i in range(10):
        await scorer.score(request(([i + 1], b"")))
    assert len(scorer.cache) == 3
    assert scorer.cache.bytes <= 3 * per_path + 10
    await scorer.score(request(([10], b"a"), ([1], b"")))  # 10 is cached, 1 was evicted
    assert source.calls[-1] == [(1,)]


async def test_concurrent_requests_share_one_fetch() -> None:
    scorer, source, _ = make_scorer("byte_level")
    source.gate = asyncio.Event()
    first = asyncio.create_task(scorer.score(request(([4, 5], b""))))
    await asyncio.sleep(0)
    second = asyncio.create_task(scorer.score(request(([4, 5], b"a"), ([6], b""))))
    await asyncio.sleep(0.01)
    source.gate.set()
    a, b = await asyncio.gather(first, second)
    assert source.calls == [[(4, 5)], [(6,)]]
    assert scorer.stats.shared_fetches == 1
    assert len(a.results) == 1 and len(b.results) == 2


async def test_failed_fetch_reaches_every_waiter_and_is_not_cached() -> None:
    scorer, source, _ = make_scorer("byte_level")
    source.gate = asyncio.Event()
    source.fail = DeadlineExceeded("too slow")
    first = asyncio.create_task(scorer.score(request(([4, 5], b""))))
    await asyncio.sleep(0)
    second = asyncio.create_task(scorer.score(request(([4, 5], b"a"))))
    await asyncio.sleep(0.01)
    source.gate.set()
    results = await asyncio.gather(first, second, return_exceptions=True)
    assert all(isinstance(r, DeadlineExceeded) for r in results)
    assert not scorer._inflight
    source.fail, source.gate = None, None
    ok = await scorer.score(request(([4, 5], b"")))
    assert len(ok.results) == 1 and source.calls[-1] == [(4, 5)]


async def test_cancelled_owner_does_not_hang_other_waiters() -> None:
    scorer, source, _ = make_scorer("byte_level")
    source.gate = asyncio.Event()
    owner = asyncio.create_task(scorer.score(request(([7], b""))))
    await asyncio.sleep(0)
    follower = asyncio.create_task(scorer.score(request(([7], b"a"))))
    await asyncio.sleep(0.01)
    owner.cancel()
    with pytest.raises(asyncio.CancelledError):
        await owner
    with pytest.raises(Exception, match="cancelled; retry"):
        await asyncio.wait_for(follower, 1.0)
    assert not scorer._inflight


async def test_include_logprobs_returns_the_reduced_vector() -> None:
    scorer, source, table = make_scorer("sentencepiece")
    response = await scorer.score(request(([2, 3], b""), ([2, 3], b" "), include_logprobs=True))
    for result, partial in zip(response.results, [b"", b" "], strict=True):
        assert result.logprobs is not None
        row = decode_logprobs(result.logprobs)
        assert np.array_equal(row, source.row([2, 3]))
        ref, _ = reference_reduction(table, renormalised(row), partial)
        finite = np.isfinite(ref)
        np.testing.assert_allclose(np.array(result.cont_lp)[finite], ref[finite], atol=1e-9)
    # Without the flag nothing ships (and the fresh fetch above filled the cache).
    plain = await scorer.score(request(([2, 3], b"")))
    assert plain.results[0].logprobs is None
    assert len(source.calls) == 1


@pytest.mark.parametrize(
    ("queries", "error", "param"),
    [
        ([ByteQuery(token_ids=[1], partial="zz")], BadRequest, "queries.0.partial"),
        ([ByteQuery(token_ids=[1]), ByteQuery(token_ids=[1, -1])], BadRequest, "queries.1"),
        ([ByteQuery(token_ids=[10**6])], BadRequest, "queries.0.token_ids"),
        ([ByteQuery(token_ids=[1] * 64)], ContextLengthExceeded, "queries.0.token_ids"),
    ],
)
async def test_bad_queries_are_rejected_before_any_forward(
    queries: list[ByteQuery], error: type[Exception], param: str
) -> None:
    scorer, source, _ = make_scorer("byte_level")
    with pytest.raises(error) as info:
        await scorer.score(ByteDistRequest(request_id="r", queries=queries))
    assert isinstance(info.value, BadRequest) and (info.value.param or "").startswith(param)
    assert source.calls == []


async def test_include_logprobs_is_limited() -> None:
    scorer, _, _ = make_scorer("byte_level")
    with pytest.raises(BadRequest, match="at most 8"):
        await scorer.score(request(*[([i + 1], b"") for i in range(9)], include_logprobs=True))


def test_schema_rejects_empty_paths_and_keeps_minus_infinity_over_json() -> None:
    with pytest.raises(ValidationError):
        ByteQuery(token_ids=[])
    response = ByteDistResponse.model_validate(
        {"results": [{"cont_lp": [-math.inf, -0.5], "exact": {3: [7.0, -math.inf]}}]}
    )
    wire = response.model_dump_json(exclude_none=True)
    assert "-Infinity" in wire and "null" not in wire
    back = ByteDistResponse.model_validate_json(wire)
    assert back.results[0].cont_lp[0] == -math.inf
    assert back.results[0].exact[3] == [7.0, -math.inf]


# --- the fake engine's byte model (what gateway tests run against) -----------------------------
def test_fake_byte_dist_is_a_consistent_distribution() -> None:
    lps = fake_byte_logprobs()
    assert math.fsum(math.exp(v) for v in lps) == pytest.approx(1.0, abs=1e-12)
    root = fake_byte_dist(b"")
    assert math.fsum(math.exp(v) for v in root.cont_lp) == pytest.approx(1.0, abs=1e-12)
    assert root.cont_lp[256] == lps[FAKE_BYTE_STOP_ID]
    assert int(root.exact[ord("a")][0]) == FAKE_BYTE_TOKENS.index(b"a")
    assert root.cont_lp[0xC3] == lps[FAKE_BYTE_TOKENS.index("é".encode())]  # only via "é"
    mid = fake_byte_dist(b"\xc3")
    assert [c for c, v in enumerate(mid.cont_lp) if v > -math.inf] == [0xA9]
    assert mid.exact == {0xA9: [float(FAKE_BYTE_TOKENS.index("é".encode())), mid.cont_lp[0xA9]]}
    th = fake_byte_dist(b"th")
    assert [c for c, v in enumerate(th.cont_lp) if v > -math.inf] == [ord("e")]
    assert fake_byte_dist(b"zz").cont_lp == [-math.inf] * 257


async def test_fake_worker_serves_byte_dist_over_http() -> None:
    app = build_worker_app(FakeEngine(), Lifecycle())
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://w") as client,
    ):
        for _ in range(50):
            if (await client.get("/readyz")).status_code == 200:
                break
            await asyncio.sleep(0.01)
        body = request(([1], b""), ([1, 2], b"\xc3")).model_dump_json()
        ok = await client.post(
            "/internal/byte-dist", content=body, headers={"content-type": "application/json"}
        )
        assert ok.status_code == 200
        parsed = ByteDistResponse.model_validate_json(ok.content)
        assert parsed.results[0] == fake_byte_dist(b"")
        assert parsed.results[1] == fake_byte_dist(b"\xc3")
        bad = await client.post(
            "/internal/byte-dist",
            json={"request_id": "r", "queries": [{"token_ids": [1], "partial": "xyz"}]},
        )
        assert bad.status_code == 400
        empty = await client.post(
            "/internal/byte-dist", json={"request_id": "r", "queries": [{"token_ids": []}]}
        )
        assert empty.status_code == 400


class CountingFakeEngine(FakeEngine):
    """Reports what a vLLM worker's scorer reports: rows fetched, some as session steps."""

    async def byte_dist(self, request: ByteDistRequest) -> ByteDistResponse:
        answer = await super().byte_dist(request)
        return answer.model_copy(update={"fetched": 3, "extended": 2})


async def test_worker_metrics_count_byte_dist_rows_by_how_they_were_computed() -> None:
    app = build_worker_app(CountingFakeEngine(), Lifecycle())
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://w") as client,
    ):
        for _ in range(50):
            if (await client.get("/readyz")).status_code == 200:
                break
            await asyncio.sleep(0.01)
        body = request(([1], b"")).model_dump_json()
        for _ in range(2):
            ok = await client.post(
                "/internal/byte-dist", content=body, headers={"content-type": "application/json"}
            )
            assert ok.status_code == 200
        text = (await client.get("/metrics")).text
    assert 'octograph_worker_byte_dist_rows_total{how="session_step"} 4.0' in text
    assert 'octograph_worker_byte_dist_rows_total{how="new_request"} 2.0' in text


# -- speculation: children fetched ahead, in the background or in a needed engine step --------


async def settle(scorer: ByteDistScorer) -> None:
    """Wait for the scorer's background fetches."""
    while scorer._background:
        await asyncio.gather(*scorer._background)


def brute_force_extensions(
    table: TokenByteTable, row: NDArray[np.float64], partial: bytes, count: int
) -> list[int]:
    ids = [
        t
        for t in range(table.vocab_size)
        if not table.is_special(t)
        and table.rank[t] >= 0
        and len(table.token_bytes(t)) > len(partial)
        and table.token_bytes(t).startswith(partial)
    ]
    return sorted(ids, key=lambda t: -row[t])[:count]


@pytest.mark.parametrize("kind", KINDS)
def test_likeliest_extensions_are_the_most_probable_longer_tokens(kind: str) -> None:
    from service.bytelevel.reduction import Prepared

    table = tiny_table(kind)
    source = Source(table.vocab_size)
    row = renormalised(source.row((3, 1)))
    prepared = Prepared(table, row)
    for partial in partials_for(table):
        for count in (1, 3):
            got = likeliest_extensions(table, prepared, partial, count)
            want = brute_force_extensions(table, row, partial, count)
            assert [row[t] for t in got] == pytest.approx([row[t] for t in want], abs=0.0)
            assert all(table.token_bytes(t).startswith(partial) for t in got)
    assert likeliest_extensions(table, prepared, b"", 0) == []


async def test_speculated_children_are_fetched_in_one_step_and_used_later() -> None:
    scorer, source, table = make_scorer("byte_level")
    first = await scorer.score(request(([1, 2], b""), speculate=3))
    assert first.fetched == 1 and first.speculated == 3
    await settle(scorer)
    prepared = scorer.cache.get((1, 2))
    assert prepared is not None
    children = [(1, 2, t) for t in likeliest_extensions(table, prepared, b"", 3)]
    assert source.calls == [[(1, 2)], children]  # the three children: one engine step
    # The tree reaches one child: no forward, and the answer is the same numbers.
    second = await scorer.score(request((list(children[1]), b""), speculate=3))
    assert second.fetched == 0 and second.speculation_hits == 1
    fresh, _, _ = make_scorer("byte_level")
    alone = await fresh.score(request((list(children[1]), b"")))
    assert second.results == alone.results
    # ... and that child's own children are speculated in turn.
    assert second.speculated == 3
    assert scorer.stats.speculation_hits == 1


async def test_a_request_for_a_path_being_speculated_waits_for_that_fetch() -> None:
    scorer, source, table = make_scorer("byte_level")
    source.gate, source.gate_from = asyncio.Event(), 1  # speculation waits
    await scorer.score(request(([5], b""), speculate=1))
    prepared = scorer.cache.get((5,))
    assert prepared is not None
    (child,) = [(5, t) for t in likeliest_extensions(table, prepared, b"", 1)]
    assert child in scorer._inflight  # still being fetched
    asking = asyncio.create_task(scorer.score(request((list(child), b""))))
    await asyncio.sleep(0.01)
    source.gate.set()
    answer = await asking
    assert answer.fetched == 0 and answer.speculation_hits == 1
    assert source.calls == [[(5,)], [child]]  # fetched once


async def test_failed_speculation_is_fetched_again_by_the_request_that_needs_it() -> None:
    scorer, source, table = make_scorer("byte_level")
    source.gate, source.gate_from = asyncio.Event(), 1  # speculation waits, then fails
    await scorer.score(request(([5], b""), speculate=1))
    prepared = scorer.cache.get((5,))
    assert prepared is not None
    (child,) = [(5, t) for t in likeliest_extensions(table, prepared, b"", 1)]
    source.fail = DeadlineExceeded("engine busy")
    source.gate.set()
    await settle(scorer)
    assert scorer.stats.speculation_failures == 1 and not scorer._inflight
    source.fail = None
    answer = await scorer.score(request((list(child), b"")))
    assert answer.fetched == 1 and len(answer.results) == 1


async def test_speculation_in_flight_is_bounded_and_off_by_default() -> None:
    scorer, source, _ = make_scorer("byte_level")
    source.gate = asyncio.Event()
    off = asyncio.create_task(scorer.score(request(([9], b""))))
    await asyncio.sleep(0.01)
    source.gate.set()
    assert (await off).speculated == 0
    # The four requests' own fetches pass; speculation waits until the end.
    source.gate, source.gate_from = asyncio.Event(), len(source.calls) + 4
    tasks = [
        asyncio.create_task(scorer.score(request(([i], b""), speculate=8))) for i in range(1, 5)
    ]
    answers = await asyncio.gather(*tasks)
    assert sum(a.speculated for a in answers) == MAX_SPECULATED_IN_FLIGHT
    assert scorer.stats.speculation_skipped == 4 * 8 - MAX_SPECULATED_IN_FLIGHT
    source.gate.set()
    await settle(scorer)
    assert scorer._speculating == 0 and not scorer._inflight


def test_speculate_is_limited_on_the_wire() -> None:
    with pytest.raises(ValidationError):
        request(([1], b""), speculate=9)


async def test_a_request_waiting_on_a_failed_speculation_fetches_the_path_itself() -> None:
    scorer, source, table = make_scorer("byte_level")
    source.gate, source.gate_from = asyncio.Event(), 1
    await scorer.score(request(([5], b""), speculate=1))
    prepared = scorer.cache.get((5,))
    assert prepared is not None
    (child,) = [(5, t) for t in likeliest_extensions(table, prepared, b"", 1)]
    asking = asyncio.create_task(scorer.score(request((list(child), b""))))
    await asyncio.sleep(0.01)
    source.fail, source.fail_once = DeadlineExceeded("engine busy"), True
    source.gate.set()
    answer = await asking
    assert answer.fetched == 1 and source.calls[-1] == [child]


def test_speculation_skips_children_below_their_share_of_the_mass() -> None:
    from service.bytelevel.reduction import Prepared

    table = tiny_table("byte_level")
    row = renormalised(Source(table.vocab_size).row((3, 1)))
    prepared = Prepared(table, row)
    for partial in (b"", b"t", b" "):
        ids = brute_force_extensions(table, row, partial, table.vocab_size)
        if not ids:
            continue
        total = float(np.logaddexp.reduce(row[ids]))
        shares = [math.exp(row[t] - total) for t in ids]
        for floor in (0.0, shares[0] * 0.99, shares[0] * 1.01, 0.05):
            got = likeliest_extensions(table, prepared, partial, 4, floor)
            want = [t for t, share in zip(ids[:4], shares[:4], strict=True) if share >= floor]
            assert [row[t] for t in got] == pytest.approx([row[t] for t in want], abs=0.0)


async def test_step_speculation_rides_in_the_engine_step_of_a_needed_path() -> None:
    """ "step": the likeliest children of the cached paths asked about go into the fetch of
    the path the request needs, and nothing is fetched when it needs none."""
    scorer, source, table = make_scorer("byte_level")
    await scorer.score(request(([1, 2], b"")))  # cached, no speculation asked
    only_cached = await scorer.score(request(([1, 2], b"t"), speculate=2, speculate_with="step"))
    assert only_cached.speculated == 0 and len(source.calls) == 1  # no forward needed: none
    answer = await scorer.score(
        request(([1, 2], b"t"), ([7], b""), speculate=2, speculate_with="step")
    )
    prepared = scorer.cache.get((1, 2))
    assert prepared is not None
    children = [(1, 2, t) for t in likeliest_extensions(table, prepared, b"t", 2)]
    assert source.calls[-1] == [(7,), *children]  # one engine step
    assert answer.fetched == 1 and answer.speculated == len(children) == 2
    assert not scorer._background
    hit = await scorer.score(request((list(children[0]), b""), speculate=2, speculate_with="step"))
    assert hit.fetched == 0 and hit.speculation_hits == 1 and len(source.calls) == 2
