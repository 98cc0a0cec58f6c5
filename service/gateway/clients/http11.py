"""A small HTTP/1.1 client for the gateway's hot path: POST a JSON body to a worker and read its
NDJSON stream line by line.

Why not httpx here: under load httpx cost about 60% of the gateway's CPU per request
(bench/gateway_overhead.py --profile): httpcore scans every pooled connection for each request,
and each read goes through anyio stream wrappers and the pure-Python h11 parser. This client is
one asyncio Protocol per connection with the httptools C parser (already used by uvicorn) and a
keep-alive pool per worker. It does only what /internal/generate needs: no redirects, no
proxies, no cookies, no compression. httpx stays for everything else (probes, score, info).

Bounds: at most `max_connections` requests in flight per worker (waiting for a slot is bounded
by the connect timeout); a response buffers at most HIGH_WATER bytes before reading pauses
(flow control to the worker) and a line may not exceed MAX_LINE bytes. Every wait has a
timeout: connect, each read (`read_timeout_s` between two pieces of data), the pool slot.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections import deque
from urllib.parse import urlsplit

import httptools

HIGH_WATER = 256 * 1024  # bytes buffered before the worker's socket is paused
MAX_LINE = 16 * 1024 * 1024  # one NDJSON event; longer is a broken worker
MAX_ERROR_BODY = 64 * 1024


class ConnectFailed(Exception):
    """No connection could be made (or no pool slot in time): nothing reached the worker."""


class PoolExhausted(Exception):
    """Every connection to this replica is busy: load, not a sign that the replica is down."""


class ReadTimeout(Exception):
    """No data within the read timeout."""


class ProtocolFailure(Exception):
    """The connection broke or the worker answered something that is not HTTP/1.1."""


class _Connection(asyncio.Protocol):
    """One keep-alive connection; serves one request at a time."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.status = 0
        self.headers_done = False
        self.complete = False
        self.keep_alive = False
        self.closed = False
        self.error: BaseException | None = None
        self.chunks: deque[bytes] = deque()
        self.buffered = 0
        self.paused = False
        self.idle_since = 0.0
        self._waiter: asyncio.Future[None] | None = None

    # -- asyncio.Protocol -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(ProtocolFailure("unexpected protocol upgrade"))
        except httptools.HttpParserError as exc:
            self._fail(ProtocolFailure(f"bad HTTP response: {exc}"))

    def eof_received(self) -> bool | None:
        return None  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if not self.complete and self.error is None:
            self.error = ProtocolFailure(f"connection closed: {exc or 'by the worker'}")
        self._wake()

    # -- httptools callbacks ----------------------------------------------------------------

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        self.headers_done = True
        self._wake()

    def on_body(self, body: bytes) -> None:
        self.chunks.append(body)
        self.buffered += len(body)
        if self.buffered > HIGH_WATER and not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        self.complete = True
        self.keep_alive = self.parser.should_keep_alive()
        self._wake()

    # -- used by the pool -------------------------------------------------------------------

    def _fail(self, exc: BaseException) -> None:
        if self.error is None:
            self.error = exc
        self.close()
        self._wake()

    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            self.closed = True
            self.transport.close()

    def reset(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.status, self.headers_done, self.complete, self.keep_alive = 0, False, False, False
        self.chunks.clear()
        self.buffered = 0

    async def wait(self, timeout_s: float) -> None:
        """Until something happened (data, end of message, close) or the read timeout."""
        waiter = self._waiter = self._loop.create_future()
        timer = self._loop.call_later(timeout_s, _expire, waiter)
        try:
            await waiter
        finally:
            timer.cancel()
            self._waiter = None

    def take(self) -> bytes:
        data = self.chunks[0] if len(self.chunks) == 1 else b"".join(self.chunks)
        self.chunks.clear()
        self.buffered = 0
        if self.paused and self.transport is not None and not self.closed:
            self.paused = False
            self.transport.resume_reading()
        return data


def _closing(transport: asyncio.Transport | None) -> bool:
    return transport is None or transport.is_closing()


def _expire(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_exception(ReadTimeout())


class StreamResponse:
    """The status, then the body as lines or whole. Always close() it (or read to the end):
    closing before the end drops the connection, which tells the worker to abort."""

    def __init__(self, pool: Http11Pool, conn: _Connection) -> None:
        self._pool = pool
        self._conn = conn
        self._done = False
        self._tail = b""
        self.status = conn.status

    async def next_lines(self) -> list[bytes]:
        """The next non-empty lines of the body (without newlines), as many as have arrived;
        an empty list at the end of the body. Batches: one await per network read, not per
        line, which is what a fast token stream needs."""
        conn = self._conn
        while True:
            if conn.chunks:
                data = conn.take()
                if self._tail:
                    data = self._tail + data
                lines = data.split(b"\n")
                self._tail = lines.pop()
                if len(self._tail) > MAX_LINE:
                    raise ProtocolFailure(f"a line of the worker's stream exceeds {MAX_LINE} bytes")
                lines = [line for line in lines if line]
                if lines:
                    return lines
                continue
            if conn.complete:
                last, self._tail = self._tail, b""
                if last.strip():
                    return [last]
                self._finish()
                return []
            if conn.error is not None:
                raise conn.error
            await conn.wait(self._pool.read_timeout_s)

    async def read(self, limit: int = MAX_ERROR_BODY) -> bytes:
        conn, timeout = self._conn, self._pool.read_timeout_s
        out = bytearray()
        while True:
            if conn.chunks:
                out += conn.take()
                if len(out) > limit:
                    raise ProtocolFailure(f"the worker's answer exceeds {limit} bytes")
                continue
            if conn.complete:
                break
            if conn.error is not None:
                raise conn.error
            await conn.wait(timeout)
        self._finish()
        return bytes(out)

    def _finish(self) -> None:
        if not self._done:
            self._done = True
            self._pool._release(self._conn, reusable=self._conn.keep_alive)

    def close(self) -> None:
        """Idempotent; a response not read to its end closes its connection."""
        if not self._done:
            self._done = True
            self._pool._release(self._conn, reusable=False)


class Http11Pool:
    """Keep-alive connections to one worker (http or https base URL)."""

    def __init__(
        self,
        base_url: str,
        *,
        connect_timeout_s: float,
        read_timeout_s: float,
        max_connections: int = 512,
        idle_expiry_s: float = 20.0,
    ) -> None:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {base_url!r}")
        self.host = parts.hostname
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.ssl: ssl.SSLContext | None = (
            ssl.create_default_context() if parts.scheme == "https" else None
        )
        self.base_path = parts.path.rstrip("/")
        default_port = (parts.scheme == "http" and self.port == 80) or (
            parts.scheme == "https" and self.port == 443
        )
        host = f"[{self.host}]" if ":" in self.host else self.host  # IPv6 literal
        self.host_header = host if default_port else f"{host}:{self.port}"
        self.connect_timeout_s = connect_timeout_s
        self.read_timeout_s = read_timeout_s
        # Shorter than the workers' keep-alive (30 s, service/serving.py) so we never send on a
        # connection the worker is closing.
        self.idle_expiry_s = idle_expiry_s
        self.max_connections = max_connections
        self._idle: list[_Connection] = []
        self._in_use = 0
        self._slots: asyncio.Semaphore | None = None

    async def post_stream(self, path: str, body: bytes, headers: dict[str, str]) -> StreamResponse:
        """Sends the request and returns once the status line and headers are in. A failure to
        connect raises ConnectFailed; a reused keep-alive connection that turns out closed is
        replaced once, transparently (nothing was answered on it)."""
        head = self._head(path, len(body), headers)
        await self._acquire_slot()
        try:
            for attempt in range(2):
                conn, reused = await self._connection()
                conn.reset()
                try:
                    assert conn.transport is not None
                    conn.transport.write(head + body)
                except (RuntimeError, OSError) as exc:  # closed under us (uvloop raises)
                    conn.error = ProtocolFailure(f"connection closed: {exc}")
                try:
                    while not conn.headers_done:
                        if conn.error is not None:
                            raise conn.error
                        await conn.wait(self.read_timeout_s)
                except ProtocolFailure:
                    conn.close()
                    if reused and attempt == 0 and not conn.headers_done:
                        continue  # the worker had closed the idle connection: a fresh one
                    raise
                except BaseException:
                    conn.close()
                    raise
                return StreamResponse(self, conn)
            raise ProtocolFailure("unreachable")  # pragma: no cover
        except BaseException:
            self._release_slot()
            raise

    async def aclose(self) -> None:
        for conn in self._idle:
            conn.close()
        self._idle.clear()

    # -- internals --------------------------------------------------------------------------

    def _head(self, path: str, length: int, headers: dict[str, str]) -> bytes:
        lines = [
            f"POST {self.base_path}{path} HTTP/1.1",
            f"host: {self.host_header}",
            f"content-length: {length}",
        ]
        for k, v in headers.items():
            if "\r" in v or "\n" in v or "\r" in k or "\n" in k:
                raise ValueError("header with a line break")
            lines.append(f"{k}: {v}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    async def _acquire_slot(self) -> None:
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.max_connections)
        if not self._slots.locked():
            await self._slots.acquire()  # free slot: returns without suspending
        else:
            try:
                async with asyncio.timeout(self.connect_timeout_s):
                    await self._slots.acquire()
            except TimeoutError:
                raise PoolExhausted(
                    f"all {self.max_connections} connections to the worker are busy"
                ) from None
        self._in_use += 1

    def _release_slot(self) -> None:
        self._in_use -= 1
        assert self._slots is not None
        self._slots.release()

    async def _connection(self) -> tuple[_Connection, bool]:
        now = time.monotonic()
        while self._idle:
            conn = self._idle.pop()
            fresh = now - conn.idle_since < self.idle_expiry_s
            if fresh and not conn.closed and not _closing(conn.transport):
                return conn, True
            conn.close()
        loop = asyncio.get_running_loop()
        # A timed-out connect is tried once more: the timeout also fires when this event loop
        # was held past it (seen: a 262k-token byte table parsed in a thread, holding the GIL
        # ~3 s, made a healthy loopback worker "unreachable" and marked it down). A refused
        # connect fails at once; a host that never answers costs two timeouts.
        for attempt in range(2):
            try:
                async with asyncio.timeout(self.connect_timeout_s):
                    _, conn = await loop.create_connection(
                        lambda: _Connection(loop), self.host, self.port, ssl=self.ssl
                    )
            except TimeoutError as exc:
                if attempt == 0:
                    continue
                raise ConnectFailed(f"{type(exc).__name__}: {exc}") from None
            except OSError as exc:
                raise ConnectFailed(f"{type(exc).__name__}: {exc}") from None
            return conn, False
        raise ConnectFailed("unreachable")  # pragma: no cover

    def _release(self, conn: _Connection, *, reusable: bool) -> None:
        if reusable and conn.complete and not conn.closed and conn.error is None:
            conn.idle_since = time.monotonic()
            self._idle.append(conn)
        else:
            conn.close()
        self._release_slot()
