"""The pipeline's branch for nodes on OpenAI-compatible upstreams (`kind: openai` models).

The client's request passes through: the same body with the upstream's model name, the node's
system prompt and sampling defaults, and nothing of Octograph's. The reply comes back with the
gateway's id, the model the client addressed and the route object; streamed chunks are relayed
as bytes (relay.py). Upstream 429/5xx/connect failures before the first byte move once to
another replica and count against the failing one's health (cooldown), as with local workers;
once they are exhausted, the router's fallback node may answer.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import orjson

from service.errors import DeadlineExceeded, Overloaded, ServiceError, Unavailable
from service.observability.metrics import GatewayMetrics
from service.protocol.openai import ChatCompletionRequest, CompletionRequest
from service.remote.client import UpstreamClient, UpstreamFailure
from service.remote.relay import ChunkRewriter, relay
from service.router.graph import GraphConfig, ModelNode, OpenAIModelSpec
from service.router.policy import RouteResult
from service.worker.pool import ModelPool, Replica, WorkerPools

if TYPE_CHECKING:
    from service.console.stats import ConsoleStats
    from service.gateway.pipeline import NodeAdmission, RequestContext

T = TypeVar("T")
Kind = Literal["chat", "completion"]
PATHS: dict[Kind, str] = {"chat": "/chat/completions", "completion": "/completions"}
GATEWAY_ONLY_FIELDS = {"byte_exact"}  # Octograph extensions no upstream knows


@dataclass
class RemoteAnswer:
    body: dict[str, Any] | None = None
    stream: AsyncIterator[bytes] | None = None


class RemoteRunner:
    def __init__(self, graph: GraphConfig, pools: WorkerPools, metrics: GatewayMetrics) -> None:
        self.graph = graph
        self.pools = pools
        self.metrics = metrics
        self.specs = graph.openai_models()

    def model_of(self, node_id: str | None) -> str | None:
        """The `kind: openai` model that answers for this node (or raw model id), if any."""
        if node_id is None or not self.specs:
            return None
        node = self.graph.nodes.get(node_id)
        model = node.model if isinstance(node, ModelNode) else node_id if node is None else None
        return model if model in self.specs else None

    def serves(self, node_id: str | None) -> bool:
        return self.model_of(node_id) is not None

    async def answer(
        self,
        kind: Kind,
        req: ChatCompletionRequest | CompletionRequest,
        route: RouteResult,
        ctx: RequestContext,
        admission: NodeAdmission,
        console: ConsoleStats | None,
    ) -> RemoteAnswer | None:
        """The reply from the upstream of `route.node`; None when the node (or the fallback it
        fell back to) is not a remote one, so the local path answers."""
        while (model := self.model_of(route.node)) is not None:
            node = route.node
            admission.enter(node)
            try:
                return await self._answer(kind, req, route, model, ctx, admission, console)
            except ServiceError as exc:
                admission.leave(node)
                fallback = route.fallback
                if exc.status < 500 or not fallback or fallback == node:
                    if console is not None:
                        console.request_failed(node, ctx.started, exc)
                    raise
                # Nothing reached the client yet: the router's fallback may still answer.
                route.route.append(f"fallback:{fallback}")
                route.node = fallback
            except BaseException as exc:
                admission.leave(node)
                if console is not None:
                    console.request_failed(node, ctx.started, exc)
                raise
        return None

    async def _answer(
        self,
        kind: Kind,
        req: ChatCompletionRequest | CompletionRequest,
        route: RouteResult,
        model: str,
        ctx: RequestContext,
        admission: NodeAdmission,
        console: ConsoleStats | None,
    ) -> RemoteAnswer:
        node = route.node
        body = self.upstream_body(kind, req, node, self.specs[model])
        headers = {"x-request-id": ctx.request_id}
        rewriter = ChunkRewriter(_response_id(kind, ctx.request_id), req.model, route.as_dict())
        pool = self.pools.upstreams[model]
        path = PATHS[kind]
        if not req.stream:
            replica, raw = await self._call(pool, node, ctx, lambda c: c.post(path, body, headers))
            replica.inflight -= 1
            answer = RemoteAnswer(body=rewriter.body(raw))
            admission.leave(node)
            if console is not None:
                console.record_request(node, time.monotonic() - ctx.started, "ok", route.route)
            return answer
        replica, opened = await self._call(
            pool, node, ctx, lambda c: c.open_stream(path, body, headers)
        )
        payloads: AsyncIterator[bytes] = opened.payloads
        if console is not None:  # records the request when the stream ends, however
            payloads = console.watch(route, ctx.started, ctx.deadline, payloads)

        def on_close() -> None:
            replica.inflight -= 1
            admission.leave(node)

        stream = relay(
            opened.first,
            payloads,
            rewriter,
            model_id=model,
            deadline=ctx.deadline,
            on_close=on_close,
        )
        return RemoteAnswer(stream=stream)

    async def _call(
        self,
        pool: ModelPool[UpstreamClient],
        node: str,
        ctx: RequestContext,
        call: Callable[[UpstreamClient], Awaitable[T]],
        retries: int = 1,
    ) -> tuple[Replica[UpstreamClient], T]:
        """Run `call` on a replica; on a retryable failure, once more on another one. The
        returned replica's `inflight` stays counted: the caller releases it."""
        spec = self.specs[pool.name]
        tried: set[str] = set()
        last: ServiceError | None = None  # built only on failure: errors sanitize their text
        for _ in range(retries + 1):
            if sum(r.inflight for r in pool.replicas) >= spec.max_concurrency:
                self.metrics.rejected.labels("upstream").inc()
                raise Overloaded(
                    f"model '{pool.name}' has {spec.max_concurrency} requests in flight "
                    "(its max_concurrency); retry shortly"
                )
            try:
                replica = pool.pick(exclude=tried)
            except Unavailable:
                raise last or Unavailable(f"no healthy upstream for model '{pool.name}'") from None
            tried.add(replica.url)
            replica.inflight += 1
            try:
                async with asyncio.timeout(ctx.remaining()):
                    result = await call(replica.client)
            except UpstreamFailure as failure:
                replica.inflight -= 1
                if failure.unhealthy:
                    pool.mark_failed(replica)
                if not failure.retry:
                    raise failure.error from None
                last = failure.error
                continue
            except TimeoutError:
                replica.inflight -= 1
                raise DeadlineExceeded("the request deadline passed") from None
            except BaseException:
                replica.inflight -= 1
                raise
            if len(tried) > 1:
                self.metrics.retries.labels(node).inc()
            return replica, result
        assert last is not None  # the loop ran and every attempt failed
        raise last

    def upstream_body(
        self,
        kind: Kind,
        req: ChatCompletionRequest | CompletionRequest,
        node_id: str,
        spec: OpenAIModelSpec,
    ) -> bytes:
        """The client's request as the upstream should see it: every field the client set
        (including ones Octograph does not interpret, e.g. presence_penalty), the upstream's
        model name, and the node's system prompt and sampling defaults."""
        body = req.model_dump(exclude_unset=True, exclude=GATEWAY_ONLY_FIELDS)
        body["model"] = spec.model
        node = self.graph.nodes.get(node_id)
        if isinstance(node, ModelNode):
            defaults = node.sampling
            if defaults.temperature is not None:
                body.setdefault("temperature", defaults.temperature)
            if defaults.top_p is not None:
                body.setdefault("top_p", defaults.top_p)
            if defaults.max_tokens is not None and not (
                {"max_tokens", "max_completion_tokens"} & body.keys()
            ):
                body["max_tokens"] = defaults.max_tokens
            if kind == "chat" and node.system_prompt:
                body["messages"] = _with_system(body["messages"], node.system_prompt)
        return orjson.dumps(body)


def _with_system(messages: list[dict[str, Any]], system: str) -> list[dict[str, Any]]:
    """The node's system prompt ahead of the client's (merged into the client's own system
    message, as the local path does)."""
    head = messages[0] if messages else None
    if head is not None and head.get("role") in ("system", "developer"):
        content = head.get("content")
        if isinstance(content, list):
            content = "".join(str(p.get("text", "")) for p in content)
        merged = f"{system}\n\n{content or ''}"
        return [{**head, "content": merged}, *messages[1:]]
    return [{"role": "system", "content": system}, *messages]


def _response_id(kind: Kind, request_id: str) -> str:
    return ("chatcmpl-" if kind == "chat" else "cmpl-") + request_id
