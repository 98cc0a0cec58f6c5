"""What one request holds, released in one place that always runs.

A request takes replica leases (in-flight counts that steer replica choice), admission tickets
and open worker streams. Each is registered here when taken, and `RequestScope.aclose` gives
them all back, in reverse order, exactly once: the pipeline calls it when a request fails
before its reply exists, the front door when the reply ends however it ends (done, error,
client gone). Nothing is released in an async generator's `finally`, which never runs for a
generator that was never started.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from service.gateway.clients.pool import Replica

log = logging.getLogger(__name__)

Release = Callable[[], Awaitable[None] | None]


class RequestScope:
    def __init__(self) -> None:
        self._releases: list[Release] = []
        self.closed = False

    def on_close(self, release: Release) -> Release:
        """Register `release` to run when the request ends; returns a callable that runs it
        now instead (once), for a resource given back early (a replica left for a retry)."""
        done = False

        def once() -> Awaitable[None] | None:
            nonlocal done
            if done:
                return None
            done = True
            return release()

        self._releases.append(once)
        return once

    def lease(self, replica: Replica[Any]) -> Release:
        """Count a request in flight on `replica` until the request ends (or the returned
        callable is called)."""
        replica.inflight += 1

        def give_back() -> None:
            replica.inflight -= 1

        return self.on_close(give_back)

    async def aclose(self) -> None:
        if self.closed:
            return
        self.closed = True
        for release in reversed(self._releases):
            try:
                pending = release()
                if pending is not None:
                    # Closing a worker stream is what aborts the worker. The callers run this
                    # where a disconnect no longer cancels them (the front door's shield, the
                    # pipeline's failure path): no shield task per request on the hot path.
                    await pending
            except asyncio.CancelledError:
                continue
            except Exception:
                log.exception("releasing a request resource failed")
        self._releases.clear()


async def close_quietly(stream: Any) -> None:
    """`aclose` an async iterator if it has one, ignoring errors (the request is over)."""
    close = getattr(stream, "aclose", None)
    if close is not None:
        with contextlib.suppress(Exception):
            await close()
