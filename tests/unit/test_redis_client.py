"""The gateway's redis-py client (service/gateway/shared/redis_client.py) is bounded: at most
`OCTOGRAPH_REDIS_MAX_CONNECTIONS` connections; calls beyond them wait (at most
`OCTOGRAPH_REDIS_TIMEOUT_S`) for one instead of opening more."""

from __future__ import annotations

import asyncio

import pytest

from service.config import GatewaySettings
from service.gateway.shared.redis_client import make_redis
from tests.redis_server import RedisServer


def test_no_url_no_client() -> None:
    assert make_redis(GatewaySettings()) is None


async def test_calls_share_at_most_max_connections(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OCTOGRAPH_REDIS_URL", redis_server.url)
    monkeypatch.setenv("OCTOGRAPH_REDIS_MAX_CONNECTIONS", "2")
    monkeypatch.setenv("OCTOGRAPH_REDIS_TIMEOUT_S", "2")
    client = make_redis(GatewaySettings())
    assert client is not None
    try:
        # Six calls at once, each holding its connection 50 ms: all answered, over two.
        replies = await asyncio.gather(
            *(client.blpop(["octograph:test:empty"], timeout=0.05) for _ in range(6))
        )
        assert len(replies) == 6
        connections = await client.client_list()
        assert len(connections) <= 2, connections
    finally:
        await client.aclose()
