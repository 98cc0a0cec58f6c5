"""Exact bytes of every token of a `tokenizers` BPE vocabulary, laid out for prefix queries.

Two vocabulary spellings are supported, both read from `tokenizer.json`:

* **ByteLevel** (GPT-2, SmolLM2): every token is a string over GPT-2's 256-character
  `bytes_to_unicode` alphabet; inverting that map gives the token's bytes exactly.
* **SentencePiece style** (Gemma, Llama-2): pieces spell spaces as the meta symbol `▁`
  (U+2581, bytes E2 96 81) which stands for 0x20, and with `byte_fallback` the pieces
  `<0xNN>` stand for the single byte NN.  A *dummy prefix* (Metaspace `prepend_scheme`
  "always"/"first" or a `Prepend("▁")` normalizer) is a tokenizer property recorded in
  `dummy_prefix`; token bytes are always the unstripped ones (a decoder `Strip` only
  removes that prefix at text start, which the covering tree models as a consumed space).

Special added tokens produce no bytes: they are kept apart in `special_ids`, and the ones that
end the byte stream form `stop_ids` (all specials unless told otherwise).  Non-special added
tokens (Gemma's `\\n\\n`, `<table>`) produce their content's bytes.

For reductions the byte-producing tokens are sorted by bytes, so "tokens whose bytes start
with b" is one contiguous range found by bisection, and inside it the tokens continuing with
byte c form consecutive sub-ranges (`byte_at` gives each token's k-th byte).  Among tokens
with identical bytes (SentencePiece `<0x41>` beside `A`) the *primary* one, the one the
tokenizer itself produces for those bytes, sorts first; it is the one `exact_id` returns.

Building Gemma's table parses a 33 MB JSON; the arrays are cached as `.npz` keyed by the
tokenizer file's SHA-256, so later loads skip the parse.  `encode` builds a continuation-mode
tokenizer lazily (no dummy prefix, no BOS, special-token text encoded as plain text).
"""

from __future__ import annotations

import bisect
import hashlib
import json
import os
import re
import tempfile
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray
from tokenizers import Tokenizer

TokenizerKind = Literal["byte_level", "sentencepiece"]

# Bump when the cached layout or the byte semantics change.
_CACHE_VERSION = "octograph-byte-table-v2"
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")
_META = "\u2581"


def default_cache_dir() -> Path:
    """Where built tables are cached (OCTOGRAPH_CACHE_DIR overrides ~/.cache/octograph)."""
    root = os.environ.get("OCTOGRAPH_CACHE_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "octograph"
    )
    return Path(root) / "byte_tables"


def gpt2_bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map used by ByteLevel tokenizers."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("\u00a1"), ord("\u00ac") + 1))
        + list(range(ord("\u00ae"), ord("\u00ff") + 1))
    )
    cs = list(bs)
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs, strict=True)}


_UNICODE_TO_BYTE = {c: b for b, c in gpt2_bytes_to_unicode().items()}


def _components(node: Any) -> list[dict[str, Any]]:
    """Flatten a normalizer / pre-tokenizer / decoder (possibly a Sequence) into a list."""
    if not isinstance(node, dict):
        return []
    for key in ("normalizers", "pretokenizers", "decoders", "processors"):
        if isinstance(node.get(key), list):
            return [c for child in node[key] for c in _components(child)]
    return [node]


def _replace_pair(comp: dict[str, Any]) -> tuple[str, str] | None:
    if comp.get("type") != "Replace":
        return None
    pattern = comp.get("pattern", {})
    return (str(pattern.get("String", "")), str(comp.get("content", "")))


