"""Token paths through streaming sessions (service.worker.path_sessions), without an engine.

A fake AsyncLLM plays vLLM's streaming-input contract: a session's tokens are all the chunks it
was given so far, each chunk yields one output (one token), closing the output generator aborts
the session, and the first chunk's list is extended in place the way vLLM's front end does. The
row it sends for a chunk is a seeded hash "model" of the session's whole token list; every
answer is compared with that model evaluated on the path asked for, so a session extended by
the wrong tokens, or a row delivered to the wrong path, fails.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
from numpy.typing import NDArray

from service.protocol.internal import ByteDistRequest, ByteQuery
from service.worker.byte_dist import ByteDistScorer
from service.worker.capture import CAPTURE_EXTRA_ARG
from service.worker.path_sessions import MAX_EXTENSION_TOKENS, PathSessions
from tests.unit.ensemble_fixtures import HashModel, tiny_table

VOCAB = 64


@dataclass
class _Completion:
    token_ids: list[int]


@dataclass
class _Output:
    outputs: list[_Completion]
    finished: bool = False


@dataclass
class FakeChannel:
    """CaptureChannel's worker-side surface: keys, and the rows the fake engine 'sent'."""

    rows: dict[str, NDArray[np.float32]] = field(default_factory=dict)
    keys: int = 0
    released: set[str] = field(default_factory=set)

    def new_key(self) -> str:
        self.keys += 1
        return f"k{self.keys}"

    def release(self, key: str) -> None:
        self.released.add(key)
        self.rows.pop(key, None)

    async def wait(self, key: str, timeout_s: float, *, seq: int | None = None) -> Any:
        del timeout_s, seq
        return self.rows.pop(key)


class FakeEngine:
    def __init__(self, channel: FakeChannel, vocab: int = VOCAB) -> None:
        self.channel = channel
        self.vocab = vocab
        # Order 8: a row depends on more tokens than any test's extension adds.
        self.model = HashModel(vocab, seed=11, order=8)
        self.model_config = self  # get_vocab_size() below
        self.tokenizer = list(range(vocab))  # len() is all vocab_sizes() reads
        self.chunks: list[tuple[str, int]] = []  # (request id, tokens computed)
        self.plain: list[tuple[int, ...]] = []
        self.aborted: list[str] = []
        self.live: set[str] = set()
        self.fail_on_chunk: int | None = None  # the n-th session chunk (1-based) fails
        self.delay_s = 0.0

    def get_vocab_size(self) -> int:
        return self.vocab

    def row(self, tokens: Sequence[int]) -> NDArray[np.float32]:
        return self.model.one(tuple(tokens)).astype(np.float32)

    def generate(self, prompt: Any, params: Any, request_id: str) -> AsyncGenerator[_Output, None]:
        if isinstance(prompt, dict):
            return self._plain(prompt["prompt_token_ids"], params)
        return self._session(prompt, request_id)

    async def _plain(self, tokens: list[int], params: Any) -> AsyncGenerator[_Output, None]:
        self.plain.append(tuple(tokens))
        await asyncio.sleep(self.delay_s)
        self.channel.rows[params.extra_args[CAPTURE_EXTRA_ARG]] = self.row(tokens)
        yield _Output([_Completion([0])], finished=True)

    async def _session(self, stream: Any, request_id: str) -> AsyncGenerator[_Output, None]:
        self.live.add(request_id)
        tokens: list[int] | None = None
        try:
            async for chunk in stream:
                ids = chunk.prompt["prompt_token_ids"]
                if tokens is None:
                    tokens = ids  # vLLM extends the first chunk's list in place
                else:
                    tokens.extend(ids)
                self.chunks.append((request_id, len(ids)))
                if self.fail_on_chunk is not None and len(self.chunks) == self.fail_on_chunk:
                    raise RuntimeError("engine step failed")
                await asyncio.sleep(self.delay_s)
                key = chunk.sampling_params.extra_args[CAPTURE_EXTRA_ARG]
                self.channel.rows[key] = self.row(tokens)
                yield _Output([_Completion([0])])
        except (GeneratorExit, asyncio.CancelledError):
            self.aborted.append(request_id)
            raise
        finally:
            self.live.discard(request_id)


