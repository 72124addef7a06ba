"""Reliability: crashes, signals, numerical faults, damaged or hostile run folders, bad input, full or read-only disks.

Oracles are independent of the code under test: an uninterrupted run, a copy of the run without the damaged part,
hand-computed learning rates, the original text, the bytes of the run before the failed command.
"""

from __future__ import annotations

import ast
import errno
import json
import math
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import HANG_S, cli_env, lmlab_cmd, read_jsonl, tiny_config, write_corpus
from lmlab import tokenizer as tok
from lmlab.checkpoint import checkpoint_dirs, verify_checkpoint
from lmlab.cli import main
from lmlab.common import LmlabError, sha256_file
from lmlab.train import RunLock, train

REPO = Path(__file__).resolve().parents[1]

# Tiny model settings for CLI training runs in this file.
MODEL_ARGS = ["--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--block-size", "16", "--batch-size", "4",
              "--dropout", "0"]  # not left to the corpus: runs with other step budgets are compared


# ---------------------------------------------------------------------------------------------------------------
# helpers


def _cli(capsys, *argv: str) -> tuple[int, str, str]:
    """`lmlab ARGV` in this process: (exit code, stdout, stderr)."""
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def _scrub(text: str) -> str:
    """Text without its absolute paths (a tmp_path named after the test could hold any word we look for)."""
    return re.sub(r"/[^\s:;,()'\"]*", "<path>", text)


def _assert_clean_error(rc: int, err: str, *expect: str, one_line: bool = True) -> str:
    """Non-zero exit, no traceback, exactly one stderr line with 'error' (the only line but those saying which
    corpus is read, when one_line) naming
    each of `expect` (words are looked for outside paths, paths as they are); returns that line."""
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith("reading corpus ")]
    assert rc != 0, f"exit code {rc}, stderr:\n{err}"
    assert "Traceback" not in err, err
    errors = [ln for ln in lines if "error" in _scrub(ln)]
    assert len(errors) == 1, f"expected exactly one error line on stderr, got:\n{err}"
    if one_line:
        assert len(lines) == 1, f"expected one line on stderr, got:\n{err}"
    line = errors[0]
    assert "internal error" not in line, f"an unexpected exception reached the last-resort handler: {line}"
    for text in expect:
        where = line if "/" in text else _scrub(line)
        assert text.lower() in where.lower(), f"{text!r} not in {line!r}"
    return line


