"""Data: sources, streaming UTF-8 text, token files and their cache, splits, batches, named-corpus downloads."""

from __future__ import annotations

import hashlib
import http.server
import threading
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch

import lmlab.data as data
from helpers import make_text, write_corpus
from lmlab import tokenizer as tok
from lmlab.common import LmlabError
from lmlab.data import BatchSampler, DataConfig, NamedCorpus, iter_text, load_splits, prepare, resolve_source

CPU = torch.device("cpu")


# ---------------------------------------------------------------------------------------------------------------
# resolve_source


def test_resolve_file(tmp_path):
    f = write_corpus(tmp_path / "a.txt")
    corpus = resolve_source(str(f))
    assert corpus.files == [f]
    assert corpus.num_bytes() == f.stat().st_size


def test_resolve_directory_skips_hidden_and_binary_files(tmp_path):
    d = tmp_path / "docs"
    a = write_corpus(d / "a.txt", 5, seed=1)
    b = write_corpus(d / "sub" / "b.md", 5, seed=2)
    c = write_corpus(d / "c.txt", 5, seed=3)
    write_corpus(d / ".hidden.txt", 5)
    write_corpus(d / ".git" / "config", 5)
    write_corpus(d / "sub" / ".cache" / "x.txt", 5)
    (d / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)))
    (d / "sub" / "data.bin").write_bytes(b"abc\x00def")
    corpus = resolve_source(str(d))
    assert corpus.files == sorted([a, b, c])


@pytest.mark.parametrize("layout", ["empty", "only-hidden", "only-binary"])
def test_directory_without_text_files_is_an_error(tmp_path, layout):
    d = tmp_path / "d"
    d.mkdir()
    if layout == "only-hidden":
        write_corpus(d / ".notes.txt", 5)
    elif layout == "only-binary":
        (d / "blob.bin").write_bytes(b"\x00\x01\x02" * 100)
    with pytest.raises(LmlabError, match="no text files"):
        resolve_source(str(d))


def test_resolve_glob(tmp_path):
    a = write_corpus(tmp_path / "x1.txt", 5, seed=1)
    b = write_corpus(tmp_path / "x2.txt", 5, seed=2)
    write_corpus(tmp_path / "y.md", 5, seed=3)
    corpus = resolve_source(str(tmp_path / "x*.txt"))
    assert corpus.files == [a, b]
    with pytest.raises(LmlabError, match="no files match"):
        resolve_source(str(tmp_path / "nothing*.txt"))


def test_resolve_builtin_is_python_docs(isolated_cache):
    from pydoc_data.topics import topics

    corpus = resolve_source("builtin")
    assert len(corpus.files) == 1
    path = corpus.files[0]
    assert Path(isolated_cache) in path.parents  # written into the cache, not elsewhere
    text = path.read_text(encoding="utf-8")
    assert len(text) > 100_000
    for key in ("assert", "if", "while"):
        assert topics[key].strip("\n") in text
    # a second resolve reuses the file
    assert resolve_source("builtin").files == [path]


@pytest.mark.parametrize("name", ["no-such-corpus", "missing/file.txt", "tinyshakespear"])
def test_unknown_source_is_an_error_naming_it(tmp_path, name):
    with pytest.raises(LmlabError) as info:
        resolve_source(str(tmp_path / name) if "/" in name else name)
    assert name in str(info.value)


def test_empty_file_is_an_error(tmp_path):
    f = tmp_path / "empty.txt"
    f.write_bytes(b"")
    with pytest.raises(LmlabError, match="empty"):
        resolve_source(str(f))


def test_file_with_nul_bytes_is_an_error(tmp_path):
    f = tmp_path / "data.txt"
    f.write_bytes(b"hello world\n" * 10 + b"\x00" + b"more text\n")
    with pytest.raises(LmlabError, match="binary"):
        resolve_source(str(f))


