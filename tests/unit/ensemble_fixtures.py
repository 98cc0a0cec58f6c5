"""Shared helpers for the byte-level ensemble tests: tiny tokenizers trained on a local corpus,
seeded hash "models" over any vocabulary, and a brute-force cover enumerator that shares no
code with the covering tree (it walks token sequences directly and checks canonicality with
the tokenizer's own full-text encoding)."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from functools import cache

import numpy as np
from numpy.typing import NDArray
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from service.bytelevel.byte_tables import TokenByteTable
from service.models import packaged

# The packaged models' tokenizers, where the service finds them: the one resolver of the model
# cache ($OCTOGRAPH_CACHE_DIR, else ~/.cache/octograph/models).
SMOLLM2 = packaged.model_dir("smollm2") / "tokenizer.json"
GEMMA3 = packaged.model_dir("gemma3") / "tokenizer.json"

CORPUS = (
    """\
The quick brown fox jumps over the lazy dog. We'll see whether it's true; don't worry.
They've said I'm here, you'd think we're done. Numbers: 0 1 2 12 123 1234 2024 3.14159.
def encode(text: str) -> list[int]:
    return [ord(ch) for ch in text]  # a comment

Tabs\tand  double  spaces, trailing   spaces   and\r\nwindows line endings.\r\n
Unicode: naïve café résumé, Ünïcödé, Größe, 中文字符 日本語のテキスト, 한국어 텍스트.
Emoji: 👍 👍🏽 👨‍👩‍👧 ❤️ 🎉, combining: e\u0301 a\u0308 n\u0303.
Mixed CASE words, URLs like https://example.com/path?q=1&r=2, and e-mail a.b@c.org.
The the the and and of of to to in in is is that that it it for for on on with with.
"""
    * 3
)


@cache
def tiny_byte_level(vocab_size: int = 600) -> Tokenizer:
    """GPT-2 style ByteLevel BPE (regex pre-tokenizer) trained on CORPUS."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        show_progress=False,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS.splitlines(keepends=True), trainer)
    return tok