def _snapshot(folder: Path) -> dict[str, bytes]:
    """Every file of a folder with its bytes (the run's lock file aside: it is empty and only ever created)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(Path(folder).rglob("*"))
            if p.is_file() and p.name != ".lock"}


def _rehash(ckpt: Path) -> None:
    """Make state.json agree with whatever files the checkpoint now holds (what someone crafting a run would do)."""
    state = json.loads((ckpt / "state.json").read_text())
    state["files"] = {name: sha256_file(ckpt / name) for name in state["files"]}
    (ckpt / "state.json").write_text(json.dumps(state))


def _all_finite(path: Path) -> bool:
    return all(torch.isfinite(t).all() for t in load_file(str(path)).values())


def _train_losses(run: Path) -> dict[int, float]:
    out: dict[int, float] = {}
    for rec in read_jsonl(run / "metrics.jsonl"):
        if "train_loss" in rec:
            assert rec["step"] not in out, f"step {rec['step']} logged twice"
            out[rec["step"]] = rec["train_loss"]
    return out


def _train_steps(run: Path) -> list[int]:
    return [r["step"] for r in read_jsonl(run / "metrics.jsonl") if "train_loss" in r]


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    """A tiny trained run with checkpoints at steps 2, 4 and 6 (train it once, copy it per test)."""
    root = tmp_path_factory.mktemp("base")
    corpus = write_corpus(root / "corpus.txt", 200, seed=1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LMLAB_CACHE", str(tmp_path_factory.mktemp("base-cache")))
        train(tiny_config(corpus, root / "RUN", max_steps=6, checkpoint_interval=2, keep_checkpoints=3,
                          eval_interval=1000, eval_tokens=64))
    assert [p.name for p in checkpoint_dirs(root / "RUN")] == ["step_00000002", "step_00000004", "step_00000006"]
    return root / "RUN"


@pytest.fixture
def run(base_run, tmp_path) -> Path:
    dst = tmp_path / "RUN"
    shutil.copytree(base_run, dst)
    return dst


@pytest.fixture
def data(base_run) -> list[str]:
    """--data for the base run's corpus: commands that read a copied run's data name it (it was not made there)."""
    return ["--data", str(base_run.parent / "corpus.txt")]


SAMPLE = ["--max-new-tokens", "24", "--temperature", "0", "--prompt", "the "]


# ---------------------------------------------------------------------------------------------------------------
# 1. SIGKILL at random moments, some inside a checkpoint write


@pytest.mark.slow
def test_crash_test_script_passes(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "crash_test.py"), "--kills", "3", "--steps", "60",
         "--workdir", str(tmp_path / "crash")],
        cwd=str(REPO), env=cli_env(), capture_output=True, text=True, timeout=HANG_S,
    )
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-3000:]}"
    assert "PASS" in proc.stdout, proc.stdout
    # and it was not vacuous: killed at least once, inside a checkpoint write. (A timed kill can be missed when that
    # process finishes first, and kills before the first complete checkpoint restart from step 0 rather than
    # resume, so neither the kill count nor the resume count is fixed.)
    m = re.search(r"(\d+) kills \((\d+) during a checkpoint write\)", proc.stdout)
    assert m, proc.stdout
    kills, during = map(int, m.groups())
    assert 1 <= kills <= 3 and during >= 1, proc.stdout


# ---------------------------------------------------------------------------------------------------------------
# 2. SIGTERM and Ctrl-C: a checkpoint at the step reached, exit 130, the resume command, exact continuation

SIG_ARGS = [*MODEL_ARGS, "--max-time", "0", "--eval-interval", "1000000", "--eval-tokens", "64",
            "--sample-tokens", "0", "--no-progress", "--schedule", "constant", "--warmup", "5", "--threads", "1",
            "--seed", "3"]


class Stopped:
    def __init__(self, signame, root, corpus, run, rc, stderr):
        self.signame, self.root, self.corpus, self.run, self.rc, self.stderr = signame, root, corpus, run, rc, stderr


@pytest.fixture(scope="module")
def stopped_runs(tmp_path_factory):
    """A long training per signal (run side by side), stopped once it has logged a few steps."""
    root = tmp_path_factory.mktemp("signals")
    corpus = write_corpus(root / "corpus.txt", 300, seed=2)
    cache = tmp_path_factory.mktemp("signals-cache")

    def one(signame: str) -> Stopped:
        run = root / f"RUN-{signame}"
        cmd = lmlab_cmd("train", "--data", str(corpus), "--out", str(run), "--max-steps", "100000",
                        "--checkpoint-interval", "1000000", *SIG_ARGS)
        proc = subprocess.Popen(cmd, cwd=str(root), env=cli_env(cache), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        try:
            deadline = time.time() + HANG_S
            while time.time() < deadline and proc.poll() is None:
                metrics = run / "metrics.jsonl"
                if metrics.exists() and metrics.read_text().count('"train_loss"') >= 3:
                    break
                time.sleep(0.02)
            assert proc.poll() is None, f"training ended before the signal: {proc.communicate()[1]}"
            proc.send_signal(getattr(signal, signame))
            _, stderr = proc.communicate(timeout=HANG_S)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        pristine = root / f"pristine-{signame}"
        shutil.copytree(run, pristine)
        return Stopped(signame, root, corpus, pristine, proc.returncode, stderr)

    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(zip(["SIGTERM", "SIGINT"], pool.map(one, ["SIGTERM", "SIGINT"])))


SIGNALS = ["SIGTERM", "SIGINT"]


@pytest.mark.slow
@pytest.mark.parametrize("signame", SIGNALS)
def test_signal_writes_a_checkpoint_and_says_how_to_resume(stopped_runs, signame):
    s = stopped_runs[signame]
    assert s.rc == 130, f"exit {s.rc}\n{s.stderr}"
    assert "Traceback" not in s.stderr, s.stderr
    assert "lmlab train --resume" in s.stderr
    assert str(s.root / f"RUN-{signame}") in s.stderr
    dirs = checkpoint_dirs(s.run)
    assert len(dirs) == 1, dirs  # --checkpoint-interval 1000000: only the one written on the signal
    state = verify_checkpoint(dirs[0])
    steps = _train_steps(s.run)
    assert len(steps) >= 3
    # the checkpoint is at the step it stopped at: the log covers exactly the steps the checkpoint holds
    assert state["step"] == int(dirs[0].name.split("_")[1]) == steps[-1]
    assert steps == list(range(1, state["step"] + 1))
    assert not [p for p in s.run.rglob("*") if ".tmp" in p.name]


@pytest.mark.slow
@pytest.mark.parametrize("signame", SIGNALS)
def test_resume_after_signal_continues_from_the_checkpoint_step(stopped_runs, signame, tmp_path, capsys):
    s = stopped_runs[signame]
    run = tmp_path / "RUN"
    shutil.copytree(s.run, run)
    n = verify_checkpoint(checkpoint_dirs(run)[-1])["step"]
    before = _train_steps(run)
    rc, _, err = _cli(capsys, "train", "--resume", run, "--max-steps", n + 3, "--data", s.corpus)
    assert rc == 0, err
    assert f"step_{n:08d}" in err
    after = _train_steps(run)
    assert after[: len(before)] == before
    assert after[len(before)] == n + 1  # the first new record
    assert after == list(range(1, n + 4))


@pytest.mark.slow
@pytest.mark.parametrize("signame", SIGNALS)
def test_resume_after_signal_equals_an_uninterrupted_run(stopped_runs, signame, tmp_path, capsys):
    """Stop + resume must lose nothing: the same losses, bit for bit, as a run that was never stopped."""
    s = stopped_runs[signame]
    run = tmp_path / "RUN"
    shutil.copytree(s.run, run)
    n = verify_checkpoint(checkpoint_dirs(run)[-1])["step"]
    rc, _, err = _cli(capsys, "train", "--resume", run, "--max-steps", n + 3, "--data", s.corpus)
    assert rc == 0, err
    ref = tmp_path / "REF"
    rc, _, err = _cli(capsys, "train", "--data", s.corpus, "--out", ref, "--max-steps", n + 3,
                      "--checkpoint-interval", "1000000", *SIG_ARGS)
    assert rc == 0, err
    resumed, reference = _train_losses(run), _train_losses(ref)
    assert sorted(reference) == list(range(1, n + 4))
    diff = [k for k in reference if resumed.get(k) != reference[k]]
    assert not diff, (f"stopped at step {n} by {signame}: losses differ from an uninterrupted run at steps "
                      f"{diff[:5]} (the signal checkpoint holds the state of a half-done step)")


# ---------------------------------------------------------------------------------------------------------------
# 3. Numerical faults: skip, roll back with a lower learning rate, stop with a diagnosis


class RollbackLoop(BaseException):
    """Raised by the guard below when training keeps rolling back past --max-rollbacks."""


def _nan_grad_norm(monkeypatch, bad_calls):
    """Make lmlab.train.clip_grad_norm report a NaN norm on the calls for which bad_calls(i) is true (i from 1)."""
    import lmlab.train as lt

    real = lt.clip_grad_norm
    calls = {"n": 0}

    def fake(params, max_norm):
        calls["n"] += 1
        norm = real(params, max_norm)
        return torch.tensor(float("nan")) if bad_calls(calls["n"]) else norm

    monkeypatch.setattr(lt, "clip_grad_norm", fake)
    return calls


def _guard_rollbacks(monkeypatch, limit: int):
    """Count checkpoint loads inside train(); more than `limit` means it never stops rolling back."""
    import lmlab.train as lt

    real = lt.load_newest
    calls = {"n": 0}

    def guarded(*args, **kw):
        calls["n"] += 1
        if calls["n"] > limit:
            raise RollbackLoop(f"{calls['n']} checkpoint loads: training keeps rolling back")
        return real(*args, **kw)

    monkeypatch.setattr(lt, "load_newest", guarded)
    return calls


def test_single_nonfinite_step_is_skipped_and_training_continues(tmp_path, monkeypatch):
    corpus = write_corpus(tmp_path / "corpus.txt")
    _nan_grad_norm(monkeypatch, lambda i: i == 7)
    run = tmp_path / "RUN"
    summary = train(tiny_config(corpus, run, max_steps=12, checkpoint_interval=1, keep_checkpoints=20,
                                eval_interval=1000, eval_tokens=64))
    assert summary["steps"] == 12
    records = [r for r in read_jsonl(run / "metrics.jsonl") if "train_loss" in r]
    assert [r["step"] for r in records] == list(range(1, 13))
    assert [r["step"] for r in records if r.get("skipped")] == [7]
    assert records[6]["skipped_total"] == 1 and math.isnan(records[6]["grad_norm"])
    assert not any("rollback" in r for r in read_jsonl(run / "metrics.jsonl"))
    dirs = {int(p.name.split("_")[1]): p for p in checkpoint_dirs(run)}
    # no checkpoint is written while a non-finite step is pending, so a rollback always lands on good weights
    assert sorted(dirs) == [s for s in range(1, 13) if s != 7]
    ck = {s: load_file(str(p / "model.safetensors")) for s, p in dirs.items()}
    adam_steps = {s: {v["step"] for v in json.loads((p / "state.json").read_text())["optimizer"]["scalars"].values()}
                  for s, p in dirs.items()}
    # the skipped step made no update: after step 8 the optimizer has taken 7 steps, not 8
    assert adam_steps[6] == {6} and adam_steps[8] == {7} and adam_steps[12] == {11}
    assert any(not torch.equal(ck[5][k], ck[6][k]) for k in ck[5])
    assert any(not torch.equal(ck[6][k], ck[8][k]) for k in ck[6])
    assert all(torch.isfinite(t).all() for t in ck[12].values())
    assert all(torch.isfinite(t).all() for t in ck[12].values())
    assert verify_checkpoint(checkpoint_dirs(run)[-1])["skipped_steps"] == 1


def test_persistent_nonfinite_steps_roll_back_with_halved_lr_then_stop(tmp_path, monkeypatch, capsys):
    """Gradients NaN from the 7th step on: 3 bad steps -> rollback (lr x0.5) -> 3 bad -> rollback (x0.25) -> 3 bad ->
    stop with exit 2 and a diagnosis (--max-rollbacks 2)."""
    corpus = write_corpus(tmp_path / "corpus.txt")
    _nan_grad_norm(monkeypatch, lambda i: i >= 7)
    loads = _guard_rollbacks(monkeypatch, limit=6)
    run = tmp_path / "RUN"
    lr = 0.002
    try:
        rc, _, err = _cli(capsys, "train", "--data", corpus, "--out", run, *MODEL_ARGS, "--max-steps", "40",
                          "--max-time", "0", "--checkpoint-interval", "4", "--keep-checkpoints", "5",
                          "--eval-interval", "1000", "--eval-tokens", "64", "--sample-tokens", "0", "--no-progress",
                          "--optimizer", "adamw", "--lr", str(lr), "--schedule", "constant", "--warmup", "0",
                          "--max-bad-steps", "3", "--max-rollbacks", "2")
    except RollbackLoop as e:
        records = read_jsonl(run / "metrics.jsonl")
        pytest.fail(f"{e}; rollback records: {[r for r in records if 'rollback' in r]} (the rollback count and "
                    f"lr scale are reset from the checkpoint on every rollback)")
    assert rc == 2, err
    line = _assert_clean_error(rc, err, "diverged", "learning rate", one_line=False)
    assert err.strip().splitlines()[-1] == line
    assert loads["n"] == 2
    records = read_jsonl(run / "metrics.jsonl")
    rollbacks = [r for r in records if "rollback" in r]
    assert [(r["rollback"], r["lr_scale"]) for r in rollbacks] == [(1, 0.5), (2, 0.25)]
    # after each rollback, training goes on from the checkpoint step with the learning rate scaled
    scale = 1.0
    for r in records:
        if "rollback" in r:
            scale = r["lr_scale"]
        elif "train_loss" in r:
            assert r["lr"] == pytest.approx(lr * scale), r
    skipped = [r for r in records if r.get("skipped")]
    assert len(skipped) >= 3 and all(math.isnan(r["grad_norm"]) for r in skipped)
    for d in checkpoint_dirs(run):
        verify_checkpoint(d)
        assert _all_finite(d / "model.safetensors"), d


def test_absurd_learning_rate_is_skipped_rolled_back_and_diagnosed(tmp_path, capsys):
    """A real divergence (SGD, lr 1e12, no clipping): non-finite steps are skipped, rolled back, then diagnosed."""
    corpus = write_corpus(tmp_path / "corpus.txt")
    run = tmp_path / "RUN"
    rc, _, err = _cli(capsys, "train", "--data", corpus, "--out", run, *MODEL_ARGS, "--max-steps", "200",
                      "--max-time", "0", "--checkpoint-interval", "1", "--keep-checkpoints", "3",
                      "--eval-interval", "1000", "--eval-tokens", "64", "--sample-tokens", "0", "--no-progress",
                      "--optimizer", "sgd", "--lr", "1e12", "--grad-clip", "0", "--schedule", "constant",
                      "--warmup", "0", "--max-bad-steps", "3", "--max-rollbacks", "1")
    line = _assert_clean_error(rc, err, "diverged", "learning rate", one_line=False)
    assert rc == 2 and err.strip().splitlines()[-1] == line
    records = read_jsonl(run / "metrics.jsonl")
    skipped = [r for r in records if r.get("skipped")]
    assert skipped, "no step was skipped"
    for r in skipped:
        assert not (math.isfinite(r["train_loss"]) and math.isfinite(r["grad_norm"])), r
    for r in records:
        if "train_loss" in r and not r.get("skipped"):
            assert math.isfinite(r["train_loss"]) and math.isfinite(r["grad_norm"]), r
    assert [r["lr_scale"] for r in records if "rollback" in r] == [0.5]
    assert any(r.get("lr") == pytest.approx(0.5e12) for r in records if "train_loss" in r)
    last = checkpoint_dirs(run)[-1]
    verify_checkpoint(last)
    assert _all_finite(last / "model.safetensors")


# ---------------------------------------------------------------------------------------------------------------
# 4. Checkpoint integrity and schema


def _truncate(path: Path) -> None:
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])


def _without_newest(run: Path, dst: Path) -> Path:
    """The oracle: the same run with its newest checkpoint simply absent."""
    shutil.copytree(run, dst)
    shutil.rmtree(checkpoint_dirs(dst)[-1])
    return dst


def test_truncated_newest_checkpoint_sample_falls_back_with_a_warning(run, tmp_path, capsys):
    oracle = _without_newest(run, tmp_path / "ORACLE")
    rc, expected, err = _cli(capsys, "sample", oracle, *SAMPLE)
    assert rc == 0, err
    _truncate(run / "checkpoints" / "step_00000006" / "model.safetensors")
    rc, out, err = _cli(capsys, "sample", run, *SAMPLE)
    assert rc == 0, err
    assert "Traceback" not in err
    assert out == expected  # the text of the previous checkpoint, and nothing else on stdout
    assert "warning" in _scrub(err).lower() and "step_00000006" in err  # the warning goes to stderr


def test_truncated_newest_checkpoint_eval_json_stays_parseable(run, data, tmp_path, capsys):
    oracle = _without_newest(run, tmp_path / "ORACLE")
    rc, expected, err = _cli(capsys, "eval", oracle, "--json", *data)
    assert rc == 0, err
    _truncate(run / "checkpoints" / "step_00000006" / "model.safetensors")
    rc, out, err = _cli(capsys, "eval", run, "--json", *data)
    assert rc == 0, err
    assert json.loads(out) == json.loads(expected)


def test_all_checkpoints_damaged_is_a_clear_error(run, capsys):
    for d in checkpoint_dirs(run):
        _truncate(d / "model.safetensors")
    before = _snapshot(run)
    for cmd in ("sample", "eval"):
        rc, out, err = _cli(capsys, cmd, run)
        _assert_clean_error(rc, err, "checkpoint", one_line=False)
        assert "damaged" in _scrub(err), err  # the user learns why no checkpoint could be used
    assert _snapshot(run) == before


ESCAPE = "../../../escape.bin"  # from RUN/checkpoints/step_N: a file beside RUN, outside the run


@pytest.mark.parametrize("case", ["extra-relative", "model-relative", "extra-absolute", "list"])
def test_state_json_file_list_cannot_leave_the_run(run, capsys, case):
    """Even with every recorded hash correct, a file list naming a path outside the checkpoint is refused."""
    outside = run.parent / "escape.bin"
    outside.write_bytes(b"outside the run")
    digest = sha256_file(outside)
    for d in checkpoint_dirs(run):
        own = {name: sha256_file(d / name) for name in ("model.safetensors", "optimizer.safetensors")}
        assert (d / ESCAPE).resolve() == outside.resolve()
        files = {
            "extra-relative": {**own, ESCAPE: digest},
            "model-relative": {ESCAPE: digest, "optimizer.safetensors": own["optimizer.safetensors"]},
            "extra-absolute": {**own, str(outside): digest},
            "list": [*own, ESCAPE],
        }[case]
        state = json.loads((d / "state.json").read_text())
        state["files"] = files
        (d / "state.json").write_text(json.dumps(state))
        with pytest.raises(LmlabError):
            verify_checkpoint(d)
    rc, _, err = _cli(capsys, "sample", run, *SAMPLE)
    _assert_clean_error(rc, err, "checkpoint", one_line=False)
    assert outside.read_bytes() == b"outside the run"


@pytest.mark.parametrize("command", ["sample", "eval", "train"])
def test_config_from_a_newer_schema_is_refused(run, capsys, command):
    config = json.loads((run / "config.json").read_text())
    config["schema_version"] = 999
    (run / "config.json").write_text(json.dumps(config))
    before = _snapshot(run)
    argv = ["train", "--resume", run, "--max-steps", "10"] if command == "train" else [command, run]
    rc, _, err = _cli(capsys, *argv)
    _assert_clean_error(rc, err, "schema version", "999")
    assert _snapshot(run) == before


def test_keep_checkpoints_keeps_the_last_n(tmp_path):
    corpus = write_corpus(tmp_path / "corpus.txt")
    run = tmp_path / "RUN"
    train(tiny_config(corpus, run, max_steps=10, checkpoint_interval=2, keep_checkpoints=2, eval_interval=1000,
                      eval_tokens=64))
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000008", "step_00000010"]
    train(tiny_config(corpus, "", resume=str(run), max_steps=15, checkpoint_interval=2, keep_checkpoints=3,
                      eval_interval=1000, eval_tokens=64))
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000012", "step_00000014",
                                                                       "step_00000015"]
    for d in checkpoint_dirs(run):
        verify_checkpoint(d)


# ---------------------------------------------------------------------------------------------------------------
# 5. Bad input: one clear line, non-zero exit, nothing of an existing run destroyed


def test_directory_without_text_files(tmp_path, run, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    hidden = tmp_path / "hidden"
    (hidden / ".git").mkdir(parents=True)
    (hidden / ".notes.txt").write_text("hidden text\n")
    (hidden / ".git" / "HEAD.txt").write_text("ref: refs/heads/main\n")
    (hidden / "image.bin").write_bytes(b"\x00\x01" * 100)
    for folder in (empty, hidden):
        out = tmp_path / f"out-{folder.name}"
        rc, _, err = _cli(capsys, "train", "--data", folder, "--out", out, *MODEL_ARGS, "--max-steps", "2",
                          "--max-time", "0")
        _assert_clean_error(rc, err, "no text files", str(folder))
        assert not (out / "config.json").exists()
    before = _snapshot(run)
    rc, _, err = _cli(capsys, "eval", run, "--data", empty)
    _assert_clean_error(rc, err, "no text files")
    assert _snapshot(run) == before


def test_huge_single_line_file_prepares_round_trips_and_trains(tmp_path, capsys):
    unit = "a\u00e9b\u20acc\U0001d11e the cat "  # 1-, 2-, 3- and 4-byte characters, never a newline
    text = (unit * (3_000_000 // len(unit.encode("utf-8")) + 1))
    path = tmp_path / "oneline.txt"
    path.write_text(text, encoding="utf-8")
    assert path.stat().st_size >= 3_000_000 and "\n" not in text
    from lmlab.data import iter_text, prepare, resolve_source

    # streamed in small chunks, the text comes back whole (characters split across chunks are not lost)
    assert "".join(iter_text(resolve_source(str(path)), chunk_bytes=4093)) == text
    rc, out, err = _cli(capsys, "data", "prepare", path)
    assert rc == 0, err
    prepared = prepare(resolve_source(str(path)), "char")
    assert len(prepared.tokens) == len(text)
    assert prepared.tokenizer.decode(prepared.tokens.tolist()) == text
    run = tmp_path / "RUN"
    rc, _, err = _cli(capsys, "train", "--data", path, "--out", run, *MODEL_ARGS, "--max-steps", "2", "--max-time",
                      "0", "--eval-tokens", "64", "--sample-tokens", "0", "--no-progress")
    assert rc == 0, err
    assert _train_steps(run) == [1, 2]


def test_directory_mixing_utf8_and_latin1_names_the_latin1_file(tmp_path, run, capsys):
    mixed = tmp_path / "mixed"
    write_corpus(mixed / "a_utf8.txt", 50, extra="caf\u00e9 cr\u00e8me\n")
    (mixed / "b_latin1.txt").write_bytes("caf\u00e9 cr\u00e8me br\u00fbl\u00e9e\n".encode("latin-1") * 20)
    write_corpus(mixed / "c_utf8.txt", 50, seed=3)
    out = tmp_path / "out"
    rc, _, err = _cli(capsys, "train", "--data", mixed, "--out", out, *MODEL_ARGS, "--max-steps", "2",
                      "--max-time", "0")
    line = _assert_clean_error(rc, err, str(mixed / "b_latin1.txt"), "UTF-8")
    assert "a_utf8.txt" not in line and "c_utf8.txt" not in line
    assert not (out / "config.json").exists()
    before = _snapshot(run)
    rc, _, err = _cli(capsys, "eval", run, "--data", mixed)
    _assert_clean_error(rc, err, str(mixed / "b_latin1.txt"))
    assert _snapshot(run) == before


def _other_run_tokenizer(tmp_path: Path, base: Path, same_size: bool) -> Path:
    """tokenizer.json of a second, real run whose corpus has other characters."""
    own = tok.load(base / "tokenizer.json")
    text = Path(json.loads((base / "config.json").read_text())["data"]["data"]).read_text()
    if same_size:  # swap one character for another: same vocabulary size, other symbols
        old = next(c for c in sorted(set(text)) if c.isalpha())
        assert "Q" not in text
        text = text.replace(old, "Q")
    else:
        text += "\u00e9\u00e8\u00ea\u00eb \u03b1\u03b2\u03b3\n" * 10
    corpus = tmp_path / "other-corpus.txt"
    corpus.write_text(text)
    other = tmp_path / "OTHER"
    train(tiny_config(corpus, other, max_steps=1, eval_interval=1000, eval_tokens=16))
    t = tok.load(other / "tokenizer.json")
    assert (t.vocab_size == own.vocab_size) == same_size and t.fingerprint() != own.fingerprint()
    return other / "tokenizer.json"


@pytest.mark.parametrize("same_size", [False, True], ids=["other-size", "same-size"])
def test_tokenizer_from_another_run_is_refused(tmp_path, run, capsys, same_size):
    shutil.copy(_other_run_tokenizer(tmp_path, run, same_size), run / "tokenizer.json")
    before = _snapshot(run)
    for argv in (["sample", run, *SAMPLE], ["eval", run]):
        rc, _, err = _cli(capsys, *argv)
        _assert_clean_error(rc, err, "tokenizer")
    assert _snapshot(run) == before


def test_checkpoint_of_an_incompatible_config_is_refused(run, capsys):
    config = json.loads((run / "config.json").read_text())
    config["model"]["n_embd"] = 32
    (run / "config.json").write_text(json.dumps(config))
    before = _snapshot(run)
    for argv in (["sample", run, *SAMPLE], ["eval", run], ["train", "--resume", run, "--max-steps", "10"]):
        rc, _, err = _cli(capsys, *argv)
        line = _scrub(_assert_clean_error(rc, err)).lower()
        # the message says what is wrong: the weights do not fit the model that config.json describes
        assert any(w in line for w in ("config", "does not fit", "mismatch", "shape", "size")), line
        assert _snapshot(run) == before, argv


def test_disk_full_while_writing_a_checkpoint(tmp_path, monkeypatch, capsys):
    import lmlab.checkpoint as lc

    corpus = write_corpus(tmp_path / "corpus.txt")
    real = lc.save_file
    calls = {"n": 0}

    def full_disk(tensors, filename, *args, **kw):
        calls["n"] += 1
        if calls["n"] >= 2:
            # what a full disk does: part of the file is written, then the write fails
            Path(filename).write_bytes(b"\0" * 100)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(tensors, filename, *args, **kw)

    monkeypatch.setattr(lc, "save_file", full_disk)
    run = tmp_path / "RUN"
    rc, _, err = _cli(capsys, "train", "--data", corpus, "--out", run, *MODEL_ARGS, "--max-steps", "6",
                      "--max-time", "0", "--checkpoint-interval", "3", "--eval-interval", "1000",
                      "--eval-tokens", "64", "--sample-tokens", "0", "--no-progress")
    assert calls["n"] == 2
    line = _assert_clean_error(rc, err, "checkpoint", one_line=False)
    assert err.strip().splitlines()[-1] == line and ("space" in line.lower() or "ENOSPC" in line)
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step_00000003"]
    assert verify_checkpoint(run / "checkpoints" / "step_00000003")["step"] == 3
    assert not [p for p in run.rglob("*") if ".tmp" in p.name]
    # with space again, the run resumes from the intact checkpoint
    monkeypatch.setattr(lc, "save_file", real)
    rc, _, err = _cli(capsys, "train", "--resume", run)
    assert rc == 0, err
    assert "step_00000003" in err and _train_steps(run) == list(range(1, 7))


def test_output_on_a_read_only_filesystem(tmp_path, capsys):
    target = Path("/sys/lmlab-test-run")
    if not Path("/sys/kernel").is_dir() or target.exists():
        pytest.skip("no sysfs at /sys to stand in for a read-only filesystem")
    corpus = write_corpus(tmp_path / "corpus.txt")
    rc, _, err = _cli(capsys, "train", "--data", corpus, "--out", target, *MODEL_ARGS, "--max-steps", "2",
                      "--max-time", "0")
    _assert_clean_error(rc, err, str(target))
    assert not target.exists()


DRIVER = r"""
import contextlib, io, json, sys
from lmlab.cli import main
results = []
for argv in json.loads(sys.argv[1]):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main(argv)
        except BaseException as e:
            rc, err = -1, io.StringIO(f"{type(e).__name__}: {e}")
    results.append({"rc": rc, "out": out.getvalue(), "err": err.getvalue()})
