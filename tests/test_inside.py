"""Looking inside the model (lmlab/inside.py) and the synthetic corpora (lmlab/synthetic.py): the traced forward
against the model's own, what inside computes against the values of the earlier hand-wired trace, head scores
against a naive loop on hand-built attention patterns, the logit lens against the model's output and the probe, the
loss by position against evaluate, the stated entropy rates against a Monte-Carlo estimate, and what training
records, `lmlab inside`, `lmlab eval` and the report make of it."""

from __future__ import annotations

import ast
import json
import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import read_jsonl, tiny_config, write_corpus
from lmlab import synthetic
from lmlab.cli import main
from lmlab.common import LmlabError
from lmlab.evaluate import evaluate
from lmlab.inside import (SCORES, InsideRecorder, at_step, head_scores, logit_lens, loss_by_position,
                          repeat_losses, repeated_sequences, summary, trace)
from lmlab.model import ModelConfig, build_model
from lmlab.tokenizer import CharTokenizer


def small_model(seed: int = 0, vocab: int = 23, **kw) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = dict(block_size=24, n_layer=2, n_head=2, n_embd=16, zero_init_proj=False)
    return build_model(ModelConfig(**{**cfg, **kw}), vocab).eval()


# ---------------------------------------------------------------------------------------------------------------
# The traced forward


@pytest.mark.parametrize("kw", [
    {}, {"pos": "learned", "norm": "layernorm", "bias": True}, {"qk_norm": False, "mlp": "swiglu"},
    {"mlp": "gelu", "tie_embeddings": True, "n_layer": 3, "n_head": 4},
    {"value_embed": True, "unet_skips": True, "logit_softcap": 3.0, "n_layer": 4},
    {"unet_skips": True, "n_layer": 3},
])
def test_trace_gives_the_models_logits_and_causal_attention(kw):
    model = small_model(**kw)
    idx = torch.randint(23, (3, 24), generator=torch.Generator().manual_seed(1))
    seen = trace(model, idx)
    with torch.no_grad():
        expected = model(idx)
    torch.testing.assert_close(seen.logits, expected, rtol=1e-5, atol=1e-5)
    n_layer, n_head = model.cfg.n_layer, model.cfg.n_head
    assert len(seen.attention) == n_layer and len(seen.residual) == n_layer + 1
    for weights in seen.attention:
        assert weights.shape == (3, n_head, 24, 24)
        torch.testing.assert_close(weights.sum(-1), torch.ones(3, n_head, 24))
        assert (weights.triu(1) == 0).all()  # nothing attends to a later position
    with torch.no_grad():
        embedding = model.wte(idx) + (model.wpe.weight[:24] if model.wpe is not None else 0)
        torch.testing.assert_close(seen.residual[0], embedding)


def test_trace_on_a_trained_run_matches_fused_attention_on_a_prefix():
    """Shorter sequences than the context (the probe prompts) use the first rotary positions, as forward does."""
    model = small_model(seed=3)
    idx = torch.randint(23, (1, 7))
    with torch.no_grad():
        torch.testing.assert_close(trace(model, idx).logits, model(idx), rtol=1e-5, atol=1e-5)


def test_the_training_forward_is_not_changed_by_tracing():
    """trace only reads the model: the next training forward gives the same loss and gradients as before."""
    model = small_model(seed=4).train()
    idx = torch.randint(23, (2, 24))
    before = model(idx).sum()
    trace(model, idx)
    assert model.training
    torch.testing.assert_close(model(idx).sum(), before)


# ---------------------------------------------------------------------------------------------------------------
# What inside computes, against the values of the hand-wired trace it replaced

