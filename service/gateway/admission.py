"""Admission: whether the gateway takes a request now, weighed by what it costs.

A request's cost is the number of sequences it asks the engines for (prompts x n, see
`RequestPlan.cost`): 64 prompts with n=8 weigh 512, not 1. Limits, each in sequences and each
answering a fast 429 with Retry-After rather than queueing:

- the gateway: `max_inflight` sequences in flight in this process;
- a node: `max_inflight_per_node`;
- an API key: `max_inflight_per_key` in flight, `rate_limit_rpm` sequences per minute, and
  `rate_limit_tpm` tokens (prompt + completion) per minute.

Tokens are known only once a request has ended, so they are counted then (the request's
observer reports them: `Admission.spend_tokens`) and a key is refused while its tokens of the
last 60 s are at or over the limit: a request that starts under the limit is served whole, and
the key waits (Retry-After) until enough of its minute has passed.

A request is admitted after its body has arrived and been validated (a slow or absent body holds
no slot) and before it is routed; its node is admitted once routing picked it.

The gateway and node limits are per process (they protect this process). The per-key limits are
per process too unless `OCTOGRAPH_REDIS_URL` is set: then one Redis holds them for every gateway
replica (service/gateway/shared/limits.py), and this process keeps its own view as well, which
is what it enforces while Redis cannot be reached (`redis_failure: fail_open`).
"""

from __future__ import annotations

import time
from collections import deque
from typing import TYPE_CHECKING

from service.errors import Overloaded, Unavailable
from service.observability.metrics import GatewayMetrics

if TYPE_CHECKING:
    from service.gateway.shared.limits import SharedKeyLimits

# Which admission scope (the `octograph_admission_rejected` label) a per-key refusal counts under.
REFUSAL_SCOPES = {
    "key_concurrency_exceeded": "key",
    "tokens_rate_limit_exceeded": "tokens",
    "rate_limit_exceeded": "rate",
}


class RateWindow:
    """Sequences per key over the last 60 s (a sliding log, bounded by the limit)."""

    def __init__(self, per_minute: int) -> None:
        self.per_minute = per_minute
        self._hits: dict[str, deque[tuple[float, int]]] = {}
        self._used: dict[str, int] = {}

    def take(self, key: str, cost: int) -> None:
        now = time.monotonic()
        hits = self._hits.setdefault(key, deque())
        used = self._used.get(key, 0)
        while hits and now - hits[0][0] > 60.0:
            used -= hits.popleft()[1]
        if used + cost > self.per_minute:
            self._used[key] = used
            retry = 60.0 - (now - hits[0][0]) if hits else 60.0
            raise Overloaded(
                f"rate limit reached for this API key ({self.per_minute} sequences per minute)",
                retry_after_s=retry,
                code="rate_limit_exceeded",
            )
        hits.append((now, cost))
        self._used[key] = used + cost

    def record(self, key: str, cost: int) -> None:
        """Count `cost` sequences a shared store (Redis) admitted: this process's view, used
        while the store is unreachable. Bounded: what Redis admits for a key in a minute is at
        most the limit, and this process sees a part of it."""
        now = time.monotonic()
        hits = self._hits.setdefault(key, deque())
        used = self._used.get(key, 0)
        while hits and now - hits[0][0] > 60.0:
            used -= hits.popleft()[1]
        hits.append((now, cost))
        self._used[key] = used + cost


class TokenWindow:
    """Prompt + completion tokens per key over the last 60 s (a sliding log of ended requests,
    one entry a request, pruned on every look)."""

    def __init__(self, per_minute: int) -> None:
        self.per_minute = per_minute
        self._spent: dict[str, deque[tuple[float, int]]] = {}
        self._used: dict[str, int] = {}

    def _prune(self, key: str, now: float) -> int:
        spent = self._spent.get(key)
        used = self._used.get(key, 0)
        while spent and now - spent[0][0] > 60.0:
            used -= spent.popleft()[1]
        if not spent:
            self._spent.pop(key, None)
            self._used.pop(key, None)
            return 0
        self._used[key] = used
        return used

    def check(self, key: str) -> None:
        now = time.monotonic()
        used = self._prune(key, now)
        if used < self.per_minute:
            return
        # Retry once enough of the oldest entries have left the window to bring it under.
        left = used
        retry = 60.0
        for at, tokens in self._spent[key]:
            left -= tokens
            if left < self.per_minute:
                retry = 60.0 - (now - at)
                break
        raise Overloaded(
            f"token rate limit reached for this API key ({used} of {self.per_minute} "
            "tokens per minute)",
            retry_after_s=max(retry, 1.0),
            code="tokens_rate_limit_exceeded",
        )

    def spend(self, key: str, tokens: int) -> None:
        now = time.monotonic()
        self._prune(key, now)
        self._spent.setdefault(key, deque()).append((now, tokens))
        self._used[key] = self._used.get(key, 0) + tokens


class Ticket:
    """What one admitted request holds; `release` gives it all back (idempotent)."""

    def __init__(
        self, admission: Admission, key: str | None, cost: int, lease: str | None = None
    ) -> None:
        self._admission = admission
        self.key = key
        self.cost = cost
        self.lease = lease  # the key's in-flight lease in Redis (shared limits), if any
        self.node: str | None = None
        self.released = False

    def enter_node(self, node: str) -> None:
        """Admit the request on `node` (moving it off a node it held, for a fallback)."""
        if self.node == node or self.released:
            return
        self._admission.take_node(node, self.cost)
        self._leave_node()
        self.node = node

    def _leave_node(self) -> None:
        if self.node is not None:
            self._admission.give_node(self.node, self.cost)
            self.node = None

    def release(self) -> None:
        """Give everything back now. A Redis lease is sent back by a task of its own on the
        loop's next turn, without waiting for the reply: that write leaves right after the
        answer's last bytes, before the client can send another request to any gateway, so
        a client that sends its next request at once finds its slot free."""
        if self.released:
            return
        self.released = True
        self._leave_node()
        self._admission.give(self.key, self.cost, self.lease)

    async def aclose(self) -> None:
        """`release` as the request scope's closer."""
        self.release()


