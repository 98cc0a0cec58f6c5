"""Graph validation: every error names the node and the field (and the line of the node)."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.cli import main as cli_main
from service.graph.functional_tokens import assign_tokens
from service.graph.schema import GraphError, parse_graph

REPO = Path(__file__).resolve().parents[2]

MODELS = """
models:
  m: {urls: ["http://127.0.0.1:1"]}
  r: {urls: ["http://127.0.0.1:2"]}
"""


def graph_error(nodes: str, root: str = "") -> str:
    with pytest.raises(GraphError) as info:
        parse_graph(MODELS + root + "nodes:\n" + nodes, source="g.yaml")
    return str(info.value)


def test_a_valid_graph_loads() -> None:
    graph = parse_graph(
        MODELS
        + "root: top\nnodes:\n"
        + "  top: {kind: router, model: r, children: [a, sub], fallback: a, threshold: 0.3}\n"
        + "  sub: {kind: router, model: r, children: [b, c], fallback: a}\n"
        + "  a: {kind: model, model: m}\n  b: {kind: model, model: m}\n"
        + "  c: {kind: model, model: m}\n"
    )
    assert graph.router_children("top") == ["a", "sub"]
    assert assign_tokens(graph) == {"a": 0, "sub": 1, "b": 2, "c": 3}


def test_unknown_model_names_node_and_model() -> None:
    msg = graph_error("  a: {kind: model, model: nope}\n")
    assert "node 'a'" in msg and "model 'nope'" in msg and "line" in msg


def test_cycle_is_reported_with_its_path() -> None:
    msg = graph_error(
        "  x: {kind: router, model: r, children: [y]}\n"
        "  y: {kind: router, model: r, children: [x]}\n"
    )
    assert "cycle" in msg and "x -> y -> x" in msg


def test_fallback_to_an_ancestor_is_a_cycle() -> None:
    msg = graph_error(
        "  x: {kind: router, model: r, children: [y, a]}\n"
        "  y: {kind: router, model: r, children: [b], fallback: x}\n"
        "  a: {kind: model, model: m}\n  b: {kind: model, model: m}\n"
    )
    assert "cycle" in msg and "y -> x" in msg


def test_router_cannot_fall_back_to_itself() -> None:
    msg = graph_error(
        "  x: {kind: router, model: r, children: [a], fallback: x}\n  a: {kind: model, model: m}\n"
    )
    assert "node 'x'" in msg and "fallback" in msg


def test_fallback_must_be_a_node() -> None:
    msg = graph_error(
        "  x: {kind: router, model: r, children: [a], fallback: ghost}\n"
        "  a: {kind: model, model: m}\n"
    )
    assert "node 'x'" in msg and "fallback 'ghost'" in msg


def test_router_without_children() -> None:
    msg = graph_error("  x: {kind: router, model: r, children: []}\n")
    assert "nodes.x.children" in msg and "line 6" in msg


def test_child_that_is_not_a_node() -> None:
    msg = graph_error("  x: {kind: router, model: r, children: [ghost]}\n")
    assert "node 'x'" in msg and "child 'ghost'" in msg


def test_duplicate_node_id_is_an_error_not_a_silent_overwrite() -> None:
    msg = graph_error("  a: {kind: model, model: m}\n  a: {kind: model, model: r}\n")
    assert "duplicate key 'a'" in msg and "line 7" in msg and "line 6" in msg


def test_duplicate_child_in_one_router() -> None:
    msg = graph_error(
        "  x: {kind: router, model: r, children: [a, a]}\n  a: {kind: model, model: m}\n"
    )
    assert "node 'x'" in msg and "twice" in msg


def test_token_clash_inside_one_router() -> None:
    msg = graph_error(
        "  x: {kind: router, model: r, children: [a, b], tokens: {a: 3, b: 3}}\n"
        "  a: {kind: model, model: m}\n  b: {kind: model, model: m}\n"
    )
    assert "node 'x'" in msg and "tokens" in msg


def test_token_clash_across_routers() -> None:
    msg = graph_error(
        "  x: {kind: router, model: r, children: [a, y], tokens: {a: 0, y: 1}}\n"
        "  y: {kind: router, model: r, children: [b], tokens: {b: 0}}\n"
        "  a: {kind: model, model: m}\n  b: {kind: model, model: m}\n"
    )
    assert "node 'y'" in msg and "tokens" in msg and "<nexa_0>" in msg and "'a'" in msg


def test_one_child_given_two_tokens() -> None:
    msg = graph_error(
        "  x: {kind: router, model: r, children: [a, y], tokens: {a: 0, y: 1}}\n"
        "  y: {kind: router, model: r, children: [a], tokens: {a: 5}}\n"
        "  a: {kind: model, model: m}\n"
    )
    assert "node 'y'" in msg and "'a'" in msg and "<nexa_5>" in msg and "<nexa_0>" in msg


def test_tokens_must_cover_every_child() -> None:
    msg = graph_error(
        "  x: {kind: router, model: r, children: [a, b], tokens: {a: 0}}\n"
        "  a: {kind: model, model: m}\n  b: {kind: model, model: m}\n"
    )
    assert "node 'x'" in msg and "['b']" in msg


def test_root_must_be_a_router() -> None:
    msg = graph_error("  a: {kind: model, model: m}\n", root="root: a\n")
    assert "root" in msg and "'a'" in msg


def test_reserved_id() -> None:
    msg = graph_error("  auto: {kind: model, model: m}\n")
    assert "'auto'" in msg and "reserved" in msg


def test_unknown_field_is_named() -> None:
    msg = graph_error("  a: {kind: model, model: m, temprature: 0.5}\n")
    assert "nodes.a.temprature" in msg


def test_default_graph_shape() -> None:
    graph = parse_graph((REPO / "configs/local.yaml").read_text())
    assert graph.root == "root"
    assert graph.router_children("root") == [
        "math", "code", "science", "health", "law", "finance", "humanities", "general",
    ]  # fmt: skip
    assert graph.router_children("science") == ["physics", "chemistry", "biology"]
    root = graph.nodes["root"]
    assert getattr(root, "fallback", None) == "general"
    assert any(n.kind == "ensemble" for n in graph.nodes.values())


def test_graph_check_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["graph", "check", str(REPO / "configs/local.yaml")]) == 0
    bad = tmp_path / "bad.yaml"
    bad.write_text(MODELS + "nodes:\n  a: {kind: model, model: nope}\n")
    assert cli_main(["graph", "check", str(bad)]) == 2
    assert "node 'a'" in capsys.readouterr().err
