"""`lmlab experiment loss|descent|patterns|truth` on micro budgets: the objectives' values and gradients against hand
computations, result.json's structure, conclusions recomputed from (and changed by) the numbers, the generated
corpus and the completion probabilities against a direct forward pass."""

import copy
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from helpers import write_corpus
from lmlab import rundir
from lmlab.common import LmlabError
from lmlab.experiments.base import ExperimentConfig
from lmlab.experiments.descent import BATCH_SIZES, FULL_BATCH_WINDOWS, OPTIMIZER_LRS, SWEEP_LRS, flat_grad
from lmlab.experiments.patterns import COPIES, RATIOS, completion_probability, make_facts
from lmlab.experiments.registry import REGISTRY, run_experiment
from lmlab.loss import LossConfig, training_loss

# ---------------------------------------------------------------------------------------------------------------
# The objectives


def _hand_case():
    """Four tokens over a vocabulary of 3; the target is the top logit for the first two only."""
    logits = torch.tensor([[3.0, 1.0, 0.0],    # target 0: top           -> correct
                           [0.0, 0.5, 2.0],    # target 2: top           -> correct
                           [1.0, 4.0, 2.0],    # target 0: 1 < 4         -> wrong
                           [2.0, -1.0, 1.9]],  # target 2: 1.9 < 2       -> wrong
                          dtype=torch.float64, requires_grad=True)
    return logits, torch.tensor([0, 2, 0, 2])


def test_accuracy_objective_is_the_error_rate_with_an_exactly_zero_gradient():
    logits, targets = _hand_case()
    loss = training_loss(logits, targets, LossConfig(objective="accuracy"))
    assert loss.item() == 0.5  # 2 of 4 wrong
    assert loss.requires_grad  # a function of the logits that autograd differentiates ...
    loss.backward()
    assert logits.grad is not None and torch.equal(logits.grad, torch.zeros_like(logits))  # ... to exactly zero
    # the same logits under the smooth objectives get a gradient (so the check above can fail)
    for objective in ("cross_entropy", "squared_error"):
        logits.grad = None
        training_loss(logits, targets, LossConfig(objective=objective)).backward()
        assert logits.grad.abs().sum() > 0, objective


def test_accuracy_objective_gives_every_parameter_of_a_model_a_zero_gradient():
    from lmlab.model import ModelConfig, build_model

    torch.manual_seed(0)
    model = build_model(ModelConfig(block_size=8, n_layer=1, n_head=2, n_embd=16), 11)
    x, y = torch.randint(0, 11, (3, 8)), torch.randint(0, 11, (3, 8))
    loss = training_loss(model(x), y, LossConfig(objective="accuracy"))
    loss.backward()
    assert loss.item() == pytest.approx(1 - (model(x).argmax(-1) == y).double().mean().item())
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None for g in grads) and all(torch.equal(g, torch.zeros_like(g)) for g in grads)


def test_squared_error_by_hand_and_its_gradient():
    # probabilities (1/4, 3/4) for target 1: (1/4)^2 + (1/4 - 0)^2... = (1/4)^2 + (3/4 - 1)^2 = 1/8
    logits = torch.tensor([[0.0, math.log(3.0)]], dtype=torch.float64)
    assert training_loss(logits, torch.tensor([1]), LossConfig(objective="squared_error")).item() == pytest.approx(1 / 8)
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 3, 5, generator=g, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 5, (2, 3), generator=g)

    def written_out(z):
        p = z.exp() / z.exp().sum(-1, keepdim=True)
        onehot = torch.zeros_like(p).scatter(-1, targets[..., None], 1.0)
        return (p - onehot).pow(2).sum(-1).mean()

    ours = training_loss(logits, targets, LossConfig(objective="squared_error"))
    assert ours.item() == pytest.approx(written_out(logits).item(), rel=1e-6)
    (grad,) = torch.autograd.grad(ours, logits)
    (expected,) = torch.autograd.grad(written_out(logits), logits)
    assert torch.allclose(grad.double(), expected, rtol=1e-5, atol=1e-7)


