"""Corpus -> token file -> batches.

A source (file, folder, glob, the built-in corpus or a named download) is streamed in chunks through a tokenizer
into a memory-mapped token file, cached by corpus hash + tokenizer. Batches are random windows drawn by a seeded
generator whose state goes into checkpoints.
"""

from __future__ import annotations

import codecs
import glob as globlib
import hashlib
import json
import os
import shutil
import sys
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Literal, Optional

import numpy as np
import torch

from . import chat, synthetic
from . import tokenizer as tok
from .common import LmlabError, atomic_write_json, cache_dir, read_json, sha256_file

BUILTIN = "builtin"


@dataclass(frozen=True)
class NamedCorpus:
    url: str
    sha256: str
    size: int
    description: str


NAMED_CORPORA: dict[str, NamedCorpus] = {
    "tinyshakespeare": NamedCorpus(
        url="https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
        sha256="86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",
        size=1115394,
        description="40,000 lines of Shakespeare (char-rnn, nanoGPT); 1,115,394 characters, 65 distinct",
    ),
}


@dataclass
class DataConfig:
    """Where the text comes from and how it becomes tokens."""

    data: str = BUILTIN
    """Corpus: a text file, a folder, a glob, 'builtin' (Python's own docs), a named corpus or synthetic:NAME
    (see `lmlab data list`)."""
    tokenizer: Literal["char", "byte", "bpe"] = "char"
    """char: one id per distinct character; byte: 256 byte values; bpe: byte-level BPE trained on the corpus. Each
    reserves the chat special tokens too (<|endoftext|>, <|system|>, <|user|>, <|assistant|>, <|end|>)."""
    vocab_size: int = 2048
    """Vocabulary size of a bpe tokenizer, its special tokens included (ignored for char and byte)."""
    val_data: Optional[str] = None
    """A separate validation corpus; by default the last val_fraction of the token stream is held out."""
    val_fraction: float = 0.1
    """Share of the token stream held out for validation when --val-data is not given."""

    def __post_init__(self) -> None:
        self.data = absolute_source(self.data)
        self.val_data = absolute_source(self.val_data) if self.val_data else self.val_data
        if self.tokenizer not in tok.KINDS:
            raise LmlabError(f"unknown tokenizer {self.tokenizer!r}; use char, byte or bpe")
        if self.tokenizer == "bpe" and self.vocab_size < tok.MIN_BPE_VOCAB:
            raise LmlabError(f"--vocab-size must be at least {tok.MIN_BPE_VOCAB} for bpe, got {self.vocab_size}")
        if not 0.0 < self.val_fraction < 1.0:
            raise LmlabError(f"--val-fraction must be between 0 and 1, got {self.val_fraction}")


# ---------------------------------------------------------------------------------------------------------------
# Sources


def is_path(src: str) -> bool:
    """Whether a source names files on this machine (a file, folder or glob), not a corpus lmlab makes or fetches
    itself ('builtin', a named corpus, synthetic:NAME)."""
    return not (src == BUILTIN or src in NAMED_CORPORA or synthetic.is_synthetic(src))


def absolute_source(src: str) -> str:
    """File, folder and glob sources become absolute, so a saved run finds its text from any working directory."""
    return os.path.abspath(os.path.expanduser(src)) if is_path(src) else src


@dataclass
class Corpus:
    """An ordered list of UTF-8 text files read as one stream (files are joined with a newline)."""

    name: str
    files: list[Path]

    def num_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.files)

    def describe(self) -> str:
        """What is read, in a few words: the files (the first, and how many more) and the corpus's name."""
        where = str(self.files[0]) + (f" and {len(self.files) - 1} more files" if len(self.files) > 1 else "")
        return where if self.name in (where, str(self.files[0])) else f"{self.name}: {where}"


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def builtin_text() -> str:
    """Python's documentation topics (pydoc_data.topics: the language reference that `help()` shows)."""
    try:
        from pydoc_data.topics import topics
    except ImportError:  # pragma: no cover - some distributions strip it
        raise LmlabError("this Python has no pydoc_data; pass --data FILE instead of the built-in corpus") from None
    return "\n\n".join(topics[k].strip("\n") + "\n" for k in sorted(topics))


