"""cross_entropy and Metrics, checked against a log-softmax written out in float64, closed forms and finite
differences (cross_entropy itself runs PyTorch's fused kernel, so PyTorch is no independent oracle)."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from helpers import tiny_config, write_corpus
from lmlab.common import LmlabError
from lmlab.loss import LossConfig, Metrics, cross_entropy

V = 7


def _batch(seed=0, shape=(3, 4), vocab=V, dtype=torch.float64, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    logits = (scale * torch.randn(*shape, vocab, generator=g)).to(dtype)
    targets = torch.randint(0, vocab, shape, generator=g)
    return logits, targets


def _naive(logits, targets, z_loss=0.0, label_smoothing=0.0):
    """Per-token loss written out in float64, shaped like targets: -log softmax at the target, mixed with its mean
    over the vocabulary (label smoothing), plus z_loss * log(Z)^2 with Z the softmax normaliser."""
    x = logits.double()
    shift = x.max(dim=-1, keepdim=True).values
    log_z = (x - shift).exp().sum(dim=-1).log() + shift.squeeze(-1)
    logp = x - log_z[..., None]
    nll = -logp.gather(-1, targets[..., None]).squeeze(-1)
    return (1 - label_smoothing) * nll + label_smoothing * -logp.mean(dim=-1) + z_loss * log_z**2


# ---------------------------------------------------------------------------------------------------------------
# Gradients
#
# The finite differences below use a step (1e-3) and tolerances that a float32 evaluation of the loss could
# resolve too; the logits are float64 so the perturbation itself is exact.


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(reduction="mean"),
        dict(reduction="sum"),
        dict(reduction="none"),
        dict(reduction="mean", z_loss=1e-2),
        dict(reduction="mean", label_smoothing=0.2),
        dict(reduction="sum", z_loss=3e-2, label_smoothing=0.1),
    ],
)
def test_gradcheck(kwargs):
    logits, targets = _batch(seed=1, shape=(2, 3), scale=1.0)
    logits.requires_grad_(True)
    fn = lambda x: cross_entropy(x, targets, **kwargs).double()  # noqa: E731
    assert torch.autograd.gradcheck(fn, (logits,), eps=1e-3, atol=2e-3, rtol=1e-2)


def test_manual_central_difference():
    logits, targets = _batch(seed=2, shape=(2, 5), scale=1.5)
    kwargs = dict(reduction="mean", z_loss=1e-2, label_smoothing=0.1)
    x = logits.clone().requires_grad_(True)
    cross_entropy(x, targets, **kwargs).backward()
    analytic = x.grad
    h = 1e-3
    entries = [(0, 0, 0), (0, 3, int(targets[0, 3])), (1, 4, 6), (1, 2, int(targets[1, 2])), (1, 0, 3)]
    for idx in entries:
        plus, minus = logits.clone(), logits.clone()
        plus[idx] += h
        minus[idx] -= h
        numeric = (float(cross_entropy(plus, targets, **kwargs)) - float(cross_entropy(minus, targets, **kwargs))) / (2 * h)
        assert numeric == pytest.approx(float(analytic[idx]), abs=2e-4), idx


def test_gradient_is_softmax_minus_onehot():
    logits, targets = _batch(seed=3, shape=(4, 6))
    x = logits.clone().requires_grad_(True)
    cross_entropy(x, targets).backward()
    n = targets.numel()
    expected = (logits.softmax(-1) - F.one_hot(targets, V).double()) / n
    torch.testing.assert_close(x.grad.double(), expected, atol=1e-6, rtol=1e-4)


# ---------------------------------------------------------------------------------------------------------------
# Values against the written-out formula


def test_reductions_agree_with_each_other_and_the_formula():
    logits, targets = _batch(seed=4, shape=(3, 5))
    none = cross_entropy(logits, targets, reduction="none")
    assert none.shape == targets.shape
    ref = _naive(logits, targets)
    torch.testing.assert_close(none.double(), ref, atol=1e-5, rtol=1e-5)
    total = cross_entropy(logits, targets, reduction="sum")
    mean = cross_entropy(logits, targets, reduction="mean")
    assert total.dim() == 0 and mean.dim() == 0
    assert float(total) == pytest.approx(float(none.double().sum()), rel=1e-5)
    assert float(mean) == pytest.approx(float(none.double().mean()), rel=1e-5)
    assert float(mean) == pytest.approx(float(total) / targets.numel(), rel=1e-5)
    assert float(mean) == pytest.approx(float(ref.mean()), rel=1e-5)
    assert float(total) == pytest.approx(float(ref.sum()), rel=1e-5)


def test_flat_inputs_and_3d_inputs_agree():
    logits, targets = _batch(seed=5, shape=(2, 3, 4))
    out = cross_entropy(logits, targets, reduction="none")
    assert out.shape == (2, 3, 4)
    flat = cross_entropy(logits.view(-1, V), targets.view(-1), reduction="none")
    torch.testing.assert_close(out.reshape(-1), flat)


def test_invalid_reduction_raises():
    logits, targets = _batch()
    with pytest.raises(ValueError):
        cross_entropy(logits, targets, reduction="average")


@pytest.mark.parametrize("eps", [0.05, 0.1, 0.3, 0.9])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_label_smoothing_matches_the_formula(eps, reduction):
    logits, targets = _batch(seed=6, shape=(3, 4))
    ours = cross_entropy(logits, targets, reduction=reduction, label_smoothing=eps)
    ref = _naive(logits, targets, label_smoothing=eps)
    ref = ref.mean() if reduction == "mean" else ref.sum() if reduction == "sum" else ref
    torch.testing.assert_close(ours.double(), ref, atol=1e-5, rtol=1e-5)
    # and it really changes the loss
    plain = cross_entropy(logits, targets, reduction=reduction)
    assert not torch.allclose(ours, plain, atol=1e-3)


@pytest.mark.parametrize("coef", [1e-4, 1e-2, 0.5])
def test_z_loss_is_logsumexp_squared_per_token(coef):
    logits, targets = _batch(seed=7, shape=(3, 4), scale=3.0)
    logits = logits + 4.0  # a normaliser far from 1, so the z term is sizeable
    expected_none = _naive(logits, targets, z_loss=coef)
    ours_none = cross_entropy(logits, targets, reduction="none", z_loss=coef)
    torch.testing.assert_close(ours_none.double(), expected_none, atol=1e-5, rtol=1e-5)
    ours_mean = cross_entropy(logits, targets, reduction="mean", z_loss=coef)
    assert float(ours_mean) == pytest.approx(float(expected_none.mean()), rel=1e-5)
    ours_sum = cross_entropy(logits, targets, reduction="sum", z_loss=coef)
    assert float(ours_sum) == pytest.approx(float(expected_none.sum()), rel=1e-5)


def test_z_loss_with_label_smoothing():
    logits, targets = _batch(seed=8, shape=(5,), scale=2.0)
    expected = _naive(logits, targets, z_loss=0.03, label_smoothing=0.2)
    ours = cross_entropy(logits, targets, reduction="none", z_loss=0.03, label_smoothing=0.2)
    torch.testing.assert_close(ours.double(), expected, atol=1e-5, rtol=1e-5)


def test_low_precision_logits_are_upcast():
    logits, targets = _batch(seed=9, shape=(4, 8), dtype=torch.bfloat16)
    ours = cross_entropy(logits, targets, reduction="none")
    assert ours.dtype == torch.float32
    ref = _naive(logits.float(), targets)
    torch.testing.assert_close(ours.double(), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 2e-6), (torch.bfloat16, 2e-6)])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("z_loss,label_smoothing", [(0.0, 0.0), (0.0, 0.1), (1e-2, 0.0), (3e-2, 0.2)])
def test_values_and_gradients_match_the_formula(dtype, tol, reduction, z_loss, label_smoothing):
    """The training path (the fused kernel) and every option, against autograd through the written-out formula."""
    logits, targets = _batch(seed=10, shape=(4, 6), dtype=dtype, scale=3.0)
    logits = (logits + 2.0).to(dtype)  # a normaliser far from 1, so the z term matters
    ours_x = logits.clone().requires_grad_(True)
    ours = cross_entropy(ours_x, targets, reduction=reduction, z_loss=z_loss, label_smoothing=label_smoothing)
    ref_x = logits.double().requires_grad_(True)
    ref = _naive(ref_x, targets, z_loss=z_loss, label_smoothing=label_smoothing)
    ref = ref.mean() if reduction == "mean" else ref.sum() if reduction == "sum" else ref
    assert ours.shape == ref.shape and ours.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    torch.testing.assert_close(ours.double(), ref.detach(), atol=tol * 10, rtol=tol)
    upstream = torch.randn(ref.shape, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    (ours * upstream.to(ours.dtype)).sum().backward()
    (ref * upstream).sum().backward()
    assert ours_x.grad.dtype == dtype
    grad_tol = tol if dtype != torch.bfloat16 else 1e-2  # the gradient is rounded to the logits' bfloat16
    torch.testing.assert_close(ours_x.grad.double(), ref_x.grad, atol=grad_tol, rtol=grad_tol)


def test_hand_computed_values():
    # probabilities (1/2, 1/4, 1/8, 1/8): -log p(target) is ln 2, ln 4 or ln 8
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.125, 0.125]] * 3, dtype=torch.float64))
    targets = torch.tensor([0, 1, 3])
    out = cross_entropy(logits, targets, reduction="none")
    expected = torch.tensor([math.log(2), math.log(4), math.log(8)], dtype=torch.float64)
    torch.testing.assert_close(out.double(), expected, atol=1e-6, rtol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# Metrics


def _metrics_example():
    # row 0: p = (1/2, 1/4, 1/8, 1/8), target 0 -> ln 2 nats, argmax 0: correct
    # row 1: same distribution, target 2   -> ln 8 nats, argmax 0: wrong
    # row 2: p = (.1, .2, .3, .4), target 3 -> -ln .4 nats, argmax 3: correct
    probs = torch.tensor(
        [[0.5, 0.25, 0.125, 0.125], [0.5, 0.25, 0.125, 0.125], [0.1, 0.2, 0.3, 0.4]], dtype=torch.float64
    )
    logits = probs.log()
    targets = torch.tensor([0, 2, 3])
    token_bytes = torch.tensor([1, 2, 3, 4])  # bytes behind ids 0..3
    nats = [math.log(2), math.log(8), -math.log(0.4)]
    return logits, targets, token_bytes, nats


def test_metrics_hand_computed():
    logits, targets, token_bytes, nats = _metrics_example()
    per_token = F.cross_entropy(logits, targets, reduction="none")
    m = Metrics()
    m.add(per_token, targets, logits.argmax(-1) == targets, token_bytes)
    total = sum(nats)
    n_bytes = 1 + 3 + 4
    assert m.tokens == 3
    assert m.bytes == n_bytes
    assert m.correct == 2
    assert m.nats == pytest.approx(total, rel=1e-9)
    assert m.loss == pytest.approx(total / 3, rel=1e-9)
    assert m.bits_per_token == pytest.approx(total / 3 / math.log(2), rel=1e-9)
    assert m.bits_per_byte == pytest.approx(total / math.log(2) / n_bytes, rel=1e-9)
    assert m.perplexity == pytest.approx(math.exp(total / 3), rel=1e-9)
    assert m.accuracy == pytest.approx(2 / 3)
    d = m.as_dict()
    assert d["loss"] == pytest.approx(total / 3, rel=1e-9)
    assert d["bits_per_byte"] == pytest.approx(total / math.log(2) / n_bytes, rel=1e-9)
    assert d["perplexity"] == pytest.approx(math.exp(total / 3), rel=1e-9)
    assert d["tokens"] == 3 and d["bytes"] == n_bytes
    assert d["accuracy"] == pytest.approx(2 / 3)


def test_metrics_accumulate_over_batches():
    logits, targets, token_bytes, nats = _metrics_example()
    per_token = F.cross_entropy(logits, targets, reduction="none")
    m = Metrics()
    correct = logits.argmax(-1) == targets
    m.add(per_token[:2], targets[:2], correct[:2], token_bytes)
    m.add(per_token[2:], targets[2:], correct[2:], token_bytes)
    # 2-D batches too: (B, T) shaped inputs
    m.add(per_token.view(1, 3), targets.view(1, 3), correct.view(1, 3), token_bytes)
    total = 2 * sum(nats)
    assert m.tokens == 6 and m.bytes == 16 and m.correct == 4
    assert m.loss == pytest.approx(total / 6, rel=1e-9)
    assert m.bits_per_byte == pytest.approx(total / math.log(2) / 16, rel=1e-9)


def test_metrics_uniform_model_perplexity_is_vocab_size():
    vocab = 11
    logits = torch.zeros(5, vocab)
    targets = torch.arange(5)
    m = Metrics()
    m.add(cross_entropy(logits, targets, reduction="none"), targets, logits.argmax(-1) == targets,
          torch.ones(vocab, dtype=torch.long))
    assert m.perplexity == pytest.approx(vocab, rel=1e-5)
    assert m.bits_per_token == pytest.approx(math.log2(vocab), rel=1e-5)
    assert m.bits_per_byte == pytest.approx(math.log2(vocab), rel=1e-5)  # one byte per token


def test_metrics_empty_does_not_divide_by_zero():
    m = Metrics()
    assert m.loss == 0.0 and m.accuracy == 0.0 and m.bits_per_byte == 0.0 and m.perplexity == 1.0


# ---------------------------------------------------------------------------------------------------------------
# The training objective's settings


def test_loss_settings_are_validated():
    for bad in (dict(z_loss=-0.1), dict(label_smoothing=-0.1), dict(label_smoothing=1.0), dict(z_loss=math.nan),
                dict(z_loss=math.inf)):
        with pytest.raises(LmlabError):
            LossConfig(**bad)


def test_z_loss_and_label_smoothing_reach_the_training_loss(tmp_path, monkeypatch):
    from lmlab.cli import parse
    from lmlab.common import seed_everything
    from lmlab.config import TrainConfig
    from lmlab.data import BatchSampler, load_splits
    from lmlab.model import build_model
    from lmlab.train import train

    options = parse(TrainConfig, ["--z-loss", "0.05", "--label-smoothing", "0.3"], "lmlab train")
    assert options.loss == LossConfig(z_loss=0.05, label_smoothing=0.3)
    monkeypatch.setenv("LMLAB_CACHE", str(tmp_path / "cache"))
    cfg = tiny_config(write_corpus(tmp_path / "corpus.txt", 100), tmp_path / "run", max_steps=1, loss=options.loss,
                      probe=False, telemetry_interval=0, trajectory_snapshots=0, tensorboard=False)
    train(cfg)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    logged = next(r["train_loss"] for r in records if "train_loss" in r)
    # the first step's batch on the initial weights, as train() draws them
    seed_everything(cfg.seed)
    splits = load_splits(cfg.data)
    model = build_model(cfg.model, splits.tokenizer.vocab_size)
    x, y = BatchSampler(splits.train, cfg.model.block_size, cfg.batch_size, cfg.seed, torch.device("cpu")).next()
    with torch.no_grad():
        logits = model(x)
    assert logged == pytest.approx(float(_naive(logits, y, z_loss=0.05, label_smoothing=0.3).mean()), rel=1e-5)
    assert logged != pytest.approx(float(_naive(logits, y).mean()), rel=1e-3)  # the options changed it
    # config.json carries the section; a run from before it had none and trains with the defaults
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert TrainConfig.from_json(saved).loss == options.loss
    assert TrainConfig.from_json({k: v for k, v in saved.items() if k != "loss"}).loss == LossConfig()
