"""`octograph router build` on a tiny random Llama (SmolLM2's tokenizer and chat template, a
2-layer 32-wide backbone): the recipe, the output directory, determinism and idempotence,
in seconds. The real model's accuracy is measured by `octograph router eval`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from service.graph.router_prompt import OCTOGRAPH_SYSTEM_PROMPT, router_messages, router_prompt_ids
from service.graph.schema import parse_graph
from service.models import packaged
from service.training.router_build import (
    STAMP_NAME,
    BuildOptions,
    BuildResult,
    RouterBuildError,
    _common_prefix,
    build_router,
    child_towards,
    load_examples,
    resolve_data,
)

GRAPH = """
models:
  base: {urls: ["http://127.0.0.1:1"]}
  router: {path: router, build: {base: tiny, train: train.jsonl}}
root: root
nodes:
  root: {kind: router, model: router, children: [math, sci, chat], fallback: chat}
  sci: {kind: router, model: router, children: [physics, biology]}
  math: {kind: model, model: base, description: numbers and equations, examples: [what is 2+2]}
  physics: {kind: model, model: base, description: "forces, energy and motion"}
  biology: {kind: model, model: base, description: cells and living things}
  chat: {kind: model, model: base, description: greetings and small talk}
"""

ROWS = [
    ("solve x + 3 = 5", "math"),
    ("what is 12 times 7", "math"),
    ("why do objects fall", "physics"),
    ("what is kinetic energy", "physics"),
    ("how do cells divide", "biology"),
    ("what is DNA", "biology"),
    ("hello, how are you", "chat"),
    ("tell me a joke", "chat"),
]


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not packaged.is_prepared("smollm2"):
        pytest.skip("packaged smollm2 (its tokenizer) is not prepared")
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    src = packaged.model_dir("smollm2")
    out = tmp_path_factory.mktemp("tiny")
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(src / name, out / name)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
        max_position_embeddings=512, bos_token_id=1, eos_token_id=2, pad_token_id=2,
    )  # fmt: skip
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(out)
    return out


@pytest.fixture
def train_file(tmp_path: Path) -> Path:
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps({"query": q, "node": n}) + "\n" for q, n in ROWS))
    return path


def build(base: Path, train: Path, out: Path, **kw: object) -> BuildResult:
    options = BuildOptions(
        epochs=int(kw.pop("epochs", 60)),
        seed=int(kw.pop("seed", 0)),
        layers=int(kw.pop("layers", 0)),
        tune_top_mlp=bool(kw.pop("tune_top_mlp", False)),
        tune_top_attention=bool(kw.pop("tune_top_attention", False)),
        quantize=str(kw.pop("quantize", "none")),
    )
    graph = str(kw.pop("graph", GRAPH))
    return build_router(parse_graph(graph), "router", str(base), train, out, options, **kw)


def test_build_writes_a_servable_router_dir(tiny_base: Path, train_file: Path, tmp_path: Path):
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    out = tmp_path / "router"
    result = build(tiny_base, train_file, out)
    assert result.built and result.examples == len(ROWS) + 1  # + the graph's own example
    assert result.tokens == {
        "math": "<nexa_0>", "sci": "<nexa_1>", "chat": "<nexa_2>",
        "physics": "<nexa_3>", "biology": "<nexa_4>",
    }  # fmt: skip
    assert set(result.train_accuracy) == {"root", "sci"}
    tok = AutoTokenizer.from_pretrained(out)
    added = tok.get_added_vocab()
    for name in [*result.tokens.values(), "<nexa_end>"]:
        assert added[name] >= 49152
        assert tok.encode(f"x {name}", add_special_tokens=False)[-1] == added[name]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["vocab_size"] >= 49152 + 6 and cfg["tie_word_embeddings"]
    weights = load_file(str(out / "model.safetensors"))
    emb = weights["model.embed_tokens.weight"]
    assert emb.shape[0] >= 49152 + 6
    # The new rows were trained (not the description means any more) and the old ones kept.
    base_emb = load_file(str(tiny_base / "model.safetensors"))["model.embed_tokens.weight"]
    assert (emb[:49152] == base_emb).all()
    assert emb[added["<nexa_0>"]].float().norm() > 0
    assert json.loads((out / STAMP_NAME).read_text())["stamp"] == result.stamp
    assert not list(tmp_path.glob(".router.partial-*"))


def test_build_is_deterministic_and_idempotent(tiny_base: Path, train_file: Path, tmp_path: Path):
    from safetensors.torch import load_file

    a, b = tmp_path / "a", tmp_path / "b"
    first = build(tiny_base, train_file, a)
    again = build(tiny_base, train_file, a)
    assert not again.built and again.stamp == first.stamp
    build(tiny_base, train_file, b)
    wa = load_file(str(a / "model.safetensors"))["model.embed_tokens.weight"]
    wb = load_file(str(b / "model.safetensors"))["model.embed_tokens.weight"]
    assert (wa == wb).all()
    # A changed input (seed, data) rebuilds in place.
    assert build(tiny_base, train_file, a, seed=1).built
    train_file.write_text(train_file.read_text() + '{"query": "what is 9 - 4", "node": "math"}\n')
    rebuilt = build(tiny_base, train_file, a, seed=1)
    assert rebuilt.built and rebuilt.examples == len(ROWS) + 2
    assert build(tiny_base, train_file, a, seed=1, force=True).built


def test_layers_option_keeps_the_first_layers(
    tiny_base: Path, train_file: Path, tmp_path: Path
) -> None:
    from safetensors.torch import load_file

    out = tmp_path / "short"
    result = build(tiny_base, train_file, out, layers=1)
    assert result.built
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 1
    names = load_file(str(out / "model.safetensors")).keys()
    assert any(n.startswith("model.layers.0.") for n in names)
    assert not any(n.startswith("model.layers.1.") for n in names)
    assert "model.norm.weight" in names  # the tied output still reads a normed state
    full = build(tiny_base, train_file, tmp_path / "full")
    assert full.stamp != result.stamp  # the option is part of the build stamp
    with pytest.raises(RouterBuildError, match="has only 2"):
        build(tiny_base, train_file, tmp_path / "deep", layers=3)


def test_features_are_what_the_top_of_the_model_computes(tiny_base: Path) -> None:
    """Training starts from what the top layer reads at the scored position (its input
    residual, every position's keys and values: prefix-cached, batched, right-padded); the head
    over it, which recomputes the top layer's attention there, must give the final hidden
    state a plain forward gives."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from service.training.router_build import _features, _TopHead

    tok = AutoTokenizer.from_pretrained(tiny_base)
    model = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32).eval()
    prompts = [("octograph", q) for q, _ in ROWS]
    features = _features(model, tok, prompts, "test")
    assert features.prefix_keys.shape[1] > 0 and bool(features.padding.any())
    hidden = _TopHead(model, tune_mlp=False)(features)
    with torch.inference_mode():
        for row, (fmt, query) in enumerate(prompts):
            ids = torch.tensor([router_prompt_ids(tok, query, fmt)])
            expected = model(input_ids=ids, output_hidden_states=True).hidden_states[-1][0, -1]
            torch.testing.assert_close(hidden[row], expected, rtol=1e-4, atol=1e-4)


