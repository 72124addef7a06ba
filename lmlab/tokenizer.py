"""Text to token ids and back: char, byte and byte-level BPE (Hugging Face `tokenizers`), and the chat template.

Every tokenizer maps each id to an exact byte string, so decoding is a byte concatenation, streaming decode
is incremental UTF-8 decoding, and bits/byte can count the bytes behind every predicted token.

Every kind reserves the same special tokens (SPECIAL_TOKENS: the end of a text, the start of each role's turn and
the end of a turn), so any run can be fine-tuned on conversations: char and byte vocabularies end with them, BPE
reserves them at training (ids 0-4). `encode` never produces them: a text that spells `<|user|>` is ordinary text,
and only the chat template (`chat_template`, rendered by chat.py) puts them into a sequence. A tokenizer.json from
before they existed loads unchanged, without them; `add_special_tokens` grows such a tokenizer.
"""

from __future__ import annotations

import codecs
import json
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional

import numpy as np

from .common import LmlabError, atomic_write_json, read_json

KINDS = ("char", "byte", "bpe")

# The special tokens every tokenizer kind reserves, in the order of their ids
ENDOFTEXT, SYSTEM, USER, ASSISTANT, END = "<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"
SPECIAL_TOKENS = (ENDOFTEXT, SYSTEM, USER, ASSISTANT, END)
MAX_SPECIAL_TOKENS, MAX_SPECIAL_CHARS = 1024, 256  # bounds on what a tokenizer file may declare

# lmlab's chat template, in Jinja as transformers renders a `chat_template` (chat.py renders it the same way): the
# end of text opens a conversation, each message is its role's token, its content and the end of a turn, and the
# generation prompt is the assistant's token. There is no literal text, so a turn's tokens are exactly its
# content's. `{% generation %}` marks what an assistant writes, its content and its end of turn: the tokens that
# are trained (transformers' return_assistant_tokens_mask reads the same marks).
CHAT_TEMPLATE = (
    "{{- bos_token -}}\n"
    "{%- for message in messages -%}\n"
    "{%- if message['role'] == 'system' -%}<|system|>{{ message['content'] }}<|end|>\n"
    "{%- elif message['role'] == 'user' -%}<|user|>{{ message['content'] }}<|end|>\n"
    "{%- elif message['role'] == 'assistant' -%}<|assistant|>\n"
    "{%- generation -%}{{ message['content'] }}<|end|>{%- endgeneration -%}\n"
    "{%- else -%}{{ raise_exception('lmlab chat template: the roles are system, user and assistant, not ' "
    "+ message['role']) }}\n"
    "{%- endif -%}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}<|assistant|>{%- endif -%}"
)

