"""Token byte tables: exact bytes per id, specials, sorted-prefix structures, encoding, cache."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, models, normalizers

from service.bytelevel.byte_tables import TokenByteTable, gpt2_bytes_to_unicode
from tests.unit.ensemble_fixtures import (
    CORPUS,
    GEMMA3,
    SMOLLM2,
    real_available,
    real_table,
    tiny_byte_level,
    tiny_sentencepiece,
    tiny_table,
)

KINDS = ["byte_level", "sentencepiece", "sentencepiece_dummy"]
TOKENIZERS = {
    "byte_level": lambda: tiny_byte_level(),
    "sentencepiece": lambda: tiny_sentencepiece(),
    "sentencepiece_dummy": lambda: tiny_sentencepiece(dummy_prefix=True),
}


def _decoded_bytes(tok: Tokenizer, table: TokenByteTable, tid: int) -> bytes:
    """What the tokenizer's own decoder makes of `tid` (after an anchor token, so a decoder
    `Strip` of the dummy prefix cannot touch it)."""
    anchor = table.exact_id(b"a")
    assert anchor is not None
    both = tok.decode([anchor, tid], skip_special_tokens=False).encode("utf-8")
    alone = tok.decode([anchor], skip_special_tokens=False).encode("utf-8")
    assert both.startswith(alone)
    return both[len(alone) :]


def test_gpt2_alphabet_is_a_bijection() -> None:
    mapping = gpt2_bytes_to_unicode()
    assert sorted(mapping) == list(range(256))
    assert len(set(mapping.values())) == 256
    assert mapping[ord(" ")] == "\u0120" and mapping[ord("\n")] == "\u010a"


@pytest.mark.parametrize("kind", KINDS)
def test_token_bytes_match_the_decoder(kind: str) -> None:
    table = tiny_table(kind)
    tok = TOKENIZERS[kind]()
    checked = 0
    for tid in range(table.vocab_size):
        if table.is_special(tid):
            assert table.token_bytes(tid) == b""
            continue
        data = table.token_bytes(tid)
        assert data
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            continue  # a lone byte piece: the decoder would print U+FFFD
        assert _decoded_bytes(tok, table, tid) == text.encode("utf-8"), tid
        checked += 1
    assert checked > 200


def test_sentencepiece_spelling() -> None:
    table = tiny_table("sentencepiece")
    vocab = tiny_sentencepiece().get_vocab()
    assert table.kind == "sentencepiece" and not table.dummy_prefix
    assert table.token_bytes(vocab["<0xE4>"]) == b"\xe4"
    assert table.token_bytes(vocab["<0x20>"]) == b" "
    spaced = [t for t in vocab if t.startswith("\u2581") and len(t) > 1][0]
    assert table.token_bytes(vocab[spaced]) == spaced.replace("\u2581", " ").encode()
    # "A" exists as a piece and as <0x41>: the piece is primary (what encode produces).
    assert table.exact_id(b"A") == vocab["A"]
    assert table.encode(b"A") == [vocab["A"]]
    assert tiny_table("sentencepiece_dummy").dummy_prefix


def test_specials_form_the_stop_bucket() -> None:
    table = tiny_table("byte_level")
    vocab = tiny_byte_level().get_vocab()
    specials = {vocab[n] for n in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")}
    assert set(table.special_ids.tolist()) == specials
    assert set(table.stop_ids.tolist()) == specials
    assert all(table.rank[i] == -1 for i in specials)
    only = TokenByteTable.from_tokenizer(tiny_byte_level(), stop_tokens=["<|im_end|>"])
    assert only.stop_ids.tolist() == [vocab["<|im_end|>"]]
    with pytest.raises(ValueError, match="not special"):
        TokenByteTable.from_tokenizer(tiny_byte_level(), stop_tokens=["the"])


@pytest.mark.parametrize("kind", KINDS)
def test_sorted_order_and_prefix_ranges(kind: str) -> None:
    table = tiny_table(kind)
    data = [table.token_bytes(int(i)) for i in table.sorted_ids]
    assert data == sorted(data)
    assert int(table.sorted_lens.sum()) == len(table.sorted_buf)
    everything = {i: table.token_bytes(i) for i in range(table.vocab_size)}
    for prefix in [b"", b"t", b"th", b" ", b"\xe4", b"\xe4\xb8", b"zzzz", b"\xff", b"\x00"]:
        lo, hi = table.prefix_range(prefix)
        got = sorted(int(i) for i in table.sorted_ids[lo:hi])
        want = sorted(i for i, b in everything.items() if b and b.startswith(prefix))
        assert got == want, prefix
        # Inside a prefix range the next byte is sorted, tokens that end there coming first.
        col = table.byte_at(lo, hi, len(prefix))
        assert np.all(np.diff(np.where(col == 256, -1, col)) >= 0)


@settings(max_examples=60, deadline=None)
@given(st.binary(min_size=1, max_size=4), st.sampled_from(KINDS))
def test_exact_id_and_byte_at(prefix: bytes, kind: str) -> None:
    table = tiny_table(kind)
    tid = table.exact_id(prefix)
    matches = [i for i in range(table.vocab_size) if table.token_bytes(i) == prefix]
    assert (tid is None) == (not matches)
    if tid is not None:
        assert tid in matches
    lo, hi = table.prefix_range(prefix[:1])
    for k in range(3):
        col = table.byte_at(lo, hi, k)
        for pos, value in zip(range(lo, hi), col, strict=True):
            tb = table.token_bytes(int(table.sorted_ids[pos]))
            assert value == (tb[k] if len(tb) > k else 256)


@pytest.mark.parametrize("kind", ["byte_level", "sentencepiece"])
def test_encode_is_the_tokenizers_own(kind: str) -> None:
    table = tiny_table(kind)
    tok = TOKENIZERS[kind]()
    for line in CORPUS.splitlines()[:12]:
        ids = tok.encode(line, add_special_tokens=False).ids
        assert table.encode(line.encode()) == ids
        assert table.decode(ids) == line.encode()


def test_special_token_text_is_encoded_as_text() -> None:
    table = tiny_table("byte_level")
    ids = table.encode(b"<|im_end|>")
    assert len(ids) > 1 and not any(table.is_special(i) for i in ids)
    assert table.decode(ids) == b"<|im_end|>"


def test_dummy_prefix_only_at_document_start() -> None:
    table = tiny_table("sentencepiece_dummy")
    native = tiny_sentencepiece(dummy_prefix=True)
    text = "the quick fox"
    start = native.encode(text, add_special_tokens=False).ids
    assert table.decode(start) == b" " + text.encode()
    assert table.encode_at_start(text.encode()) == start
    # Mid-document (continuation) encoding has no dummy space.
    assert table.decode(table.encode(text.encode())) == text.encode()


def test_unsupported_tokenizers_are_refused() -> None:
    wordpiece = Tokenizer(models.WordPiece({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
    with pytest.raises(ValueError, match="BPE"):
        TokenByteTable.from_tokenizer(wordpiece)
    spec = json.loads(tiny_byte_level().to_str())
    spec["normalizer"] = {"type": "NFKC"}
    with pytest.raises(ValueError, match="normalizer"):
        TokenByteTable.from_tokenizer(Tokenizer.from_str(json.dumps(spec)))
    plain = Tokenizer(models.BPE({"a": 0, "b": 1, "ab": 2}, [("a", "b")]))
    plain.normalizer = normalizers.Lowercase()
    with pytest.raises(ValueError):
        TokenByteTable.from_tokenizer(plain)


def test_cache_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "tokenizer.json"
    path.write_text(tiny_sentencepiece().to_str())
    built = TokenByteTable.from_tokenizer_file(path, cache_dir=tmp_path / "cache")
    files = list((tmp_path / "cache").glob("*.npz"))
    assert len(files) == 1
    loaded = TokenByteTable.from_tokenizer_file(path, cache_dir=tmp_path / "cache")
    for name in ("sorted_ids", "sorted_offsets", "sorted_buf", "special_ids", "stop_ids"):
        assert np.array_equal(getattr(built, name), getattr(loaded, name)), name
    assert (loaded.kind, loaded.dummy_prefix, loaded.vocab_size) == (
        built.kind,
        built.dummy_prefix,
        built.vocab_size,
    )
    assert not loaded.encoder_loaded  # built lazily from tokenizer.json...
    loaded.load_encoder()  # ...or up front, as the gateway's asset loading does
    assert loaded.encoder_loaded
    assert loaded.encode(b"the fox") == built.encode(b"the fox")
    # A different stop set is a different cache entry; a torn file is rebuilt.
    TokenByteTable.from_tokenizer_file(path, cache_dir=tmp_path / "cache", stop_tokens=["<eos>"])
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 2
    files[0].write_bytes(b"torn")
    again = TokenByteTable.from_tokenizer_file(path, cache_dir=tmp_path / "cache")
    assert np.array_equal(again.sorted_ids, built.sorted_ids)


@pytest.mark.parametrize("name", ["smollm2", "gemma3"])
def test_real_tables(name: str) -> None:
    if not real_available(name):
        pytest.skip(f"{name} tokenizer not prepared")
    start = time.perf_counter()
    table = real_table(name)
    assert time.perf_counter() - start < 30
    tok = Tokenizer.from_file(str(SMOLLM2 if name == "smollm2" else GEMMA3))
    if name == "smollm2":
        assert (table.kind, table.vocab_size, len(table.special_ids)) == ("byte_level", 49152, 17)
        assert table.lookahead_pretokenizer and not table.dummy_prefix
    else:
        assert (table.kind, table.vocab_size) == ("sentencepiece", 262144)
        assert len(table.special_ids) == 6249 and not table.lookahead_pretokenizer
        assert table.exact_id(b"A") == tok.token_to_id("A")
        assert table.exact_id(b"\n") == tok.token_to_id("\n")  # the added token, not <0x0A>
        assert table.token_bytes(tok.token_to_id("<table>")) == b"<table>"
    rng = np.random.default_rng(0)
    for tid in rng.integers(0, table.vocab_size, 1500).tolist():
        if table.is_special(tid):
            continue
        data = table.token_bytes(tid)
        assert tok.decode([tid], skip_special_tokens=False) == data.decode("utf-8", "replace")
    text = "Hello world, don't 中文 👨‍👩‍👧 <table>\r\n  12\n\n\tx".encode()
    assert table.encode(text) == tok.encode(text.decode(), add_special_tokens=False).ids
    assert table.decode(table.encode(text)) == text
    spelled = b"<|im_end|> <end_of_turn>"
    ids = table.encode(spelled)  # the natives would turn these into control tokens
    assert table.decode(ids) == spelled and not any(table.is_special(i) for i in ids)
