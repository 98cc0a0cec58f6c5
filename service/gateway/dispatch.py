"""Opening a generation stream on a model's workers, with the single retry rule: a request that
has not produced its first event may move once to another replica; after that, never."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from service.errors import ServiceError, Unavailable
from service.protocol.internal import GenerateEvent, GenerateRequest
from service.worker.client import WorkerUnreachable
from service.worker.pool import ModelPool, Replica


async def _first_event(
    replica: Replica, request: GenerateRequest, headers: dict[str, str]
) -> tuple[AsyncIterator[GenerateEvent], GenerateEvent]:
    stream = replica.client.stream_generate(request, headers)
    try:
        first = await anext(stream)
    except StopAsyncIteration:
        raise WorkerUnreachable("the worker closed the stream before answering") from None
    except BaseException:
        await stream.aclose()  # type: ignore[attr-defined]
        raise
    return stream, first


async def open_model_stream(
    pool: ModelPool, request: GenerateRequest, headers: dict[str, str], *, retries: int = 1
) -> tuple[AsyncIterator[GenerateEvent], int]:
    """Returns (events starting with `start`, number of retries used)."""
    tried: set[str] = set()
    last: ServiceError = Unavailable(f"no healthy worker for model '{pool.name}'")
    for _ in range(retries + 1):
        try:
            replica = pool.pick(exclude=tried)
        except Unavailable:
            raise last from None
        tried.add(replica.url)
        replica.inflight += 1
        try:
            stream, first = await _first_event(replica, request, headers)
        except WorkerUnreachable as exc:
            replica.inflight -= 1
            pool.mark_failed(replica)
            last = exc
            continue
        except BaseException:
            replica.inflight -= 1
            raise
        if first.get("type") == "error":
            replica.inflight -= 1
            await stream.aclose()  # type: ignore[attr-defined]
            from service.errors import error_from_status

            raise error_from_status(int(first.get("status", 502)), str(first.get("message", "")))
        return _tracked(replica, first, stream), len(tried) - 1
    raise last


async def _tracked(
    replica: Replica, first: GenerateEvent, stream: AsyncIterator[GenerateEvent]
) -> AsyncIterator[GenerateEvent]:
    ended = False
    try:
        yield first
        async for event in stream:
            yield event
        ended = True
    finally:
        replica.inflight -= 1
        if not ended:
            # Closing the HTTP stream is what tells the worker to abort; shield it so a
            # cancelled client request still releases the upstream work. (A stream that ended
            # has nothing to close: no shield task on the common path.)
            with contextlib.suppress(Exception):
                await asyncio.shield(stream.aclose())  # type: ignore[attr-defined]
