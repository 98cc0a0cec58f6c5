"""Everything the gateway builds from one graph, as one runtime, and the holder of the current one.

A `GraphRuntime` is the graph plus what is built from it: the replica pools of its models, the
router, the node runners (local, ensemble, remote), the observers and the pipeline. It does not
change once built. A reload (graph_reload.py) builds a new one and swaps it in; a request reads
the current runtime once, when it starts (`GraphRuntimes.use`), and keeps that runtime until it
ends, so a request in flight finishes on the graph it started with.

What outlives graphs is built once per gateway (`GatewayServices`): settings, metrics,
admission, the console's recorder, the HTTP client. Pools whose definition a reload does not
change are carried into the new runtime (same objects: connections, health and cooldowns
carry over); so are the ensembles' loaded tokenizer assets.

A replaced runtime is released once no request uses it any more (a count of its users, not a
timer): its ensemble threads stop and the pools no live runtime holds are closed, in
`GraphRuntimes._close`, the one place that releases a runtime, also at shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field
from types import TracebackType
from urllib.parse import urlsplit

import httpx

from service.config import GatewaySettings
from service.gateway.admission import Admission
from service.gateway.clients.pool import ModelPool, WorkerPools, close_pools
from service.gateway.clients.upstream import UpstreamClient, api_key
from service.gateway.clients.worker import WorkerClient
from service.gateway.console.stats import ConsoleStats
from service.gateway.observer import Observers
from service.gateway.pipeline import Pipeline
from service.gateway.routing import Router
from service.gateway.runners.base import NodeRunner
from service.gateway.runners.ensemble import EnsembleRunner
from service.gateway.runners.local import LocalRunner
from service.gateway.runners.remote import RemoteRunner
from service.graph.schema import GraphConfig, GraphError, RouterNode
from service.observability.metrics import GatewayMetrics

log = logging.getLogger(__name__)


def worker_urls(
    graph: GraphConfig, overrides: dict[str, list[str]] | None = None
) -> dict[str, list[str]]:
    """Each worker model's replicas: the graph's `urls`, or the workers `octograph up` started."""
    urls = {name: list(spec.urls) for name, spec in graph.worker_models().items()}
    for name, us in (overrides or {}).items():
        if name in urls:
            urls[name] = us
    return urls


def required_models(graph: GraphConfig) -> set[str]:
    """The models /readyz waits for: the routers' (without them nothing routes), or every
    model of a graph without routers."""
    routers = {n.model for n in graph.nodes.values() if isinstance(n, RouterNode)}
    return routers or set(graph.models)


@dataclass
class GatewayServices:
    """What a gateway builds once and every graph runtime shares."""

    settings: GatewaySettings
    metrics: GatewayMetrics
    admission: Admission
    console: ConsoleStats
    http: httpx.AsyncClient  # the worker clients' (probes, info)
    worker_secret: str | None
    # Worker URLs given by the process rather than the graph (`octograph up`'s own workers).
    url_overrides: dict[str, list[str]] = field(default_factory=dict)


@dataclass
class RuntimeUsage:
    """Bookkeeping of one runtime's life: requests using it, replaced, released."""

    users: int = 0
    retired: bool = False
    closed: bool = False


@dataclass(frozen=True, eq=False)  # eq=False: compared and hashed by identity
class GraphRuntime:
    graph: GraphConfig
    generation: int  # 1 for the graph the gateway started with, +1 per applied reload
    loaded_at: float  # unix time
    urls: dict[str, list[str]]  # worker model -> replica URLs it was built with
    upstream_keys: dict[str, str | None]  # openai model -> its API key, as read at build
    pools: WorkerPools
    router: Router
    ensembles: EnsembleRunner
    runners: tuple[NodeRunner, ...]
    observers: Observers
    pipeline: Pipeline
    usage: RuntimeUsage = field(default_factory=RuntimeUsage)

    @property
    def required_models(self) -> set[str]:
        return required_models(self.graph)


