"""A brute-force byte-bucket reduction for tests: walks the vocabulary token by token (no sorted
ranges, no shared code with service.bytelevel.reduction), in float64."""

from __future__ import annotations

import weakref

import numpy as np
from numpy.typing import NDArray

from service.bytelevel.byte_tables import TokenByteTable

_token_bytes: weakref.WeakKeyDictionary[TokenByteTable, list[bytes | None]] = (
    weakref.WeakKeyDictionary()
)


def _all_token_bytes(table: TokenByteTable) -> list[bytes | None]:
    """Bytes of every id; None for special tokens (they produce no bytes)."""
    cached = _token_bytes.get(table)
    if cached is None:
        cached = [
            None if table.is_special(t) else table.token_bytes(t) for t in range(table.vocab_size)
        ]
        _token_bytes[table] = cached
    return cached


def reference_reduction(
    table: TokenByteTable, lp: NDArray[np.floating], partial: bytes
) -> tuple[NDArray[np.float64], dict[int, tuple[int, float]]]:
    """(cont_lp[257], exact) for next-token log-probabilities `lp` indexed by token id.

    cont_lp[c]: logsumexp of lp over tokens whose bytes start with partial + c; cont_lp[256]:
    logsumexp over stop tokens when partial is empty (else -inf). exact[c]: the primary token
    equal to partial + c (the table's choice among duplicates) and its lp.
    """
    lp64 = np.asarray(lp, dtype=np.float64)
    k = len(partial)
    ids: list[int] = []
    nexts: list[int] = []
    for t, data in enumerate(_all_token_bytes(table)):
        if data is not None and len(data) > k and data.startswith(partial):
            ids.append(t)
            nexts.append(data[k])
    cont = np.full(257, -np.inf)
    id_arr = np.array(ids, dtype=np.int64)
    next_arr = np.array(nexts, dtype=np.int64)
    for c in np.unique(next_arr):
        cont[c] = np.logaddexp.reduce(lp64[id_arr[next_arr == c]])
    if not partial and len(table.stop_ids):
        cont[256] = np.logaddexp.reduce(lp64[np.asarray(table.stop_ids, dtype=np.int64)])
    exact: dict[int, tuple[int, float]] = {}
    for c in range(256):
        token_id = table.exact_id(partial + bytes([c]))
        if token_id is not None and lp64[token_id] > -np.inf:
            exact[c] = (token_id, float(lp64[token_id]))
    return cont, exact


def renormalised(row: NDArray[np.floating]) -> NDArray[np.float64]:
    """A float32 log_softmax row made to sum to 1 in float64, as the worker reduces it."""
    lp = np.asarray(row, dtype=np.float64)
    return lp - np.logaddexp.reduce(lp)