# Head scores, repeat losses (first, second) and the logit lens's top 5 at the last token of LENS_PROMPT, from the
# blocks' wiring written out in inside.trace before it captured the model's own forward (commit 5c52c05), on the
# models of seeded_model with the configurations of GOLDEN_CONFIGS, in float64.
TODAYS_VALUES = {
    "rope": {
        "previous_token": [  # layer by layer, head by head
            [0.1343822764, 0.1248218522],
            [0.1187349997, 0.104625232],
        ],
        "induction": [  # layer by layer, head by head
            [0.0572585311, 0.0596388744],
            [0.0419850953, 0.0488071415],
        ],
        "duplicate_token": [  # layer by layer, head by head
            [0.0495416996, 0.0508052563],
            [0.0436008018, 0.0533522774],
        ],
        "repeat_loss": [3.8831154936, 3.6070878537],
        "lens": [  # stream by stream: the top 5 (token, probability)
            [[8, 0.2402318461], [10, 0.1045380468], [20, 0.095058203], [6, 0.0704882482], [21, 0.0640969723]],
            [[21, 0.29293197], [14, 0.094038641], [15, 0.0838203967], [7, 0.0761457589], [11, 0.0748876235]],
            [[20, 0.2016396034], [15, 0.1222316597], [8, 0.1102403026], [21, 0.1029443357], [14, 0.0782074379]],
        ],
    },
    "learned": {
        "previous_token": [  # layer by layer, head by head
            [0.1039038579, 0.1288236643],
            [0.1188401042, 0.1022719725],
        ],
        "induction": [  # layer by layer, head by head
            [0.0518130499, 0.0485760005],
            [0.0785315058, 0.0688570523],
        ],
        "duplicate_token": [  # layer by layer, head by head
            [0.0517559389, 0.0437640657],
            [0.0641536918, 0.0740053177],
        ],
        "repeat_loss": [4.3530641381, 4.2390929924],
        "lens": [  # stream by stream: the top 5 (token, probability)
            [[9, 0.250025815], [16, 0.1380883182], [20, 0.1040729631], [22, 0.0783631215], [3, 0.0731127549]],
            [[16, 0.1508755295], [0, 0.1358872827], [9, 0.0942393404], [7, 0.0787646067], [15, 0.0744504893]],
            [[3, 0.3778275954], [9, 0.1339667221], [0, 0.1338109981], [16, 0.0620865546], [15, 0.0486299465]],
        ],
    },
    "ve_unet": {
        "previous_token": [  # layer by layer, head by head
            [0.1370122043, 0.1478254611],
            [0.0887209699, 0.1150945807],
            [0.1064630211, 0.0980756195],
            [0.1253278427, 0.1637698536],
        ],
        "induction": [  # layer by layer, head by head
            [0.0668576754, 0.0634981622],
            [0.1025736201, 0.0534282792],
            [0.0708016002, 0.060365453],
            [0.0440452183, 0.0457851598],
        ],
        "duplicate_token": [  # layer by layer, head by head
            [0.0477106504, 0.0358643749],
            [0.0908313359, 0.0397112716],
            [0.0554139957, 0.0445304905],
            [0.0359529293, 0.0406973963],
        ],
        "repeat_loss": [3.4547528987, 3.5884100371],
        "lens": [  # stream by stream: the top 5 (token, probability)
            [[18, 0.120209016], [9, 0.098199803], [2, 0.0811295444], [13, 0.0781232438], [3, 0.0748760401]],
            [[13, 0.1465673953], [9, 0.1138220949], [11, 0.0710830292], [4, 0.0629764804], [6, 0.0605217702]],
            [[9, 0.1457929101], [13, 0.1225267195], [11, 0.0888016957], [6, 0.0750517782], [4, 0.0574619455]],
            [[9, 0.1352442657], [13, 0.1288416315], [11, 0.0924923896], [6, 0.067586383], [10, 0.0574020943]],
            [[9, 0.1338766205], [13, 0.1140425404], [10, 0.0813584889], [11, 0.0726921669], [18, 0.0617254105]],
        ],
    },
    "unet_odd": {
        "previous_token": [  # layer by layer, head by head
            [0.1740224826, 0.1311635761],
            [0.1382322063, 0.1434956648],
            [0.1122629124, 0.1034924769],
        ],
        "induction": [  # layer by layer, head by head
            [0.0775081781, 0.0468912114],
            [0.0293938107, 0.0568539454],
            [0.0573036816, 0.0769118367],
        ],
        "duplicate_token": [  # layer by layer, head by head
            [0.0291789952, 0.0205624578],
            [0.0569079116, 0.0534129239],
            [0.0819992707, 0.0622979877],
        ],
        "repeat_loss": [3.6269716288, 3.6856356243],
        "lens": [  # stream by stream: the top 5 (token, probability)
            [[14, 0.895692824], [10, 0.0175310131], [9, 0.0144679771], [22, 0.0123222878], [5, 0.0110634196]],
            [[21, 0.5012658407], [7, 0.069259884], [4, 0.0650682729], [5, 0.062429147], [11, 0.0466418366]],
            [[21, 0.5473820737], [5, 0.116636177], [18, 0.1026632843], [14, 0.0326334348], [11, 0.0302239657]],
            [[21, 0.6743509152], [5, 0.0811534566], [18, 0.0406714158], [16, 0.0223331931], [12, 0.0215775249]],
        ],
    },
}

