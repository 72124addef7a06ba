"""Sampling: logit filters, next-token draws, cached vs uncached generation, streaming text with a stop string."""

import math
import os
import shutil

import pytest
import torch

from lmlab.common import LmlabError
from lmlab.model import GPT, ModelConfig, build_model
from lmlab.sample import filter_logits, generate, next_token, sampling_probs, stream_text
from lmlab.tokenizer import ByteTokenizer, CharTokenizer

VOCAB = 17


@torch.no_grad()
def tiny_gpt(pos="rope", block_size=8, seed=0, std=0.3, dtype=torch.float64, vocab=VOCAB, **kw):
    torch.manual_seed(seed)
    cfg = ModelConfig(block_size=block_size, n_layer=2, n_head=2, n_embd=16, pos=pos, zero_init_proj=False, **kw)
    model = GPT(cfg, vocab).to(dtype)
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=g, dtype=torch.float64).to(dtype)
        p.copy_(1.0 + 0.2 * noise if (p.dim() == 1 and "norm" in name) else std * noise)
    return model.eval()


@torch.no_grad()
def model_logits(rows=4, seed=1):
    """Next-token logits of a random tiny model after a few different prompts: (rows, V), float32."""
    model = tiny_gpt(seed=seed, std=0.5)
    g = torch.Generator().manual_seed(seed + 100)
    idx = torch.randint(0, VOCAB, (rows, 6), generator=g)
    logits = model(idx)
    out = logits[:, -1, :].float()
    return out / out.std(dim=-1, keepdim=True)  # a spread of about one nat: every kept token gets drawn


def nucleus(probs_row, p):
    """Hand-computed top-p set: the smallest prefix of tokens sorted by probability whose mass reaches p."""
    order = sorted(range(len(probs_row)), key=lambda i: -float(probs_row[i]))
    kept, mass = [], 0.0
    for i in order:
        kept.append(i)
        mass += float(probs_row[i])
        if mass >= p:
            break
    return set(kept)


# ---------------------------------------------------------------------------------------------------------------
# filter_logits


def _kept(filtered):
    return set(torch.nonzero(torch.isfinite(filtered)).flatten().tolist())


@pytest.mark.parametrize("k", [1, 2, 3, 5, 9, 10])
def test_top_k_keeps_exactly_the_k_largest(k):
    g = torch.Generator().manual_seed(k)
    logits = torch.randn(3, 10, generator=g)
    out = filter_logits(logits, top_k=k)
    assert out.shape == logits.shape
    for row in range(3):
        largest = set(sorted(range(10), key=lambda i: -float(logits[row, i]))[:k])
        assert _kept(out[row]) == largest
        # kept logits are untouched (temperature 1), the rest are -inf
        for i in largest:
            assert float(out[row, i]) == pytest.approx(float(logits[row, i]))
        assert all(float(out[row, i]) == float("-inf") for i in set(range(10)) - largest)


def test_top_k_off():
    logits = torch.randn(2, 7)
    torch.testing.assert_close(filter_logits(logits, top_k=0), logits)
    torch.testing.assert_close(filter_logits(logits, top_k=7), logits)
    torch.testing.assert_close(filter_logits(logits, top_k=100), logits)


def test_top_k_on_higher_rank_logits():
    logits = torch.randn(2, 3, 8, generator=torch.Generator().manual_seed(2))
    out = filter_logits(logits, top_k=2)
    assert out.shape == logits.shape
    assert torch.isfinite(out).sum(dim=-1).eq(2).all()
    torch.testing.assert_close(out.max(dim=-1).values, logits.max(dim=-1).values)


PROBS = [0.05, 0.4, 0.1, 0.3, 0.15]  # sorted: 1 (.4), 3 (.3), 4 (.15), 2 (.1), 0 (.05); cumulative .4 .7 .85 .95 1


