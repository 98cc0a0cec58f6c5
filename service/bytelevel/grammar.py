"""Grammar constraints on bytes: which next bytes keep an output valid (llguidance).

A byte-level sampler (the ensemble's, `byte_exact`'s) chooses among 257 outcomes: 256 bytes
and stop. llguidance runs on any vocabulary given as byte strings, so a vocabulary of the 256
one-byte tokens plus one end token makes its mask exactly the set of allowed next bytes, with
stop allowed only where the grammar may end (research note byte-grammar.md). The constraint is
local, as vLLM's per-token one: each step's distribution is the model's, masked to the allowed
bytes and renormalised. llguidance's parser only allows a byte from which the grammar can
still be completed, so a sampled output never reaches a dead end.
"""

from __future__ import annotations

import functools
import json
import math
from typing import Any

import numpy as np
from llguidance import LLMatcher, LLTokenizer, TokenizerWrapper
from numpy.typing import NDArray

STOP = 256  # the outcome index of "end of output" in a 257-vector


class _ByteVocabulary:
    """The 257-symbol vocabulary llguidance's TokenizerWrapper reads."""

    def __init__(self) -> None:
        self.tokens = [bytes([i]) for i in range(256)] + [b"<|end|>"]
        self.eos_token_id = STOP
        self.bos_token_id = None
        self.special_token_ids = [STOP]

    def __call__(self, text: str | bytes) -> list[int]:
        return list(text.encode() if isinstance(text, str) else text)


@functools.cache
def byte_tokenizer() -> LLTokenizer:
    return LLTokenizer(TokenizerWrapper(_ByteVocabulary()))


def json_grammar(schema: dict[str, Any]) -> str:
    """llguidance's grammar for a JSON schema, compact (no free whitespace: a sampler could
    otherwise spend its whole budget on spaces). Raises ValueError for a schema it refuses."""
    return _compiled(json.dumps(schema, sort_keys=True))


@functools.lru_cache(maxsize=256)  # a request's schema is checked at plan time, then used
def _compiled(schema_json: str) -> str:
    grammar: str = LLMatcher.grammar_from_json_schema(
        schema_json, defaults={"whitespace_flexible": False}
    )
    error = LLMatcher.validate_grammar(grammar, byte_tokenizer())
    if error:
        raise ValueError(error)
    return grammar


class ByteGrammar:
    """One output's grammar state: the allowed next bytes, advanced byte by byte."""

    def __init__(self, grammar: str) -> None:
        self.matcher = LLMatcher(byte_tokenizer(), grammar)
        if self.matcher.is_error():
            raise ValueError(self.matcher.get_error())

    def allowed(self) -> NDArray[np.bool_]:
        """A 257-long mask: True for the outcomes the grammar allows next."""
        bits = np.frombuffer(self.matcher.compute_bitmask(), dtype=np.uint8)
        return np.unpackbits(bits, bitorder="little")[:257].astype(bool)

    def constrain(self, logprobs: NDArray[np.float64]) -> NDArray[np.float64]:
        """`logprobs` (257, natural log) masked to the allowed outcomes and renormalised."""
        masked = np.where(self.allowed(), logprobs, -math.inf)
        top = masked.max()
        if not np.isfinite(top):
            raise ValueError("the models give every byte the grammar allows probability zero")
        out: NDArray[np.float64] = masked - (top + math.log(np.exp(masked - top).sum()))
        return out

    def advance(self, outcome: int) -> None:
        if outcome == STOP:
            return
        if not self.matcher.consume_token(outcome):
            raise ValueError(f"byte {outcome} is not allowed here: {self.matcher.get_error()}")

    @property
    def complete(self) -> bool:
        return bool(self.matcher.is_accepting())
