"""Graph reload without a restart: watch the graph file, validate a new graph, swap it in.

The watcher reads the file every `OCTOGRAPH_GRAPH_RELOAD_INTERVAL_S` (0.5 s; 0 = no polling) and
compares the SHA-256 of its bytes with the last content it looked at. Reading through the path
follows symlinks, so a Kubernetes ConfigMap update (a new directory, then the `..data` symlink
swapped atomically) is seen like any rewrite; polling is used because inotify misses exactly that
swap. SIGHUP (installed by the gateway process, `octograph gateway` and `octograph up`) makes
it look at once, even when the content looks unchanged.

A new content goes through the same validation as a start (`parse_graph`: the schema and the
graph's structure; then what the app checks while building: upstream API keys) and is then
compared with the graph being served:
- unchanged: the graph it describes is the same (a comment, formatting): nothing is swapped;
- invalid: refused with a log line and a metric; the graph being served stays;
- applied: a new runtime (graph_runtime.py) is built, its new pools probed once, and it is
  swapped in between requests (requests in flight finish on the runtime they started with);
- needs_worker: applied, but some models wait for a worker the gateway cannot start: a new
  worker model without `urls` (its nodes answer 503, or their router's fallback, until it has
  one), or a change to a worker model's engine-side fields (`path`, `packaged`, `revision`,
  `max_model_len`, `engine`, `build`), which the running worker applies only once restarted.
  A reload that would leave a model /readyz needs (a router's) without any worker is refused
  instead (invalid): it would take every gateway replica out of its Service at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel

from service.gateway.graph_runtime import (
    GatewayServices,
    GraphRuntimes,
    build_runtime,
    required_models,
    worker_urls,
)
from service.graph.schema import GraphConfig, GraphError, parse_graph

log = logging.getLogger(__name__)

# Fields of a worker model that the worker reads when it starts: changing them in the graph
# changes nothing until that worker restarts. (`urls` and `tool_parser` are the gateway's.)
WORKER_SIDE_FIELDS = ("packaged", "path", "revision", "max_model_len", "engine", "build")
# A file rewritten in place can be read half-written; a change counts once two reads this far
# apart agree (an atomic rename, as a ConfigMap does, never shows a half-written file).
SETTLE_S = 0.05

Outcome = Literal["applied", "needs_worker", "invalid", "unchanged"]


@dataclass(frozen=True)
class GraphChanges:
    """What differs between two graphs, by id."""

    nodes_added: tuple[str, ...] = ()
    nodes_removed: tuple[str, ...] = ()
    nodes_changed: tuple[str, ...] = ()
    models_added: tuple[str, ...] = ()
    models_removed: tuple[str, ...] = ()
    models_changed: tuple[str, ...] = ()
    root_changed: bool = False

    @property
    def empty(self) -> bool:
        return not any(self.as_dict().values())

    def as_dict(self) -> dict[str, Any]:
        return {
            "nodes_added": list(self.nodes_added),
            "nodes_removed": list(self.nodes_removed),
            "nodes_changed": list(self.nodes_changed),
            "models_added": list(self.models_added),
            "models_removed": list(self.models_removed),
            "models_changed": list(self.models_changed),
            "root_changed": self.root_changed,
        }

    def describe(self) -> str:
        parts = [
            f"{name.replace('_', ' ')}: {', '.join(ids)}"
            for name, ids in self.as_dict().items()
            if isinstance(ids, list) and ids
        ]
        if self.root_changed:
            parts.append("root changed")
        return "; ".join(parts) or "no change"


def _split(
    old: dict[str, BaseModel], new: dict[str, BaseModel]
) -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
    added = tuple(k for k in new if k not in old)
    removed = tuple(k for k in old if k not in new)
    changed = tuple(k for k in new if k in old and old[k] != new[k])
    return added, removed, changed


def diff_graphs(old: GraphConfig, new: GraphConfig) -> GraphChanges:
    nodes = _split(dict(old.nodes), dict(new.nodes))
    models = _split(dict(old.models), dict(new.models))
    return GraphChanges(*nodes, *models, root_changed=old.root != new.root)


@dataclass(frozen=True)
class WorkerNeed:
    """A model whose change in the graph only a worker (re)start applies."""

    model: str
    reason: str
    has_worker: bool  # False: no replica at all, its nodes cannot answer

    def as_dict(self) -> dict[str, Any]:
        return {"model": self.model, "reason": self.reason}


def worker_needs(
    old: GraphConfig, new: GraphConfig, urls: dict[str, list[str]]
) -> list[WorkerNeed]:
    """The new graph's worker models that wait for a worker: `urls` are the replicas the new
    runtime would have (the graph's, or the workers `octograph up` started)."""
    needs = []
    before = old.worker_models()
    for name, spec in new.worker_models().items():
        if not urls.get(name):
            needs.append(
                WorkerNeed(
                    name,
                    "no worker: the model has no `urls` and this gateway started no worker for "
                    "it; its nodes answer 503 (or their router's fallback) until it has one",
                    has_worker=False,
                )
            )
            continue
        previous = before.get(name)
        if previous is None:
            continue
        fields = [f for f in WORKER_SIDE_FIELDS if getattr(previous, f) != getattr(spec, f)]
        if fields:
            needs.append(
                WorkerNeed(
                    name,
                    f"{', '.join(fields)} changed: the running worker serves the previous "
                    "value until it is restarted",
                    has_worker=True,
                )
            )
    return needs


@dataclass(frozen=True)
class ReloadResult:
    result: Outcome
    generation: int  # the generation serving once this reload is done
    sha256: str | None  # of the content looked at (None: the file could not be read)
    changes: GraphChanges = field(default_factory=GraphChanges)
    needs_worker: tuple[WorkerNeed, ...] = ()
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "result": self.result,
            "generation": self.generation,
            "sha256": self.sha256,
            "changes": self.changes.as_dict(),
            "needs_worker": [n.as_dict() for n in self.needs_worker],
            "error": self.error,
        }


