"""THE data flow of a request (DESIGN.md "Data flow"):

    resolve target -> route (0..n hops) -> plan worker requests -> run node -> OpenAI reply

A chat or completion request is resolved to a starting point (`auto` = the root router, a node
id, or a raw model id), routed to the node that answers, turned into one worker request per
prompt, run on that node's model (or its ensemble members), and shaped into an OpenAI response:
one JSON body, or an SSE stream. Every stage is bounded by the request's deadline.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from service.config import GatewaySettings
from service.errors import BadRequest, DeadlineExceeded, NotFound, Overloaded, ServiceError
from service.gateway.dispatch import open_model_stream
from service.gateway.openai_format import Kind, ResponseHeader
from service.gateway.streams import EventStream, collect, merge_jobs, to_sse
from service.observability.metrics import GatewayMetrics
from service.protocol.internal import ChatTurn, GenerateEvent, GenerateRequest, SamplingOptions
from service.protocol.openai import ChatCompletionRequest, CompletionRequest, RouteRequest
from service.remote.runner import RemoteRunner
from service.router.graph import EnsembleNode, GraphConfig, ModelNode, SamplingDefaults
from service.router.policy import Router, RouteResult, query_text, resolve_start
from service.worker.pool import WorkerPools

if TYPE_CHECKING:
    from service.console.stats import ConsoleStats


@dataclass
class RequestContext:
    request_id: str
    deadline: float  # time.monotonic() by which the whole request must be done
    started: float = field(default_factory=time.monotonic)  # for the console's latency stats

    @property
    def worker_headers(self) -> dict[str, str]:
        return {"x-request-id": self.request_id}

    def remaining(self) -> float:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise DeadlineExceeded("the request deadline passed")
        return left


@dataclass
class Reply:
    """What a route returns: a JSON body, or an SSE byte stream, plus routing headers."""

    route: RouteResult
    body: dict[str, Any] | None = None
    stream: AsyncIterator[bytes] | None = None
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class Job:
    """One worker request; its choices are numbered from `first_index`."""

    request: GenerateRequest
    first_index: int


class NodeAdmission:
    """Per-node in-flight bound: a hot node refuses quickly instead of queueing."""

    def __init__(self, limit: int, metrics: GatewayMetrics) -> None:
        self.limit = limit
        self.inflight: dict[str, int] = {}
        self.metrics = metrics

    def enter(self, node: str) -> None:
        if self.inflight.get(node, 0) >= self.limit:
            self.metrics.rejected.labels("node").inc()
            raise Overloaded(f"node '{node}' is at capacity; retry shortly")
        self.inflight[node] = self.inflight.get(node, 0) + 1

    def leave(self, node: str) -> None:
        left = self.inflight.get(node, 1) - 1
        if left:
            self.inflight[node] = left
        else:
            self.inflight.pop(node, None)


class Pipeline:
    def __init__(
        self,
        graph: GraphConfig,
        pools: WorkerPools,
        router: Router,
        metrics: GatewayMetrics,
        settings: GatewaySettings,
        ensembles: Any = None,
    ) -> None:
        self.graph = graph
        self.pools = pools
        self.router = router
        self.metrics = metrics
        self.settings = settings
        self.ensembles = ensembles
        self.admission = NodeAdmission(settings.max_inflight_per_node, metrics)
        self.console: ConsoleStats | None = None  # the /console recorder, set by the app
        self.remote = RemoteRunner(graph, pools, metrics)  # nodes on OpenAI-compatible servers

    # -- the story --------------------------------------------------------------------------

    async def chat(self, req: ChatCompletionRequest, ctx: RequestContext) -> Reply:
        turns = [_turn(m.role, m.text()) for m in req.messages]
        route = await self.route_to(
            req.model, query_text([(t.role, t.content) for t in turns], None), ctx
        )
        if (remote := await self._answer_remote("chat", req, route, ctx)) is not None:
            return remote
        sampling = self._sampling(
            req, route.node, logprobs=req.top_logprobs or 0 if req.logprobs else None
        )
        jobs = [Job(self._request(ctx, route.node, sampling, messages=turns), 0)]
        return await self._run(
            "chat", req, route, jobs, ctx, logprobs_on=req.logprobs, top_k=req.top_logprobs or 0
        )

    async def completion(self, req: CompletionRequest, ctx: RequestContext) -> Reply:
        prompts = req.prompts()
        first_text = next((p for p in prompts if isinstance(p, str)), None)
        route = await self.route_to(req.model, query_text(None, first_text or ""), ctx)
        if (remote := await self._answer_remote("completion", req, route, ctx)) is not None:
            return remote
        sampling = self._sampling(req, route.node, logprobs=req.logprobs)
        if req.echo and req.logprobs is not None:
            sampling.prompt_logprobs = req.logprobs
        jobs = []
        for i, prompt in enumerate(prompts):
            kw: dict[str, Any] = (
                {"prompt": prompt} if isinstance(prompt, str) else {"prompt_token_ids": prompt}
            )
            request = self._request(ctx, route.node, sampling, suffix=f"-{i}", **kw)
            jobs.append(Job(request, i * req.n))
        return await self._run(
            "completion",
            req,
            route,
            jobs,
            ctx,
            logprobs_on=req.logprobs is not None,
            top_k=req.logprobs or 0,
            echo=req.echo,
            byte_exact=req.byte_exact,
        )

    async def route_only(self, req: RouteRequest, ctx: RequestContext) -> RouteResult:
        turns = [(str(m.role), m.text()) for m in req.messages] if req.messages else None
        return await self.route_to(req.model, query_text(turns, req.prompt), ctx)

    # -- stages -----------------------------------------------------------------------------

    async def route_to(self, model: str, query: str, ctx: RequestContext) -> RouteResult:
        if model in self.graph.models and model not in self.graph.nodes:
            return RouteResult(node=model, route=[model])  # raw model: no routing, no prompt
        start = resolve_start(self.graph, model)
        try:
            async with asyncio.timeout(ctx.remaining()):
                route = await self.router.route(start, query, ctx.worker_headers)
        except BaseException as exc:
            if self.console is not None:
                self.console.request_failed(start, ctx.started, exc)
            raise
        if self.console is not None:
            self.console.record_decision(route)
        return route

    def _sampling(
        self, req: ChatCompletionRequest | CompletionRequest, node_id: str, logprobs: int | None
    ) -> SamplingOptions:
        defaults = _node_defaults(self.graph, node_id)
        return SamplingOptions(
            max_tokens=req.token_limit if req.token_limit is not None else defaults.max_tokens,
            temperature=_first(req.temperature, defaults.temperature, 1.0),
            top_p=_first(req.top_p, defaults.top_p, 1.0),
            n=req.n,
            stop=req.stop_list(),
            seed=req.seed,
            logprobs=logprobs,
            ignore_eos=req.ignore_eos,
        )

    def _request(
        self,
        ctx: RequestContext,
        node_id: str,
        sampling: SamplingOptions,
        *,
        suffix: str = "",
        messages: list[ChatTurn] | None = None,
        **prompt: Any,
    ) -> GenerateRequest:
        node = self.graph.nodes.get(node_id)
        system = node.system_prompt if isinstance(node, ModelNode | EnsembleNode) else None
        if messages is not None and system:
            if messages[0].role == "system":
                merged = f"{system}\n\n{messages[0].content}"
                messages = [ChatTurn(role="system", content=merged), *messages[1:]]
            else:
                messages = [ChatTurn(role="system", content=system), *messages]
        return GenerateRequest(
            request_id=ctx.request_id + suffix,
            messages=messages,
            sampling=sampling.model_copy(),
            **prompt,
        )

    def model_of(self, node_id: str) -> str:
        node = self.graph.nodes.get(node_id)
        if node is None:
            if node_id in self.graph.models:
                return node_id
            raise NotFound(f"the model '{node_id}' does not exist", code="model_not_found")
        if isinstance(node, ModelNode):
            return node.model
        raise BadRequest(f"node '{node_id}' ({node.kind}) cannot generate directly")

    async def open_node(
        self, node_id: str, request: GenerateRequest, ctx: RequestContext, byte_exact: bool = False
    ) -> EventStream:
        """The events of one worker request on the node that answers."""
        node = self.graph.nodes.get(node_id)
        if byte_exact and not isinstance(node, EnsembleNode):
            # Byte-level generation on one model: the prompt's last word is re-opened.
            if self.ensembles is None:
                raise ServiceError("byte_exact is not available on this gateway")
            exact: EventStream = await self.ensembles.open_exact(
                self.model_of(node_id), request, ctx
            )
            return exact
        if isinstance(node, EnsembleNode):
            if self.ensembles is None:
                raise ServiceError(f"ensemble node '{node_id}' is not available on this gateway")
            stream: EventStream = await self.ensembles.open(node_id, node, request, ctx)
            return stream
        pool = self.pools[self.model_of(node_id)]
        stream, retries = await open_model_stream(pool, request, ctx.worker_headers)
        if retries:
            self.metrics.retries.labels(node_id).inc()
        return stream

    async def _answer_remote(
        self,
        kind: Kind,
        req: ChatCompletionRequest | CompletionRequest,
        route: RouteResult,
        ctx: RequestContext,
    ) -> Reply | None:
        """A node on an OpenAI-compatible upstream answers with the client's request passed
        through (service/remote/). None: the node is local, or its fallback is."""
        answer = await self.remote.answer(kind, req, route, ctx, self.admission, self.console)
        if answer is None:
            return None
        headers = {"x-octograph-route": route.header}
        return Reply(route=route, body=answer.body, stream=answer.stream, headers=headers)

    async def _open_with_fallback(
        self,
        route: RouteResult,
        request: GenerateRequest,
        ctx: RequestContext,
        byte_exact: bool = False,
    ) -> EventStream:
        try:
            return await self.open_node(route.node, request, ctx, byte_exact)
        except ServiceError as exc:
            # Nothing has reached the client yet: the router's fallback may still answer (a
            # remote fallback would need the client's request, which this stage no longer has).
            if (
                exc.status < 500
                or not route.fallback
                or route.fallback == route.node
                or self.remote.serves(route.fallback)
            ):
                raise
            route.route.append(f"fallback:{route.fallback}")
            route.node = route.fallback
            return await self.open_node(route.fallback, request, ctx, byte_exact)

    async def _run(
        self,
        kind: Kind,
        req: ChatCompletionRequest | CompletionRequest,
        route: RouteResult,
        jobs: list[Job],
        ctx: RequestContext,
        *,
        logprobs_on: bool,
        top_k: int,
        echo: bool = False,
        byte_exact: bool = False,
    ) -> Reply:
        node = route.node
        self.admission.enter(node)
        try:
            streams = [
                (
                    job.first_index,
                    await self._open_with_fallback(route, job.request, ctx, byte_exact),
                )
                for job in jobs
            ]
        except BaseException as exc:
            self.admission.leave(node)
            if self.console is not None:
                self.console.request_failed(node, ctx.started, exc)
            raise
        header = ResponseHeader(id=_response_id(kind, ctx.request_id), model=req.model)
        events = merge_jobs(streams, idle_timeout_s=self.settings.stream_idle_timeout_s)
        if self.console is not None:  # records the request when its events end, however
            events = self.console.watch(route, ctx.started, ctx.deadline, events)
        octo = route.as_dict()
        headers = {"x-octograph-route": route.header}
        if req.stream:
            sse = to_sse(
                kind,
                header,
                events,
                include_usage=req.include_usage,
                logprobs_on=logprobs_on,
                top_k=top_k,
                echo=echo,
                prompts=_echo_prompts(req, echo),
                octograph=octo,
                deadline=ctx.deadline,
                on_close=lambda: self.admission.leave(node),
            )
            return Reply(route=route, stream=sse, headers=headers)
        try:
            async with asyncio.timeout(ctx.remaining()):
                body = await collect(
                    kind,
                    header,
                    events,
                    logprobs_on=logprobs_on,
                    top_k=top_k,
                    echo=echo,
                    prompts=_echo_prompts(req, echo),
                    octograph=octo,
                )
        except TimeoutError:
            raise DeadlineExceeded("the request deadline passed") from None
        finally:
            self.admission.leave(node)
        return Reply(route=route, body=body, headers=headers)


def _turn(role: str, content: str) -> ChatTurn:
    return ChatTurn(role="system" if role == "developer" else role, content=content)


def _first(*values: float | None) -> float:
    return next(v for v in values if v is not None)


def _node_defaults(graph: GraphConfig, node_id: str) -> SamplingDefaults:
    node = graph.nodes.get(node_id)
    if isinstance(node, ModelNode | EnsembleNode):
        return node.sampling
    return SamplingDefaults()


def _response_id(kind: Kind, request_id: str) -> str:
    return ("chatcmpl-" if kind == "chat" else "cmpl-") + request_id


def _echo_prompts(req: ChatCompletionRequest | CompletionRequest, echo: bool) -> list[str]:
    if not echo or not isinstance(req, CompletionRequest):
        return []
    return [p if isinstance(p, str) else "" for p in req.prompts()]


GenerateEvents = AsyncIterator[GenerateEvent]
