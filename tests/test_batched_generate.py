"""Batched generation (generate.generate_batch) against its oracle, generating each row alone (generate) with the
same seed: the same tokens, the same logits (float32, within 1e-5: batched kernels sum in another order), rows of
different lengths whose windows are cut at different times, each row ending at its own stop or budget."""

from __future__ import annotations

import pytest
import test_sample as sample_tests
import torch

from lmlab.generate import generate, generate_batch
from lmlab.tokenizer import CharTokenizer

VOCAB = sample_tests.VOCAB
ATOL = 1e-5  # float32 logits of a row in a batch against the same row alone


def tiny_gpt(dtype=torch.float32, **kw):
    """test_sample's random tiny GPT (vocabulary 17, block 8 unless told), in float32 unless told."""
    return sample_tests.tiny_gpt(dtype=dtype, **kw)


PROMPTS = [[3, 1, 4], [1], [5, 9, 2, 6, 5, 3, 5], [8, 9, 7, 9, 3], [2, 7, 1, 8, 2, 8, 1, 8, 2, 8, 4]]  # the last > block
SEEDS = [11, 12, 13, 14, 15]


def alone(model, prompt, n, seed, **kw):
    """The oracle: (tokens, logits (n, V)) of generate on this prompt alone, with its own generator."""
    pairs = list(generate(model, prompt, n, generator=torch.Generator().manual_seed(seed), with_logits=True, **kw))
    return [t for t, _ in pairs], torch.stack([lg for _, lg in pairs])


def cut_at_stop(tokens, stop_ids):
    """tokens up to and including the first stop id."""
    for i, t in enumerate(tokens):
        if t in stop_ids:
            return tokens[: i + 1]
    return tokens


@pytest.mark.parametrize("pos", ["rope", "learned"])
@pytest.mark.parametrize("sampling", [dict(temperature=1.0, top_k=6, top_p=0.9), dict(temperature=0.0)],
                         ids=["sampled", "greedy"])
def test_each_row_gets_the_tokens_and_logits_it_gets_alone(pos, sampling):
    """Prompts of 1 to 11 tokens (block 8: windows cut at different steps, several times), per-row budgets, banned
    ids: every row equals generate with its seed, and its logprobs are the log-softmax of its logits."""
    model = tiny_gpt(pos=pos, seed=3)
    budgets = [20, 13, 25, 0, 18]
    out = generate_batch(model, PROMPTS, budgets, seeds=SEEDS, banned=[0, 16], with_logits=True, **sampling)
    assert len(out) == len(PROMPTS)
    for prompt, n, seed, row in zip(PROMPTS, budgets, SEEDS, out):
        tokens, logits = alone(model, prompt, n, seed, banned=[0, 16], **sampling) if n else ([], None)
        assert row.tokens == tokens
        assert row.finish_reason == "length"
        assert not {0, 16} & set(row.tokens)
        if n:
            torch.testing.assert_close(row.logits, logits, atol=ATOL, rtol=0)
            expected = logits.log_softmax(-1).gather(-1, torch.tensor(tokens)[:, None])[:, 0]
            torch.testing.assert_close(torch.tensor(row.logprobs), expected, atol=ATOL, rtol=0)
    assert len({tuple(r.tokens) for r in out if r.tokens}) == 4  # the rows differ: each has its own prompt and seed


@pytest.mark.parametrize("prompts", [PROMPTS, [[1, 2, 3], [4, 5, 6], [7, 8, 9], [1, 2, 3]]],
                         ids=["different-lengths", "same-length"])
