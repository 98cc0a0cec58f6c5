"""What the gateway needs, per member model, to run byte-level generation: its token byte
table, its prompt tokenizer (chat template or plain transcript), its context length.

Loaded once per model from the model directory (packaged name, path, or the directory the
worker reports), in a thread, shared by every request; concurrent first requests wait on one
load.  The gateway starts loading its ensembles' members when it is built.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from service.bytelevel.byte_tables import TokenByteTable
from service.chat_template import prompt_token_ids
from service.errors import BadRequest, Unavailable
from service.gateway.clients.pool import WorkerPools
from service.graph.schema import GraphConfig
from service.heap import release_freed_memory
from service.protocol.internal import GenerateRequest

log = logging.getLogger(__name__)
# One import at a time: transformers' lazy module is not safe to import from two threads at
# once (the preload thread and a request can race; the loser sees a half-built module).
_TRANSFORMERS_IMPORT = threading.Lock()


class PromptEncoder(Protocol):
    """Prompt token ids of a generate request for one model."""

    @property
    def has_chat_template(self) -> bool: ...

    @property
    def start_id(self) -> int | None:
        """A token to put before a prompt that has no special token to start from (BOS,
        else the document separator), so the whole prompt text can be re-opened."""
        ...

    def encode(self, request: GenerateRequest) -> list[int]: ...


@dataclass(frozen=True)
class MemberAssets:
    model: str
    table: TokenByteTable
    prompts: PromptEncoder
    max_model_len: int


class HFPromptEncoder:
    """The worker's own prompt rendering (service/chat_template.py) on a `transformers`
    tokenizer loaded from the model directory, so gateway and worker agree on the ids."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self._start_id = _document_start(tokenizer)

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    @property
    def start_id(self) -> int | None:
        return self._start_id

    def encode(self, request: GenerateRequest) -> list[int]:
        if request.prompt_token_ids is not None:
            raise BadRequest(
                "byte-level generation needs text prompts: token ids belong to one vocabulary",
                param="prompt",
            )
        ids, _ = prompt_token_ids(self.tokenizer, request)
        return [int(i) for i in ids]


