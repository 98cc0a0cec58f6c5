"""Byte-level sampling after mixing, UTF-8 safe streaming, and the ensemble byte loop.

Order of operations per byte (ByteSampler, Phan et al.): members' next-byte distributions ->
mix -> optional UTF-8 mask -> temperature -> top-p -> sample.  Temperature and top-p act on
the mixed *byte* distribution, so they are not the token-level knobs of the same name: a
byte-level temperature sharpens each byte decision, top-p truncates among 257 outcomes.

UTF-8: `Utf8Buffer` holds bytes until they complete a character, so a client never receives
half a character.  With `mask_utf8` the sampler also removes, before sampling, every byte the
UTF-8 automaton forbids after the pending bytes (and stop inside a character), then
renormalizes.  Masking conditions each step on well-formedness, which is not the same as
conditioning the whole text on it (that would need lookahead), but it never produces an
ill-formed string.  Without the mask an ill-formed sequence is streamed as U+FFFD.

Stop: index 256.  The members only give it mass at character boundaries; stop strings are the
caller's job (it sees the streamed text).
"""

from __future__ import annotations

import codecs
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from numpy.typing import ArrayLike, NDArray

from service.bytelevel.covering import CoveringTree
from service.bytelevel.mixing import AdaptiveMixer, log_normalize, mix, product
from service.bytelevel.utf8 import Utf8State

F64 = NDArray[np.float64]
STOP = 256
MixMode = Literal["mix", "product", "adaptive"]


def apply_temperature(logp: F64, temperature: float) -> F64:
    """p^(1/T) renormalized; T == 0 is greedy (all mass on the most likely outcome)."""
    if temperature < 0:
        raise ValueError("temperature must be >= 0")
    if temperature == 0:
        out = np.full_like(logp, -math.inf)
        out[int(np.argmax(logp))] = 0.0
        return out
    return log_normalize(logp / temperature)


def apply_top_p(logp: F64, top_p: float) -> F64:
    """Keep the smallest set of most likely outcomes whose mass reaches `top_p`."""
    if not 0.0 < top_p <= 1.0:
        raise ValueError("top_p must be in (0, 1]")
    if top_p >= 1.0:
        return logp
    order = np.argsort(-logp, kind="stable")
    cum = np.cumsum(np.exp(logp[order]))
    keep = int(np.searchsorted(cum, top_p, side="left")) + 1
    out = np.full_like(logp, -math.inf)
    out[order[:keep]] = logp[order[:keep]]
    return log_normalize(out)


def mask_utf8(logp: F64, state: Utf8State) -> F64:
    """Remove outcomes that would make the byte stream ill-formed; renormalize."""
    allowed = state.allowed()
    out = np.where(allowed, logp, -math.inf)
    if not np.isfinite(out).any():
        raise ValueError("no well-formed continuation has any probability")
    return log_normalize(out)


class ByteSampler:
    """Seeded sampler over 257 outcomes (see the module docstring for the order of steps)."""

    def __init__(
        self,
        *,
        temperature: float = 1.0,
        top_p: float = 1.0,
        seed: int | None = None,
        mask_utf8: bool = True,
    ) -> None:
        apply_temperature(np.zeros(1), temperature)  # validate early
        if not 0.0 < top_p <= 1.0:
            raise ValueError("top_p must be in (0, 1]")
        self.temperature = temperature
        self.top_p = top_p
        self.mask = mask_utf8
        self.rng = np.random.default_rng(seed)

    def distribution(self, logp: F64, state: Utf8State | None = None) -> F64:
        """The final sampling distribution (log) for a mixed 257-vector."""
        out = mask_utf8(logp, state or Utf8State()) if self.mask else logp
        return apply_top_p(apply_temperature(out, self.temperature), self.top_p)

    def sample(self, logp: F64, state: Utf8State | None = None) -> int:
        probs = np.exp(self.distribution(logp, state))
        probs /= probs.sum()
        return int(self.rng.choice(257, p=probs))


