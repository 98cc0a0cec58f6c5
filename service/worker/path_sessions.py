"""Token paths as vLLM streaming-input sessions: a child path costs one decode-sized step.

Why: byte-level scoring (service.worker.byte_dist) needs the full next-token distribution of
each new token path, and a new path is, most of the time, the path fetched just before plus one
token (research/byte-level.md §4; of Gemma-3's 58 new paths on a 200-byte text, 43). As a new
engine request such a child re-prefills what whole KV blocks of its trunk do not hold (up to 31
tokens with 32-token blocks) and pays a request's set-up. As a session step it costs about a
decode step: on one pinned core here, a one-token child of Gemma-3 took 50-53 ms as a new
request, 38-40 ms as a session step, 37 ms as a decode step (SmolLM2: 35-38, 24-29, 23-29);
in the ensemble, ``bench/ensemble_speed.py --compare-sessions`` prints both side by side.

How: vLLM 0.32's streaming-input requests (``AsyncLLM.generate`` over an async generator of
``StreamingInput``) keep a request's KV, its partial last block included, between input
chunks. A session here is one such request whose *frontier* is the token path it last scored:

* chunk 1 is the whole path (prefix caching still serves its whole blocks);
* each later chunk is the tokens that extend the frontier to the next path asked for (one,
  usually); the engine computes only those and the capture processor sends the distribution
  after them, exactly as for a ``max_tokens=1`` capture request (service.worker.capture: each
  chunk has its own capture key and its sampled token is the frame number; vLLM discards the
  sampled token when the next chunk arrives).

A path is served by the idle session with the longest frontier that is a proper prefix of it
(at most ``MAX_EXTENSION_TOKENS`` short of it); otherwise a new session starts, the least
recently used idle one closing first when ``max_sessions`` are open; when every session is
busy, a plain capture request computes it (today's path). Rows are the model's distribution
after the path whoever computes them: only how its KV was computed differs, and bf16 logits on
CPU depend on that (a row's probabilities differed by 4e-4 at the median between the two ways
here), as they do with prefix caching itself.

Bounds: at most ``max_sessions`` open; a paused session holds its KV blocks and one of the
engine's ``max_num_seqs`` slots, so sessions idle for ``idle_close_s`` are closed by one reaper
task; a session whose step failed or was cancelled is aborted in the engine, never reused.
vLLM extends the prompt list it was given in place as chunks arrive, so every chunk is a copy.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from service.worker import capture
from service.worker.capture import CaptureChannel, CaptureError, Float32Array, first_leaf

if TYPE_CHECKING:
    from vllm.v1.engine.async_llm import AsyncLLM

log = logging.getLogger(__name__)

Path = tuple[int, ...]

# Tokens a session may be extended by in one chunk. A covering tree's next path is the frontier
# plus one token (a token the text completed) or a few; a frontier far behind the path is a
# session of another branch, and a new session's prefix-cache hit serves it as well.
MAX_EXTENSION_TOKENS = 32
# A paused session holds KV blocks and an engine sequence slot: closed after this long unused.
DEFAULT_IDLE_CLOSE_S = 10.0
_SESSION_IDS = itertools.count()


@dataclass(eq=False)
class _Session:
    request_id: str
    frontier: Path
    inputs: asyncio.Queue[Any]  # StreamingInput chunks, then None (end of the stream)
    outputs: AsyncIterator[Any] | None = None  # the engine's RequestOutputs, one per chunk
    busy: bool = True
    last_used: float = field(default_factory=time.monotonic)


@dataclass
class SessionStats:
    started: int = 0  # sessions opened (their first chunk: a whole path)
    extended: int = 0  # paths computed as an extension of a live session
    plain: int = 0  # paths computed as a plain capture request (every session busy)
    closed_idle: int = 0
    evicted: int = 0  # idle sessions closed to make room for a new one
    failed: int = 0  # sessions aborted after a failed or cancelled step


@dataclass(frozen=True)
class _Assignment:
    path: Path
    session: _Session | None  # None: a plain capture request
    chunk: list[int]
    extends: bool = False  # the session's frontier is a prefix of the path


class PathSessions:
    """Full next-token distributions of token paths, through streaming sessions (see module)."""

    def __init__(
        self,
        engine: AsyncLLM,
        channel: CaptureChannel,
        *,
        max_sessions: int,
        idle_close_s: float = DEFAULT_IDLE_CLOSE_S,
    ) -> None:
        if max_sessions < 1:
            raise ValueError("max_sessions must be >= 1")
        self._engine = engine
        self._channel = channel
        self.max_sessions = max_sessions
        self.idle_close_s = idle_close_s
        self.stats = SessionStats()
        self._sessions: list[_Session] = []
        self._reaper: asyncio.Task[None] | None = None
        self._closing: set[asyncio.Task[None]] = set()
        self._closed = False

    @property
    def open_sessions(self) -> int:
        return len(self._sessions)

    # -- fetching -------------------------------------------------------------------------------
    async def fetch(
        self, prefixes: Sequence[Sequence[int]], timeout_s: float = 30.0
    ) -> tuple[list[Float32Array], int]:
        """Next-token log-probabilities after each prefix (as capture.full_distributions), and
        how many of them were computed as an extension of a live session."""
        if not prefixes:
            return [], 0
        if any(len(p) == 0 for p in prefixes):
            raise ValueError("every prefix needs at least one token")
        # Assigned before the first await, so concurrent calls never claim one session twice.
        assignments = [self._assign(tuple(p)) for p in prefixes]
        extended = sum(a.extends for a in assignments)
        self._ensure_reaper()
        tokenizer_vocab = capture.vocab_sizes(self._engine).tokenizer
        deadline = time.monotonic() + timeout_s
        try:
            async with asyncio.timeout(timeout_s):
                async with asyncio.TaskGroup() as group:
                    tasks = [
                        group.create_task(self._compute(a, tokenizer_vocab, deadline))
                        for a in assignments
                    ]
        except BaseExceptionGroup as group_error:
            raise first_leaf(group_error) from group_error
        finally:
            # The one place claims end: a session whose step did not complete (failed,
            # cancelled, or never ran) is in an unknown state and is aborted, never reused.
            for assignment in assignments:
                session = assignment.session
                if session is not None and session.busy:
                    self.stats.failed += 1
                    self._discard(session)
        return [t.result() for t in tasks], extended

    def _assign(self, path: Path) -> _Assignment:
        best: _Session | None = None
        for session in self._sessions:
            n = len(session.frontier)
            if (
                not session.busy
                and n < len(path)
                and len(path) - n <= MAX_EXTENSION_TOKENS
                and path[:n] == session.frontier
                and (best is None or n > len(best.frontier))
            ):
                best = session
        if best is not None:
            best.busy = True
            self.stats.extended += 1
            return _Assignment(path, best, list(path[len(best.frontier) :]), extends=True)
        if len(self._sessions) >= self.max_sessions:
            idle = [s for s in self._sessions if not s.busy]
            if not idle:
                self.stats.plain += 1
                return _Assignment(path, None, list(path))
            self._close_later(min(idle, key=lambda s: s.last_used))
            self.stats.evicted += 1
        session = _Session(
            request_id=f"octograph-path-session-{next(_SESSION_IDS)}",
            frontier=(),
            inputs=asyncio.Queue(maxsize=2),
        )
        self._sessions.append(session)
        self.stats.started += 1
        return _Assignment(path, session, list(path))

    async def _compute(
        self, assignment: _Assignment, tokenizer_vocab: int, deadline: float
    ) -> Float32Array:
        session = assignment.session
        if session is None:
            return await capture.one_distribution(
                self._engine, self._channel, list(assignment.path), tokenizer_vocab, deadline
            )
        row = await self._step(session, assignment.chunk, deadline)
        session.frontier = assignment.path
        session.last_used = time.monotonic()
        session.busy = False
        return capture.fit_to_vocab(row, tokenizer_vocab)

    async def _step(self, session: _Session, chunk: list[int], deadline: float) -> Float32Array:
        from vllm.engine.protocol import StreamingInput
        from vllm.inputs import tokens_input

        key = self._channel.new_key()
        try:
            params = capture.capture_sampling_params(key, streaming=True)
            await session.inputs.put(
                StreamingInput(prompt=tokens_input(chunk), sampling_params=params)
            )
            if session.outputs is None:
                session.outputs = self._engine.generate(
                    _drain(session.inputs), params, request_id=session.request_id
                ).__aiter__()
            seq: int | None = None
            while seq is None:  # outputs without a token (prefill chunks) carry nothing
                output = await anext(session.outputs)
                if output.finished:
                    raise CaptureError(f"session {session.request_id} ended: {output!r}")
                if output.outputs and output.outputs[0].token_ids:
                    seq = int(output.outputs[0].token_ids[-1])
            return await self._channel.wait(key, max(deadline - time.monotonic(), 0.0), seq=seq)
        finally:
            self._channel.release(key)  # no-op when wait() consumed it

    # -- closing --------------------------------------------------------------------------------
    def _discard(self, session: _Session) -> None:
        """Forget `session` and abort it in the engine (its state is unknown or unwanted)."""
        self._close_later(session)

    def _close_later(self, session: _Session) -> None:
        if session in self._sessions:
            self._sessions.remove(session)
        session.busy = True  # never assigned again
        task = asyncio.get_running_loop().create_task(_close(session))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    def _ensure_reaper(self) -> None:
        if self._reaper is None or self._reaper.done():
            self._reaper = asyncio.get_running_loop().create_task(self._reap())

    async def _reap(self) -> None:
        """Close sessions idle for idle_close_s; ends when none is open."""
        while self._sessions and not self._closed:
            now = time.monotonic()
            for session in [s for s in self._sessions if not s.busy]:
                if now - session.last_used >= self.idle_close_s:
                    self.stats.closed_idle += 1
                    self._close_later(session)
            await asyncio.sleep(self.idle_close_s / 4)

    async def close(self) -> None:
        """Abort every session (worker shutdown)."""
        self._closed = True
        if self._reaper is not None:
            self._reaper.cancel()
        for session in list(self._sessions):
            self._close_later(session)
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)


async def _drain(inputs: asyncio.Queue[Any]) -> AsyncGenerator[Any, None]:
    """The session's input stream: chunks as they are put, until None."""
    while True:
        chunk = await inputs.get()
        if chunk is None:
            return
        yield chunk


async def _close(session: _Session) -> None:
    """Abort the session's engine request: closing vLLM's generate() aborts it."""
    outputs = session.outputs
    if outputs is None:
        return
    aclose = getattr(outputs, "aclose", None)
    if aclose is not None:
        with contextlib.suppress(Exception):
            await aclose()
