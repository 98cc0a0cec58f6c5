"""Replicas of each model: health, cooldown and the choice of replica.

A replica that fails a call or a probe sits out for `cooldown_s`, then is probed back.
`first_answer` is the one retry rule every node kind and the router use: at most once, and only
before the first byte reached the client.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol

import httpx
from typing_extensions import TypeVar  # a TypeVar default (PEP 696) on Python 3.11

from service.errors import ServiceError, Unavailable
from service.gateway.clients.upstream import UpstreamClient, UpstreamFailure
from service.gateway.clients.worker import WorkerClient, WorkerUnreachable
from service.observability.metrics import GatewayMetrics
from service.protocol.internal import WorkerInfo

log = logging.getLogger(__name__)


class ReplicaClient(Protocol):
    """What health checking needs from a replica's client: a worker's, or an OpenAI-compatible
    upstream's (service/gateway/clients/upstream.py)."""

    @property
    def base_url(self) -> str: ...

    async def ready(self, timeout_s: float = 2.0) -> bool: ...

    async def aclose(self) -> None: ...


# Bare `ModelPool` / `Replica` mean a pool of Octograph workers (most code); upstream pools
# are `ModelPool[UpstreamClient]`.
C = TypeVar("C", bound=ReplicaClient, default=WorkerClient)


@dataclass
class Replica(Generic[C]):
    client: C
    healthy: bool = False
    cooldown_until: float = 0.0
    inflight: int = 0
    info: WorkerInfo | None = None
    failures: int = 0
    failed_probes: int = 0  # consecutive

    @property
    def url(self) -> str:
        return self.client.base_url

    def available(self, now: float) -> bool:
        return self.healthy and now >= self.cooldown_until


