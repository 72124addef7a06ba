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


def test_char_ids_are_the_sorted_distinct_characters_then_the_special_tokens():
    t = tok.CharTokenizer(CORPUS)
    chars = sorted(set(CORPUS))
    assert t.vocab_size == len(chars) + len(tok.SPECIAL_TOKENS)
    assert t.encode("".join(chars)) == list(range(len(chars)))
    assert t.special_tokens == {s: len(chars) + i for i, s in enumerate(tok.SPECIAL_TOKENS)}


def test_byte_ids_are_utf8_bytes_then_the_special_tokens():
    t = tok.ByteTokenizer()
    assert t.vocab_size == 256 + 5
    assert t.encode("aé🙂") == list("aé🙂".encode("utf-8"))
    assert t.special_tokens == {"<|endoftext|>": 256, "<|system|>": 257, "<|user|>": 258, "<|assistant|>": 259,
                                "<|end|>": 260}


def test_bpe_learns_merges_and_respects_vocab_size(bpe):
    assert tok.MIN_BPE_VOCAB <= bpe.vocab_size <= 300
    assert bpe.special_tokens == {s: i for i, s in enumerate(tok.SPECIAL_TOKENS)}  # reserved at training
    # Every id decodes to a distinct, non-empty byte string, and all 256 single bytes are present.
    assert all(len(b) > 0 for b in bpe.token_bytes)
    assert len(set(bpe.token_bytes)) == bpe.vocab_size
    assert {bytes([i]) for i in range(256)} <= set(bpe.token_bytes)
    # Merges make the training text shorter than its bytes.
    assert len(bpe.encode(CORPUS)) < 0.7 * len(CORPUS.encode("utf-8"))


def test_bpe_rejects_too_small_vocab():
    with pytest.raises(LmlabError, match="262"):
        tok.BPETokenizer.train(iter([CORPUS]), 261)


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
    assert ids == [len(chars) - 1, 0] and t.vocab_size == len(chars) + len(tok.SPECIAL_TOKENS)


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


# ---------------------------------------------------------------------------------------------------------------
# Special tokens


def _old_bpe_json() -> dict:
    """A BPE tokenizer.json as lmlab wrote it before special tokens: trained without any."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    hf = Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    hf.train_from_iterator([CORPUS], trainer=trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[], show_progress=False))
    return {"kind": "bpe", "hf": json.loads(hf.to_str())}


# tokenizer.json files as lmlab wrote them before special tokens (schema 1), and the fingerprint runs recorded
OLD_FILES = {"char": {"kind": "char", "chars": sorted(set(CORPUS))}, "byte": {"kind": "byte"}}


def old_fingerprint(obj: dict) -> str:
    """How lmlab fingerprinted a tokenizer then (config.json's tokenizer_fingerprint of every run)."""
    import hashlib

    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


@pytest.mark.parametrize("kind", ["char", "byte", "bpe"])
def test_an_old_tokenizer_file_loads_unchanged_and_can_be_grown(tmp_path, kind):
    old = OLD_FILES[kind] if kind != "bpe" else _old_bpe_json()
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(old))
    t = tok.load(path)
    ordinary = {"char": len(set(CORPUS)), "byte": 256}.get(kind) or len(old["hf"]["model"]["vocab"])
    assert t.vocab_size == ordinary and t.special_tokens == {} and t.chat_template is None
    assert t.to_json() == old and t.fingerprint() == old_fingerprint(old)  # so an old run's check still passes
    ids = t.encode(PROBE)
    grown, added = tok.add_special_tokens(t)
    assert added == list(tok.SPECIAL_TOKENS)
    assert grown.vocab_size == ordinary + 5 and grown.encode(PROBE) == ids  # the old ids stay
    assert grown.special_tokens == {s: ordinary + i for i, s in enumerate(tok.SPECIAL_TOKENS)}
    assert grown.token_bytes[:ordinary] == t.token_bytes and grown.chat_template == tok.CHAT_TEMPLATE
    assert tok.add_special_tokens(grown) == (grown, [])
    grown.save(path)  # and the grown one is a schema 2 file that loads as it was
    assert tok.load(path).fingerprint() == grown.fingerprint() and tok.load(path).special_tokens == grown.special_tokens


