"""`/internal/byte-dist` next to the model: byte-bucketed reductions of full next-token
distributions (research/byte-level.md §4; the reduction itself is service.bytelevel.reduction).

A request carries queries (token path, partial bytes). Each distinct path needs one full
next-token distribution, fetched through ``extend`` when the worker has streaming sessions and
the request allows them (a child of the path a session scored last costs one decode-sized
step, see service.worker.path_sessions) and through ``fetch`` otherwise (in the vLLM worker:
one ``max_tokens=1`` capture request per path, all in flight together, see
service.worker.capture). The
distribution is gathered into the byte table's sorted order once (`reduction.Prepared`) and
kept in an LRU bounded in bytes, so the covering tree's usual pattern, the same path asked
again byte after byte with a growing partial, costs a slice of that array and no forward.
Concurrent requests for a path already being fetched wait for that fetch instead of starting
another one.

The reductions (a pass over the vocabulary for `partial == ""`: 262k values for Gemma-3) run
in a worker thread, one hand-off per request, so the event loop keeps streaming tokens for
ordinary generation meanwhile.

Speculation (`ByteDistRequest.speculate` = k, `speculate_min_p` = p): after answering, the
worker fetches in the background, in one engine step, the likeliest children of each query's
path: the path plus one of the k most probable tokens that extend the query's partial bytes,
if that token holds at least p of the mass of all tokens extending them. The rows go into the
same LRU. A covering tree's next new path is, most of the time, a child of a path it queries
now (it becomes a node when the text completes that token, a byte or a few later), and each
byte narrows the partial and sharpens the guess; fetched while the member's engine would
otherwise idle through the cache hits of those bytes, the child is there when the text reaches
it. Exactness is untouched: a row is the model's distribution after that path whoever asked
for it, and a speculated path the text never reaches is only evicted. A request that needs a
path still being speculated waits for that fetch (and fetches it itself if it failed).
"""

from __future__ import annotations

import asyncio
import base64
import math
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from service.bytelevel.byte_tables import TokenByteTable
from service.bytelevel.reduction import Prepared, reduce_prepared
from service.errors import BadRequest, ContextLengthExceeded, Unavailable
from service.protocol.internal import ByteDistRequest, ByteDistResponse, ByteDistResult

Path = tuple[int, ...]
Float32Array = npt.NDArray[np.float32]
# Full next-token log-probabilities (float32, indexed by token id) for each prefix, in order.
FetchDistributions = Callable[[list[list[int]]], Awaitable[list[Float32Array]]]
# The same through live streaming sessions (service.worker.path_sessions): the rows, and how
# many of them were computed as an extension of a session.
ExtendDistributions = Callable[[list[list[int]]], Awaitable[tuple[list[Float32Array], int]]]

# include_logprobs ships whole vectors (~1 MB each for Gemma-3): a debugging aid, kept small.
MAX_QUERIES_WITH_LOGPROBS = 8
# Speculated paths in flight at once (all requests together): past it, new speculation is
# skipped, so background rows never pile up in front of the forwards requests wait for.
MAX_SPECULATED_IN_FLIGHT = 16
# Speculated paths remembered (not their rows: those live in the LRU) to count hits.
MAX_SPECULATED_REMEMBERED = 4096


@dataclass(frozen=True)
class ParsedQuery:
    path: Path
    partial: bytes


@dataclass
class ByteDistStats:
    queries: int = 0
    forwards: int = 0  # distinct paths fetched from the model: the cost that matters
    cache_hits: int = 0
    shared_fetches: int = 0  # paths another request was already fetching
    speculated: int = 0  # children fetched in the background (`speculate`)
    speculation_hits: int = 0  # paths a request found speculated (cached or in flight)
    speculation_skipped: int = 0  # children not speculated: too many in flight
    speculation_failures: int = 0  # background fetches that failed (the asker fetches again)


@dataclass
class _Fetching:
    """How one request fetches its rows, and what that cost."""

    sessions: bool  # through the worker's streaming sessions, when it has them
    extended: int = 0  # rows computed as a session's extension


