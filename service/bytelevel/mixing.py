"""Combining members' next-byte distributions (each a 257-vector of log-probabilities: 256
bytes + stop), all in natural-log space and returning normalized log-vectors.

* `mix`: weighted mixture in probability space, sum_m w_m p_m (the papers' default).  By
  concavity of log, -log sum_m w_m p_m(b) <= sum_m w_m (-log p_m(b)) at every byte: the
  mixture is never worse than the members' weighted mean loss.
* `product`: weighted product of experts, prod_m p_m^w_m renormalized; sharper where members
  agree, and a member giving a byte probability 0 vetoes it.
* `AdaptiveMixer`: Bayesian model averaging.  The weights are the posterior
  w_m ∝ prior_m * P_m(bytes so far), updated after every byte (prompt bytes included), so a
  weak member fades instead of dragging the ensemble down.  Its total loss is at most the
  best member's plus log(1 / prior_best) (log M for a uniform prior).  With `alpha` > 0 it
  is fixed-share (Herbster & Warmuth): after each update a fraction alpha of the weight is
  spread uniformly, which lets the weights follow a best member that changes over the text
  at a cost of about log(1/(1-alpha)) nats per byte.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from numpy.typing import ArrayLike, NDArray

F64 = NDArray[np.float64]


def _as_matrix(logps: Sequence[ArrayLike] | ArrayLike) -> F64:
    mat = np.asarray(logps, dtype=np.float64)
    if mat.ndim != 2 or mat.shape[1] != 257:
        raise ValueError(f"expected (members, 257) log-probabilities, got {mat.shape}")
    return mat


def _weights(weights: ArrayLike | None, members: int) -> F64:
    if weights is None:
        return np.full(members, 1.0 / members)
    w: F64 = np.asarray(weights, dtype=np.float64)
    if w.shape != (members,) or (w < 0).any() or not np.isfinite(w).all() or w.sum() <= 0:
        raise ValueError("weights must be finite, non-negative, one per member, not all zero")
    normalized: F64 = w / w.sum()
    return normalized


def log_normalize(logits: F64) -> F64:
    """Shift a log-vector so that its probabilities sum to 1 (all -inf stays all -inf)."""
    m = float(np.max(logits))
    if m == -math.inf:
        return logits.copy()
    return logits - (m + math.log(float(np.exp(logits - m).sum())))


def _logsumexp_rows(mat: F64) -> F64:
    m = mat.max(axis=0)
    safe = np.where(np.isfinite(m), m, 0.0)
    with np.errstate(divide="ignore"):
        out: F64 = np.log(np.exp(mat - safe).sum(axis=0)) + safe
    return out


def mix(logps: Sequence[ArrayLike] | ArrayLike, weights: ArrayLike | None = None) -> F64:
    """log sum_m w_m p_m, weights normalized (uniform when None)."""
    mat = _as_matrix(logps)
    w = _weights(weights, mat.shape[0])
    with np.errstate(divide="ignore"):
        logw = np.log(w)
    return log_normalize(_logsumexp_rows(mat + logw[:, None]))


def product(logps: Sequence[ArrayLike] | ArrayLike, weights: ArrayLike | None = None) -> F64:
    """log of prod_m p_m^w_m renormalized (weights normalized to sum to 1)."""
    mat = _as_matrix(logps)
    w = _weights(weights, mat.shape[0])
    # 0 * -inf is nan: a zero-weight member must not veto anything.
    terms = np.where(w[:, None] > 0, mat * w[:, None], 0.0)
    return log_normalize(terms.sum(axis=0))


class AdaptiveMixer:
    """Bayesian model averaging over members, optionally with fixed-share (`alpha`)."""

    def __init__(self, members: int, prior: ArrayLike | None = None, alpha: float = 0.0) -> None:
        if members < 1:
            raise ValueError("need at least one member")
        if not 0.0 <= alpha < 1.0:
            raise ValueError("alpha must be in [0, 1)")
        self.members = members
        self.alpha = alpha
        with np.errstate(divide="ignore"):
            self._logw: F64 = np.log(_weights(prior, members))
        self.loss = 0.0  # total -log p of the bytes seen, under the mixture

    @property
    def weights(self) -> F64:
        return np.exp(self._logw)

    def combine(self, logps: Sequence[ArrayLike] | ArrayLike) -> F64:
        """The mixture with the current posterior weights."""
        mat = _as_matrix(logps)
        return log_normalize(_logsumexp_rows(mat + self._logw[:, None]))

    def update(self, logps: Sequence[ArrayLike] | ArrayLike, outcome: int) -> float:
        """Observe `outcome` (0..256) given the members' distributions at this step; returns
        the mixture's log-probability of it (before the update)."""
        mat = _as_matrix(logps)
        lp = float(self.combine(mat)[outcome])
        post = self._logw + mat[:, outcome]
        total = float(_logsumexp_rows(post[:, None])[0])
        if total == -math.inf:
            raise ValueError("every member gives this outcome probability zero")
        post = post - total
        if self.alpha > 0.0:
            shared = math.log(self.alpha / self.members)
            post = np.logaddexp(post + math.log1p(-self.alpha), shared)
        self._logw = post
        self.loss -= lp
        return lp
