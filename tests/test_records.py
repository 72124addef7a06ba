"""Records (lmlab/bench/records.py): the t-distribution against tables and closed forms, the one-sided test of the
seeds' mean, the refusals, and `lmlab bench --record` end to end on a tiny corpus."""

from __future__ import annotations

import json
import math

import pytest

from helpers import HANG_S, run_cli, write_corpus
from lmlab.bench.records import below_target_p, record_markdown, regularized_beta, t_sf


@pytest.mark.parametrize("t, df, p", [(2.015, 5, 0.05), (3.365, 5, 0.01), (1.833, 9, 0.05), (2.821, 9, 0.01),
                                      (3.747, 4, 0.01), (1.645, 10**6, 0.05)])
def test_t_tail_matches_the_tables(t, df, p):
    assert t_sf(t, df) == pytest.approx(p, abs=3e-4)


@pytest.mark.parametrize("t", [-3.0, -0.4, 0.0, 0.7, 2.5, 40.0])
def test_t_tail_matches_the_closed_forms_of_one_and_two_degrees_of_freedom(t):
    assert t_sf(t, 1) == pytest.approx(0.5 - math.atan(t) / math.pi, abs=1e-12)  # Cauchy
    assert t_sf(t, 2) == pytest.approx(0.5 - t / (2 * math.sqrt(t * t + 2)), abs=1e-12)
    assert t_sf(-t, 7) == pytest.approx(1 - t_sf(t, 7), abs=1e-12)


def test_t_tail_matches_scipy_where_it_is_installed():
    stats = pytest.importorskip("scipy.stats")
    for t in (-2.0, 0.1, 1.0, 3.3, 8.0):
        for df in (1, 2, 4, 5, 29, 200):
            assert t_sf(t, df) == pytest.approx(stats.t.sf(t, df), rel=1e-9, abs=1e-14)


def test_regularized_beta_at_known_values_and_refusals():
    for x in (0.0, 0.2, 0.5, 0.93, 1.0):
        assert regularized_beta(1, 1, x) == pytest.approx(x, abs=1e-12)
        assert regularized_beta(3, 1, x) == pytest.approx(x**3, abs=1e-12)
        assert regularized_beta(1, 2, x) == pytest.approx(1 - (1 - x) ** 2, abs=1e-12)
    with pytest.raises(ValueError):
        regularized_beta(1, 1, 1.5)


def test_the_one_sided_test_of_the_seeds_mean():
    # mean 2, standard deviation 1, 3 seeds: t = 2 / (1 / sqrt 3) with 2 degrees of freedom
    t = 2 * math.sqrt(3)
    assert below_target_p([1.0, 2.0, 3.0], 4.0) == pytest.approx(0.5 - t / (2 * math.sqrt(t * t + 2)), abs=1e-12)
    assert below_target_p([1.0, 2.0, 3.0], 0.0) == pytest.approx(1 - below_target_p([1.0, 2.0, 3.0], 4.0))
    assert below_target_p([1.0, 2.0, 3.0], 2.0) == pytest.approx(0.5)  # the mean on the target: no evidence
    assert below_target_p([1.5, 1.5], 1.6) == 0.0 and below_target_p([1.5, 1.5], 1.4) == 1.0
    with pytest.raises(ValueError):
        below_target_p([1.5], 1.6)


def test_the_row_as_markdown():
    row = {"target": 1.88, "budget_s": 20.0, "date": "2026-01-02", "commit": "abc1234", "command": "lmlab train",
           "cpu": "Some CPU", "seeds": [1, 2], "val_losses": [1.81234, 1.8], "mean": 1.80617, "p": 0.0123}
    assert record_markdown(row) == ("| 1.88 | 20 s | 2026-01-02 | abc1234 | `lmlab train` | Some CPU | 1.8123 / 1.8000 "
                                    "| 1.8062 | 0.012 |")


@pytest.mark.parametrize("args, message", [
    (["--record", "1.5"], "--record TARGET and --budget SECONDS go together"),
    (["--budget", "10"], "--record TARGET and --budget SECONDS go together"),
    (["--record", "1.5", "--budget", "-1"], "--budget -1.0: give a positive number of seconds"),
    (["--record", "nan", "--budget", "5"], "--record nan: give a positive validation loss"),
    (["--record", "1.5", "--budget", "5", "--seeds", "1"], "--seeds 1: a t-test needs at least 2 seeds"),
])
def test_a_record_that_cannot_make_a_row_is_refused_in_one_line(args, message, capsys):
    from lmlab.cli import main

    assert main(["bench"] + args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"lmlab bench: error: {message}") and "\n" not in err


@pytest.mark.slow
def test_bench_record_trains_the_seeds_and_prints_the_row(tmp_path):
    corpus = write_corpus(tmp_path / "corpus.txt", n_lines=400)
    proc = run_cli(["bench", "--record", "9", "--budget", "1", "--seeds", "2", "--data", str(corpus), "--json"],
                   cwd=tmp_path, timeout=HANG_S)
    assert proc.returncode == 0, proc.stderr[-2000:]
    row = json.loads(proc.stdout)["record"]
    assert set(row) == {"target", "budget_s", "date", "commit", "command", "cpu", "seeds", "val_losses", "mean", "p"}
    assert row["target"] == 9 and row["budget_s"] == 1 and row["seeds"] == [1, 2] and len(row["val_losses"]) == 2
    assert all(0 < x < 9 for x in row["val_losses"])  # a random char model starts near ln(vocab) < 9
    assert row["mean"] == pytest.approx(sum(row["val_losses"]) / 2)
    assert row["p"] == pytest.approx(below_target_p(row["val_losses"], 9))
    assert f"--data {corpus} --max-time 1 --seed S" in row["command"] and row["cpu"] and row["commit"]
    assert "| target | budget |" in proc.stderr and "seed 2 of 2" in proc.stderr  # the row, on stderr beside the JSON
