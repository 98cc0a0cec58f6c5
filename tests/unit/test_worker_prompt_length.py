"""Issue 17 item 10 (part): a worker refuses an over-long prompt by its length before
tokenizing it, and tokenizes a long prompt off its event loop (chat_template.tokenize_prompt,
which VllmEngine.prepare calls). A real tokenizer where one is packaged, a counting fake
otherwise."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest

from service.chat_template import OFF_LOOP_CHARS, longest_token_chars, tokenize_prompt
from service.errors import ContextLengthExceeded
from service.protocol.internal import ChatTurn, GenerateRequest


class CountingTokenizer:
    """Words are tokens; records the thread of every encode."""

    chat_template = None

    def __init__(self) -> None:
        self.threads: list[int] = []
        self.chars: list[int] = []

    def get_vocab(self) -> dict[str, int]:
        return {"hello": 0, "world": 1, "<start_of_turn>": 2}

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        self.threads.append(threading.get_ident())
        self.chars.append(len(text))
        return [0] * len(text.split())

    def apply_chat_template(self, conversation: Any, **kwargs: Any) -> Any:
        raise AssertionError("no template")


def test_longest_token_chars() -> None:
    assert longest_token_chars(CountingTokenizer()) == len("<start_of_turn>")
    assert longest_token_chars(object()) == 0  # no vocabulary: no bound by length


@pytest.mark.parametrize("kind", ["prompt", "messages"])
async def test_over_long_prompt_is_refused_before_tokenizing(kind: str) -> None:
    tok = CountingTokenizer()
    text = "hello " * (2 * 1024 * 1024 // 6)  # 2 MiB, the gateway's body limit
    request = (
        GenerateRequest(request_id="r", prompt=text)
        if kind == "prompt"
        else GenerateRequest(request_id="r", messages=[ChatTurn(role="user", content=text)])
    )
    with pytest.raises(ContextLengthExceeded) as refused:
        await tokenize_prompt(tok, request, max_model_len=2048, longest_token=15)
    assert refused.value.status == 400 and "characters" in refused.value.message
    assert tok.chars == []  # never tokenized


async def test_long_prompt_is_tokenized_off_the_loop_short_one_on_it() -> None:
    tok = CountingTokenizer()
    loop_thread = threading.get_ident()
    short = GenerateRequest(request_id="s", prompt="hello world")
    ids, _ = await tokenize_prompt(tok, short, max_model_len=100_000, longest_token=15)
    assert ids == [0, 0] and tok.threads == [loop_thread]
    long = GenerateRequest(request_id="l", prompt="hello " * (OFF_LOOP_CHARS // 3))
    ids, _ = await tokenize_prompt(tok, long, max_model_len=100_000, longest_token=15)
    assert len(ids) == OFF_LOOP_CHARS // 3 and tok.threads[-1] != loop_thread
    # Within the bound, a long prompt still gets the exact context check by its tokens.
    await asyncio.sleep(0)


def test_bound_never_refuses_what_fits() -> None:
    """The bound holds on the packaged tokenizers: the longest-token prompt (each token
    as long as it gets) that fits the context is not refused by length."""
    from tests.unit.ensemble_fixtures import GEMMA3, SMOLLM2

    tokenizers = pytest.importorskip("tokenizers")
    for path in (SMOLLM2, GEMMA3):
        if not path.exists():
            continue
        tok = tokenizers.Tokenizer.from_file(str(path))
        longest = max(len(t) for t in tok.get_vocab())
        piece = max(tok.get_vocab(), key=len)
        text = tok.decode([tok.token_to_id(piece)]) * 100
        tokens = len(tok.encode(text, add_special_tokens=False).ids)
        assert len(text) <= tokens * longest * 2, (path, len(text), tokens, longest)