GOLDEN_CONFIGS = {
    "rope": {},
    "learned": {"pos": "learned", "norm": "layernorm", "bias": True},
    "ve_unet": {"value_embed": True, "unet_skips": True, "logit_softcap": 3.0, "n_layer": 4},
    "unet_odd": {"unet_skips": True, "n_layer": 3, "mlp": "swiglu", "qk_norm": False, "tie_embeddings": True},
}
LENS_PROMPT = [5, 3, 17, 8, 8, 2, 11, 20, 0, 14]


def seeded_model(seed: int, **kw) -> torch.nn.Module:
    """A float64 model of 23 tokens whose every parameter is moved by normal(0, 0.3) noise from a fixed seed."""
    torch.manual_seed(seed)
    cfg = dict(block_size=24, n_layer=2, n_head=2, n_embd=16)
    model = build_model(ModelConfig(**{**cfg, **kw}), 23).double().eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=gen, dtype=torch.float64))
    return model


@pytest.mark.parametrize("seed,name", list(enumerate(GOLDEN_CONFIGS)))
def test_inside_computes_what_the_hand_wired_trace_did(seed, name):
    """To 1e-6 from the functions the recorder uses, and to its rounding in the record itself."""
    model, stored = seeded_model(seed, **GOLDEN_CONFIGS[name]), TODAYS_VALUES[name]
    length = 12
    idx = repeated_sequences(23, length, 4)
    seen = trace(model, idx)
    scores = [head_scores(w, length) for w in seen.attention]
    for score in SCORES:
        expected = torch.tensor(stored[score], dtype=torch.float64)  # (L, H)
        torch.testing.assert_close(torch.stack([s[score] for s in scores]), expected, atol=1e-6, rtol=0)
    assert list(repeat_losses(seen.logits, idx, length)) == pytest.approx(stored["repeat_loss"], abs=1e-6, rel=0)
    seen = trace(model, torch.tensor([LENS_PROMPT]))
    assert len(seen.residual) == len(stored["lens"])
    for stream, top in zip(seen.residual, stored["lens"]):
        probs, ids = logit_lens(model, stream[0, -1]).softmax(-1).topk(5)
        assert ids.tolist() == [i for i, _ in top]
        assert probs.tolist() == pytest.approx([p for _, p in top], abs=1e-6, rel=0)

    tokenizer = CharTokenizer(set("abcdefghijklmnopqrstuvw"))  # 23 symbols, ids in alphabetical order
    prompt = tokenizer.decode(LENS_PROMPT)
    val = np.array(tokenizer.encode("abcdefghijklmnopqrstuvw" * 8))
    record = InsideRecorder(tokenizer, [prompt], val, 24, 4).record(model, 0)
    for score in SCORES:
        expected = torch.tensor(stored[score], dtype=torch.float64)
        recorded = torch.tensor(record["heads"][score], dtype=torch.float64)  # rounded to 4 digits
        torch.testing.assert_close(recorded, expected, atol=1e-4, rtol=0)
    repeat = record["repeat_loss"]
    assert [repeat["first"], repeat["second"]] == pytest.approx(stored["repeat_loss"], abs=1e-4, rel=0)
    assert record["lens"][0]["prompt"] == prompt
    for recorded, top in zip(record["lens"][0]["top"], stored["lens"], strict=True):
        assert [t for t, _ in recorded] == [tokenizer.decode([i]) for i, _ in top]
        assert [p for _, p in recorded] == pytest.approx([p for _, p in top], abs=1e-4, rel=0)


# the model's parts that make up its wiring: inside reads none of them, only the forward's hook points
WIRING = {"blocks", "wte", "wpe", "vte", "ve_weights", "skip_weights", "norm1", "norm2", "attn", "mlp", "qkv", "proj",
          "heads", "q_norm", "k_norm", "norm_f", "lm_head", "rope_cos", "rope_sin", "embed", "value_embeds",
          "skip_in", "skip_out"}


def test_inside_holds_no_block_wiring():
    """inside.py touches none of the model's parts and runs no block: it calls the model, captures, and applies
    model.head for the lens."""
    source = Path(__file__).parent.parent / "lmlab" / "inside.py"
    tree = ast.parse(source.read_text())
    touched = {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)}
    assert not touched & WIRING, f"inside.py reads the model's parts {sorted(touched & WIRING)}"
    assert {"capture", "head"} <= touched