def _detect_kind(spec: dict[str, Any]) -> tuple[TokenizerKind, str]:
    """Which spelling the vocabulary uses, and the SentencePiece meta symbol if any."""
    parts = _components(spec.get("pre_tokenizer")) + _components(spec.get("decoder"))
    if any(c.get("type") == "ByteLevel" for c in parts):
        return "byte_level", ""
    for comp in parts + _components(spec.get("normalizer")):
        if comp.get("type") == "Metaspace":
            return "sentencepiece", str(comp.get("replacement", _META))
        pair = _replace_pair(comp)
        if pair == (" ", _META) or pair == (_META, " "):
            return "sentencepiece", _META
    raise ValueError("unsupported tokenizer: neither ByteLevel nor SentencePiece-style (▁)")


def _has_lookahead(spec: dict[str, Any]) -> bool:
    """Whether pre-token boundaries can depend on later text (regex splits such as GPT-2's
    `\\s+(?!\\S)`); plain string splits and Metaspace cannot."""
    for comp in _components(spec.get("pre_tokenizer")):
        kind = comp.get("type")
        if kind == "ByteLevel" and comp.get("use_regex", True):
            return True
        if kind == "Split" and "Regex" in (comp.get("pattern") or {}):
            return True
    return False


def _check_normalizer(spec: dict[str, Any]) -> None:
    """Unicode normalizers change the byte domain (members would score different strings)."""
    for comp in _components(spec.get("normalizer")):
        if comp.get("type") not in ("Replace", "Prepend"):
            raise ValueError(
                f"unsupported normalizer {comp.get('type')!r}: byte semantics "
                "would apply to normalized text"
            )


def continuation_spec(spec: dict[str, Any]) -> dict[str, Any]:
    """The tokenizer as it encodes text in the middle of a document: no dummy prefix, no
    BOS/EOS template, no truncation or padding."""
    out = dict(spec)  # shallow: the model (megabytes) is shared, not copied
    for key in ("normalizer", "pre_tokenizer"):
        out[key] = json.loads(json.dumps(spec.get(key)))
    out["post_processor"] = None
    out["truncation"] = None
    out["padding"] = None

    def strip_prefix(node: Any) -> Any:
        if not isinstance(node, dict):
            return node
        if node.get("type") == "Metaspace":
            node["prepend_scheme"] = "never"
            node["add_prefix_space"] = False
        if node.get("type") == "ByteLevel":
            node["add_prefix_space"] = False
        for key in ("normalizers", "pretokenizers"):
            if isinstance(node.get(key), list):
                node[key] = [strip_prefix(c) for c in node[key] if c.get("type") != "Prepend"]
        return node

    normalizer = out.get("normalizer")
    if isinstance(normalizer, dict) and normalizer.get("type") == "Prepend":
        out["normalizer"] = None
    else:
        out["normalizer"] = strip_prefix(normalizer)
    out["pre_tokenizer"] = strip_prefix(out.get("pre_tokenizer"))
    return out


def _vocab_token_bytes(token: str, kind: TokenizerKind, meta: str, byte_fallback: bool) -> bytes:
    if kind == "byte_level":
        try:
            return bytes(_UNICODE_TO_BYTE[ch] for ch in token)
        except KeyError:
            # Not spelled in the byte alphabet (rare stray entries): take its UTF-8.
            return token.encode("utf-8")
    if byte_fallback:
        match = _BYTE_PIECE.fullmatch(token)
        if match:
            return bytes([int(match.group(1), 16)])
    return token.replace(meta, " ").encode("utf-8") if meta else token.encode("utf-8")