@cache
def tiny_sentencepiece(vocab_size: int = 500, dummy_prefix: bool = False) -> Tokenizer:
    """SentencePiece-style BPE with `▁` and `<0xNN>` byte fallback.  Without a dummy prefix it
    mirrors Gemma-3 (Replace normalizer, a no-op Split pre-tokenizer); with one, Llama-2
    (Prepend + Replace normalizer, Strip decoder)."""
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.Replace(" ", "\u2581")
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        show_progress=False,
        special_tokens=["<pad>", "<eos>", "<bos>", "<unk>"],
    )
    tok.train_from_iterator(CORPUS.splitlines(keepends=True), trainer)
    spec = json.loads(tok.to_str())
    vocab: dict[str, int] = spec["model"]["vocab"]
    for b in range(256):  # byte pieces are ordinary vocabulary entries, as in SentencePiece
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    spec["model"]["byte_fallback"] = True
    spec["model"]["unk_token"] = "<unk>"
    spec["model"]["fuse_unk"] = True
    replace = {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"}
    dec = [
        {"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "},
        {"type": "ByteFallback"},
        {"type": "Fuse"},
    ]
    if dummy_prefix:
        spec["normalizer"] = {
            "type": "Sequence",
            "normalizers": [{"type": "Prepend", "prepend": "\u2581"}, replace],
        }
        spec["pre_tokenizer"] = None
        dec.append({"type": "Strip", "content": " ", "start": 1, "stop": 0})
    else:
        spec["normalizer"] = replace
        spec["pre_tokenizer"] = {
            "type": "Split",
            "pattern": {"String": " "},
            "behavior": "MergedWithPrevious",
            "invert": False,
        }
    spec["decoder"] = {"type": "Sequence", "decoders": dec}
    return Tokenizer.from_str(json.dumps(spec))


@cache
def tiny_table(kind: str) -> TokenByteTable:
    if kind == "byte_level":
        return TokenByteTable.from_tokenizer(tiny_byte_level())
    if kind == "sentencepiece":
        return TokenByteTable.from_tokenizer(tiny_sentencepiece())
    if kind == "sentencepiece_dummy":
        return TokenByteTable.from_tokenizer(tiny_sentencepiece(dummy_prefix=True))
    raise KeyError(kind)


@cache
def real_table(name: str) -> TokenByteTable:
    path = {"smollm2": SMOLLM2, "gemma3": GEMMA3}[name]
    return TokenByteTable.from_tokenizer_file(path)


def real_available(name: str) -> bool:
    """Prepared (the marker the service trusts), not merely a tokenizer.json lying there."""
    return packaged.is_prepared(name) and {"smollm2": SMOLLM2, "gemma3": GEMMA3}[name].exists()


class HashModel:
    """A seeded random n-gram "LM" over any vocabulary: the next-token logits of a path are
    `sigma` * standard normals seeded by the last `order` tokens (so it is a proper,
    deterministic conditional distribution computed on the fly, without a table)."""

    def __init__(self, vocab_size: int, seed: int = 0, sigma: float = 2.0, order: int = 2) -> None:
        self.vocab_size = vocab_size
        self.seed = seed
        self.sigma = sigma
        self.order = order
        self.calls = 0
        self._cache: dict[tuple[int, ...], NDArray[np.float64]] = {}

    def one(self, path: tuple[int, ...]) -> NDArray[np.float64]:
        key = path[-self.order :] if self.order else ()
        hit = self._cache.get(key)
        if hit is None:
            self.calls += 1
            rng = np.random.default_rng([self.seed, len(key), *key])
            x = self.sigma * rng.standard_normal(self.vocab_size)
            hit = x - np.logaddexp.reduce(x)
            self._cache[key] = hit
        return hit

    def logprobs(self, paths: Sequence[tuple[int, ...]]) -> list[NDArray[np.floating]]:
        return [self.one(p) for p in paths]


def _complete(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


class CanonicalModel:
    """`base` restricted to valid continuations (the Lemma's assumption): after a path P,
    token t keeps its mass only if P + t is a valid node prefix in the given mode (checked
    where the bytes are complete UTF-8; in mode "all" only primary ids), and stop tokens only
    where decode(P) is complete.  Renormalized over what is left."""

    def __init__(
        self,
        base: HashModel,
        table: TokenByteTable,
        tokenizer: Tokenizer,
        root: tuple[int, ...],
        mode: str = "canonical",
        probes: Sequence[str] | None = None,
    ) -> None:
        self.probes = (PROBES if table.lookahead_pretokenizer else ()) if probes is None else probes
        self.base = base
        self.table = table
        self.root = root
        self.mode = mode
        self.tok = tokenizer
        self._all_bytes = [table.token_bytes(i) for i in range(table.vocab_size)]
        self._cache: dict[tuple[int, ...], NDArray[np.float64]] = {}

    def one(self, path: tuple[int, ...]) -> NDArray[np.float64]:
        hit = self._cache.get(path)
        if hit is not None:
            return hit
        lp = self.base.one(path).copy()
        body = list(path[len(self.root) :])
        prefix = self.table.decode(body)
        texts, ids = [], []
        for t in range(self.table.vocab_size):
            tb = self._all_bytes[t]
            if not tb:
                if not _complete(prefix) or not self.table.is_stop(t):
                    lp[t] = -math.inf
                continue
            if self.mode == "all" and self.table.exact_id(tb) != t:
                lp[t] = -math.inf
                continue
            if self.mode == "canonical" and _complete(prefix + tb):
                texts.append((prefix + tb).decode("utf-8"))
                ids.append(t)
        if texts:
            encs = self.tok.encode_batch(texts, add_special_tokens=False)
            for t, enc, text in zip(ids, encs, texts, strict=True):
                if enc.ids != body + [t] and (body + [t]) not in admissible(
                    self.table, text.encode("utf-8"), self.probes
                ):
                    lp[t] = -math.inf
        lp = lp - np.logaddexp.reduce(lp)
        self._cache[path] = lp
        return lp

    def logprobs(self, paths: Sequence[tuple[int, ...]]) -> list[NDArray[np.floating]]:
        return [self.one(p) for p in paths]


PROBES = ("a", "1", ".", " ", "\n")


def admissible(table: TokenByteTable, text: bytes, probes: Sequence[str]) -> list[list[int]]:
    """Token paths (without root) that a valid node ending at the end of `text` may have:
    the canonical encoding, plus for each probe continuation z the encoding that follows the
    pre-tokenization of text + z (whole-text version of the tree's rule, written apart)."""
    enc = table._encoder
    out = [enc.encode(text.decode("utf-8"), add_special_tokens=False).ids]
    pre = enc.pre_tokenizer
    if pre is None or not probes:
        return out
    s = text.decode("utf-8")
    for z in probes:
        starts = [a for _, (a, _b) in pre.pre_tokenize_str(s + z) if a < len(s)]
        b = len(s[: starts[-1]].encode("utf-8")) if starts else 0
        head = enc.encode(text[:b].decode("utf-8"), add_special_tokens=False).ids if b else []
        tail = enc.encode(text[b:].decode("utf-8"), add_special_tokens=False).ids
        out.append(head + tail)
    return out


class BruteForce:
    """Enumerates valid nodes by depth-first search over token sequences (no tree, no
    reductions) and sums covers directly."""

    def __init__(
        self,
        table: TokenByteTable,
        model: HashModel | CanonicalModel,
        root: tuple[int, ...] = (),
        mode: str = "canonical",
        probes: Sequence[str] | None = None,
    ) -> None:
        self.table = table
        self.model = model
        self.root = root
        self.mode = mode
        self.probes = (PROBES if table.lookahead_pretokenizer else ()) if probes is None else probes
        self.all_bytes = [table.token_bytes(i) for i in range(table.vocab_size)]
        self.by_bytes: dict[bytes, list[int]] = {}
        for i, tb in enumerate(self.all_bytes):
            if tb:
                self.by_bytes.setdefault(tb, []).append(i)
        self.by_first: dict[int, list[int]] = {}
        for i, tb in enumerate(self.all_bytes):
            if tb:
                self.by_first.setdefault(tb[0], []).append(i)

    def _valid(self, body: list[int], text: bytes) -> bool:
        if body == self.table._encoder.encode(text.decode("utf-8"), add_special_tokens=False).ids:
            return True
        return body in admissible(self.table, text, self.probes)

    def nodes(self, text: bytes) -> list[tuple[tuple[int, ...], int, float]]:
        out: list[tuple[tuple[int, ...], int, float]] = []
        n = len(text)

        def dfs(path: tuple[int, ...], j: int, mass: float) -> None:
            out.append((path, j, mass))
            if j == n:
                return
            lp = self.model.one(path)
            for end in range(j + 1, n + 1):
                for tid in self.by_bytes.get(text[j:end], []):
                    if self.mode == "all" and self.table.exact_id(text[j:end]) != tid:
                        continue
                    if lp[tid] == -math.inf:
                        continue
                    child = path + (tid,)
                    if (
                        self.mode == "canonical"
                        and _complete(text[:end])
                        and not self._valid(list(child[len(self.root) :]), text[:end])
                    ):
                        continue
                    dfs(child, end, mass + float(lp[tid]))

        dfs(self.root, 0, 0.0)
        return out

    def logits(self, text: bytes) -> tuple[NDArray[np.float64], float]:
        """(log V(text c) for c < 256 and log S(text) at 256, log V(text))."""
        n = len(text)
        acc = np.zeros(257)
        v = 0.0
        for path, j, mass in self.nodes(text):
            lp = self.model.one(path)
            rest = text[j:]
            if j == n:
                if _complete(text):
                    acc[256] += math.exp(mass) * float(np.exp(lp[self.table.stop_ids]).sum())
                for c, ids in self.by_first.items():
                    acc[c] += math.exp(mass) * float(np.exp(lp[ids]).sum())
                continue
            for t in self.by_first.get(rest[0], []):
                tb = self.all_bytes[t]
                if tb.startswith(rest):
                    p = math.exp(mass + float(lp[t]))
                    v += p
                    if len(tb) > len(rest):
                        acc[tb[len(rest)]] += p
        with np.errstate(divide="ignore"):
            logs = np.log(acc)
        return logs, (math.log(v) if n else 0.0)