def test_non_utf8_file_is_an_error_mentioning_utf8(tmp_path):
    f = tmp_path / "latin.txt"
    text = "the caf\xe9 sells cr\xe8me br\xfbl\xe9e\n" * 20
    f.write_bytes(text.encode("latin-1"))
    corpus = resolve_source(str(f))
    with pytest.raises(LmlabError) as info:
        list(iter_text(corpus))
    msg = str(info.value)
    assert "UTF-8" in msg and str(f) in msg
    assert "offset 7" in msg  # the first non-UTF-8 byte is the 8th one
    with pytest.raises(LmlabError, match="UTF-8"):
        prepare(corpus, "char")


def test_truncated_utf8_at_end_of_file_is_an_error(tmp_path):
    f = tmp_path / "cut.txt"
    f.write_bytes("hello wörld 🙂".encode("utf-8")[:-2])
    with pytest.raises(LmlabError, match="UTF-8"):
        list(iter_text(resolve_source(str(f))))


# ---------------------------------------------------------------------------------------------------------------
# iter_text


@pytest.mark.parametrize("chunk_bytes", [1, 2, 3, 5, 7, 8, 13, 64, 1 << 22])
def test_iter_text_streams_exact_text_in_chunks(tmp_path, chunk_bytes):
    # 'é' is 2 bytes and starts at byte 6, so a 7-byte chunk ends in the middle of it; the emoji is 4 bytes.
    first = "hello é world\nsecond 🙂 line\nno newline at the end: 中文"
    second = "another file\nwith ünïcode ✓\n"
    assert first.encode("utf-8")[6:8] == "é".encode("utf-8")
    f1 = tmp_path / "a.txt"
    f2 = tmp_path / "b.txt"
    f1.write_bytes(first.encode("utf-8"))
    f2.write_bytes(second.encode("utf-8"))
    corpus = data.Corpus("two files", [f1, f2])
    chunks = list(iter_text(corpus, chunk_bytes=chunk_bytes))
    assert all(isinstance(c, str) and c for c in chunks)
    assert "".join(chunks) == first + "\n" + second  # files joined with a newline
    if chunk_bytes <= 8:
        assert len(chunks) > 1  # streamed, not read whole


def test_iter_text_single_file_exact_with_straddling_character(tmp_path):
    text = make_text(40, seed=5, extra="fin: ça va? 中文 🙂🙂 done")
    f = tmp_path / "c.txt"
    f.write_text(text, encoding="utf-8")
    raw = text.encode("utf-8")
    for chunk_bytes in (7, 31, 100):
        chunks = list(iter_text(resolve_source(str(f)), chunk_bytes=chunk_bytes))
        assert "".join(chunks) == text
        assert len(chunks) >= len(raw) // (2 * chunk_bytes)


def test_iter_text_drops_a_leading_bom(tmp_path):
    f = tmp_path / "bom.txt"
    f.write_bytes(b"\xef\xbb\xbfhello bom\n")
    assert "".join(iter_text(resolve_source(str(f)))) == "hello bom\n"


# ---------------------------------------------------------------------------------------------------------------
# prepare: token files and the cache


@pytest.mark.parametrize("kind", ["char", "byte", "bpe"])
def test_prepare_writes_memmapped_tokens_that_decode_to_the_corpus(tmp_path, isolated_cache, kind):
    text = make_text(120, seed=7, extra="Ünïcödé 中文 🙂\n")
    f = tmp_path / "corpus.txt"
    f.write_text(text, encoding="utf-8")
    prepared = prepare(resolve_source(str(f)), kind, vocab_size=300)
    assert isinstance(prepared.tokens, np.memmap)
    assert prepared.tokens.dtype == np.uint16
    assert Path(isolated_cache) in prepared.path.parents
    assert prepared.path.stat().st_size == 2 * len(prepared)
    assert prepared.meta["n_tokens"] == len(prepared)
    assert prepared.meta["corpus_bytes"] == len(text.encode("utf-8"))
    assert prepared.tokenizer.kind == kind
    assert prepared.tokenizer.decode(prepared.tokens.tolist()) == text
    # the raw file holds the same ids
    raw = np.fromfile(prepared.path, dtype=np.uint16)
    assert np.array_equal(raw, np.asarray(prepared.tokens))
    # and the ids are what the tokenizer gives for the whole text
    assert prepared.tokenizer.encode(text) == raw.tolist()
    # nothing half-written left in the cache
    assert not [p for p in (Path(isolated_cache) / "tokens").iterdir() if p.name.startswith(".")]


