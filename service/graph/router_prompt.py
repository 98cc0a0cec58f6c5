"""The router prompt: one function used both to train the router model (`octograph router
build`) and to score it at request time (policy.py), so the two can never drift apart.

The router model is SmolLM2 with frozen weights and new functional-token rows; the tokens are
scored on the hidden state right after the chat template's assistant header. A system prompt
that asks for the query's subject makes that hidden state carry the topic (what the tokens must
separate), which a generic instruction does not do as well.
"""

from __future__ import annotations

from typing import Literal

from service.chat_template import HFTokenizer, prompt_token_ids
from service.protocol.internal import ChatTurn, GenerateRequest

PromptFormat = Literal["octograph", "octopus-v4"]

ROUTER_QUERY_CHARS = 2000  # the router reads the tail of the query; enough to classify

# Octopus v4's own system prompt (its released checkpoint was trained on it).
OCTOPUS_SYSTEM_PROMPT = (
    "You are a router. Below is the query from the users, please call the correct function "
    "and generate the parameters to call the function."
)
OCTOGRAPH_SYSTEM_PROMPT = (
    "You are a router. Read the user's query and name its subject area in one word "
    "(for example math, programming, physics, chemistry, biology, health, law, finance, "
    "history, or everyday chat), then call the function for that subject area, and nothing else."
)


def router_messages(query: str, prompt_format: PromptFormat | str) -> list[ChatTurn]:
    """The chat the router model reads; the worker applies the model's chat template."""
    query = query[-ROUTER_QUERY_CHARS:]
    system = OCTOPUS_SYSTEM_PROMPT if prompt_format == "octopus-v4" else OCTOGRAPH_SYSTEM_PROMPT
    return [ChatTurn(role="system", content=system), ChatTurn(role="user", content=query)]


def router_prompt_ids(tokenizer: HFTokenizer, query: str, prompt_format: str) -> list[int]:
    """Token ids exactly as a worker builds them for a score query of `router_messages`."""
    request = GenerateRequest(request_id="router", messages=router_messages(query, prompt_format))
    ids, _ = prompt_token_ids(tokenizer, request)
    return ids
