"""A request's meaning, built once from the public request and read by every later stage.

`plan_chat` / `plan_completion` turn a validated OpenAI request into a `RequestPlan`: the
prompts, what the router reads, the reply's shape (n, echo, logprobs, stream, usage, ids) and
the request's cost. Sampling is mapped in one method, `RequestPlan.sampling`, once the answering
node (and so its defaults) is known: the gateway's `to_sampling_params`. A field the plan does
not map is either forwarded to a remote node (by name, see `UPSTREAM_FIELDS`) or refused with a
400 naming it; nothing is dropped in silence.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field, replace
from typing import Any, Literal, cast

import orjson

from service.errors import BadRequest, DeadlineExceeded
from service.gateway.tools import Constraints, ToolCallShape, constraints_of
from service.graph.schema import EnsembleNode, ModelNode, Node, SamplingDefaults
from service.protocol.internal import ChatTurn, GenerateRequest, SamplingOptions
from service.protocol.openai import ChatCompletionRequest, ChatMessage, CompletionRequest

Kind = Literal["chat", "completion"]
Prompt = list[ChatTurn] | str | list[int]
ClientRequest = ChatCompletionRequest | CompletionRequest

# The OpenAI default for completions when neither the client nor the node sets max_tokens.
COMPLETION_DEFAULT_MAX_TOKENS = 16

# Sampling fields a byte-level node (ensemble, byte_exact) cannot honour: its unit is the byte,
# not one model's token, so token penalties and token-id biases have no meaning there.
BYTE_LEVEL_REFUSED = {
    "presence_penalty": "token penalties apply to one model's tokens",
    "frequency_penalty": "token penalties apply to one model's tokens",
    "repetition_penalty": "token penalties apply to one model's tokens",
    "logit_bias": "token ids belong to one model's vocabulary",
    "min_tokens": "byte-level generation counts bytes, not tokens",
}

# What a remote (`kind: openai`) node receives of the client's request: the fields the gateway
# itself understands, never the rest (`store`, `service_tier`, vendor extensions...), unless the
# model's `passthrough` list names them.
UPSTREAM_FIELDS = frozenset(
    {
        "messages",
        "prompt",
        "max_tokens",
        "max_completion_tokens",
        "temperature",
        "top_p",
        "n",
        "stop",
        "seed",
        "stream",
        "stream_options",
        "presence_penalty",
        "frequency_penalty",
        "logit_bias",
        "logprobs",
        "top_logprobs",
        "echo",
        "user",
        "response_format",
        "tools",
        "tool_choice",
        "parallel_tool_calls",
    }
)


@dataclass
class RequestContext:
    """Identity and deadline of one request (also what routing-only calls carry)."""

    request_id: str  # the client's x-request-id or the gateway's: logs, the response header
    deadline: float  # time.monotonic() by which the whole request must be done
    started: float = field(default_factory=time.monotonic)
    # What workers and engines see: always the gateway's own, never a client's string (vLLM
    # aborts every request registered under one id, so two clients must never share one).
    engine_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    key: str | None = None  # the API key's identity, for per-key limits

    @property
    def worker_headers(self) -> dict[str, str]:
        return {"x-request-id": self.request_id}

    def remaining(self) -> float:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise DeadlineExceeded("the request deadline passed")
        return left


@dataclass(frozen=True)
class ReplyShape:
    """Everything the reply renderer needs besides the events."""

    kind: Kind
    model: str  # as the client addressed it
    response_id: str
    n: int
    stream: bool
    include_usage: bool
    logprobs: bool
    top_logprobs: int
    echo: tuple[str, ...] | None  # per prompt, echoed ahead of its choices; None: no echo
    tool_call: ToolCallShape | None = None  # choices' text becomes tool_calls (tools.py)
    created: int = field(default_factory=lambda: int(time.time()))

    def prompt_of(self, choice_index: int) -> int:
        """Which prompt a choice belongs to: choices are numbered prompt by prompt, n each."""
        return choice_index // self.n

    def chunk(self, choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        return {
            "id": self.response_id,
            "object": "chat.completion.chunk" if self.kind == "chat" else "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": choices,
            **extra,
        }


def queue_priority(cost: int) -> int:
    """A request's place in the engine's queue (vLLM's priority scheduling: lower first, then
    arrival): 0 for one sequence, one later per doubling of its cost. A fan-out's sequences that
    wait for the engine's batch or prefill budget then wait behind a smaller request that
    arrived after them, so that request's first token comes at the next step."""
    return max(cost, 1).bit_length() - 1


