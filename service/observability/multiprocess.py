"""Prometheus multiprocess mode, for `octograph gateway --processes N` (N > 1).

Every gateway process writes its metrics to files (one set per pid) in one directory, named by
prometheus_client's own variable PROMETHEUS_MULTIPROC_DIR. The parent sets it in the children's
environment before they start: prometheus_client picks file-backed values when it is imported,
so setting it later would change nothing. `/metrics` then sums the directory into one view:
counters and histograms add up across processes (a dead process's counts stay, so totals never
go back), gauges follow the `multiprocess_mode` each one declares (service/observability/
metrics.py). Without the variable (one process) nothing changes: /metrics serves the process's
own registry."""

from __future__ import annotations

import os
from pathlib import Path

from prometheus_client import CollectorRegistry
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

MULTIPROC_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"


def merged_registry(directory: Path | str) -> CollectorRegistry:
    """Every process's metrics in `directory`, summed per series as /metrics shows them."""
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(directory))  # type: ignore[no-untyped-call]
    return registry


def exposition_registry(own: CollectorRegistry) -> CollectorRegistry:
    """What this process's /metrics serves: its own registry, or, when it is one of several
    gateway processes, the merged view of all of them."""
    directory = os.environ.get(MULTIPROC_DIR_ENV)
    return merged_registry(directory) if directory else own


def mark_dead(pid: int, directory: Path) -> None:
    """Drop a dead process's live gauges (its in-flight count would otherwise stay in the sum
    forever); its counters and histograms stay."""
    mark_process_dead(pid, str(directory))  # type: ignore[no-untyped-call]