# ---------------------------------------------------------------------------------------------------------------
# Head scores, on hand-built attention patterns


def naive_scores(weights: torch.Tensor, length: int) -> dict[str, list[float]]:
    """The three scores with plain loops over batch, head and position."""
    B, H, T, _ = weights.shape
    out = {name: [] for name in SCORES}
    for h in range(H):
        prev = [weights[b, h, t, t - 1].item() for b in range(B) for t in range(1, T)]
        ind = [weights[b, h, length + i, i + 1].item() for b in range(B) for i in range(length)]
        dup = [weights[b, h, length + i, i].item() for b in range(B) for i in range(length)]
        out["previous_token"].append(sum(prev) / len(prev))
        out["induction"].append(sum(ind) / len(ind))
        out["duplicate_token"].append(sum(dup) / len(dup))
    return out


def pattern(T: int, target) -> torch.Tensor:
    """A (T, T) attention pattern: all of row t on target(t) where that is a valid position, else on t itself."""
    A = torch.zeros(T, T)
    for t in range(T):
        k = target(t)
        A[t, k if k is not None and 0 <= k <= t else t] = 1.0
    return A


def test_head_scores_of_hand_built_heads():
    L = 6
    T = 2 * L
    heads = torch.stack([
        pattern(T, lambda t: t - 1),  # a previous-token head
        pattern(T, lambda t: t - L + 1 if t >= L else None),  # an induction head: L+i -> i+1
        pattern(T, lambda t: t - L if t >= L else None),  # a duplicate-token head: L+i -> i
        pattern(T, lambda t: 0),  # attends to the first token only
    ])[None]  # (1, 4, T, T)
    scores = {k: v.tolist() for k, v in head_scores(heads, L).items()}
    assert scores["previous_token"] == pytest.approx([1.0, 0.0, 0.0, 1 / (T - 1)])
    assert scores["induction"] == pytest.approx([0.0, 1.0, 0.0, 0.0])
    assert scores["duplicate_token"] == pytest.approx([0.0, 0.0, 1.0, 1 / L])  # L+0 -> 0 is the first token


def test_head_scores_match_a_naive_loop_on_random_causal_patterns():
    L = 5
    logits = torch.randn(3, 4, 2 * L, 2 * L, generator=torch.Generator().manual_seed(0))
    weights = logits.masked_fill(torch.ones(2 * L, 2 * L, dtype=torch.bool).triu(1), float("-inf")).softmax(-1)
    scores = head_scores(weights, L)
    for name, values in naive_scores(weights, L).items():
        assert scores[name].tolist() == pytest.approx(values, abs=1e-6)


def test_repeated_sequences_are_fixed_and_have_distinct_tokens_where_they_can():
    a, b = repeated_sequences(50, 20, 3), repeated_sequences(50, 20, 3)
    assert torch.equal(a, b) and a.shape == (3, 40)
    assert torch.equal(a[:, :20], a[:, 20:])
    assert all(len(set(row[:20].tolist())) == 20 for row in a)
    assert repeated_sequences(8, 20, 2).max() < 8  # a vocabulary smaller than the sequence: tokens repeat