class PreparedCache:
    """LRU of prepared paths, bounded by the bytes of their float64 arrays (a Gemma-3 path is
    2 MiB) and by count."""

    def __init__(self, max_bytes: int, max_entries: int = 65536) -> None:
        self.max_bytes = max_bytes
        self.max_entries = max_entries
        self._items: OrderedDict[Path, Prepared] = OrderedDict()
        self.bytes = 0

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, path: object) -> bool:
        return path in self._items

    def get(self, path: Path) -> Prepared | None:
        prepared = self._items.get(path)
        if prepared is not None:
            self._items.move_to_end(path)
        return prepared

    def put(self, path: Path, prepared: Prepared) -> None:
        old = self._items.pop(path, None)
        if old is not None:
            self.bytes -= old.sorted_lp.nbytes
        self._items[path] = prepared
        self.bytes += prepared.sorted_lp.nbytes
        while self._items and (self.bytes > self.max_bytes or len(self._items) > self.max_entries):
            _, evicted = self._items.popitem(last=False)
            self.bytes -= evicted.sorted_lp.nbytes


class ByteDistScorer:
    """Answers ByteDistRequests for one model (its byte table and its distribution source)."""

    def __init__(
        self,
        table: TokenByteTable,
        fetch: FetchDistributions,
        *,
        token_id_limit: int,
        max_model_len: int,
        cache_bytes: int = 256 << 20,
        extend: ExtendDistributions | None = None,
    ) -> None:
        self.table = table
        self._fetch = fetch
        self._extend = extend
        self.token_id_limit = token_id_limit  # ids the model can take as input: [0, limit)
        self.max_model_len = max_model_len
        self.cache = PreparedCache(cache_bytes)
        self.stats = ByteDistStats()
        self._inflight: dict[Path, asyncio.Future[Prepared]] = {}
        # Speculated paths not yet asked for (insertion order: the oldest are forgotten first).
        self._speculated: OrderedDict[Path, None] = OrderedDict()
        self._speculating = 0  # speculated paths in flight
        self._background: set[asyncio.Task[None]] = set()

    # -- validation -----------------------------------------------------------------------------
    def parse(self, request: ByteDistRequest) -> list[ParsedQuery]:
        if request.include_logprobs and len(request.queries) > MAX_QUERIES_WITH_LOGPROBS:
            raise BadRequest(
                f"include_logprobs allows at most {MAX_QUERIES_WITH_LOGPROBS} queries",
                param="include_logprobs",
            )
        parsed = []
        for i, q in enumerate(request.queries):
            if not q.token_ids:
                raise BadRequest("a query needs at least one token id", param=f"queries.{i}")
            # The capture request generates one token: the path needs room for it.
            if len(q.token_ids) >= self.max_model_len:
                raise ContextLengthExceeded(
                    f"query {i} has {len(q.token_ids)} tokens; this model's context is "
                    f"{self.max_model_len} tokens",
                    param=f"queries.{i}.token_ids",
                )
            low, high = min(q.token_ids), max(q.token_ids)
            if low < 0 or high >= self.token_id_limit:
                raise BadRequest(
                    f"query {i}: token ids must be in [0, {self.token_id_limit})",
                    param=f"queries.{i}.token_ids",
                )
            try:
                partial = bytes.fromhex(q.partial)
            except ValueError:
                raise BadRequest(
                    f"query {i}: partial must be hex", param=f"queries.{i}.partial"
                ) from None
            parsed.append(ParsedQuery(tuple(q.token_ids), partial))
        return parsed

    # -- scoring --------------------------------------------------------------------------------
    async def score(self, request: ByteDistRequest) -> ByteDistResponse:
        queries = self.parse(request)
        self.stats.queries += len(queries)
        paths = list(dict.fromkeys(q.path for q in queries))
        if request.include_logprobs:
            # Fresh rows, so the returned vectors are exactly what was reduced.
            rows = await self._fetch([list(p) for p in paths])
            self.stats.forwards += len(paths)
            by_path = dict(zip(paths, rows, strict=True))
            results, prepared = await asyncio.to_thread(self._reduce_fresh, queries, by_path)
            for path, prep in prepared.items():
                self.cache.put(path, prep)
            return ByteDistResponse(results=results)
        in_step = request.speculate > 0 and request.speculate_with == "step"
        fetching = _Fetching(sessions=request.sessions)
        preps, fetched, hits, speculated = await self._prepared(
            paths,
            fetching,
            queries if in_step else (),
            request.speculate,
            request.speculate_min_p,
        )
        results, guesses = await asyncio.to_thread(
            self._reduce_all,
            queries,
            preps,
            0 if in_step else request.speculate,
            request.speculate_min_p,
        )
        speculated += self._speculate(guesses)
        return ByteDistResponse(
            results=results,
            fetched=len(fetched),
            speculated=speculated,
            speculation_hits=len(hits),
            extended=fetching.extended,
        )

    async def _prepared(
        self,
        paths: Sequence[Path],
        fetching: _Fetching,
        guess_from: Sequence[ParsedQuery] = (),
        per_query: int = 0,
        min_probability: float = 0.0,
    ) -> tuple[dict[Path, Prepared], list[Path], list[Path], int]:
        """Prepared rows of `paths`: (rows, the paths this call fetched, the paths speculation
        had fetched or was fetching, how many children it speculated).  When some path needs
        a forward, the likeliest children of the `guess_from` queries whose paths are cached
        go into the same engine step ("step" speculation)."""
        found: dict[Path, Prepared] = {}
        waiting: dict[Path, asyncio.Future[Prepared]] = {}
        missing: list[Path] = []
        hits: list[Path] = []
        for path in paths:
            if path in self._speculated:
                del self._speculated[path]
                if path in self._inflight or path in self.cache:
                    hits.append(path)
            cached = self.cache.get(path)
            if cached is not None:
                found[path] = cached
                self.stats.cache_hits += 1
            elif path in self._inflight:
                waiting[path] = self._inflight[path]
                self.stats.shared_fetches += 1
            else:
                missing.append(path)
        self.stats.speculation_hits += len(hits)
        extra: list[Path] = []
        if missing and guess_from and per_query > 0:
            asked = [q for q in guess_from if q.path in found]
            _, guesses = await asyncio.to_thread(
                self._reduce_all, asked, found, per_query, min_probability, False
            )
            wanted = set(missing)
            extra = [g for g in guesses if g not in wanted][:MAX_SPECULATED_IN_FLIGHT]
            for child in extra:
                self._speculated[child] = None
            while len(self._speculated) > MAX_SPECULATED_REMEMBERED:
                self._speculated.popitem(last=False)
            self.stats.speculated += len(extra)
        if missing:
            fetched_now = await self._fetch_new(missing + extra, fetching)
            found.update({p: fetched_now[p] for p in missing})
        retry: list[Path] = []
        for path, fut in waiting.items():
            # shield: this request giving up must not cancel the fetch another one owns.
            try:
                found[path] = await asyncio.shield(fut)
            except SpeculationFailed:
                retry.append(path)  # speculation's failure is not this request's
        if retry:
            found.update(await self._fetch_new(retry, fetching))
        return found, missing + retry, hits, len(extra)

    async def _fetch_rows(
        self, prefixes: list[list[int]], fetching: _Fetching
    ) -> list[Float32Array]:
        if fetching.sessions and self._extend is not None:
            rows, extended = await self._extend(prefixes)
            fetching.extended += extended
            return rows
        return await self._fetch(prefixes)

    async def _fetch_new(self, missing: list[Path], fetching: _Fetching) -> dict[Path, Prepared]:
        """Fetch `missing` (none cached or in flight), registered as in flight meanwhile."""
        found: dict[Path, Prepared] = {}
        if missing:
            loop = asyncio.get_running_loop()
            futures = {path: loop.create_future() for path in missing}
            for path, fut in futures.items():
                # A failure nobody else awaited must not be logged as "never retrieved".
                fut.add_done_callback(_consume_exception)
                self._inflight[path] = fut
            try:
                rows = await self._fetch_rows([list(p) for p in missing], fetching)
                self.stats.forwards += len(missing)
                fresh = await asyncio.to_thread(self._prepare_rows, missing, rows)
            except BaseException as exc:
                for fut in futures.values():
                    if not fut.done():
                        fut.set_exception(
                            exc
                            if isinstance(exc, Exception)
                            else Unavailable("the request fetching this path was cancelled; retry")
                        )
                raise
            finally:
                for path in missing:
                    self._inflight.pop(path, None)
            for path, prep in fresh.items():
                self.cache.put(path, prep)
                futures[path].set_result(prep)
                found[path] = prep
        return found

    # -- speculation ----------------------------------------------------------------------------
    def _speculate(self, guesses: list[Path]) -> int:
        """Start the background fetch of `guesses` (one engine step); returns how many paths
        it started."""
        # Checked again: another request may have started one meanwhile.
        children = [c for c in guesses if c not in self._inflight and c not in self.cache]
        room = MAX_SPECULATED_IN_FLIGHT - self._speculating
        if len(children) > room:
            self.stats.speculation_skipped += len(children) - max(room, 0)
            children = children[: max(room, 0)]
        if not children:
            return 0
        loop = asyncio.get_running_loop()
        futures = {child: loop.create_future() for child in children}
        for child, fut in futures.items():
            fut.add_done_callback(_consume_exception)
            self._inflight[child] = fut
            self._speculated[child] = None
        while len(self._speculated) > MAX_SPECULATED_REMEMBERED:
            self._speculated.popitem(last=False)
        self._speculating += len(children)
        self.stats.speculated += len(children)
        task = asyncio.create_task(self._fetch_speculated(futures))
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return len(children)

    async def _fetch_speculated(self, futures: dict[Path, asyncio.Future[Prepared]]) -> None:
        paths = list(futures)
        try:
            rows = await self._fetch([list(p) for p in paths])
            self.stats.forwards += len(paths)
            fresh = await asyncio.to_thread(self._prepare_rows, paths, rows)
        except BaseException as exc:  # noqa: BLE001 - a background task: nobody else sees it
            self.stats.speculation_failures += 1
            for fut in futures.values():
                if not fut.done():
                    fut.set_exception(SpeculationFailed(str(exc) or type(exc).__name__))
            if not isinstance(exc, Exception):
                raise
        else:
            for path, prep in fresh.items():
                self.cache.put(path, prep)
                futures[path].set_result(prep)
        finally:
            self._speculating -= len(paths)
            for path in paths:
                self._inflight.pop(path, None)

    def _prepare_rows(
        self, paths: Sequence[Path], rows: Sequence[Float32Array]
    ) -> dict[Path, Prepared]:
        return {
            path: Prepared(self.table, normalised_logprobs(row))
            for path, row in zip(paths, rows, strict=True)
        }

    def _reduce_all(
        self,
        queries: Sequence[ParsedQuery],
        preps: dict[Path, Prepared],
        per_query: int = 0,
        min_probability: float = 0.0,
        answer: bool = True,
    ) -> tuple[list[ByteDistResult], list[Path]]:
        """The answers (with `answer`), and the children worth speculating: for each query,
        up to `per_query` of the tokens that extend its partial bytes, each holding at least
        `min_probability` of the mass of those tokens, not already cached or in flight."""
        results = [self._result(preps[q.path], q.partial) for q in queries] if answer else []
        if per_query <= 0:
            return results, []
        scored: list[tuple[float, Path]] = []
        for q in dict.fromkeys(queries):
            shares = extension_shares(
                self.table, preps[q.path], q.partial, per_query, min_probability
            )
            for token, share in shares:
                child = (*q.path, token)
                if (
                    token < self.token_id_limit
                    and len(child) < self.max_model_len
                    and child not in self._inflight
                    and child not in self.cache
                ):
                    scored.append((share, child))
        # Surest first: past the in-flight bound, the doubtful guesses are the ones left out.
        scored.sort(key=lambda item: -item[0])
        return results, list(dict.fromkeys(child for _, child in scored))

    def _reduce_fresh(
        self, queries: Sequence[ParsedQuery], rows: dict[Path, Float32Array]
    ) -> tuple[list[ByteDistResult], dict[Path, Prepared]]:
        preps = self._prepare_rows(list(rows), list(rows.values()))
        results = []
        for q in queries:
            result = self._result(preps[q.path], q.partial)
            # As captured (float32); the reduction used normalised_logprobs(row).
            row = np.ascontiguousarray(rows[q.path], dtype="<f4")
            result.logprobs = base64.b64encode(row.tobytes()).decode("ascii")
            results.append(result)
        return results, preps

    def _result(self, prepared: Prepared, partial: bytes) -> ByteDistResult:
        reduction = reduce_prepared(self.table, prepared, partial)
        exact: dict[int, list[float]] = {}
        for c in np.flatnonzero(reduction.exact_lp > -math.inf).tolist():
            token_id = self.table.exact_id(partial + bytes([c]))
            if token_id is not None:
                exact[c] = [float(token_id), float(reduction.exact_lp[c])]
        return ByteDistResult(cont_lp=reduction.cont_lp.tolist(), exact=exact)


