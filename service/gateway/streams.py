"""Worker event streams -> OpenAI bodies and SSE.

Hot path: events are plain dicts from orjson, chunks are dicts serialized once with orjson;
no pydantic model is built per chunk.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import orjson

from service.errors import DeadlineExceeded, ServiceError, UpstreamError, error_from_status
from service.gateway.openai_format import (
    Choice,
    CompletionLogprobs,
    Kind,
    ResponseHeader,
    chat_logprob_entries,
    final_body,
    usage,
)
from service.protocol.internal import GenerateEvent

log = logging.getLogger(__name__)

EventStream = AsyncIterator[GenerateEvent]
DONE = b"data: [DONE]\n\n"
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


async def _timed(stream: EventStream, idle_s: float, first_index: int, job: int) -> EventStream:
    """One worker stream, checked and renumbered: each event must arrive within idle_s of the
    previous one (a stalled worker ends the request instead of holding it forever); error
    events become exceptions; choice indexes are offset to the job's first choice, and `start`
    says which prompt (job) it belongs to (echo). One generator for all of that: each layer of
    async generators costs every event."""
    watchdog = _IdleWatchdog(idle_s)
    time_now = watchdog.loop.time
    try:
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


def merge_jobs(streams: list[tuple[int, EventStream]], *, idle_timeout_s: float) -> EventStream:
    """One event stream from the worker streams of a request (completions with several
    prompts have several); a single stream is passed through without another layer."""
    timed = [_timed(s, idle_timeout_s, first, job) for job, (first, s) in enumerate(streams)]
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


async def collect(
    kind: Kind,
    header: ResponseHeader,
    events: EventStream,
    *,
    logprobs_on: bool,
    top_k: int,
    echo: bool,
    prompts: list[str],
    octograph: dict[str, Any],
) -> dict[str, Any]:
    choices: dict[int, Choice] = {}
    prompt_tokens = 0
    prompt_lps: dict[int, list[Any]] = {}
    try:
        async for ev in events:
            t = ev["type"]
            if t == "start":
                prompt_tokens += ev.get("prompt_tokens", 0)
                if "prompt_logprobs" in ev:
                    prompt_lps[ev.get("index", 0)] = ev["prompt_logprobs"]
                continue
            c = choices.get(ev["index"])
            if c is None:
                c = choices[ev["index"]] = Choice(ev["index"])
            if t == "delta":
                c.text += ev.get("text", "")
                if logprobs_on and "logprobs" in ev:
                    if kind == "chat":
                        c.chat_logprobs.extend(chat_logprob_entries(ev["logprobs"], top_k))
                    else:
                        c.completion_logprobs = c.completion_logprobs or CompletionLogprobs()
                        c.completion_logprobs.add(ev["logprobs"])
            elif t == "finish":
                c.finish_reason = ev.get("finish_reason")
                c.completion_tokens = ev.get("completion_tokens", 0)
    finally:
        await events.aclose()  # type: ignore[attr-defined]
    if echo:
        n_per_prompt = max(1, len(choices) // max(1, len(prompts)))
        for c in choices.values():
            job = c.index // n_per_prompt
            prompt = prompts[job] if job < len(prompts) else ""
            c.text = prompt + c.text
            if logprobs_on and job in prompt_lps:
                echoed = CompletionLogprobs()
                echoed.add(prompt_lps[job])
                if c.completion_logprobs:
                    echoed.add(
                        [
                            _as_event(c.completion_logprobs, i)
                            for i in range(len(c.completion_logprobs.tokens))
                        ]
                    )
                c.completion_logprobs = echoed
    return final_body(kind, header, list(choices.values()), prompt_tokens, logprobs_on, octograph)


def _as_event(lps: CompletionLogprobs, i: int) -> Any:
    return {
        "id": -1,
        "text": lps.tokens[i],
        "logprob": lps.token_logprobs[i],
        "top": [
            {"id": -1, "text": k, "logprob": v} for k, v in (lps.top_logprobs[i] or {}).items()
        ],
    }


def _sse(obj: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


async def to_sse(
    kind: Kind,
    header: ResponseHeader,
    events: EventStream,
    *,
    include_usage: bool,
    logprobs_on: bool,
    top_k: int,
    echo: bool,
    prompts: list[str],
    octograph: dict[str, Any],
    deadline: float,
    on_close: Callable[[], None],
) -> AsyncIterator[bytes]:
    """Always ends with `data: [DONE]`; a failure after the first byte becomes an error event."""
    prompt_tokens = 0
    completion_tokens = 0
    started: set[int] = set()
    first = True
    try:
        async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
            async for ev in events:
                t = ev["type"]
                if t == "start":
                    prompt_tokens += ev.get("prompt_tokens", 0)
                    continue
                idx = ev["index"]
                choice: dict[str, Any]
                if t == "delta":
                    text = ev.get("text", "")
                    if kind == "chat":
                        delta: dict[str, Any] = {"content": text}
                        if idx not in started:
                            delta["role"] = "assistant"
                        choice = {"index": idx, "delta": delta, "finish_reason": None}
                        if logprobs_on:
                            choice["logprobs"] = {
                                "content": chat_logprob_entries(ev.get("logprobs", []), top_k)
                            }
                    else:
                        if echo and idx not in started:
                            n_per = 1  # echo streams prompt text ahead of the first delta
                            job = idx // n_per if len(prompts) > 1 else 0
                            text = (prompts[job] if job < len(prompts) else "") + text
                        choice = {"index": idx, "text": text, "finish_reason": None}
                        if logprobs_on:
                            lp = CompletionLogprobs()
                            lp.add(ev.get("logprobs", []))
                            choice["logprobs"] = lp.as_dict()
                    started.add(idx)
                else:  # finish
                    completion_tokens += ev.get("completion_tokens", 0)
                    if kind == "chat":
                        choice = {
                            "index": idx,
                            "delta": {},
                            "finish_reason": ev.get("finish_reason"),
                        }
                    else:
                        choice = {
                            "index": idx,
                            "text": "",
                            "finish_reason": ev.get("finish_reason"),
                        }
                extra: dict[str, Any] = {}
                if first:
                    extra["octograph"] = octograph
                    first = False
                if include_usage:
                    extra["usage"] = None
                yield _sse(header.chunk(kind, [choice], **extra))
        if include_usage:
            yield _sse(header.chunk(kind, [], usage=usage(prompt_tokens, completion_tokens)))
    except TimeoutError:
        yield _sse(DeadlineExceeded("the request deadline passed").to_body())
    except ServiceError as exc:
        yield _sse(exc.to_body())
    except Exception:
        log.exception("stream failed")
        yield _sse(UpstreamError("the stream failed").to_body())
    finally:
        with contextlib.suppress(Exception):
            await events.aclose()  # type: ignore[attr-defined]
        on_close()
    yield DONE
