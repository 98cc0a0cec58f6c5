"""Per-key limits in Redis, shared by every gateway replica: in-flight sequences (leases), sequences
per minute (RPM) and tokens per minute (TPM).

One Lua script per operation, so each is atomic and one round trip (EVALSHA; the scripts are
loaded once per server): `admit` checks and takes all three limits of a request, `release`
gives a lease back, `spend` counts a finished request's tokens, `renew` extends this process's
live leases. `admit` and `release`, on the request's path, go through one pipelined connection
(service/gateway/shared/pipelined_redis.py: concurrent requests' scripts leave in one write,
hiredis parses the replies) rather than redis-py, whose asyncio client costs several times the
CPU per call; redis-py sends the background batches, and everything for a TLS or Unix-socket
Redis. Time is the Redis server's (`TIME` inside the scripts), so gateways whose clocks
disagree still share one window.

Data, per API key (the key's digest, never the key; one hash tag so a Redis Cluster keeps a key's
data in one slot), every Redis key expiring on its own (PEXPIRE):
  octograph:{k}:lease  sorted set of leases `<id>:<cost>` scored by their expiry (ms)
  octograph:{k}:held   the sum of their costs
  octograph:{k}:rpm    sorted set of admitted requests `<id>:<cost>` scored by their time (ms)
  octograph:{k}:rpm.n  the sum of their costs over the window
  octograph:{k}:tpm    sorted set of finished requests `<id>:<tokens>` scored by their time
  octograph:{k}:tpm.n  the sum of their tokens over the window
Entries older than the window (60 s) or leases past their expiry are dropped by the next script
that looks at the key, so a gateway that dies holding leases frees them within the lease TTL:
its leases are no longer renewed.

A request's lease is released when its scope closes: a task of its own writes the release on
the loop's next turn (right after the answer's last bytes), without holding the answer for
the reply, so a client that sends its next request at once finds its slot free (at most
MAX_RELEASE_TASKS at once; beyond that releases join the batch below). Token counts leave the
request's path: they are queued (bounded) and sent by one background task per gateway,
batched in one pipeline every FLUSH_DELAY_S, and the same task renews every live lease each
TTL/3. A release that is lost (Redis down) costs nothing but the
lease's TTL; a token count that is lost (queue full, Redis down) is an undercount.

Redis unreachable: every failed call counts in `octograph_shared_state_errors_total{operation}`
(operation `limits_admit`, `limits_release`, `limits_spend`, `limits_renew`, or `limits_dropped`
for a release or token count dropped because the queue was full), `octograph_shared_limits_up`
turns 0 and one log line says so (one per outage, and one when Redis
is back). For a second after a failure admission does not call Redis at all, so an outage does
not add a timeout to every request. What admission does meanwhile is `redis_failure`:
`fail_open` (this process's own counts, service/gateway/admission.py) or `fail_closed` (503).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import secrets
import time
from collections import deque
from typing import TYPE_CHECKING, Any

from redis.exceptions import NoScriptError, RedisError

from service.config import GatewaySettings
from service.errors import Overloaded
from service.gateway.shared.pipelined_redis import (
    PipelinedRedis,
    RedisReplyError,
    RespArg,
    array_header,
    bulk,
)
from service.gateway.shared.pipelined_redis import Script as LeanScript
from service.gateway.shared.redis_client import make_redis
from service.observability.metrics import GatewayMetrics

if TYPE_CHECKING:
    from redis.asyncio import Redis
    from redis.commands.core import AsyncScript as Script

log = logging.getLogger(__name__)

WINDOW_MS = 60_000  # RPM and TPM count the last minute
OUTAGE_RETRY_S = 1.0  # after a failed call, admission skips Redis this long before trying again
MAX_PENDING = 10_000  # releases and token counts waiting for the background task
RENEW_BATCH = 500  # leases renewed per script call (one key's leases may need several)
MAX_RELEASE_TASKS = 256  # releases in flight to Redis at once (beyond: the background batch)
FLUSH_DELAY_S = 0.02  # token counts (and late releases) gathered this long into one pipeline
MAX_ENCODED_KEYS = 10_000  # API keys whose encoded script calls are kept (then forgotten at once)
FAILURES = (RedisError, RedisReplyError, OSError, TimeoutError)

# Drop entries of log KEYS[z] scored at or below `upto` (a number or "(number") and take their
# amounts (the digits after the last ':' of a member) off its sum KEYS[s]; returns the sum left.
_PURGE = """
local function amount(member) return tonumber(string.match(member, ':(%d+)$')) end
local function purge(z, s, upto)
  local old = redis.call('ZRANGEBYSCORE', z, '-inf', upto)
  if #old == 0 then return tonumber(redis.call('GET', s) or '0') end
  local gone = 0
  for i = 1, #old do gone = gone + amount(old[i]) end
  redis.call('ZREMRANGEBYSCORE', z, '-inf', upto)
  if redis.call('ZCARD', z) == 0 then
    redis.call('DEL', s)
    return 0
  end
  return redis.call('DECRBY', s, gone)
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

