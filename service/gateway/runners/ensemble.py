"""Runs an ensemble node: the byte loop over its members' workers (DESIGN.md "Byte-level
ensembles"), shaped as the same event stream a model node's worker produces, so the
pipeline's JSON, SSE, usage and deadline handling apply unchanged.

Per request and choice: each member gets its prompt (its own chat template, or the plain
transcript for a base model without one, see `prompting.py` for the re-opened tail) and a
`CoveringTree` rooted there, whose reductions come from that member's worker
(`POST /internal/byte-dist`, one call per member per byte carrying every query of the step).
Each byte: members' next-byte distributions (in threads, concurrently; see remote.py for why)
-> mix (node `mode`: weighted mixture, product of experts, or adaptive) with the graph's
weights -> UTF-8 mask -> temperature -> top-p -> seeded sample -> every tree advances.
Complete characters are released (never half a character), stop strings are held back until
they are decided, and the stream ends on the sampled stop outcome, a stop string, the byte
limit, a member's context filling up, the deadline, or the client leaving.

Units: for byte-level generation `max_tokens` counts **bytes** of UTF-8 output (the
ensemble's unit of generation; members' tokens do not line up), and `usage.completion_tokens`
reports bytes as well; `usage.prompt_tokens` is the first member's prompt length in its own
tokens.  A stream ends on a character boundary, so it may stop up to 3 bytes short of the
limit.

The same loop runs on a single model for `"byte_exact": true` completions, whose prompt may
end mid-word (token healing, exact).
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial

import numpy as np
from numpy.typing import NDArray

from service.bytelevel.covering import CoveringTree, CoverStats, ZeroProbabilityError
from service.bytelevel.grammar import ByteGrammar, json_grammar
from service.bytelevel.mixing import AdaptiveMixer, mix, product
from service.bytelevel.prompting import MemberPrompt, reopen_tail
from service.bytelevel.sampling import ByteSampler, Utf8Buffer
from service.bytelevel.stops import StopMatcher
from service.chat_template import transcript_turn_markers
from service.errors import BadRequest, ContextLengthExceeded, ServiceError, Unavailable
from service.gateway.clients.pool import WorkerPools
from service.gateway.plan import RequestContext, RequestPlan
from service.gateway.runners.base import Answer, Target
from service.gateway.runners.byte_oracle import BridgedOracle, PoolReducer, RequestCancelled
from service.gateway.runners.ensemble_assets import AssetCache, AssetFactory, MemberAssets
from service.gateway.scope import RequestScope
from service.gateway.streams import interleave, merge_jobs
from service.graph.schema import EnsembleNode, GraphConfig
from service.observability.metrics import GatewayMetrics
from service.protocol.internal import GenerateEvent, GenerateRequest, TokenLogprobEvent

log = logging.getLogger(__name__)

F64 = NDArray[np.float64]
STOP = 256
# Used when neither the request nor the node sets max_tokens (bytes, see the docstring).
DEFAULT_MAX_BYTES = 1024
# Covers below this fraction of the prefix mass are dropped (0 keeps every cover: exact).
# Most bytes complete some token, and the canonical path that ends there is a new tree node
# that costs its worker a forward when queried; mid-word ones rarely carry 1% of the mass, so
# dropping them cuts forwards about threefold.  On held-out text (`octograph ensemble eval
# --prune`) 0.01 changes bits/byte by about 0.001; the tree books what it dropped and
# rebuilds exactly if a sampled byte needs a dropped cover.
DEFAULT_PRUNE = 0.01
# Speculation (service/worker/byte_dist.py): children a member's worker fetches ahead per query,
# the likeliest tokens that extend the query's partial bytes, each holding at least
# DEFAULT_SPECULATE_MIN_P of the mass of those tokens, in the background after answering.  Off
# by default: on this 2-core CPU a speculated row costs about what a needed one does (the
# output layer and the capture of a full row; ~57 ms batched against ~80 alone for Gemma-3),
# the engines and the front ends share the two cores, and the text reaches a speculated child
# a few bytes (a few ms) after the guess, so at best the time moves (bench/ensemble_speed.py,
# README "Ensembles": 0.8 and one child broke even, 0.2 / 0.5 and two children, or riding in
# a needed step, lost 15-45%).  A node's member turns it on with `speculate: N`.
DEFAULT_SPECULATE = 0
DEFAULT_SPECULATE_MIN_P = 0.8
DEFAULT_SPECULATE_WITH = "background"
# Threads that run members' trees; a step holds one per member while it waits on a worker.
DEFAULT_THREADS = 32
CHOICE_QUEUE_BOUND = 64
# Sequences (prompts x n) one request may run at the byte level: each is a loop that holds a
# member's thread per step, so a fan-out here would starve every other ensemble request.
MAX_BYTE_LEVEL_SEQUENCES = 8


class TreeTotals:
    """Covering-tree counters summed per member model over finished requests (what the
    bench reports; where the time of byte-level generation goes)."""

    FIELDS = (
        "steps",
        "oracle_calls",
        "queries",
        "new_paths",
        "recoveries",
        "pruned_mass",
        "leaked_nats",
    )
    # From the members' workers (ByteDistResponse): rows waited for, rows fetched ahead.
    WORKER_FIELDS = (
        "calls",
        "fetching_calls",
        "fetched",
        "speculated",
        "speculation_hits",
        "extended",
    )

    def __init__(self) -> None:
        self.by_model: dict[str, dict[str, float]] = {}

    def add(self, model: str, stats: CoverStats) -> None:
        entry = self._entry(model)
        for name in self.FIELDS:
            entry[name] += float(getattr(stats, name))

    def add_worker(self, model: str, reducer: PoolReducer) -> None:
        entry = self._entry(model)
        for name in self.WORKER_FIELDS:
            entry[name] += float(getattr(reducer, name))

    def _entry(self, model: str) -> dict[str, float]:
        return self.by_model.setdefault(model, dict.fromkeys(self.FIELDS + self.WORKER_FIELDS, 0.0))


@dataclass(frozen=True)
class Member:
    model: str
    weight: float
    assets: MemberAssets
    prompt: MemberPrompt
    reducer: PoolReducer


class EnsembleRunner:
    def __init__(
        self,
        graph: GraphConfig,
        pools: WorkerPools,
        metrics: GatewayMetrics,
        *,
        idle_timeout_s: float = 60.0,
        assets: AssetFactory | None = None,
        threads: int = DEFAULT_THREADS,
        prune: float = DEFAULT_PRUNE,
        speculate: int = DEFAULT_SPECULATE,
        speculate_min_p: float = DEFAULT_SPECULATE_MIN_P,
        speculate_with: str = DEFAULT_SPECULATE_WITH,
        preload: bool = True,
        previous_assets: AssetCache | None = None,
    ) -> None:
        self.graph = graph
        self.pools = pools
        self.metrics = metrics
        # After a reload, the replaced runtime's assets: nothing unchanged is parsed again.
        self.assets = AssetCache(graph, pools, assets, previous=previous_assets)
        self.prune = prune
        self.speculate = speculate  # for members that do not set their own
        self.speculate_min_p = speculate_min_p
        self.speculate_with = speculate_with
        # New token paths as extensions of the workers' streaming sessions (benches set False
        # to compare; service/worker/path_sessions.py).
        self.sessions = True
        self.idle_timeout_s = idle_timeout_s
        self.totals = TreeTotals()
        self._executor = ThreadPoolExecutor(threads, thread_name_prefix="ensemble")
        if preload and self.assets.factory is None:
            self.assets.preload(
                sorted(
                    {
                        m.model
                        for n in graph.nodes.values()
                        if isinstance(n, EnsembleNode)
                        for m in n.members
                    }
                )
            )

    kind = "ensemble"

    def serves(self, plan: RequestPlan, target: Target) -> bool:
        return isinstance(target.node, EnsembleNode) or plan.byte_exact

    async def open(self, plan: RequestPlan, target: Target, scope: RequestScope) -> Answer:
        """An ensemble node's byte loop, or `byte_exact` on one model (the prompt may end
        mid-word: token healing, exact): one loop per prompt and choice."""
        if plan.cost > MAX_BYTE_LEVEL_SEQUENCES:
            raise BadRequest(
                f"byte-level generation serves at most {MAX_BYTE_LEVEL_SEQUENCES} sequences "
                f"(prompts x n) per request; this one asks for {plan.cost}",
                param="n",
            )
        if plan.constraints.tool_mode == "auto":
            raise BadRequest(
                f"node '{target.node_id}' cannot serve tool_choice 'auto': byte-level "
                "generation has no model's tool-call format; use tool_choice 'required' or "
                "name a function (decoding is then constrained to the call's schema)",
                param="tool_choice",
            )
        node = target.node
        if isinstance(node, EnsembleNode):
            spec = [
                (m.model, m.weight, self.speculate if m.speculate is None else m.speculate)
                for m in node.members
            ]
            mode = node.mode
        elif target.model is not None and target.model in self.pools.workers:
            spec, mode = [(target.model, 1.0, self.speculate)], "mix"
            try:  # loaded once per model and kept: the loop below finds them in the cache
                async with asyncio.timeout(plan.ctx.remaining()):
                    await self.assets.get(target.model)
            except Unavailable as exc:
                # A model this gateway has no tokenizer files for cannot heal tokens; the
                # request is fine without byte_exact: the client's choice, so a 400, not a 503.
                raise BadRequest(
                    f"byte_exact is not available for '{target.node_id}': {exc.message}",
                    param="byte_exact",
                ) from None
        else:
            raise BadRequest(
                f"byte_exact needs a model served by Octograph's workers; '{target.node_id}' "
                "is not one",
                param="byte_exact",
            )
        requests = plan.generate_requests(node, byte_level=True)
        streams = await asyncio.gather(
            *(self._open(spec, mode, r, plan.ctx, scope) for r in requests)
        )
        jobs = [(i * plan.reply.n, None, s) for i, s in enumerate(streams)]
        return Answer(events=merge_jobs(jobs, idle_timeout_s=self.idle_timeout_s))

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    # -- setup ------------------------------------------------------------------------------

    async def _open(
        self,
        spec: Sequence[tuple[str, float, int]],
        mode: str,
        request: GenerateRequest,
        ctx: RequestContext,
        scope: RequestScope,
    ) -> AsyncIterator[GenerateEvent]:
        for model, _, _ in spec:
            if model not in self.pools.pools:
                raise Unavailable(f"no workers for ensemble member '{model}'")
        async with asyncio.timeout(ctx.remaining()):
            assets = await asyncio.gather(*(self.assets.get(model) for model, _, _ in spec))
            prompts = await asyncio.gather(
                *(asyncio.to_thread(_member_prompt, a, request) for a in assets)
            )
        members = [
            Member(
                model,
                weight,
                a,
                p,
                PoolReducer(
                    self.pools[model],
                    request.request_id,
                    ctx.worker_headers,
                    speculate=speculate,
                    speculate_min_p=self.speculate_min_p,
                    speculate_with=self.speculate_with,
                    sessions=self.sessions,
                ),
            )
            for (model, weight, speculate), a, p in zip(spec, assets, prompts, strict=True)
        ]
        if request.messages is not None and any(not a.prompts.has_chat_template for a in assets):
            # A chat turn ends where a chat model would end it: every member's end-of-turn
            # token is a stop already (special tokens), and a base member's transcript turn
            # ends where the next role marker would start.
            stops = [*request.sampling.stop, *transcript_turn_markers()]
            request = request.model_copy(
                update={"sampling": request.sampling.model_copy(update={"stop": stops})}
            )
        sampling = request.sampling
        limit = sampling.max_tokens if sampling.max_tokens is not None else DEFAULT_MAX_BYTES
        choices = [
            _Choice(i, members, mode, request, ctx, self._executor, self.prune, limit, self.totals)
            for i in range(sampling.n)
        ]
        for c in choices:
            scope.on_close(c.close)  # stops its member threads, however the request ends
        for m in members:  # the choices share the members' reducers: counted once
            scope.on_close(partial(self.totals.add_worker, m.model, m.reducer))
        # The first distribution is computed before anything is streamed: a member that
        # cannot score (worker down, endpoint missing) fails the request with its status.
        async with asyncio.timeout(ctx.remaining()):
            await asyncio.gather(*(c.start() for c in choices))
        return _events(choices, members[0].prompt.prompt_tokens)


def _member_prompt(assets: MemberAssets, request: GenerateRequest) -> MemberPrompt:
    encoder = assets.prompts
    if request.prompt_token_ids is not None:
        raise BadRequest(
            "byte-level generation needs text prompts: token ids belong to one vocabulary",
            param="prompt",
        )
    if request.messages is not None and not encoder.has_chat_template:
        # A base model continues "Assistant:" with " word"; the space goes into the re-opened
        # tail, so it merges with the first generated word as the tokenizer would merge it.
        request = request.model_copy(update={"assistant_prefix": request.assistant_prefix + " "})
    ids = encoder.encode(request)
    if not ids:
        raise BadRequest("the prompt is empty", param="prompt")
    if len(ids) >= assets.max_model_len:
        raise ContextLengthExceeded(
            f"the prompt has {len(ids)} tokens for '{assets.model}'; its context is "
            f"{assets.max_model_len} tokens"
        )
    return reopen_tail(ids, assets.table, encoder.start_id)


# -- the byte loop ------------------------------------------------------------------------


class _Choice:
    """One sampled continuation: a tree per member, the mixer, the sampler, the text state."""

    def __init__(
        self,
        index: int,
        members: list[Member],
        mode: str,
        request: GenerateRequest,
        ctx: RequestContext,
        executor: ThreadPoolExecutor,
        prune: float,
        limit: int,
        totals: TreeTotals,
    ) -> None:
        self.index = index
        self.members = members
        self.mode = mode
        self.ctx = ctx
        self.executor = executor
        self.limit = limit
        sampling = request.sampling
        # numpy seeds are unsigned: an int64 seed (negative ones too) maps onto them one to one.
        seed = None if sampling.seed is None else (sampling.seed + index) % (1 << 64)
        self.sampler = ByteSampler(
            temperature=sampling.temperature, top_p=sampling.top_p, seed=seed
        )
        self.want_logprobs = sampling.logprobs is not None
        self.weights = np.array([m.weight for m in members], dtype=np.float64)
        self.adaptive = AdaptiveMixer(len(members), self.weights) if mode == "adaptive" else None
        self.buffer = Utf8Buffer()
        self.stops = StopMatcher(sampling.stop)
        structured = sampling.structured
        self.grammar = ByteGrammar(json_grammar(structured.json_schema)) if structured else None
        self.cancelled = threading.Event()
        loop = asyncio.get_running_loop()
        self.oracles = [
            BridgedOracle(loop, m.reducer.reduce, ctx.remaining, self.cancelled) for m in members
        ]
        self.trees = [
            CoveringTree(m.assets.table, o, m.prompt.root, prune=prune)
            for m, o in zip(members, self.oracles, strict=True)
        ]
        self.totals = totals
        self.closed = False
        self.alive = [True] * len(members)
        self.lps: list[F64 | None] = [None] * len(members)
        self.produced = 0

    def close(self) -> None:
        for oracle in self.oracles:
            oracle.cancel()
        if not self.closed:
            self.closed = True
            for member, tree in zip(self.members, self.trees, strict=True):
                self.totals.add(member.model, tree.stats)

    async def start(self) -> None:
        calls: list[Callable[[], F64] | None] = [
            _starter(tree, m.prompt.tail) for tree, m in zip(self.trees, self.members, strict=True)
        ]
        await self._run(calls)

    async def _run(self, calls: list[Callable[[], F64] | None]) -> None:
        loop = asyncio.get_running_loop()
        futures = [loop.run_in_executor(self.executor, c) if c is not None else None for c in calls]
        results = await asyncio.gather(
            *(f for f in futures if f is not None), return_exceptions=True
        )
        it = iter(results)
        for i, f in enumerate(futures):
            if f is None:
                continue
            res = next(it)
            if isinstance(res, ZeroProbabilityError) and sum(self.alive) > 1:
                # This member cannot continue the text the others chose (it gave the byte
                # probability zero): it leaves the mixture for the rest of the stream.
                log.warning(
                    "ensemble member dropped",
                    extra={"model": self.members[i].model, "reason": str(res)},
                )
                self.alive[i] = False
                self.lps[i] = None
            elif isinstance(res, BaseException):
                raise _public(res)
            else:
                self.lps[i] = res

    def mixed(self) -> tuple[F64, F64]:
        """(members x 257 matrix with -inf rows for dropped members, mixed distribution)."""
        rows = [lp if lp is not None else np.full(257, -math.inf) for lp in self.lps]
        mat = np.stack(rows)
        live = [i for i, a in enumerate(self.alive) if a]
        if self.adaptive is not None:
            return mat, self.adaptive.combine(mat)
        if self.mode == "product":
            return mat, product(mat[live], self.weights[live])
        return mat, mix(mat[live], self.weights[live])

    async def advance(self, byte: int) -> None:
        calls: list[Callable[[], F64] | None] = [
            _advancer(tree, byte) if alive else None
            for tree, alive in zip(self.trees, self.alive, strict=True)
        ]
        await self._run(calls)

    def context_full(self) -> bool:
        for tree, member, alive in zip(self.trees, self.members, self.alive, strict=True):
            deepest = max((len(n.path) for n in tree.nodes), default=0)
            if alive and deepest >= member.assets.max_model_len - 1:
                return True
        return False

    async def events(self) -> AsyncIterator[GenerateEvent]:
        finish = "length"
        pending_lps: list[TokenLogprobEvent] = []
        char_lp = 0.0
        try:
            while self.produced < self.limit:
                self.ctx.remaining()  # raises DeadlineExceeded once the deadline passed
                mat, mixed = self.mixed()
                if self.grammar is not None:  # the bytes the output's grammar allows next
                    mixed = self.grammar.constrain(mixed)
                outcome = self.sampler.sample(mixed, self.buffer.state)
                if self.grammar is not None:
                    self.grammar.advance(outcome)
                if self.adaptive is not None:
                    self.adaptive.update(mat, outcome)
                if outcome == STOP:
                    finish = "stop"
                    break
                self.produced += 1
                char_lp += float(mixed[outcome])
                text = self.buffer.push(outcome)
                if text:
                    if self.want_logprobs:
                        pending_lps.append({"id": -1, "text": text, "logprob": char_lp, "top": []})
                    char_lp = 0.0
                    out = self.stops.push(text)
                    if out:
                        yield self._delta(out, pending_lps)
                        pending_lps = []
                    if self.stops.stopped:
                        finish = "stop"
                        break
                if self.produced >= self.limit:
                    break
                await self.advance(outcome)
                if self.context_full():
                    break
            self.buffer.flush()
            rest = self.stops.flush()
            if rest:
                yield self._delta(rest, pending_lps)
            yield {
                "type": "finish",
                "index": self.index,
                "finish_reason": finish,
                "completion_tokens": self.produced,
            }
        finally:
            self.close()

    def _delta(self, text: str, lps: list[TokenLogprobEvent]) -> GenerateEvent:
        event: GenerateEvent = {"type": "delta", "index": self.index, "text": text}
        if self.want_logprobs:
            event["logprobs"] = lps
        return event


def _starter(tree: CoveringTree, tail: bytes) -> Callable[[], F64]:
    def run() -> F64:
        if tail:
            # With pruning, byte by byte: a prefetch asks for every structurally possible
            # node (one forward each), most of which pruning would drop unqueried.
            tree.extend(tail, prefetch=tree.prune == 0.0)
        return tree.next_byte_logprobs()

    return run


def _advancer(tree: CoveringTree, byte: int) -> Callable[[], F64]:
    def run() -> F64:
        tree.advance(byte)
        return tree.next_byte_logprobs()

    return run


def _public(exc: BaseException) -> BaseException:
    """Errors from a member's thread as the taxonomy's errors (never a bare 500)."""
    if isinstance(exc, ServiceError | asyncio.CancelledError):
        return exc
    if isinstance(exc, RequestCancelled):
        return asyncio.CancelledError()
    if isinstance(exc, ZeroProbabilityError):
        return Unavailable(f"the ensemble cannot continue this text: {exc}")
    log.error("ensemble step failed", exc_info=exc)
    return Unavailable(f"ensemble step failed: {type(exc).__name__}")


async def _events(choices: list[_Choice], prompt_tokens: int) -> AsyncIterator[GenerateEvent]:
    yield {"type": "start", "prompt_tokens": prompt_tokens}
    if len(choices) == 1:
        stream = choices[0].events()
        try:
            async for event in stream:
                yield event
        finally:
            await stream.aclose()  # type: ignore[attr-defined]
        return
    try:
        async for event in interleave([c.events() for c in choices], CHOICE_QUEUE_BOUND):
            yield event
    finally:
        for c in choices:
            c.close()