def _document_start(tokenizer: Any) -> int | None:
    """The token a document starts after: the BOS the tokenizer adds itself (Gemma), else the
    document separator a base model was trained with (SmolLM2's `<|endoftext|>`; its "BOS"
    `<|im_start|>` opens a chat turn, not a document)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    ids = tokenizer.encode("a", add_special_tokens=True)
    if isinstance(bos, int) and ids and ids[0] == bos:
        return bos
    vocab = tokenizer.get_vocab()
    for name in ("<|endoftext|>", "</s>", "<eos>"):
        if name in vocab:
            return int(vocab[name])
    eos = getattr(tokenizer, "eos_token_id", None)
    return eos if isinstance(eos, int) else (bos if isinstance(bos, int) else None)


# The named special tokens a chat template sees as variables (transformers'
# SPECIAL_TOKENS_ATTRIBUTES: `special_tokens_map`, v5).
_SPECIAL_TOKEN_NAMES = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)


class LightTokenizer:
    """What prompt encoding needs of a `transformers` tokenizer (chat_template.HFTokenizer:
    encode, apply_chat_template, the special ids), on the `tokenizers` library alone, read
    from the model directory as transformers reads it (tokenizer.json, tokenizer_config.json,
    chat_template.jinja) and rendered by transformers' own Jinja renderer.

    `AutoTokenizer` held ~0.45 GB in the gateway for Gemma-3 (transformers v5 keeps the
    vocabulary and 515k merges as Python objects besides the Rust tokenizer) and imported
    torch (~0.25 GB); this is the Rust tokenizer (~0.1 GB) and no torch.
    tests/unit/test_light_tokenizer.py holds it equal to AutoTokenizer on the packaged models.
    """

    def __init__(self, model_dir: Path) -> None:
        import json

        from tokenizers import Tokenizer

        self._tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        config_path = model_dir / "tokenizer_config.json"
        config: dict[str, Any] = (
            json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
        )
        template_path = model_dir / "chat_template.jinja"
        template = (
            template_path.read_text(encoding="utf-8")
            if template_path.is_file()
            else config.get("chat_template")
        )
        if isinstance(template, list):  # [{"name": ..., "template": ...}]: the default one
            named = {t.get("name"): t.get("template") for t in template}
            template = named.get("default")
        self.chat_template: str | None = template or None
        self.special_tokens_map: dict[str, str] = {}
        for name in _SPECIAL_TOKEN_NAMES:
            value = config.get(name)
            if isinstance(value, dict):
                value = value.get("content")
            if isinstance(value, str) and value:
                self.special_tokens_map[name] = value
        self.bos_token_id = self._token_id("bos_token")
        self.eos_token_id = self._token_id("eos_token")

    def _token_id(self, name: str) -> int | None:
        text = self.special_tokens_map.get(name)
        return None if text is None else self._tokenizer.token_to_id(text)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self._tokenizer.encode(text, add_special_tokens=add_special_tokens).ids)

    def get_vocab(self) -> dict[str, int]:
        return dict(self._tokenizer.get_vocab(with_added_tokens=True))

    def apply_chat_template(
        self,
        conversation: list[dict[str, Any]],
        *,
        tokenize: bool = False,
        add_generation_prompt: bool = False,
        tools: list[dict[str, Any]] | None = None,
        **kwargs: Any,
    ) -> str:
        if tokenize:
            raise NotImplementedError("render, then encode")
        if not self.chat_template:
            raise ValueError("this tokenizer has no chat template")
        with _TRANSFORMERS_IMPORT:
            # transformers.utils imports no torch; the renderer is the one apply_chat_template
            # uses (sandboxed Jinja, trim_blocks/lstrip_blocks, raise_exception, tojson...).
            from transformers.utils.chat_template_utils import render_jinja_template
        # Returns (rendered conversations, generation indices); annotated as str upstream.
        out: Any = render_jinja_template(
            conversations=[conversation],
            tools=list(tools) if tools is not None else None,
            chat_template=self.chat_template,
            add_generation_prompt=add_generation_prompt,
            **{**self.special_tokens_map, **kwargs},
        )
        return str(out[0][0])


def load_member_assets(model: str, model_dir: Path, max_model_len: int) -> MemberAssets:
    """Blocking: parses tokenizer files (Gemma's table is cached as .npz after the first; its
    canonical encoder is still built from tokenizer.json, here rather than on first use)."""
    table = TokenByteTable.from_tokenizer_file(model_dir / "tokenizer.json")
    table.load_encoder()
    tokenizer = LightTokenizer(model_dir)
    release_freed_memory()  # the JSON parses' garbage: ~0.3 GB for Gemma-3 (service/heap.py)
    return MemberAssets(model, table, HFPromptEncoder(tokenizer), max_model_len)


AssetFactory = Callable[[str], MemberAssets]


class AssetCache:
    """Per-model assets, loaded once (a lock per model; a failed load is retried by the next
    request).  `factory` (tests) replaces loading from model directories.  `preload` starts
    loading, in a background thread, the members whose directory is known from the graph, so
    the first ensemble request does not pay for parsing tokenizers (tens of seconds here).

    One cache per graph runtime; `previous` (the runtime a reload replaces) shares its loaded
    assets, keyed by the model's spec: a reload that changes a system prompt parses nothing
    again, a model whose spec changed is loaded anew, and a model no longer in the graph is
    forgotten (requests still running on it keep their own reference)."""

    def __init__(
        self,
        graph: GraphConfig,
        pools: WorkerPools | None,
        factory: AssetFactory | None = None,
        *,
        previous: AssetCache | None = None,
    ) -> None:
        self.graph = graph
        self.pools = pools
        self.factory: AssetFactory | None = factory
        if factory is None and previous is not None:
            self.factory = previous.factory
        self._store: _AssetStore = previous._store if previous is not None else _AssetStore()
        self._keys = {
            name: (name, spec.model_dump_json()) for name, spec in graph.worker_models().items()
        }
        self._store.retain(set(self._keys.values()))

    def _key(self, model: str) -> tuple[str, str]:
        return self._keys.get(model, (model, ""))

    def preload(self, models: list[str]) -> None:
        known = [
            m
            for m in models
            if (spec := self.graph.worker_models().get(m)) and (spec.packaged or spec.path)
        ]
        if not known:
            return

        def run() -> None:
            for model in known:
                try:
                    self._get_blocking(model, self._static_dir(model))
                except Exception as exc:  # the request that needs it will report it
                    log.warning(
                        "byte tables not preloaded", extra={"model": model, "error": str(exc)}
                    )

        threading.Thread(target=run, name="ensemble-preload", daemon=True).start()

    async def get(self, model: str) -> MemberAssets:
        hit = self._store.assets.get(self._key(model))
        if hit is not None:
            return hit
        model_dir = None if self.factory is not None else self._model_dir(model)
        return await asyncio.to_thread(self._get_blocking, model, model_dir)

    def _get_blocking(self, model: str, model_dir: Path | None) -> MemberAssets:
        key = self._key(model)
        store = self._store
        with store.guard:
            lock = store.locks.setdefault(key, threading.Lock())
        with lock:
            hit = store.assets.get(key)
            if hit is None:
                hit = store.assets[key] = self._load(model, model_dir)
            return hit

    def _static_dir(self, model: str) -> Path:
        from service.models.resolve import ModelNotFound, resolve_model_dir

        spec = self.graph.worker_models().get(model)
        if spec is None:
            raise Unavailable(
                f"model '{model}' is not served by an Octograph worker: "
                "byte-level generation needs /internal/byte-dist"
            )
        name = spec.packaged or spec.path
        if not name:
            raise Unavailable(f"model '{model}' has no `packaged` name or `path`")
        try:
            return resolve_model_dir(name)
        except ModelNotFound as exc:
            raise Unavailable(f"model '{model}': {exc}") from None

    def _model_dir(self, model: str) -> Path:
        spec = self.graph.worker_models().get(model)
        if spec is not None and (spec.packaged or spec.path):
            return self._static_dir(model)
        info = self.pools[model].info() if self.pools is not None and spec is not None else None
        if info is not None and Path(info.model_dir, "tokenizer.json").is_file():
            return Path(info.model_dir)
        raise Unavailable(
            f"model '{model}' has no tokenizer files on this gateway (byte-level generation "
            "needs them: give the model a `path` or `packaged` name)"
        )

    def _load(self, model: str, model_dir: Path | None) -> MemberAssets:
        if self.factory is not None:
            return self.factory(model)
        assert model_dir is not None
        spec = self.graph.worker_models()[model]
        log.info("loading byte tables", extra={"model": model, "dir": str(model_dir)})
        return load_member_assets(model, model_dir, spec.max_model_len)


class _AssetStore:
    """The loaded assets shared by the caches of successive graph runtimes, by (model, spec)."""

    def __init__(self) -> None:
        self.assets: dict[tuple[str, str], MemberAssets] = {}
        self.locks: dict[tuple[str, str], threading.Lock] = {}
        self.guard = threading.Lock()

    def retain(self, keys: set[tuple[str, str]]) -> None:
        with self.guard:
            for key in [k for k in self.assets if k not in keys and k[1]]:
                del self.assets[key]
            for key in [k for k in self.locks if k not in keys and k[1]]:
                del self.locks[key]