@pytest.mark.parametrize("kind", ["char", "byte"])
def test_a_new_tokenizer_file_has_the_schema_and_its_special_tokens(tokenizers, kind, tmp_path):
    obj = tokenizers[kind].to_json()
    assert obj["schema"] == tok.SCHEMA == 2 and obj["special_tokens"] == list(tok.SPECIAL_TOKENS)
    for bad in ({**obj, "schema": 3}, {**obj, "special_tokens": "<|end|>"}, {**obj, "special_tokens": ["<|a|>"] * 2},
                {**obj, "special_tokens": ["x"]}):
        (tmp_path / "t.json").write_text(json.dumps(bad))
        with pytest.raises(LmlabError) as info:
            tok.load(tmp_path / "t.json")
        assert "\n" not in str(info.value)


@pytest.mark.parametrize("kind", ["char", "byte", "bpe"])
def test_text_that_spells_a_special_token_is_encoded_as_text(kind, bpe):
    t = {"char": tok.CharTokenizer(CORPUS + "".join(tok.SPECIAL_TOKENS)), "byte": tok.ByteTokenizer(), "bpe": bpe}[kind]
    specials = set(t.special_tokens.values())
    assert len(specials) == 5 and len(t.special_tokens) == 5
    for name in tok.SPECIAL_TOKENS:
        text = f"the cat {name} sees{name}"
        ids = t.encode(text)
        assert not specials & set(ids) and t.decode(ids) == text
        assert not specials & {int(i) for a in t.encode_many([text, name]) for i in a}
    # decoding a special id shows its string (what a sampled one prints)
    assert t.decode([t.special_tokens[tok.USER]]) == tok.USER
    # sampling an answer stops at the end of a turn or of a text
    assert t.stop_ids == sorted([t.special_tokens[tok.END], t.special_tokens[tok.ENDOFTEXT]])
    assert (t.bos_token, t.eos_token, t.chat_template) == (tok.ENDOFTEXT, tok.END, tok.CHAT_TEMPLATE)
    assert sorted(t.ordinary_ids().tolist() + sorted(specials)) == list(range(t.vocab_size))


def test_an_imported_bpe_keeps_its_own_special_tokens_and_they_stay_text_in_encode():
    from tokenizers import Tokenizer

    old = _old_bpe_json()
    hf = Tokenizer.from_str(json.dumps(old["hf"]))
    hf.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    t = tok.BPETokenizer(hf, "{{ messages }}", None, "<|im_end|>")
    assert t.special_tokens == {"<|im_start|>": 300, "<|im_end|>": 301}
    assert not {300, 301} & set(t.encode("a <|im_start|> b<|im_end|>"))
    assert t.chat_template == "{{ messages }}" and t.eos_token == "<|im_end|>" and t.stop_ids == [301]
    back = tok.from_json(json.loads(json.dumps(t.to_json())))
    assert (back.chat_template, back.bos_token, back.eos_token) == ("{{ messages }}", None, "<|im_end|>")
    assert back.fingerprint() == t.fingerprint()
    grown, added = tok.add_special_tokens(t)  # lmlab's five join its own; its template stays its own
    assert added == list(tok.SPECIAL_TOKENS) and grown.special_tokens[tok.END] == 306
    assert grown.chat_template == "{{ messages }}"


def test_offsets_name_the_characters_of_each_token(tokenizers):
    text = "naïve 🙂 café"
    for kind, t in tokenizers.items():
        ids, starts, ends = t.encode_offsets(text)
        assert ids.tolist() == t.encode(text), kind
        # the characters each token spans, put back in order, are the text: each token's bytes come from them
        for i, s, e in zip(ids.tolist(), starts.tolist(), ends.tolist()):
            assert t.token_bytes[i] in text[s:e].encode("utf-8"), (kind, i, s, e)
        assert starts[0] == 0 and ends[-1] == len(text)