def digest(content: bytes) -> str:
    return hashlib.sha256(content).hexdigest()


class GraphReloader:
    """Watches `path`, and swaps a valid new graph into `runtimes`."""

    def __init__(
        self,
        path: Path,
        runtimes: GraphRuntimes,
        services: GatewayServices,
        *,
        interval_s: float,
    ) -> None:
        self.path = path
        self.runtimes = runtimes
        self.services = services
        self.metrics = services.metrics
        self.interval_s = interval_s
        self.last: ReloadResult | None = None  # the outcome of the last content looked at
        self._seen: str | None = None  # digest (or read error) of the last content looked at
        self._served_sha256: str | None = None
        self._wake = asyncio.Event()
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None

    # -- lifecycle ----------------------------------------------------------------------------

    def baseline(self) -> None:
        """At start: the file's content is taken as seen when it describes the graph the
        gateway was built with (the usual case); otherwise the first check reloads it."""
        try:
            content = self.path.read_bytes()
            graph = parse_graph(content.decode("utf-8"), source=str(self.path))
        except (OSError, UnicodeDecodeError, GraphError):
            return
        if graph == self.runtimes.current.graph:
            self._seen = digest(content)
            self._set_served(self._seen)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._watch())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def request_reload(self) -> None:
        """SIGHUP: look at the file now, even if its content looks unchanged."""
        self._wake.set()

    async def _watch(self) -> None:
        timeout = self.interval_s if self.interval_s > 0 else None  # None: SIGHUP only
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout)
            forced = self._wake.is_set()
            self._wake.clear()
            try:
                await self.check(forced=forced)
            except Exception:  # a bug here must not end watching
                log.exception("graph reload check failed")

    # -- checking -----------------------------------------------------------------------------

    async def check(self, *, forced: bool = False) -> ReloadResult | None:
        """Read the file; reload it if its content is new (or `forced`). None: nothing new."""
        async with self._lock:
            try:
                content = await asyncio.to_thread(self.path.read_bytes)
            except OSError as exc:
                error = f"cannot read graph file {self.path}: {exc.strerror}"
                if error == self._seen and not forced:
                    return None
                self._seen = error
                return self._refused(None, error)
            sha256 = digest(content)
            if sha256 == self._seen and not forced:
                return None
            if not forced:
                await asyncio.sleep(SETTLE_S)
                try:
                    again = await asyncio.to_thread(self.path.read_bytes)
                except OSError:
                    return None  # replaced meanwhile: the next check reads what is there
                if digest(again) != sha256:
                    return None  # still being written: the next check sees it whole
            self._seen = sha256
            return await self._reload(content, sha256)

    async def _reload(self, content: bytes, sha256: str) -> ReloadResult:
        current = self.runtimes.current
        try:
            graph = parse_graph(content.decode("utf-8"), source=str(self.path))
        except UnicodeDecodeError:
            return self._refused(sha256, f"{self.path}: the graph file is not UTF-8")
        except GraphError as exc:
            return self._refused(sha256, str(exc))
        changes = diff_graphs(current.graph, graph)
        if changes.empty:
            self._set_served(sha256)
            return self._done(ReloadResult("unchanged", current.generation, sha256))
        urls = worker_urls(graph, self.services.url_overrides)
        needs = worker_needs(current.graph, graph, urls)
        needed = required_models(graph)
        blocking = [n.model for n in needs if not n.has_worker and n.model in needed]
        if blocking:
            return self._refused(
                sha256,
                f"model(s) {', '.join(blocking)} would have no worker, and this gateway needs "
                "them to be ready (its routers' models): start their workers and give them "
                "`urls` first",
                changes,
            )
        try:
            runtime = build_runtime(
                graph, self.services, generation=current.generation + 1, previous=current
            )
        except GraphError as exc:
            return self._refused(sha256, str(exc), changes)
        old_pools = current.pools.pools
        new_pools = [n for n, p in runtime.pools.pools.items() if p is not old_pools.get(n)]
        # New replicas are probed before they take requests (a new pool starts "down").
        await runtime.pools.probe_once(only=new_pools)
        self.runtimes.swap(runtime)
        # The console's series follow the graph: new ids start, removed ones are dropped.
        self.services.console.track([*graph.nodes, *graph.models])
        self._set_served(sha256)
        self.metrics.graph_generation.set(runtime.generation)
        self.metrics.graph_loaded_at.set(runtime.loaded_at)
        outcome: Outcome = "needs_worker" if needs else "applied"
        result = ReloadResult(outcome, runtime.generation, sha256, changes, tuple(needs))
        message = f"graph reloaded (generation {runtime.generation}): {changes.describe()}"
        extra = {**result.as_dict(), "file": str(self.path)}
        if needs:
            waiting = "; ".join(f"{n.model}: {n.reason}" for n in needs)
            log.warning(f"{message}; waiting for a worker: {waiting}", extra=extra)
        else:
            log.info(message, extra=extra)
        return self._done(result)

    def _refused(
        self, sha256: str | None, error: str, changes: GraphChanges | None = None
    ) -> ReloadResult:
        current = self.runtimes.current
        log.error(
            f"graph file refused, still serving generation {current.generation}: {error}",
            extra={"file": str(self.path), "sha256": sha256, "error": error},
        )
        return self._done(
            ReloadResult(
                "invalid", current.generation, sha256, changes or GraphChanges(), error=error
            )
        )

    def _done(self, result: ReloadResult) -> ReloadResult:
        self.metrics.graph_reloads.labels(result.result).inc()
        self.last = result
        return result

    def _set_served(self, sha256: str) -> None:
        if sha256 == self._served_sha256:
            return
        if self._served_sha256 is not None:
            self.metrics.graph_info.remove(self._served_sha256)
        self.metrics.graph_info.labels(sha256).set(1)
        self._served_sha256 = sha256