# KEYS: lease, held, rpm, rpm.n, tpm, tpm.n. ARGV: cost, member (`<id>:<cost>`), max in flight,
# rpm, tpm (0 = no such limit), lease TTL ms, window ms.
# Returns {0} admitted, or {1|2|3 (in flight|tokens|rate), retry ms, amount in use}.
ADMIT = (
    _PURGE
    + """
local cost, member = tonumber(ARGV[1]), ARGV[2]
local max_inflight, rpm, tpm = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local ttl, window = tonumber(ARGV[6]), tonumber(ARGV[7])
if max_inflight > 0 then
  local held = purge(KEYS[1], KEYS[2], now)
  if held + cost > max_inflight then return {1, 0, held} end
end
if tpm > 0 then
  local used = purge(KEYS[5], KEYS[6], '(' .. (now - window))
  if used >= tpm then
    -- under the limit again once enough of the oldest entries have left the window
    local entries = redis.call('ZRANGE', KEYS[5], 0, 999, 'WITHSCORES')
    local left, retry = used, window
    for i = 1, #entries, 2 do
      left = left - amount(entries[i])
      if left < tpm then
        retry = window - (now - tonumber(entries[i + 1]))
        break
      end
    end
    return {2, retry, used}
  end
end
if rpm > 0 then
  local used = purge(KEYS[3], KEYS[4], '(' .. (now - window))
  if used + cost > rpm then
    local oldest = redis.call('ZRANGE', KEYS[3], 0, 0, 'WITHSCORES')
    local retry = window
    if #oldest > 0 then retry = window - (now - tonumber(oldest[2])) end
    return {3, retry, used}
  end
  redis.call('ZADD', KEYS[3], now, member)
  redis.call('INCRBY', KEYS[4], cost)
  redis.call('PEXPIRE', KEYS[3], window)
  redis.call('PEXPIRE', KEYS[4], window)
end
if max_inflight > 0 then
  redis.call('ZADD', KEYS[1], now + ttl, member)
  redis.call('INCRBY', KEYS[2], cost)
  redis.call('PEXPIRE', KEYS[1], ttl)
  redis.call('PEXPIRE', KEYS[2], ttl)
end
return {0}
"""
)

# KEYS: lease, held. ARGV: members. Returns how many of them were still held.
RELEASE = """
local function amount(member) return tonumber(string.match(member, ':(%d+)$')) end
local gone, n = 0, 0
for i = 1, #ARGV do
  if redis.call('ZREM', KEYS[1], ARGV[i]) == 1 then
    gone = gone + amount(ARGV[i])
    n = n + 1
  end
end
if n > 0 then
  if redis.call('ZCARD', KEYS[1]) == 0 then
    redis.call('DEL', KEYS[2])
  else
    redis.call('DECRBY', KEYS[2], gone)
  end
end
return n
"""