def builtin_corpus() -> Corpus:
    version = "{}.{}.{}".format(*sys.version_info[:3])
    path = cache_dir() / "corpora" / f"python-{version}-docs.txt"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        from .common import atomic_write_bytes

        atomic_write_bytes(path, builtin_text().encode("utf-8"))
    return Corpus(f"builtin (Python {version} documentation topics)", [path])


def download_named(name: str, quiet: bool = False) -> Path:
    """Fetch a named corpus into the cache once, checking its pinned SHA-256."""
    spec = NAMED_CORPORA[name]
    path = cache_dir() / "corpora" / f"{name}.txt"
    if path.exists() and sha256_file(path) == spec.sha256:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{name}.", suffix=".part")
    h = hashlib.sha256()
    try:
        with os.fdopen(fd, "wb") as out:
            try:
                with urllib.request.urlopen(spec.url, timeout=30) as resp:
                    while block := resp.read(1 << 16):
                        h.update(block)
                        out.write(block)
            except (urllib.error.URLError, OSError, ValueError) as e:
                reason = getattr(e, "reason", e)
                raise LmlabError(
                    f"could not download {name} from {spec.url} ({reason}); fetch that file yourself and pass "
                    f"--data PATH/TO/FILE instead"
                ) from None
        if h.hexdigest() != spec.sha256:
            raise LmlabError(
                f"download of {name} from {spec.url} has SHA-256 {h.hexdigest()[:16]}..., expected "
                f"{spec.sha256[:16]}...; fetch the file yourself and pass --data PATH/TO/FILE"
            )
        os.replace(tmp, path)
        if not quiet:
            print(f"downloaded {name} ({spec.size:,} bytes) to {path}", file=sys.stderr)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _looks_binary(path: Path) -> bool:
    with open(path, "rb") as f:
        return b"\0" in f.read(8192)


def resolve_source(src: str, say: Callable[[str], None] = _say) -> Corpus:
    """Turn a --data value into a Corpus, failing with one clear line when it names nothing usable. What is read
    is said: a path may come from a run's config, and the user sees every file lmlab opens."""
    corpus = _resolve(src)
    say(f"reading corpus {corpus.describe()}")
    return corpus


def _resolve(src: str) -> Corpus:
    if src == BUILTIN:
        return builtin_corpus()
    if src in NAMED_CORPORA:
        return Corpus(src, [download_named(src)])
    if synthetic.is_synthetic(src):
        return Corpus(src, [synthetic.corpus_file(src)])
    path = Path(src).expanduser()
    if path.is_file():
        files = [path]
    elif path.is_dir():
        candidates = sorted(
            p for p in path.rglob("*") if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)
        )
        files = [p for p in candidates if not _looks_binary(p)]
        if not files:
            raise LmlabError(f"no text files in directory {src}")
    elif any(c in src for c in "*?["):
        files = sorted(Path(p) for p in globlib.glob(os.path.expanduser(src), recursive=True) if Path(p).is_file())
        if not files:
            raise LmlabError(f"no files match {src}")
    else:
        named = ", ".join([BUILTIN, *NAMED_CORPORA, *(synthetic.PREFIX + name for name in synthetic.SYNTHETIC)])
        raise LmlabError(f"no such file, directory or named corpus: {src} (named corpora: {named})")
    for f in files:
        if not os.access(f, os.R_OK):
            raise LmlabError(f"cannot read {f}: permission denied")
        if _looks_binary(f):
            raise LmlabError(f"{f} looks like a binary file (it contains NUL bytes); lmlab trains on UTF-8 text")
    corpus = Corpus(str(src), files)
    if corpus.num_bytes() == 0:
        raise LmlabError(f"corpus {src} is empty")
    return corpus


CHUNK_BYTES = 1 << 22