def test_rows_end_at_their_own_stop_token(prompts):
    """A stop id ends its row (the stop id is its last token) while the others go on; rows of the same length
    start on the shared-slot step and go on at their own slots once one has ended. Same seed, same prompt: same
    row (the same-length batch repeats its first prompt with its seed)."""
    model = tiny_gpt(seed=5)
    seeds = SEEDS[: len(prompts) - 1] + [SEEDS[0]]
    single = [alone(model, p, 24, s)[0] for p, s in zip(prompts, seeds)]
    # a stop id that ends some rows early and at different steps, and leaves at least one row to its budget
    counts = {t: sum(t in tokens[:20] for tokens in single) for t in range(VOCAB)}
    stop = min((t for t in counts if 0 < counts[t] < len(prompts)), key=lambda t: (-counts[t], t))
    out = generate_batch(model, prompts, 24, seeds=seeds, stop_ids=[stop])
    for tokens, row in zip(single, out):
        assert row.tokens == cut_at_stop(tokens, {stop})
        assert row.finish_reason == ("stop" if stop in tokens else "length")
    assert {r.finish_reason for r in out} == {"stop", "length"}
    assert len({len(r.tokens) for r in out}) >= 2
    if prompts[-1] == prompts[0]:
        assert out[-1].tokens == out[0].tokens


def test_rows_end_at_a_stop_string():
    """A stop string, decoded with the tokenizer, ends a row at the token that completes it, even across tokens."""
    tok = CharTokenizer("abcdefghijkl")
    model = tiny_gpt(seed=7)
    prompts = [tok.encode("abc"), tok.encode("l"), tok.encode("kjihg")]
    specials = sorted(tok.special_tokens.values())  # banned: every token is one character
    single = [alone(model, p, 30, s, banned=specials)[0] for p, s in zip(prompts, SEEDS)]
    texts = [tok.decode(t) for t in single]
    stop = texts[0][5:7]  # two characters: completed by the second token
    out = generate_batch(model, prompts, 30, seeds=SEEDS[:3], stop_strings=[stop], tokenizer=tok,
                         banned=specials)
    for tokens, text, row in zip(single, texts, out):
        end = text.find(stop)
        assert row.tokens == (tokens if end < 0 else tokens[: end + len(stop)])
        assert row.finish_reason == ("length" if end < 0 else "stop")
    assert out[0].finish_reason == "stop" and tok.decode(out[0].tokens).endswith(stop)
    with pytest.raises(ValueError, match="tokenizer"):
        generate_batch(model, prompts, 3, stop_strings=["x"])


def test_one_row_is_generate_and_the_recomputing_path_agrees():
    """B = 1 is generate; without the cache (every window recomputed, row by row) the batch gives the same rows."""
    model = tiny_gpt(seed=9)
    kw = dict(temperature=0.8, top_k=0, top_p=0.95)
    for prompt, seed in zip(PROMPTS, SEEDS):
        [row] = generate_batch(model, [prompt], 17, seeds=[seed], **kw)
        assert row.tokens == alone(model, prompt, 17, seed, **kw)[0]
    cached = generate_batch(model, PROMPTS, 17, seeds=SEEDS, **kw)
    recomputed = generate_batch(model, PROMPTS, 17, seeds=SEEDS, use_cache=False, **kw)
    assert [r.tokens for r in cached] == [r.tokens for r in recomputed]
    # generators advance in place: the same numbers as the seeds
    gens = [torch.Generator().manual_seed(s) for s in SEEDS]
    assert [r.tokens for r in generate_batch(model, PROMPTS, 17, generators=gens, **kw)] == [r.tokens for r in cached]


def test_arguments_are_checked():
    model = tiny_gpt(seed=9)
    assert generate_batch(model, [], 5) == []
    with pytest.raises(ValueError, match="one entry per row"):
        generate_batch(model, PROMPTS, [3, 4], seeds=SEEDS)
    with pytest.raises(ValueError, match="not both"):
        generate_batch(model, PROMPTS[:1], 3, seeds=[1], generators=[torch.Generator()])
    with pytest.raises(Exception, match="at least one prompt token"):
        generate_batch(model, [[1], []], 3)