@pytest.mark.parametrize(
    "p,expected",
    [(0.01, {1}), (0.3, {1}), (0.5, {1, 3}), (0.69, {1, 3}), (0.75, {1, 3, 4}), (0.9, {1, 3, 4, 2}),
     (0.99, {0, 1, 2, 3, 4}), (1.0, {0, 1, 2, 3, 4})],
)
def test_top_p_hand_computed(p, expected):
    logits = torch.tensor(PROBS).log() + 3.0  # an offset changes nothing
    out = filter_logits(logits, top_p=p)
    assert _kept(out) == expected
    assert nucleus(PROBS, p) == expected  # the test's own reference agrees with the hand-written sets
    for i in expected:
        assert float(out[i]) == pytest.approx(float(logits[i]))


def test_top_p_keeps_top_token_even_when_it_alone_exceeds_p():
    logits = torch.tensor([[0.0, 5.0, 1.0], [9.0, 0.0, 0.0]])
    for p in (1e-6, 0.0):
        out = filter_logits(logits, top_p=p)
        assert _kept(out[0]) == {1}
        assert _kept(out[1]) == {0}


def test_top_p_batched_against_reference():
    g = torch.Generator().manual_seed(3)
    logits = 2 * torch.randn(6, 12, generator=g)
    for p in (0.2, 0.55, 0.8, 0.95):
        out = filter_logits(logits, top_p=p)
        probs = logits.double().softmax(-1)
        for row in range(6):
            assert _kept(out[row]) == nucleus(probs[row], p), (p, row)


def test_temperature_scales_logits():
    logits = torch.randn(2, 9, generator=torch.Generator().manual_seed(4))
    for t in (0.5, 1.0, 2.5):
        torch.testing.assert_close(filter_logits(logits, temperature=t), logits / t)
    # temperature is applied before top-p: a sharper distribution keeps fewer tokens
    flat = _kept(filter_logits(logits[0], temperature=5.0, top_p=0.9))
    sharp = _kept(filter_logits(logits[0], temperature=0.2, top_p=0.9))
    assert sharp <= flat and len(sharp) < len(flat)
    probs_t = (logits[0].double() / 5.0).softmax(-1)
    assert flat == nucleus(probs_t, 0.9)
    with pytest.raises(ValueError):
        filter_logits(logits, temperature=0.0)


# ---------------------------------------------------------------------------------------------------------------
# next_token


def test_temperature_zero_is_argmax_and_deterministic():
    logits = model_logits(rows=5)
    expected = logits.argmax(dim=-1)
    for seed in (0, 1, 2):
        gen = torch.Generator().manual_seed(seed)
        assert torch.equal(next_token(logits, 0.0, 0, 1.0, gen), expected)
        assert torch.equal(next_token(logits, 0, 3, 0.5, None), expected)
        assert torch.equal(gen.get_state(), torch.Generator().manual_seed(seed).get_state())  # no number spent


def test_sampling_probs_by_hand():
    logits = model_logits(rows=3)
    greedy = sampling_probs(logits, 0.0, 5, 0.5)  # temperature 0: every filter aside, the argmax gets it all
    assert torch.equal(greedy, torch.nn.functional.one_hot(logits.argmax(-1), VOCAB).float())
    probs = sampling_probs(logits, 0.7, 3, 1.0)
    for row in range(3):
        top3 = logits[row].topk(3).indices.tolist()
        weights = {i: math.exp(float(logits[row, i]) / 0.7) for i in top3}
        for i in range(VOCAB):
            expected = weights[i] / sum(weights.values()) if i in weights else 0.0
            assert float(probs[row, i]) == pytest.approx(expected, rel=1e-5, abs=1e-12)


def _draws(logits, n, top_k=0, top_p=1.0, temperature=1.0, seed=0):
    """n draws for each row: (n, rows)."""
    rows = logits.size(0)
    gen = torch.Generator().manual_seed(seed)
    out = next_token(logits.repeat(n, 1), temperature, top_k, top_p, gen)
    return out.view(n, rows)