def iter_text(corpus: Corpus, chunk_bytes: int = CHUNK_BYTES) -> Iterator[str]:
    """Stream the corpus as text chunks that end at a newline where possible (so BPE rarely splits a word).

    Files must be UTF-8 (a leading BOM is dropped); anything else is refused with the file and byte offset.
    """
    carry = ""
    last = "\n"
    for index, path in enumerate(corpus.files):
        if index > 0 and not (carry or last).endswith("\n"):
            carry += "\n"  # files are joined with a newline
        decoder = codecs.getincrementaldecoder("utf-8-sig")(errors="strict")
        offset = 0
        with open(path, "rb") as f:
            while True:
                block = f.read(chunk_bytes)
                final = not block
                try:
                    text = decoder.decode(block, final=final)
                except UnicodeDecodeError as e:
                    raise LmlabError(
                        f"{path} is not UTF-8 (byte 0x{e.object[e.start]:02x} near offset {offset + e.start}); "
                        f"convert it first, e.g. iconv -f latin1 -t utf-8"
                    ) from None
                if "\0" in text:
                    raise LmlabError(f"{path} looks like a binary file (it contains NUL bytes); lmlab trains on UTF-8 text")
                offset += len(block)
                if final:
                    break
                text = carry + text
                cut = text.rfind("\n")
                if cut < 0 or len(text) - cut > chunk_bytes:
                    carry = ""
                    out = text
                else:
                    carry = text[cut + 1 :]
                    out = text[: cut + 1]
                if out:
                    last = out[-1]
                    yield out
    if carry:
        yield carry


def corpus_fingerprint(corpus: Corpus) -> str:
    h = hashlib.sha256()
    for chunk in iter_text(corpus):
        h.update(chunk.encode("utf-8"))
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------------------------
# Token files


def _progress(total: int, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, disable=None, leave=False, file=sys.stderr)


def _split_for_batch(text: str, piece: int = 1 << 16) -> list[str]:
    """Cut a chunk into newline-ended pieces so a batch encoder can spread them over threads."""
    pieces, start = [], 0
    while start < len(text):
        end = min(len(text), start + piece)
        if end < len(text):
            nl = text.rfind("\n", start, end)
            end = nl + 1 if nl >= start else end
        pieces.append(text[start:end])
        start = end
    return pieces


def encode_text(tokenizer: tok.Tokenizer, text: str) -> np.ndarray:
    """Encode a text the way prepared corpora are encoded (newline-ended pieces), so scores match `lmlab eval`."""
    pieces = tokenizer.encode_many(_split_for_batch(text))
    return np.concatenate(pieces).astype(np.int64) if pieces else np.zeros(0, dtype=np.int64)


def encode_corpus(corpus: Corpus, tokenizer: tok.Tokenizer, out_path: Path, desc: str = "tokenizing") -> int:
    """Stream-encode a corpus into a raw token file; returns the number of tokens written."""
    n = 0
    with open(out_path, "wb") as out, _progress(corpus.num_bytes(), desc) as bar:
        for chunk in iter_text(corpus):
            for ids in tokenizer.encode_many(_split_for_batch(chunk)):
                ids.astype(tokenizer.dtype, copy=False).tofile(out)
                n += len(ids)
            bar.update(len(chunk.encode("utf-8")))
    return n


def build_tokenizer(corpus: Corpus, kind: str, vocab_size: int) -> tok.Tokenizer:
    if kind == "byte":
        return tok.ByteTokenizer()
    if kind == "char":
        chars: set[str] = set()
        for chunk in iter_text(corpus):
            chars.update(chunk)
        return tok.CharTokenizer(chars)
    if kind == "bpe":
        return tok.BPETokenizer.train((p for c in iter_text(corpus) for p in _split_for_batch(c)), vocab_size)
    raise LmlabError(f"unknown tokenizer {kind!r}; use char, byte or bpe")


@dataclass
class TokenFile:
    """A prepared, memory-mapped token stream and what produced it."""

    path: Path
    tokens: np.ndarray
    tokenizer: tok.Tokenizer
    meta: dict

    def __len__(self) -> int:
        return len(self.tokens)