def build_runtime(
    graph: GraphConfig,
    services: GatewayServices,
    *,
    generation: int = 1,
    previous: GraphRuntime | None = None,
) -> GraphRuntime:
    """The runtime of `graph`. With `previous` (a reload), its pools and ensemble assets are
    reused where the graph did not change them. Raises GraphError for what the schema alone
    cannot tell (an upstream's API key that is not set, a worker URL that is not one), before
    anything is built: a refused graph leaves nothing open."""
    settings, metrics = services.settings, services.metrics
    keys = {name: api_key(name, spec) for name, spec in graph.openai_models().items()}
    urls = worker_urls(graph, services.url_overrides)
    for name, us in urls.items():
        for url in us:
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise GraphError(f"model '{name}': worker URL '{url}' is not an http(s) URL")
    keep_workers: dict[str, ModelPool[WorkerClient]] = {}
    keep_upstreams: dict[str, ModelPool[UpstreamClient]] = {}
    if previous is not None:
        for name, us in urls.items():
            if previous.urls.get(name) == us and name in previous.pools.workers:
                keep_workers[name] = previous.pools.workers[name]
        old_specs = previous.graph.openai_models()
        for name, spec in graph.openai_models().items():
            same = old_specs.get(name) == spec and previous.upstream_keys.get(name) == keys[name]
            if same and name in previous.pools.upstreams:
                keep_upstreams[name] = previous.pools.upstreams[name]
    # kind: openai models (runners/remote.py): one client per URL, for the pools not kept.
    upstreams = {
        name: [UpstreamClient(name, url, spec, keys[name]) for url in spec.base_url]
        for name, spec in graph.openai_models().items()
        if name not in keep_upstreams
    }
    pools = WorkerPools(
        urls,
        services.http,
        metrics,
        cooldown_s=settings.cooldown_s,
        upstreams=upstreams,
        worker_secret=services.worker_secret,
        keep_workers=keep_workers,
        keep_upstreams=keep_upstreams,
    )
    router = Router(graph, pools, metrics)
    idle = settings.stream_idle_timeout_s
    ensembles = EnsembleRunner(
        graph,
        pools,
        metrics,
        idle_timeout_s=idle,
        previous_assets=previous.ensembles.assets if previous is not None else None,
    )
    # The registry of node kinds, asked in order: a new kind is one runner and one line here.
    runners: tuple[NodeRunner, ...] = (
        ensembles,
        RemoteRunner(graph, pools, metrics),
        LocalRunner(pools, metrics, idle, tool_parsers=graph.tool_parsers()),
    )
    # Label values only for the graph's ids (the console follows at the swap: graph_reload.py).
    ids = [*graph.nodes, *graph.models]
    observers = Observers(
        metrics, services.console, frozenset(ids), spend=services.admission.spend_tokens
    )
    pipeline = Pipeline(
        graph,
        router,
        runners,
        services.admission,
        observers,
        max_request_sequences=settings.max_request_sequences,
    )
    return GraphRuntime(
        graph=graph,
        generation=generation,
        loaded_at=time.time(),
        urls=urls,
        upstream_keys=keys,
        pools=pools,
        router=router,
        ensembles=ensembles,
        runners=runners,
        observers=observers,
        pipeline=pipeline,
    )


class RuntimeLease:
    """`with runtimes.use() as runtime:` — the runtime a request runs on, counted as used
    until the block ends however it ends (a class, not a generator: it is on every request)."""

    __slots__ = ("_owner", "runtime")

    def __init__(self, owner: GraphRuntimes, runtime: GraphRuntime) -> None:
        self._owner = owner
        self.runtime = runtime

    def __enter__(self) -> GraphRuntime:
        self.runtime.usage.users += 1
        return self.runtime

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        usage = self.runtime.usage
        usage.users -= 1
        if usage.retired and usage.users == 0:
            self._owner.release(self.runtime)


class GraphRuntimes:
    """The current runtime, the replaced ones still in use, and the replicas' health loop."""

    def __init__(self, first: GraphRuntime, metrics: GatewayMetrics, *, health_interval_s: float):
        self.current = first
        self._metrics = metrics
        self._health_interval_s = health_interval_s
        self._retired: list[GraphRuntime] = []  # replaced, not released yet
        self._closing: set[asyncio.Task[None]] = set()
        self._health: asyncio.Task[None] | None = None

    def use(self) -> RuntimeLease:
        return RuntimeLease(self, self.current)

    def swap(self, runtime: GraphRuntime) -> GraphRuntime:
        """Make `runtime` the one new requests use; the replaced one is released as soon as
        its last request ends (at once if it has none). Returns the replaced one."""
        old, self.current = self.current, runtime
        old.usage.retired = True
        self._retired.append(old)
        if old.usage.users == 0:
            self.release(old)
        return old

    @property
    def retired(self) -> list[GraphRuntime]:
        """Replaced runtimes that requests still use."""
        return list(self._retired)

    def release(self, runtime: GraphRuntime) -> None:
        """Called when a replaced runtime's last user leaves: close it off the request path."""
        task = asyncio.get_running_loop().create_task(self._close(runtime))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def _close(self, runtime: GraphRuntime) -> None:
        """The one place a runtime's resources are released: its ensemble threads, and the
        pools (connections) no other live runtime holds."""
        if runtime.usage.closed:
            return
        runtime.usage.closed = True
        with contextlib.suppress(ValueError):
            self._retired.remove(runtime)
        live = [self.current, *self._retired]
        held = {id(p) for rt in live if rt is not runtime for p in rt.pools.pools.values()}
        dropped = [p for p in runtime.pools.pools.values() if id(p) not in held]
        try:
            runtime.ensembles.close()
            await close_pools(dropped, self._metrics)
        except Exception:  # a failed close must not leave the others open, nor kill a request
            log.exception("releasing a replaced graph runtime failed")
        log.info(
            "graph runtime released",
            extra={"generation": runtime.generation, "pools_closed": [p.name for p in dropped]},
        )

    # -- health of the current runtime's replicas ------------------------------------------------

    async def start(self) -> None:
        await self.current.pools.probe_once()
        self._health = asyncio.get_running_loop().create_task(self._health_loop())

    async def _health_loop(self) -> None:
        while True:
            try:
                await self.current.pools.probe_once()
            except Exception:  # a probe bug must not kill health checking
                log.exception("health probe failed")
            await asyncio.sleep(self._health_interval_s)

    async def aclose(self) -> None:
        """At shutdown (after the drain): stop probing, release every runtime."""
        if self._health is not None:
            self._health.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._health
        for runtime in [*self._retired, self.current]:
            await self._close(runtime)
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)
