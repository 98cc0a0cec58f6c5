"""THE data flow of a request (DESIGN.md "Request spine"):

    plan -> admit -> route -> run (the node's runner, falling back once) -> reply -> observe

The front door parses the body and builds the request's plan (plan.py). The pipeline admits it
by its cost, routes it (0..n hops, one score call), opens the answering node's runner, and
hands the answer to the one reply renderer. Everything common to node kinds is here and only
here: admission, the deadline, fallback between any two node kinds, and observation; what a
request holds is released by its scope in one place that always runs.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from service.errors import BadRequest, DeadlineExceeded, NotFound, ServiceError
from service.gateway.admission import Admission, Ticket
from service.gateway.observer import Observers, RequestObserver
from service.gateway.plan import RequestContext, RequestPlan, check_cost
from service.gateway.reply import Reply, collect, to_sse
from service.gateway.routing import Router, RouteResult, resolve_start
from service.gateway.runners.base import Answer, NodeRunner, Target
from service.gateway.scope import RequestScope
from service.graph.schema import EnsembleNode, GraphConfig, ModelNode

FALLBACK = "fallback:"  # how a fallback hop is marked in the route


class Pipeline:
    def __init__(
        self,
        graph: GraphConfig,
        router: Router,
        runners: Sequence[NodeRunner],
        admission: Admission,
        observers: Observers,
        *,
        max_request_sequences: int,
    ) -> None:
        self.graph = graph
        self.router = router
        self.runners = list(runners)  # asked in order: the first that serves a target runs it
        self.admission = admission
        self.observers = observers
        self.max_request_sequences = max_request_sequences

    # -- the story --------------------------------------------------------------------------

    async def handle(self, plan: RequestPlan) -> Reply:
        ctx = plan.ctx
        observer = RequestObserver(
            self.observers, ctx.request_id, ctx.started, ctx.deadline, key=ctx.key
        )
        scope = RequestScope()
        try:
            check_cost(plan, self.max_request_sequences)
            ticket = await self.admission.admit(ctx.key, plan.cost)
            scope.on_close(ticket.aclose)
            route = await self.route(plan.request.model, plan.query, ctx, observer)
            answer, target = await self.run(plan, route, ticket, scope, observer)
            return await self.reply(plan, answer, target, scope, observer)
        except BaseException as exc:
            await scope.aclose()
            observer.finished(exc)
            raise

    async def route_only(self, model: str, query: str, ctx: RequestContext) -> RouteResult:
        """Routing alone (`POST /v1/route`), admitted like a request of one sequence."""
        ticket = await self.admission.admit(ctx.key, 1)
        try:
            return await self.route(model, query, ctx, None)
        finally:
            await ticket.aclose()

    # -- stages -----------------------------------------------------------------------------

    async def route(
        self, model: str, query: str, ctx: RequestContext, observer: RequestObserver | None
    ) -> RouteResult:
        if model in self.graph.models and model not in self.graph.nodes:
            route = RouteResult(node=model, route=[model])  # raw model: no routing, no prompt
        else:
            start = resolve_start(self.graph, model)
            if observer is not None:
                observer.aimed(start)
            try:
                async with asyncio.timeout(ctx.remaining()):
                    route = await self.router.route(start, query, ctx)
            except TimeoutError:
                raise DeadlineExceeded("the request deadline passed while routing") from None
        if observer is not None:
            observer.routed(route)
        else:
            self.observers.console.record_decision(route)
        return route

    async def run(
        self,
        plan: RequestPlan,
        route: RouteResult,
        ticket: Ticket,
        scope: RequestScope,
        observer: RequestObserver,
    ) -> tuple[Answer, Target]:
        """The answering node's runner, opened up to its first event. A failure of the node
        itself (5xx) before anything reached the client moves the request once to the
        router's fallback, whatever kind either node is."""
        while True:
            target = self.target(route)
            runner = self.runner_for(plan, target)
            observer.running(target.node_id, runner.kind)
            try:
                ticket.enter_node(target.node_id)
                async with asyncio.timeout(plan.ctx.remaining()):
                    return await runner.open(plan, target, scope), target
            except TimeoutError:
                raise DeadlineExceeded("the request deadline passed") from None
            except ServiceError as exc:
                fallback = route.fallback
                if exc.status < 500 or not fallback or fallback == route.node:
                    raise
                observer.failed_over(route.node)
                route.route.append(FALLBACK + fallback)
                route.node = fallback
                route.fallback = None  # one fallback per request

    async def reply(
        self,
        plan: RequestPlan,
        answer: Answer,
        target: Target,
        scope: RequestScope,
        observer: RequestObserver,
    ) -> Reply:
        headers = {"x-octograph-route": ">".join(target.octograph["route"])}
        if plan.stream:
            stream = to_sse(
                plan.reply, answer, target.octograph, deadline=plan.ctx.deadline, observer=observer
            )
            return Reply(headers, scope, observer, stream=stream)
        try:
            async with asyncio.timeout(plan.ctx.remaining()):
                body, tokens = await collect(plan.reply, answer, target.octograph, observer)
        except TimeoutError:
            raise DeadlineExceeded("the request deadline passed") from None
        await scope.aclose()
        observer.finished(None, tokens)
        return Reply(headers, scope, observer, body=body)

    # -- the graph's view of a node ------------------------------------------------------------

    def target(self, route: RouteResult) -> Target:
        node_id = route.node
        node = self.graph.nodes.get(node_id)
        if node is None:
            if node_id not in self.graph.models:
                raise NotFound(f"the model '{node_id}' does not exist", code="model_not_found")
            model: str | None = node_id
        elif isinstance(node, ModelNode):
            model = node.model
        elif isinstance(node, EnsembleNode):
            model = None
        else:
            raise BadRequest(f"node '{node_id}' ({node.kind}) cannot generate directly")
        return Target(node_id, node, model, route.as_dict())

    def runner_for(self, plan: RequestPlan, target: Target) -> NodeRunner:
        for runner in self.runners:
            if runner.serves(plan, target):
                return runner
        raise BadRequest(f"no runner on this gateway serves node '{target.node_id}'")