def test_prepare_reuses_the_cache(tmp_path, monkeypatch):
    f = write_corpus(tmp_path / "corpus.txt", 100)
    first = prepare(resolve_source(str(f)), "char")
    mtime = first.path.stat().st_mtime_ns

    def boom(*args, **kwargs):
        raise AssertionError("the corpus was encoded again instead of reusing the cache")

    monkeypatch.setattr(data, "encode_corpus", boom)
    monkeypatch.setattr(data, "build_tokenizer", boom)
    second = prepare(resolve_source(str(f)), "char")
    assert second.path == first.path
    assert second.path.stat().st_mtime_ns == mtime
    assert np.array_equal(np.asarray(second.tokens), np.asarray(first.tokens))
    assert second.tokenizer.token_bytes == first.tokenizer.token_bytes


def test_prepare_does_not_reuse_a_stale_cache(tmp_path, monkeypatch):
    f = write_corpus(tmp_path / "corpus.txt", 100, seed=1)
    first = prepare(resolve_source(str(f)), "char")
    calls = []
    real = data.encode_corpus
    monkeypatch.setattr(data, "encode_corpus", lambda *a, **k: calls.append(1) or real(*a, **k))
    # another tokenizer kind, then changed content under the same file name: both must be encoded afresh
    byte_prep = prepare(resolve_source(str(f)), "byte")
    assert calls == [1]
    assert byte_prep.path != first.path
    new_text = make_text(100, seed=2)
    f.write_text(new_text, encoding="utf-8")
    changed = prepare(resolve_source(str(f)), "char")
    assert calls == [1, 1]
    assert changed.path != first.path
    assert changed.tokenizer.decode(changed.tokens.tolist()) == new_text


def test_load_splits_holds_out_the_last_tenth(tmp_path):
    text = make_text(150, seed=3)
    f = tmp_path / "corpus.txt"
    f.write_text(text, encoding="utf-8")
    splits = load_splits(DataConfig(data=str(f), tokenizer="char"))
    reference = tok.CharTokenizer(text).encode(text)  # an independent encoding of the whole text
    n = len(reference)
    n_val = int(n * 0.1)
    assert len(splits.val) == n_val and len(splits.train) == n - n_val
    assert splits.train.tolist() == reference[: n - n_val]
    assert splits.val.tolist() == reference[n - n_val:]
    assert splits.tokenizer.decode(splits.train.tolist()) + splits.tokenizer.decode(splits.val.tolist()) == text

    quarter = load_splits(DataConfig(data=str(f), tokenizer="char", val_fraction=0.25))
    assert len(quarter.val) == int(n * 0.25)
    assert quarter.val.tolist() == reference[n - int(n * 0.25):]


def test_load_splits_with_separate_val_data(tmp_path):
    train_text = make_text(150, seed=3)
    val_text = make_text(30, seed=4)
    assert set(val_text) <= set(train_text)
    ft, fv = tmp_path / "train.txt", tmp_path / "val.txt"
    ft.write_text(train_text, encoding="utf-8")
    fv.write_text(val_text, encoding="utf-8")
    splits = load_splits(DataConfig(data=str(ft), tokenizer="char", val_data=str(fv)))
    reference = tok.CharTokenizer(train_text)
    assert splits.train.tolist() == reference.encode(train_text)  # all of the training corpus
    assert splits.val.tolist() == reference.encode(val_text)  # all of the validation corpus, train's tokenizer
    assert splits.val_meta["corpus_bytes"] == len(val_text.encode("utf-8"))


def test_val_data_with_unknown_characters_is_an_error(tmp_path):
    ft, fv = write_corpus(tmp_path / "train.txt", 50), tmp_path / "val.txt"
    fv.write_text("QXZ §§§ unseen\n", encoding="utf-8")
    with pytest.raises(LmlabError, match="vocabulary"):
        load_splits(DataConfig(data=str(ft), tokenizer="char", val_data=str(fv)))


@pytest.mark.parametrize("kwargs", [dict(tokenizer="wordpiece"), dict(tokenizer="bpe", vocab_size=100),
                                    dict(val_fraction=0.0), dict(val_fraction=1.0)])