def test_top_k_draws_stay_in_top_k():
    logits = model_logits(rows=4, seed=5)
    draws = _draws(logits, 3000, top_k=3)
    for row in range(logits.size(0)):
        top3 = set(torch.topk(logits[row], 3).indices.tolist())
        seen = set(draws[:, row].tolist())
        assert seen <= top3, (seen, top3)
        assert seen == top3  # every one of them does come up
        # frequencies follow the renormalised top-3 probabilities
        probs = logits[row].double().softmax(-1)
        z = sum(float(probs[i]) for i in top3)
        for i in top3:
            freq = float((draws[:, row] == i).double().mean())
            assert freq == pytest.approx(float(probs[i]) / z, abs=0.04)


def test_top_p_draws_stay_in_nucleus():
    logits = model_logits(rows=4, seed=6)
    p = 0.6
    draws = _draws(logits, 3000, top_p=p)
    for row in range(logits.size(0)):
        probs = logits[row].double().softmax(-1)
        keep = nucleus(probs, p)
        assert 1 < len(keep) < VOCAB
        seen = set(draws[:, row].tolist())
        assert seen <= keep, (seen, keep)
        z = sum(float(probs[i]) for i in keep)
        for i in keep:
            freq = float((draws[:, row] == i).double().mean())
            assert freq == pytest.approx(float(probs[i]) / z, abs=0.04)


def test_unfiltered_draws_follow_softmax():
    logits = model_logits(rows=2, seed=7)
    draws = _draws(logits, 4000, temperature=1.5)
    for row in range(2):
        probs = (logits[row].double() / 1.5).softmax(-1)
        freq = torch.bincount(draws[:, row], minlength=VOCAB).double() / 4000
        assert (freq - probs).abs().max() < 0.03


def test_same_seed_same_draws_different_seed_different_draws():
    logits = model_logits(rows=3, seed=8)
    a = _draws(logits, 200, seed=11)
    b = _draws(logits, 200, seed=11)
    c = _draws(logits, 200, seed=12)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_generate_seeded():
    model = tiny_gpt(seed=9, std=0.2)

    def run(seed):
        gen = torch.Generator().manual_seed(seed)
        return list(generate(model, [1, 2, 3], 30, temperature=1.0, generator=gen))

    a, b, c = run(5), run(5), run(6)
    assert len(a) == 30 and all(0 <= t < VOCAB for t in a)
    assert a == b
    assert a != c


# ---------------------------------------------------------------------------------------------------------------
# generate: KV cache against recomputation


