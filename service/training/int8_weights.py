"""Int8 weights for a scoring router: W8A8 in the compressed-tensors format vLLM loads.

A route is one forward over a query's few tokens, and on a CPU that forward reads every weight
once: int8 weights are half of bfloat16's bytes, and vLLM runs them with per-token dynamic int8
activations (oneDNN on CPU, CUTLASS on a GPU). The router is built with that arithmetic in the
loop: the frozen backbone is quantized before the training features are computed (weights
rounded per output channel, each Linear's input rounded per token, as vLLM will), so the
functional tokens are trained on the hidden states the served model produces.

What stays unquantized: the embeddings (the tied output layer: the functional-token rows are
the classifier), the norms, and the modules the build trains (the top MLP with
`tune_top_mlp`, the top attention with `tune_top_attention`), which keep their trained
weights exactly.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

# The decoder's Linear layers of a Llama-style model (what gets int8 weights).
QUANTIZED_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
INT8_MAX = 127.0


def quantization_config(kept: Iterable[str]) -> dict[str, Any]:
    """The config.json entry: symmetric int8, per-channel weights, per-token dynamic inputs."""
    return {
        "quant_method": "compressed-tensors",
        "format": "int-quantized",
        "quantization_status": "compressed",
        "ignore": ["lm_head", *sorted(kept)],
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "weights": {
                    "num_bits": 8,
                    "type": "int",
                    "symmetric": True,
                    "strategy": "channel",
                    "dynamic": False,
                },
                "input_activations": {
                    "num_bits": 8,
                    "type": "int",
                    "symmetric": True,
                    "strategy": "token",
                    "dynamic": True,
                },
            }
        },
    }


def quantize_rows(weight: Any) -> tuple[Any, Any]:
    """Per-output-channel symmetric int8: (int8 [N, K], float32 scale [N, 1])."""
    import torch

    w = weight.detach().float()
    scale = w.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / INT8_MAX
    q = torch.round(w / scale).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q, scale


def _fake_quantize_input(_module: Any, args: tuple[Any, ...]) -> tuple[Any, ...]:
    """A Linear's input rounded to int8 per token (dynamic, symmetric), as vLLM serves it."""
    import torch

    x = args[0]
    scale = x.abs().amax(dim=-1, keepdim=True).clamp(min=1e-12) / INT8_MAX
    rounded = torch.round(x / scale).clamp(-INT8_MAX, INT8_MAX) * scale
    return (rounded.to(x.dtype), *args[1:])


def quantized_linears(model: Any, kept: Iterable[str]) -> dict[str, Any]:
    """Module name -> Linear for every decoder Linear that gets int8 weights."""
    skip = set(kept)
    return {
        name: module
        for name, module in model.named_modules()
        if name.rsplit(".", 1)[-1] in QUANTIZED_LINEARS and name not in skip
    }


def simulate_int8(model: Any, kept: Iterable[str]) -> list[Any]:
    """Make `model` compute as the int8 checkpoint will: each quantized Linear's weight is
    replaced by its int8 rounding (exactly representable, so `write_int8` recovers the same
    integers) and its input is rounded per token. Returns the hooks (removable)."""
    import torch

    hooks = []
    with torch.no_grad():
        for module in quantized_linears(model, kept).values():
            q, scale = quantize_rows(module.weight)
            module.weight.copy_((q.float() * scale).to(module.weight.dtype))
            hooks.append(module.register_forward_pre_hook(_fake_quantize_input))
    return hooks


def int8_tensors(model: Any, kept: Iterable[str]) -> dict[str, Any]:
    """The checkpoint tensors of the quantized Linears: `<name>.weight` (int8) and
    `<name>.weight_scale` (float32). Taken before the model is cast to its save dtype, so that
    a simulated model's integers come back exactly."""
    tensors = {}
    for name, module in quantized_linears(model, kept).items():
        q, scale = quantize_rows(module.weight)
        tensors[f"{name}.weight"] = q.contiguous()
        tensors[f"{name}.weight_scale"] = scale.contiguous()
    return tensors


def write_int8(model_dir: Path, quantized: dict[str, Any], kept: Iterable[str]) -> None:
    """Put `quantized` (int8_tensors) into the saved checkpoint of `model_dir`, in place of
    those Linears' weights, and add the quantization config."""
    from safetensors.torch import load_file, save_file

    path = model_dir / "model.safetensors"
    if not path.is_file():  # save_pretrained shards only models far larger than a router
        raise ValueError(f"{model_dir}: expected one model.safetensors to quantize")
    tensors = load_file(str(path))
    missing = sorted(n for n in quantized if n.endswith(".weight") and n not in tensors)
    if missing:
        raise ValueError(f"{model_dir}: no weights named {missing[:3]}")
    tensors.update(quantized)
    save_file(tensors, str(path), metadata={"format": "pt"})
    config_path = model_dir / "config.json"
    config = json.loads(config_path.read_text())
    config["quantization_config"] = quantization_config(kept)
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
