"""Prometheus collectors. Each process owns a registry; labels are bounded (node ids come from
the graph file, status classes and reasons from fixed sets)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
ROUTING_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28)


class WorkerMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.inflight = Gauge(
            "octograph_worker_inflight_requests", "Generate streams open", registry=registry
        )
        self.tokens = Counter(
            "octograph_worker_generated_tokens", "Tokens streamed", registry=registry
        )
        # how: "session_step" (a live streaming session extended, service/worker/path_sessions),
        # "new_request" (a request of its own: a new session's first chunk or a plain capture).
        self.byte_dist_rows = Counter(
            "octograph_worker_byte_dist_rows",
            "Token-path distributions computed for byte-level scoring, by how",
            ["how"],
            registry=registry,
        )


class GatewayMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        # multiprocess_mode: how /metrics combines the gauge across gateway processes
        # (`--processes N`, service/observability/multiprocess.py); ignored with one process.
        self.inflight = Gauge(
            "octograph_gateway_inflight_requests",
            "Requests being served",
            registry=registry,
            multiprocess_mode="livesum",
        )
        self.requests = Counter(
            "octograph_requests",
            "Requests by target node and status class",
            ["node", "status_class"],
            registry=registry,
        )
        self.errors = Counter(
            "octograph_request_errors",
            "Failed requests by node and reason",
            ["node", "reason"],
            registry=registry,
        )
        self.rejected = Counter(
            "octograph_admission_rejected",
            "Requests refused by admission",
            ["scope"],
            registry=registry,
        )
        self.ttft = Histogram(
            "octograph_ttft_seconds",
            "Time to first token",
            ["node"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.duration = Histogram(
            "octograph_request_duration_seconds",
            "End-to-end latency",
            ["node"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.routing = Counter(
            "octograph_routing_decisions",
            "Routing decisions",
            ["router", "node"],
            registry=registry,
        )
        self.routing_latency = Histogram(
            "octograph_routing_latency_seconds",
            "Time spent routing (all hops)",
            buckets=ROUTING_BUCKETS,
            registry=registry,
        )
        self.tokens = Counter(
            "octograph_completion_tokens", "Completion tokens served", ["node"], registry=registry
        )
        self.worker_up = Gauge(
            "octograph_worker_up",
            "1 if the replica passed its last health probe",
            ["model", "replica"],
            registry=registry,
            multiprocess_mode="livemostrecent",  # every process probes: the latest probe says
        )
        self.ensemble_bytes_per_s = Gauge(
            "octograph_ensemble_bytes_per_second",
            "Byte rate of the last ensemble request",
            ["node"],
            registry=registry,
            multiprocess_mode="livemostrecent",
        )
        self.retries = Counter(
            "octograph_retries",
            "Requests retried before their first byte",
            ["node"],
            registry=registry,
        )
        # Graph reload (service/gateway/graph_reload.py): result is one of a fixed set.
        self.graph_reloads = Counter(
            "octograph_graph_reloads",
            "Graph file changes looked at, by result: applied; needs_worker (applied, some "
            "models wait for a worker); invalid (refused, the previous graph stays); unchanged "
            "(the file changed, the graph it describes did not)",
            ["result"],
            registry=registry,
        )
        self.graph_generation = Gauge(
            "octograph_graph_generation",
            "Generation of the graph being served: 1 at start, +1 per applied reload",
            registry=registry,
            multiprocess_mode="livemin",  # --processes N: the oldest graph any process serves
        )
        self.graph_loaded_at = Gauge(
            "octograph_graph_loaded_timestamp_seconds",
            "Unix time the graph being served was built",
            registry=registry,
            multiprocess_mode="livemin",
        )
        self.graph_info = Gauge(
            "octograph_graph_info",
            "1 for the SHA-256 of the graph file content being served (watched files only)",
            ["sha256"],
            registry=registry,
            multiprocess_mode="livesum",  # --processes N: how many processes serve it
        )
        # Shared state (service/gateway/shared/): operation names a fixed set per store.
        self.shared_state_errors = Counter(
            "octograph_shared_state_errors",
            "Redis calls of the shared state that failed (unreachable, timed out, refused)",
            ["operation"],
            registry=registry,
        )
        self.console_feed_dropped = Counter(
            "octograph_console_feed_dropped",
            "Console events (decisions, counts, latencies) that never reached Redis",
            registry=registry,
        )
        self.shared_limits_up = Gauge(
            "octograph_shared_limits_up",
            "1 while the per-key limits shared in Redis answer; 0 during an outage "
            "(admission then follows OCTOGRAPH_REDIS_FAILURE) and without Redis",
            registry=registry,
            multiprocess_mode="livemin",  # --processes N: 0 while any process is cut off
        )