@torch.no_grad()
def reference_greedy(model, prompt, n):
    """Greedy decoding written from the documented context policy, recomputing the whole window every step."""
    block = model.cfg.block_size
    window = list(prompt[-block:])
    out = []
    for _ in range(n):
        logits = model(torch.tensor([window]))
        token = int(logits[0, -1].argmax())
        out.append(token)
        window.append(token)
        if len(window) > block:
            window = window[-(block // 2):]
    return out


@pytest.mark.parametrize("pos", ["rope", "learned"])
@pytest.mark.parametrize("prompt_len", [1, 3, 8, 13])
def test_generate_cache_equals_no_cache_greedy(pos, prompt_len):
    model = tiny_gpt(pos=pos, block_size=8, seed=20)
    prompt = torch.randint(0, VOCAB, (prompt_len,), generator=torch.Generator().manual_seed(prompt_len)).tolist()
    cached = list(generate(model, prompt, 40, temperature=0.0, use_cache=True))
    fresh = list(generate(model, prompt, 40, temperature=0.0, use_cache=False))
    assert len(cached) == len(fresh) == 40
    assert cached == fresh
    assert cached == reference_greedy(model, prompt, 40)
    assert len(set(cached)) > 1  # the model is not stuck on one token, so the comparison means something


def test_generate_long_prompt_uses_last_block():
    model = tiny_gpt(pos="learned", block_size=8, seed=11)
    prompt = torch.randint(0, VOCAB, (20,), generator=torch.Generator().manual_seed(0)).tolist()
    with torch.no_grad():
        expected = int(model(torch.tensor([prompt[-8:]]))[0, -1].argmax())
    for use_cache in (True, False):
        first = next(iter(generate(model, prompt, 5, temperature=0.0, use_cache=use_cache)))
        assert first == expected


@pytest.mark.parametrize("pos", ["rope", "learned"])
def test_generate_cache_equals_no_cache_sampling(pos):
    model = tiny_gpt(pos=pos, block_size=8, seed=12)
    prompt = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3]

    def run(use_cache):
        gen = torch.Generator().manual_seed(13)
        return list(generate(model, prompt, 40, temperature=1.0, top_k=5, top_p=0.9, generator=gen,
                             use_cache=use_cache))

    assert run(True) == run(False)


@torch.no_grad()
def window_logits(model, prompt, tokens):
    """The plain forward's next-token logits (len(tokens), V) before each of the tokens, on the window of the
    documented context policy (recomputed whole every time)."""
    block = model.cfg.block_size
    window = list(prompt[-block:])
    rows = []
    for token in tokens:
        rows.append(model(torch.tensor([window]))[0, -1])
        window.append(token)
        if len(window) > block:
            window = window[-(block // 2):]
    return torch.stack(rows)


@pytest.mark.parametrize("use_cache", [True, False], ids=["cache", "no-cache"])
def test_generate_hands_out_the_logits_each_token_was_drawn_from(use_cache):
    """with_logits: the same tokens, each with the raw logits of its draw, across window cuts."""
    model = tiny_gpt(block_size=8, seed=28)
    prompt = [3, 1, 4]

    def run(**kw):
        gen = torch.Generator().manual_seed(29)
        return list(generate(model, prompt, 30, temperature=0.9, top_k=5, generator=gen, use_cache=use_cache, **kw))

    pairs = run(with_logits=True)
    tokens = [token for token, _ in pairs]
    assert tokens == run() and len(set(tokens)) > 1
    assert all(logits.shape == (VOCAB,) for _, logits in pairs)
    torch.testing.assert_close(torch.stack([logits for _, logits in pairs]), window_logits(model, prompt, tokens),
                               atol=1e-10, rtol=0)


@pytest.mark.parametrize("use_cache", [True, False], ids=["cache", "no-cache"])
def test_banned_ids_are_never_drawn_and_the_rest_are_drawn_as_renormalised(use_cache):
    """banned: a model that puts most of its mass on two ids never draws them; the logits handed out are the
    model's own; greedy picks the best of the rest."""
    model = tiny_gpt(block_size=8, seed=30)
    favourite = [2, 5]
    bump = torch.zeros(VOCAB, dtype=torch.float64)
    bump[favourite] = 8.0  # most of the mass on the favourites
    model.register_forward_hook(lambda module, args, logits: logits + bump)

    def run(banned, **kw):
        gen = torch.Generator().manual_seed(31)
        return list(generate(model, [3, 1, 4], 30, generator=gen, use_cache=use_cache, banned=banned, **kw))

    pairs = run(favourite, temperature=1.0, with_logits=True)
    tokens = [t for t, _ in pairs]
    assert not set(tokens) & set(favourite) and len(set(tokens)) > 1
    plain = window_logits(model, [3, 1, 4], tokens)
    torch.testing.assert_close(torch.stack([row for _, row in pairs]), plain, atol=1e-10, rtol=0)
    assert set(plain[0].topk(2).indices.tolist()) == set(favourite)  # the model's favourites, never drawn
    greedy = run(favourite, temperature=0.0)
    allowed = plain[0].clone()
    allowed[favourite] = float("-inf")
    assert greedy[0] == int(allowed.argmax()) and not set(greedy) & set(favourite)
    assert set(run(None, temperature=1.0)) & set(favourite)  # without the ban they are drawn


def test_text_banned_is_every_special_token():
    from lmlab.sample import text_banned

    tok = CharTokenizer("ab")
    assert text_banned(tok) == sorted(tok.special_tokens.values()) and len(text_banned(tok)) == 5
    assert text_banned(ByteTokenizer()) == list(range(256, 261))


def test_generate_bigram_cache_equals_no_cache():
    model = build_model(ModelConfig(arch="bigram", block_size=8), VOCAB)
    with torch.no_grad():
        model.table.weight.copy_(torch.randn(VOCAB, VOCAB, generator=torch.Generator().manual_seed(14)))
    a = list(generate(model, [0], 30, temperature=0.0, use_cache=True))
    b = list(generate(model, [0], 30, temperature=0.0, use_cache=False))
    assert a == b
    # a bigram's greedy chain follows the argmax of each row
    expected, t = [], 0
    for _ in range(30):
        t = int(model.table.weight[t].argmax())
        expected.append(t)
    assert a == expected


def test_generate_edge_cases():
    model = tiny_gpt(seed=15)
    assert list(generate(model, [1, 2], 0)) == []
    with pytest.raises(LmlabError):
        list(generate(model, [], 5))


# ---------------------------------------------------------------------------------------------------------------
# stream_text

CORPUS = "abcdefghijklmnopqrstuvwxyz .,!éSTOP\n"


def _counting(tokens):
    """An iterator over tokens that records how many were pulled."""
    state = {"pulled": 0}

    def gen():
        for t in tokens:
            state["pulled"] += 1
            yield t

    return gen(), state


@pytest.mark.parametrize(
    "text",
    ["hello world", "", "a", "héllo, wörld!\n", "no stop here at all"],
)
def test_stream_text_without_stop_is_full_decode(text):
    tok = CharTokenizer(CORPUS + "ö")
    ids = tok.encode(text)
    pieces = list(stream_text(tok, iter(ids)))
    assert "".join(pieces) == text == tok.decode(ids)
    assert "".join(list(stream_text(tok, iter(ids), stop=None))) == text
    assert "".join(list(stream_text(tok, iter(ids), stop=""))) == text


@pytest.mark.parametrize(
    "text,stop",
    [
        ("hello world. the end. more text", "end"),
        ("hello world STOP and then more STOP", "STOP"),
        ("STOP at the very start", "STOP"),
        ("ab aab aabx aabc rest", "aabc"),  # partial matches of the stop string before the real one
        ("aaab", "aab"),  # overlapping prefix
        ("x!y", "!"),
        ("text that ends in the stop string.", "string."),
        ("no stop string at all here", "zzz"),
        ("ends with a partial sto", "stop"),  # held-back prefix of the stop string is released at the end
        ("ends with a partial st", "stx"),
    ],
)
def test_stream_text_stops_before_stop_string(text, stop):
    tok = CharTokenizer(CORPUS)
    ids = tok.encode(text)
    it, state = _counting(ids)
    out = "".join(stream_text(tok, it, stop=stop))
    at = text.find(stop)
    expected = text[:at] if at >= 0 else text
    assert out == expected
    assert stop not in out
    if at >= 0:
        # generation ends as soon as the stop string is complete: later tokens are never pulled
        assert state["pulled"] == at + len(stop)
        assert list(it) == ids[at + len(stop):]


def test_stream_text_streams_incrementally():
    tok = CharTokenizer(CORPUS)
    ids = tok.encode("abcdefghij STOP tail")
    it, state = _counting(ids)
    stream = stream_text(tok, it, stop="STOP")
    first = next(stream)
    assert first and "abcdefghij".startswith(first)
    assert state["pulled"] <= 4  # a piece comes out before the whole text has been generated
    it2, state2 = _counting(ids)
    assert next(stream_text(tok, it2)) == "a" and state2["pulled"] == 1


def test_stream_text_with_bytes_and_multibyte_stop():
    tok = ByteTokenizer()
    text = "héllo €uro 😀 and € again"
    ids = tok.encode(text)
    assert len(ids) > len(text)  # multi-byte characters really are split over several tokens
    assert "".join(stream_text(tok, iter(ids))) == text
    assert "".join(stream_text(tok, iter(ids), stop="€")) == "héllo "
    assert "".join(stream_text(tok, iter(ids), stop="😀 and")) == "héllo €uro "
    assert "".join(stream_text(tok, iter(ids), stop="é")) == "h"


@pytest.mark.parametrize("stop", [None, "zz", "€"])
def test_stream_text_truncated_character_decodes_like_decode(stop):
    """Generation can end in the middle of a multi-byte character: the tail is flushed like Tokenizer.decode does."""
    tok = ByteTokenizer()
    ids = tok.encode("ab é") + list("€".encode("utf-8"))[:2]
    expected = tok.decode(ids)
    assert expected == "ab é\ufffd"
    assert "".join(stream_text(tok, iter(ids), stop=stop)) == expected


# ---------------------------------------------------------------------------------------------------------------
# StreamDecoder


def test_stream_decoder_reassembles_multibyte_characters():
    tok = ByteTokenizer()
    text = "aé€😀z, ñ 中文"
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8"))
    dec = tok.stream_decoder()
    pieces = [dec.push(t) for t in ids]
    tail = dec.flush()
    assert tail == ""
    assert "".join(pieces) == text
    assert "\ufffd" not in "".join(pieces)
    # a piece appears exactly when the last byte of a character arrives, and is that character
    expected = []
    for ch in text:
        expected.extend([""] * (len(ch.encode("utf-8")) - 1) + [ch])
    assert pieces == expected


def test_stream_decoder_incomplete_tail_is_replaced_on_flush():
    tok = ByteTokenizer()
    dec = tok.stream_decoder()
    euro = "€".encode("utf-8")
    assert dec.push(ord("a")) == "a"
    assert dec.push(euro[0]) == ""
    assert dec.push(euro[1]) == ""
    assert dec.flush() == "\ufffd"


def test_stream_decoder_char_tokenizer():
    tok = CharTokenizer("aé€😀")
    ids = tok.encode("😀aé€a")
    dec = tok.stream_decoder()
    assert [dec.push(i) for i in ids] == ["😀", "a", "é", "€", "a"]
    assert len(ids) == 5


# ---------------------------------------------------------------------------------------------------------------
# generate(compile=True): the static-shape step through torch.compile, against the uncached path

requires_compiler = pytest.mark.skipif(
    not any(shutil.which(c) for c in (os.environ.get("CXX", "g++"), "g++", "c++", "clang++")),
    reason="torch.compile on CPU needs a C++ compiler")


@pytest.mark.slow
@requires_compiler
def test_generate_compiled_equals_no_cache(monkeypatch):
    """Crosses the window cut several times: the compiled re-encode, single decode steps and runs of decode steps in
    one call (block 8: runs of 4), sampling with top-k and top-p inside the compiled graph, give the uncached tokens.
    (One setting: each graph compiles for 10 s or more.)"""
    import lmlab.generate as sample

    model = tiny_gpt(pos="rope", block_size=8, seed=26, dtype=torch.float32, std=0.2)
    prompt = [3, 1, 4]
    runs = []
    call = sample._call
    monkeypatch.setattr(sample, "_call", lambda fn, warm, *args: runs.append(len(args)) or call(fn, warm, *args))

    def run(**kw):
        gen = torch.Generator().manual_seed(27)
        return list(generate(model, prompt, 30, temperature=1.0, top_k=5, top_p=0.9, generator=gen, banned=[0],
                             **kw))

    compiled = run(use_cache=True, compile=True)
    assert 12 in runs and 10 in runs  # both kinds of decode call ran (_decode takes n, _step does not)
    assert 0 not in compiled  # banned inside the compiled graph too
    assert compiled == run(use_cache=False)
    assert compiled == run(use_cache=True)
    assert len(set(compiled)) > 1
    # the compiled decoder hands out each token's logits too (the graphs above serve: nothing compiles again)
    pairs = run(use_cache=True, compile=True, with_logits=True)
    assert [token for token, _ in pairs] == compiled
    torch.testing.assert_close(torch.stack([logits for _, logits in pairs]), window_logits(model, prompt, compiled),
                               atol=1e-5, rtol=1e-5)
