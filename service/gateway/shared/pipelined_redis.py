"""A lean asyncio Redis client for the per-key limits' request path: one persistent connection,
commands pipelined.

Why not redis-py's asyncio client here: each of its commands costs 55-65 us of CPU (pool
checkout, a timer per call, the reply parsed in Python), against ~15 us for a raw round trip,
and the gateway pays it once or twice per request. This client is an `asyncio.Protocol` on one
connection: a command is an encoded RESP array appended to an output buffer that is written on
the loop's next turn (so concurrent requests' commands leave in one write), and its reply
resolves a future; Redis answers a connection's commands in order, so replies are matched to
futures first in, first out. Replies are parsed by hiredis's C reader (`hiredis.Reader`).

Every call is bounded by `timeout_s` (connect, AUTH/SELECT, reply): one timer per connection
watches the oldest unanswered command, and a command unanswered past its deadline closes the
connection, failing every command on it (a late reply could no longer be matched safely to a
connection in an unknown state). The next call connects again. Commands waiting on the
connection are bounded (MAX_PENDING): beyond that a call fails at once.

Only plain TCP (`redis://`): `PipelinedRedis.from_redis` returns None for TLS (`rediss://`) or a
Unix socket, and the caller keeps using redis-py for those.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections import deque
from typing import TYPE_CHECKING, Any, cast

import hiredis

if TYPE_CHECKING:
    from redis.asyncio import Redis

MAX_PENDING = 4096  # commands sent and not yet answered, per connection
RespArg = bytes | str | int


class RedisReplyError(Exception):
    """Redis answered a command with an error (e.g. NOSCRIPT, WRONGTYPE)."""


def bulk(arg: RespArg) -> bytes:
    """One argument as a RESP bulk string."""
    if isinstance(arg, str):
        arg = arg.encode()
    elif isinstance(arg, int):
        arg = b"%d" % arg
    return b"$%d\r\n%s\r\n" % (len(arg), arg)


def array_header(count: int) -> bytes:
    """The start of a command of `count` arguments (their bulk strings follow)."""
    return b"*%d\r\n" % count


def encode_command(args: tuple[RespArg, ...]) -> bytes:
    """One command as a RESP array of bulk strings."""
    return array_header(len(args)) + b"".join(map(bulk, args))


class _Connection(asyncio.Protocol):
    """One connection: writes batched per loop turn, replies matched FIFO to futures."""

    def __init__(self, loop: asyncio.AbstractEventLoop, timeout_s: float) -> None:
        self.loop = loop
        self.timeout_s = timeout_s
        self.reader = hiredis.Reader()
        self.transport: asyncio.Transport | None = None
        # (future, deadline on the loop's clock) of every command sent and not yet answered
        self.waiting: deque[tuple[asyncio.Future[Any], float]] = deque()
        self.out: list[bytes] = []  # encoded commands for the next write (bounded by waiting)
        self.flush_scheduled = False
        self.watchdog: asyncio.TimerHandle | None = None
        self.closed = False

    # -- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport (uvloop's does not subclass asyncio.Transport: no isinstance).
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        while True:
            try:
                reply = self.reader.gets()
            except hiredis.ProtocolError as exc:
                self.fail(ConnectionError(f"Redis protocol error: {exc}"))
                return
            if reply is False:
                return
            if not self.waiting:
                self.fail(ConnectionError("Redis sent a reply nobody asked for"))
                return
            future, _ = self.waiting.popleft()
            if future.done():  # its caller went away (cancelled); the reply is dropped
                continue
            if isinstance(reply, hiredis.ReplyError):
                future.set_exception(RedisReplyError(str(reply)))
            else:
                future.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self.fail(ConnectionError(f"Redis connection lost: {exc or 'closed by the server'}"))

    # -- sending

    def send(self, command: bytes) -> asyncio.Future[Any]:
        if self.closed:
            raise ConnectionError("Redis connection closed")
        if len(self.waiting) >= MAX_PENDING:
            raise ConnectionError(f"{MAX_PENDING} Redis commands already waiting for replies")
        future: asyncio.Future[Any] = self.loop.create_future()
        self.waiting.append((future, self.loop.time() + self.timeout_s))
        self.out.append(command)
        if not self.flush_scheduled:
            # Commands of the same loop turn (concurrent requests) leave in one write.
            self.flush_scheduled = True
            self.loop.call_soon(self._flush)
        if self.watchdog is None:
            self.watchdog = self.loop.call_at(self.waiting[0][1], self._check_deadline)
        return future

    def _flush(self) -> None:
        self.flush_scheduled = False
        if self.closed or not self.out or self.transport is None:
            return
        data = b"".join(self.out) if len(self.out) > 1 else self.out[0]
        self.out.clear()
        self.transport.write(data)

    def _check_deadline(self) -> None:
        self.watchdog = None
        if not self.waiting:
            return
        head_deadline = self.waiting[0][1]
        if self.loop.time() >= head_deadline:
            self.fail(TimeoutError(f"Redis did not answer within {self.timeout_s} s"))
            return
        self.watchdog = self.loop.call_at(head_deadline, self._check_deadline)

    def fail(self, exc: BaseException) -> None:
        """Close the connection and fail every command still waiting on it."""
        if self.closed:
            return
        self.closed = True
        if self.watchdog is not None:
            self.watchdog.cancel()
            self.watchdog = None
        self.out.clear()
        waiting, self.waiting = self.waiting, deque()
        for future, _ in waiting:
            if not future.done():
                future.set_exception(exc)
                future.exception()  # a command nobody awaits any more does not warn
        if self.transport is not None:
            self.transport.abort()


class Script:
    """A Lua script run by EVALSHA (its SHA1 is computed here, as Redis does)."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest().encode()