@dataclass
class RequestPlan:
    kind: Kind
    request: ClientRequest
    ctx: RequestContext
    query: str  # what the router reads
    prompts: list[Prompt]
    reply: ReplyShape
    byte_exact: bool = False
    constraints: Constraints = field(default_factory=Constraints)

    @property
    def cost(self) -> int:
        """Sequences this request asks the engines for: what admission weighs."""
        return len(self.prompts) * self.reply.n

    @property
    def stream(self) -> bool:
        return self.reply.stream

    # -- the one mapping of sampling fields ----------------------------------------------------

    def sampling(self, defaults: SamplingDefaults, *, byte_level: bool = False) -> SamplingOptions:
        """The client's sampling fields over the node's defaults over the API's: every field
        the API accepts is mapped here or refused by name."""
        req = self.request
        if byte_level:
            for name, why in BYTE_LEVEL_REFUSED.items():
                if getattr(req, name, None) not in (None, 0, 0.0, {}):
                    raise BadRequest(
                        f"{name} is not supported on byte-level generation: {why}", param=name
                    )
        max_tokens = _first(req.token_limit, defaults.max_tokens)
        if max_tokens is None and self.kind == "completion":
            max_tokens = COMPLETION_DEFAULT_MAX_TOKENS
        logprobs: int | None
        if isinstance(req, ChatCompletionRequest):
            logprobs = (req.top_logprobs or 0) if req.logprobs else None
            prompt_logprobs = None
        else:
            logprobs = req.logprobs
            prompt_logprobs = req.logprobs if req.echo and req.logprobs is not None else None
        return SamplingOptions(
            max_tokens=max_tokens,
            temperature=_first(req.temperature, defaults.temperature, 1.0),
            top_p=_first(req.top_p, defaults.top_p, 1.0),
            n=req.n,
            stop=req.stop_list(),
            seed=req.seed,
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            ignore_eos=req.ignore_eos,
            presence_penalty=req.presence_penalty or 0.0,
            frequency_penalty=req.frequency_penalty or 0.0,
            repetition_penalty=req.repetition_penalty or 1.0,
            min_tokens=req.min_tokens or 0,
            logit_bias=_token_bias(req.logit_bias),
            structured=self.constraints.structured,
        )

    def generate_requests(
        self, node: Node | None, *, byte_level: bool = False, tool_parser: str | None = None
    ) -> list[GenerateRequest]:
        """One worker request per prompt, with the node's system prompt and defaults."""
        answering = node if isinstance(node, ModelNode | EnsembleNode) else None
        sampling = self.sampling(
            answering.sampling if answering else SamplingDefaults(), byte_level=byte_level
        )
        system = answering.system_prompt if answering else None
        priority = self.priority
        out = []
        for i, prompt in enumerate(self.prompts):
            rid = self.ctx.engine_id if len(self.prompts) == 1 else f"{self.ctx.engine_id}-{i}"
            if isinstance(prompt, str):
                out.append(
                    GenerateRequest(
                        request_id=rid, prompt=prompt, sampling=sampling, priority=priority
                    )
                )
            elif self.kind == "chat":
                turns = _with_system(cast(list[ChatTurn], prompt), system)
                out.append(
                    GenerateRequest(
                        request_id=rid,
                        messages=turns,
                        tools=self.constraints.tools,
                        tool_parser=tool_parser,
                        sampling=sampling,
                        priority=priority,
                    )
                )
            else:
                ids = cast(list[int], prompt)
                out.append(
                    GenerateRequest(
                        request_id=rid, prompt_token_ids=ids, sampling=sampling, priority=priority
                    )
                )
        return out

    @property
    def priority(self) -> int:
        return queue_priority(self.cost)

    def upstream_body(
        self, upstream_model: str, node: Node | None, passthrough: frozenset[str]
    ) -> bytes:
        """The client's request as a remote node's server should see it: the allowlisted
        fields the client set, the upstream's model name, the node's system prompt and
        sampling defaults."""
        sent = self.request.model_dump(exclude_unset=True)
        extra = self.request.model_extra or {}
        allowed = UPSTREAM_FIELDS | passthrough
        body = {k: v for k, v in sent.items() if k in allowed}
        body.update({k: v for k, v in extra.items() if k in passthrough})
        body["model"] = upstream_model
        if isinstance(node, ModelNode):
            d = node.sampling
            if d.temperature is not None:
                body.setdefault("temperature", d.temperature)
            if d.top_p is not None:
                body.setdefault("top_p", d.top_p)
            if d.max_tokens is not None and not (
                {"max_tokens", "max_completion_tokens"} & body.keys()
            ):
                body["max_tokens"] = d.max_tokens
            if self.kind == "chat" and node.system_prompt:
                body["messages"] = _with_system_dicts(body["messages"], node.system_prompt)
        return orjson.dumps(body)


# -- building plans ----------------------------------------------------------------------------

MAX_REQUEST_COST = 64  # prompts x n of one request: a worker's whole batch (vLLM max_num_seqs)


