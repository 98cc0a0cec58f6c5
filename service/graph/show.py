"""`octograph graph show`: the graph as a readable tree."""

from __future__ import annotations

from service.graph.functional_tokens import assign_tokens, token_name
from service.graph.schema import EnsembleNode, GraphConfig, ModelNode, RouterNode


def render_tree(graph: GraphConfig) -> str:
    tokens = assign_tokens(graph)
    lines: list[str] = []

    def label(nid: str) -> str:
        node = graph.nodes[nid]
        tok = f" {token_name(tokens[nid])}" if nid in tokens else ""
        if isinstance(node, RouterNode):
            fb = f", fallback {node.fallback}" if node.fallback else ""
            return f"{nid}{tok} [router on {node.model}{fb}]"
        if isinstance(node, EnsembleNode):
            members = " + ".join(f"{m.model}×{m.weight:g}" for m in node.members)
            return f"{nid}{tok} [ensemble {node.mode}: {members}]"
        assert isinstance(node, ModelNode)
        return f"{nid}{tok} [model {node.model}]"

    def walk(nid: str, prefix: str, last: bool, top: bool) -> None:
        lines.append(label(nid) if top else f"{prefix}{'└── ' if last else '├── '}{label(nid)}")
        children = graph.router_children(nid)
        child_prefix = "" if top else prefix + ("    " if last else "│   ")
        for i, child in enumerate(children):
            walk(child, child_prefix, i == len(children) - 1, False)

    reached: set[str] = set()

    def mark(nid: str) -> None:
        reached.add(nid)
        for c in graph.router_children(nid):
            mark(c)

    if graph.root:
        lines.append("auto →")
        walk(graph.root, "", True, True)
        mark(graph.root)
    others = [n for n in graph.nodes if n not in reached]
    if others:
        lines.append("")
        lines.append("direct nodes:")
        for nid in others:
            lines.append(f"  {label(nid)}")
    lines.append("")
    lines.append("models: " + ", ".join(graph.models))
    return "\n".join(lines)
