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
from typing import Literal

import numpy as np
from numpy.typing import NDArray

from service.bytelevel.mixing import log_normalize
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
