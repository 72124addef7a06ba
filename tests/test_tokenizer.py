"""Tokenizers: exact round trips (multi-byte UTF-8 included), unknown symbols, save/load, byte accounting."""

from __future__ import annotations

import json

import numpy as np
import pytest

from helpers import make_text
from lmlab import tokenizer as tok
from lmlab.common import LmlabError

MULTIBYTE = "Café déjà vu, naïve façade. 中文字符 and emoji 🙂🚀 at the end.\n"
CORPUS = make_text(150, seed=1) + MULTIBYTE + make_text(50, seed=2)
# Text that only uses the corpus's characters, but in a new order (and the rare multi-byte ones).
PROBE = "the teacher finds 🙂 a café near 中文 the river!\n" + "Our neighbour paints the blue door. naïve 🚀\n"


@pytest.fixture(scope="module")
def bpe():
    return tok.BPETokenizer.train(iter([CORPUS]), 300)


@pytest.fixture(scope="module")
def tokenizers(bpe):
    return {"char": tok.CharTokenizer(CORPUS), "byte": tok.ByteTokenizer(), "bpe": bpe}


@pytest.mark.parametrize("kind", ["char", "byte", "bpe"])
@pytest.mark.parametrize("text", [CORPUS, PROBE, MULTIBYTE, "é", "🙂", "中", "", "\n\n  \n"])
def test_round_trip_exact(tokenizers, kind, text):
    t = tokenizers[kind]
    ids = t.encode(text)
    assert all(isinstance(i, int) and 0 <= i < t.vocab_size for i in ids)
    assert t.decode(ids) == text
    assert t.decode_bytes(ids) == text.encode("utf-8")


@pytest.mark.parametrize("kind", ["byte", "bpe"])
def test_byte_level_tokenizers_round_trip_unseen_text(tokenizers, kind):
    # Byte-level tokenizers can represent any UTF-8 text, including characters never seen in training.
    text = "Ωμέγα ß Ж ✓ 日本語 👍🏽 ∑ x² \t tab\r\n"
    t = tokenizers[kind]
    assert t.decode(t.encode(text)) == text


def test_char_ids_are_the_sorted_distinct_characters():
    t = tok.CharTokenizer(CORPUS)
    chars = sorted(set(CORPUS))
    assert t.vocab_size == len(chars)
    assert t.encode("".join(chars)) == list(range(len(chars)))


def test_byte_ids_are_utf8_bytes():
    t = tok.ByteTokenizer()
    assert t.vocab_size == 256
    assert t.encode("aé🙂") == list("aé🙂".encode("utf-8"))


def test_bpe_learns_merges_and_respects_vocab_size(bpe):
    assert 257 <= bpe.vocab_size <= 300
    # Every id decodes to a distinct, non-empty byte string, and all 256 single bytes are present.
    assert all(len(b) > 0 for b in bpe.token_bytes)
    assert len(set(bpe.token_bytes)) == bpe.vocab_size
    assert {bytes([i]) for i in range(256)} <= set(bpe.token_bytes)
    # Merges make the training text shorter than its bytes.
    assert len(bpe.encode(CORPUS)) < 0.7 * len(CORPUS.encode("utf-8"))


def test_bpe_rejects_too_small_vocab():
    with pytest.raises(LmlabError, match="257"):
        tok.BPETokenizer.train(iter([CORPUS]), 100)


@pytest.mark.parametrize("unseen", ["Z", "ü", "国中", "😀"])
def test_char_unknown_character_is_an_error_naming_it(unseen):
    t = tok.CharTokenizer(CORPUS)
    text = "the cat " + unseen + " sees"
    assert unseen[0] not in CORPUS
    with pytest.raises(LmlabError) as info:
        t.encode(text)
    msg = str(info.value)
    assert repr(unseen[0]) in msg or f"U+{ord(unseen[0]):04X}" in msg
    assert f"offset {text.index(unseen[0])}" in msg
    assert "\n" not in msg


def test_char_empty_corpus_is_an_error():
    with pytest.raises(LmlabError):
        tok.CharTokenizer("")