# KEYS: lease, held. ARGV: TTL ms, members. Extends each lease to now + TTL; a lease that expired
# meanwhile (Redis was unreachable for longer than the TTL) is added back: its request still runs.
RENEW = (
    _PURGE
    + """
local ttl = tonumber(ARGV[1])
purge(KEYS[1], KEYS[2], now)
local added = 0
for i = 2, #ARGV do
  if redis.call('ZADD', KEYS[1], now + ttl, ARGV[i]) == 1 then added = added + amount(ARGV[i]) end
end
if added > 0 then redis.call('INCRBY', KEYS[2], added) end
redis.call('PEXPIRE', KEYS[1], ttl)
redis.call('PEXPIRE', KEYS[2], ttl)
return added
"""
)

# KEYS: tpm, tpm.n. ARGV: member (`<id>:<tokens>`), tokens, window ms.
SPEND = (
    _PURGE
    + """
local window = tonumber(ARGV[3])
purge(KEYS[1], KEYS[2], '(' .. (now - window))
redis.call('ZADD', KEYS[1], now, ARGV[1])
redis.call('INCRBY', KEYS[2], tonumber(ARGV[2]))
redis.call('PEXPIRE', KEYS[1], window)
redis.call('PEXPIRE', KEYS[2], window)
return 1
"""
)


def _no_script(result: object) -> bool:
    return isinstance(result, NoScriptError) or (
        isinstance(result, Exception) and str(result).startswith("NOSCRIPT")
    )


class SharedStateDown(ConnectionError):
    """Redis could not be reached (or is being skipped for a moment after a failure)."""


def lease_keys(key: str) -> list[str]:
    return [f"octograph:{{{key}}}:lease", f"octograph:{{{key}}}:held"]


def window_keys(key: str) -> list[str]:
    tag = f"octograph:{{{key}}}"
    return [f"{tag}:rpm", f"{tag}:rpm.n", f"{tag}:tpm", f"{tag}:tpm.n"]


