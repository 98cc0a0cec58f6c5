"""Where a member's covering tree starts: the prompt as a token root plus a re-opened tail.

A prompt tokenized on its own ends on a token boundary that the continuation might not
respect: "The capital of Fra" encodes its last word as a whole token, and a model asked to
continue from those tokens almost never produces "nce" (the canonical encoding of "France"
is one token).  Token healing, done exactly: the last word of the prompt (the tokens from the
last one that starts with whitespace, at most `MAX_REOPENED_TOKENS`, never before a special
token) goes back to bytes, the tree is rooted at the tokens before it and replays the tail
byte by byte, so every tokenization of tail + continuation is covered.  The tail's bytes are
conditioned on, never emitted.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from service.bytelevel.byte_tables import TokenByteTable
from service.bytelevel.utf8 import is_complete

MAX_REOPENED_TOKENS = 8
_WHITESPACE = b" \t\n\r"


@dataclass(frozen=True, slots=True)
class MemberPrompt:
    root: tuple[int, ...]  # token ids the tree starts from (never empty)
    tail: bytes  # prompt bytes replayed in the tree, not emitted
    prompt_tokens: int  # the prompt's length in this model's tokens (usage)


def reopen_tail(
    ids: Sequence[int],
    table: TokenByteTable,
    start_id: int | None,
    max_tokens: int = MAX_REOPENED_TOKENS,
) -> MemberPrompt:
    ids = [int(i) for i in ids]
    n = len(ids)
    if n == 0:
        raise ValueError("empty prompt")
    last_special = max((i for i, t in enumerate(ids) if table.is_special(t)), default=-1)
    first_open = last_special + 1  # tokens from here on produce bytes
    lowest = max(first_open, n - max_tokens)
    k = n  # nothing re-opened
    for i in range(n - 1, lowest - 1, -1):
        k = i
        head = table.token_bytes(ids[i])[:1]
        before = table.token_bytes(ids[i - 1])[-1:] if i > first_open else b""
        # A word starts here: the token opens with whitespace (GPT-2 "Ġw", SentencePiece
        # "▁w") or the previous one closes with it (pre-tokenizers that split after spaces).
        if (head and head in _WHITESPACE) or (before and before in _WHITESPACE):
            break
    # The tail must start on a character boundary (byte-fallback tokens may split one).
    while k > first_open and k < n and not is_complete(table.decode(ids[k:])):
        k -= 1
    if k < n and not is_complete(table.decode(ids[k:])):
        k = n
    root = tuple(ids[:k])
    if not root:
        # Nothing special precedes the text: start from BOS (or the document separator)
        # so the first word can be re-opened too; without one, keep the first token.
        if start_id is not None:
            root = (start_id,)
        else:
            k = 1
            root = tuple(ids[:1])
    return MemberPrompt(root, table.decode(ids[k:]), n)