class TokenByteTable:
    """Bytes of every token id plus sorted-prefix structures (see the module docstring)."""

    def __init__(
        self,
        *,
        vocab_size: int,
        kind: TokenizerKind,
        dummy_prefix: bool,
        sorted_ids: NDArray[np.int32],
        sorted_offsets: NDArray[np.int64],
        sorted_buf: NDArray[np.uint8],
        special_ids: NDArray[np.int32],
        stop_ids: NDArray[np.int32],
        spec_source: Path | str,
        native_is_continuation: bool = False,
        lookahead_pretokenizer: bool = False,
    ) -> None:
        self.vocab_size = vocab_size
        self.kind: TokenizerKind = kind
        self.dummy_prefix = dummy_prefix
        self.sorted_ids = sorted_ids
        self.sorted_offsets = sorted_offsets
        self.sorted_buf = sorted_buf
        self.special_ids = special_ids
        self.stop_ids = stop_ids
        # Path to tokenizer.json, or the JSON text itself (tables built from a Tokenizer).
        self._spec_source = spec_source
        # True when the file's own tokenizer already encodes like mid-document text, so the
        # lazy encoder can skip parsing and rewriting the JSON.
        self._native_is_continuation = native_is_continuation
        self.lookahead_pretokenizer = lookahead_pretokenizer
        buf = sorted_buf.tobytes()
        offs = sorted_offsets.tolist()
        self._sorted_bytes: list[bytes] = [
            buf[a:b] for a, b in zip(offs[:-1], offs[1:], strict=True)
        ]
        self.sorted_lens: NDArray[np.int64] = np.diff(sorted_offsets)
        rank = np.full(vocab_size, -1, dtype=np.int64)
        rank[sorted_ids] = np.arange(len(sorted_ids))
        self.rank = rank
        self.max_token_bytes = int(self.sorted_lens.max()) if len(sorted_ids) else 0
        # first_byte_bounds[c]..[c+1]: sorted positions of tokens starting with byte c.
        firsts = sorted_buf[sorted_offsets[:-1]]
        self.first_byte_bounds: NDArray[np.int64] = np.searchsorted(
            firsts, np.arange(257), side="left"
        ).astype(np.int64)
        # single_byte_pos[c]: sorted position of the primary token whose bytes are [c], or -1.
        single = np.full(256, -1, dtype=np.int64)
        starts = self.first_byte_bounds[:256]
        ok = starts < self.first_byte_bounds[1:]
        ok[ok] = self.sorted_lens[starts[ok]] == 1
        single[ok] = starts[ok]
        self.single_byte_pos = single
        # second_byte_bounds[c0, c]..[c0, c+1]: tokens starting with bytes (c0, c), relative
        # to nothing (absolute sorted positions).  Queries with one partial byte are the
        # widest after the root one (" " prefixes 137k of Gemma's pieces), so they get a table.
        second = np.empty((256, 257), dtype=np.int64)
        for c0 in range(256):
            lo, hi = int(self.first_byte_bounds[c0]), int(self.first_byte_bounds[c0 + 1])
            # Tokens equal to bytes([c0]) (SentencePiece may have two) are not continuations.
            lo += int(np.searchsorted(self.sorted_lens[lo:hi] != 1, True))
            column = sorted_buf[sorted_offsets[lo:hi] + 1]
            second[c0, :256] = lo + np.searchsorted(column, np.arange(256), side="left")
            second[c0, 256] = hi
        self.second_byte_bounds = second
        self._stop_set = frozenset(int(i) for i in stop_ids)
        self._special_set = frozenset(int(i) for i in special_ids)

    # ----------------------------------------------------------------- construction
    @classmethod
    def from_tokenizer_file(
        cls,
        path: str | os.PathLike[str],
        *,
        stop_tokens: list[str] | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
        use_cache: bool = True,
    ) -> TokenByteTable:
        """Load from `tokenizer.json`, through the `.npz` cache unless `use_cache` is False."""
        path = Path(path)
        raw = path.read_bytes()
        key = hashlib.sha256(
            raw + _CACHE_VERSION.encode() + json.dumps(stop_tokens).encode()
        ).hexdigest()[:32]
        cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        cached = cache / f"{key}.npz"
        if use_cache and cached.exists():
            try:
                return cls._load_npz(cached, path)
            except (OSError, ValueError, KeyError):
                pass  # a torn or stale file: rebuild below
        table = cls._build(json.loads(raw), path, stop_tokens, raw.decode("utf-8"))
        if use_cache:
            table._save_npz(cached)
        return table

    @classmethod
    def from_tokenizer(
        cls, tokenizer: Tokenizer, *, stop_tokens: list[str] | None = None
    ) -> TokenByteTable:
        """Build (uncached) from an in-memory `tokenizers.Tokenizer`."""
        text = tokenizer.to_str()
        return cls._build(json.loads(text), text, stop_tokens, text)

    @classmethod
    def _build(
        cls, spec: dict[str, Any], source: Path | str, stop_tokens: list[str] | None, raw: str
    ) -> TokenByteTable:
        model = spec.get("model", {})
        if model.get("type") != "BPE":
            raise ValueError(f"unsupported tokenizer model {model.get('type')!r} (BPE only)")
        _check_normalizer(spec)
        kind, meta = _detect_kind(spec)
        byte_fallback = bool(model.get("byte_fallback"))
        vocab: dict[str, int] = model["vocab"]
        added: list[dict[str, Any]] = spec.get("added_tokens") or []
        size = max([*vocab.values(), *(a["id"] for a in added)]) + 1
        token_bytes: list[bytes | None] = [None] * size
        for tok, tid in vocab.items():
            token_bytes[tid] = _vocab_token_bytes(tok, kind, meta, byte_fallback)
        specials: set[int] = set()
        names: dict[str, int] = {}
        for a in added:
            tid = int(a["id"])
            names[str(a["content"])] = tid
            if a.get("special"):
                specials.add(tid)
                token_bytes[tid] = None
            else:
                content = str(a["content"])
                token_bytes[tid] = (content.replace(meta, " ") if meta else content).encode()
        unk = model.get("unk_token")
        if unk is not None and unk in vocab:
            specials.add(vocab[unk])
            token_bytes[vocab[unk]] = None
        for tid, tb in enumerate(token_bytes):
            if not tb:  # holes in the id space and empty tokens never produce bytes
                specials.add(tid)
                token_bytes[tid] = None
        if stop_tokens is None:
            stops = sorted(specials)
        else:
            missing = [n for n in stop_tokens if names.get(n) not in specials]
            if missing:
                raise ValueError(f"stop tokens are not special tokens: {missing}")
            stops = sorted(names[n] for n in stop_tokens)

        native, tokenizer = _load_tokenizers(spec, raw)
        present = {i: tb for i, tb in enumerate(token_bytes) if tb is not None}
        byte_ids = sorted(present, key=present.__getitem__)
        _primary_first(byte_ids, token_bytes, tokenizer)
        lens = np.array([len(token_bytes[i] or b"") for i in byte_ids], dtype=np.int64)
        offsets = np.zeros(len(byte_ids) + 1, dtype=np.int64)
        np.cumsum(lens, out=offsets[1:])
        buf = np.frombuffer(b"".join(token_bytes[i] or b"" for i in byte_ids), dtype=np.uint8)
        probe = native.encode("a", add_special_tokens=False).ids
        dummy = b"".join(token_bytes[i] or b"" for i in probe).startswith(b" ")
        table = cls(
            vocab_size=size,
            kind=kind,
            dummy_prefix=dummy,
            sorted_ids=np.array(byte_ids, dtype=np.int32),
            sorted_offsets=offsets,
            sorted_buf=buf.copy(),
            special_ids=np.array(sorted(specials), dtype=np.int32),
            stop_ids=np.array(stops, dtype=np.int32),
            spec_source=source,
            native_is_continuation=native is tokenizer,
            lookahead_pretokenizer=_has_lookahead(spec),
        )
        table.__dict__["_encoder"] = tokenizer  # already built: seed the cached_property
        return table

    def _save_npz(self, target: Path) -> None:
        target.parent.mkdir(parents=True, exist_ok=True)
        meta = json.dumps(
            {
                "vocab_size": self.vocab_size,
                "kind": self.kind,
                "dummy_prefix": self.dummy_prefix,
                "native_is_continuation": self._native_is_continuation,
                "lookahead_pretokenizer": self.lookahead_pretokenizer,
            }
        )
        # Write to a temporary file and rename, so a concurrent reader never sees half a file.
        fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".npz")
        try:
            with os.fdopen(fd, "wb") as fh:
                np.savez(
                    fh,
                    sorted_ids=self.sorted_ids,
                    sorted_offsets=self.sorted_offsets,
                    sorted_buf=self.sorted_buf,
                    special_ids=self.special_ids,
                    stop_ids=self.stop_ids,
                    meta=np.frombuffer(meta.encode(), np.uint8),
                )
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    @classmethod
    def _load_npz(cls, cached: Path, source: Path) -> TokenByteTable:
        with np.load(cached) as z:
            meta = json.loads(z["meta"].tobytes().decode())
            return cls(
                vocab_size=int(meta["vocab_size"]),
                kind=meta["kind"],
                dummy_prefix=bool(meta["dummy_prefix"]),
                sorted_ids=z["sorted_ids"],
                sorted_offsets=z["sorted_offsets"],
                sorted_buf=z["sorted_buf"],
                special_ids=z["special_ids"],
                stop_ids=z["stop_ids"],
                spec_source=source,
                native_is_continuation=bool(meta.get("native_is_continuation")),
                lookahead_pretokenizer=bool(meta.get("lookahead_pretokenizer")),
            )

    # ----------------------------------------------------------------- queries
    def token_bytes(self, token_id: int) -> bytes:
        """Bytes of one token; b"" for special tokens."""
        pos = int(self.rank[token_id])
        return self._sorted_bytes[pos] if pos >= 0 else b""

    def decode(self, ids: list[int] | tuple[int, ...]) -> bytes:
        """Concatenated bytes (specials contribute nothing; no dummy-prefix stripping)."""
        return b"".join(self.token_bytes(i) for i in ids)

    def is_special(self, token_id: int) -> bool:
        return token_id in self._special_set

    def is_stop(self, token_id: int) -> bool:
        return token_id in self._stop_set

    def prefix_range(self, prefix: bytes) -> tuple[int, int]:
        """Sorted positions [lo, hi) of the tokens whose bytes start with `prefix`."""
        if not prefix:
            return 0, len(self._sorted_bytes)
        lo = bisect.bisect_left(self._sorted_bytes, prefix)
        upper = _successor(prefix)
        if upper is None:
            return lo, len(self._sorted_bytes)
        return lo, bisect.bisect_left(self._sorted_bytes, upper, lo)

    def extensions(self, prefix: bytes) -> int:
        """How many tokens strictly extend `prefix` (start with it and are longer)."""
        lo, hi = self.prefix_range(prefix)
        return hi - bisect.bisect_right(self._sorted_bytes, prefix, lo, hi)

    def exact_id(self, data: bytes) -> int | None:
        """The primary token whose bytes equal `data`, if any."""
        lo, hi = self.prefix_range(data)
        if lo < hi and self.sorted_lens[lo] == len(data):
            return int(self.sorted_ids[lo])
        return None

    def byte_at(self, lo: int, hi: int, k: int) -> NDArray[np.int64]:
        """Byte k of each token at sorted positions [lo, hi); 256 where the token is shorter."""
        lens = self.sorted_lens[lo:hi]
        if lens.size and int(lens.min()) > k:  # the common case: no mask needed
            return self.sorted_buf[self.sorted_offsets[lo:hi] + k].astype(np.int64)
        out = np.full(hi - lo, 256, dtype=np.int64)
        has = lens > k
        out[has] = self.sorted_buf[self.sorted_offsets[lo:hi][has] + k]
        return out

    # ----------------------------------------------------------------- encoding
    @cached_property
    def _encoder(self) -> Tokenizer:
        if isinstance(self._spec_source, Path):
            raw = self._spec_source.read_text(encoding="utf-8")
        else:
            raw = self._spec_source
        if self._native_is_continuation:
            tokenizer = Tokenizer.from_str(raw)
            tokenizer.encode_special_tokens = True
            return tokenizer
        return _load_tokenizers(json.loads(raw), raw)[1]

    def load_encoder(self) -> None:
        """Build the canonical encoder now.  A table read from its .npz cache builds it on first
        use, from tokenizer.json: ~2 s for Gemma-3's, which the first request would wait for."""
        _ = self._encoder

    @property
    def encoder_loaded(self) -> bool:
        return "_encoder" in self.__dict__

    def encode(self, text: bytes) -> list[int]:
        """Canonical token ids of `text` (complete UTF-8) as it appears mid-document: no dummy
        prefix, no BOS, special-token spellings encoded as ordinary text."""
        return list(self._encoder.encode(text.decode("utf-8"), add_special_tokens=False).ids)

    def pretoken_bounds(self, text: bytes) -> list[int]:
        """Byte offsets where the pre-tokenizer starts a new piece of `text` (complete UTF-8;
        no normalizer, which `_check_normalizer` guarantees for regex pre-tokenizers)."""
        pre = self._encoder.pre_tokenizer
        if pre is None:
            return [0]
        decoded = text.decode("utf-8")
        norm = self._encoder.normalizer
        if norm is not None:
            normalized = norm.normalize_str(decoded)
            if len(normalized) != len(decoded):
                raise ValueError("pre-token offsets need a length-preserving normalizer")
            decoded_for_split = normalized
        else:
            decoded_for_split = decoded
        char_to_byte = [0]
        for ch in decoded:
            char_to_byte.append(char_to_byte[-1] + len(ch.encode("utf-8")))
        pieces = pre.pre_tokenize_str(decoded_for_split)
        return [char_to_byte[a] for _, (a, _b) in pieces]

    def encode_at_start(self, text: bytes) -> list[int]:
        """Canonical ids of `text` at the start of a document (dummy prefix if the tokenizer
        has one): equal to `encode(b" " + text)` exactly when `dummy_prefix` is True."""
        return self.encode(b" " + text) if self.dummy_prefix else self.encode(text)