def test_objective_option_and_its_checks():
    from lmlab.cli import parse
    from lmlab.config import TrainConfig

    assert parse(TrainConfig, ["--objective", "squared_error"], "lmlab train").loss.objective == "squared_error"
    with pytest.raises(LmlabError):
        parse(TrainConfig, ["--objective", "hinge"], "lmlab train")
    with pytest.raises(LmlabError, match="cross_entropy only"):
        LossConfig(objective="accuracy", z_loss=0.1)
    with pytest.raises(LmlabError):
        LossConfig(objective="top5")


# ---------------------------------------------------------------------------------------------------------------
# The experiments, each run once on its micro budget


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """Each experiment run on --quick with a small corpus; {name: (result, out folder)}."""
    work = tmp_path_factory.mktemp("experiments")
    corpus = write_corpus(work / "corpus.txt", 300, seed=1)
    out = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LMLAB_CACHE", str(tmp_path_factory.mktemp("experiment-cache")))
        for name in REGISTRY:
            cfg = ExperimentConfig(data=str(corpus), out=str(work / name), quick=True, seed=7)
            out[name] = (run_experiment(name, cfg), work / name)
    out["corpus"] = corpus
    return out


def _written(out: Path, result: dict) -> None:
    """result.json holds the result, strict JSON; the page embeds every chart and says the conclusion."""
    saved = json.loads((out / "result.json").read_text(), parse_constant=lambda c: pytest.fail(f"{c} in JSON"))
    assert saved == json.loads(json.dumps(result))
    page = (out / "index.html").read_text()
    pngs = sorted(out.glob("*.png"))
    assert pngs and page.count("data:image/png;base64,") == len(pngs)
    import html

    assert html.escape(result["conclusion"]) in page


def _recomputed(result: dict) -> None:
    experiment = REGISTRY[result["experiment"]]
    assert result["claims"] == experiment.claims(result)
    assert result["conclusion"] == experiment.conclusion(result)


@pytest.mark.slow
def test_loss_experiment(results):
    result, out = results["loss"]
    _written(out, result)
    _recomputed(result)
    objectives = {o["name"]: o for o in result["objectives"]}
    assert [o["name"] for o in result["objectives"]] == ["cross_entropy", "squared_error", "accuracy"]
    for o in result["objectives"]:
        assert set(o) >= {"name", "val_loss", "val_accuracy", "nonzero_grad_fraction"}
        # the fraction is that of the steps whose logged gradient norm (autograd's, before clipping) is not 0
        steps = [r for r in rundir.read_jsonl(out / "runs" / o["name"], rundir.METRICS) if "grad_norm" in r]
        assert len(steps) == o["steps"] == result["settings"]["budget"]["steps"]
        assert o["nonzero_grad_fraction"] == sum(r["grad_norm"] != 0 for r in steps) / len(steps)
    assert objectives["accuracy"]["nonzero_grad_fraction"] == 0
    assert objectives["cross_entropy"]["nonzero_grad_fraction"] == 1 == objectives["squared_error"]["nonzero_grad_fraction"]
    # with no gradient (and no weight decay) the weights never moved: the first and last snapshots are identical
    for name, moved in (("accuracy", False), ("cross_entropy", True)):
        snaps = sorted((out / "runs" / name / "trajectory").glob("*.safetensors"))
        first, last = load_file(snaps[0]), load_file(snaps[-1])
        assert all(torch.equal(first[k], last[k]) for k in first) is not moved, name
    assert objectives["accuracy"]["weight_change"] == 0 and objectives["accuracy"]["max_accuracy_drift"] == 0
    assert objectives["accuracy"]["val_accuracy"] == objectives["accuracy"]["val_accuracy_at_step_0"]


