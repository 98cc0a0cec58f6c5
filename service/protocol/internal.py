"""Wire schemas between the gateway and a worker (JSON; streams are NDJSON, one event a line).

The gateway builds requests with these models; on the hot path it reads the worker's stream as
plain dicts (orjson) shaped like the TypedDicts below rather than constructing a model per chunk.
"""

from __future__ import annotations

from typing import Any, Literal, NotRequired, TypedDict

from pydantic import BaseModel, ConfigDict, Field


class InternalModel(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ChatTurn(InternalModel):
    role: Literal["system", "user", "assistant", "tool"]
    content: str


class StructuredOutput(InternalModel):
    """Decoding constrained to a JSON schema (`{}` with json_object: any JSON object)."""

    json_schema: dict[str, Any] = Field(default_factory=dict)
    json_object: bool = False
    strict: bool = False


class SamplingOptions(InternalModel):
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=16)
    stop: list[str] = Field(default_factory=list, max_length=8)
    seed: int | None = None
    logprobs: int | None = Field(None, ge=0, le=20, description="None: off; k: chosen + top-k")
    prompt_logprobs: int | None = Field(None, ge=0, le=20)
    ignore_eos: bool = False
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    repetition_penalty: float = Field(1.0, gt=0.0, le=2.0)
    min_tokens: int = Field(0, ge=0)
    logit_bias: dict[int, float] | None = None
    structured: StructuredOutput | None = None


class GenerateRequest(InternalModel):
    """Exactly one of messages / prompt / prompt_token_ids."""

    request_id: str
    messages: list[ChatTurn] | None = None
    prompt: str | None = None
    prompt_token_ids: list[int] | None = None
    add_generation_prompt: bool = True
    assistant_prefix: str = Field("", description="text appended after the generation prompt")
    tools: list[dict[str, Any]] | None = Field(
        None, description="OpenAI tool specs, handed to the chat template"
    )
    tool_parser: str | None = Field(
        None, description="tool_choice auto: vLLM's parser for the model's tool-call format"
    )
    sampling: SamplingOptions = Field(default_factory=SamplingOptions)
    priority: int = Field(
        0,
        ge=0,
        le=16,
        description="the engine's queue order: lower first (the gateway gives a request of "
        "more sequences a later place, RequestPlan.priority)",
    )


class ScoreQuery(InternalModel):
    """Next-token scores after a prefix: chat messages (the worker applies its template, then
    `assistant_prefix`), text (worker tokenizes) or token ids."""

    messages: list[ChatTurn] | None = None
    assistant_prefix: str = ""
    prompt: str | None = None
    prompt_token_ids: list[int] | None = None
    token_ids: list[int] = Field(default_factory=list, max_length=128)
    top_k: int = Field(0, ge=0, le=20)


class ScoreRequest(InternalModel):
    request_id: str
    queries: list[ScoreQuery] = Field(..., min_length=1, max_length=256)


class ScoreResult(InternalModel):
    prompt_tokens: int
    token_logprobs: dict[int, float]
    top: list[tuple[int, float]]


class ScoreResponse(InternalModel):
    results: list[ScoreResult]


class ByteQuery(InternalModel):
    """Byte-level reduction of the full next-token distribution after `token_ids`.

    `partial` is the hex of bytes already produced inside the next token (may be empty)."""

    token_ids: list[int] = Field(..., min_length=1)
    partial: str = Field("", max_length=512)


class ByteDistRequest(InternalModel):
    request_id: str
    queries: list[ByteQuery] = Field(..., min_length=1, max_length=512)
    include_logprobs: bool = Field(
        False,
        description="also return each query's full next-token distribution (tests, debugging; "
        "at most 8 queries, ~1 MB each for a 262k vocabulary)",
    )
    speculate: int = Field(
        0,
        ge=0,
        le=8,
        description="also fetch ahead (speculate_with says when), up to this many of each "
        "query's likeliest children (the path plus a token extending the partial bytes), for "
        "later requests (service/worker/byte_dist.py)",
    )
    speculate_min_p: float = Field(
        0.0,
        ge=0.0,
        le=1.0,
        description="speculate only children whose token holds at least this share of the "
        "mass of the tokens extending the partial bytes",
    )
    speculate_with: Literal["step", "background"] = Field(
        "background",
        description="step: children of the cached paths ride in the engine step of a path this "
        "request needs (none when it needs none); background: after answering, on their own",
    )
    sessions: bool = Field(
        True,
        description="compute a new path as an extension of the worker's live streaming session "
        "of its parent when there is one (service/worker/path_sessions.py); False: a new engine "
        "request per path (benches compare the two)",
    )


