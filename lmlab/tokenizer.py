"""Text to token ids and back: char, byte and byte-level BPE (Hugging Face `tokenizers`).

Every tokenizer maps each id to an exact byte string, so decoding is a byte concatenation, streaming decode
is incremental UTF-8 decoding, and bits/byte can count the bytes behind every predicted token.
"""

from __future__ import annotations

import codecs
import json
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np

from .common import LmlabError, atomic_write_json, read_json

KINDS = ("char", "byte", "bpe")


@lru_cache(maxsize=1)
def _byte_level_alphabet() -> dict[str, int]:
    """The printable stand-in character that byte-level BPE uses for each byte, inverted (char -> byte).

    Bytes that are printable Latin-1 stand for themselves; the remaining ones are shifted to 256 and up, in order.
    """
    direct = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    mapping = {}
    shift = 0
    for b in range(256):
        if b in direct:
            mapping[chr(b)] = b
        else:
            mapping[chr(256 + shift)] = b
            shift += 1
    return mapping


class Tokenizer:
    """Base class. Subclasses fill `kind`, `token_bytes` (id -> bytes) and implement `encode_array`."""

    kind: str = ""
    token_bytes: list[bytes]

    @property
    def vocab_size(self) -> int:
        return len(self.token_bytes)

    @property
    def dtype(self) -> np.dtype:
        """The smallest unsigned dtype that holds every id (uint16 when the vocabulary fits)."""
        return np.dtype(np.uint16) if self.vocab_size <= 65536 else np.dtype(np.uint32)

    def encode_array(self, text: str) -> np.ndarray:
        raise NotImplementedError

    def encode_many(self, texts: list[str]) -> list[np.ndarray]:
        return [self.encode_array(t) for t in texts]

    def encode(self, text: str) -> list[int]:
        return self.encode_array(text).tolist()

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        table = self.token_bytes
        return b"".join(table[i] for i in ids)

    def decode(self, ids: Iterable[int]) -> str:
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def byte_lengths(self) -> np.ndarray:
        """UTF-8 bytes behind each id, for bits/byte."""
        return np.array([len(b) for b in self.token_bytes], dtype=np.int64)

    def stream_decoder(self) -> "StreamDecoder":
        return StreamDecoder(self)

    def to_json(self) -> dict:
        raise NotImplementedError

    def save(self, path: str | Path) -> None:
        atomic_write_json(path, self.to_json())

    def fingerprint(self) -> str:
        import hashlib

        return hashlib.sha256(json.dumps(self.to_json(), sort_keys=True).encode()).hexdigest()[:16]


