"""The dashboard's data for an SFT run: the masked validation loss and the held-out answers (exact match per skill,
the share that ended their turn) that lmlab/sft.py logs at each evaluation reach the page as logged."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers import http, read_jsonl, serving, tiny_config

pytest.importorskip("uvicorn", reason="uvicorn is not installed (pip install -e .)")

from lmlab.serve.request import Limits  # noqa: E402

STATIC = Path(__file__).resolve().parent.parent / "lmlab" / "serve" / "static"


def sft_run(root: Path) -> Path:
    """A run folder as an SFT training leaves it mid-way (config.json, metrics.jsonl), without a checkpoint."""
    run = root / "chat"
    run.mkdir(parents=True)
    config = tiny_config("synthetic:chat", run, stage="sft").to_json()
    (run / "config.json").write_text(json.dumps(config))
    records = []
    for i, step in enumerate((10, 20, 30)):
        records.append({"step": step - 1, "tokens": 64 * step, "train_loss": 2.0 - 0.1 * i, "lr": 1e-3})
        records.append({"step": step, "val_loss": 1.5 - 0.2 * i, "val_accuracy": 0.3 + 0.1 * i, "val_stride": 16,
                        "exact_match": {"arithmetic": 0.25 * i, "copy": 0.5 + 0.125 * i}, "ended_turn": 0.1 + 0.3 * i})
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return run


def test_an_sft_run_serves_its_masked_loss_and_exact_match_series(tmp_path):
    run = sft_run(tmp_path / "runs")
    logged = read_jsonl(run / "metrics.jsonl")
    with serving(tmp_path / "runs", Limits(max_tokens=8, max_prompt_chars=50, max_concurrent=1)) as (url, _):
        status, runs = http(url + "/api/runs")
        assert status == 200
        [summary] = runs["runs"]
        assert summary["name"] == "chat" and summary["stage"] == "sft"
        assert summary["val_loss"] == logged[-1]["val_loss"] and summary["best_step"] == 30
        status, log = http(url + "/api/log?run=chat")
    assert status == 200 and log["records"] == logged
    evals = [r for r in log["records"] if "exact_match" in r]
    assert [r["step"] for r in evals] == [10, 20, 30]
    for skill in ("arithmetic", "copy"):  # one series per skill, as the chart draws it
        assert [r["exact_match"][skill] for r in evals] == [r["exact_match"][skill] for r in logged if "val_loss" in r]
    assert [r["ended_turn"] for r in evals] == [r["ended_turn"] for r in logged if "val_loss" in r]


def test_the_page_has_the_held_out_answers_chart():
    page = (STATIC / "index.html").read_text()
    script = (STATIC / "app.js").read_text()
    assert 'data-chart="answers"' in page
    assert 'id: "answers", skills: "exact_match"' in script and 'key: "ended_turn"' in script
    assert '"masked val"' in script