def test_bad_data_config_is_an_error(kwargs):
    with pytest.raises(LmlabError):
        DataConfig(**kwargs)


# ---------------------------------------------------------------------------------------------------------------
# BatchSampler


def _window_starts(x: torch.Tensor, position: dict[int, int]) -> list[int]:
    return [position[int(row[0])] for row in x]


def test_batches_are_shifted_windows_of_the_stream():
    rng = np.random.default_rng(0)
    tokens = rng.permutation(5000).astype(np.uint16)  # distinct values, so a window's start is recoverable
    position = {int(v): i for i, v in enumerate(tokens)}
    block, batch = 16, 8
    sampler = BatchSampler(tokens, block, batch, seed=1, device=CPU)
    for _ in range(5):
        x, y = sampler.next()
        assert x.shape == y.shape == (batch, block)
        assert x.dtype == y.dtype == torch.int64
        assert torch.equal(x[:, 1:], y[:, :-1])
        for row, s in zip(range(batch), _window_starts(x, position)):
            assert x[row].tolist() == tokens[s : s + block].tolist()
            assert y[row].tolist() == tokens[s + 1 : s + block + 1].tolist()


def test_batches_cover_every_window_including_the_last():
    block = 8
    tokens = np.arange(block + 3, dtype=np.uint16)  # exactly 3 possible windows of block+1 tokens
    sampler = BatchSampler(tokens, block, 4, seed=0, device=CPU)
    starts = set()
    for _ in range(50):
        x, y = sampler.next()
        starts.update(int(v) for v in x[:, 0])
        assert int(y.max()) <= int(tokens[-1])
    assert starts == {0, 1, 2}
    # one block exactly fits: only one window, and it is the whole stream
    one = BatchSampler(np.arange(block + 1, dtype=np.uint16), block, 2, seed=0, device=CPU)
    x, y = one.next()
    assert x.tolist() == [list(range(block))] * 2 and y.tolist() == [list(range(1, block + 1))] * 2


def test_too_few_tokens_for_one_block_is_an_error():
    with pytest.raises(LmlabError, match="block"):
        BatchSampler(np.arange(16, dtype=np.uint16), 16, 4, seed=0, device=CPU)


def test_same_seed_same_batches_other_seed_other_batches():
    tokens = np.arange(3000, dtype=np.uint16)
    a = BatchSampler(tokens, 16, 4, seed=7, device=CPU)
    b = BatchSampler(tokens, 16, 4, seed=7, device=CPU)
    c = BatchSampler(tokens, 16, 4, seed=8, device=CPU)
    torch.manual_seed(123)  # the global RNG must not matter
    batches_a = [a.next() for _ in range(6)]
    torch.manual_seed(456)
    batches_b = [b.next() for _ in range(6)]
    batches_c = [c.next() for _ in range(6)]
    for (xa, ya), (xb, yb) in zip(batches_a, batches_b):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert any(not torch.equal(xa, xc) for (xa, _), (xc, _) in zip(batches_a, batches_c))


def test_sampler_state_restores_the_exact_sequence():
    tokens = np.arange(3000, dtype=np.uint16)
    a = BatchSampler(tokens, 16, 4, seed=7, device=CPU)
    for _ in range(3):
        a.next()
    state = {k: v.clone() for k, v in a.state_dict().items()}
    expected = [a.next() for _ in range(5)]
    b = BatchSampler(tokens, 16, 4, seed=999, device=CPU)
    b.next()
    b.load_state_dict(state)
    for x, y in expected:
        x2, y2 = b.next()
        assert torch.equal(x, x2) and torch.equal(y, y2)


# ---------------------------------------------------------------------------------------------------------------
# Named corpora


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    requests: list = []

    def log_message(self, *args):
        pass

    def do_GET(self):
        type(self).requests.append(self.path)
        super().do_GET()