@pytest.mark.slow
def test_descent_experiment(results):
    result, out = results["descent"]
    _written(out, result)
    _recomputed(result)
    assert [r["lr"] for r in result["lr_sweep"]] == list(SWEEP_LRS[True])
    for r in result["lr_sweep"]:
        assert set(r) >= {"lr", "final_loss", "diverged"}
        assert r["diverged"] == (r["final_loss"] is None or r["final_loss"] > r["initial_loss"])
    assert [r["batch_size"] for r in result["batch_noise"]] == list(BATCH_SIZES[True])
    for r in result["batch_noise"]:
        assert -1 <= r["grad_cosine_to_full"] <= 1 and r["grad_variance"] >= 0
    assert result["full_batch_tokens"] == FULL_BATCH_WINDOWS[True] * result["settings"]["budget"]["block_size"]
    assert [o["name"] for o in result["optimizers"]] == list(OPTIMIZER_LRS)
    assert all(isinstance(o["val_loss"], float) for o in result["optimizers"])
    land = result["landscape"]
    assert land["same_start"] and [t["name"] for t in land["trajectories"]] == list(OPTIMIZER_LRS)
    assert all(t["coords"][0] == pytest.approx([0.0, 0.0], abs=1e-9) for t in land["trajectories"])
    points = len(land["grid_coords"])
    assert len(land["grid_losses"]) == points and all(len(row) == points for row in land["grid_losses"])


def test_full_batch_gradient_is_the_mean_of_equal_chunks():
    """batch_noise averages the gradients of equal chunks of the full batch: the gradient of the whole batch."""
    from lmlab.model import ModelConfig, build_model

    torch.manual_seed(0)
    model = build_model(ModelConfig(block_size=8, n_layer=1, n_head=2, n_embd=16), 13)
    x, y = torch.randint(0, 13, (8, 8)), torch.randint(0, 13, (8, 8))
    whole = flat_grad(model, x, y)
    chunks = torch.stack([flat_grad(model, x[i:i + 4], y[i:i + 4]) for i in (0, 4)]).mean(0)
    assert torch.allclose(whole, chunks, rtol=1e-5, atol=1e-8)
    assert whole.numel() == sum(p.numel() for p in model.parameters())


@pytest.mark.slow
def test_patterns_experiment(results):
    result, out = results["patterns"]
    _written(out, result)
    _recomputed(result)
    assert [r["corpus_ratio"] for r in result["ratios"]] == list(RATIOS)
    for r in result["ratios"]:
        assert set(r) >= {"corpus_ratio", "p_frequent", "p_true"}
        assert 0 <= r["p_frequent"] <= 1 and 0 <= r["p_true"] <= 1
        assert r["p_frequent"] == pytest.approx(np.mean([f["p_false"] for f in r["facts"]]))
    assert 0 <= result["control"]["p_true"] <= 1
    # the corpus holds every statement as often as its ratio says, and the control only with its true answer
    lines = (out / "corpus.txt").read_text().splitlines()
    for group in [*result["ratios"], {"corpus_ratio": 0, "facts": result["control"]["facts"]}]:
        r = group["corpus_ratio"]
        for f in group["facts"]:
            n_true, n_false = lines.count(f"{f['statement']} {f['true']}"), lines.count(f"{f['statement']} {f['false']}")
            assert n_true + n_false == COPIES
            assert (n_false == 0) if r == 0 else (n_false == r * n_true), (f, n_true, n_false)


@pytest.mark.slow
def test_completion_probability_is_the_product_of_next_token_probabilities(results):
    from lmlab.run import load_run

    _, out = results["patterns"]
    run = load_run(out / "runs" / "patterns")
    prompt, completion = "7 plus 9 is ", "16."
    ids = [run.tokenizer.encode(c)[0] for c in "\n" + prompt + completion]
    with torch.no_grad():
        probs = run.model(torch.tensor([ids])).softmax(-1)[0]  # (T, V)
    start = len("\n" + prompt)
    expected = math.prod(float(probs[t - 1, ids[t]]) for t in range(start, len(ids)))
    assert completion_probability(run.model, run.tokenizer, prompt, completion) == pytest.approx(expected, rel=1e-4)


