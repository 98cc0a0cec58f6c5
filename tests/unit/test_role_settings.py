"""`octograph up` sizes each worker's engine from the model's role (issue 21): KV space for
what the role must hold, sequences at once, the model runner in the engine-core process; a
user's own OCTOGRAPH_WORKER_* settings win."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from service.embedded import (
    ANSWER_FULL_SEQUENCES,
    KV_FLOOR_GIB,
    ROUTER_MAX_NUM_SEQS,
    ROUTER_TOKENS_PER_SEQUENCE,
    kv_bytes_per_token,
    role_settings,
)
from service.graph.schema import load_graph

REPO = Path(__file__).resolve().parents[2]


def model_dir(tmp_path: Path, name: str, **config: object) -> Path:
    d = tmp_path / name
    d.mkdir()
    (d / "config.json").write_text(json.dumps(config))
    return d


SMOL = {"num_hidden_layers": 30, "num_key_value_heads": 3, "hidden_size": 576,
        "num_attention_heads": 9}  # fmt: skip


def test_kv_bytes_per_token(tmp_path: Path) -> None:
    # SmolLM2-135M: K and V, 30 layers, 3 KV heads of 64, bfloat16.
    assert kv_bytes_per_token(model_dir(tmp_path, "s", **SMOL)) == 2 * 30 * 3 * 64 * 2
    gemma = {"text_config": {"num_hidden_layers": 18, "num_key_value_heads": 1,
                             "head_dim": 256, "num_attention_heads": 4}}  # fmt: skip
    assert kv_bytes_per_token(model_dir(tmp_path, "g", **gemma)) == 2 * 18 * 256 * 2
    assert kv_bytes_per_token(tmp_path / "absent") is None
    assert kv_bytes_per_token(model_dir(tmp_path, "bad", hidden_size=1)) is None


def test_roles_of_the_default_graph(tmp_path: Path) -> None:
    graph = load_graph(REPO / "configs/local.yaml")
    leaf = role_settings(graph, "smollm2", model_dir(tmp_path, "smollm2", **SMOL))
    per_token = 2 * 30 * 3 * 64 * 2
    assert leaf["OCTOGRAPH_WORKER_EXECUTOR"] == "uni"
    assert float(leaf["OCTOGRAPH_WORKER_KV_CACHE_GIB"]) == pytest.approx(
        ANSWER_FULL_SEQUENCES * 2048 * per_token / (1 << 30), rel=1e-3
    )
    router_dir = model_dir(tmp_path, "router", **{**SMOL, "num_hidden_layers": 24})
    router = role_settings(graph, "router", router_dir, native_bf16=True)
    assert router["OCTOGRAPH_WORKER_MAX_NUM_SEQS"] == str(ROUTER_MAX_NUM_SEQS)
    assert "OCTOGRAPH_WORKER_DTYPE" not in router  # the worker's bfloat16
    tokens = ROUTER_MAX_NUM_SEQS * ROUTER_TOKENS_PER_SEQUENCE
    assert float(router["OCTOGRAPH_WORKER_KV_CACHE_GIB"]) == pytest.approx(
        max(KV_FLOOR_GIB, tokens * 2 * 24 * 3 * 64 * 2 / (1 << 30)), rel=1e-3
    )
    # Far below the 2 GiB each worker had: the router needs a few hundred tokens a sequence.
    assert float(router["OCTOGRAPH_WORKER_KV_CACHE_GIB"]) < 0.25
    # A CPU without bfloat16 arithmetic: the router in float32, its KV space in 4-byte
    # elements; the models that answer stay in bfloat16 either way.
    emulated = role_settings(graph, "router", router_dir, native_bf16=False)
    assert emulated["OCTOGRAPH_WORKER_DTYPE"] == "float32"
    assert float(emulated["OCTOGRAPH_WORKER_KV_CACHE_GIB"]) == pytest.approx(
        max(KV_FLOOR_GIB, tokens * 2 * 24 * 3 * 64 * 4 / (1 << 30)), rel=1e-3
    )
    for native in (True, False):
        leaf = role_settings(graph, "smollm2", tmp_path / "smollm2", native_bf16=native)
        assert "OCTOGRAPH_WORKER_DTYPE" not in leaf
    # The user's OCTOGRAPH_WORKER_DTYPE wins, and the KV space is sized in its element size.
    users = role_settings(graph, "router", router_dir, native_bf16=False, user_dtype="bfloat16")
    assert "OCTOGRAPH_WORKER_DTYPE" not in users
    assert users["OCTOGRAPH_WORKER_KV_CACHE_GIB"] == router["OCTOGRAPH_WORKER_KV_CACHE_GIB"]
    # No config.json (a fake engine): the worker's own default KV size stays.
    assert "OCTOGRAPH_WORKER_KV_CACHE_GIB" not in role_settings(graph, "gemma3", tmp_path)


def test_a_users_settings_win(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import service.embedded as embedded

    graph = load_graph(REPO / "configs/local.yaml")
    spawned: list[dict[str, str]] = []

    class Recording:
        def launch(self, cmd: list[str], env: dict[str, str], *_: object, **__: object) -> Any:
            spawned.append(env)

        def close(self) -> None:
            pass

    monkeypatch.setattr(embedded, "WorkerProcess", lambda *a, **k: None)
    dirs = {"router": model_dir(tmp_path, "router", **SMOL)}
    environ = {"OCTOGRAPH_WORKER_KV_CACHE_GIB": "2", "PATH": "/usr/bin"}
    embedded.start_workers(graph, dirs, tmp_path / "logs", environ=environ, launcher=Recording())
    assert spawned[0]["OCTOGRAPH_WORKER_KV_CACHE_GIB"] == "2"
    assert spawned[0]["OCTOGRAPH_WORKER_MAX_NUM_SEQS"] == str(ROUTER_MAX_NUM_SEQS)


def test_native_bf16_is_read_from_the_cpu_flags() -> None:
    from service.affinity import cpu_flags, has_native_bf16

    sapphire = "processor\t: 0\nflags\t\t: fpu avx2 avx512f amx_bf16 amx_tile\n"
    skylake = "processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_vnni\n"
    graviton = "processor\t: 0\nFeatures\t: fp asimd bf16 i8mm\n"
    assert has_native_bf16(cpu_flags(sapphire))
    assert has_native_bf16(cpu_flags(graviton))
    assert not has_native_bf16(cpu_flags(skylake))
    assert cpu_flags("no flags here") == frozenset()


def test_a_router_that_only_scores_gets_the_narrow_output_layer(tmp_path: Path) -> None:
    """A model that routes and does nothing else is scoring-only (service/worker/scoring_head.py);
    a router node that reformats queries generates text with it, so then it is not, and neither
    is a model that answers."""
    graph = load_graph(REPO / "configs/local.yaml")
    router_dir = model_dir(tmp_path, "router", **SMOL)
    assert role_settings(graph, "router", router_dir)["OCTOGRAPH_WORKER_SCORING_ONLY"] == "true"
    leaf = role_settings(graph, "smollm2", model_dir(tmp_path, "smollm2", **SMOL))
    assert "OCTOGRAPH_WORKER_SCORING_ONLY" not in leaf
    science = graph.nodes["science"].model_copy(update={"reformat": True})
    reformats = graph.model_copy(update={"nodes": {**graph.nodes, "science": science}})
    assert "OCTOGRAPH_WORKER_SCORING_ONLY" not in role_settings(reformats, "router", router_dir)