@pytest.fixture
def http_root(tmp_path):
    """Serve tmp_path/www on 127.0.0.1 at a random port; yields (root folder, base URL, list of requested paths)."""
    root = tmp_path / "www"
    root.mkdir()
    handler = type("Handler", (_QuietHandler,), {"requests": []})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(handler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield root, f"http://127.0.0.1:{server.server_address[1]}", handler.requests
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def _named(monkeypatch, name: str, url: str, payload: bytes, sha: str | None = None) -> NamedCorpus:
    spec = NamedCorpus(url=url, sha256=sha or hashlib.sha256(payload).hexdigest(), size=len(payload),
                       description="a test corpus")
    monkeypatch.setitem(data.NAMED_CORPORA, name, spec)
    return spec


def _corpora_dir(cache) -> Path:
    return Path(cache) / "corpora"


def test_named_corpus_downloads_once_into_the_cache(http_root, monkeypatch, isolated_cache):
    root, base, requests = http_root
    payload = make_text(80, seed=9, extra="ünïcödé ✓\n").encode("utf-8")
    (root / "toy.txt").write_bytes(payload)
    _named(monkeypatch, "toy", f"{base}/toy.txt", payload)
    path = data.download_named("toy", quiet=True)
    assert path == _corpora_dir(isolated_cache) / "toy.txt"
    assert path.read_bytes() == payload
    assert requests == ["/toy.txt"]
    # reused: no second request, same file
    corpus = resolve_source("toy")
    assert corpus.files == [path]
    assert requests == ["/toy.txt"]
    assert "".join(iter_text(corpus)) == payload.decode("utf-8")
    assert sorted(p.name for p in _corpora_dir(isolated_cache).iterdir()) == ["toy.txt"]


def test_named_corpus_damaged_cache_is_downloaded_again(http_root, monkeypatch, isolated_cache):
    root, base, requests = http_root
    payload = make_text(30, seed=9).encode("utf-8")
    (root / "toy.txt").write_bytes(payload)
    _named(monkeypatch, "toy", f"{base}/toy.txt", payload)
    _corpora_dir(isolated_cache).mkdir(parents=True)
    (_corpora_dir(isolated_cache) / "toy.txt").write_bytes(payload[: len(payload) // 2])  # an interrupted copy
    path = data.download_named("toy", quiet=True)
    assert path.read_bytes() == payload
    assert requests == ["/toy.txt"]


def test_named_corpus_wrong_sha256_is_an_error_and_leaves_no_file(http_root, monkeypatch, isolated_cache):
    root, base, _ = http_root
    payload = make_text(30, seed=9).encode("utf-8")
    (root / "toy.txt").write_bytes(payload)
    _named(monkeypatch, "toy", f"{base}/toy.txt", payload, sha="0" * 64)
    with pytest.raises(LmlabError) as info:
        resolve_source("toy")
    assert "SHA-256" in str(info.value) and "--data" in str(info.value)
    corpora = _corpora_dir(isolated_cache)
    assert not corpora.exists() or list(corpora.iterdir()) == []


@pytest.mark.parametrize("url", ["http://127.0.0.1:1/x", "missing"])
def test_named_corpus_unreachable_is_an_error_naming_url_and_data_option(http_root, monkeypatch, isolated_cache,
                                                                         url):
    root, base, _ = http_root
    if url == "missing":
        url = f"{base}/not-there.txt"  # the server answers 404
    _named(monkeypatch, "toy", url, b"whatever")
    with pytest.raises(LmlabError) as info:
        resolve_source("toy")
    msg = str(info.value)
    assert url in msg and "--data" in msg
    assert "\n" not in msg
    corpora = _corpora_dir(isolated_cache)
    assert not corpora.exists() or list(corpora.iterdir()) == []


def test_named_corpus_from_a_file_url(tmp_path, monkeypatch, isolated_cache):
    payload = make_text(30, seed=11).encode("utf-8")
    src = tmp_path / "source.txt"
    src.write_bytes(payload)
    _named(monkeypatch, "local", src.as_uri(), payload)
    corpus = resolve_source("local")
    assert corpus.files == [_corpora_dir(isolated_cache) / "local.txt"]
    assert corpus.files[0].read_bytes() == payload
    prepared = prepare(corpus, "char")
    assert prepared.tokenizer.decode(prepared.tokens.tolist()) == payload.decode("utf-8")
