"""The gateway's one Redis connection (asyncio), built from settings, or None without a URL.

Every call is bounded: connect and socket timeouts come from settings, and the pool has a
bounded number of connections (a call waits at most `redis_timeout_s` for one)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from service.config import GatewaySettings

if TYPE_CHECKING:
    from redis.asyncio import Redis


def make_redis(settings: GatewaySettings) -> Redis | None:
    if settings.redis_url is None:
        return None
    from redis.asyncio import BlockingConnectionPool, Redis

    pool = BlockingConnectionPool.from_url(
        settings.redis_url.get_secret_value(),
        max_connections=settings.redis_max_connections,
        timeout=settings.redis_timeout_s,  # waiting for a free connection
        socket_connect_timeout=settings.redis_timeout_s,
        socket_timeout=settings.redis_timeout_s,
        health_check_interval=30,
    )
    return Redis(connection_pool=pool)