@pytest.mark.parametrize("pos", ["rope", "learned"])
def test_decode_step_with_a_position_per_row_matches_each_rows_forward(pos):
    """model(idx, cache, pos) with pos (B,): each row written at and attending up to its own slot, rotated (or
    embedded) at its own position, gives the logits of its own full forward."""
    model = tiny_gpt(pos=pos, seed=11, dtype=torch.float64)
    rows = [[1, 2, 3, 4, 5, 6, 7], [8, 9, 10], [11, 12, 13, 14, 15]]
    cache = model.make_cache(len(rows))
    with torch.no_grad():
        for b, row in enumerate(rows):  # each row's prefix but its last token, into its own cache row
            part = model.make_cache(1)
            model(torch.tensor([row[:-1]]), cache=part)
            for mine, its in zip(cache.k + cache.v, part.k + part.v):
                mine[b] = its[0]
        at = torch.tensor([len(r) - 1 for r in rows])
        step = model(torch.tensor([[r[-1]] for r in rows]), cache=cache, pos=at)[:, 0]  # (B, V)
        for b, row in enumerate(rows):
            torch.testing.assert_close(step[b], model(torch.tensor([row]))[0, -1], atol=1e-10, rtol=0)
        with pytest.raises(ValueError):
            model(torch.tensor([[1], [2], [3]]), cache=cache, pos=torch.tensor([1, 2]))


@pytest.mark.slow
@sample_tests.requires_compiler
def test_compiled_batch_gives_each_rows_tokens(monkeypatch):
    """compile=True with rows of different lengths: the compiled decode steps (single and runs of 8, each row at its
    own slot), a row ending mid-run, windows cut at different steps: every row as generated alone."""
    import lmlab.generate as gen

    runs = []
    call = gen._call
    monkeypatch.setattr(gen, "_call", lambda fn, warm, *args: runs.append(len(args)) or call(fn, warm, *args))
    monkeypatch.setattr(gen, "DECODE_CHUNK", 3)  # runs of 3: the same paths as 8, a third of the graph to compile
    model = tiny_gpt(seed=13, block_size=16)
    prompts, seeds = PROMPTS[:3], SEEDS[:3]
    kw = dict(temperature=1.0, top_k=5, top_p=0.9)
    single = [alone(model, p, 40, s, **kw)[0] for p, s in zip(prompts, seeds)]
    stop = single[1][9]
    out = generate_batch(model, prompts, 40, seeds=seeds, stop_ids=[stop], compile=True, with_logits=True, **kw)
    for prompt, seed, tokens, row in zip(prompts, seeds, single, out):
        assert row.tokens == cut_at_stop(tokens, {stop})
        torch.testing.assert_close(row.logits, alone(model, prompt, len(row.tokens), seed, **kw)[1], atol=ATOL,
                                   rtol=0)
    assert out[1].finish_reason == "stop" and any(r.finish_reason == "length" for r in out)
    assert 12 in runs and 10 in runs  # both kinds of compiled decode call ran (_decode takes n, _step does not)