def test_tune_top_mlp_trains_only_the_top_mlp(
    tiny_base: Path, train_file: Path, tmp_path: Path
) -> None:
    from safetensors.torch import load_file

    build(tiny_base, train_file, tmp_path / "a")
    frozen = load_file(str(tmp_path / "a" / "model.safetensors"))
    tuned_result = build(tiny_base, train_file, tmp_path / "b", tune_top_mlp=True)
    tuned = load_file(str(tmp_path / "b" / "model.safetensors"))
    assert tuned_result.stamp != json.loads((tmp_path / "a" / STAMP_NAME).read_text())["stamp"]
    changed = {
        n
        for n in frozen
        if not n.endswith("embed_tokens.weight") and not (frozen[n] == tuned[n]).all()
    }
    assert changed and all(n.startswith("model.layers.1.") for n in changed)
    assert any(".mlp." in n for n in changed)
    assert not any("self_attn" in n for n in changed)  # the prefix cache stays valid
    # It changes what the model generates: refused for a router that generates.
    generating = GRAPH.replace(
        "children: [physics, biology]}", "children: [physics, biology], reformat: true}"
    )
    with pytest.raises(RouterBuildError, match="reformat"):
        build(tiny_base, train_file, tmp_path / "c", tune_top_mlp=True, graph=generating)


