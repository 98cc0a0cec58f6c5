"""Incremental UTF-8 well-formedness, shared by the covering tree and the byte sampler.

Byte-level models can emit ill-formed UTF-8 (a continuation byte at a character start, an
overlong lead byte, a surrogate).  Two places care: the covering tree may only check
canonicality and allow "stop" where the text so far is complete, well-formed UTF-8, and the
sampler may mask bytes that would make the text ill-formed.  Both use this one automaton,
which follows the Unicode well-formed byte sequence table (Unicode 15, table 3-7).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

# (lo, hi) inclusive range allowed for the FIRST continuation byte after each lead byte;
# later continuation bytes are always 0x80..0xBF.  The tight ranges exclude overlongs
# (E0, F0), surrogates (ED) and code points above U+10FFFF (F4).
_FIRST_CONT: dict[int, tuple[int, int]] = {
    0xE0: (0xA0, 0xBF),
    0xED: (0x80, 0x9F),
    0xF0: (0x90, 0xBF),
    0xF4: (0x80, 0x8F),
}


def _lead_info(byte: int) -> tuple[int, int, int] | None:
    """For a lead byte: (continuation bytes needed, lo, hi of the first one); None if illegal."""
    if byte < 0x80:
        return (0, 0, 0)
    if 0xC2 <= byte <= 0xDF:
        return (1, 0x80, 0xBF)
    if 0xE0 <= byte <= 0xEF:
        lo, hi = _FIRST_CONT.get(byte, (0x80, 0xBF))
        return (2, lo, hi)
    if 0xF0 <= byte <= 0xF4:
        lo, hi = _FIRST_CONT.get(byte, (0x80, 0xBF))
        return (3, lo, hi)
    return None  # 0x80..0xC1 and 0xF5..0xFF never start a character


@dataclass(frozen=True, slots=True)
class Utf8State:
    """Where a byte stream stands: `need` continuation bytes still due, the allowed range of
    the next one, and whether the stream has already gone ill-formed (which is permanent)."""

    need: int = 0
    lo: int = 0x80
    hi: int = 0xBF
    broken: bool = False

    @property
    def complete(self) -> bool:
        """True when everything so far is well-formed and no character is half-written."""
        return self.need == 0 and not self.broken

    def push(self, byte: int) -> Utf8State:
        if self.broken:
            return self
        if self.need:
            if not self.lo <= byte <= self.hi:
                return Utf8State(broken=True)
            return Utf8State(need=self.need - 1)
        info = _lead_info(byte)
        if info is None:
            return Utf8State(broken=True)
        need, lo, hi = info
        return Utf8State(need=need, lo=lo, hi=hi)

    def allowed(self) -> NDArray[np.bool_]:
        """Mask over 257 outcomes (256 bytes + stop) that keep the stream well-formed."""
        mask = np.zeros(257, dtype=bool)
        if self.broken:
            mask[:] = True  # nothing can repair it; do not constrain further
            return mask
        if self.need:
            mask[self.lo : self.hi + 1] = True
            return mask
        mask[_LEGAL_LEADS] = True
        mask[256] = True
        return mask


_LEGAL_LEADS = np.array([b for b in range(256) if _lead_info(b) is not None], dtype=np.int64)


def is_complete(data: bytes) -> bool:
    """`data` is complete, well-formed UTF-8 (cheaper than the automaton for long strings)."""
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True
