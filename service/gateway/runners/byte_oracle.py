"""Reduction oracles that live on a worker: the wire format and the sync/async bridge.

The covering tree (covering.py) is synchronous: it calls `oracle.reduce(queries)` and gets the
reductions back.  The gateway is asyncio.  `BridgedOracle` is the sync oracle a tree uses when
it runs in a worker thread: each `reduce` schedules the async HTTP call on the event loop and
waits for it, bounded by the request's remaining time, and gives up at once when the request
is cancelled.  Why threads rather than an async copy of the tree: one tree implementation
serves the gateway, `octograph ensemble eval`, the tests and the worker; the tree's own CPU
work (canonical re-encoding with the member's tokenizer, numpy over the token table) stays off
the event loop; and the members of an ensemble step concurrently, one thread each, while the
loop keeps serving other requests.  The price is one thread hand-off per member per byte
(tens of microseconds), small beside a worker forward.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import math
import threading
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from service.bytelevel.reduction import Reduction, ReductionQuery
from service.bytelevel.wire import MAX_QUERIES_PER_CALL, from_wire, to_wire
from service.errors import DeadlineExceeded, UpstreamError
from service.gateway.clients.pool import ModelPool, Replica
from service.gateway.clients.worker import WorkerUnreachable
from service.protocol.internal import ByteDistRequest

NEG_INF = -math.inf


class RequestCancelled(Exception):
    """The request this oracle serves has ended (client gone, deadline, error elsewhere)."""


class PoolReducer:
    """Async reductions from one model's workers.  A request sticks to one replica so the
    worker's prefix cache and path LRU stay warm; an unreachable replica is swapped once."""

    def __init__(
        self,
        pool: ModelPool,
        request_id: str,
        headers: dict[str, str],
        *,
        speculate: int = 0,
        speculate_min_p: float = 0.0,
        speculate_with: str = "step",
        sessions: bool = True,
    ) -> None:
        self.pool = pool
        self.request_id = request_id
        self.headers = headers
        # Children per query the worker fetches ahead, and the share of the mass they need.
        self.speculate = speculate
        self.speculate_min_p = speculate_min_p
        self.speculate_with = speculate_with
        # New paths as extensions of the worker's streaming sessions (False: benches compare).
        self.sessions = sessions
        self.calls = 0
        self.queries = 0
        self.fetched = 0  # paths the calls waited on a forward for
        self.fetching_calls = 0  # calls that waited on one or more forwards
        self.speculated = 0
        self.speculation_hits = 0
        self.extended = 0  # fetched paths the worker computed as a session's extension
        self._replica: Replica | None = None

    async def reduce(self, queries: Sequence[ReductionQuery]) -> list[Reduction]:
        chunks = [
            queries[i : i + MAX_QUERIES_PER_CALL]
            for i in range(0, len(queries), MAX_QUERIES_PER_CALL)
        ]
        answers = await asyncio.gather(*(self._call(list(c)) for c in chunks))
        return [r for part in answers for r in part]

    async def _call(self, queries: list[ReductionQuery]) -> list[Reduction]:
        request = ByteDistRequest(
            request_id=self.request_id,
            queries=to_wire(queries),
            speculate=self.speculate,
            speculate_min_p=self.speculate_min_p,
            speculate_with=self.speculate_with,
            sessions=self.sessions,
        )
        tried: set[str] = set()
        while True:
            replica = self._replica
            if replica is None or replica.url in tried:
                replica = self._replica = self.pool.pick(exclude=tried)
            replica.inflight += 1
            try:
                response = await replica.client.byte_dist(request, self.headers)
            except WorkerUnreachable:
                self.pool.mark_failed(replica)
                tried.add(replica.url)
                if len(tried) > 1:
                    raise
                continue
            finally:
                replica.inflight -= 1
            break
        self.calls += 1
        self.queries += len(queries)
        self.fetched += response.fetched
        self.fetching_calls += response.fetched > 0
        self.speculated += response.speculated
        self.speculation_hits += response.speculation_hits
        self.extended += response.extended
        if len(response.results) != len(queries):
            raise UpstreamError("byte-dist answered a different number of results")
        return [from_wire(r) for r in response.results]


AsyncReduce = Callable[[Sequence[ReductionQuery]], Coroutine[Any, Any, list[Reduction]]]


class BridgedOracle:
    """A synchronous `ReductionOracle` (for a tree running in a worker thread) over an async
    reducer running on `loop`.  `remaining()` gives the seconds left to the request."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        reduce: AsyncReduce,
        remaining: Callable[[], float],
        cancelled: threading.Event,
    ) -> None:
        self.loop = loop
        self._reduce = reduce
        self._remaining = remaining
        self._cancelled = cancelled
        self._inflight: set[concurrent.futures.Future[list[Reduction]]] = set()
        self._lock = threading.Lock()

    def reduce(self, queries: Sequence[ReductionQuery]) -> list[Reduction]:
        if self._cancelled.is_set():
            raise RequestCancelled()
        timeout = self._remaining()  # raises DeadlineExceeded when nothing is left
        future: concurrent.futures.Future[list[Reduction]] = asyncio.run_coroutine_threadsafe(
            self._reduce(list(queries)), self.loop
        )
        with self._lock:
            self._inflight.add(future)
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise DeadlineExceeded("the request deadline passed") from None
        except concurrent.futures.CancelledError:
            raise RequestCancelled() from None
        finally:
            with self._lock:
                self._inflight.discard(future)

    def cancel(self) -> None:
        """Called from the event loop when the request ends: pending calls stop at once."""
        self._cancelled.set()
        with self._lock:
            pending = list(self._inflight)
        for future in pending:
            future.cancel()
