"""The best model is kept: a checkpoint at every new best evaluation, never pruned, loaded by default by sample, eval
and export (--checkpoint last / STEP choose another), while resume goes on from the last; and overfitting is said once
in the console, marked in the log, and stops the run with --stop-when-overfitting."""

from __future__ import annotations

import json
import random

import pytest
from helpers import read_jsonl, run_cli

from lmlab.checkpoint import checkpoint_dirs
from lmlab.run import load_run
from lmlab.telemetry import EvalHistory

# A 1,800-character training split of random letters: nothing in it generalises, so a 2-layer model memorises it and
# its validation loss rises while its training loss falls, within a few seconds.
OVERFIT = ["--n-layer", "2", "--n-head", "2", "--n-embd", "64", "--block-size", "32", "--batch-size", "16",
           "--max-time", "0", "--eval-interval", "25", "--checkpoint-interval", "1000", "--keep-checkpoints", "1",
           "--no-tensorboard", "--no-inside", "--trajectory-snapshots", "0", "--telemetry-interval", "0",
           "--optimizer", "adamw", "--lr", "0.01", "--schedule", "constant", "--warmup", "0", "--weight-decay", "0",
           "--threads", "1", "--no-progress"]
MESSAGE = "the model is memorising the training text"


def _random_letters(path, n=2000, seed=0):
    rng = random.Random(seed)
    path.write_text("".join(rng.choice("abcdefgh") for _ in range(n)))


@pytest.fixture(scope="module")
def overfit(tmp_path_factory):
    """A run that overfits: 300 steps (about 85 passes over its training text)."""
    root = tmp_path_factory.mktemp("overfit")
    _random_letters(root / "letters.txt")
    proc = run_cli(["train", "--data", "letters.txt", "--out", "run", "--max-steps", "300", "--sample-tokens", "20",
                    *OVERFIT], cwd=root, cache=root / "cache")
    assert proc.returncode == 0, proc.stderr
    return root, proc


def _evals(run):
    return [r for r in read_jsonl(run / "metrics.jsonl") if "val_loss" in r]


@pytest.mark.slow
def test_the_best_evaluation_has_a_checkpoint_that_pruning_keeps(overfit):
    root, _ = overfit
    evals = _evals(root / "run")
    best = min(evals, key=lambda r: r["val_loss"])
    assert [r["step"] for r in evals if r["best"]][-1] == best["step"]  # the log marks each new best
    assert best["step"] < 300 and evals[-1]["val_loss"] > best["val_loss"] + 0.02  # it did overfit
    steps = [int(p.name[5:]) for p in checkpoint_dirs(root / "run")]
    assert steps == [best["step"], 300]  # --keep-checkpoints 1 keeps the newest, and the best besides
    state = json.loads((root / "run" / "checkpoints" / f"step_{best['step']:08d}" / "state.json").read_text())
    assert state["val_loss"] == best["val_loss"]
    assert load_run(root / "run").checkpoint.step == best["step"]
    assert load_run(root / "run", which="last").checkpoint.step == 300


@pytest.mark.slow
def test_sample_eval_and_export_use_the_best_checkpoint_by_default(overfit):
    root, _ = overfit
    best = min(_evals(root / "run"), key=lambda r: r["val_loss"])["step"]

    def sample(*extra):
        proc = run_cli(["sample", "run", "--prompt", "abc", "--temperature", "0", "--max-new-tokens", "40", *extra],
                       cwd=root, cache=root / "cache")
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    assert sample() == sample("--checkpoint", str(best)) != sample("--checkpoint", "last")
    evaluated = run_cli(["eval", "run", "--json"], cwd=root, cache=root / "cache")
    last = run_cli(["eval", "run", "--json", "--checkpoint", "last"], cwd=root, cache=root / "cache")
    assert json.loads(evaluated.stdout)["loss"] < json.loads(last.stdout)["loss"]
    proc = run_cli(["export", "run", "--out", "copy"], cwd=root, cache=root / "cache")
    assert proc.returncode == 0 and f"step_{best:08d}" in proc.stderr, proc.stderr


@pytest.mark.slow
def test_a_missing_or_malformed_checkpoint_choice_is_one_line(overfit):
    root, _ = overfit
    for choice, message in (("7", "has no checkpoint at step 7"), ("newest", "is not best (the lowest")):
        proc = run_cli(["sample", "run", "--checkpoint", choice], cwd=root, cache=root / "cache")
        assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


@pytest.mark.slow
def test_overfitting_is_said_once_and_marked_in_the_log(overfit):
    root, proc = overfit
    assert proc.stderr.count(MESSAGE) == 1
    line = next(line for line in proc.stderr.splitlines() if MESSAGE in line)
    assert line.startswith("validation loss has risen for 2 evaluations while training loss fell") and \
        "passes so far:" in line
    marked = [r for r in _evals(root / "run") if r.get("overfitting")]
    assert marked and all(r["overfitting"] >= 2 for r in marked)
    assert _evals(root / "run")[-1]["passes"] == pytest.approx(300 * 16 * 32 / 1800, rel=0.01)
    assert "sample comes from the best checkpoint" in proc.stderr


@pytest.mark.slow
def test_resume_goes_on_from_the_last_checkpoint_not_the_best(overfit, tmp_path):
    root, _ = overfit
    import shutil

    shutil.copytree(root / "run", tmp_path / "run")
    proc = run_cli(["train", "--resume", "run", "--max-steps", "350", "--data", str(root / "letters.txt")],
                   cwd=tmp_path, cache=root / "cache")
    assert proc.returncode == 0, proc.stderr
    assert "from step_00000300" in proc.stderr
    steps = [r["step"] for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if "train_loss" in r]
    assert steps == list(range(1, 351))


@pytest.mark.slow
def test_stop_when_overfitting_stops_there(tmp_path):
    _random_letters(tmp_path / "letters.txt")
    proc = run_cli(["train", "--data", "letters.txt", "--out", "run", "--max-steps", "300", "--sample-tokens", "0",
                    "--stop-when-overfitting", *OVERFIT], cwd=tmp_path, cache=tmp_path / "cache")
    assert proc.returncode == 0, proc.stderr
    evals = _evals(tmp_path / "run")
    assert evals[-1].get("overfitting") == 2 and evals[-1]["step"] < 300
    assert not [r for r in evals[:-1] if r.get("overfitting")]
    assert "--stop-when-overfitting" in proc.stderr and checkpoint_dirs(tmp_path / "run")[-1].name == \
        f"step_{evals[-1]['step']:08d}"


def test_eval_history_counts_evaluations_where_validation_rose_while_training_fell():
    h = EvalHistory()
    assert h.evaluation(3.0) == 0  # step 0: no training yet
    for val, train in ((2.0, 2.5), (2.1, 2.0), (2.2, 1.9), (2.3, 1.8)):
        h.train(train)
        got = h.evaluation(val)
    assert got == 3
    h.train(1.95)  # training loss went up: not memorising
    assert h.evaluation(2.4) == 0
    h.train(1.7)
    assert h.evaluation(2.35) == 0  # validation fell
    restored = EvalHistory()
    restored.load_state_dict(json.loads(json.dumps(h.state_dict())))
    h.train(1.6), restored.train(1.6)
    assert h.evaluation(2.5) == restored.evaluation(2.5) == 1