print(json.dumps(results))
"""


@pytest.fixture
def world_dir():
    """A folder that user nobody can reach (pytest's own tmp folders are private to root)."""
    d = Path(tempfile.mkdtemp(prefix="lmlab-ro-"))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _as_nobody() -> None:
    os.setgid(65534)
    os.setuid(65534)


def _as_root_without_dac_override() -> None:
    """Root, but file permissions apply to it: CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH leave the bounding set, so
    the program we exec does not get them."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
        if libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP) failed")


def _unprivileged():
    """A preexec_fn that takes away root's power to write anywhere: user nobody when nobody can run this Python
    (here it may live under /root), else root without the capabilities that bypass file permissions."""
    try:
        if subprocess.run([sys.executable, "-c", "import lmlab"], capture_output=True,
                          preexec_fn=_as_nobody).returncode == 0:
            return _as_nobody, "user nobody"
    except OSError:  # nobody may not execute the interpreter at all
        pass
    return _as_root_without_dac_override, "root without CAP_DAC_OVERRIDE"


@pytest.mark.slow
def test_read_only_output_as_an_unprivileged_user(world_dir):
    if os.geteuid() != 0:
        pytest.skip("needs root, to run the command as user nobody or as root without CAP_DAC_OVERRIDE")
    drop, who = _unprivileged()
    corpus = write_corpus(world_dir / "corpus.txt")
    cache = world_dir / "cache"
    cache.mkdir()
    cache.chmod(0o777)
    ro = world_dir / "ro"
    ro.mkdir()
    run = world_dir / "RUN"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LMLAB_CACHE", str(world_dir / "root-cache"))
        train(tiny_config(corpus, run, max_steps=4, checkpoint_interval=2, eval_interval=1000, eval_tokens=64))
    (world_dir / "root-cache").chmod(0o755)
    for p in [ro, run, *run.rglob("*")]:
        p.chmod(0o555 if p.is_dir() else 0o444)
    corpus.chmod(0o444)
    before = _snapshot(run)
    cases = [
        ["train", "--data", str(corpus), "--out", str(ro / "new"), *MODEL_ARGS, "--max-steps", "2", "--max-time", "0"],
        ["train", "--data", str(corpus), "--out", str(ro), *MODEL_ARGS, "--max-steps", "2", "--max-time", "0"],
        ["train", "--resume", str(run), "--max-steps", "8"],
        ["sample", str(run), *SAMPLE],
    ]
    env = {**cli_env(cache), "HOME": str(cache), "PYTHONDONTWRITEBYTECODE": "1"}
    proc = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(cases)], cwd=str(world_dir), env=env,
                          capture_output=True, text=True, timeout=HANG_S, preexec_fn=drop)
    assert proc.returncode == 0, f"as {who}: {proc.stderr}"
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"commands ran as {who}")
    _assert_clean_error(results[0]["rc"], results[0]["err"], str(ro / "new"))
    _assert_clean_error(results[1]["rc"], results[1]["err"], "not writable")
    assert results[3]["rc"] == 0, results[3]["err"]  # a read-only run can still be sampled
    assert results[3]["out"].startswith("the ")
    assert not (ro / "new").exists() and not list(ro.iterdir())
    assert _snapshot(run) == before
    # resuming a run the user may not write: one clear line that names the run
    _assert_clean_error(results[2]["rc"], results[2]["err"], str(run))


def test_max_time_zero_without_a_step_budget(tmp_path, capsys):
    from lmlab.config import get_preset

    assert get_preset("tiny").max_steps == 0  # the default preset has a time budget only
    corpus = write_corpus(tmp_path / "corpus.txt")
    out = tmp_path / "out"
    rc, _, err = _cli(capsys, "train", "--data", corpus, "--out", out, *MODEL_ARGS, "--max-time", "0")
    _assert_clean_error(rc, err, "budget")
    assert not out.exists()


@pytest.mark.parametrize("option,value", [("--n-layer", "0"), ("--batch-size", "-1"), ("--block-size", "0"),
                                          ("--n-embd", "-16"), ("--grad-accum", "0")])
def test_zero_and_negative_sizes(tmp_path, capsys, option, value):
    corpus = write_corpus(tmp_path / "corpus.txt")
    out = tmp_path / "out"
    rc, _, err = _cli(capsys, "train", "--data", corpus, "--out", out, *MODEL_ARGS, "--max-steps", "2",
                      "--max-time", "0", option, value)
    _assert_clean_error(rc, err, option)
    assert not out.exists()


def test_unknown_device(tmp_path, run, data, capsys):
    corpus = write_corpus(tmp_path / "corpus.txt")
    out = tmp_path / "out"
    rc, _, err = _cli(capsys, "train", "--data", corpus, "--out", out, *MODEL_ARGS, "--max-steps", "2",
                      "--max-time", "0", "--device", "tpu")
    _assert_clean_error(rc, err, "tpu")
    assert not (out / "config.json").exists()
    before = _snapshot(run)
    for argv in (["sample", run, "--device", "tpu"], ["eval", run, "--device", "tpu"],
                 ["train", "--resume", run, "--max-steps", "10", "--device", "tpu", *data]):
        rc, _, err = _cli(capsys, *argv)
        _assert_clean_error(rc, err, "tpu")
    assert _snapshot(run) == before


def test_cuda_when_not_available_does_not_touch_the_run(run, data, capsys):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here, so --device cuda is not an error")
    before = _snapshot(run)
    for argv in (["sample", run, "--device", "cuda"], ["train", "--resume", run, "--max-steps", "10",
                                                       "--device", "cuda", *data]):
        rc, _, err = _cli(capsys, *argv)
        _assert_clean_error(rc, err, "cuda")
    assert _snapshot(run) == before


def test_second_training_on_a_locked_run_is_refused(run, data, capsys):
    before = _snapshot(run)
    with RunLock(run):
        rc, _, err = _cli(capsys, "train", "--resume", run, "--max-steps", "10", *data)
        _assert_clean_error(rc, err, "locked")
        assert _snapshot(run) == before
        rc, out, err = _cli(capsys, "sample", run, *SAMPLE)  # reading a run that is being trained is fine
        assert rc == 0, err
    assert _snapshot(run) == before
    rc, _, err = _cli(capsys, "train", "--resume", run, "--max-steps", "8", *data)  # the lock is gone with its holder
    assert rc == 0, err


def test_a_reader_holding_the_lock_for_a_moment_does_not_block_training(tmp_path):
    """lmlab serve takes a shared lock for an instant to see whether a run is alive; training waits it out."""
    import fcntl
    import threading

    fd = os.open(tmp_path / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_SH)
    threading.Timer(0.08, lambda: os.close(fd)).start()
    with RunLock(tmp_path) as lock:
        assert lock.fd is not None
    fd = os.open(tmp_path / ".lock", os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_SH)  # held for good: refused, after a short wait
    try:
        with pytest.raises(LmlabError, match="locked"):
            RunLock(tmp_path).__enter__()
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------------------------------
# 6. Security: loading a run never executes code from it


class Payload:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _plant(path: Path, marker: Path, as_torch: bool = False) -> None:
    if as_torch:
        torch.save({"weights": Payload(str(marker))}, str(path))
    else:
        path.write_bytes(pickle.dumps(Payload(str(marker)), protocol=2))


@pytest.mark.parametrize("how", ["replace", "replace-rehash", "optimizer-rehash", "beside"])
def test_pickle_payloads_in_a_run_are_never_executed(run, data, tmp_path, capsys, how):
    marker = tmp_path / "PWNED"
    oracle = tmp_path / "ORACLE"
    shutil.copytree(run, oracle)
    for d in checkpoint_dirs(run):
        if how in ("replace", "replace-rehash"):
            _plant(d / "model.safetensors", marker)
            _plant(d / "optimizer.safetensors", marker, as_torch=True)
        elif how == "optimizer-rehash":
            _plant(d / "optimizer.safetensors", marker)
        for name in ("model.pt", "optimizer.pt", "pytorch_model.bin", "checkpoint.pkl"):
            _plant(d / name, marker, as_torch=name.endswith((".pt", ".bin")))
        if how.endswith("rehash"):
            _rehash(d)
    _plant(run / "model.pt", marker, as_torch=True)
    # the payload is live: unpickling it would create the marker
    with open(checkpoint_dirs(run)[-1] / "checkpoint.pkl", "rb") as f:
        pickle.load(f).close()
    assert marker.exists()
    marker.unlink()

    for cmd, extra in (("sample", SAMPLE), ("eval", ["--json", *data])):
        rc, out, err = _cli(capsys, cmd, run, *extra)
        assert not marker.exists(), f"`lmlab {cmd}` executed code from the run"
        assert "Traceback" not in err
        if how in ("beside", "optimizer-rehash") and rc == 0:
            rc_o, expected, _ = _cli(capsys, cmd, oracle, *extra)
            assert rc_o == 0 and out == expected  # the planted files were ignored
        else:
            _assert_clean_error(rc, err, one_line=False)
        if how == "beside":
            assert rc == 0, err  # files lmlab does not use are ignored


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield node


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    if isinstance(node, ast.Name):
        return node.id
    return "?"


@pytest.mark.slow
def test_source_never_unpickles():
    """No module loads pickles; torch.load only ever with weights_only=True; numpy never with allow_pickle."""
    modules = sorted((REPO / "lmlab").rglob("*.py"))
    assert len(modules) >= 10
    unpicklers = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}
    problems = []
    for path in modules:
        tree = ast.parse(path.read_text(), filename=str(path))
        pickle_names = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.split(".")[0] in unpicklers:
                        pickle_names.add(alias.asname or alias.name)
            elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in unpicklers:
                for alias in node.names:
                    if alias.name not in ("dump", "dumps", "HIGHEST_PROTOCOL"):
                        problems.append(f"{path.name}:{node.lineno}: from {node.module} import {alias.name}")
        attribute_bases = {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
        for node in ast.walk(tree):
            # a module may write a pickle for another program (pickle.dump), but never read one
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in pickle_names:
                if node.attr not in ("dump", "dumps", "HIGHEST_PROTOCOL", "DEFAULT_PROTOCOL"):
                    problems.append(f"{path.name}:{node.lineno}: {node.value.id}.{node.attr}")
            elif isinstance(node, ast.Name) and node.id in pickle_names and id(node) not in attribute_bases:
                problems.append(f"{path.name}:{node.lineno}: {node.id} passed around directly")
        for call in _calls(tree):
            name = _dotted(call.func)
            parts = name.split(".")
            kw = {k.arg: k.value for k in call.keywords}
            if parts[0] == "torch" and parts[-1] == "load":
                flag = kw.get("weights_only")
                if not (isinstance(flag, ast.Constant) and flag.value is True):
                    problems.append(f"{path.name}:{call.lineno}: {name}() without weights_only=True")
            if parts[0] in ("np", "numpy") and parts[-1] == "load":
                flag = kw.get("allow_pickle")
                if flag is not None and not (isinstance(flag, ast.Constant) and flag.value is False):
                    problems.append(f"{path.name}:{call.lineno}: {name}(allow_pickle=...)")
            if name in ("eval", "exec", "__import__") or parts[-1] in ("Unpickler", "loads") and parts[0] in pickle_names:
                problems.append(f"{path.name}:{call.lineno}: {name}()")
    assert not problems, problems
