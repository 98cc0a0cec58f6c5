"""One observer per request: what the gateway records about it, in one place.

The pipeline creates a `RequestObserver` when a request is planned and calls it at three
moments: routed (the decision), first byte (time to first token), and end (outcome, tokens),
the last exactly once however the request ends. It feeds the Prometheus series, the console's
live view and the request's log line, so no stage of the pipeline records anything itself.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from prometheus_client import Counter, Histogram

from service.errors import ServiceError
from service.gateway.console.stats import ConsoleStats, classify
from service.gateway.routing import RouteResult
from service.observability.metrics import GatewayMetrics

log = logging.getLogger("octograph.request")

UNROUTED = "none"  # the node label of a request that failed before it had a graph node


@dataclass
class Observers:
    """The sinks every request's observer writes to (built once per gateway)."""

    metrics: GatewayMetrics
    console: ConsoleStats
    known_ids: frozenset[str]  # label values are bounded by the graph's ids
    # Where a request's tokens go when it ends, per API key (Admission.spend_tokens: TPM).
    spend: Callable[[str | None, int], None] | None = None

    def __post_init__(self) -> None:
        self._series: dict[str, NodeSeries] = {}

    def series(self, node: str) -> NodeSeries:
        """A node's labelled children, looked up once (`labels()` costs a few us a call)."""
        s = self._series.get(node)
        if s is None:
            m = self.metrics
            s = self._series[node] = NodeSeries(
                m.ttft.labels(node), m.duration.labels(node), m.tokens.labels(node), {}
            )
        return s


@dataclass
class NodeSeries:
    ttft: Histogram
    duration: Histogram
    tokens: Counter
    requests: dict[str, Counter]  # status class -> counter child

    def request(self, metrics: GatewayMetrics, node: str, status: str) -> Counter:
        child = self.requests.get(status)
        if child is None:
            child = self.requests[status] = metrics.requests.labels(node, status)
        return child


class RequestObserver:
    def __init__(
        self,
        sinks: Observers,
        request_id: str,
        started: float,
        deadline: float,
        key: str | None = None,
    ) -> None:
        self.sinks = sinks
        self.key = key
        self.prompt_tokens = 0  # set by the reply renderer once the engines report it
        self.request_id = request_id
        self.started = started
        self.deadline = deadline
        self.node = UNROUTED
        self.node_kind = ""
        self.route: RouteResult | None = None
        self.first_byte_at: float | None = None
        self.ended = False

    def _label(self, node_id: str) -> str:
        return node_id if node_id in self.sinks.known_ids else UNROUTED

    def aimed(self, start: str) -> None:
        """Routing starts at `start`: a failure from here on counts against it."""
        self.node = self._label(start)

    def routed(self, route: RouteResult) -> None:
        self.route = route
        self.node = self._label(route.node)
        self.sinks.console.record_decision(route)

    def running(self, node_id: str, node_kind: str) -> None:
        self.node = self._label(node_id)
        self.node_kind = node_kind

    def failed_over(self, node_id: str) -> None:
        """`node_id` failed before its first byte and the request moves to a fallback (the
        console counts the failure from the route's `fallback:` hop)."""
        self.sinks.metrics.errors.labels(self._label(node_id), "fallback").inc()

    def first_byte(self) -> None:
        if self.first_byte_at is None:
            self.first_byte_at = time.monotonic()
            self.sinks.series(self.node).ttft.observe(self.first_byte_at - self.started)

    def finished(self, failure: BaseException | None, completion_tokens: int | None = None) -> None:
        """The request is over: `failure` None for success. Idempotent."""
        if self.ended:
            return
        self.ended = True
        now = time.monotonic()
        seconds = now - self.started
        outcome = classify(failure, deadline_passed=now >= self.deadline)
        m = self.sinks.metrics
        series = self.sinks.series(self.node)
        status = _status(failure, outcome)
        series.request(m, self.node, status).inc()
        series.duration.observe(seconds)
        reason = ""
        if outcome in ("error", "client_error"):
            reason = failure.type if isinstance(failure, ServiceError) else "internal_error"
            m.errors.labels(self.node, reason).inc()
        if self.sinks.spend is not None:
            self.sinks.spend(self.key, self.prompt_tokens + (completion_tokens or 0))
        if completion_tokens:
            series.tokens.inc(completion_tokens)
            if self.node_kind == "ensemble" and self.first_byte_at is not None:
                # Bytes over the time they were produced in (the first byte's wait is TTFT).
                span = max(now - self.first_byte_at, 1e-6)
                m.ensemble_bytes_per_s.labels(self.node).set(completion_tokens / span)
        route = self.route.route if self.route is not None else ()
        if self.node != UNROUTED:
            self.sinks.console.record_request(self.node, seconds, outcome, route)
        log.info(
            "request",
            extra={
                "request_id": self.request_id,
                "node": self.node,
                "route": ">".join(route),
                "status": status,
                "reason": reason or None,
                "seconds": round(seconds, 4),
                "ttft_s": round(self.first_byte_at - self.started, 4)
                if self.first_byte_at is not None
                else None,
                "completion_tokens": completion_tokens,
            },
        )


def _status(failure: BaseException | None, outcome: str) -> str:
    if failure is None:
        return "2xx"
    if outcome == "cancelled":
        return "cancelled"
    if isinstance(failure, ServiceError):
        return f"{failure.status // 100}xx"
    if isinstance(failure, asyncio.CancelledError | TimeoutError):
        return "5xx"  # a deadline surfacing as a cancellation
    return "5xx"
