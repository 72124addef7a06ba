"""run.Run, the one reader of a run folder: its config parsed once, its metric records typed by kind, its
checkpoints and snapshots listed by step, its model loaded; checked against the files training wrote."""

import json
import math
import os
import shutil

import pytest
import torch
from helpers import read_jsonl, tiny_config, write_corpus

from lmlab.common import LmlabError
from lmlab.run import (EvalRecord, Metrics, RollbackRecord, Run, TrainRecord, load_run, metric_record)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from lmlab.train import train

    root = tmp_path_factory.mktemp("run")
    corpus = write_corpus(root / "corpus.txt", 120)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LMLAB_CACHE", str(root / "cache"))
        train(tiny_config(corpus, root / "run", max_steps=12, eval_interval=4, checkpoint_interval=4,
                          trajectory_snapshots=3, tensorboard=False, inside=False, eval_tokens=64))
    return root / "run"


def test_the_records_are_those_of_metrics_jsonl_by_kind(trained):
    raw = read_jsonl(trained / "metrics.jsonl")  # the oracle: the lines as written, told apart by hand
    metrics = Run.open(trained).metrics()
    steps = [r for r in raw if "train_loss" in r and "val_loss" not in r]
    evals = [r for r in raw if "val_loss" in r]
    assert [r.step for r in metrics.train] == [r["step"] for r in steps] == list(range(1, 13))
    assert [r.train_loss for r in metrics.train] == [r["train_loss"] for r in steps]
    assert [r.lr for r in metrics.train] == [r["lr"] for r in steps]
    assert [r.step for r in metrics.evals] == [r["step"] for r in evals] == [0, 4, 8, 12]
    assert [r.val_loss for r in metrics.evals] == [r["val_loss"] for r in evals]
    assert [r.val_stride for r in metrics.evals] == [r["val_stride"] for r in evals]
    assert [r.best for r in metrics.evals] == [r["best"] for r in evals]
    assert metrics.rollbacks == []
    best = min(evals, key=lambda r: (r["val_loss"], -r["step"]))
    assert metrics.best_eval().step == best["step"]


def test_metric_record_tells_the_kinds_apart_and_keeps_only_known_fields():
    assert metric_record({"step": 3, "train_loss": 1.5, "lr": 0.1, "new_field": 1}) == TrainRecord(3, 1.5, lr=0.1)
    assert metric_record({"step": 4, "val_loss": 2.0, "exact_match": {"copy": 1.0}}) == EvalRecord(
        4, 2.0, exact_match={"copy": 1.0})
    assert metric_record({"step": 5, "rollback": 1, "lr_scale": 0.5}) == RollbackRecord(5, 1, 0.5)
    assert metric_record({"step": 6}) is None
    metrics = Metrics.of([{"step": 1, "val_loss": float("nan")}, {"step": 2, "val_loss": 3.0},
                          {"step": 3, "val_loss": 3.0}, {"step": 4, "val_loss": 4.0}])
    assert [r.step for r in metrics.evals] == [1, 2, 3, 4] and not metrics.evals[0].finite
    assert metrics.best_eval().step == 3  # the later of equals, never the NaN


def test_malformed_records_are_skipped_not_typed(tmp_path, trained):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    with open(run / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": "13", "train_loss": 1.0}) + "\n")  # a step that is not a count
        f.write(json.dumps({"step": 14, "val_loss": "low"}) + "\n")
        f.write("{cut sh")
    metrics = Run(run).metrics()
    assert metrics.train[-1].step == 12 and metrics.evals[-1].step == 12


def test_config_is_parsed_once_and_typed(trained, monkeypatch):
    from lmlab.config import TrainConfig

    calls = []
    real = TrainConfig.from_json.__func__
    monkeypatch.setattr(TrainConfig, "from_json", classmethod(lambda cls, obj: calls.append(1) or real(cls, obj)))
    run = Run.open(trained)
    assert isinstance(run.config, TrainConfig) and run.config.max_steps == 12 and run.config.model.n_embd == 16
    run.config, run.stage, run.config.data  # noqa: B018
    assert calls == [1]
    saved = json.loads((trained / "config.json").read_text())
    assert run.vocab_size == saved["vocab_size"] and run.run_id == saved["run_id"] and run.stage == "pretrain"


def test_a_folder_that_is_no_run_is_one_error(tmp_path, trained):
    with pytest.raises(LmlabError, match="not a directory"):
        Run.open(tmp_path / "missing")
    with pytest.raises(LmlabError, match="not an lmlab run"):
        Run.open(tmp_path)
    bad = tmp_path / "bad"
    shutil.copytree(trained, bad)
    (bad / "config.json").write_text(json.dumps({"schema_version": 1, "model": {}}))
    with pytest.raises(LmlabError, match="malformed"):
        Run.open(bad)
    (bad / "config.json").write_text("[" * 100 + "]" * 100)
    with pytest.raises(LmlabError, match="nested"):
        Run.open(bad)


def test_checkpoints_and_snapshots_by_step(tmp_path, trained):
    run = Run(trained)
    names = sorted(os.listdir(trained / "checkpoints"))
    assert [c.step for c in run.checkpoints()] == sorted((int(n[5:]) for n in names), reverse=True)
    assert run.checkpoints()[0].step == 12 and run.checkpoints()[0].verify()["step"] == 12
    snapshots = run.snapshots()
    assert [s.step for s in snapshots] == sorted(int(p.name[5:13]) for p in (trained / "trajectory").iterdir())
    assert snapshots and snapshots[-1].read() == (trained / "trajectory" / snapshots[-1].path.name).read_bytes()
    damaged = tmp_path / "damaged"
    shutil.copytree(trained, damaged)
    newest = damaged / "checkpoints" / names[-1] / "model.safetensors"
    newest.write_bytes(newest.read_bytes()[:-8] + b"\0" * 8)
    warned = []
    good = list(Run(damaged).good_checkpoints(warned.append))
    assert [c.step for c in good] == [c.step for c in run.checkpoints()][1:] and len(warned) == 1


def test_load_is_the_checkpoint_it_names(trained):
    from safetensors.torch import load_file

    loaded = load_run(trained, which="last")
    assert loaded.checkpoint.step == 12 and loaded.run_dir == trained and loaded.config.max_steps == 12
    saved = load_file(str(trained / "checkpoints" / "step_00000012" / "model.safetensors"))
    for name, tensor in loaded.model.state_dict().items():
        if name in saved:
            assert torch.equal(tensor, saved[name]), name
    best = Run(trained).load(which="best")
    assert best.checkpoint.step == Run(trained).metrics().best_eval().step
    assert math.isfinite(best.checkpoint.state["val_loss"])
