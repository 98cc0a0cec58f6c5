"""Turning a generate request into prompt token ids with the model's own tokenizer."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

from service.errors import BadRequest, ContextLengthExceeded
from service.protocol.internal import ChatTurn, GenerateRequest

# Base models (Gemma-3-270M) ship without a chat template; this plain transcript is what such
# models continue most sensibly, and it never invents special tokens the vocabulary lacks.
FALLBACK_TEMPLATE_SEPARATOR = "\n\n"


class HFTokenizer(Protocol):
    chat_template: Any

    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...

    def apply_chat_template(self, conversation: Any, **kwargs: Any) -> Any: ...


def transcript_turn_markers() -> list[str]:
    """Where the plain transcript's next turn would start: a base model continuing "Assistant:"
    writes the end of its turn as one of these, not as an end token. A line that opens with a
    role, not only one after the transcript's blank line: sampled, the ensemble also wrote
    "...a light smile.\nUser: Ah! ..." (one newline), and "\nUser:" covers "\n\nUser:"."""
    return [f"\n{role}:" for role in ("User", "System", "Assistant", "Tool")]


def render_chat(
    tokenizer: HFTokenizer,
    messages: list[ChatTurn],
    add_generation_prompt: bool,
    tools: list[dict[str, Any]] | None = None,
) -> str:
    turns = [{"role": m.role, "content": m.content} for m in messages]
    if tokenizer.chat_template:
        # Templates that know tools render them (the `tools` variable, as in transformers);
        # the others ignore it.
        text = tokenizer.apply_chat_template(
            turns, tokenize=False, add_generation_prompt=add_generation_prompt, tools=tools
        )
        return str(text)
    lines = [f"{m.role.capitalize()}: {m.content}" for m in messages]
    if add_generation_prompt:
        lines.append("Assistant:")
    return FALLBACK_TEMPLATE_SEPARATOR.join(lines)


def prompt_token_ids(tokenizer: HFTokenizer, request: GenerateRequest) -> tuple[list[int], str]:
    """Returns (token ids, prompt text). Chat templates carry their own special tokens (BOS
    included where the model wants one), so they are encoded without adding more."""
    given = [x is not None for x in (request.messages, request.prompt, request.prompt_token_ids)]
    if sum(given) != 1:
        raise BadRequest("exactly one of messages, prompt, prompt_token_ids is required")
    if request.prompt_token_ids is not None:
        return list(request.prompt_token_ids), ""
    if request.messages is not None:
        if not request.messages:
            raise BadRequest("messages must not be empty", param="messages")
        text = render_chat(
            tokenizer, request.messages, request.add_generation_prompt, request.tools
        )
        text += request.assistant_prefix
        add_special = not bool(tokenizer.chat_template)
        return tokenizer.encode(text, add_special_tokens=add_special), text
    assert request.prompt is not None
    return tokenizer.encode(request.prompt, add_special_tokens=True), request.prompt


# Prompts longer than this (characters) are tokenized in a thread, so the worker's event loop
# keeps streaming other requests' tokens meanwhile; one thread, so the tokenizer is never
# entered concurrently by two long prompts.
OFF_LOOP_CHARS = 16_384
_TOKENIZE = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenize")
# Normalizers (NFKC and the like) can fold a few characters into one: a margin on the bound.
NORMALIZE_MARGIN = 2


def longest_token_chars(tokenizer: Any) -> int:
    """The most characters one token stands for: its vocabulary's longest entry (byte-level
    vocabularies spell each byte as one character, SentencePiece ones each character; special
    tokens are as long as their text). A prompt of L characters has at least L / this tokens."""
    try:
        return max(1, max((len(t) for t in tokenizer.get_vocab()), default=1))
    except Exception:  # a tokenizer without get_vocab: no bound by length
        return 0


def prompt_chars(request: GenerateRequest) -> int:
    """The characters of a request's prompt text (messages' contents, or the prompt)."""
    if request.prompt is not None:
        return len(request.prompt)
    if request.messages is not None:
        return sum(len(str(m.content)) for m in request.messages) + len(request.assistant_prefix)
    return 0


def check_prompt_chars(chars: int, max_model_len: int, longest_token: int) -> None:
    """Refuse a prompt that cannot fit the context by its length alone, before tokenizing it
    (2 MiB of text would otherwise be tokenized for nothing)."""
    if longest_token and chars > max_model_len * longest_token * NORMALIZE_MARGIN:
        raise ContextLengthExceeded(
            f"the prompt has {chars} characters, more than this model's context of "
            f"{max_model_len} tokens can hold"
        )


async def tokenize_prompt(
    tokenizer: HFTokenizer, request: GenerateRequest, max_model_len: int, longest_token: int
) -> tuple[list[int], str]:
    """`prompt_token_ids` for a worker: refused by length first (`check_prompt_chars`), and a
    long prompt tokenized off the event loop."""
    chars = prompt_chars(request)
    check_prompt_chars(chars, max_model_len, longest_token)
    if chars <= OFF_LOOP_CHARS:
        return prompt_token_ids(tokenizer, request)
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(_TOKENIZE, prompt_token_ids, tokenizer, request)


def check_context(prompt_len: int, max_tokens: int | None, max_model_len: int) -> int:
    if prompt_len == 0:
        raise BadRequest("the prompt is empty", param="prompt")
    if prompt_len >= max_model_len:
        raise ContextLengthExceeded(
            f"the prompt has {prompt_len} tokens; this model's context is {max_model_len} tokens"
        )
    room = max_model_len - prompt_len
    if max_tokens is not None and max_tokens > room:
        raise ContextLengthExceeded(
            f"prompt ({prompt_len} tokens) + max_tokens ({max_tokens}) exceeds this model's "
            f"context of {max_model_len} tokens",
            param="max_tokens",
        )
    return room if max_tokens is None else max_tokens
