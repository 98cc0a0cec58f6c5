"""The console's deployment-wide view: every gateway replica publishes what its ConsoleStats
records into one Redis, and the console API of any replica reads the merged view back.

Publishing never touches a request's path: ConsoleStats hands each event to `decision()` /
`count()` (synchronous, O(1), no I/O), which add it to bounded buffers; a background task sends
what accumulated every `flush_interval_s` in one pipeline. An event that finds its buffer full,
or whose flush fails, is dropped and counted (`octograph_console_feed_dropped`): the view is a
picture for people, not an account. Reading is one pipeline per console poll.

Keys (under `octograph:console:`), each bounded and expiring:

- `decisions`: a stream of the last `max_decisions` routing decisions (XADD with an exact
  MAXLEN: at 200 entries exact trimming costs little, and the bound is the number promised);
  it expires `idle_ttl_s` after the last write.
- `s:<unix second>`: a hash per wall-clock second, fields `r:<node>` (requests) and `e:<node>`
  (errors); it expires `window_s + margin_s` after its last write.
- `lat:<node>`: a list of recent latencies, `"<unix time> <seconds>"`, newest first, trimmed to
  `latency_samples`; it expires `window_s + margin_s` after its last write.
- `totals`: a hash of requests and errors per node since the keys were created; it expires
  `idle_ttl_s` after the last write.

Replicas bucket by their own wall clock: clocks a second apart move a count to the next bucket.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from redis.exceptions import RedisError

from service.gateway.console.stats import Decision, NodeSnapshot, percentile
from service.observability.metrics import GatewayMetrics

if TYPE_CHECKING:
    from redis.asyncio import Redis
    from redis.typing import EncodableT, FieldT

log = logging.getLogger(__name__)

PREFIX = "octograph:console:"
DECISIONS_KEY = PREFIX + "decisions"
TOTALS_KEY = PREFIX + "totals"
FLUSH_INTERVAL_S = 0.25
IDLE_TTL_S = 3600  # a deployment idle this long forgets its decisions and totals
MARGIN_S = 5  # buckets outlive the window by this much (a late flush, a clock a bit behind)
MAX_PENDING_EVENTS = 4096  # counter increments or latency samples waiting for one flush
PUBLISH_OPERATION = "console_publish"
READ_OPERATION = "console_read"
# What a Redis call can raise besides RedisError: a socket error, our own overall deadline.
REDIS_FAILURES = (RedisError, OSError, TimeoutError)


def bucket_key(second: int) -> str:
    return f"{PREFIX}s:{second}"


def latency_key(node: str) -> str:
    return f"{PREFIX}lat:{node}"


def encode_decision(d: Decision) -> str:
    return json.dumps(
        {
            "at": d.at,
            "start": d.start,
            "route": list(d.route),
            "scores": list(d.scores),
            "node": d.node,
            "seconds": d.seconds,
            "reformatted_query": d.reformatted_query,
        },
        separators=(",", ":"),
    )


def decode_decision(raw: str) -> Decision | None:
    """None for an entry this version cannot read (another version's, or damaged)."""
    try:
        obj = json.loads(raw)
        return Decision(
            at=float(obj["at"]),
            start=str(obj["start"]),
            route=tuple(str(h) for h in obj["route"]),
            scores=tuple({str(k): float(v) for k, v in s.items()} for s in obj["scores"]),
            node=str(obj["node"]),
            seconds=float(obj["seconds"]),
            reformatted_query=obj.get("reformatted_query"),
        )
    except (ValueError, KeyError, TypeError, AttributeError):
        return None


@dataclass(frozen=True)
class DeploymentView:
    """The merged view read from Redis; answers like ConsoleStats (`node`, `decisions`)."""

    window_s: float
    snapshots: dict[str, NodeSnapshot]
    recent: list[Decision]  # newest first

    def node(self, node: str) -> NodeSnapshot:
        return self.snapshots.get(node) or NodeSnapshot(node, 0, 0, 0, 0, None, None)

    def decisions(self, node: str | None = None, limit: int | None = None) -> list[Decision]:
        out = [d for d in self.recent if node is None or node in d.route]
        return out if limit is None else out[:limit]


class ConsoleFeed:
    """One per gateway process: the buffers, the flush task and the reader."""

    def __init__(
        self,
        redis: Redis,
        metrics: GatewayMetrics,
        *,
        window_s: float = 60.0,
        latency_samples: int = 1024,
        max_decisions: int = 200,
        timeout_s: float = 0.25,
        flush_interval_s: float = FLUSH_INTERVAL_S,
        idle_ttl_s: int = IDLE_TTL_S,
        margin_s: int = MARGIN_S,
        max_pending_events: int = MAX_PENDING_EVENTS,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.redis = redis
        self.metrics = metrics
        self.window_s = window_s
        self.latency_samples = latency_samples
        self.max_decisions = max_decisions
        # A pipeline is one round trip, but a slow server answers each command in turn: the
        # whole call gets a few socket timeouts, never more.
        self.deadline_s = timeout_s * 4
        self.flush_interval_s = flush_interval_s
        self.idle_ttl_s = idle_ttl_s
        self.bucket_ttl_s = math.ceil(window_s) + margin_s
        self.max_pending_events = max_pending_events
        self._wall = wall_clock
        self._decisions: deque[Decision] = deque()
        self._counts: dict[tuple[int, str], list[int]] = {}  # (second, node) -> [requests, errors]
        self._latencies: list[tuple[str, float, float]] = []  # (node, unix time, seconds)
        self._task: asyncio.Task[None] | None = None
        # The last flush / read worked: log once per change, not once per call.
        self._publishing = True
        self._reading = True

    # -- recording (hot path: O(1), no I/O) ----------------------------------------------------

    def decision(self, d: Decision) -> None:
        if len(self._decisions) >= self.max_decisions:
            self._decisions.popleft()  # older than the stream would keep anyway
            self._drop(1)
        self._decisions.append(d)

    def count(self, node: str, seconds: float | None, *, error: bool) -> None:
        now = self._wall()
        key = (int(now), node)
        cell = self._counts.get(key)
        if cell is None:
            if len(self._counts) >= self.max_pending_events:
                self._drop(1)
                return
            cell = self._counts[key] = [0, 0]
        cell[0] += 1
        cell[1] += int(error)
        if seconds is not None:
            if len(self._latencies) >= self.max_pending_events:
                self._drop(1)
            else:
                self._latencies.append((node, now, seconds))

    def _drop(self, n: int) -> None:
        if n:
            self.metrics.console_feed_dropped.inc(n)

    # -- publishing ----------------------------------------------------------------------------

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._flush_loop(), name="console-feed-flush")

    async def close(self) -> None:
        """Stop the loop and send what is left (bounded by the call's deadline)."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.flush()

    async def _flush_loop(self) -> None:
        while True:
            await asyncio.sleep(self.flush_interval_s)
            try:
                await self.flush()
            except Exception:  # a bug must not end publishing for the process's lifetime
                log.exception("console feed: flush failed")

    async def flush(self) -> bool:
        """Send what accumulated in one pipeline; False (and the batch dropped) on failure."""
        decisions, self._decisions = self._decisions, deque()
        counts, self._counts = self._counts, {}
        latencies, self._latencies = self._latencies, []
        if not (decisions or counts or latencies):
            return True
        pipe = self.redis.pipeline(transaction=False)
        for d in decisions:
            fields: dict[FieldT, EncodableT] = {"d": encode_decision(d)}
            pipe.xadd(DECISIONS_KEY, fields, maxlen=self.max_decisions, approximate=False)
        if decisions:
            pipe.expire(DECISIONS_KEY, self.idle_ttl_s)
        totals: dict[str, int] = {}
        for (second, node), (requests, errors) in counts.items():
            key = bucket_key(second)
            pipe.hincrby(key, f"r:{node}", requests)
            if errors:
                pipe.hincrby(key, f"e:{node}", errors)
            pipe.expire(key, self.bucket_ttl_s)
            totals[f"r:{node}"] = totals.get(f"r:{node}", 0) + requests
            if errors:
                totals[f"e:{node}"] = totals.get(f"e:{node}", 0) + errors
        for name, n in totals.items():
            pipe.hincrby(TOTALS_KEY, name, n)
        if totals:
            pipe.expire(TOTALS_KEY, self.idle_ttl_s)
        by_node: dict[str, list[str]] = {}
        for node, at, seconds in latencies:
            by_node.setdefault(node, []).append(f"{at:.3f} {seconds:.6f}")
        for node, samples in by_node.items():
            key = latency_key(node)
            pipe.lpush(key, *samples)
            pipe.ltrim(key, 0, self.latency_samples - 1)
            pipe.expire(key, self.bucket_ttl_s)
        try:
            async with asyncio.timeout(self.deadline_s):
                await pipe.execute()
        except REDIS_FAILURES as exc:
            self.metrics.shared_state_errors.labels(PUBLISH_OPERATION).inc()
            self._drop(len(decisions) + sum(c[0] for c in counts.values()) + len(latencies))
            if self._publishing:
                log.warning("console feed: Redis unreachable, events dropped (%s)", _why(exc))
            self._publishing = False
            return False
        if not self._publishing:
            log.info("console feed: Redis reachable again")
        self._publishing = True
        return True

    # -- reading -------------------------------------------------------------------------------

    def _read_failed(self, why: str) -> None:
        """Every console read Redis could not serve counts once (the page then shows this
        replica's view); the log says so when that starts, not at every poll."""
        self.metrics.shared_state_errors.labels(READ_OPERATION).inc()
        if self._reading:
            log.warning("console: Redis unreachable, showing this replica (%s)", why)
        self._reading = False

    async def read(self, nodes: Sequence[str]) -> DeploymentView | None:
        """The merged view of every replica for `nodes`; None when Redis cannot be read (the
        caller shows this process's own view and says so). What this process recorded since its
        last flush goes first, so a prompt just sent from this page shows up at once."""
        if not await self.flush():
            # Redis just failed us: answer from this process rather than wait as long again.
            self._read_failed("the flush before it failed")
            return None
        now = self._wall()
        second = int(now)
        seconds = [second - i for i in range(math.ceil(self.window_s))]
        pipe = self.redis.pipeline(transaction=False)
        pipe.xrevrange(DECISIONS_KEY, count=self.max_decisions)
        pipe.hgetall(TOTALS_KEY)
        for s in seconds:
            pipe.hgetall(bucket_key(s))
        for node in nodes:
            pipe.lrange(latency_key(node), 0, self.latency_samples - 1)
        try:
            async with asyncio.timeout(self.deadline_s):
                replies: list[Any] = await pipe.execute()
        except REDIS_FAILURES as exc:
            self._read_failed(_why(exc))
            return None
        self._reading = True
        entries, totals, *rest = replies
        buckets, lat_lists = rest[: len(seconds)], rest[len(seconds) :]
        window: dict[str, int] = {}
        for bucket in buckets:
            for name, n in bucket.items():
                window[_text(name)] = window.get(_text(name), 0) + int(n)
        total = {_text(k): int(v) for k, v in totals.items()}
        oldest = now - self.window_s
        snapshots = {}
        for node, samples in zip(nodes, lat_lists, strict=True):
            lats = sorted(_latencies_after(samples, oldest))
            snapshots[node] = NodeSnapshot(
                node=node,
                requests_window=window.get(f"r:{node}", 0),
                errors_window=window.get(f"e:{node}", 0),
                requests_total=total.get(f"r:{node}", 0),
                errors_total=total.get(f"e:{node}", 0),
                p50_s=percentile(lats, 0.50),
                p99_s=percentile(lats, 0.99),
            )
        recent = []
        for _id, fields in entries:
            raw = fields.get(b"d", fields.get("d"))
            d = decode_decision(_text(raw)) if raw is not None else None
            if d is not None:
                recent.append(d)
        # The stream is in flush order; replicas flush on their own beats: newest first by time.
        recent.sort(key=lambda d: d.at, reverse=True)
        return DeploymentView(self.window_s, snapshots, recent)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _latencies_after(samples: list[bytes | str], oldest: float) -> list[float]:
    out = []
    for raw in samples:
        at, _, seconds = _text(raw).partition(" ")
        with contextlib.suppress(ValueError):
            if float(at) > oldest:
                out.append(float(seconds))
    return out


def _why(exc: BaseException) -> str:
    return type(exc).__name__ if isinstance(exc, TimeoutError) else str(exc) or type(exc).__name__
