"""Stop strings on a text stream: text that might be the start of a stop string is held back
until it is known not to be, so a client never sees part of a stop string."""

from __future__ import annotations

from collections.abc import Sequence


class StopMatcher:
    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self._held = ""
        self.stopped = False

    def push(self, text: str) -> str:
        """Feed released text; returns what may be emitted now.  After a stop string is seen,
        `stopped` is True and the text before it is what comes back."""
        if self.stopped:
            return ""
        if not self.stops:
            return text
        held = self._held + text
        hits = [held.find(s) for s in self.stops if s in held]
        if hits:
            self.stopped = True
            self._held = ""
            return held[: min(hits)]
        keep = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(held)), 0, -1):
                if held.endswith(s[:k]):
                    keep = max(keep, k)
                    break
        self._held = held[len(held) - keep :] if keep else ""
        return held[: len(held) - keep]

    def flush(self) -> str:
        """End of stream: what was held back was not a stop string after all."""
        out, self._held = self._held, ""
        return "" if self.stopped else out