@pytest.mark.parametrize("kind", ["char", "byte", "bpe"])
def test_save_load_gives_identical_encodings(tokenizers, kind, tmp_path):
    t = tokenizers[kind]
    path = tmp_path / f"{kind}.json"
    t.save(path)
    loaded = tok.load(path)
    assert type(loaded) is type(t)
    assert loaded.kind == kind
    assert loaded.vocab_size == t.vocab_size
    assert loaded.token_bytes == t.token_bytes
    for text in (CORPUS, PROBE, MULTIBYTE):
        assert loaded.encode(text) == t.encode(text)
    assert loaded.fingerprint() == t.fingerprint()
    # The file is plain JSON, and from_json of to_json is the same tokenizer too.
    obj = json.loads(path.read_text())
    assert tok.from_json(obj).encode(PROBE) == t.encode(PROBE)
    assert list(tmp_path.iterdir()) == [path]  # atomic write leaves no temporary file


@pytest.mark.parametrize("kind", ["char", "byte", "bpe"])
def test_byte_lengths_sum_to_utf8_bytes(tokenizers, kind):
    t = tokenizers[kind]
    lengths = t.byte_lengths()
    assert lengths.shape == (t.vocab_size,)
    for text in (CORPUS, PROBE, MULTIBYTE, "🙂"):
        ids = np.asarray(t.encode(text), dtype=np.int64)
        decoded = t.decode(ids.tolist())
        assert int(lengths[ids].sum()) == len(decoded.encode("utf-8")) == len(text.encode("utf-8"))
    # and per id: the length of that id's own bytes
    assert lengths.tolist() == [len(b) for b in t.token_bytes]


@pytest.mark.parametrize("kind", ["char", "byte", "bpe"])
def test_dtype_is_uint16_for_small_vocabularies(tokenizers, kind):
    t = tokenizers[kind]
    assert t.dtype == np.uint16
    arr = t.encode_array(PROBE)
    assert arr.dtype == np.uint16
    assert t.encode_array("").dtype == np.uint16
    assert [a.dtype for a in t.encode_many([PROBE, "the cat"])] == [np.uint16, np.uint16]
    assert [a.tolist() for a in t.encode_many([PROBE, "the cat"])] == [t.encode(PROBE), t.encode("the cat")]


def test_dtype_is_wider_for_huge_vocabularies():
    chars = [chr(c) for c in range(0x4E00, 0x4E00 + 70000) if not 0xD800 <= c < 0xE000]
    t = tok.CharTokenizer(chars)
    assert t.vocab_size > 65536
    assert t.dtype == np.uint32
    ids = t.encode(chars[-1] + chars[0])
    assert ids == [t.vocab_size - 1, 0]


@pytest.mark.parametrize("kind", ["char", "byte", "bpe"])
def test_stream_decoder_matches_decode(tokenizers, kind):
    t = tokenizers[kind]
    ids = t.encode(PROBE + MULTIBYTE)
    dec = t.stream_decoder()
    pieces = [dec.push(i) for i in ids] + [dec.flush()]
    assert "".join(pieces) == PROBE + MULTIBYTE
    assert all("\ufffd" not in p for p in pieces)  # partial characters are held back, never replaced


@pytest.mark.parametrize(
    "content",
    [
        '{"foo": 1}',
        "[1, 2, 3]",
        '"char"',
        '{"kind": "wordpiece"}',
        '{"kind": "char"}',
        '{"kind": "char", "chars": []}',
        '{"kind": "bpe"}',
        '{"kind": "bpe", "hf": {"nonsense": true}}',
        "not json at all {",
        "",
    ],
)
def test_loading_a_non_tokenizer_file_is_an_lmlab_error(tmp_path, content):
    path = tmp_path / "tokenizer.json"
    path.write_text(content)
    with pytest.raises(LmlabError) as info:
        tok.load(path)
    assert "\n" not in str(info.value)


def test_loading_a_missing_tokenizer_file_is_an_lmlab_error(tmp_path):
    with pytest.raises(LmlabError, match="missing"):
        tok.load(tmp_path / "nope.json")
