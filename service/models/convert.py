"""GGUF -> Hugging Face model directory (safetensors + tokenizer.json) that vLLM loads.

Everything heavy (torch, transformers, gguf) is imported inside the functions: this module is
imported by the CLI on every start, and conversion happens once per machine.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

# Weights are dequantized into this dtype. bfloat16 is what both checkpoints were trained and
# published in upstream, vLLM's CPU backend runs it natively on AVX512-BF16/AMX hosts (and GPUs
# run it everywhere), it halves disk and RAM against float32, and its rounding error is about an
# order of magnitude below the 4-bit quantization error already baked into the GGUF weights.
# float16 is not an option: Gemma-3 activations overflow it.
DEFAULT_DTYPE = "bfloat16"

# Strings whose tokenization is compared between the transformers tokenizer and the raw
# `tokenizers` file: the gateway's byte-level code uses the latter, vLLM the former, and they
# must agree exactly. Covers spaces, newlines, non-ASCII and byte fallback.
_TOKENIZER_PROBES = (
    "The capital of France is",
    "Hello  world\n\n  indented\tTab",
    "def f(x):\n    return x ** 2  # square",
    "naïve café, 日本語, emoji 🙂 and Zürich",
)

# Left by transformers in tokenizer_config.json because we loaded from a local path; they
# describe this conversion run, not the tokenizer, and would leak into later loads as kwargs.
_TOKENIZER_CONFIG_NOISE = ("is_local", "local_files_only", "gguf_file")


class ConversionError(RuntimeError):
    """The GGUF could not be turned into a loadable model directory."""


@dataclass(frozen=True)
class ConversionReport:
    architecture: str  # e.g. "LlamaForCausalLM"; what vLLM dispatches on
    model_type: str  # e.g. "gemma3_text"
    dtype: str
    vocab_size: int  # tokens in tokenizer.json, added tokens included
    add_bos_token: bool
    chat_template: bool  # whether the GGUF carried one (it is saved when it does)
    seconds: float


def library_versions() -> dict[str, str]:
    """Versions of the libraries that shape the output; recorded so a stale dir can be explained.

    Uses package metadata only, so it does not import torch or transformers.
    """
    versions: dict[str, str] = {}
    for dist in ("transformers", "torch", "gguf", "tokenizers", "safetensors", "octograph"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = "not installed"
    return versions


def _force_offline() -> None:
    # huggingface_hub reads these once, at import: they must be set before transformers loads.
    # They stay set: the rest of the process (and the workers it spawns) must not reach a hub
    # either. `local_files_only=True` below covers a process that imported transformers earlier.
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"


@contextmanager
def _transformers_progress(enabled: bool) -> Iterator[None]:
    from transformers.utils import logging as transformers_logging

    # Untyped functions in transformers; Any keeps mypy --strict quiet without ignores.
    hf_logging: Any = transformers_logging
    was_enabled = hf_logging.is_progress_bar_enabled()
    if not enabled:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _gguf_flag(gguf_path: Path, key: str) -> bool | None:
    """A boolean metadata field of the GGUF, None when absent."""
    from gguf import GGUFReader

    field = GGUFReader(str(gguf_path)).get_field(key)
    if field is None:
        return None
    return bool(field.contents())


def convert_gguf(
    gguf_path: Path,
    out_dir: Path,
    *,
    expected_vocab_size: int,
    dtype: str = DEFAULT_DTYPE,
    progress: bool = True,
) -> ConversionReport:
    """Dequantize `gguf_path` and write a model directory into `out_dir` (which must be empty).

    Raises ConversionError with the reason when the result would not load or not match the GGUF.
    """
    _force_offline()
    started = time.monotonic()
    try:
        import torch
        import transformers
    except ImportError as exc:
        raise ConversionError(
            f"conversion needs torch, transformers and gguf ({exc}); install them with "
            "`pip install 'octograph[convert]'`"
        ) from exc

    torch_dtype = getattr(torch, dtype, None)
    if not isinstance(torch_dtype, torch.dtype) or not torch_dtype.is_floating_point:
        raise ConversionError(f"unsupported dtype {dtype!r}")

    gguf_path = gguf_path.resolve()
    # transformers resolves `gguf_file` against a "repository" directory; an absolute path is
    # used as-is, and the empty output dir guarantees no stray config/tokenizer file is picked up.
    repo_dir = str(out_dir)
    with _transformers_progress(progress):
        tokenizer: Any = transformers.AutoTokenizer.from_pretrained(
            repo_dir, gguf_file=str(gguf_path), local_files_only=True
        )
        # `dequantize=True` asks for plain dense Linear layers: the packed-GGUF modules
        # transformers uses otherwise cannot be saved, and vLLM could not load them anyway.
        model: Any = transformers.AutoModelForCausalLM.from_pretrained(
            repo_dir,
            gguf_file=str(gguf_path),
            dtype=torch_dtype,
            quantization_config=transformers.GgufConfig(dequantize=True),
            local_files_only=True,
        )
    try:
        packed = sorted(
            name
            for name, tensor in model.state_dict().items()
            if not tensor.is_floating_point() or tensor.dtype != torch_dtype
        )
        if packed:
            raise ConversionError(
                f"{len(packed)} tensors were not dequantized to {dtype} (first: {packed[0]}); "
                f"transformers {transformers.__version__} may have changed its GGUF loader"
            )
        _fix_tokenizer(tokenizer, gguf_path, model.config)
        _check_forward(model, tokenizer, torch)

        # The GGUF quantizer marks the model as "quantized and not serializable"; the weights are
        # dense now, so detaching it is truthful, and a leftover quantization_config would make
        # vLLM try to load the safetensors as GGUF.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            delattr(model.config, "quantization_config")
        # One shard: these models are at most ~0.5 GB and one file keeps loading simple.
        model.save_pretrained(str(out_dir), max_shard_size="10GB")
        if not (out_dir / "generation_config.json").exists():
            model.generation_config.save_pretrained(str(out_dir))
        tokenizer.save_pretrained(str(out_dir))
        architecture = str(model.config.architectures[0])
        model_type = str(model.config.model_type)
    finally:
        del model

    _clean_tokenizer_config(out_dir, add_bos_token=bool(tokenizer.add_bos_token))
    vocab_size = _check_saved(out_dir, tokenizer, expected_vocab_size)
    return ConversionReport(
        architecture=architecture,
        model_type=model_type,
        dtype=dtype,
        vocab_size=vocab_size,
        add_bos_token=bool(tokenizer.add_bos_token),
        chat_template=bool(getattr(tokenizer, "chat_template", None)),
        seconds=time.monotonic() - started,
    )


def _fix_tokenizer(tokenizer: Any, gguf_path: Path, config: Any) -> None:
    # transformers' GGUF tokenizer import drops `tokenizer.ggml.add_bos_token`: Gemma's would
    # encode without <bos>, and Gemma without <bos> produces garbage. Setting the property
    # rewrites tokenizer.json's post-processor, so raw `tokenizers` users get <bos> too.
    for flag in ("bos", "eos"):
        wanted = _gguf_flag(gguf_path, f"tokenizer.ggml.add_{flag}_token")
        if wanted is not None and bool(getattr(tokenizer, f"add_{flag}_token")) != wanted:
            setattr(tokenizer, f"add_{flag}_token", wanted)
    # The GGUF loader leaves "unlimited"; the real limit is the model's context.
    tokenizer.model_max_length = int(config.max_position_embeddings)


def _check_forward(model: Any, tokenizer: Any, torch: Any) -> None:
    """One forward pass: catches NaN/inf from a broken dequantization before anything is saved."""
    ids = tokenizer(_TOKENIZER_PROBES[0], return_tensors="pt").input_ids
    if tokenizer.add_bos_token and int(ids[0, 0]) != tokenizer.bos_token_id:
        raise ConversionError("the tokenizer does not prepend <bos> although the GGUF asks for it")
    with torch.no_grad():
        logits = model(ids).logits[0, -1].float()
    if not bool(torch.isfinite(logits).all()):
        raise ConversionError("the converted model produces non-finite logits")
    if math.isclose(float(logits.std()), 0.0):
        raise ConversionError("the converted model produces constant logits")


def _clean_tokenizer_config(out_dir: Path, *, add_bos_token: bool) -> None:
    path = out_dir / "tokenizer_config.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    for key in _TOKENIZER_CONFIG_NOISE:
        data.pop(key, None)
    # tokenizer.json's post-processor already adds <bos>; saying it here as well makes
    # `tokenizer.add_bos_token` report the truth after a reload (vLLM reads it).
    data["add_bos_token"] = add_bos_token
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _check_saved(out_dir: Path, hf_tokenizer: Any, expected_vocab_size: int) -> int:
    """Reload what was written the way its consumers will, and compare."""
    from tokenizers import Tokenizer

    for required in ("config.json", "generation_config.json", "tokenizer.json"):
        if not (out_dir / required).is_file():
            raise ConversionError(f"{required} was not written")
    if not any(out_dir.glob("*.safetensors")):
        raise ConversionError("no .safetensors file was written")
    config = json.loads((out_dir / "config.json").read_text(encoding="utf-8"))
    if "quantization_config" in config:
        raise ConversionError("config.json still carries a quantization_config")

    raw = Tokenizer.from_file(str(out_dir / "tokenizer.json"))
    vocab_size = raw.get_vocab_size(with_added_tokens=True)
    if vocab_size != expected_vocab_size:
        raise ConversionError(
            f"tokenizer.json has {vocab_size} tokens, expected {expected_vocab_size}"
        )
    if vocab_size > int(config["vocab_size"]):
        raise ConversionError(
            f"tokenizer has {vocab_size} tokens but the embedding only {config['vocab_size']}"
        )
    for text in _TOKENIZER_PROBES:
        ours = raw.encode(text).ids
        theirs = list(hf_tokenizer(text).input_ids)
        if ours != theirs:
            raise ConversionError(
                f"tokenizer.json and the transformers tokenizer disagree on {text!r}: "
                f"{ours} != {theirs}"
            )
        if raw.decode(ours, skip_special_tokens=True) != text:
            raise ConversionError(f"tokenizer.json does not round-trip {text!r}")
    return vocab_size