def test_repeat_losses_on_hand_built_logits():
    L, V = 4, 5
    idx = torch.tensor([[1, 2, 3, 4, 1, 2, 3, 4]])
    logits = torch.zeros(1, 2 * L, V)  # uniform everywhere: ln 5 ...
    for t in range(L, 2 * L - 1):  # ... except a sure prediction of the next token in the second copy
        logits[0, t, idx[0, t + 1]] = 100.0
    first, second = repeat_losses(logits, idx, L)
    assert first == pytest.approx(math.log(V))
    assert second == pytest.approx(0.0, abs=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# The logit lens and the loss by position


def test_the_last_layers_logit_lens_is_the_models_output():
    model = small_model(seed=5)
    idx = torch.randint(23, (2, 24))
    seen = trace(model, idx)
    with torch.no_grad():
        torch.testing.assert_close(logit_lens(model, seen.residual[-1]), model(idx), rtol=1e-5, atol=1e-5)
        earlier = logit_lens(model, seen.residual[0])
    assert not torch.allclose(earlier, seen.logits, atol=1e-3)  # the embeddings alone predict something else


def test_the_recorded_lens_ends_with_the_probes_prediction():
    from lmlab.sample import probe

    tokenizer = CharTokenizer(set("abcdefghij klmnop\n"))
    model = small_model(seed=6, vocab=tokenizer.vocab_size)
    prompts = ["abc def", "ghij klm", "nop"]
    val = np.array(tokenizer.encode("abcdefghij klmnop\n" * 20))
    record = InsideRecorder(tokenizer, prompts, val, 24, 8).record(model, 7)
    probed = probe(model, tokenizer, prompts, top=5, continuation=1)
    for lens, expected in zip(record["lens"], probed):
        assert lens["prompt"] == expected["prompt"]
        assert len(lens["top"]) == model.cfg.n_layer + 1
        assert [t for t, _ in lens["top"][-1]] == [t for t, _ in expected["top"]]
        assert [p for _, p in lens["top"][-1]] == pytest.approx([p for _, p in expected["top"]], abs=1e-4)


def test_long_prompts_keep_their_last_tokens():
    tokenizer = CharTokenizer(set("abcdefghij "))
    model = small_model(seed=9, vocab=tokenizer.vocab_size, block_size=16)
    prompt = "abc defghij " * 5  # 60 characters: longer than the context and than ATTENTION_TOKENS
    record = InsideRecorder(tokenizer, [prompt], np.array(tokenizer.encode(prompt * 3)), 16, 4).record(model, 1)
    assert "".join(record["attention"][0]["tokens"]) == prompt[-16:]
    assert [len(row) for row in record["attention"][0]["percent"][0][0]] == list(range(1, 17))


def test_the_bigram_gets_the_losses_but_no_heads():
    from lmlab.inside import head_table

    tokenizer = CharTokenizer(set("abcdefgh"))
    model = build_model(ModelConfig(arch="bigram", block_size=16), tokenizer.vocab_size)
    val = np.array(tokenizer.encode("abcdefgh" * 10))
    record = InsideRecorder(tokenizer, ["abc"], val, 16, 4).record(model, 0)
    assert set(record) == {"step", "repeat_loss", "loss_by_position", "seconds"}
    L = record["repeat_loss"]["length"]
    V = tokenizer.vocab_size  # 8 characters and the special tokens; the random sequences use the characters only
    assert L == 8 and record["repeat_loss"]["first"] == pytest.approx(math.log(V), abs=1e-4)  # all logits zero
    assert record["loss_by_position"]["loss"] == pytest.approx([math.log(V)] * 16, abs=1e-4)
    assert "no attention heads" in head_table(record)


@pytest.mark.parametrize("n_tokens, max_tokens", [(24 * 5 + 10, 0), (200, 24 * 3 + 5)])
def test_position_weighted_loss_by_position_is_the_eval_loss(n_tokens, max_tokens):
    model = small_model(seed=7)
    tokens = np.random.default_rng(0).integers(0, 23, n_tokens)
    loss, count = loss_by_position(model, tokens, 24, batch_size=2, max_tokens=max_tokens)
    m = evaluate(model, tokens, torch.ones(23, dtype=torch.long), 24, batch_size=2, max_tokens=max_tokens)
    assert sum(count) == m.tokens
    assert sum(l * c for l, c in zip(loss, count)) / sum(count) == pytest.approx(m.loss, rel=1e-6)
    predicted = (max_tokens or n_tokens - 1)
    full, rest = divmod(predicted, 24)
    assert count == [full + (p < rest) for p in range(24)]  # a naive count of the windows reaching each position


def test_loss_by_position_is_the_mean_over_windows_at_each_position():
    model = small_model(seed=8)
    tokens = np.random.default_rng(1).integers(0, 23, 24 * 3 + 1)
    loss, _ = loss_by_position(model, tokens, 24)
    with torch.no_grad():
        x = torch.from_numpy(tokens[:-1].reshape(3, 24))
        y = torch.from_numpy(tokens[1:].reshape(3, 24))
        nats = torch.nn.functional.cross_entropy(model(x).transpose(1, 2), y, reduction="none")  # (3, 24)
    assert loss == pytest.approx(nats.mean(0).tolist(), rel=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# Synthetic corpora


@pytest.mark.parametrize("name", list(synthetic.SYNTHETIC))
def test_synthetic_corpora_are_deterministic_per_seed(name):
    generate = synthetic.SYNTHETIC[name].generate
    assert generate(3, 20_000) == generate(3, 20_000)
    assert generate(3, 20_000) != generate(4, 20_000)
    assert len(generate(0, 5_000)) == 5_000 and generate(0, 5_000).isascii()


def test_a_synthetic_source_is_generated_into_the_cache(monkeypatch):
    from lmlab.data import DataConfig, resolve_source

    monkeypatch.setattr(synthetic, "CHARS", 30_000)
    assert DataConfig(data="synthetic:induction:5").data == "synthetic:induction:5"  # not made a path
    corpus = resolve_source("synthetic:induction:5")
    text = corpus.files[0].read_text()
    assert text == synthetic.induction_text(5, 30_000)
    assert resolve_source("synthetic:induction:5").files == corpus.files
    with pytest.raises(LmlabError, match="unknown synthetic corpus"):
        resolve_source("synthetic:nothing")
    with pytest.raises(LmlabError, match="seed"):
        resolve_source("synthetic:markov:-1")


def induction_segments(text: str) -> list[str]:
    """The runs of an induction text: a run ends where its first symbol comes again (its copy starts)."""
    runs, i = [], 0
    while i < len(text):
        end = text.find(text[i], i + 1)
        if end < 0 or end + (end - i) > len(text):
            break  # the text was cut inside this run or its copy
        runs.append(text[i:end])
        i = end + (end - i)
    return runs


def test_induction_text_is_runs_followed_by_their_copy():
    lo, hi = synthetic.INDUCTION_LENGTHS
    text = synthetic.induction_text(1, 50_000)
    runs = induction_segments(text)
    assert "".join(run + run for run in runs) == text[:2 * sum(map(len, runs))]
    assert len(text) - 2 * sum(map(len, runs)) < 2 * hi
    assert all(lo <= len(run) <= hi and len(set(run)) == len(run) for run in runs)
    assert set(text) == set(synthetic.INDUCTION_SYMBOLS)


def induction_nats(text: str) -> tuple[float, int]:
    """-ln p of every character of the whole segments of the text under the process that made it, read naively:
    a run's first symbol is any of A; after j symbols, the next is the first again (the copy starts) with
    probability P(n = j) / P(n >= j), else one of the A - j unused symbols; the copy is certain."""
    lo, hi = synthetic.INDUCTION_LENGTHS
    p_length = {n: 1 / (hi - lo + 1) for n in range(lo, hi + 1)}
    A = len(synthetic.INDUCTION_SYMBOLS)
    total, count = 0.0, 0
    for run in induction_segments(text):
        total += math.log(A)
        for j in range(1, len(run) + 1):
            stop = p_length.get(j, 0) / sum(p for n, p in p_length.items() if n >= j)
            total -= math.log(stop) if j == len(run) else math.log((1 - stop) / (A - j))
        count += 2 * len(run)
    return total, count


def test_the_induction_entropy_rate_matches_a_monte_carlo_estimate():
    total, count = induction_nats(synthetic.induction_text(11, 400_000))
    assert total / count == pytest.approx(synthetic.induction_entropy_rate(), rel=0.005)


def test_the_markov_entropy_rate_matches_a_monte_carlo_estimate():
    seed = 2
    text = synthetic.markov_text(seed, 300_000)
    table = synthetic.markov_table(seed)
    index = {c: i for i, c in enumerate(synthetic.MARKOV_SYMBOLS)}
    ids = [index[c] for c in text]
    estimate = -np.mean(np.log(table[ids[:-1], ids[1:]]))
    assert estimate == pytest.approx(synthetic.markov_entropy_rate(seed), rel=0.005)
    pairs = Counter(zip(ids[:-1], ids[1:]))  # the text follows the table: the most common successors agree
    a = ids[0]
    followers = {b: n for (x, b), n in pairs.items() if x == a}
    assert max(followers, key=followers.get) == int(np.argmax(table[a]))


# ---------------------------------------------------------------------------------------------------------------
# What training records, and what reads it


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    from lmlab.train import train

    root = tmp_path_factory.mktemp("inside")
    corpus = write_corpus(root / "corpus.txt", 300)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LMLAB_CACHE", str(root / "cache"))
        summary_ = train(tiny_config(corpus, root / "run", tensorboard=False, trajectory_snapshots=0,
                                     model_n_layer=2, model_n_head=2))
        train(tiny_config(corpus, root / "off", tensorboard=False, inside=False, max_steps=10))
    return root, summary_


def test_training_records_inside_at_every_evaluation(recorded):
    root, summary_ = recorded
    records = read_jsonl(root / "run" / "inside.jsonl")
    metrics = read_jsonl(root / "run" / "metrics.jsonl")
    assert [r["step"] for r in records] == [r["step"] for r in metrics if "val_loss" in r] == [0, 10, 20]
    for r in records:
        assert set(r["heads"]) == set(SCORES)
        assert all(len(grid) == 2 and all(len(row) == 2 for row in grid) for grid in r["heads"].values())
        assert len(r["loss_by_position"]["loss"]) == 16 and r["seconds"] > 0
        assert r["repeat_loss"]["length"] == 8
        for entry in r["attention"]:
            T = len(entry["tokens"])
            assert len(entry["percent"]) == 2 and [len(row) for row in entry["percent"][1][0]] == list(range(1, T + 1))
            assert all(abs(sum(row) - 100) <= len(row) for row in entry["percent"][0][1])  # rounded percentages
        assert [len(e["top"]) for e in r["lens"]] == [3] * len(r["lens"])
    assert summary_["inside_s"] == pytest.approx(sum(r["seconds"] for r in records))
    assert not (root / "off" / "inside.jsonl").exists()


def test_the_recorded_scores_are_those_of_the_saved_model(recorded):
    """Recompute the last record from the checkpoint written at the same step: the same numbers."""
    from lmlab.run import load_run
    from lmlab.data import load_splits

    root, _ = recorded
    run = load_run(root / "run")
    last = read_jsonl(root / "run" / "inside.jsonl")[-1]
    assert run.checkpoint.step == last["step"]
    cfg = run.config
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LMLAB_CACHE", str(root / "cache"))
        val = load_splits(cfg.data, tokenizer=run.tokenizer).val
    prompts = [e["prompt"] for e in last["lens"]]
    again = InsideRecorder(run.tokenizer, prompts, val, cfg.model.block_size, cfg.batch_size).record(run.model, 20)
    for name in SCORES:
        assert np.allclose(again["heads"][name], last["heads"][name], atol=2e-4)
    assert again["repeat_loss"] == pytest.approx(last["repeat_loss"], abs=2e-4)
    assert again["loss_by_position"]["loss"] == pytest.approx(last["loss_by_position"]["loss"], abs=2e-4)


def test_lmlab_inside_json_and_step(recorded, capsys):
    root, _ = recorded
    run = str(root / "run")
    records = read_jsonl(root / "run" / "inside.jsonl")
    assert main(["inside", run, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) == {"heads", "repeat_loss", "loss_by_position"}
    assert len(out["heads"]) == 3 * 2 * 2  # steps x layers x heads
    row = next(h for h in out["heads"] if (h["step"], h["layer"], h["head"]) == (10, 1, 0))
    assert row["induction"] == records[1]["heads"]["induction"][1][0]
    assert row["previous_token"] == records[1]["heads"]["previous_token"][1][0]
    assert out["repeat_loss"] == [{"step": r["step"], **{k: r["repeat_loss"][k] for k in ("first", "second")}}
                                  for r in records]
    assert out["loss_by_position"] == [{"step": r["step"], "loss": r["loss_by_position"]["loss"]} for r in records]

    assert main(["inside", run, "--json", "--step", "10"]) == 0
    one = json.loads(capsys.readouterr().out)
    assert {h["step"] for h in one["heads"]} == {10} and [r["step"] for r in one["repeat_loss"]] == [10]
    assert [r["step"] for r in one["loss_by_position"]] == [10]

    assert main(["inside", run]) == 0
    table = capsys.readouterr().out
    assert table.startswith("step 20:") and len([ln for ln in table.splitlines() if ln[:5].strip().isdigit()]) == 4

    assert main(["inside", run, "--step", "11"]) == 2
    assert "recorded steps: 0, 10, 20" in capsys.readouterr().err
    assert main(["inside", str(root / "off")]) == 2
    assert "--no-inside" in capsys.readouterr().err


@pytest.mark.slow
def test_lmlab_inside_html_and_the_report_section(recorded, tmp_path, capsys):
    from lmlab.report.logs import load_run_logs
    from lmlab.report.report_page import build_page

    root, _ = recorded
    out = tmp_path / "inside.html"
    assert main(["inside", str(root / "run"), "--step", "10", "--out", str(out)]) == 0
    page = out.read_text()
    assert "step 10: head scores" in page and page.count("<img") == 4  # scores, repeat loss, positions, heatmaps
    report, files = build_page([load_run_logs(root / "run"), load_run_logs(root / "off")])
    section = report[report.index('<section id="inside">'):report.index("</section>", report.index('id="inside"'))]
    assert "step 20: head scores" in section and "--no-inside" in section
    charts = {"run_head_scores.png", "run_repeat_loss.png", "run_loss_by_position.png", "run_attention_20.png"}
    assert charts <= set(files)
    records = read_jsonl(root / "run" / "inside.jsonl")
    cells = [f"{v:.3f}" for name in SCORES for layer in records[-1]["heads"][name] for v in layer]
    assert all(f">{c}</td>" in section for c in cells)


def test_damaged_inside_records_are_skipped(tmp_path):
    from lmlab import rundir

    good = {"step": 3, "heads": {"induction": [[0.5]]}, "repeat_loss": {"first": 1.0, "second": 0.5}}
    lines = [good, {"step": 4, "heads": {"induction": [["x"]]}}, {"step": 5, "attention": [{"percent": "no"}]},
             {"step": -1}, {"heads": {}}, {"step": 6, "lens": [{"top": [[["a", "b"]]]}]}]
    (tmp_path / rundir.INSIDE).write_text("\n".join(map(json.dumps, lines)) + "\n{not json\n")
    assert rundir.read_jsonl(tmp_path, rundir.INSIDE) == [good]
    assert summary(at_step([good], 3))["repeat_loss"] == [{"step": 3, "first": 1.0, "second": 0.5}]
    assert summary([{"step": 1, "repeat_loss": {"first": math.nan, "second": 1.0}}])["repeat_loss"][0]["first"] is None


def test_eval_states_the_entropy_rate_of_a_synthetic_source(tmp_path, monkeypatch, capsys):
    from lmlab.train import train

    monkeypatch.setattr(synthetic, "CHARS", 20_000)
    train(tiny_config("synthetic:markov:4", tmp_path / "run", tensorboard=False, trajectory_snapshots=0,
                      max_steps=5, inside=False))
    assert main(["eval", str(tmp_path / "run"), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["entropy_rate"] == pytest.approx(synthetic.markov_entropy_rate(4))  # a token is a character
    assert out["excess"] == pytest.approx(out["loss"] - out["entropy_rate"])
    assert main(["eval", str(tmp_path / "run")]) == 0
    assert "entropy rate is" in capsys.readouterr().out
    other = tmp_path / "other.txt"  # the same kind of text, but not named as a source with a known rate
    other.write_text(synthetic.markov_text(4, 3_000))
    assert main(["eval", str(tmp_path / "run"), "--data", str(other), "--json"]) == 0
    assert "entropy_rate" not in json.loads(capsys.readouterr().out)


def test_data_list_shows_the_synthetic_corpora(capsys):
    assert main(["data", "list"]) == 0
    out = capsys.readouterr().out
    for name in synthetic.SYNTHETIC:
        assert f"synthetic:{name}" in out
    assert f"{synthetic.induction_entropy_rate():.4f} nats/character" in out


def test_no_inside_option():
    from lmlab.cli import parse
    from lmlab.config import TrainConfig

    assert parse(TrainConfig, [], "lmlab train").inside is True
    assert parse(TrainConfig, ["--no-inside"], "lmlab train").inside is False


def test_the_attention_grid_labels_the_tokens_on_its_outer_panels_only():
    """Every panel reads the same tokens: the bottom row names them on x, the left column on y, and the inner
    panels draw no ticks (the labels were most of the figure's drawing time)."""
    from types import SimpleNamespace

    from lmlab.report.inside_page import attention_figure

    tokens = ["a", "b", "c"]
    grid = [[100], [40, 60], [20, 30, 50]]
    record = {"step": 7, "attention": [{"prompt": "abc", "tokens": tokens, "percent": [[grid] * 3] * 2}]}
    fig, left_out = attention_figure(SimpleNamespace(name="r"), record)
    assert left_out == "" and len(fig.axes) == 6
    for i, ax in enumerate(fig.axes):
        layer, head = divmod(i, 3)
        assert ax.get_title() == f"layer {layer} head {head}"
        assert [t.get_text() for t in ax.get_xticklabels()] == (tokens if layer == 1 else []), (layer, head)
        assert [t.get_text() for t in ax.get_yticklabels()] == (tokens if head == 0 else []), (layer, head)
        image = ax.get_images()[0].get_array()
        assert image[2][2] == 50 and image[1][0] == 40 and np.ma.is_masked(image[0][1])  # nothing after the query