class Utf8Buffer:
    """Turns a byte stream into complete characters; never emits half a character."""

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.state = Utf8State()
        self.dropped = 0  # bytes of an unfinished character discarded by `flush`

    @property
    def pending(self) -> bytes:
        return bytes(self._decoder.getstate()[0])

    def push(self, byte: int) -> str:
        self.state = self.state.push(byte)
        if self.state.broken:
            self.state = Utf8State()  # the decoder replaced the bad bytes; start afresh
        return str(self._decoder.decode(bytes([byte])))

    def flush(self) -> str:
        """End of stream: an unfinished character is dropped, not emitted broken."""
        self.dropped += len(self.pending)
        self._decoder.reset()
        self.state = Utf8State()
        return ""


@dataclass(slots=True)
class StepResult:
    outcome: int  # byte value, or STOP
    logprob: float  # under the mixed distribution, before temperature/top-p
    text: str  # complete characters released by this step


class ByteEnsemble:
    """Members' covering trees + a combination rule: the gateway's per-request byte loop."""

    def __init__(
        self,
        trees: Sequence[CoveringTree],
        *,
        mode: MixMode = "mix",
        weights: ArrayLike | None = None,
        alpha: float = 0.0,
    ) -> None:
        if not trees:
            raise ValueError("an ensemble needs at least one member")
        if mode not in ("mix", "product", "adaptive"):
            raise ValueError(f"unknown mixing mode {mode!r}")
        self.trees = list(trees)
        self.mode: MixMode = mode
        self.weights = weights
        self.adaptive = AdaptiveMixer(len(trees), weights, alpha) if mode == "adaptive" else None
        self.buffer = Utf8Buffer()
        self.finished = False

    def member_logprobs(self) -> F64:
        """(members, 257) next-byte log-probabilities (one oracle call per member)."""
        return np.stack([t.next_byte_logprobs() for t in self.trees])

    def combine(self, member_lps: F64) -> F64:
        if self.adaptive is not None:
            return self.adaptive.combine(member_lps)
        if self.mode == "product":
            return product(member_lps, self.weights)
        return mix(member_lps, self.weights)

    def next_byte_logprobs(self) -> F64:
        return self.combine(self.member_logprobs())

    def _advance(self, member_lps: F64, byte: int) -> float:
        lp = float(self.combine(member_lps)[byte])
        if self.adaptive is not None:
            self.adaptive.update(member_lps, byte)
        for tree in self.trees:
            tree.advance(byte)
        return lp

    def observe(self, data: bytes) -> F64:
        """Teacher-force `data` (e.g. the prompt's bytes): members advance, adaptive weights
        learn from it, and nothing is streamed.  Returns the mixture's log-prob per byte."""
        for tree in self.trees:
            tree.prefetch(data)
        out = np.empty(len(data))
        for i, byte in enumerate(data):
            out[i] = self._advance(self.member_logprobs(), byte)
        return out

    def step(self, sampler: ByteSampler) -> StepResult:
        if self.finished:
            raise RuntimeError("the stream has already stopped")
        member_lps = self.member_logprobs()
        mixed = self.combine(member_lps)
        outcome = sampler.sample(mixed, self.buffer.state)
        if outcome == STOP:
            self.finished = True
            if self.adaptive is not None:
                self.adaptive.update(member_lps, STOP)
            return StepResult(STOP, float(mixed[STOP]), self.buffer.flush())
        lp = self._advance(member_lps, outcome)
        return StepResult(outcome, lp, self.buffer.push(outcome))

    def generate(self, sampler: ByteSampler, max_bytes: int) -> Iterator[str]:
        """Stream complete characters until stop or `max_bytes` bytes."""
        for _ in range(max_bytes):
            result = self.step(sampler)
            if result.text:
                yield result.text
            if result.outcome == STOP:
                return
        self.buffer.flush()