@dataclass
class ModelPool(Generic[C]):
    name: str
    replicas: list[Replica[C]]
    cooldown_s: float
    _rr: int = field(default=0)

    def pick(self, exclude: set[str] | None = None) -> Replica[C]:
        """Least-loaded available replica; round-robin among equals."""
        now = time.monotonic()
        candidates = [
            r for r in self.replicas if r.available(now) and (not exclude or r.url not in exclude)
        ]
        if not candidates:
            raise Unavailable(f"no healthy worker for model '{self.name}'")
        self._rr += 1
        least = min(r.inflight for r in candidates)
        tied = [r for r in candidates if r.inflight == least]
        return tied[self._rr % len(tied)]

    def mark_failed(self, replica: Replica[C]) -> None:
        replica.failures += 1
        replica.healthy = False
        replica.cooldown_until = time.monotonic() + self.cooldown_s
        log.warning("replica marked down", extra={"model": self.name, "replica": replica.url})

    @property
    def ready(self) -> bool:
        return any(r.healthy for r in self.replicas)

    def info(self) -> WorkerInfo | None:
        return next((r.info for r in self.replicas if r.info is not None), None)

    def request_sequence_cap(self) -> int | None:
        """The most sequences one request may run on this model: half the smallest known
        replica batch (`max_num_seqs`). A request that filled a replica's batch would make
        every other client's request wait in the engine's queue for whole generations; with
        half the batch free, another request joins at the engine's next step. None while no
        replica has reported a batch (not yet probed, or a worker without one)."""
        batches = [r.info.max_num_seqs for r in self.replicas if r.info and r.info.max_num_seqs]
        return max(1, min(batches) // 2) if batches else None


# A busy machine can miss one probe; a replica is marked down by probes only after a run of
# failures (a failed request marks it down at once: that is proof, a slow probe is not).
PROBE_TIMEOUT_S = 2.0
PROBES_TO_MARK_DOWN = 3


class WorkerPools:
    """The replicas of one graph's models: Octograph workers and OpenAI-compatible upstreams.

    One per graph runtime (service/gateway/graph_runtime.py). A reload keeps the pools whose
    definition did not change (`keep_workers`, `keep_upstreams`: same object, so connections,
    health and cooldowns carry over) and builds the others; whoever owns the runtimes closes a
    pool once no runtime holds it (`close_pools`)."""

    def __init__(
        self,
        urls: dict[str, list[str]],
        http: httpx.AsyncClient,
        metrics: GatewayMetrics,
        *,
        cooldown_s: float,
        upstreams: Mapping[str, Sequence[UpstreamClient]] | None = None,
        worker_secret: str | None = None,
        keep_workers: Mapping[str, ModelPool[WorkerClient]] | None = None,
        keep_upstreams: Mapping[str, ModelPool[UpstreamClient]] | None = None,
    ) -> None:
        kept_workers = keep_workers or {}
        kept_upstreams = keep_upstreams or {}
        self.workers: dict[str, ModelPool[WorkerClient]] = {
            name: kept_workers.get(name)
            or ModelPool(
                name,
                [Replica(WorkerClient(u, http, model=name, secret=worker_secret)) for u in us],
                cooldown_s,
            )
            for name, us in urls.items()
        }
        # Models on OpenAI-compatible upstreams: same health, cooldown and replica choice.
        self.upstreams: dict[str, ModelPool[UpstreamClient]] = {
            name: ModelPool(name, [Replica(c) for c in clients], cooldown_s)
            for name, clients in (upstreams or {}).items()
        }
        self.upstreams.update(kept_upstreams)
        self.pools: dict[str, ModelPool[Any]] = {**self.workers, **self.upstreams}
        self._metrics = metrics

    def __getitem__(self, model: str) -> ModelPool[WorkerClient]:
        return self.workers[model]

    @property
    def all_ready(self) -> bool:
        return all(p.ready for p in self.pools.values())

    async def probe_once(self, only: Collection[str] | None = None) -> None:
        """Probe every replica (or those of the models in `only`) once."""

        async def probe(pool: ModelPool[Any], replica: Replica[Any]) -> None:
            ok = await replica.client.ready(timeout_s=PROBE_TIMEOUT_S)
            replica.failed_probes = 0 if ok else replica.failed_probes + 1
            if ok and replica.info is None and isinstance(replica.client, WorkerClient):
                with contextlib.suppress(Exception):
                    replica.info = await replica.client.info()
            if ok and not replica.healthy and time.monotonic() >= replica.cooldown_until:
                log.info("replica up", extra={"model": pool.name, "replica": replica.url})
                replica.healthy = True
            elif replica.healthy and replica.failed_probes >= PROBES_TO_MARK_DOWN:
                pool.mark_failed(replica)
            self._metrics.worker_up.labels(pool.name, replica.url).set(1 if replica.healthy else 0)

        pools = [p for name, p in self.pools.items() if only is None or name in only]
        await asyncio.gather(*(probe(p, r) for p in pools for r in p.replicas))

    async def aclose(self) -> None:
        await close_pools(self.pools.values(), self._metrics)


async def close_pools(pools: Iterable[ModelPool[Any]], metrics: GatewayMetrics) -> None:
    """Close the replicas' clients (connections) and drop their health series."""
    for pool in pools:
        for replica in pool.replicas:
            try:
                await replica.client.aclose()
            except Exception:  # one client failing to close must not keep the others open
                log.exception("closing a replica client failed", extra={"replica": replica.url})
            with contextlib.suppress(KeyError):  # never probed: no series
                metrics.worker_up.remove(pool.name, replica.url)


# -- the one retry rule ----------------------------------------------------------------------

T = TypeVar("T")
Lease = Callable[[Replica[Any]], Callable[[], object]]


def failure_of(exc: BaseException) -> tuple[ServiceError, bool, bool] | None:
    """(error, retry elsewhere?, count against the replica?) for a failure before the first
    byte; None for anything that is not a replica's failure (it propagates as it is)."""
    if isinstance(exc, WorkerUnreachable):
        return exc, True, True
    if isinstance(exc, UpstreamFailure):
        return exc.error, exc.retry, exc.unhealthy
    return None


def counted(replica: Replica[Any]) -> Callable[[], object]:
    """A lease for one call (not a request): counts it in flight until the returned callable."""
    replica.inflight += 1

    def give_back() -> None:
        replica.inflight -= 1

    return give_back


async def first_answer(
    pool: ModelPool[C],
    call: Callable[[C], Awaitable[T]],
    lease: Lease | None = None,
    *,
    retries: int = 1,
) -> tuple[T, int]:
    """Run `call` on the least-loaded replica; if it fails before answering in a way another
    replica may not (connect refused, worker restarting, an upstream's 429/5xx), once more on
    another one. With `lease` (a request scope's), the chosen replica stays leased until the
    scope releases it (a stream outlives this call); without, it counts in flight for the
    call only. Failed attempts give theirs back at once. Returns (result, retries used).
    Every node kind and the router use this: one retry/cooldown policy (LiteLLM's Router)."""
    tried: set[str] = set()
    last: ServiceError | None = None
    for _ in range(retries + 1):
        try:
            replica = pool.pick(exclude=tried)
        except Unavailable:
            raise last or Unavailable(f"no healthy replica for model '{pool.name}'") from None
        tried.add(replica.url)
        give_back = (lease or counted)(replica)
        try:
            result = await call(replica.client)
        except BaseException as exc:
            give_back()
            failure = failure_of(exc)
            if failure is None:
                raise
            error, retry, unhealthy = failure
            if unhealthy:
                pool.mark_failed(replica)
            if not retry:
                raise error from None
            last = error
            continue
        if lease is None:
            give_back()
        return result, len(tried) - 1
    assert last is not None
    raise last