# The tokenizer.json schema: 1, the files before special tokens (no "schema" key); 2 adds "special_tokens" (char,
# byte) and an imported "chat_template", "bos_token" and "eos_token". A tokenizer with none of these writes schema 1,
# unchanged, so the fingerprints that older runs recorded still match.
SCHEMA = 2


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
    """Base class. Subclasses fill `kind`, `token_bytes` (id -> bytes) and `special_tokens`, and implement
    `encode_array`.

    The chat side, for chat.py and the applications:
    - `special_tokens`: {string: id} of every special token (lmlab's SPECIAL_TOKENS, or an imported tokenizer's own);
      `token_bytes` of a special id is its string's UTF-8, so decoding shows it.
    - `chat_template`: the Jinja template that renders a conversation (an imported tokenizer's own, else lmlab's
      CHAT_TEMPLATE when all of SPECIAL_TOKENS are there, else None: see add_special_tokens), with `bos_token` and
      `eos_token`, the strings the template sees under those names.
    - `stop_ids`: the ids that end an assistant's turn when sampling (the end of a turn, the end of text).
    """

    kind: str = ""
    token_bytes: list[bytes]
    special_tokens: dict[str, int]
    own_template: Optional[str] = None  # an imported tokenizer's chat template; None: lmlab's
    own_bos: Optional[str] = None  # and its bos/eos token strings
    own_eos: Optional[str] = None

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

    def encode_offsets(self, text: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """encode_array(text), and for each token the span of characters of `text` it comes from: (ids, starts,
        ends), ends exclusive. A character that is split between tokens (bytes of one character) is in each."""
        ids = self.encode_array(text)
        starts = np.arange(len(text), dtype=np.int64)
        return ids, starts, starts + 1

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

    @property
    def chat_template(self) -> Optional[str]:
        if self.own_template is not None:
            return self.own_template
        return CHAT_TEMPLATE if all(t in self.special_tokens for t in SPECIAL_TOKENS) else None

    @property
    def bos_token(self) -> Optional[str]:
        return self.own_bos if self.own_template is not None else ENDOFTEXT

    @property
    def eos_token(self) -> Optional[str]:
        return self.own_eos if self.own_template is not None else END

    @property
    def stop_ids(self) -> list[int]:
        """The special ids that end an assistant's turn: the eos token, lmlab's end of turn and end of text."""
        names = (self.eos_token, END, ENDOFTEXT)
        return sorted({self.special_tokens[t] for t in names if t in self.special_tokens})

    def ordinary_ids(self) -> np.ndarray:
        """Every id that is not a special token."""
        keep = np.ones(self.vocab_size, dtype=bool)
        keep[list(self.special_tokens.values())] = False
        return np.flatnonzero(keep)

    def _chat_json(self) -> dict:
        """The imported chat template's fields of to_json, if any."""
        if self.own_template is None:
            return {}
        return {"schema": SCHEMA, "chat_template": self.own_template, "bos_token": self.own_bos,
                "eos_token": self.own_eos}

    def to_json(self) -> dict:
        raise NotImplementedError

    def save(self, path: str | Path) -> None:
        atomic_write_json(path, self.to_json())

    def fingerprint(self) -> str:
        import hashlib

        return hashlib.sha256(json.dumps(self.to_json(), sort_keys=True).encode()).hexdigest()[:16]


def _check_specials(tokens: Iterable[str]) -> list[str]:
    """The special token strings as a list, refused unless distinct, longer than a character, and bounded."""
    tokens = list(tokens)
    if len(tokens) > MAX_SPECIAL_TOKENS:
        raise LmlabError(f"{len(tokens)} special tokens, more than {MAX_SPECIAL_TOKENS}")
    if not all(isinstance(t, str) and 1 < len(t) <= MAX_SPECIAL_CHARS for t in tokens):
        raise LmlabError(f"special tokens must be strings of 2 to {MAX_SPECIAL_CHARS} characters")
    if len(set(tokens)) != len(tokens):
        raise LmlabError("special tokens must be distinct")
    return tokens


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
    """One id per distinct character of the training corpus, in code-point order, then the special tokens.

    Unknown-symbol policy: a character that was not in the training corpus is an error that names it.
    """

    kind = "char"

    def __init__(self, chars: Iterable[str], special_tokens: Iterable[str] = SPECIAL_TOKENS):
        self.chars = sorted(set(chars))
        if not self.chars:
            raise LmlabError("cannot build a char tokenizer from an empty corpus")
        specials = _check_specials(special_tokens)
        self.token_bytes = [c.encode("utf-8") for c in self.chars] + [t.encode("utf-8") for t in specials]
        self.special_tokens = {t: len(self.chars) + i for i, t in enumerate(specials)}
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
        if not self.special_tokens:  # schema 1, as written before special tokens
            return {"kind": "char", "chars": self.chars}
        return {"kind": "char", "schema": SCHEMA, "chars": self.chars, "special_tokens": list(self.special_tokens)}


class ByteTokenizer(Tokenizer):
    """The 256 byte values of UTF-8 text, then the special tokens: no training, no unknown symbols."""

    kind = "byte"

    def __init__(self, special_tokens: Iterable[str] = SPECIAL_TOKENS) -> None:
        specials = _check_specials(special_tokens)
        self.token_bytes = [bytes([b]) for b in range(256)] + [t.encode("utf-8") for t in specials]
        self.special_tokens = {t: 256 + i for i, t in enumerate(specials)}

    def encode_array(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8", errors="surrogatepass"), dtype=np.uint8).astype(self.dtype)

    def encode_offsets(self, text: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        codes = np.frombuffer(text.encode("utf-32-le", errors="surrogatepass"), dtype=np.uint32)
        widths = 1 + (codes >= 0x80) + (codes >= 0x800) + (codes >= 0x10000)  # UTF-8 bytes of each character
        starts = np.repeat(np.arange(len(codes), dtype=np.int64), widths)
        return self.encode_array(text), starts, starts + 1

    def to_json(self) -> dict:
        if not self.special_tokens:  # schema 1
            return {"kind": "byte"}
        return {"kind": "byte", "schema": SCHEMA, "special_tokens": list(self.special_tokens)}


class BPETokenizer(Tokenizer):
    """Byte-level BPE trained with Hugging Face `tokenizers` (no normaliser, so encode/decode round-trips).

    Its special tokens are the `tokenizers` library's special added tokens (lmlab's SPECIAL_TOKENS, ids 0-4 when
    lmlab trains it; an imported tokenizer's own). encode never matches them inside a text (the library's
    encode_special_tokens)."""

    kind = "bpe"

    def __init__(self, hf_tokenizer, chat_template: Optional[str] = None, bos_token: Optional[str] = None,
                 eos_token: Optional[str] = None):
        self.hf = hf_tokenizer
        self.hf.encode_special_tokens = True  # a text that spells a special token is text
        added = {i: t for i, t in self.hf.get_added_tokens_decoder().items() if t.special}
        self.special_tokens = {t.content: i for i, t in sorted(added.items())}
        inverse = _byte_level_alphabet()
        vocab = self.hf.get_vocab()
        table: list[bytes] = [b""] * len(vocab)
        for token, idx in vocab.items():
            table[idx] = token.encode("utf-8") if idx in added else bytes(inverse[c] for c in token)
        self.token_bytes = table
        self.own_template, self.own_bos, self.own_eos = chat_template, bos_token, eos_token

    @classmethod
    def train(cls, texts: Iterator[str], vocab_size: int, length: int | None = None) -> "BPETokenizer":
        from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers

        if vocab_size < MIN_BPE_VOCAB:
            raise LmlabError(f"--vocab-size must be at least {MIN_BPE_VOCAB} for bpe (256 bytes, "
                             f"{len(SPECIAL_TOKENS)} special tokens and merges), got {vocab_size}")
        hf = HFTokenizer(models.BPE())
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        hf.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            special_tokens=list(SPECIAL_TOKENS),
            show_progress=False,
        )
        hf.train_from_iterator(texts, trainer=trainer, length=length)
        return cls(hf)

    def encode_array(self, text: str) -> np.ndarray:
        return np.asarray(self.hf.encode(text).ids, dtype=self.dtype)

    def encode_many(self, texts: list[str]) -> list[np.ndarray]:
        # encode_batch runs in parallel in the Rust library
        return [np.asarray(e.ids, dtype=self.dtype) for e in self.hf.encode_batch(texts)]

    def encode_offsets(self, text: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        encoding = self.hf.encode(text)
        spans = np.asarray(encoding.offsets, dtype=np.int64).reshape(-1, 2)
        return np.asarray(encoding.ids, dtype=self.dtype), spans[:, 0], spans[:, 1]

    def to_json(self) -> dict:
        return {"kind": "bpe", "hf": json.loads(self.hf.to_str()), **self._chat_json()}


MIN_BPE_VOCAB = 256 + len(SPECIAL_TOKENS) + 1  # the bytes, the special tokens and at least one merge


def add_special_tokens(tokenizer: Tokenizer, tokens: Iterable[str] = SPECIAL_TOKENS) -> tuple[Tokenizer, list[str]]:
    """A tokenizer from before special tokens (or an imported one without lmlab's), grown by those of `tokens` it
    lacks: (the new tokenizer, the strings added). The new ids follow all the old ones, whose ids stay as they are,
    so a model grows by as many rows (model.grow_vocab). A tokenizer that has them all comes back as it is."""
    missing = [t for t in tokens if t not in tokenizer.special_tokens]
    if not missing:
        return tokenizer, []
    have = list(tokenizer.special_tokens)
    if isinstance(tokenizer, CharTokenizer):
        return CharTokenizer(tokenizer.chars, have + missing), missing
    if isinstance(tokenizer, ByteTokenizer):
        return ByteTokenizer(have + missing), missing
    if isinstance(tokenizer, BPETokenizer):
        from tokenizers import Tokenizer as HFTokenizer

        _check_specials(have + missing)
        if any(t in tokenizer.hf.get_vocab() for t in missing):
            raise LmlabError(f"this tokenizer has {', '.join(t for t in missing if t in tokenizer.hf.get_vocab())} "
                             f"as an ordinary token; it cannot become a special one")
        hf = HFTokenizer.from_str(tokenizer.hf.to_str())
        hf.add_special_tokens(missing)
        return BPETokenizer(hf, tokenizer.own_template, tokenizer.own_bos, tokenizer.own_eos), missing
    raise LmlabError(f"cannot add special tokens to a {tokenizer.kind!r} tokenizer")


def from_json(obj: dict) -> Tokenizer:
    kind = obj.get("kind") if isinstance(obj, dict) else None
    schema = obj.get("schema", 1) if isinstance(obj, dict) else 1
    if schema not in (1, SCHEMA):
        raise LmlabError(f"tokenizer schema {schema!r} is not one this lmlab reads (1 or {SCHEMA}); a newer lmlab "
                         f"wrote it")
    specials = obj.get("special_tokens", []) if schema >= 2 else []
    if not isinstance(specials, list):
        raise LmlabError("a tokenizer's 'special_tokens' must be a list of strings")
    if kind == "char":
        chars = obj.get("chars")
        if not isinstance(chars, list) or not all(isinstance(c, str) and len(c) == 1 for c in chars):
            raise LmlabError("a char tokenizer's 'chars' must be a list of single characters")
        return CharTokenizer(chars, specials)
    if kind == "byte":
        return ByteTokenizer(specials)
    if kind == "bpe":
        from tokenizers import Tokenizer as HFTokenizer

        if not isinstance(obj.get("hf"), dict):
            raise LmlabError("a bpe tokenizer's 'hf' must be a JSON object")
        template, bos, eos = (obj.get(k) for k in ("chat_template", "bos_token", "eos_token"))
        if not all(v is None or isinstance(v, str) for v in (template, bos, eos)):
            raise LmlabError("a tokenizer's chat_template, bos_token and eos_token must be strings or null")
        return BPETokenizer(HFTokenizer.from_str(json.dumps(obj["hf"])), template, bos, eos)
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
