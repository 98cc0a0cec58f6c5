"""Model nodes on OpenAI-compatible upstreams (`kind: openai` models: vLLM, TGI, llama.cpp,
Ollama, a hosted API).

The client's request goes through as the plan renders it for an upstream (`upstream_body`: the
fields the gateway supports plus the model's `passthrough` list, the upstream's model name, the
node's system prompt and sampling defaults). The reply comes back with the gateway's id, the
model the client addressed and the route object; streamed chunks are rewritten as bytes
(relay.py). Replica choice, the one retry before the first byte and cooldown are the shared
`first_answer` rule; fallback is the pipeline's.
"""

from __future__ import annotations

from service.errors import BadRequest, Overloaded
from service.gateway.clients.pool import ModelPool, WorkerPools, first_answer
from service.gateway.clients.upstream import UpstreamClient
from service.gateway.plan import RequestPlan
from service.gateway.runners.base import Answer, Target
from service.gateway.runners.relay import ChunkRewriter, rewritten
from service.gateway.scope import RequestScope, close_quietly
from service.graph.schema import GraphConfig, OpenAIModelSpec
from service.observability.metrics import GatewayMetrics

PATHS = {"chat": "/chat/completions", "completion": "/completions"}


class RemoteRunner:
    kind = "remote"

    def __init__(self, graph: GraphConfig, pools: WorkerPools, metrics: GatewayMetrics) -> None:
        self.pools = pools
        self.metrics = metrics
        self.specs = graph.openai_models()

    def serves(self, plan: RequestPlan, target: Target) -> bool:
        return target.model in self.pools.upstreams

    async def open(self, plan: RequestPlan, target: Target, scope: RequestScope) -> Answer:
        assert target.model is not None
        if plan.byte_exact:
            raise BadRequest(
                f"byte_exact needs a model served by Octograph's workers; '{target.node_id}' "
                "is on a remote server",
                param="byte_exact",
            )
        spec = self.specs[target.model]
        pool = self.pools.upstreams[target.model]
        self._check_capacity(pool, spec)
        body = plan.upstream_body(spec.model, target.node, frozenset(spec.passthrough))
        headers = {"x-request-id": plan.ctx.request_id}
        rewriter = ChunkRewriter(plan.reply.response_id, plan.reply.model, target.octograph)
        path = PATHS[plan.kind]
        if not plan.stream:
            raw, retries = await first_answer(
                pool, lambda c: c.post(path, body, headers), scope.lease
            )
            self._count(retries, target)
            return Answer(body=rewriter.body(raw))
        opened, retries = await first_answer(
            pool, lambda c: c.open_stream(path, body, headers), scope.lease
        )
        self._count(retries, target)
        payloads = opened.payloads
        scope.on_close(lambda: close_quietly(payloads))
        return Answer(chunks=rewritten(opened.first, payloads, rewriter, target.model))

    def _check_capacity(self, pool: ModelPool[UpstreamClient], spec: OpenAIModelSpec) -> None:
        if sum(r.inflight for r in pool.replicas) >= spec.max_concurrency:
            self.metrics.rejected.labels("upstream").inc()
            raise Overloaded(
                f"model '{pool.name}' has {spec.max_concurrency} requests in flight "
                "(its max_concurrency); retry shortly"
            )

    def _count(self, retries: int, target: Target) -> None:
        if retries:
            self.metrics.retries.labels(target.node_id).inc()
