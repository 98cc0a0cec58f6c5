"""Worker event streams, checked and merged: one stream of the gateway's events per request.

Hot path: events are plain dicts from orjson; no pydantic model is built per event. The reply
renderer (reply.py) turns the merged stream into JSON or SSE.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Sequence

from service.errors import DeadlineExceeded, error_from_status
from service.protocol.internal import GenerateEvent

log = logging.getLogger(__name__)

EventStream = AsyncIterator[GenerateEvent]
MERGE_QUEUE_BOUND = 256


class _IdleWatchdog:
    """Cancels the task reading a stream when it has waited idle_s for one event.

    asyncio.wait_for per event creates a task per event on Python 3.11, and rescheduling an
    asyncio.timeout twice per event was ~7% of the gateway's CPU; this timer is armed once per
    idle_s and each event only notes the time. It fires only while the reader waits: a slow
    client (the event sits with the consumer) is not a stalled worker."""

    def __init__(self, idle_s: float) -> None:
        self.idle_s = idle_s
        self.loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None
        self.task = task
        self.waiting_since: float | None = None
        self.expired = False
        self.handle = self.loop.call_at(self.loop.time() + idle_s, self._check)

    def _check(self) -> None:
        since = self.waiting_since
        now = self.loop.time()
        if since is not None and now - since >= self.idle_s:
            self.expired = True
            self.task.cancel()
            return
        self.handle = self.loop.call_at((since or now) + self.idle_s, self._check)

    def close(self) -> None:
        self.handle.cancel()


async def _timed(
    stream: EventStream, idle_s: float, first_index: int, job: int, first: GenerateEvent | None
) -> EventStream:
    """One worker stream, checked and renumbered: each event must arrive within idle_s of the
    previous one (a stalled worker ends the request instead of holding it forever); error
    events become exceptions; choice indexes are offset to the job's first choice, and `start`
    says which prompt (job) it belongs to (echo). One generator for all of that: each layer of
    async generators costs every event."""
    watchdog = _IdleWatchdog(idle_s)
    time_now = watchdog.loop.time
    try:
        if first is not None:  # already read while the stream was opened (retry rule)
            if first["type"] == "start":
                first["index"] = job
            yield first
        while True:
            watchdog.waiting_since = time_now()
            try:
                event = await anext(stream)
            except StopAsyncIteration:
                return
            except asyncio.CancelledError:
                if watchdog.expired and watchdog.task.uncancel() == 0:
                    raise DeadlineExceeded(
                        f"no tokens for {idle_s:g}s: the stream stalled"
                    ) from None
                raise
            watchdog.waiting_since = None
            t = event["type"]
            if t == "start":
                event["index"] = job
            elif t == "error":
                raise error_from_status(
                    int(event.get("status", 502)), str(event.get("message", "worker error"))
                )
            elif first_index and "index" in event:
                event["index"] += first_index
            yield event
    finally:
        watchdog.close()
        with contextlib.suppress(Exception):
            await stream.aclose()  # type: ignore[attr-defined]


Job = tuple[int, GenerateEvent | None, EventStream]  # (first choice index, first event, stream)


def merge_jobs(streams: Sequence[Job], *, idle_timeout_s: float) -> EventStream:
    """One event stream from the worker streams of a request (completions with several
    prompts have several); a single stream is passed through without another layer."""
    timed = [
        _timed(s, idle_timeout_s, index, job, first)
        for job, (index, first, s) in enumerate(streams)
    ]
    if len(timed) == 1:
        return timed[0]
    return interleave(timed)


async def interleave(timed: list[EventStream], bound: int = MERGE_QUEUE_BOUND) -> EventStream:
    """Events of several streams in arrival order (one pump task each, a bounded queue); the
    first failure is re-raised to the consumer and every stream is closed at the end."""
    queue: asyncio.Queue[GenerateEvent | BaseException | None] = asyncio.Queue(bound)

    async def pump(stream: EventStream) -> None:
        try:
            async for event in stream:
                await queue.put(event)
            await queue.put(None)
        except BaseException as exc:  # forwarded to the consumer, which re-raises it
            await queue.put(exc)

    tasks = [asyncio.create_task(pump(s)) for s in timed]
    try:
        remaining = len(tasks)
        while remaining:
            item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for s in timed:
            with contextlib.suppress(Exception):
                await s.aclose()  # type: ignore[attr-defined]
