"""Public wire schemas: the OpenAI API subset Octograph serves (requests validated here;
responses are built as plain dicts on the hot path, shaped like OpenAI's)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_STOP = 4
MAX_N = 8
MAX_PROMPTS = 64


class OpenAIBase(BaseModel):
    # Clients send fields we do not use (e.g. `store`, `metadata`); accept and ignore them,
    # except the ones that change semantics, refused explicitly below.
    model_config = ConfigDict(extra="allow")


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(OpenAIBase):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class StreamOptions(BaseModel):
    include_usage: bool = False


UNSUPPORTED = {
    "tools": "tool calling",
    "functions": "function calling",
    "tool_choice": "tool calling",
    "function_call": "function calling",
    "audio": "audio output",
}


class SamplingFields(OpenAIBase):
    model: str = Field(..., min_length=1, max_length=256)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=MAX_N)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(None, max_length=256)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = Field(None, max_length=300)
    repetition_penalty: float | None = Field(None, gt=0.0, le=2.0, description="vLLM extension")
    min_tokens: int | None = Field(None, ge=0, description="vLLM extension")
    seed: int | None = Field(None, ge=-(2**63), lt=2**63)
    ignore_eos: bool = Field(False, description="vLLM extension: generate max_tokens exactly")

    @field_validator("logit_bias")
    @classmethod
    def _bias_range(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        if v and any(not -100.0 <= b <= 100.0 for b in v.values()):
            raise ValueError("biases must be in [-100, 100]")
        return v

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, v: str | list[str] | None) -> list[str] | None:
        if v is None:
            return None
        stops = [v] if isinstance(v, str) else v
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences")
        if any(not s for s in stops):
            raise ValueError("stop sequences must not be empty")
        return stops

    @model_validator(mode="after")
    def _refuse_unsupported(self) -> SamplingFields:
        extra = self.model_extra or {}
        for key, what in UNSUPPORTED.items():
            if extra.get(key) not in (None, [], {}):
                raise ValueError(f"{key}: {what} is not supported by this server")
        rf = extra.get("response_format")
        if isinstance(rf, dict) and rf.get("type") not in (None, "text"):
            raise ValueError("response_format: only {'type': 'text'} is supported")
        return self

    def stop_list(self) -> list[str]:
        return list(self.stop or [])  # normalised to a list by the validator

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(..., min_length=1, max_length=1024)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)

    @model_validator(mode="after")
    def _logprobs(self) -> ChatCompletionRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs: true")
        return self

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool = False
    suffix: str | None = None
    byte_exact: bool = Field(
        False, description="unbiased continuation of a prompt that ends mid-token"
    )

    @field_validator("prompt")
    @classmethod
    def _prompt_not_empty(cls, v: Any) -> Any:
        if isinstance(v, list) and not v:
            raise ValueError("prompt must not be an empty list")
        if isinstance(v, list) and len(v) > MAX_PROMPTS and isinstance(v[0], str | list):
            raise ValueError(f"at most {MAX_PROMPTS} prompts per request")
        return v

    @model_validator(mode="after")
    def _no_suffix(self) -> CompletionRequest:
        if self.suffix:
            raise ValueError("suffix: insertion is not supported")
        return self

    @property
    def token_limit(self) -> int | None:
        return self.max_tokens

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if p and isinstance(p[0], int):
            return [list(p)]
        return list(p)  # type: ignore[arg-type]


class RouteRequest(OpenAIBase):
    model: str = "auto"
    messages: list[ChatMessage] | None = None
    prompt: str | None = None

    @model_validator(mode="after")
    def _one_input(self) -> RouteRequest:
        if (self.messages is None) == (self.prompt is None):
            raise ValueError("give exactly one of messages or prompt")
        return self


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "octograph"
    kind: str
    description: str = ""


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
