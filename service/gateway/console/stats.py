"""What the console shows live: per-node request counters and latency, and recent routing
decisions. In memory, per gateway process, bounded: per-second buckets over a sliding window,
at most `latency_samples` latencies per node, at most `max_decisions` decisions, and series only
for the ids the graph defines (so a client cannot grow memory with made-up model names).
With shared state (OCTOGRAPH_REDIS_URL) every event is also handed to the deployment's feed
(service/gateway/shared/console_feed.py), and this view is what the console falls back to.

Prometheus (/metrics) stays the source for dashboards and alerts; this is the small, immediate
view a person opening /console wants without running a Prometheus server.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, TypeVar

from service.errors import ServiceError
from service.gateway.routing import RouteResult

if TYPE_CHECKING:
    from service.gateway.shared.console_feed import ConsoleFeed

Outcome = Literal["ok", "client_error", "error", "cancelled"]
T = TypeVar("T")

FALLBACK_PREFIX = "fallback:"  # how the pipeline marks a fallback hop in the route


@dataclass(frozen=True)
class Decision:
    """One routing decision as the console lists it."""

    at: float  # wall-clock (unix) seconds, for display
    start: str
    route: tuple[str, ...]
    scores: tuple[dict[str, float], ...]
    node: str
    seconds: float
    reformatted_query: str | None


@dataclass(frozen=True)
class NodeSnapshot:
    node: str
    requests_window: int
    errors_window: int
    requests_total: int
    errors_total: int
    p50_s: float | None
    p99_s: float | None


@dataclass
class _Bucket:
    second: int
    requests: int = 0
    errors: int = 0


@dataclass
class _Series:
    """One node's counters: per-second buckets for rates, a ring of recent latencies."""

    buckets: deque[_Bucket]
    latencies: deque[tuple[float, float]]  # (monotonic time, seconds)
    requests_total: int = 0
    errors_total: int = 0

    def add(self, now: float, seconds: float | None, error: bool) -> None:
        second = int(now)
        if not self.buckets or self.buckets[-1].second != second:
            self.buckets.append(_Bucket(second))
        bucket = self.buckets[-1]
        bucket.requests += 1
        bucket.errors += int(error)
        self.requests_total += 1
        self.errors_total += int(error)
        if seconds is not None:
            self.latencies.append((now, seconds))


def percentile(sorted_values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile (q in [0, 1]) of an already sorted sequence."""
    if not sorted_values:
        return None
    rank = max(1, min(len(sorted_values), math.ceil(q * len(sorted_values))))
    return sorted_values[rank - 1]


def classify(exc: BaseException | None, *, deadline_passed: bool = False) -> Outcome:
    """How a finished request counts: server-side failures are errors (they say something about
    the node's health); refused requests (4xx) are not; a client hanging up is neither."""
    if exc is None:
        return "ok"
    if isinstance(exc, ServiceError):
        return "error" if exc.status >= 500 else "client_error"
    if isinstance(exc, asyncio.CancelledError | GeneratorExit):
        # asyncio.timeout() surfaces as a cancellation inside the stream: that one is an error.
        return "error" if deadline_passed else "cancelled"
    return "error"


class ConsoleStats:
    def __init__(
        self,
        ids: Iterable[str],
        *,
        window_s: float = 60.0,
        latency_samples: int = 1024,
        max_decisions: int = 200,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        feed: ConsoleFeed | None = None,
    ) -> None:
        self.window_s = window_s
        # With shared state (OCTOGRAPH_REDIS_URL): every event also goes to the deployment's
        # view (buffered there, flushed off the request path); this view stays the fallback.
        self.feed = feed
        self._clock = clock
        self._wall = wall_clock
        # One bucket per second of the window (+1 for the partial current second).
        slots = int(window_s) + 1
        self._series = {i: _Series(deque(maxlen=slots), deque(maxlen=latency_samples)) for i in ids}
        self._latency_samples = latency_samples  # per series, also for ids tracked later
        self._decisions: deque[Decision] = deque(maxlen=max_decisions)

    def track(self, ids: Iterable[str]) -> None:
        """Series for exactly these ids (a reloaded graph's): new ids start empty, the ids
        both graphs have keep their history, the others are dropped (memory stays bounded by
        the graph)."""
        wanted = list(ids)
        if set(wanted) == set(self._series):
            return
        slots = int(self.window_s) + 1
        self._series = {
            i: self._series.get(i)
            or _Series(deque(maxlen=slots), deque(maxlen=self._latency_samples))
            for i in wanted
        }

    # -- recording (hot path: O(1), no I/O) --------------------------------------------------

    def record_decision(self, result: RouteResult) -> None:
        """A finished routing pass. Every router on the route counts one request (latency: the
        whole routing time, which is what a client waits for before the first token)."""
        if not result.scores:
            return  # addressed a model node directly: nothing was decided
        route = tuple(h for h in result.route if not h.startswith(FALLBACK_PREFIX))
        made = Decision(
            at=self._wall(),
            start=route[0],
            route=route,
            scores=tuple(dict(s) for s in result.scores),
            node=result.node,
            seconds=result.seconds,
            reformatted_query=result.reformatted_query,
        )
        self._decisions.append(made)
        if self.feed is not None:
            self.feed.decision(made)
        now = self._clock()
        for router in route[: len(result.scores)]:
            self._add(router, now, result.seconds, error=False)

    def record_request(
        self, node: str, seconds: float, outcome: Outcome, route: Sequence[str] = ()
    ) -> None:
        """A request that ran (or tried to run) on `node`, `seconds` after it arrived."""
        now = self._clock()
        for i, hop in enumerate(route):
            # `[..., math, fallback:general]`: math failed before general answered.
            if hop.startswith(FALLBACK_PREFIX) and i > 0:
                self._add(route[i - 1], now, None, error=True)
        self._add(node, now, seconds if outcome == "ok" else None, error=outcome == "error")

    def _add(self, node: str, now: float, seconds: float | None, *, error: bool) -> None:
        series = self._series.get(node)
        if series is not None:
            series.add(now, seconds, error)
            if self.feed is not None:
                self.feed.count(node, seconds, error=error)

    # -- reading ------------------------------------------------------------------------------

    @property
    def ids(self) -> list[str]:
        return list(self._series)

    def node(self, node: str) -> NodeSnapshot:
        series = self._series[node]
        now = self._clock()
        oldest = now - self.window_s
        # Whole seconds: the current (partial) one and the window_s - 1 before it.
        in_window = [b for b in series.buckets if int(now) - b.second < self.window_s]
        lats = sorted(s for t, s in series.latencies if t > oldest)
        return NodeSnapshot(
            node=node,
            requests_window=sum(b.requests for b in in_window),
            errors_window=sum(b.errors for b in in_window),
            requests_total=series.requests_total,
            errors_total=series.errors_total,
            p50_s=percentile(lats, 0.50),
            p99_s=percentile(lats, 0.99),
        )

    def decisions(self, node: str | None = None, limit: int | None = None) -> list[Decision]:
        """Newest first; with `node`, only the decisions whose route passes through it."""
        out: list[Decision] = []
        for d in reversed(self._decisions):
            if node is None or node in d.route:
                out.append(d)
                if limit is not None and len(out) >= limit:
                    break
        return out