def make(
    max_sessions: int = 4, idle_close_s: float = 60.0, vocab: int = VOCAB
) -> tuple[PathSessions, FakeEngine]:
    channel = FakeChannel()
    engine = FakeEngine(channel, vocab)
    sessions = PathSessions(
        engine,  # type: ignore[arg-type]
        channel,  # type: ignore[arg-type]
        max_sessions=max_sessions,
        idle_close_s=idle_close_s,
    )
    return sessions, engine


async def fetch(
    sessions: PathSessions, engine: FakeEngine, *paths: Sequence[int]
) -> tuple[list[NDArray[np.float32]], int]:
    # 30 s: the first call imports vLLM (its StreamingInput), ~6 s here.
    rows, extended = await sessions.fetch([list(p) for p in paths], timeout_s=30.0)
    for path, row in zip(paths, rows, strict=True):
        np.testing.assert_array_equal(row, engine.row(path))  # the path's own distribution
    return rows, extended


TRUNK = [5, 9, 2, 7, 1, 3]


async def test_a_child_path_is_one_chunk_of_its_parents_session() -> None:
    sessions, engine = make()
    assert (await fetch(sessions, engine, TRUNK))[1] == 0
    assert (await fetch(sessions, engine, [*TRUNK, 4]))[1] == 1
    assert (await fetch(sessions, engine, [*TRUNK, 4, 8, 8]))[1] == 1  # two tokens at once
    assert engine.chunks == [(engine.chunks[0][0], n) for n in (len(TRUNK), 1, 2)]
    assert sessions.open_sessions == 1 and engine.plain == []
    assert sessions.stats.started == 1 and sessions.stats.extended == 2
    await sessions.close()
    assert engine.live == set() and len(engine.aborted) == 1


async def test_paths_that_do_not_extend_a_frontier_start_their_own_session() -> None:
    sessions, engine = make()
    await fetch(sessions, engine, TRUNK)
    await fetch(sessions, engine, [*TRUNK, 4])
    # A sibling of the path fetched just before: the session moved on past their parent.
    assert (await fetch(sessions, engine, [*TRUNK, 6]))[1] == 0
    # Too far ahead of every frontier.
    far = [*TRUNK, 4, *range(MAX_EXTENSION_TOKENS + 1)]
    assert (await fetch(sessions, engine, far))[1] == 0
    assert sessions.stats.started == 3 and sessions.open_sessions == 3
    # Each lineage continues in its own session: the longest frontier that is a prefix wins.
    assert (await fetch(sessions, engine, [*TRUNK, 6, 2]))[1] == 1
    assert engine.chunks[-1][1] == 1
    await sessions.close()


async def test_at_the_limit_the_least_recently_used_idle_session_closes_first() -> None:
    sessions, engine = make(max_sessions=2)
    await fetch(sessions, engine, [1, 2])
    await fetch(sessions, engine, [3, 4])
    await fetch(sessions, engine, [1, 2, 5])  # [1, 2]'s session is now the recent one
    await fetch(sessions, engine, [6, 7])
    await asyncio.sleep(0)  # the close runs as its own task
    await asyncio.sleep(0)
    assert sessions.open_sessions == 2 and sessions.stats.evicted == 1
    assert len(engine.aborted) == 1
    # [3, 4]'s session was the one closed: its child is a new session, [1, 2, 5]'s is not.
    assert (await fetch(sessions, engine, [3, 4, 1]))[1] == 0
    assert (await fetch(sessions, engine, [1, 2, 5, 5]))[1] == 0  # evicted by [3, 4, 1]
    await sessions.close()