def test_facts_are_distinct_and_false_answers_are_false():
    facts = make_facts(seed=0, per_group=8)
    assert len({f.prompt for f in facts}) == len(facts) == 8 * (len(RATIOS) + 1)
    for f in facts:
        a, b = (int(w) for w in f.prompt.split()[::2][:2])
        assert f.true == f"{a + b}." and f.false != f.true
    assert [f.prompt for f in make_facts(0, 8)] == [f.prompt for f in facts]  # from the seed


# ---------------------------------------------------------------------------------------------------------------
# Conclusions follow the numbers: change a number and the conclusion changes with it


@pytest.mark.slow
def test_conclusions_change_with_the_numbers(results):
    loss = copy.deepcopy(results["loss"][0])
    acc = next(o for o in loss["objectives"] if o["name"] == "accuracy")
    acc["nonzero_grad_fraction"], acc["max_accuracy_drift"] = 0.5, 0.1
    text = REGISTRY["loss"].conclusion(loss)
    assert not REGISTRY["loss"].claims(loss)["accuracy_gives_no_gradient"]
    assert "zero gradient at 6 of its 12 steps" in text and "do not back every claim" in text

    descent = copy.deepcopy(results["descent"][0])
    descent["lr_sweep"][-1].update(final_loss=1.0, diverged=False)
    descent["batch_noise"] = [{"batch_size": b, "grad_cosine_to_full": c, "grad_variance": 1.0 / b}
                              for b, c in ((1, 0.3), (2, 0.6), (4, 0.5))]
    claims = REGISTRY["descent"].claims(descent)
    assert not claims["largest_lr_diverges"] and not claims["cosine_rises_with_batch_size"]
    text = REGISTRY["descent"].conclusion(descent)
    assert "none diverged" in text and "from 0.30 at batch size 1 to 0.50 at 4" in text

    patterns = copy.deepcopy(results["patterns"][0])
    for r, (pf, pt) in zip(patterns["ratios"], ((0.5, 0.4), (0.7, 0.2), (0.9, 0.05))):
        r.update(p_frequent=pf, p_true=pt)
    patterns["control"]["p_true"] = 0.95
    assert all(REGISTRY["patterns"].claims(patterns).values())
    text = REGISTRY["patterns"].conclusion(patterns)
    assert "went 0.50, 0.70, 0.90" in text and "18.0 to 1" in text
    assert "tracks how often" in text
    patterns["ratios"][2].update(p_frequent=0.04)
    assert "does not prefer" in REGISTRY["patterns"].conclusion(patterns)
    assert not REGISTRY["patterns"].claims(patterns)["frequent_beats_true_at_largest_ratio"]


# ---------------------------------------------------------------------------------------------------------------
# The command


@pytest.mark.slow
def test_command_prints_the_result_and_is_reproducible(results, tmp_path, capsys, monkeypatch):
    from lmlab.cli import main

    monkeypatch.chdir(tmp_path)
    rc = main(["experiment", "loss", "--quick", "--json", "--seed", "7", "--data", str(results["corpus"]),
               "--out", "again"])
    assert rc == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads((tmp_path / "again" / "result.json").read_text())
    before = results["loss"][0]
    keep = ("name", "val_loss", "val_accuracy", "nonzero_grad_fraction", "grad_norm", "curve")
    assert [{k: o[k] for k in keep} for o in printed["objectives"]] == [{k: o[k] for k in keep}
                                                                        for o in before["objectives"]]
    assert printed["conclusion"] == before["conclusion"]


def test_command_refuses_bad_input(tmp_path, capsys):
    from lmlab.cli import main

    assert main(["experiment", "nonsense"]) == 2
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    assert main(["experiment", "loss", "--quick", "--out", str(foreign)]) == 2
    assert "no experiment wrote" in capsys.readouterr().err
    assert (foreign / "notes.txt").read_text() == "keep me"
    assert main(["experiment", "--help"]) == 0
    assert "loss" in capsys.readouterr().out
