"""TensorBoard output (an optional extra, installed with the test extra): the scalars equal metrics.jsonl."""

import json

import pytest

from helpers import tiny_config, write_corpus
from lmlab.train import train


def test_tensorboard_scalars_and_text_match_the_run_log(tmp_path):
    pytest.importorskip("tensorboard", reason="tensorboard is not installed (pip install -e '.[tensorboard]')")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    corpus = write_corpus(tmp_path / "corpus.txt")
    run = tmp_path / "run"
    train(tiny_config(corpus, run, max_steps=12, eval_interval=6, tensorboard=True))
    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train_loss = {r["step"]: r["train_loss"] for r in records if "train_loss" in r}
    val_loss = {r["step"]: r["val_loss"] for r in records if "val_loss" in r}
    logged = {e.step: e.value for e in events.Scalars("train/loss")}
    assert sorted(logged) == sorted(train_loss)
    for step, value in logged.items():
        assert value == pytest.approx(train_loss[step], rel=1e-6)
    assert {e.step: e.value for e in events.Scalars("val/loss")} == pytest.approx(val_loss, rel=1e-6)
    assert "probe" in " ".join(events.Tags()["tensors"])


def test_no_tensorboard_writes_nothing(tmp_path):
    corpus = write_corpus(tmp_path / "corpus.txt")
    run = tmp_path / "run"
    train(tiny_config(corpus, run, max_steps=4, tensorboard=False))
    assert not (run / "tensorboard").exists()