def _primary_first(
    byte_ids: list[int], token_bytes: list[bytes | None], tokenizer: Tokenizer
) -> None:
    """Within each run of ids with identical bytes (already adjacent after sorting), move the
    id the tokenizer itself emits for those bytes to the front, in place."""
    i = 0
    while i < len(byte_ids):
        j = i + 1
        while j < len(byte_ids) and token_bytes[byte_ids[j]] == token_bytes[byte_ids[i]]:
            j += 1
        if j - i > 1:
            group = sorted(byte_ids[i:j])
            data = token_bytes[group[0]] or b""
            try:
                enc = tokenizer.encode(data.decode("utf-8"), add_special_tokens=False).ids
            except UnicodeDecodeError:
                enc = []
            chosen = enc[0] if len(enc) == 1 and enc[0] in group else group[0]
            byte_ids[i:j] = [chosen] + [t for t in group if t != chosen]
        i = j


def _load_tokenizers(spec: dict[str, Any], raw: str) -> tuple[Tokenizer, Tokenizer]:
    """The native tokenizer and its continuation-mode twin.  Parsing Gemma's 500k merges
    takes about a second, so when the two differ only in the post-processor (which
    `add_special_tokens=False` skips anyway) one object serves as both."""
    cont = continuation_spec(spec)
    same = all(cont.get(k) == spec.get(k) for k in ("normalizer", "pre_tokenizer"))
    native = Tokenizer.from_str(raw)
    twin = native if same else Tokenizer.from_str(json.dumps(cont, ensure_ascii=False))
    # Special-token spellings inside text are text: they must not become control tokens.
    twin.encode_special_tokens = True
    return native, twin


def _successor(prefix: bytes) -> bytes | None:
    """Smallest byte string greater than every string that starts with `prefix` (None when
    `prefix` is all 0xFF: then nothing sorts after its extensions)."""
    stripped = prefix.rstrip(b"\xff")
    if not stripped:
        return None
    return stripped[:-1] + bytes([stripped[-1] + 1])