def _open_tokens(folder: Path, tokenizer: tok.Tokenizer, meta: dict) -> TokenFile:
    path = folder / "tokens.bin"
    if meta["n_tokens"] == 0:
        return TokenFile(path, np.zeros(0, dtype=meta["dtype"]), tokenizer, meta)
    tokens = np.memmap(path, dtype=meta["dtype"], mode="r", shape=(meta["n_tokens"],))
    return TokenFile(path, tokens, tokenizer, meta)


def prepare(corpus: Corpus, kind: str, vocab_size: int = 2048, tokenizer: tok.Tokenizer | None = None) -> TokenFile:
    """Tokenize a corpus into the cache (or reuse the cached result). With `tokenizer` given, use it as is."""
    corpus_hash = corpus_fingerprint(corpus)
    if corpus_hash == hashlib.sha256(b"").hexdigest():
        raise LmlabError(f"corpus {corpus.name} is empty")
    # the schema: a tokenizer built now has the special tokens, one cached before them has not
    spec = {"kind": kind, "vocab_size": vocab_size if kind == "bpe" else None, "schema": tok.SCHEMA}
    if tokenizer is not None:
        spec = {"tokenizer": tokenizer.fingerprint()}
    key = hashlib.sha256(json.dumps({"corpus": corpus_hash, **spec}, sort_keys=True).encode()).hexdigest()[:24]
    folder = cache_dir() / "tokens" / key
    if (folder / "meta.json").exists():
        meta = read_json(folder / "meta.json")
        cached_tok = tok.load(folder / "tokenizer.json")
        return _open_tokens(folder, cached_tok, meta)
    folder.parent.mkdir(parents=True, exist_ok=True)
    if tokenizer is None:
        tokenizer = build_tokenizer(corpus, kind, vocab_size)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{key}."))
    try:
        n = encode_corpus(corpus, tokenizer, tmp / "tokens.bin")
        tokenizer.save(tmp / "tokenizer.json")
        meta = {
            "corpus": corpus.name,
            "corpus_sha256": corpus_hash,
            "corpus_bytes": corpus.num_bytes(),
            "n_tokens": n,
            "dtype": tokenizer.dtype.name,
            "tokenizer": tokenizer.kind,
            "vocab_size": tokenizer.vocab_size,
        }
        atomic_write_json(tmp / "meta.json", meta)
        try:
            os.replace(tmp, folder)
        except OSError:  # another process prepared the same data first
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return _open_tokens(folder, tok.load(folder / "tokenizer.json"), read_json(folder / "meta.json"))


@dataclass
class Splits:
    train: np.ndarray
    val: np.ndarray
    tokenizer: tok.Tokenizer
    train_meta: dict
    val_meta: dict


def load_splits(cfg: DataConfig, tokenizer: tok.Tokenizer | None = None, say: Callable[[str], None] = _say) -> Splits:
    """Prepare the training corpus (and validation corpus) and return train/val token arrays."""
    corpus = resolve_source(cfg.data, say)
    prepared = prepare(corpus, cfg.tokenizer, cfg.vocab_size, tokenizer=tokenizer)
    if cfg.val_data:
        val_prepared = prepare(resolve_source(cfg.val_data, say), cfg.tokenizer, tokenizer=prepared.tokenizer)
        return Splits(prepared.tokens, val_prepared.tokens, prepared.tokenizer, prepared.meta, val_prepared.meta)
    n_val = int(len(prepared) * cfg.val_fraction)
    cut = len(prepared) - n_val
    return Splits(prepared.tokens[:cut], prepared.tokens[cut:], prepared.tokenizer, prepared.meta, prepared.meta)


# ---------------------------------------------------------------------------------------------------------------
# Conversations


def is_conversations(src: str) -> bool:
    """Whether a --data value names conversations (a .jsonl or .parquet file, synthetic:chat) rather than text."""
    return synthetic.is_chat(src) or chat.is_conversation_file(src)


@dataclass
class ConversationSplits:
    """The conversations to fine-tune on and those held out to validate on."""

    train: list[chat.Conversation]
    val: list[chat.Conversation]
    source: str
    """What they were read from, for messages."""