def plan_chat(req: ChatCompletionRequest, ctx: RequestContext) -> RequestPlan:
    turns = [_turn(m) for m in req.messages]
    constraints = constraints_of(req)
    reply = _shape("chat", req, ctx, echo=None, logprobs=req.logprobs, top=req.top_logprobs or 0)
    return RequestPlan(
        kind="chat",
        request=req,
        ctx=ctx,
        query=query_text([(t.role, t.content) for t in turns], None),
        prompts=[turns],
        reply=replace(reply, tool_call=constraints.tool_call),
        constraints=constraints,
    )


def plan_completion(req: CompletionRequest, ctx: RequestContext) -> RequestPlan:
    prompts: list[Prompt] = list(req.prompts())
    first_text = next((p for p in prompts if isinstance(p, str)), None)
    echo = tuple(p if isinstance(p, str) else "" for p in prompts) if req.echo else None
    if req.byte_exact and any(not isinstance(p, str) for p in prompts):
        raise BadRequest("byte_exact needs text prompts", param="prompt")
    return RequestPlan(
        kind="completion",
        request=req,
        ctx=ctx,
        query=query_text(None, first_text or ""),
        prompts=prompts,
        reply=_shape(
            "completion",
            req,
            ctx,
            echo=echo,
            logprobs=req.logprobs is not None,
            top=req.logprobs or 0,
        ),
        byte_exact=req.byte_exact,
        constraints=constraints_of(req),
    )


def check_cost(plan: RequestPlan, limit: int) -> None:
    """One request may ask for at most `limit` sequences (prompts x n): more is a 400 that
    names what to reduce, before anything is admitted or sent to a worker."""
    if plan.cost > limit:
        param = "n" if len(plan.prompts) == 1 else "prompt"
        raise BadRequest(
            f"this request asks for {plan.cost} sequences ({len(plan.prompts)} prompts x n="
            f"{plan.reply.n}); at most {limit} per request",
            param=param,
        )


def query_text(messages: list[tuple[str, str]] | None, prompt: str | None) -> str:
    """What the router reads: the last user turn (earlier turns are not read), or the prompt."""
    if prompt is not None:
        return prompt
    if not messages:
        raise BadRequest("nothing to route: no messages", param="messages")
    users = [text for role, text in messages if role == "user"]
    if not users:
        raise BadRequest("nothing to route: no user message", param="messages")
    return users[-1]


def _shape(
    kind: Kind,
    req: ClientRequest,
    ctx: RequestContext,
    *,
    echo: tuple[str, ...] | None,
    logprobs: bool,
    top: int,
) -> ReplyShape:
    prefix = "chatcmpl-" if kind == "chat" else "cmpl-"
    return ReplyShape(
        kind=kind,
        model=req.model,
        response_id=prefix + ctx.engine_id,
        n=req.n,
        stream=req.stream,
        include_usage=req.include_usage,
        logprobs=logprobs,
        top_logprobs=top,
        echo=echo,
    )


def _turn(message: ChatMessage) -> ChatTurn:
    """A client's message as the worker's chat template reads it. An assistant turn that
    called tools carries its calls as text after any content (templates differ in how they
    render calls; the text keeps them in the conversation whatever the template)."""
    content = message.text()
    if message.tool_calls:
        calls = [
            {"name": c.function.name, "arguments": c.function.arguments} for c in message.tool_calls
        ]
        content = (content + "\n" if content else "") + json.dumps(calls)
    role = "system" if message.role == "developer" else message.role
    return ChatTurn(role=role, content=content)


def _first(*values: Any) -> Any:
    return next((v for v in values if v is not None), None)


def _token_bias(bias: dict[str, float] | None) -> dict[int, float] | None:
    if not bias:
        return None
    out: dict[int, float] = {}
    for key, value in bias.items():
        try:
            out[int(key)] = float(value)
        except ValueError:
            raise BadRequest(f"logit_bias: '{key}' is not a token id", param="logit_bias") from None
    return out


def _with_system(turns: list[ChatTurn], system: str | None) -> list[ChatTurn]:
    if not system:
        return turns
    if turns and turns[0].role == "system":
        merged = f"{system}\n\n{turns[0].content}"
        return [ChatTurn(role="system", content=merged), *turns[1:]]
    return [ChatTurn(role="system", content=system), *turns]


def _with_system_dicts(messages: list[dict[str, Any]], system: str) -> list[dict[str, Any]]:
    """The same merge on the wire form a remote node receives."""
    head = messages[0] if messages else None
    if head is not None and head.get("role") in ("system", "developer"):
        content = head.get("content")
        if isinstance(content, list):
            content = "".join(str(p.get("text", "")) for p in content)
        return [{**head, "content": f"{system}\n\n{content or ''}"}, *messages[1:]]
    return [{"role": "system", "content": system}, *messages]
