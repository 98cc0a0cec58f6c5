"""Functional tokens (`<nexa_k>`): which node each token names, and parsing Octopus-v4 output.

Each routable node (a child of some router) owns one token graph-wide, so one router model can
serve every router of the graph; at request time only the current router's children are scored.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from service.graph.schema import GraphConfig, RouterNode

END_TOKEN = "<nexa_end>"
OCTOPUS_SYSTEM_PROMPT = (
    "You are a router. Below is the query from the users, please call the correct function "
    "and generate the parameters to call the function."
)


def token_name(index: int) -> str:
    return f"<nexa_{index}>"


def assign_tokens(graph: GraphConfig) -> dict[str, int]:
    """node id -> functional token index. Explicit `tokens:` maps win (Octopus-v4 checkpoints);
    the rest are numbered in file order after the highest explicit index."""
    assigned: dict[str, int] = {}
    for node in graph.nodes.values():
        if isinstance(node, RouterNode) and node.tokens:
            for child, idx in node.tokens.items():
                if assigned.get(child, idx) != idx:
                    raise ValueError(f"node '{child}' is given two functional tokens")
                assigned[child] = idx
    taken = set(assigned.values())
    nxt = 0
    for node in graph.nodes.values():
        if not isinstance(node, RouterNode):
            continue
        for child in node.children:
            if child in assigned:
                continue
            while nxt in taken:
                nxt += 1
            assigned[child] = nxt
            taken.add(nxt)
    return assigned


@dataclass(frozen=True)
class OctopusCall:
    index: int
    query: str | None
    complete: bool  # the end token was present


# `<nexa_4>('query')<nexa_end>`, tolerant of what the released parser is not: quotes inside the
# query, whitespace/newlines before the end token, double quotes, a missing end token.
_CALL = re.compile(r"<nexa_(\d{1,3})>\s*(?:\(\s*(?P<q>['\"])(?P<body>.*))?", re.DOTALL)


def parse_octopus_output(text: str) -> OctopusCall | None:
    match = _CALL.search(text)
    if match is None:
        return None
    index = int(match.group(1))
    body = match.group("body")
    if body is None:
        return OctopusCall(index, None, END_TOKEN in text)
    quote = match.group("q")
    complete = END_TOKEN in body
    if complete:
        body = body[: body.index(END_TOKEN)]
    body = body.rstrip()
    # Strip the closing `')` (or `'` / `)` alone when generation stopped early).
    if body.endswith(")"):
        body = body[:-1].rstrip()
    if body.endswith(quote):
        body = body[:-1]
    body = body.replace("\\" + quote, quote)
    return OctopusCall(index, body, complete)