async def test_when_every_session_is_busy_a_path_is_a_plain_request() -> None:
    sessions, engine = make(max_sessions=1)
    rows, extended = await fetch(sessions, engine, [1, 2, 3], [4, 5, 6])
    assert extended == 0 and engine.plain == [(4, 5, 6)] and sessions.stats.plain == 1
    assert sessions.open_sessions == 1
    await sessions.close()


async def test_a_failed_step_aborts_the_session_and_is_never_reused() -> None:
    sessions, engine = make()
    await fetch(sessions, engine, TRUNK)
    engine.fail_on_chunk = 2
    with pytest.raises(RuntimeError, match="engine step failed"):
        await sessions.fetch([[*TRUNK, 4]], timeout_s=5.0)
    assert sessions.open_sessions == 0 and sessions.stats.failed == 1
    engine.fail_on_chunk = None
    assert (await fetch(sessions, engine, [*TRUNK, 4]))[1] == 0  # a new session
    await sessions.close()
    assert engine.live == set()


async def test_a_call_cancelled_mid_step_aborts_every_session_it_claimed() -> None:
    sessions, engine = make()
    await fetch(sessions, engine, [9, 9])  # vLLM imported, a session to extend
    engine.delay_s = 1.0
    with pytest.raises(TimeoutError):
        await sessions.fetch([[1, 2, 3], [4, 5, 6], [9, 9, 1]], timeout_s=0.0)
    engine.delay_s = 0.0
    await asyncio.sleep(0.01)
    # Every claim ended with its session aborted: nothing is left busy (a leak: busy forever).
    assert sessions.open_sessions == 0 and engine.live == set()
    assert sessions.stats.failed == 3
    await fetch(sessions, engine, [1, 2, 3], [4, 5, 6])
    await sessions.close()
    assert engine.live == set()


async def test_a_step_past_the_deadline_aborts_its_session() -> None:
    sessions, engine = make()
    await fetch(sessions, engine, TRUNK)
    engine.delay_s = 1.0
    with pytest.raises(TimeoutError):
        await sessions.fetch([[*TRUNK, 4]], timeout_s=0.05)
    await asyncio.sleep(0.01)
    assert sessions.open_sessions == 0 and engine.live == set()
    assert engine.aborted and sessions.stats.failed == 1


async def test_idle_sessions_close_on_their_own() -> None:
    sessions, engine = make(idle_close_s=0.05)
    await fetch(sessions, engine, TRUNK)
    await fetch(sessions, engine, [8, 8, 8])
    assert sessions.open_sessions == 2
    for _ in range(50):
        await asyncio.sleep(0.02)
        if not engine.live:
            break
    assert sessions.open_sessions == 0 and engine.live == set()
    assert sessions.stats.closed_idle == 2


async def test_the_scorer_counts_extensions_and_honours_sessions_false() -> None:
    table = tiny_table("byte_level")
    sessions, engine = make(vocab=table.vocab_size)
    plain: list[list[int]] = []

    async def fetch_plain(prefixes: list[list[int]]) -> list[NDArray[np.float32]]:
        plain.extend(prefixes)
        return [engine.row(p) for p in prefixes]

    async def extend(prefixes: list[list[int]]) -> tuple[list[NDArray[np.float32]], int]:
        return await sessions.fetch(prefixes)

    scorer = ByteDistScorer(
        table, fetch_plain, token_id_limit=table.vocab_size, max_model_len=64, extend=extend
    )

    def ask(path: list[int], use_sessions: bool = True) -> ByteDistRequest:
        return ByteDistRequest(
            request_id="r",
            queries=[ByteQuery(token_ids=path, partial="")],
            sessions=use_sessions,
        )

    first = await scorer.score(ask([1, 2, 3]))
    child = await scorer.score(ask([1, 2, 3, 4]))
    assert (first.fetched, first.extended) == (1, 0)
    assert (child.fetched, child.extended) == (1, 1)
    off = await scorer.score(ask([1, 2, 3, 4, 5], use_sessions=False))
    assert (off.fetched, off.extended) == (1, 0) and plain == [[1, 2, 3, 4, 5]]
    await sessions.close()