def test_ended_rows_leave_the_batch_and_the_cache_is_made_once(monkeypatch):
    """Rows of different lengths, ending at different steps on a stop id or their budgets: the ended rows are
    dropped from the cache (KVCache.keep, rows going down), every row still equals generate alone with its seed,
    and the decode steps write into the one cache made at the start (its buffers never replaced or grown)."""
    from lmlab.kvcache import KVCache

    model = tiny_gpt(seed=21, block_size=16)
    prompts, seeds = PROMPTS + [[4, 4], [6]], SEEDS + [16, 17]
    budgets = [30, 6, 30, 11, 30, 3, 30]
    kw = dict(temperature=1.0, top_k=0, top_p=0.95)
    single = [alone(model, p, n, s, **kw)[0] for p, n, s in zip(prompts, budgets, seeds)]
    stop = next(t for t in single[0][2:] if sum(t in tokens for tokens in single) < len(prompts))
    kept, buffers = [], set()
    keep, step, steps = KVCache.keep, KVCache.step, KVCache.steps
    monkeypatch.setattr(KVCache, "keep", lambda self, index, slots: kept.append(len(index)) or keep(self, index, slots))

    def spy(self, layer, pos, heads):
        handed = step(self, layer, pos, heads)
        if pos is not None:  # a decode step with each row at its own slot
            buffers.add((id(self), self.k[layer].data_ptr(), tuple(self.k[layer].shape)))
        return handed

    def spy_all(self, pos, heads):  # every layer's step at once (the model taking the blocks itself)
        handed = steps(self, pos, heads)
        for layer in range(len(handed)):
            spy(self, layer, pos, heads)
        return handed

    monkeypatch.setattr(KVCache, "step", spy)
    monkeypatch.setattr(KVCache, "steps", spy_all)
    out = generate_batch(model, prompts, budgets, seeds=seeds, stop_ids=[stop], **kw)
    for tokens, row in zip(single, out):
        assert row.tokens == cut_at_stop(tokens, {stop})
    assert kept and kept == sorted(kept, reverse=True) and kept[-1] < len(prompts)
    assert {r.finish_reason for r in out} == {"stop", "length"}
    assert len({cache for cache, _, _ in buffers}) == 1  # one cache for every decode step
    assert {shape for _, _, shape in buffers} == {(len(prompts), 2, 16, 8)}  # (B, H, block, D): never grown
    assert len(buffers) == model.cfg.n_layer  # one buffer per layer, the same at every step


def test_a_run_of_steps_draws_the_rows_numbers_as_alone():
    """Eager batches decode in runs of several steps (DECODE_CHUNK numbers drawn per row at once, one sync per run):
    the tokens are those of generate alone, which decodes one step at a time, for budgets that end inside a run."""
    import lmlab.generate as gen

    model = tiny_gpt(seed=23, block_size=32)
    prompts, seeds = [[1], [2, 3], [4, 5, 6]], SEEDS[:3]
    budgets = [gen.DECODE_CHUNK * 2 + 3, 5, gen.DECODE_CHUNK + 1]
    out = generate_batch(model, prompts, budgets, seeds=seeds, temperature=1.0)
    for prompt, n, seed, row in zip(prompts, budgets, seeds, out):
        assert row.tokens == alone(model, prompt, n, seed, temperature=1.0)[0]


def test_a_step_that_reads_the_whole_cache_gives_each_rows_tokens_and_logits(monkeypatch):
    """Rows that share their slot decode with the plain cached step, which for many heads reads the whole cache with
    its unfilled slots masked (KVCache.unfilled) rather than a slice, its slots growing (here 3 at a time, moved in
    place: KVCache.reserve): every row still equals generate alone (which reads the slice), tokens and logits, and
    windows cut on the way (block 16) change nothing."""
    import lmlab.kvcache as kvcache

    model = tiny_gpt(seed=27, block_size=16)
    prompts, seeds = [[1, 2], [3, 4], [5, 6], [7, 8], [9, 10]], SEEDS
    single = [alone(model, p, 30, s) for p, s in zip(prompts, seeds)]
    monkeypatch.setattr(kvcache, "GROW_SLOTS", 3)
    whole = []
    unfilled = kvcache.KVCache.unfilled
    monkeypatch.setattr(kvcache, "WHOLE_CACHE_HEADS", len(prompts) * model.cfg.n_head)
    monkeypatch.setattr(kvcache.KVCache, "unfilled",
                        lambda self, heads: whole.append(mask := unfilled(self, heads)) or mask)
    out = generate_batch(model, prompts, 30, seeds=seeds, with_logits=True)
    for (tokens, logits), row in zip(single, out):
        assert row.tokens == tokens
        torch.testing.assert_close(row.logits, logits, atol=ATOL, rtol=0)
    assert any(mask is not None for mask in whole)
