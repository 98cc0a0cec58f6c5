"""Model nodes on Octograph's own vLLM workers: one worker request per prompt, opened at once.

Each request goes to the least-loaded replica of the node's model, with the one retry rule
(`first_answer`): a replica that cannot be reached before its first event is left once for
another. A worker's error event before any text is an error of the request; its streams are
closed (which aborts the engine's work) and its leases returned by the request scope.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from service.errors import BadRequest, error_from_status
from service.gateway.clients.pool import ModelPool, WorkerPools, first_answer
from service.gateway.clients.worker import WorkerClient, WorkerUnreachable
from service.gateway.plan import RequestPlan
from service.gateway.runners.base import Answer, Target
from service.gateway.scope import RequestScope, close_quietly
from service.gateway.streams import merge_jobs
from service.graph.schema import EnsembleNode
from service.observability.metrics import GatewayMetrics
from service.protocol.internal import GenerateEvent, GenerateRequest

Opened = tuple[GenerateEvent, AsyncIterator[GenerateEvent]]


class LocalRunner:
    kind = "model"

    def __init__(
        self,
        pools: WorkerPools,
        metrics: GatewayMetrics,
        idle_timeout_s: float,
        tool_parsers: dict[str, str] | None = None,
    ) -> None:
        self.pools = pools
        self.metrics = metrics
        self.idle_timeout_s = idle_timeout_s
        self.tool_parsers = tool_parsers or {}  # model -> vLLM tool parser (tool_choice auto)

    def serves(self, plan: RequestPlan, target: Target) -> bool:
        return (
            not plan.byte_exact
            and not isinstance(target.node, EnsembleNode)
            and target.model in self.pools.workers
        )

    async def open(self, plan: RequestPlan, target: Target, scope: RequestScope) -> Answer:
        assert target.model is not None
        parser = None
        if plan.constraints.tool_mode == "auto":
            parser = self.tool_parsers.get(target.model)
            if parser is None:
                raise BadRequest(
                    f"node '{target.node_id}' cannot serve tool_choice 'auto': model "
                    f"'{target.model}' has no tool-call format (no tool_parser in the graph); "
                    "use tool_choice 'required' or name a function",
                    param="tool_choice",
                )
        pool = self.pools.workers[target.model]
        cap = pool.request_sequence_cap()
        if cap is not None and plan.cost > cap:
            raise BadRequest(
                f"node '{target.node_id}' runs at most {cap} sequences per request (prompts x "
                f"n), half of a worker's batch so that other requests start at once; this "
                f"request asks for {plan.cost}: lower n or send fewer prompts per request",
                param="n",
            )
        requests = plan.generate_requests(target.node, tool_parser=parser)
        if len(requests) == 1:  # the common case: no task per request
            first, stream = await self._open(pool, requests[0], plan, scope, target)
            return Answer(
                events=merge_jobs([(0, first, stream)], idle_timeout_s=self.idle_timeout_s)
            )
        # Several prompts open at once (not one after another, each waiting for a first event).
        opened = await asyncio.gather(
            *(self._open(pool, r, plan, scope, target) for r in requests), return_exceptions=True
        )
        failures = [o for o in opened if isinstance(o, BaseException)]
        if failures:
            raise failures[0]  # the scope closes the streams that did open
        n = plan.reply.n
        jobs = [(i * n, first, stream) for i, (first, stream) in enumerate(opened)]  # type: ignore[misc]
        return Answer(events=merge_jobs(jobs, idle_timeout_s=self.idle_timeout_s))

    async def _open(
        self,
        pool: ModelPool[WorkerClient],
        request: GenerateRequest,
        plan: RequestPlan,
        scope: RequestScope,
        target: Target,
    ) -> Opened:
        headers = plan.ctx.worker_headers

        async def first_event(client: WorkerClient) -> Opened:
            stream = client.stream_generate(request, headers)
            scope.on_close(lambda: close_quietly(stream))  # closing it aborts the worker
            try:
                first = await anext(stream)
            except StopAsyncIteration:
                raise WorkerUnreachable("the worker closed the stream before answering") from None
            if first.get("type") == "error":
                raise error_from_status(
                    int(first.get("status", 502)), str(first.get("message", ""))
                )
            return first, stream

        opened, retries = await first_answer(pool, first_event, scope.lease)
        if retries:
            self.metrics.retries.labels(target.node_id).inc()
        return opened