class SharedKeyLimits:
    """The per-key limits of every gateway replica, in one Redis (see the module's doc)."""

    def __init__(
        self,
        redis: Redis,
        metrics: GatewayMetrics,
        *,
        max_inflight_per_key: int | None,
        rate_limit_rpm: int | None,
        rate_limit_tpm: int | None,
        lease_ttl_s: float,
        fail_closed: bool,
    ) -> None:
        self.redis = redis
        self.metrics = metrics
        self.max_inflight = max_inflight_per_key or 0
        self.rpm = rate_limit_rpm or 0
        self.tpm = rate_limit_tpm or 0
        self.lease_ttl_ms = max(1, round(lease_ttl_s * 1000))
        limits = (self.max_inflight, self.rpm, self.tpm, self.lease_ttl_ms, WINDOW_MS)
        self._admit_tail = b"".join(map(bulk, limits))
        self.fail_closed = fail_closed
        self._admit = redis.register_script(ADMIT)
        self._release = redis.register_script(RELEASE)
        self._renew = redis.register_script(RENEW)
        self._spend = redis.register_script(SPEND)
        # The request's path (admit, release) goes through one pipelined connection of its
        # own (service/gateway/shared/pipelined_redis.py: a fraction of redis-py's CPU per
        # call); redis-py keeps the background batches, and everything for TLS or a Unix socket.
        self.fast = PipelinedRedis.from_redis(redis)
        self._fast_admit = LeanScript(ADMIT)
        self._fast_release = LeanScript(RELEASE)
        # Each call's bytes are mostly the same for a key: its head (script, keys) is encoded
        # once per key, the limits once, and only the cost and lease per call.
        self._admit_heads: dict[str, bytes] = {}
        self._release_heads: dict[str, bytes] = {}
        # Unique ids for leases and log entries: this process's random prefix and a counter.
        self._prefix = secrets.token_hex(6)
        self._ids = itertools.count()
        self.live: dict[str, str] = {}  # lease member -> API key digest, renewed until released
        self._pending: deque[tuple[str, str, str | int]] = deque()  # (op, key, lease | tokens)
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.up = True
        self._skip_until = 0.0
        self._closing = False
        self._releasing: set[asyncio.Future[Any]] = set()  # releases on their way to Redis
        # The last flush at shutdown waits at most this long for a Redis that does not answer.
        self.stop_timeout_s = (
            2 * float(redis.connection_pool.connection_kwargs.get("socket_timeout") or 1.0) + 1.0
        )
        metrics.shared_limits_up.set(1)

    # -- the request's path ----------------------------------------------------------------

    async def admit(self, key: str, cost: int) -> str | None:
        """Check and take `key`'s limits for `cost` sequences in one round trip. Returns the
        request's lease (None when in-flight is not limited); raises Overloaded when a limit
        refuses, SharedStateDown when Redis cannot answer."""
        if not self.up and time.monotonic() < self._skip_until:
            raise SharedStateDown("Redis was unreachable a moment ago")
        member = f"{self._prefix}.{next(self._ids)}:{cost}"
        args = (cost, member, self.max_inflight, self.rpm, self.tpm, self.lease_ttl_ms, WINDOW_MS)
        try:
            if self.fast is not None:
                command = self._admit_head(key) + bulk(cost) + bulk(member) + self._admit_tail
                answer: list[int] = await self.fast.run_script(self._fast_admit, command)
            else:
                answer = await self._admit(keys=[*lease_keys(key), *window_keys(key)], args=args)
        except FAILURES as exc:
            self._failed("limits_admit", exc)
            raise SharedStateDown(str(exc)) from exc
        if not self.up:
            self._reached()
        if answer[0] == 0:
            if not self.max_inflight:
                return None
            self.live[member] = key
            return member
        raise self._refusal(answer)

    def _admit_head(self, key: str) -> bytes:
        head = self._admit_heads.get(key)
        if head is None:
            if len(self._admit_heads) >= MAX_ENCODED_KEYS:
                self._admit_heads.clear()
            keys = [*lease_keys(key), *window_keys(key)]
            parts: tuple[RespArg, ...] = (b"EVALSHA", self._fast_admit.sha, len(keys), *keys)
            head = array_header(len(parts) + 7) + b"".join(map(bulk, parts))
            self._admit_heads[key] = head
        return head

    def _release_command(self, key: str, lease: str) -> bytes:
        head = self._release_heads.get(key)
        if head is None:
            if len(self._release_heads) >= MAX_ENCODED_KEYS:
                self._release_heads.clear()
            keys = lease_keys(key)
            parts: tuple[RespArg, ...] = (b"EVALSHA", self._fast_release.sha, len(keys), *keys)
            head = array_header(len(parts) + 1) + b"".join(map(bulk, parts))
            self._release_heads[key] = head
        return head + bulk(lease)

    def _refusal(self, answer: list[int]) -> Overloaded:
        reason, retry_ms, used = int(answer[0]), int(answer[1]), int(answer[2])
        retry_s = max(retry_ms / 1000, 1.0)
        if reason == 1:
            return Overloaded(
                f"this API key has {used} sequences in flight across the gateways "
                f"(at most {self.max_inflight}); retry shortly",
                code="key_concurrency_exceeded",
            )
        if reason == 2:
            return Overloaded(
                f"token rate limit reached for this API key ({used} of {self.tpm} tokens per "
                "minute)",
                retry_after_s=retry_s,
                code="tokens_rate_limit_exceeded",
            )
        return Overloaded(
            f"rate limit reached for this API key ({self.rpm} sequences per minute)",
            retry_after_s=retry_s,
            code="rate_limit_exceeded",
        )

    async def release_now(self, key: str, lease: str) -> None:
        """Give `lease` back in one round trip (a failure leaves it to its TTL)."""
        if self.live.pop(lease, None) is not None:
            await self._send_release(key, lease)

    async def _send_release(self, key: str, lease: str) -> None:
        if not self.up and time.monotonic() < self._skip_until:
            return  # Redis was down a moment ago: the lease's TTL frees it
        try:
            if self.fast is not None:
                await self.fast.run_script(self._fast_release, self._release_command(key, lease))
            else:
                await self._release(keys=lease_keys(key), args=[lease])
        except FAILURES as exc:
            self._failed("limits_release", exc)
            return
        if not self.up:
            self._reached()

    def release(self, key: str, lease: str) -> None:
        """Give `lease` back now, without waiting for Redis's reply: a task of its own sends
        it on the loop's next turn (at most MAX_RELEASE_TASKS at once; beyond that, or outside
        a loop, it goes with the next batch). Never renewed again either way."""
        if self.live.pop(lease, None) is None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        if loop is None or len(self._releasing) >= MAX_RELEASE_TASKS:
            self._queue("release", key, lease)
            return
        sent = None
        if self.fast is not None and (self.up or time.monotonic() >= self._skip_until):
            # On the open connection: no task, the reply checked by a callback.
            with contextlib.suppress(ConnectionError):
                sent = self.fast.send_nowait(self._release_command(key, lease))
        if sent is not None:
            self._releasing.add(sent)
            sent.add_done_callback(functools.partial(self._released, key, lease))
            return
        task = loop.create_task(self._send_release(key, lease))
        self._releasing.add(task)
        task.add_done_callback(self._releasing.discard)

    def _released(self, key: str, lease: str, sent: asyncio.Future[Any]) -> None:
        self._releasing.discard(sent)
        if sent.cancelled():
            return
        exc = sent.exception()
        if exc is None:
            if not self.up:
                self._reached()
        elif isinstance(exc, RedisReplyError) and str(exc).startswith("NOSCRIPT"):
            # Redis forgot the script (restarted, SCRIPT FLUSH): load it and send again.
            if len(self._releasing) < MAX_RELEASE_TASKS:
                task = asyncio.get_running_loop().create_task(self._send_release(key, lease))
                self._releasing.add(task)
                task.add_done_callback(self._releasing.discard)
            else:
                self._queue("release", key, lease)
        else:
            self._failed("limits_release", exc)

    def spend(self, key: str, tokens: int) -> None:
        """`key`'s request ended having used `tokens` (sent by the background task)."""
        self._queue("spend", key, tokens)

    def _queue(self, op: str, key: str, value: str | int) -> None:
        if len(self._pending) >= MAX_PENDING:
            # Redis is too slow to keep up: a lost release costs its lease's TTL, lost tokens
            # an undercount of one request.
            self.metrics.shared_state_errors.labels("limits_dropped").inc()
            return
        self._pending.append((op, key, value))
        self._wake.set()

    # -- the background task ---------------------------------------------------------------

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="octograph-shared-limits")

    async def stop(self) -> None:
        """Send what is queued (bounded by the Redis timeouts), stop, close the connections.
        Leases still live are not released: their requests were cut off by the shutdown and
        their TTL frees them."""
        self._closing = True
        self._wake.set()
        if self._releasing:  # releases already on their way
            await asyncio.wait(set(self._releasing), timeout=self.stop_timeout_s)
        if self._task is not None:
            # The task sees `_closing`, flushes once more and returns; a Redis that hangs
            # cannot hold the shutdown longer than this.
            done, _ = await asyncio.wait({self._task}, timeout=self.stop_timeout_s)
            if not done:
                self._task.cancel()
            self._task = None
        if self.fast is not None:
            await self.fast.aclose()
        with contextlib.suppress(*FAILURES):
            await self.redis.aclose()

    async def _run(self) -> None:
        every = self.lease_ttl_ms / 3000
        renew_at = time.monotonic() + every
        while not self._closing:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.0, renew_at - time.monotonic())):
                    await self._wake.wait()
            if not self._closing:
                # Let more releases and token counts gather: one pipeline for all of them.
                await asyncio.sleep(FLUSH_DELAY_S)
            self._wake.clear()
            try:
                await self._flush()
                if time.monotonic() >= renew_at and not self._closing:
                    renew_at = time.monotonic() + every
                    await self._renew_live()
            except Exception:  # never let the task die: leases would stop being renewed
                log.exception("the shared limits' background task failed; going on")

    async def _flush(self) -> None:
        if not self._pending:
            return
        batch = list(self._pending)
        self._pending.clear()
        releases: dict[str, list[str]] = {}
        spent: dict[str, int] = {}
        for op, key, value in batch:
            if op == "release":
                releases.setdefault(key, []).append(str(value))
            else:
                spent[key] = spent.get(key, 0) + int(value)
        calls: list[tuple[Script, list[str], list[str | int]]] = [
            (self._release, lease_keys(key), list(leases)) for key, leases in releases.items()
        ]
        for key, tokens in spent.items():
            member = f"{self._prefix}.{next(self._ids)}:{tokens}"
            calls.append((self._spend, window_keys(key)[2:], [member, tokens, WINDOW_MS]))
        await self._pipeline(calls, "limits_release" if releases else "limits_spend")

    async def _renew_live(self) -> None:
        if not self.live:
            return
        by_key: dict[str, list[str]] = {}
        for lease, key in self.live.items():
            by_key.setdefault(key, []).append(lease)
        calls: list[tuple[Script, list[str], list[str | int]]] = []
        for key, leases in by_key.items():
            for i in range(0, len(leases), RENEW_BATCH):
                chunk = leases[i : i + RENEW_BATCH]
                calls.append((self._renew, lease_keys(key), [self.lease_ttl_ms, *chunk]))
        await self._pipeline(calls, "limits_renew")

    async def _pipeline(
        self, calls: list[tuple[Script, list[str], list[str | int]]], operation: str
    ) -> None:
        """EVALSHA each call in one pipeline (one round trip); calls that find their script
        missing (a restarted Redis) load it and run once more."""
        for attempt in range(2):
            pipe = self.redis.pipeline(transaction=False)
            for script, keys, args in calls:
                pipe.evalsha(script.sha, len(keys), *keys, *args)
            try:
                results = await pipe.execute(raise_on_error=False)  # resets the pipeline
            except FAILURES as exc:
                self._failed(operation, exc)
                return
            missing = [c for c, r in zip(calls, results, strict=True) if _no_script(r)]
            failed = [r for r in results if isinstance(r, Exception) and not _no_script(r)]
            if failed:
                self._failed(operation, failed[0])
                return
            if not missing or attempt:
                break
            try:
                for script in {id(c[0]): c[0] for c in missing}.values():
                    script.sha = await self.redis.script_load(script.script)
            except FAILURES as exc:
                self._failed(operation, exc)
                return
            calls = missing
        if not self.up:
            self._reached()

    # -- outages ---------------------------------------------------------------------------

    def _failed(self, operation: str, exc: BaseException) -> None:
        self.metrics.shared_state_errors.labels(operation).inc()
        self._skip_until = time.monotonic() + OUTAGE_RETRY_S
        if self.up:
            self.up = False
            self.metrics.shared_limits_up.set(0)
            then = (
                "requests are refused with 503 (redis_failure=fail_closed)"
                if self.fail_closed
                else "each gateway enforces the per-key limits on its own counts "
                "(redis_failure=fail_open)"
            )
            log.error(
                "Redis unreachable (%s: %s: %s): until it is back, %s",
                operation,
                type(exc).__name__,
                exc,
                then,
            )

    def _reached(self) -> None:
        self.up = True
        self.metrics.shared_limits_up.set(1)
        log.warning("Redis reachable again: the per-key limits are shared again")


def shared_key_limits(settings: GatewaySettings, metrics: GatewayMetrics) -> SharedKeyLimits | None:
    """The shared store when `OCTOGRAPH_REDIS_URL` is set and a per-key limit is configured."""
    if not (settings.max_inflight_per_key or settings.rate_limit_rpm or settings.rate_limit_tpm):
        return None
    redis = make_redis(settings)
    if redis is None:
        return None
    return SharedKeyLimits(
        redis,
        metrics,
        max_inflight_per_key=settings.max_inflight_per_key,
        rate_limit_rpm=settings.rate_limit_rpm,
        rate_limit_tpm=settings.rate_limit_tpm,
        lease_ttl_s=settings.redis_lease_ttl_s,
        fail_closed=settings.redis_failure == "fail_closed",
    )