def test_tune_top_attention_trains_the_top_query_and_output_projections(
    tiny_base: Path, train_file: Path, tmp_path: Path
) -> None:
    """The scored position's attention is trained (query and output projections), its keys and
    values are not (the other positions and the prefix cache stay as the base computes them),
    and the saved model computes what the head was trained on: the trained tokens score the
    training prompts as the build's own head did."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    build(tiny_base, train_file, tmp_path / "a", tune_top_mlp=True)
    frozen = load_file(str(tmp_path / "a" / "model.safetensors"))
    result = build(
        tiny_base, train_file, tmp_path / "b", tune_top_mlp=True, tune_top_attention=True
    )
    tuned = load_file(str(tmp_path / "b" / "model.safetensors"))
    assert result.stamp != json.loads((tmp_path / "a" / STAMP_NAME).read_text())["stamp"]
    changed = {
        n
        for n in frozen
        if not n.endswith("embed_tokens.weight") and not (frozen[n] == tuned[n]).all()
    }
    attention = {n for n in changed if ".self_attn." in n}
    assert attention == {
        "model.layers.1.self_attn.q_proj.weight",
        "model.layers.1.self_attn.o_proj.weight",
    }
    assert all(n.startswith("model.layers.1.") for n in changed)
    # Served as saved: a plain forward of the saved model ranks each training query's label
    # first as often as the build reported (the head's math is the model's).
    tok = AutoTokenizer.from_pretrained(tmp_path / "b")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "b", dtype=torch.float32).eval()
    ids = {name: tok.convert_tokens_to_ids(token) for name, token in result.tokens.items()}
    root = ["math", "sci", "chat"]
    right = total = 0
    with torch.inference_mode():
        for query, node in [*ROWS, ("what is 2+2", "math")]:  # + the graph's own example
            label = node if node in root else "sci"
            x = torch.tensor([router_prompt_ids(tok, query, "octograph")])
            logits = model(input_ids=x).logits[0, -1]
            pick = max(root, key=lambda c: float(logits[ids[c]]))
            right += pick == label
            total += 1
    assert abs(right / total - result.train_accuracy["root"]) <= 1.5 / total
    # With int8 weights the trained attention stays full precision, all four projections
    # (vLLM runs q, k and v as one fused layer, which is quantized as a whole or not at all).
    build(tiny_base, train_file, tmp_path / "q", tune_top_attention=True, quantize="int8")
    config = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert {f"model.layers.1.self_attn.{c}_proj" for c in "qkvo"} <= set(config["ignore"])
    assert not any(n.startswith("model.layers.1.mlp") for n in config["ignore"])
    generating = GRAPH.replace(
        "children: [physics, biology]}", "children: [physics, biology], reformat: true}"
    )
    with pytest.raises(RouterBuildError, match="reformat"):
        build(tiny_base, train_file, tmp_path / "c", tune_top_attention=True, graph=generating)


def test_int8_build_saves_int8_linears_and_trains_against_them(
    tiny_base: Path, train_file: Path, tmp_path: Path
) -> None:
    """`build.quantize: int8`: every decoder Linear but the first layer's and the tuned top
    MLP's is saved as int8 with a per-row scale (compressed-tensors W8A8, what vLLM loads),
    each within half a step of the base weight; the rest stays as it was; and the functional
    tokens are trained on the int8 model's hidden states, so they differ from a plain build's."""
    import torch
    from safetensors.torch import load_file

    build(tiny_base, train_file, tmp_path / "plain", tune_top_mlp=True)
    build(tiny_base, train_file, tmp_path / "q", tune_top_mlp=True, quantize="int8")
    base = load_file(str(tiny_base / "model.safetensors"))
    plain = load_file(str(tmp_path / "plain" / "model.safetensors"))
    saved = load_file(str(tmp_path / "q" / "model.safetensors"))
    config = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors" and config["format"] == "int-quantized"
    modules = [f"self_attn.{c}_proj" for c in "qkvo"] + [
        f"mlp.{c}_proj" for c in ("gate", "up", "down")
    ]
    top_mlp = [f"model.layers.1.mlp.{p}" for p in ("down_proj", "gate_proj", "up_proj")]
    kept = [f"model.layers.0.{m}" for m in modules] + top_mlp
    assert config["ignore"] == ["lm_head", *sorted(kept)]
    group = config["config_groups"]["group_0"]
    assert group["weights"]["strategy"] == "channel" and group["input_activations"]["dynamic"]
    int8 = {n for n, t in saved.items() if t.dtype == torch.int8}
    linears = {f"model.layers.{i}.{m}.weight" for i in (0, 1) for m in modules}
    assert int8 == linears - {f"{m}.weight" for m in kept}
    for name in int8:
        q, scale = saved[name].float(), saved[name.removesuffix("weight") + "weight_scale"]
        assert scale.shape == (q.shape[0], 1) and scale.dtype == torch.float32
        assert q.abs().amax(dim=1).eq(127).all()  # each row's largest weight maps to 127
        error = (q * scale - base[name].float()).abs()
        assert (error <= scale / 2 + 1e-6).all(), name
    for name in kept:  # full precision: the first layer as the base's, the top MLP as trained
        assert saved[f"{name}.weight"].dtype == torch.bfloat16
    emb = "model.embed_tokens.weight"
    vocab = base[emb].shape[0]
    assert torch.equal(saved[emb][:vocab], base[emb])
    assert not torch.equal(saved[emb][vocab:], plain[emb][vocab:])  # trained on int8 states
    with pytest.raises(RouterBuildError, match="quantize"):
        BuildOptions(quantize="int4")


def test_router_system_prompt_fills_whole_kv_blocks() -> None:
    """Prefix caching reuses whole KV blocks: the part every router prompt shares (the system
    turn up to the user's text) is a whole number of router blocks, so none of it is
    recomputed per request."""
    if not packaged.is_prepared("smollm2"):
        pytest.skip("packaged smollm2 is not prepared")
    from transformers import AutoTokenizer

    from service.embedded import SCORING_BLOCK_SIZE

    tok = AutoTokenizer.from_pretrained(packaged.model_dir("smollm2"))
    prompts = [router_prompt_ids(tok, q, "octograph") for q in ("why", "Was kostet 2+2?", "x y")]
    shared = _common_prefix(prompts)
    assert shared > 0 and shared % SCORING_BLOCK_SIZE == 0, shared


def test_labels_must_be_nodes(tiny_base: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"query": "x", "node": "astrology"}\n')
    with pytest.raises(RouterBuildError, match="astrology"):
        build(tiny_base, bad, tmp_path / "out")
    bad.write_text("not json\n")
    with pytest.raises(RouterBuildError, match="line 1"):
        load_examples(bad)


def test_labels_map_to_the_child_on_the_path() -> None:
    graph = parse_graph(GRAPH)
    assert child_towards(graph, "root", "biology") == "sci"
    assert child_towards(graph, "sci", "biology") == "biology"
    assert child_towards(graph, "root", "sci") == "sci"
    assert child_towards(graph, "sci", "math") is None


def test_training_prompt_is_the_request_time_prompt() -> None:
    if not packaged.is_prepared("smollm2"):
        pytest.skip("packaged smollm2 is not prepared")
    from transformers import AutoTokenizer

    from service.chat_template import prompt_token_ids
    from service.protocol.internal import GenerateRequest

    tok = AutoTokenizer.from_pretrained(packaged.model_dir("smollm2"))
    messages = router_messages("how do magnets work", "octograph")
    assert messages[0].content == OCTOGRAPH_SYSTEM_PROMPT
    worker_ids, text = prompt_token_ids(tok, GenerateRequest(request_id="r", messages=messages))
    assert router_prompt_ids(tok, "how do magnets work", "octograph") == worker_ids
    assert text.endswith("<|im_start|>assistant\n")


def test_common_prefix_and_data_paths(tmp_path: Path) -> None:
    assert _common_prefix([[1, 2, 3, 4], [1, 2, 5], [1, 2, 3]]) == 2
    assert _common_prefix([[1, 2], [1, 2]]) == 1  # at least one token of each is left to run
    cfg = tmp_path / "configs" / "g.yaml"
    cfg.parent.mkdir()
    (tmp_path / "data.jsonl").write_text("")
    assert resolve_data(cfg, "data.jsonl") == tmp_path / "data.jsonl"
    (cfg.parent / "local.jsonl").write_text("")
    assert resolve_data(cfg, "local.jsonl") == cfg.parent / "local.jsonl"
