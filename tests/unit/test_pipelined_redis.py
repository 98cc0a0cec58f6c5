"""The lean pipelined Redis client of the per-key limits' request path
(service/gateway/shared/pipelined_redis.py), against a real redis-server: replies matched to
their commands under concurrency, a deadline on every call, a reconnect after a restart, a
script Redis forgot loaded again, AUTH and SELECT from the URL, TLS left to redis-py."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis

from service.gateway.shared.pipelined_redis import PipelinedRedis, RedisReplyError, Script
from tests.redis_server import RedisServer


@pytest.fixture
async def redis_py(redis_server: RedisServer) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_server.url, socket_timeout=5, socket_connect_timeout=5)
    yield client
    await client.aclose()


def lean(server: RedisServer, **kw: object) -> PipelinedRedis:
    kw.setdefault("timeout_s", 5.0)
    return PipelinedRedis("127.0.0.1", server.port, **kw)  # type: ignore[arg-type]


async def test_concurrent_commands_share_one_connection_and_get_their_own_replies(
    redis_server: RedisServer,
) -> None:
    client = lean(redis_server)
    try:
        replies = await asyncio.gather(*(client.execute(b"ECHO", f"n{i}") for i in range(500)))
        assert replies == [f"n{i}".encode() for i in range(500)]
        # Mixed reply types, in flight together.
        got = await asyncio.gather(
            client.execute(b"SET", "k", "v"),
            client.execute(b"INCRBY", "counter", 7),
            client.execute(b"GET", "k"),
            client.execute(b"GET", "missing"),
            client.execute(b"RPUSH", "list", "a", "b"),
            client.execute(b"LRANGE", "list", 0, -1),
        )
        assert got == [b"OK", 7, b"v", None, 2, [b"a", b"b"]]
        assert client.connects == 1
    finally:
        await client.aclose()


async def test_an_error_reply_fails_only_its_own_command(
    redis_server: RedisServer,
) -> None:
    client = lean(redis_server)
    try:
        await client.execute(b"SET", "text", "abc")
        results = await asyncio.gather(
            client.execute(b"ECHO", "before"),
            client.execute(b"INCR", "text"),  # not an integer: an error reply
            client.execute(b"ECHO", "after"),
            return_exceptions=True,
        )
        assert results[0] == b"before" and results[2] == b"after"
        assert isinstance(results[1], RedisReplyError)
        assert client.connects == 1  # an error reply is not a broken connection
    finally:
        await client.aclose()


async def test_a_caller_that_goes_away_does_not_shift_the_replies(
    redis_py: Redis,
    redis_server: RedisServer,
) -> None:
    client = lean(redis_server)
    try:
        await client.execute(b"PING")
        # Hold the server for a moment so the first command is still unanswered when its
        # caller is cancelled; its reply must be dropped, not handed to the next command.
        await redis_py.execute_command("CLIENT", "PAUSE", 300, "ALL")
        first = asyncio.ensure_future(client.execute(b"ECHO", "first"))
        second = asyncio.ensure_future(client.execute(b"ECHO", "second"))
        await asyncio.sleep(0.05)
        first.cancel()
        assert await second == b"second"
        assert await client.execute(b"ECHO", "third") == b"third"
    finally:
        await client.aclose()


async def test_a_caller_that_goes_away_while_connecting_does_not_cut_off_the_others(
    redis_server: RedisServer,
) -> None:
    client = lean(redis_server)
    try:
        first = asyncio.ensure_future(client.execute(b"ECHO", "first"))
        second = asyncio.ensure_future(client.execute(b"ECHO", "second"))
        await asyncio.sleep(0)  # both wait for the one connection attempt
        first.cancel()
        assert await second == b"second"
        assert client.connects == 1
    finally:
        await client.aclose()
    with pytest.raises(ConnectionError):
        await client.execute(b"PING")  # closed for good


async def test_a_call_redis_does_not_answer_fails_within_its_deadline(
    redis_py: Redis,
    redis_server: RedisServer,
) -> None:
    client = lean(redis_server, timeout_s=0.2)
    try:
        assert await client.execute(b"PING") == b"PONG"
        # Redis holds every client's commands for a while: the call gives up at its deadline.
        await redis_py.execute_command("CLIENT", "PAUSE", 600, "ALL")
        with pytest.raises(TimeoutError):
            await client.execute(b"PING")
        await asyncio.sleep(0.8)  # the pause is over
        # The timed-out connection was closed; the next call connects again.
        assert await client.execute(b"PING") == b"PONG"
        assert client.connects == 2
    finally:
        await client.aclose()


async def test_it_reconnects_after_a_redis_restart(redis_server: RedisServer) -> None:
    client = lean(redis_server, timeout_s=1.0)
    try:
        assert await client.execute(b"SET", "k", "v") == b"OK"
        redis_server.stop()
        with pytest.raises((ConnectionError, OSError)):
            await client.execute(b"GET", "k")
        redis_server.start()  # the same port, empty
        assert await client.execute(b"GET", "k") is None
        assert await client.execute(b"PING") == b"PONG"
        assert client.connects == 2
    finally:
        await client.aclose()


async def test_a_script_redis_forgot_is_loaded_again(
    redis_py: Redis,
    redis_server: RedisServer,
) -> None:
    client = lean(redis_server)
    script = Script("return {tonumber(ARGV[1]) + 1, KEYS[1]}")
    try:
        # Never loaded: NOSCRIPT, then SCRIPT LOAD and once more.
        assert await client.evalsha(script, ["a"], (1,)) == [2, b"a"]
        assert await client.evalsha(script, ["b"], (2,)) == [3, b"b"]
        await redis_py.script_flush()  # as a restarted Redis would
        assert await client.evalsha(script, ["c"], (3,)) == [4, b"c"]
        # A script's own error is not taken for a missing script.
        broken = Script("return redis.call('INCR', KEYS[1])")
        await client.execute(b"SET", "text", "abc")
        with pytest.raises(RedisReplyError):
            await client.evalsha(broken, ["text"], ())
    finally:
        await client.aclose()


async def test_auth_and_select_come_from_the_url(
    redis_py: Redis,
    redis_server: RedisServer,
) -> None:
    await redis_py.config_set("requirepass", "s3cret")
    try:
        url = f"redis://:s3cret@127.0.0.1:{redis_server.port}/3"
        source = Redis.from_url(url, socket_timeout=5)
        client = PipelinedRedis.from_redis(source)
        assert client is not None and client.db == 3 and client.password == "s3cret"
        assert await client.execute(b"SET", "where", "db3") == b"OK"
        assert await source.get("where") == b"db3"  # the same database
        await client.aclose()
        await source.aclose()
        wrong = lean(redis_server, password="wrong")
        with pytest.raises(RedisReplyError):
            await wrong.execute(b"PING")
        await wrong.aclose()
    finally:
        authed = Redis.from_url(f"redis://:s3cret@127.0.0.1:{redis_server.port}/0")
        await authed.config_set("requirepass", "")
        await authed.aclose()


def test_tls_and_unix_sockets_are_left_to_redis_py() -> None:
    assert PipelinedRedis.from_redis(Redis.from_url("rediss://127.0.0.1:6380/0")) is None
    assert PipelinedRedis.from_redis(Redis.from_url("unix:///tmp/redis.sock")) is None
    plain = PipelinedRedis.from_redis(Redis.from_url("redis://h:1234/2", socket_timeout=0.3))
    assert plain is not None
    assert (plain.host, plain.port, plain.db, plain.timeout_s) == ("h", 1234, 2, 0.3)


def test_it_works_on_uvloop_as_the_gateway_runs_it(redis_server: RedisServer) -> None:
    # uvloop's transports do not subclass asyncio.Transport; the gateway runs on uvloop.
    import uvloop

    async def run() -> list[object]:
        client = lean(redis_server)
        try:
            script = Script("return tonumber(ARGV[1]) * 2")
            return list(
                await asyncio.gather(
                    *(client.evalsha(script, [], (i,)) for i in range(50)),
                    client.execute(b"PING"),
                )
            )
        finally:
            await client.aclose()

    assert uvloop.run(run()) == [*(2 * i for i in range(50)), b"PONG"]


def test_the_limits_encode_their_calls_as_redis_expects() -> None:
    # SharedKeyLimits encodes a key's script head once and adds only the cost and lease per
    # call: the bytes must be exactly the full command's.
    from prometheus_client import CollectorRegistry

    from service.gateway.shared.limits import (
        WINDOW_MS,
        SharedKeyLimits,
        lease_keys,
        window_keys,
    )
    from service.gateway.shared.pipelined_redis import bulk, encode_command
    from service.observability.metrics import GatewayMetrics

    store = SharedKeyLimits(
        Redis.from_url("redis://127.0.0.1:6379/0"),
        GatewayMetrics(CollectorRegistry()),
        max_inflight_per_key=3,
        rate_limit_rpm=100,
        rate_limit_tpm=None,
        lease_ttl_s=30.0,
        fail_closed=False,
    )
    key, lease = "0123456789abcdef", "abc.7:2"
    keys = [*lease_keys(key), *window_keys(key)]
    admit = store._admit_head(key) + bulk(2) + bulk(lease) + store._admit_tail
    assert admit == encode_command(
        (b"EVALSHA", store._fast_admit.sha, 6, *keys, 2, lease, 3, 100, 0, 30_000, WINDOW_MS)
    )
    assert store._release_command(key, lease) == encode_command(
        (b"EVALSHA", store._fast_release.sha, 2, *lease_keys(key), lease)
    )
