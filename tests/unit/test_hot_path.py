"""The gateway's hot path, piece by piece: SSE framing byte for byte, the collected body (usage,
finish_reason), the per-stream idle watchdog and renumbering, and the lean HTTP/1.1 client that
reads worker streams (service/gateway/clients/http11.py) against a raw asyncio server whose
bytes the test controls (chunk boundaries, closes, stalls)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import orjson
import pytest
from prometheus_client import CollectorRegistry

from service.errors import DeadlineExceeded, ServiceError
from service.gateway.clients.http11 import (
    ConnectFailed,
    Http11Pool,
    PoolExhausted,
    ProtocolFailure,
    ReadTimeout,
)
from service.gateway.console.stats import ConsoleStats
from service.gateway.observer import Observers, RequestObserver
from service.gateway.plan import ReplyShape
from service.gateway.reply import collect, to_sse
from service.gateway.runners.base import Answer
from service.gateway.streams import merge_jobs
from service.observability.metrics import GatewayMetrics
from service.protocol.internal import GenerateEvent

pytestmark = pytest.mark.asyncio

OCTO = {"route": ["general"], "scores": []}


def shape(
    kind: str = "chat",
    *,
    rid: str = "chatcmpl-r1",
    model: str = "general",
    created: int = 1700000000,
    include_usage: bool = False,
    n: int = 1,
) -> ReplyShape:
    return ReplyShape(
        kind=kind,  # type: ignore[arg-type]
        model=model,
        response_id=rid,
        n=n,
        stream=True,
        include_usage=include_usage,
        logprobs=False,
        top_logprobs=0,
        echo=None,
        created=created,
    )


def observer() -> RequestObserver:
    ids = ["general", "m"]
    sinks = Observers(GatewayMetrics(CollectorRegistry()), ConsoleStats(ids), frozenset(ids))
    return RequestObserver(sinks, "r1", time.monotonic(), time.monotonic() + 60)


def sse_of(reply: ReplyShape, events: AsyncIterator[GenerateEvent]) -> AsyncIterator[bytes]:
    return to_sse(
        reply, Answer(events=events), OCTO, deadline=time.monotonic() + 10, observer=observer()
    )


async def body_of(reply: ReplyShape, events: AsyncIterator[GenerateEvent]) -> dict[str, Any]:
    body, _ = await collect(reply, Answer(events=events), OCTO, observer())
    return body


async def events_of(items: list[GenerateEvent], delay: float = 0.0) -> AsyncIterator[GenerateEvent]:
    for ev in items:
        if delay:
            await asyncio.sleep(delay)
        yield dict(ev)  # type: ignore[misc]


def worker_events(texts: list[str], reason: str = "length") -> list[GenerateEvent]:
    evs: list[GenerateEvent] = [{"type": "start", "prompt_tokens": 7}]
    evs += [{"type": "delta", "index": 0, "text": t, "token_ids": [i]} for i, t in enumerate(texts)]
    evs.append({"type": "finish", "index": 0, "finish_reason": reason, "completion_tokens": 3})
    return evs


def sse(obj: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


# -- SSE and bodies ---------------------------------------------------------------------------


async def test_chat_sse_is_byte_for_byte_openai_framing() -> None:
    stream = sse_of(
        shape("chat", include_usage=True),
        merge_jobs([(0, None, events_of(worker_events(["Hel", "lo", "!"])))], idle_timeout_s=5),
    )
    out = b"".join([chunk async for chunk in stream])
    base = {"id": "chatcmpl-r1", "object": "chat.completion.chunk", "created": 1700000000}
    base["model"] = "general"

    def choice(delta: dict[str, Any], reason: str | None = None) -> dict[str, Any]:
        return {"index": 0, "delta": delta, "finish_reason": reason}

    expected = (
        sse({**base, "choices": [choice({"content": "Hel", "role": "assistant"})],
             "octograph": OCTO, "usage": None})
        + sse({**base, "choices": [choice({"content": "lo"})], "usage": None})
        + sse({**base, "choices": [choice({"content": "!"})], "usage": None})
        + sse({**base, "choices": [choice({}, "length")], "usage": None})
        + sse({**base, "choices": [],
               "usage": {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}})
        + b"data: [DONE]\n\n"
    )  # fmt: skip
    assert out == expected


async def test_completion_sse_without_usage_has_no_usage_key() -> None:
    stream = sse_of(
        shape("completion", rid="cmpl-r1", model="m", created=1),
        merge_jobs([(0, None, events_of(worker_events(["a", "b"], "stop")))], idle_timeout_s=5),
    )
    chunks = [c async for c in stream]
    assert chunks[-1] == b"data: [DONE]\n\n"
    bodies = [orjson.loads(c[len(b"data: ") : -2]) for c in chunks[:-1]]
    assert all("usage" not in b for b in bodies)
    assert [b["choices"][0]["text"] for b in bodies] == ["a", "b", ""]
    assert bodies[-1]["choices"][0]["finish_reason"] == "stop"
    assert bodies[0]["object"] == "text_completion" and "octograph" in bodies[0]


async def test_mid_stream_worker_error_becomes_error_event_then_done() -> None:
    evs = worker_events(["x"])[:2] + [{"type": "error", "status": 503, "message": "engine died"}]
    stream = sse_of(shape("chat"), merge_jobs([(0, None, events_of(evs))], idle_timeout_s=5))
    chunks = [c async for c in stream]
    assert chunks[-1] == b"data: [DONE]\n\n"
    err = orjson.loads(chunks[-2][len(b"data: ") :])
    assert err["error"]["message"] == "engine died"
    assert orjson.loads(chunks[0][len(b"data: ") :])["choices"][0]["delta"]["content"] == "x"


async def test_collected_body_usage_and_finish_reason_exact() -> None:
    body = await body_of(
        shape("chat"),
        merge_jobs([(0, None, events_of(worker_events(["Hel", "lo"], "stop")))], idle_timeout_s=5),
    )
    assert body == {
        "id": "chatcmpl-r1",
        "object": "chat.completion",
        "created": 1700000000,
        "model": "general",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Hello"},
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10},
        "octograph": OCTO,
    }


async def test_several_jobs_are_renumbered_and_summed() -> None:
    def job(text: str) -> list[GenerateEvent]:
        return [
            {"type": "start", "prompt_tokens": 2},
            {"type": "delta", "index": 0, "text": text},
            {"type": "delta", "index": 1, "text": text.upper()},
            {"type": "finish", "index": 0, "finish_reason": "stop", "completion_tokens": 1},
            {"type": "finish", "index": 1, "finish_reason": "length", "completion_tokens": 4},
        ]

    body = await body_of(
        shape("completion", rid="cmpl-1", model="m", created=1),
        merge_jobs(
            [(0, None, events_of(job("a"))), (2, None, events_of(job("b")))], idle_timeout_s=5
        ),
    )
    assert [(c["index"], c["text"], c["finish_reason"]) for c in body["choices"]] == [
        (0, "a", "stop"),
        (1, "A", "length"),
        (2, "b", "stop"),
        (3, "B", "length"),
    ]
    assert body["usage"] == {"prompt_tokens": 4, "completion_tokens": 10, "total_tokens": 14}


# -- idle watchdog ----------------------------------------------------------------------------


async def test_stalled_stream_raises_deadline_and_closes_upstream() -> None:
    closed = asyncio.Event()

    async def stalls() -> AsyncIterator[GenerateEvent]:
        try:
            yield {"type": "start", "prompt_tokens": 1}
            await asyncio.sleep(30)
            yield {"type": "finish", "index": 0}
        finally:
            closed.set()

    events = merge_jobs([(0, None, stalls())], idle_timeout_s=0.2)

    async def drain() -> None:
        async for _ in events:
            pass

    t0 = time.monotonic()
    with pytest.raises(DeadlineExceeded, match="stalled"):
        # The worker stalls for 30 s: only the 0.2 s watchdog ends it within the 10 s deadline.
        await asyncio.wait_for(drain(), 10)
    assert time.monotonic() - t0 >= 0.15  # not before the idle timeout
    assert closed.is_set()


async def test_slow_consumer_is_not_a_stalled_worker() -> None:
    events = merge_jobs([(0, None, events_of(worker_events(["a", "b"])))], idle_timeout_s=0.1)
    seen = []
    async for ev in events:
        seen.append(ev["type"])
        await asyncio.sleep(0.25)  # longer than the idle timeout, on the consumer's side
    assert seen == ["start", "delta", "delta", "finish"]


async def test_watchdog_keeps_outside_cancellation_a_cancellation() -> None:
    events = merge_jobs([(0, None, events_of(worker_events(["a"]), delay=10))], idle_timeout_s=5)

    async def consume() -> None:
        async for _ in events:
            pass

    task = asyncio.create_task(consume())
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_steady_stream_longer_than_idle_timeout_passes() -> None:
    evs = worker_events([str(i) for i in range(8)])
    events = merge_jobs([(0, None, events_of(evs, delay=0.05))], idle_timeout_s=0.15)
    assert len([ev async for ev in events]) == len(evs)  # 0.5 s in all, never 0.15 s idle


async def test_error_event_becomes_the_taxonomy_error() -> None:
    evs: list[GenerateEvent] = [{"type": "error", "status": 429, "message": "busy"}]
    with pytest.raises(ServiceError) as info:
        async for _ in merge_jobs([(0, None, events_of(evs))], idle_timeout_s=5):
            pass
    assert info.value.status == 429 and info.value.message == "busy"


# -- the HTTP/1.1 client ------------------------------------------------------------------------


async def until(predicate: Callable[[], bool], what: str, timeout_s: float = 10.0) -> None:
    """Wait for a condition (not a fixed sleep); fail naming it after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"not reached in {timeout_s:.0f} s: {what}"
        await asyncio.sleep(0.01)


Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class RawServer:
    """A loopback HTTP server the test scripts byte by byte; counts connections."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.disconnects = 0
        self.server: asyncio.base_events.Server | None = None
        self.port = 0

    async def __aenter__(self) -> RawServer:
        async def on_conn(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            self.connections += 1
            try:
                await self.handler(r, w)
            except (ConnectionError, asyncio.IncompleteReadError):
                pass
            finally:
                self.disconnects += 1
                w.close()

        self.server = await asyncio.start_server(on_conn, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.server.wait_closed(), 2)

    def pool(self, **kw: Any) -> Http11Pool:
        kw.setdefault("connect_timeout_s", 2.0)
        kw.setdefault("read_timeout_s", 2.0)
        return Http11Pool(f"http://127.0.0.1:{self.port}", **kw)


async def read_request(r: asyncio.StreamReader) -> tuple[bytes, bytes]:
    head = await r.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    return head, await r.readexactly(length)


def chunk(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


CHUNKED_OK = (
    b"HTTP/1.1 200 OK\r\ncontent-type: application/x-ndjson\r\ntransfer-encoding: chunked\r\n\r\n"
)


async def all_lines(pool: Http11Pool, body: bytes = b"{}") -> list[bytes]:
    resp = await pool.post_stream("/internal/generate", body, {"x-request-id": "r1"})
    assert resp.status == 200
    out: list[bytes] = []
    try:
        while lines := await resp.next_lines():
            out += lines
    finally:
        resp.close()
    return out


async def test_lines_split_across_chunks_and_keepalive_reuse() -> None:
    seen_heads: list[bytes] = []

    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        while True:
            head, body = await read_request(r)
            seen_heads.append(head)
            assert body == b'{"q":1}'
            w.write(CHUNKED_OK)
            # Line boundaries deliberately not on chunk boundaries; an empty line in between.
            for piece in (b'{"a":', b'1}\n{"b":2}\n\n{"c"', b":3}\n", b'{"d":4}'):
                w.write(chunk(piece))
                await w.drain()
                await asyncio.sleep(0.01)
            w.write(b"0\r\n\r\n")
            await w.drain()

    async with RawServer(handler) as srv:
        pool = srv.pool()
        for _ in range(3):
            lines = await all_lines(pool, b'{"q":1}')
            assert [orjson.loads(x) for x in lines] == [{"a": 1}, {"b": 2}, {"c": 3}, {"d": 4}]
        assert srv.connections == 1  # one keep-alive connection served all three
        await pool.aclose()
    head = seen_heads[0].decode()
    assert head.startswith("POST /internal/generate HTTP/1.1\r\n")
    assert f"host: 127.0.0.1:{srv.port}\r\n" in head and "x-request-id: r1\r\n" in head
    assert "content-length: 7\r\n" in head


async def test_idle_connection_closed_by_worker_is_replaced_transparently() -> None:
    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await read_request(r)
        w.write(b'HTTP/1.1 200 OK\r\ncontent-length: 8\r\n\r\n{"a":1}\n')
        await w.drain()
        # then close: the pooled connection is dead when the next request comes

    async with RawServer(handler) as srv:
        pool = srv.pool()
        assert await all_lines(pool) == [b'{"a":1}']
        await until(lambda: srv.disconnects == 1, "the worker closed the idle connection")
        assert await all_lines(pool) == [b'{"a":1}']
        assert srv.connections == 2
        await pool.aclose()


async def test_connection_closed_under_a_request_is_retried_once_on_a_new_one() -> None:
    """The keep-alive race: the worker drops a pooled connection just as a request goes out on
    it, before answering anything. The request moves to a fresh connection, once."""

    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        served = 0
        while True:
            await read_request(r)
            if served == 1:
                return  # second request on this connection: closed, unanswered
            served += 1
            w.write(b'HTTP/1.1 200 OK\r\ncontent-length: 8\r\n\r\n{"a":1}\n')
            await w.drain()

    async with RawServer(handler) as srv:
        pool = srv.pool()
        assert await all_lines(pool) == [b'{"a":1}']
        assert await all_lines(pool) == [b'{"a":1}']  # retried on connection 2
        assert srv.connections == 2
        await pool.aclose()


async def test_closing_early_drops_the_connection() -> None:
    gone = asyncio.Event()

    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await read_request(r)
        w.write(CHUNKED_OK)
        try:
            for i in range(1000):
                w.write(chunk(b'{"i":%d}\n' % i))
                await w.drain()
                await asyncio.sleep(0.01)
        except ConnectionError:
            pass
        gone.set()

    async with RawServer(handler) as srv:
        pool = srv.pool()
        resp = await pool.post_stream("/internal/generate", b"{}", {})
        assert await resp.next_lines()
        resp.close()
        await asyncio.wait_for(gone.wait(), 3)  # the worker noticed: that is the abort
        assert pool._idle == [] and pool._in_use == 0
        await pool.aclose()


async def test_error_status_and_body_are_read() -> None:
    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await read_request(r)
        body = b'{"error":{"message":"too long","code":"context_length"}}'
        w.write(b"HTTP/1.1 400 Bad Request\r\ncontent-length: %d\r\n\r\n" % len(body) + body)
        await w.drain()
        await r.read()

    async with RawServer(handler) as srv:
        pool = srv.pool()
        resp = await pool.post_stream("/internal/generate", b"{}", {})
        assert resp.status == 400
        assert orjson.loads(await resp.read())["error"]["code"] == "context_length"
        assert len(pool._idle) == 1  # a complete answer keeps its connection
        await pool.aclose()


async def test_read_timeout_and_connect_refused() -> None:
    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await read_request(r)
        w.write(CHUNKED_OK + chunk(b'{"a":1}\n'))
        await w.drain()
        await asyncio.sleep(5)

    async with RawServer(handler) as srv:
        pool = srv.pool(read_timeout_s=0.2)
        resp = await pool.post_stream("/internal/generate", b"{}", {})
        assert await resp.next_lines() == [b'{"a":1}']
        t0 = time.monotonic()
        with pytest.raises(ReadTimeout):
            await resp.next_lines()
        # After the 0.2 s read timeout; the worker's own silence (5 s) would end it otherwise.
        assert 0.15 <= time.monotonic() - t0 < 4.5
        resp.close()
        port = srv.port
    dead = Http11Pool(f"http://127.0.0.1:{port}", connect_timeout_s=1, read_timeout_s=1)
    with pytest.raises(ConnectFailed):
        await dead.post_stream("/x", b"", {})
    assert dead._in_use == 0


async def test_a_connect_timed_out_by_a_held_event_loop_is_tried_again() -> None:
    """The event loop held past the connect timeout (a thread holding the GIL) must not make a
    live worker "unreachable": the timed-out connect is tried once more."""

    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await read_request(r)
        w.write(CHUNKED_OK + chunk(b'{"a":1}\n') + b"0\r\n\r\n")
        await w.drain()
        await r.read()

    async with RawServer(handler) as srv:
        pool = srv.pool(connect_timeout_s=0.2)
        # Runs in the loop before the connect completes: the 0.2 s timeout expires meanwhile.
        asyncio.get_running_loop().call_soon(time.sleep, 0.6)
        assert await all_lines(pool) == [b'{"a":1}']
        assert srv.connections == 2  # the first connect was given up, the second served


async def test_pool_bound_waits_then_gives_up() -> None:
    release = asyncio.Event()

    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await read_request(r)
        w.write(CHUNKED_OK)
        await w.drain()
        await release.wait()
        w.write(chunk(b'{"a":1}\n') + b"0\r\n\r\n")
        await w.drain()
        await r.read()

    async with RawServer(handler) as srv:
        pool = srv.pool(max_connections=1, connect_timeout_s=0.2)
        first = await pool.post_stream("/g", b"{}", {})
        with pytest.raises(PoolExhausted, match="busy"):
            await pool.post_stream("/g", b"{}", {})
        waiting = asyncio.create_task(pool.post_stream("/g", b"{}", {}))
        await asyncio.sleep(0.05)
        assert not waiting.done()
        first.close()  # frees the slot
        second = await asyncio.wait_for(waiting, 1)
        release.set()
        assert await second.next_lines() == [b'{"a":1}']
        second.close()
        await pool.aclose()


async def test_garbage_answer_is_a_protocol_failure() -> None:
    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await read_request(r)
        w.write(b"SMTP ready\r\n\r\n")
        await w.drain()
        await r.read()

    async with RawServer(handler) as srv:
        pool = srv.pool()
        with pytest.raises(ProtocolFailure):
            await pool.post_stream("/g", b"{}", {})
        assert pool._in_use == 0
        await pool.aclose()


async def test_large_stream_passes_flow_control_intact() -> None:
    n = 20_000  # ~1.3 MB: well past the pause threshold several times over

    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await read_request(r)
        w.write(CHUNKED_OK)
        batch = b"".join(b'{"i":%d,"pad":"%s"}\n' % (i, b"x" * 40) for i in range(n))
        for k in range(0, len(batch), 65536):
            w.write(chunk(batch[k : k + 65536]))
        w.write(b"0\r\n\r\n")
        await w.drain()
        await r.read()

    async with RawServer(handler) as srv:
        pool = srv.pool()
        resp = await pool.post_stream("/g", b"{}", {})
        # Nobody reads: the server fills our buffer until reading pauses (waited for, with a
        # deadline: a busy machine is slow to fill it, not wrong).
        await until(lambda: resp._conn.paused, "the connection paused reading")
        got = 0
        while lines := await resp.next_lines():
            for line in lines:
                assert orjson.loads(line)["i"] == got
                got += 1
        resp.close()
        assert got == n
        await pool.aclose()


async def test_header_injection_is_refused() -> None:
    pool = Http11Pool("http://127.0.0.1:9", connect_timeout_s=1, read_timeout_s=1)
    with pytest.raises(ValueError):
        await pool.post_stream("/g", b"", {"x-request-id": "a\r\nx-evil: 1"})
    assert pool._in_use == 0
