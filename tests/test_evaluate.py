"""Sliding-window evaluation: windows of block_size tokens every `stride` tokens, each scoring only the predictions
the windows before it did not reach.

Oracles: the non-overlapping evaluation written out window by window; a bigram model, which sees no context, so
the stride cannot matter; a model trained on text where context pays, where a smaller stride cannot do worse."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from helpers import HANG_S, run_cli
from lmlab.evaluate import eval_windows, evaluate, stream_losses
from lmlab.model import Bigram, ModelConfig, build_model

VOCAB = 13


def _gpt(block: int = 16, seed: int = 0):
    torch.manual_seed(seed)
    model = build_model(ModelConfig(block_size=block, n_layer=1, n_head=2, n_embd=16, zero_init_proj=False), VOCAB)
    return model.eval()


def _stream(n: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, VOCAB, n).astype(np.uint16)


@pytest.mark.parametrize("n", [2, 17, 50, 161])
@pytest.mark.parametrize("stride", [1, 3, 8, 16, 0])
@pytest.mark.parametrize("max_tokens", [0, 40])
def test_every_prediction_is_scored_once_for_any_stride(n, stride, max_tokens):
    block = 16
    scored = []
    for start, end, first in eval_windows(n, block, max_tokens, stride):
        assert end - start <= block and start <= first < end
        scored += range(first, end)  # prediction i is of token i + 1
    expected = min(n - 1, max_tokens) if max_tokens else n - 1
    assert scored == list(range(expected))
    model = _gpt(block)
    losses = stream_losses(model, _stream(n), block, batch_size=4, max_tokens=max_tokens, stride=stride)
    assert len(losses.nats) == expected


def test_stride_block_size_is_the_non_overlapping_evaluation():
    model, tokens, block = _gpt(), _stream(200), 16
    by_hand = []
    with torch.no_grad():
        for start in range(0, len(tokens) - 1, block):
            window = torch.from_numpy(tokens[start:start + block + 1].astype(np.int64))
            logits = model(window[None, :-1])[0]
            by_hand.append(F.cross_entropy(logits, window[1:], reduction="none"))
    by_hand = torch.cat(by_hand)
    token_bytes = torch.ones(VOCAB, dtype=torch.long)
    default = evaluate(model, tokens, token_bytes, block, batch_size=5)
    full = evaluate(model, tokens, token_bytes, block, batch_size=5, stride=block)
    assert (full.nats, full.tokens, full.correct) == (default.nats, default.tokens, default.correct)
    assert full.tokens == len(by_hand) == len(tokens) - 1
    assert full.nats == pytest.approx(float(by_hand.double().sum()), rel=1e-6)


def test_a_bigram_scores_the_same_at_every_stride():
    torch.manual_seed(3)
    model = Bigram(ModelConfig(arch="bigram", block_size=16), VOCAB)
    with torch.no_grad():
        model.table.weight.normal_()
    tokens, token_bytes = _stream(300), torch.ones(VOCAB, dtype=torch.long)
    losses = [evaluate(model, tokens, token_bytes, 16, batch_size=7, stride=s).loss for s in (1, 2, 5, 11, 16)]
    assert max(losses) - min(losses) < 1e-6 * losses[0]


def _periodic_text(period: int = 40, repeats: int = 120, seed: int = 5) -> str:
    """One random sequence of `period` letters, over and over: each letter follows from the few before it, which a
    window's first tokens do not have."""
    rng = random.Random(seed)
    cycle = "".join(rng.choice("abcdefghijklmnopqrst") for _ in range(period))
    return cycle * repeats


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A small model with a context of 128, trained on text where context pays."""
    root = tmp_path_factory.mktemp("stride")
    (root / "corpus.txt").write_text(_periodic_text())
    proc = run_cli(["train", "--data", "corpus.txt", "--out", "run", "--n-layer", "1", "--n-head", "2", "--n-embd", "32",
                    "--block-size", "128", "--batch-size", "8", "--max-steps", "150", "--max-time", "0", "--lr", "1e-2",
                    "--warmup", "10", "--eval-interval", "150", "--sample-tokens", "0", "--no-tensorboard",
                    "--no-progress", "--trajectory-snapshots", "0", "--no-probe", "--threads", "1"],
                   cwd=root, cache=root / "cache", timeout=HANG_S)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return root


@pytest.mark.slow
def test_a_smaller_stride_is_at_or_below_a_larger_one_where_context_pays(trained_run):
    from lmlab.run import load_run

    run = load_run(trained_run / "run")
    tokens = run.tokenizer.encode_array(_periodic_text(repeats=30, seed=5))
    token_bytes = torch.from_numpy(run.tokenizer.byte_lengths())
    losses = {s: evaluate(run.model, tokens, token_bytes, 128, batch_size=8, stride=s).loss for s in (16, 64, 128)}
    slack = 1e-3  # nats: once every scored token has enough context, more changes only the last digits
    assert losses[16] <= losses[64] + slack and losses[64] <= losses[128] + slack, losses
    assert losses[64] < losses[128] - 0.005, losses  # the first tokens of each window are no longer blind


@pytest.mark.slow
def test_eval_stride_on_the_command_line_and_in_the_training_log(trained_run):
    results = {}
    for stride in (64, 128):
        proc = run_cli(["eval", "run", "--stride", str(stride), "--json"], cwd=trained_run, cache=trained_run / "cache")
        assert proc.returncode == 0, proc.stderr
        results[stride] = json.loads(proc.stdout)
        assert results[stride]["stride"] == stride
    assert results[64]["loss"] <= results[128]["loss"]
    assert results[64]["tokens"] == results[128]["tokens"]
    default = run_cli(["eval", "run"], cwd=trained_run, cache=trained_run / "cache")
    assert default.returncode == 0 and "every 64" in default.stdout  # half the context, said out loud
    records = [json.loads(line) for line in (trained_run / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "val_loss" in r]
    assert evals and all(r["val_stride"] == 128 for r in evals)  # training evaluates without overlap
    # training's last val_loss is the non-overlapping evaluation of the same split
    assert evals[-1]["val_loss"] == pytest.approx(results[128]["loss"], rel=1e-6)
    bad = run_cli(["eval", "run", "--stride", "0"], cwd=trained_run, cache=trained_run / "cache")
    assert bad.returncode == 2 and "--stride must be between 1 and the context length 128" in bad.stderr