class ByteDistResult(InternalModel):
    # -inf (an empty bucket) must survive JSON: written as -Infinity, which pydantic parses.
    model_config = ConfigDict(extra="forbid", ser_json_inf_nan="constants")

    cont_lp: list[float]  # 257: next byte c<256 within a token extending `partial`; [256] stop
    exact: dict[int, list[float]] = Field(
        default_factory=dict, description="byte c -> [token id, logprob] of token == partial+c"
    )
    logprobs: str | None = Field(
        None,
        description="include_logprobs only: base64 of little-endian float32 natural-log "
        "probabilities indexed by token id (len(tokenizer) entries), as captured; the reduction "
        "used them renormalised in float64",
    )


class ByteDistResponse(InternalModel):
    results: list[ByteDistResult]
    # What the request cost the engine (the gateway's counters and the bench read them).
    fetched: int = Field(0, description="paths this request computed (engine rows waited for)")
    speculated: int = Field(0, description="children it fetched ahead (speculation)")
    speculation_hits: int = Field(0, description="its paths that speculation had fetched")
    extended: int = Field(
        0, description="of the fetched paths, those computed as a live session's extension"
    )


class WorkerInfo(InternalModel):
    model: str
    model_dir: str
    vocab_size: int
    tokenizer_kind: str
    max_model_len: int
    eos_token_ids: list[int]
    has_chat_template: bool
    engine: str
    capture: bool
    functional_tokens: dict[str, int] = Field(
        default_factory=dict, description="added tokens named <nexa_k> -> token id"
    )
    max_num_seqs: int | None = Field(
        None, description="sequences one engine step runs at once (None: no fixed batch)"
    )
    max_num_batched_tokens: int | None = Field(
        None, description="tokens one engine step schedules at most (prefill chunks + decodes)"
    )
    engine_threads: int | None = Field(
        None, description="OpenMP threads the model runs on, read in its process (CPU engines)"
    )
    scored_tokens: int | None = Field(
        None,
        description="rows of the output layer the engine computes, when not the whole "
        "vocabulary (a scoring-only router: its functional tokens; service/worker/scoring_head.py)",
    )


class TopLogprobEvent(TypedDict):
    id: int
    text: str
    logprob: float


class TokenLogprobEvent(TypedDict):
    id: int
    text: str
    logprob: float | None  # None only for the first prompt token (nothing precedes it)
    top: list[TopLogprobEvent]


class GenerateEvent(TypedDict):
    """One NDJSON line of /internal/generate.

    type=start: prompt_tokens (+ prompt_text, prompt_logprobs when asked)
    type=delta: index, text, token_ids, logprobs (when asked), tool_calls (tool_choice auto)
    type=finish: index, finish_reason, completion_tokens
    type=error: status, message, code
    """

    type: Literal["start", "delta", "finish", "error"]
    index: NotRequired[int]
    text: NotRequired[str]
    token_ids: NotRequired[list[int]]
    logprobs: NotRequired[list[TokenLogprobEvent]]
    finish_reason: NotRequired[str]
    completion_tokens: NotRequired[int]
    prompt_tokens: NotRequired[int]
    prompt_text: NotRequired[str]
    prompt_logprobs: NotRequired[list[TokenLogprobEvent]]
    tool_calls: NotRequired[list[dict[str, str]]]  # {"name", "arguments"}: tool_choice auto
    status: NotRequired[int]
    message: NotRequired[str]
    code: NotRequired[str | None]