def load_conversations(src: str, val_data: Optional[str] = None, val_fraction: float = 0.1,
                       seed: int = 0) -> ConversationSplits:
    """The conversations a --data value names: synthetic:chat[:SEED] (its train and held-out splits, each
    conversation with its skill), or a .jsonl or .parquet file (chat.read_conversations: the whole file checked
    first). A file's held-out conversations are val_data's, else a val_fraction of its own drawn with `seed` (at
    least one, and at least one left to train on)."""
    if synthetic.is_chat(src):
        _, chat_seed = synthetic.parse(src)
        splits = ([chat.Conversation(t.messages, t.skill, f"{split} conversation {i + 1}")
                   for i, t in enumerate(synthetic.chat_tasks(chat_seed, split))] for split in ("train", "heldout"))
        return ConversationSplits(*splits, src)
    conversations = chat.read_conversations(src)
    if val_data:
        return ConversationSplits(conversations, chat.read_conversations(val_data), src)
    return ConversationSplits(*hold_out(conversations, val_fraction, seed, src, "conversation"), src)


def hold_out(items: list, val_fraction: float, seed: int, src: str, noun: str) -> tuple[list, list]:
    """(train, held out): a val_fraction of the items drawn with `seed` held out (at least one, and at least one
    left to train on), each part in the file's order."""
    if len(items) < 2:
        raise LmlabError(f"{src} holds {len(items)} {noun}; hold some out with --val-data, or give more")
    n_val = min(max(1, round(len(items) * val_fraction)), len(items) - 1)
    held = set(np.random.default_rng(seed).permutation(len(items))[:n_val].tolist())
    return [c for i, c in enumerate(items) if i not in held], [c for i, c in enumerate(items) if i in held]


# ---------------------------------------------------------------------------------------------------------------
# Batches


class BatchSampler:
    """Random windows of block_size+1 tokens: x = window[:-1], y = window[1:], drawn by a seeded generator.

    One scheme for any number of processes: each optimizer step draws the start offsets of its whole global batch
    (batch_size x grad_accum x world sequences) at once, and micro-step a of rank r takes chunk a * world + r.
    So every rank draws different windows, the generator state is the same on all ranks, and a run with the same
    global batch sees the same data whether it runs as 1 process or N (which makes resuming at another size exact).
    """

    def __init__(self, tokens: np.ndarray, block_size: int, batch_size: int, seed: int, device: torch.device,
                 grad_accum: int = 1, rank: int = 0, world: int = 1):
        if len(tokens) < block_size + 1:
            raise LmlabError(
                f"the training split has {len(tokens)} tokens, fewer than one block of {block_size}+1; "
                f"use more text or a smaller --block-size"
            )
        self.tokens = tokens
        self.block_size = block_size
        self.batch_size = batch_size
        self.grad_accum, self.rank, self.world = grad_accum, rank, world
        self.device = device
        self.generator = torch.Generator().manual_seed(seed)
        self._offsets = np.arange(block_size + 1)
        self._step_starts: Optional[torch.Tensor] = None
        self._micro = 0

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next micro-batch of this rank."""
        if self._micro == 0:
            total = self.batch_size * self.grad_accum * self.world
            self._step_starts = torch.randint(len(self.tokens) - self.block_size, (total,), generator=self.generator)
        chunk = self._micro * self.world + self.rank
        starts = self._step_starts[chunk * self.batch_size : (chunk + 1) * self.batch_size]
        self._micro = (self._micro + 1) % self.grad_accum
        windows = torch.from_numpy(self.tokens[starts.numpy()[:, None] + self._offsets].astype(np.int64))
        x, y = windows[:, :-1], windows[:, 1:]
        if self.device.type == "cuda":
            x, y = x.pin_memory().to(self.device, non_blocking=True), y.pin_memory().to(self.device, non_blocking=True)
        elif self.device.type != "cpu":
            x, y = x.to(self.device), y.to(self.device)
        return x, y

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.generator.set_state(state["generator"])
        self._micro = 0  # checkpoints are taken between optimizer steps
