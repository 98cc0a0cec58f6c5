"""The seam between a worker's HTTP app and whatever produces tokens.

`VLLMEngine` (service.worker.vllm_engine) is the real one; `FakeEngine`
(service.worker.fake_engine) is a deterministic stand-in with the same contract for fast tests
and for measuring the gateway's own overhead. The worker app only ever sees this Protocol.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Protocol

from service.protocol.internal import (
    ByteDistRequest,
    ByteDistResponse,
    GenerateEvent,
    GenerateRequest,
    SamplingOptions,
    ScoreRequest,
    ScoreResponse,
    WorkerInfo,
)


@dataclass(frozen=True)
class PreparedPrompt:
    """A request whose prompt is tokenized and checked against the context length."""

    request: GenerateRequest
    prompt_token_ids: list[int]
    prompt_text: str
    max_tokens: int


def asks_reproducible(sampling: SamplingOptions) -> bool:
    """A request whose output should not change from one call to the next: seeded, or greedy.
    (WorkerSettings.reproducible_generation says what a worker does about it.)"""
    return sampling.seed is not None or sampling.temperature == 0.0


class Engine(Protocol):
    @property
    def ready(self) -> bool: ...

    def info(self) -> WorkerInfo: ...

    async def start(self) -> None: ...

    async def shutdown(self) -> None: ...

    def num_running(self) -> int: ...

    async def prepare(self, request: GenerateRequest) -> PreparedPrompt:
        """Tokenize + validate; raises BadRequest/ContextLengthExceeded before any streaming."""
        ...

    def generate(self, prepared: PreparedPrompt) -> AsyncIterator[GenerateEvent]:
        """Yields a `start` event, then deltas and one `finish` per choice. Closing the iterator
        early aborts the engine request."""
        ...

    async def score(self, request: ScoreRequest) -> ScoreResponse: ...

    async def byte_dist(self, request: ByteDistRequest) -> ByteDistResponse: ...

    async def abort(self, request_id: str) -> None: ...

    @property
    def tokenizer(self) -> Any:
        """The model's tokenizer (vLLM's tool parsers take it)."""
        ...
