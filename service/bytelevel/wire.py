"""Reductions on the wire: the worker's `/internal/byte-dist` answer <-> `Reduction`.

Shared by the worker (which answers), the gateway's ensemble runner and the offline eval (which
ask), so each side reads and writes the same form."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

from service.bytelevel.reduction import Reduction, ReductionQuery
from service.errors import UpstreamError
from service.protocol.internal import ByteDistResult, ByteQuery

# ByteDistRequest allows at most this many queries; longer batches (a re-opened prompt tail)
# go out as several requests at once.
MAX_QUERIES_PER_CALL = 512
NEG_INF = -math.inf


def to_wire(queries: Sequence[ReductionQuery]) -> list[ByteQuery]:
    return [ByteQuery(token_ids=list(q.path), partial=q.partial.hex()) for q in queries]


def from_wire(result: ByteDistResult) -> Reduction:
    """A worker's answer as a `Reduction`; malformed answers are the worker's fault (502)."""
    if len(result.cont_lp) != 257:
        raise UpstreamError(f"byte-dist answered {len(result.cont_lp)} values, expected 257")
    cont = np.asarray(result.cont_lp, dtype=np.float64)
    exact = np.full(256, NEG_INF)
    for byte, (_token, logprob) in result.exact.items():
        if not 0 <= int(byte) < 256:
            raise UpstreamError(f"byte-dist answered an exact entry for byte {byte}")
        exact[int(byte)] = logprob
    if np.isnan(cont).any() or np.isnan(exact).any():
        raise UpstreamError("byte-dist answered NaN")
    return Reduction(cont, exact)


def to_result(
    table_exact_id: Callable[[bytes], int | None], partial: bytes, reduction: Reduction
) -> ByteDistResult:
    """The wire form of a reduction (what a worker answers; also the fake workers in tests).
    `table_exact_id` is `TokenByteTable.exact_id`: the token the exact entries name."""
    exact: dict[int, list[float]] = {}
    for byte in np.flatnonzero(np.isfinite(reduction.exact_lp)).tolist():
        token = table_exact_id(partial + bytes([byte]))
        if token is not None:
            exact[byte] = [float(token), float(reduction.exact_lp[byte])]
    return ByteDistResult(cont_lp=reduction.cont_lp.tolist(), exact=exact)