class SpeculationFailed(Exception):
    """A background fetch failed; whoever waited on it fetches the path itself."""


def likeliest_extensions(
    table: TokenByteTable,
    prepared: Prepared,
    partial: bytes,
    count: int,
    min_probability: float = 0.0,
) -> list[int]:
    """Ids of the `count` most probable tokens whose bytes strictly extend `partial` (the
    tokens that complete a child of the path a few bytes on), most probable first, keeping
    those that hold at least `min_probability` of the mass of all such tokens."""
    return [t for t, _ in extension_shares(table, prepared, partial, count, min_probability)]


def extension_shares(
    table: TokenByteTable,
    prepared: Prepared,
    partial: bytes,
    count: int,
    min_probability: float = 0.0,
) -> list[tuple[int, float]]:
    """`likeliest_extensions` with each token's share of the mass of the extending tokens."""
    lo, hi = table.prefix_range(partial)
    if count <= 0 or lo >= hi:
        return []
    values = prepared.sorted_lp[lo:hi]
    longer = table.sorted_lens[lo:hi] > len(partial)
    candidates = np.flatnonzero(longer & np.isfinite(values))
    if candidates.size == 0:
        return []
    mass = values[candidates]
    top = float(mass.max())
    total = top + math.log(float(np.exp(mass - top).sum()))
    if candidates.size > count:
        best = np.argpartition(-mass, count - 1)[:count]
        candidates, mass = candidates[best], mass[best]
    order = np.argsort(-mass, kind="stable")
    shares = np.exp(mass[order] - total)
    keep = shares >= min_probability
    ids = table.sorted_ids[lo + candidates[order][keep]]
    return [(int(t), float(p)) for t, p in zip(ids, shares[keep], strict=True)]


def normalised_logprobs(row: npt.NDArray[np.floating]) -> npt.NDArray[np.float64]:
    """``row`` in float64, shifted so that its probabilities sum to 1 in float64.

    The engine's float32 log_softmax sums to 1 only to a few 1e-6 (each entry is rounded);
    the byte mixture downstream wants a distribution that does not leak or gain mass. The shift
    is that rounding, far below the engine's own bf16/float32 noise.
    """
    lp = row.astype(np.float64)
    top = float(lp.max())
    return lp - (top + math.log(float(np.exp(lp - top).sum())))


def decode_logprobs(encoded: str) -> Float32Array:
    """The inverse of ByteDistResult.logprobs' encoding."""
    return np.frombuffer(base64.b64decode(encoded), dtype="<f4").astype(np.float32)


def _consume_exception(fut: asyncio.Future[Prepared]) -> None:
    if not fut.cancelled():
        fut.exception()