class PipelinedRedis:
    """One pipelined connection to a plain-TCP Redis, (re)connected on demand."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        db: int = 0,
        username: str | None = None,
        password: str | None = None,
        timeout_s: float,
    ) -> None:
        self.host = host
        self.port = port
        self.db = db
        self.username = username
        self.password = password
        self.timeout_s = timeout_s
        self._connection: _Connection | None = None
        self._connecting: asyncio.Task[_Connection] | None = None
        self._closed = False
        self.connects = 0  # connections made (a reconnect after a failure counts too)

    @classmethod
    def from_redis(cls, redis: Redis) -> PipelinedRedis | None:
        """The same server, credentials and timeout as redis-py's client `redis`; None for
        a TLS or Unix-socket connection (left to redis-py)."""
        from redis.asyncio.connection import Connection

        pool = redis.connection_pool
        if pool.connection_class is not Connection:  # SSLConnection, UnixDomainSocketConnection
            return None
        kw = pool.connection_kwargs
        timeout = kw.get("socket_timeout") or kw.get("socket_connect_timeout") or 1.0
        return cls(
            str(kw.get("host", "localhost")),
            int(kw.get("port", 6379)),
            db=int(kw.get("db", 0) or 0),
            username=kw.get("username"),
            password=kw.get("password"),
            timeout_s=float(timeout),
        )

    async def execute(self, *args: RespArg) -> Any:
        """Send one command and return its reply (bytes, int, list, None); raises
        RedisReplyError for an error reply, ConnectionError or TimeoutError when Redis cannot
        answer within `timeout_s`."""
        return await self.call(encode_command(args))

    async def call(self, command: bytes) -> Any:
        """`execute` for a command already encoded (`encode_command`)."""
        connection = self._connection
        if connection is None or connection.closed:
            if self._closed:
                raise ConnectionError("Redis client closed")
            connection = await self._connect()
        return await connection.send(command)

    def send_nowait(self, command: bytes) -> asyncio.Future[Any] | None:
        """Send an encoded command on the open connection without a coroutine (its reply
        resolves the future); None when there is no open connection (use `call`)."""
        connection = self._connection
        if connection is None or connection.closed:
            return None
        return connection.send(command)

    async def evalsha(self, script: Script, keys: list[str], args: tuple[RespArg, ...]) -> Any:
        """Run `script`; a server that does not know it (restarted, SCRIPT FLUSH) is sent it
        with SCRIPT LOAD and asked once more."""
        command = encode_command((b"EVALSHA", script.sha, len(keys), *keys, *args))
        return await self.run_script(script, command)

    async def run_script(self, script: Script, evalsha: bytes) -> Any:
        """`evalsha` for an EVALSHA of `script` already encoded."""
        try:
            return await self.call(evalsha)
        except RedisReplyError as exc:
            if not str(exc).startswith("NOSCRIPT"):
                raise
        await self.execute(b"SCRIPT", b"LOAD", script.source)
        return await self.call(evalsha)

    async def _connect(self) -> _Connection:
        # One connection attempt at a time, in a task of its own: concurrent callers wait for
        # the same one, and a caller that goes away (cancelled) does not cut it off for others.
        if self._connecting is None:
            self._connecting = asyncio.get_running_loop().create_task(self._open())
            self._connecting.add_done_callback(self._connected)
        return await asyncio.shield(self._connecting)

    def _connected(self, attempt: asyncio.Task[_Connection]) -> None:
        self._connecting = None
        if attempt.cancelled() or attempt.exception() is not None:
            return  # its callers see the exception; the next call tries again
        connection = attempt.result()
        if self._closed:
            connection.fail(ConnectionError("Redis client closed"))
        else:
            self._connection = connection

    async def _open(self) -> _Connection:
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(self.timeout_s):
            _, connection = await loop.create_connection(
                lambda: _Connection(loop, self.timeout_s), self.host, self.port
            )
        handshake: list[tuple[RespArg, ...]] = []
        if self.password is not None:
            if self.username:
                handshake.append((b"AUTH", self.username, self.password))
            else:
                handshake.append((b"AUTH", self.password))
        if self.db:
            handshake.append((b"SELECT", self.db))
        try:
            replies = [connection.send(encode_command(c)) for c in handshake]
            for reply in replies:
                await reply  # bounded by the connection's deadline timer
        except BaseException:
            connection.fail(ConnectionError("Redis handshake failed"))
            raise
        self.connects += 1
        return connection

    async def aclose(self) -> None:
        self._closed = True
        if self._connecting is not None:
            self._connecting.cancel()
        if self._connection is not None:
            self._connection.fail(ConnectionError("Redis client closed"))
            self._connection = None
