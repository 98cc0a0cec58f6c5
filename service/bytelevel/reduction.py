"""Byte-bucketed reductions of one next-token distribution: what a worker sends per query.

For a token path with next-token log-probabilities `lp` and the partial bytes `b` that the
text has already committed *inside* the next token, a query returns

* `cont_lp[c]` (c < 256): logsumexp of `lp[t]` over tokens whose bytes start with `b + c`;
* `cont_lp[256]`: logsumexp over the stop tokens, only when `b == b""` (else -inf);
* `exact_lp[c]`: `lp` of the primary token whose bytes equal `b + c` (-inf if none): the
  weight of the new tree node that completing that token creates.

About 2 KB per query instead of a full-vocabulary vector.  The work is one pass over the
tokens starting with `b` in the table's byte-sorted order (`prepare` gathers `lp` into that
order once per path, so repeated queries on one path are slices).  The worst case, `b == b""`,
touches the whole vocabulary; it is also the one query every new path gets, so `Prepared`
caches it.

Oracles: `LogprobModel` is anything that maps token paths to full next-token log-probability
vectors (a model, or a test stand-in); `ReductionOracle` answers reduction queries, which is
the interface the covering tree uses; `LocalReductionOracle` builds the latter from the former
with an LRU of prepared paths, which is what a worker runs next to its model.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple, Protocol

import numpy as np
from numpy.typing import NDArray

from service.bytelevel.byte_tables import TokenByteTable

Path = tuple[int, ...]
F64 = NDArray[np.float64]
NEG_INF = -math.inf
# Below this a float64 exp-sum has lost precision to underflow; such segments are redone
# with their own maximum (rare: only buckets far below the path's best token).
_UNDERFLOW = 1e-280


@dataclass(frozen=True, slots=True)
class Reduction:
    cont_lp: F64  # shape (257,)
    exact_lp: F64  # shape (256,)


class ReductionQuery(NamedTuple):
    path: Path
    partial: bytes


class LogprobModel(Protocol):
    """Full next-token log-probabilities (natural log, normalized) for a batch of paths."""

    def logprobs(self, paths: Sequence[Path]) -> list[NDArray[np.floating]]: ...


class ReductionOracle(Protocol):
    """Answers a batch of reduction queries: one round trip per byte per model."""

    def reduce(self, queries: Sequence[ReductionQuery]) -> list[Reduction]: ...


class Prepared:
    """One path's distribution in the table's byte-sorted order, plus its `b == b""` answer."""

    __slots__ = ("sorted_lp", "stop_lp", "_root")

    def __init__(self, table: TokenByteTable, logprobs: NDArray[np.floating]) -> None:
        if logprobs.shape != (table.vocab_size,) and logprobs.shape[0] < table.vocab_size:
            raise ValueError(f"expected {table.vocab_size} logprobs, got {logprobs.shape}")
        # float64 from here on: the sums over hundreds of thousands of tokens need it.
        self.sorted_lp: F64 = logprobs[table.sorted_ids].astype(np.float64)
        stops = logprobs[table.stop_ids].astype(np.float64)
        self.stop_lp = _lse(stops)
        self._root: Reduction | None = None

    def root(self, table: TokenByteTable) -> Reduction:
        if self._root is None:
            self._root = _reduce_sorted(table, self, b"")
        return self._root


def prepare(table: TokenByteTable, logprobs: NDArray[np.floating]) -> Prepared:
    return Prepared(table, logprobs)


def reduce_prepared(table: TokenByteTable, prepared: Prepared, partial: bytes) -> Reduction:
    """The reduction of one prepared path for partial bytes `partial`."""
    if not partial:
        return prepared.root(table)
    return _reduce_sorted(table, prepared, partial)


def reduce_logprobs(
    table: TokenByteTable, logprobs: NDArray[np.floating], partial: bytes
) -> Reduction:
    """One-shot convenience: prepare and reduce."""
    return reduce_prepared(table, Prepared(table, logprobs), partial)


def _lse(values: F64) -> float:
    if values.size == 0:
        return NEG_INF
    m = float(values.max())
    if m == NEG_INF:
        return NEG_INF
    return m + math.log(float(np.exp(values - m).sum()))


def segment_lse(values: F64, bounds: NDArray[np.int64]) -> F64:
    """logsumexp of values[bounds[i]:bounds[i+1]] for each i (empty segments give -inf)."""
    out = np.full(len(bounds) - 1, NEG_INF)
    nonempty = np.diff(bounds) > 0
    if not nonempty.any():
        return out
    lo, hi = int(bounds[0]), int(bounds[-1])
    seg = values[lo:hi]
    # One shared shift instead of a per-segment maximum: a single exp pass over the slice.
    m = float(seg.max())
    if m == NEG_INF:
        return out
    owners = np.flatnonzero(nonempty)
    # Empty segments are left out of `starts`; each sum then runs to the next nonempty start,
    # which is exactly its own end because the skipped segments have no elements.
    sums = np.add.reduceat(np.exp(seg - m), bounds[:-1][nonempty] - lo)
    with np.errstate(divide="ignore"):
        logs = np.log(sums) + m
    for w in np.flatnonzero(sums < _UNDERFLOW):
        k = owners[w]
        logs[w] = _lse(values[bounds[k] : bounds[k + 1]])
    out[nonempty] = logs
    return out


def _reduce_sorted(table: TokenByteTable, prep: Prepared, partial: bytes) -> Reduction:
    exact = np.full(256, NEG_INF)
    cont = np.full(257, NEG_INF)
    k = len(partial)
    if k == 0:
        bounds = table.first_byte_bounds
        cont[:256] = segment_lse(prep.sorted_lp, bounds)
        has = table.single_byte_pos >= 0
        exact[has] = prep.sorted_lp[table.single_byte_pos[has]]
        cont[256] = prep.stop_lp
        return Reduction(cont, exact)
    lo, hi = table.prefix_range(partial)
    if lo == hi:
        return Reduction(cont, exact)
    # Tokens equal to `partial` sort first in the range; they belong to the parent's exact.
    lens = table.sorted_lens[lo:hi]
    skip = int(np.searchsorted(lens != k, True))  # first index whose length differs
    first = lo + skip
    if first == hi:
        return Reduction(cont, exact)
    if k == 1:
        bounds = table.second_byte_bounds[partial[0]]
    else:
        column = table.byte_at(first, hi, k)  # sorted, since the range shares `partial`
        bounds = np.empty(257, dtype=np.int64)
        bounds[:256] = first + np.searchsorted(column, np.arange(256), side="left")
        bounds[256] = hi
    vals = prep.sorted_lp[first:hi]
    cont[:256] = segment_lse(vals, bounds - first)
    # The primary token equal to partial + c, if present, sits at the start of bucket c.
    starts = bounds[:256]
    nonempty = starts < bounds[1:]
    cand = starts[nonempty]
    is_exact = table.sorted_lens[cand] == k + 1
    exact_idx = np.flatnonzero(nonempty)[is_exact]
    exact[exact_idx] = prep.sorted_lp[cand[is_exact]]
    return Reduction(cont, exact)


class LocalReductionOracle:
    """A `ReductionOracle` over a `LogprobModel`: batches the uncached paths of each call into
    one `logprobs` call and keeps an LRU of prepared paths (what a worker does in-process)."""

    def __init__(
        self, table: TokenByteTable, model: LogprobModel, *, max_paths: int = 4096
    ) -> None:
        self.table = table
        self.model = model
        self.max_paths = max_paths
        self.forwards = 0  # distinct paths sent to the model: the cost that matters
        self.calls = 0
        self._cache: OrderedDict[Path, Prepared] = OrderedDict()

    def reduce(self, queries: Sequence[ReductionQuery]) -> list[Reduction]:
        self.calls += 1
        missing = list(dict.fromkeys(q.path for q in queries if q.path not in self._cache))
        if missing:
            self.forwards += len(missing)
            for path, lp in zip(missing, self.model.logprobs(missing), strict=True):
                self._cache[path] = Prepared(self.table, lp)
        out = []
        for q in queries:
            prep = self._cache[q.path]
            self._cache.move_to_end(q.path)
            out.append(reduce_prepared(self.table, prep, q.partial))
        while len(self._cache) > self.max_paths:
            self._cache.popitem(last=False)
        return out