class StreamDecoder:
    """Turns ids into text as they arrive, holding back bytes of a character that is not complete yet."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        return self._decoder.decode(self.tokenizer.token_bytes[token_id])

    def flush(self) -> str:
        return self._decoder.decode(b"", final=True)


class CharTokenizer(Tokenizer):
    """One id per distinct character of the training corpus, in code-point order.

    Unknown-symbol policy: a character that was not in the training corpus is an error that names it.
    """

    kind = "char"

    def __init__(self, chars: Iterable[str]):
        self.chars = sorted(set(chars))
        if not self.chars:
            raise LmlabError("cannot build a char tokenizer from an empty corpus")
        self.token_bytes = [c.encode("utf-8") for c in self.chars]
        codes = np.array([ord(c) for c in self.chars], dtype=np.int64)
        self._lookup = np.full(int(codes.max()) + 1, -1, dtype=np.int64)
        self._lookup[codes] = np.arange(len(codes))

    def encode_array(self, text: str) -> np.ndarray:
        if not text:
            return np.zeros(0, dtype=self.dtype)
        codes = np.frombuffer(text.encode("utf-32-le", errors="surrogatepass"), dtype=np.uint32).astype(np.int64)
        in_range = codes < len(self._lookup)
        ids = np.where(in_range, self._lookup[np.minimum(codes, len(self._lookup) - 1)], -1)
        bad = np.flatnonzero(ids < 0)
        if bad.size:
            ch = text[int(bad[0])]
            raise LmlabError(
                f"character {ch!r} (U+{ord(ch):04X}) at offset {int(bad[0])} is not in this run's char vocabulary "
                f"({self.vocab_size} symbols); char tokenizers only know the characters of their training corpus"
            )
        return ids.astype(self.dtype)

    def to_json(self) -> dict:
        return {"kind": "char", "chars": self.chars}


class ByteTokenizer(Tokenizer):
    """The 256 byte values of UTF-8 text: no training, no unknown symbols."""

    kind = "byte"

    def __init__(self) -> None:
        self.token_bytes = [bytes([b]) for b in range(256)]

    def encode_array(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8", errors="surrogatepass"), dtype=np.uint8).astype(self.dtype)

    def to_json(self) -> dict:
        return {"kind": "byte"}


class BPETokenizer(Tokenizer):
    """Byte-level BPE trained with Hugging Face `tokenizers` (no normaliser, so encode/decode round-trips)."""

    kind = "bpe"

    def __init__(self, hf_tokenizer):
        self.hf = hf_tokenizer
        inverse = _byte_level_alphabet()
        vocab = self.hf.get_vocab()
        table: list[bytes] = [b""] * len(vocab)
        for token, idx in vocab.items():
            table[idx] = bytes(inverse[c] for c in token)
        self.token_bytes = table

    @classmethod
    def train(cls, texts: Iterator[str], vocab_size: int, length: int | None = None) -> "BPETokenizer":
        from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers

        if vocab_size < 257:
            raise LmlabError(f"--vocab-size must be at least 257 for bpe (256 bytes + merges), got {vocab_size}")
        hf = HFTokenizer(models.BPE())
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        hf.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            special_tokens=[],
            show_progress=False,
        )
        hf.train_from_iterator(texts, trainer=trainer, length=length)
        return cls(hf)

    def encode_array(self, text: str) -> np.ndarray:
        return np.asarray(self.hf.encode(text).ids, dtype=self.dtype)

    def encode_many(self, texts: list[str]) -> list[np.ndarray]:
        # encode_batch runs in parallel in the Rust library
        return [np.asarray(e.ids, dtype=self.dtype) for e in self.hf.encode_batch(texts)]

    def to_json(self) -> dict:
        return {"kind": "bpe", "hf": json.loads(self.hf.to_str())}


def from_json(obj: dict) -> Tokenizer:
    kind = obj.get("kind") if isinstance(obj, dict) else None
    if kind == "char":
        chars = obj.get("chars")
        if not isinstance(chars, list) or not all(isinstance(c, str) and len(c) == 1 for c in chars):
            raise LmlabError("a char tokenizer's 'chars' must be a list of single characters")
        return CharTokenizer(chars)
    if kind == "byte":
        return ByteTokenizer()
    if kind == "bpe":
        from tokenizers import Tokenizer as HFTokenizer

        if not isinstance(obj.get("hf"), dict):
            raise LmlabError("a bpe tokenizer's 'hf' must be a JSON object")
        return BPETokenizer(HFTokenizer.from_str(json.dumps(obj["hf"])))
    raise LmlabError(f"not an lmlab tokenizer (kind={kind!r})")


def from_json_checked(obj: Any, where: str | Path) -> Tokenizer:
    """from_json for a file from anywhere: whatever is wrong with it is one LmlabError naming `where`."""
    try:
        return from_json(obj)
    except Exception as e:  # noqa: BLE001 - the Rust tokenizers library raises its own exception types
        detail = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise LmlabError(f"{where} is not a valid lmlab tokenizer file ({detail[:200]})") from None


def load(path: str | Path) -> Tokenizer:
    return from_json_checked(read_json(path), path)


def visible(text: str) -> str:
    """A token's text with whitespace and control characters made visible: '\\n', '␣', '\\t', '\\x07'."""
    out = []
    for ch in text:
        if ch == " ":
            out.append("␣")
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\t":
            out.append("\\t")
        elif ord(ch) < 32 or ord(ch) == 127:
            out.append(f"\\x{ord(ch):02x}")
        else:
            out.append(ch)
    return "".join(out)