class Admission:
    def __init__(
        self,
        metrics: GatewayMetrics,
        *,
        max_inflight: int,
        max_inflight_per_node: int,
        max_inflight_per_key: int | None = None,
        rate_limit_rpm: int | None = None,
        rate_limit_tpm: int | None = None,
        shared: SharedKeyLimits | None = None,
    ) -> None:
        self.metrics = metrics
        self.max_inflight = max_inflight
        self.max_per_node = max_inflight_per_node
        self.max_per_key = max_inflight_per_key
        self.rate = RateWindow(rate_limit_rpm) if rate_limit_rpm else None
        self.tokens = TokenWindow(rate_limit_tpm) if rate_limit_tpm else None
        self.limits_keys = bool(max_inflight_per_key or rate_limit_rpm or rate_limit_tpm)
        self.shared = shared if self.limits_keys else None  # per-key limits in Redis
        self.inflight = 0  # sequences, whole gateway
        self.by_node: dict[str, int] = {}
        self.by_key: dict[str, int] = {}

    async def admit(self, key: str | None, cost: int) -> Ticket:
        """Gateway- and key-level admission of a request of `cost` sequences."""
        if self.inflight + cost > self.max_inflight:
            self._reject("gateway")
            raise Overloaded("the gateway is at capacity; retry shortly")
        if key is None or not self.limits_keys:
            self._hold(cost)
            return Ticket(self, key, cost)
        if self.shared is None:
            self._admit_key_locally(key, cost)
            self._hold(cost)
            self._hold_key(key, cost)
            return Ticket(self, key, cost)
        # The gateway's slot is held across the round trip to Redis, so requests admitted
        # meanwhile cannot take this process past max_inflight.
        self._hold(cost)
        try:
            lease = await self._admit_key_shared(key, cost)
        except BaseException:
            self._unhold(cost)
            raise
        self._hold_key(key, cost)
        return Ticket(self, key, cost, lease)

    async def _admit_key_shared(self, key: str, cost: int) -> str | None:
        assert self.shared is not None
        try:
            lease = await self.shared.admit(key, cost)
        except Overloaded as refused:
            self._reject(REFUSAL_SCOPES.get(refused.code or "", "key"))
            raise
        except ConnectionError:  # Redis unreachable (SharedStateDown); logged and counted there
            if self.shared.fail_closed:
                self._reject("shared_state")
                raise Unavailable(
                    "the shared rate limits cannot be checked right now; retry shortly",
                    code="shared_state_unavailable",
                ) from None
            self._admit_key_locally(key, cost)  # fail_open: this process's view of the key
            return None
        if self.rate is not None:
            self.rate.record(key, cost)  # this process's view, for an outage to come
        return lease

    def _admit_key_locally(self, key: str, cost: int) -> None:
        """The per-key limits on this process's own counts (raises Overloaded)."""
        held = self.by_key.get(key, 0)
        if self.max_per_key is not None and held + cost > self.max_per_key:
            self._reject("key")
            raise Overloaded(
                f"this API key has {held} sequences in flight "
                f"(at most {self.max_per_key}); retry shortly",
                code="key_concurrency_exceeded",
            )
        if self.tokens is not None:
            try:
                self.tokens.check(key)
            except Overloaded:
                self._reject("tokens")
                raise
        if self.rate is not None:
            try:
                self.rate.take(key, cost)
            except Overloaded:
                self._reject("rate")
                raise

    def _hold(self, cost: int) -> None:
        self.inflight += cost
        self.metrics.inflight.inc(cost)

    def _unhold(self, cost: int) -> None:
        self.inflight -= cost
        self.metrics.inflight.dec(cost)

    def _hold_key(self, key: str, cost: int) -> None:
        self.by_key[key] = self.by_key.get(key, 0) + cost

    def spend_tokens(self, key: str | None, tokens: int) -> None:
        """A request of `key` ended having used `tokens` (prompt + completion)."""
        if key is not None and self.tokens is not None and tokens > 0:
            self.tokens.spend(key, tokens)
            if self.shared is not None:
                self.shared.spend(key, tokens)

    def take_node(self, node: str, cost: int) -> None:
        held = self.by_node.get(node, 0)
        if held + cost > self.max_per_node:
            self._reject("node")
            raise Overloaded(f"node '{node}' is at capacity; retry shortly")
        self.by_node[node] = held + cost

    def give_node(self, node: str, cost: int) -> None:
        left = self.by_node.get(node, cost) - cost
        if left > 0:
            self.by_node[node] = left
        else:
            self.by_node.pop(node, None)

    def give(self, key: str | None, cost: int, lease: str | None = None) -> None:
        self._unhold(cost)
        if lease is not None and self.shared is not None:
            self.shared.release(key or "", lease)  # in the background; the lease's TTL backs it
        if key is not None:
            left = self.by_key.get(key, cost) - cost
            if left > 0:
                self.by_key[key] = left
            else:
                self.by_key.pop(key, None)

    def _reject(self, scope: str) -> None:
        self.metrics.rejected.labels(scope).inc()
