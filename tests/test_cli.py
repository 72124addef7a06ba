"""The `lmlab` command end to end (train, sample, eval, data, help), and bad input: one clear line, no traceback."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from helpers import HANG_S, TINY_ARGS, cli_env, lmlab_cmd, make_text, read_jsonl, run_cli, write_corpus
from lmlab.cli import main

TRAIN_KEYS = {"step", "tokens", "train_loss", "lr", "grad_norm", "tokens_per_s", "elapsed_s"}
EVAL_KEYS = {"step", "val_loss"}
PROMPT = "the "


class Run:
    def __init__(self, workdir: Path, cache: Path, text: str, proc):
        self.workdir, self.cache, self.text, self.proc = workdir, cache, text, proc
        self.run = workdir / "RUN"
        self.corpus = workdir / "corpus.txt"


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Run:
    """One tiny training run through the real command line, in a temporary working directory, relative paths."""
    workdir = tmp_path_factory.mktemp("cli")
    cache = tmp_path_factory.mktemp("cli-cache")
    corpus = write_corpus(workdir / "corpus.txt", 200, seed=0)
    proc = run_cli(["train", "--data", "corpus.txt", "--out", "RUN", *TINY_ARGS], cwd=workdir, cache=cache)
    return Run(workdir, cache, corpus.read_text(encoding="utf-8"), proc)


def _ok(proc) -> None:
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert "Traceback" not in proc.stderr


# ---------------------------------------------------------------------------------------------------------------
# train


@pytest.mark.slow
def test_train_writes_a_complete_run(trained):
    _ok(trained.proc)
    run = trained.run
    for name in ("config.json", "tokenizer.json", "metrics.jsonl"):
        assert (run / name).is_file(), name
    ckpt = run / "checkpoints" / "step_00000020"
    assert (ckpt / "model.safetensors").is_file() and (ckpt / "model.safetensors").stat().st_size > 0
    assert (ckpt / "state.json").is_file()
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]
    assert "error" not in trained.proc.stderr.lower()


def test_config_and_tokenizer_record_the_settings(trained):
    from lmlab import tokenizer as tok

    config = json.loads((trained.run / "config.json").read_text())
    assert isinstance(config["schema_version"], int)
    assert (config["model"]["n_layer"], config["model"]["n_head"], config["model"]["n_embd"]) == (1, 2, 16)
    assert config["model"]["block_size"] == 16
    assert config["batch_size"] == 4 and config["max_steps"] == 20 and config["max_time"] == 0
    assert config["eval_interval"] == 10
    # the corpus given as a relative path (the recorded path may be made absolute, but must name the same file)
    assert (trained.workdir / config["data"]["data"]).resolve() == trained.corpus.resolve()
    assert config["data"]["tokenizer"] == "char"
    chars = sorted(set(trained.text))
    assert config["vocab_size"] == len(chars) + len(tok.SPECIAL_TOKENS)  # the characters, then the special tokens
    t = tok.load(trained.run / "tokenizer.json")
    assert t.kind == "char" and t.vocab_size == len(chars) + len(tok.SPECIAL_TOKENS)
    assert t.decode(t.encode(trained.text)) == trained.text


def test_metrics_jsonl_records(trained):
    lines = (trained.run / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]  # every line is one JSON object
    assert all(isinstance(r, dict) for r in records)
    trains = [r for r in records if "train_loss" in r]
    evals = [r for r in records if "val_loss" in r]
    assert len(trains) + len(evals) == len(records)
    assert [r["step"] for r in trains] == list(range(1, 21))
    for r in trains:
        assert TRAIN_KEYS <= r.keys(), r
        assert r["tokens"] == r["step"] * 4 * 16  # batch 4 x block 16 per step
        assert math.isfinite(r["train_loss"]) and r["train_loss"] > 0
        assert r["lr"] > 0 and r["grad_norm"] >= 0 and r["tokens_per_s"] > 0 and r["elapsed_s"] >= 0
    assert [r["step"] for r in evals] == [0, 10, 20]
    for r in evals:
        assert EVAL_KEYS <= r.keys(), r
        assert math.isfinite(r["val_loss"])
    # before any learning the model is close to the uniform guess, ln(vocab)
    vocab = len(set(trained.text)) + 5  # the characters and the special tokens
    assert evals[0]["val_loss"] == pytest.approx(math.log(vocab), abs=0.1)
    elapsed = [r["elapsed_s"] for r in trains]
    assert elapsed == sorted(elapsed)


# ---------------------------------------------------------------------------------------------------------------
# sample


@pytest.mark.slow
def test_sample_greedy_is_deterministic_and_starts_with_the_prompt(trained):
    args = ["sample", "RUN", "--prompt", PROMPT, "--max-new-tokens", "30", "--temperature", "0"]
    first = run_cli(args, cwd=trained.workdir, cache=trained.cache)
    second = run_cli(args, cwd=trained.workdir, cache=trained.cache)
    _ok(first)
    _ok(second)
    assert first.stdout.startswith(PROMPT)
    assert len(first.stdout) > len(PROMPT) + 1
    assert first.stdout == second.stdout
    assert set(first.stdout) <= set(trained.text) | {"\n"}  # only characters the char tokenizer knows


@pytest.mark.parametrize("cache_flag", [[], ["--no-cache"]])
def test_sample_greedy_matches_a_manual_argmax_loop(trained, capsys, cache_flag):
    """Greedy decoding done by hand: feed the whole window, take the most likely next token, repeat."""
    from lmlab.run import load_run

    n_new = 16 - len(PROMPT)  # the whole sequence fits in one block: no window cropping involved
    loaded = load_run(trained.run)
    ids = loaded.tokenizer.encode(PROMPT)
    with torch.no_grad():
        for _ in range(n_new):
            logits = loaded.model(torch.tensor([ids]))
            ids.append(int(logits[0, -1].argmax()))
    expected = loaded.tokenizer.decode(ids) + "\n"

    rc = main(["sample", str(trained.run), "--prompt", PROMPT, "--max-new-tokens", str(n_new), "--temperature", "0",
               *cache_flag])
    out = capsys.readouterr().out
    assert rc == 0
    assert out == expected


def test_sample_compile_flag_reaches_generation(trained, capsys, monkeypatch):
    """`--compile` is passed to generate (whose compiled path tests/test_sample.py checks against the uncached one)."""
    import lmlab.sample

    seen = []
    real = lmlab.sample.generate

    def spy(*args, **kwargs):
        seen.append(kwargs.get("compile"))
        return real(*args, **{**kwargs, "compile": False})

    monkeypatch.setattr(lmlab.sample, "generate", spy)
    for flag, expected in (([], False), (["--compile"], True)):
        rc = main(["sample", str(trained.run), "--prompt", PROMPT, "--max-new-tokens", "3", *flag])
        assert rc == 0 and seen[-1] is expected
    capsys.readouterr()


# ---------------------------------------------------------------------------------------------------------------
# eval


def test_eval_json_matches_the_last_validation_loss(trained):
    # training evaluates in non-overlapping windows (its val_stride); eval with that stride gives the same numbers
    proc = run_cli(["eval", "RUN", "--json", "--stride", "16"], cwd=trained.workdir, cache=trained.cache)
    _ok(proc)
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    assert len(lines) == 1
    result = json.loads(lines[0])
    assert set(result) == {"loss", "bits_per_byte", "perplexity", "accuracy", "tokens", "stride"}
    last = [r for r in read_jsonl(trained.run / "metrics.jsonl") if "val_loss" in r][-1]
    assert last["step"] == 20 and last["val_stride"] == result["stride"] == 16
    assert result["loss"] == pytest.approx(last["val_loss"], abs=1e-6)
    assert result["bits_per_byte"] == pytest.approx(last["val_bits_per_byte"], abs=1e-6)
    assert result["accuracy"] == pytest.approx(last["val_accuracy"], abs=1e-9)
    assert result["perplexity"] == pytest.approx(math.exp(result["loss"]), rel=1e-9)
    # the validation split is the last 10% of the characters; every token after its first is predicted once
    n_val = int(len(trained.text) * 0.1)
    assert result["tokens"] == last["val_tokens"] == n_val - 1
    # char tokens of this ASCII text are one byte each: bits/byte is bits/token
    assert result["bits_per_byte"] == pytest.approx(result["loss"] / math.log(2), rel=1e-9)


@pytest.mark.parametrize("cwd_has", ["nothing", "another-corpus.txt"])
def test_eval_of_a_run_does_not_depend_on_the_working_directory(trained, tmp_path, monkeypatch, capsys, cwd_has):
    """The run was trained with `--data corpus.txt` (relative). `lmlab eval RUN` from another folder must still
    evaluate that run's own validation split: not fail, and above all not silently read another corpus.txt."""
    if cwd_has != "nothing":
        other = make_text(200, seed=99).replace("the", "a")  # same alphabet, different text
        assert set(other) <= set(trained.text) and other != trained.text
        (tmp_path / "corpus.txt").write_text(other, encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LMLAB_CACHE", str(trained.cache))  # the user who trained it: it reads the corpus it names
    rc = main(["eval", str(trained.run), "--json", "--stride", "16"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    result = json.loads(captured.out)
    last = [r for r in read_jsonl(trained.run / "metrics.jsonl") if "val_loss" in r][-1]
    assert result["loss"] == pytest.approx(last["val_loss"], abs=1e-6)
    assert result["tokens"] == last["val_tokens"]


def test_eval_on_other_text_in_process(trained, tmp_path, capsys):
    text = make_text(30, seed=5)
    assert set(text) <= set(trained.text)
    f = tmp_path / "other.txt"
    f.write_text(text, encoding="utf-8")
    assert main(["eval", str(trained.run), "--data", str(f), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["tokens"] == len(text) - 1
    assert 0 < result["loss"] < 2 * math.log(len(set(trained.text)))
    # the human-readable form names the same numbers
    assert main(["eval", str(trained.run), "--data", str(f)]) == 0
    out = capsys.readouterr().out
    assert f"{result['loss']:.4f}" in out and f"{result['tokens']:,}" in out


# ---------------------------------------------------------------------------------------------------------------
# help, data


def test_top_level_help_via_the_console_script(trained):
    script = Path(sys.executable).parent / "lmlab"
    cmd = [str(script), "--help"] if script.exists() else lmlab_cmd("--help")
    import subprocess

    from helpers import cli_env

    proc = subprocess.run(cmd, capture_output=True, text=True, env=cli_env(trained.cache), timeout=HANG_S)
    _ok(proc)
    for command in ("train", "sample", "eval", "data"):
        assert command in proc.stdout


def test_train_help_subprocess(trained):
    proc = run_cli(["train", "--help"], cwd=trained.workdir, cache=trained.cache)
    _ok(proc)
    for option in ("--n-layer", "--max-time", "--tokenizer", "--max-steps", "--preset", "--resume", "--data"):
        assert option in proc.stdout, option
    assert not (trained.workdir / "runs").exists()  # --help trains nothing


@pytest.mark.parametrize("command,options", [
    ([], ["train", "sample", "eval", "data"]),
    (["train"], ["--n-layer", "--n-head", "--n-embd", "--block-size", "--max-time", "--tokenizer", "--vocab-size"]),
    (["sample"], ["--prompt", "--max-new-tokens", "--temperature", "--top-k", "--top-p"]),
    (["eval"], ["--data", "--json"]),
    (["data"], ["list", "prepare", "--tokenizer"]),
])
def test_help_in_process(capsys, command, options):
    assert main([*command, "--help"]) == 0
    out = capsys.readouterr().out
    for option in options:
        assert option in out, option


def test_data_list(tmp_path, isolated_cache):
    proc = run_cli(["data", "list"], cwd=tmp_path)
    _ok(proc)
    assert "builtin" in proc.stdout and "tinyshakespeare" in proc.stdout
    assert "synthetic:chat" in proc.stdout and "synthetic:induction" in proc.stdout
    assert str(isolated_cache) in proc.stdout
    assert not (Path(isolated_cache) / "corpora" / "tinyshakespeare.txt").exists()  # listing downloads nothing


def test_data_prepare_in_process(tmp_path, capsys, isolated_cache):
    text = make_text(50, seed=8, extra="über 中 🙂\n")
    f = tmp_path / "c.txt"
    f.write_text(text, encoding="utf-8")
    assert main(["data", "prepare", str(f), "--tokenizer", "byte"]) == 0
    out = capsys.readouterr().out
    n_bytes = len(text.encode("utf-8"))
    assert f"{n_bytes:,} tokens" in out  # byte tokens: one per byte
    assert str(isolated_cache) in out


# ---------------------------------------------------------------------------------------------------------------
# resume and refusing to overwrite a run


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.slow  # several seconds: trains, or starts processes
def test_training_twice_into_the_same_out_is_refused(trained, tmp_path):
    shutil.copy(trained.corpus, tmp_path / "corpus.txt")
    shutil.copytree(trained.run, tmp_path / "RUN")
    before = _snapshot(tmp_path / "RUN")
    proc = run_cli(["train", "--data", "corpus.txt", "--out", "RUN", *TINY_ARGS], cwd=tmp_path, cache=trained.cache)
    _assert_one_line_error(proc.returncode, proc.stderr)
    assert "--resume" in proc.stderr
    assert _snapshot(tmp_path / "RUN") == before


def test_cli_resume_continues_the_run(trained, tmp_path, monkeypatch, capsys):
    shutil.copy(trained.corpus, tmp_path / "corpus.txt")
    shutil.copytree(trained.run, tmp_path / "RUN")
    monkeypatch.chdir(tmp_path)
    # a copy is not the run made here: its data is named again
    assert main(["train", "--resume", "RUN", "--max-steps", "25", "--sample-tokens", "0", "--data", "corpus.txt"]) == 0
    records = read_jsonl(tmp_path / "RUN" / "metrics.jsonl")
    assert [r["step"] for r in records if "train_loss" in r] == list(range(1, 26))
    assert [r["step"] for r in records if "val_loss" in r] == [0, 10, 20, 25]
    original = read_jsonl(trained.run / "metrics.jsonl")
    assert records[: len(original)] == original  # the first 20 steps are untouched
    assert (tmp_path / "RUN" / "checkpoints" / "step_00000025" / "model.safetensors").is_file()
    config = json.loads((tmp_path / "RUN" / "config.json").read_text())
    assert config["model"]["n_embd"] == 16 and config["max_steps"] == 25


# ---------------------------------------------------------------------------------------------------------------
# bad input


def _assert_one_line_error(rc: int, stderr: str, expect: str | None = None) -> None:
    """One line besides what lmlab said it reads ("reading corpus PATH")."""
    lines = [ln for ln in stderr.splitlines() if ln.strip() and not ln.startswith("reading corpus ")]
    assert rc == 2, f"exit code {rc}, stderr:\n{stderr}"
    assert "Traceback" not in stderr
    assert len(lines) == 1, f"expected one line on stderr, got:\n{stderr}"
    assert "error" in lines[0]
    assert "internal error" not in lines[0], lines[0]
    if expect is not None:
        assert expect in lines[0], lines[0]


@pytest.fixture(scope="module")
def bad_inputs(trained, tmp_path_factory):
    """Files for the bad-input cases; returns (folder, {case: (argv, expected text in the message)})."""
    d = tmp_path_factory.mktemp("bad")
    (d / "empty.txt").write_bytes(b"")
    (d / "short.txt").write_text("the cat sees a dog.\nok.\n")  # 24 characters: less than one 32-token block
    (d / "binary.txt").write_bytes(b"some text\n" * 5 + b"\x00\x01\x02\x03" + bytes(range(256)))
    (d / "latin1.txt").write_bytes(("caf\xe9 cr\xe8me br\xfbl\xe9e\n" * 50).encode("latin-1"))
    (d / "nodocs").mkdir()
    (d / "nodocs" / "blob.bin").write_bytes(b"\x00" * 64)
    nockpt = d / "nockpt"
    nockpt.mkdir()
    for name in ("config.json", "tokenizer.json"):
        shutil.copy(trained.run / name, nockpt / name)
    good = str(trained.corpus)
    run = str(trained.run)

    def train(*extra, data=good):
        return ["train", "--data", data, *TINY_ARGS, *extra]

    cases = {
        "missing-file": (train(data=str(d / "missing.txt")), "missing.txt"),
        "empty-corpus": (train(data=str(d / "empty.txt")), "empty"),
        "shorter-than-a-block": (train("--block-size", "32", data=str(d / "short.txt")), "block"),
        "binary-file": (train(data=str(d / "binary.txt")), "binary"),
        "latin1-file": (train(data=str(d / "latin1.txt")), "UTF-8"),
        "dir-without-text": (train(data=str(d / "nodocs")), "no text files"),
        "unknown-preset": (train("--preset", "gigantic"), "gigantic"),
        "unknown-option": (train("--frobnicate", "3"), "--frobnicate"),
        "bad-int-value": (train("--n-layer", "two"), "two"),
        "n-embd-not-divisible": (train("--n-embd", "18", "--n-head", "4"), "18"),
        "resume-nonexistent": (["train", "--resume", str(d / "no-such-run")], "no-such-run"),
        "device-cuda": (train("--device", "cuda"), "cuda"),
        "negative-max-steps": (train("--max-steps", "-1"), "max-steps"),
        "no-budget": (train("--max-steps", "0", "--max-time", "0"), "budget"),
        "sample-without-checkpoint": (["sample", str(nockpt), "--prompt", "the"], "checkpoint"),
        "sample-nonexistent-run": (["sample", str(d / "no-such-run")], "no-such-run"),
        "sample-negative-temperature": (["sample", run, "--temperature", "-1"], "temperature"),
        "sample-unknown-character": (["sample", run, "--prompt", "Ωmega"], "U+03A9"),
        "eval-non-utf8-data": (["eval", run, "--data", str(d / "latin1.txt")], "UTF-8"),
        "eval-without-checkpoint": (["eval", str(nockpt)], "checkpoint"),
        "unknown-command": (["frobnicate"], "frobnicate"),
    }
    return d, cases


CASES = [
    "missing-file", "empty-corpus", "shorter-than-a-block", "binary-file", "latin1-file", "dir-without-text",
    "unknown-preset", "unknown-option", "bad-int-value", "n-embd-not-divisible", "resume-nonexistent",
    "device-cuda", "negative-max-steps", "no-budget", "sample-without-checkpoint", "sample-nonexistent-run",
    "sample-negative-temperature", "sample-unknown-character", "eval-non-utf8-data", "eval-without-checkpoint",
    "unknown-command",
]


# Each process start costs about two seconds (importing torch), so the real-process check covers one case of each
# kind (data, options, run folders, streaming UTF-8); the in-process check covers them all.
SUBPROCESS_CASES = ["missing-file", "latin1-file", "unknown-option", "sample-without-checkpoint"]


def _skip_if_cuda(case: str) -> None:
    if case == "device-cuda" and torch.cuda.is_available():
        pytest.skip("CUDA is available here, so --device cuda is not an error")


@pytest.fixture(scope="module")
def bad_results(bad_inputs, tmp_path_factory):
    """Every bad-input case as a real `python -m lmlab` process, a few at a time (startup dominates)."""
    folder, cases = bad_inputs
    cache = tmp_path_factory.mktemp("bad-cache")

    def one(item):
        name, (argv, _) = item
        out = folder / f"out-subprocess-{name}"
        argv = argv + ["--out", str(out)] if argv[0] == "train" and "--resume" not in argv else argv
        return name, run_cli(argv, cwd=folder, cache=cache)

    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(pool.map(one, [(name, cases[name]) for name in SUBPROCESS_CASES]))


@pytest.mark.slow
@pytest.mark.parametrize("case", SUBPROCESS_CASES)
def test_bad_input_subprocess(bad_inputs, bad_results, case):
    _skip_if_cuda(case)
    proc = bad_results[case]
    _assert_one_line_error(proc.returncode, proc.stderr, bad_inputs[1][case][1])


@pytest.mark.parametrize("case", CASES)
def test_bad_input_in_process(bad_inputs, case, capsys):
    _skip_if_cuda(case)
    folder, cases = bad_inputs
    argv, expect = cases[case]
    if argv[0] == "train" and "--resume" not in argv:
        argv = argv + ["--out", str(folder / f"out-inprocess-{case}")]
    rc = main(argv)
    captured = capsys.readouterr()
    _assert_one_line_error(rc, captured.err, expect)


def test_failed_training_leaves_no_config_behind(bad_inputs, capsys):
    """A run that fails on its input writes no config.json, so fixing the input and training again just works."""
    folder, cases = bad_inputs
    out = folder / "retry"
    assert main(["train", "--data", str(folder / "latin1.txt"), *TINY_ARGS, "--out", str(out)]) == 2
    capsys.readouterr()
    assert not (out / "config.json").exists()


# ---------------------------------------------------------------------------------------------------------------
# the recipe follows the time budget


def test_short_budgets_get_the_short_budget_recipe():
    import dataclasses

    from lmlab.budget import SHORT_BUDGET, SHORT_BUDGET_S, TINY_RECIPE, apply_budget
    from lmlab.config import get_preset

    def settings(cfg):
        return (cfg.batch_size, cfg.model.block_size, cfg.model.n_layer, cfg.model.n_embd, cfg.optim.lr,
                cfg.optim.muon_momentum)

    def tiny(max_time: float, **own):
        cfg = dataclasses.replace(get_preset("tiny"), max_time=max_time)
        for name, value in own.items():  # a value that is not None is the caller's own
            setattr(cfg.model if hasattr(cfg.model, name) else cfg.optim, name, value)
        return cfg

    cfg, note = apply_budget(tiny(240.0))
    assert settings(cfg) == (32, 128, 4, 128, 1e-2, 0.95) and "short-budget" not in note
    assert cfg.model.n_head == TINY_RECIPE["n_head"]
    cfg, note = apply_budget(tiny(20.0))
    assert settings(cfg) == (32, 64, 2, 96, 2e-2, 0.9) and settings(cfg)[1:] == tuple(SHORT_BUDGET.values())
    assert "--block-size 64 --n-layer 2 --n-embd 96 --lr 0.02 --muon-momentum 0.9" in note
    # a setting the caller gave stays theirs; the others still follow the budget
    cfg, note = apply_budget(tiny(20.0, block_size=128, lr=1e-2, n_layer=4))
    assert settings(cfg) == (32, 128, 4, 96, 1e-2, 0.9)
    assert "--block-size" not in note and "--lr " not in note and "--n-layer" not in note
    cfg, note = apply_budget(tiny(20.0, n_head=4))
    assert (cfg.model.n_layer, cfg.model.n_embd) == (2, 128) and "--n-embd" not in note
    cfg, note = apply_budget(tiny(20.0, **{k: TINY_RECIPE[k] for k in SHORT_BUDGET}))
    assert settings(cfg) == (32, 128, 4, 128, 1e-2, 0.95) and note == ""
    for budget in (SHORT_BUDGET_S + 1, 0.0):
        assert settings(apply_budget(tiny(budget))[0]) == (32, 128, 4, 128, 1e-2, 0.95)
    small = dataclasses.replace(get_preset("small"), max_time=20.0, compile=False)
    assert apply_budget(small) == (small, "")


def test_long_budgets_get_the_larger_model():
    """From LONG_BUDGET_S of a pure time budget the tiny recipe is 6 layers, 192 wide, with more weight decay; a step
    limit, a size, head count or weight decay the caller gave, or another preset or stage keeps the recipe's own."""
    import dataclasses

    from lmlab.budget import LONG_BUDGET, LONG_BUDGET_S, TINY_RECIPE, apply_budget
    from lmlab.common import LmlabError
    from lmlab.config import get_preset
    from lmlab.optim import build_optimizer

    def sizes(max_time: float, preset: str = "tiny", **changes):
        cfg = dataclasses.replace(get_preset(preset), max_time=max_time, compile=False)
        for name, value in changes.items():
            part = next((p for p in (cfg.model, cfg.optim) if hasattr(p, name)), cfg)
            setattr(part, name, value)
        cfg, note = apply_budget(cfg)
        m = cfg.model
        return (m.block_size, m.n_layer, m.n_head, m.n_embd, cfg.optim.lr, cfg.optim.weight_decay), note

    recipe = tuple(TINY_RECIPE[k] for k in ("block_size", "n_layer", "n_head", "n_embd", "lr", "weight_decay"))
    assert recipe[-1] == 0.1
    assert sizes(LONG_BUDGET_S - 1) == (recipe, "")
    got, note = sizes(LONG_BUDGET_S)
    wd = LONG_BUDGET["weight_decay"]
    assert got == (128, LONG_BUDGET["n_layer"], 4, LONG_BUDGET["n_embd"], 1e-2, wd) and got[1:4] == (6, 4, 192)
    assert wd > recipe[-1]
    assert f"long-budget settings, --n-layer 6 --n-embd 192 --weight-decay {wd:g}" in note
    assert sizes(900.0, max_steps=100) == (recipe, "")
    assert sizes(900.0, n_layer=4)[0] == (128, 4, 4, 192, 1e-2, wd)
    assert sizes(900.0, n_head=8)[0] == (128, 6, 8, 128, 1e-2, wd)  # the head count is chosen to divide the width
    assert sizes(900.0, weight_decay=0.05)[0] == (128, 6, 4, 192, 1e-2, 0.05)
    with pytest.raises(LmlabError, match="optimizer's lr, muon_momentum, weight_decay are left to the budget rules"):
        build_optimizer(torch.nn.Linear(2, 2), get_preset("tiny").optim)  # the rules have not run
    assert sizes(900.0, stage="sft")[0][1:4] == (None, None, None)  # the base's sizes (--init-from)
    assert sizes(900.0, stage="sft")[0][-1] == recipe[-1]
    assert sizes(900.0, "small")[0][1:4] == (get_preset("small").model.n_layer, get_preset("small").model.n_head,
                                             get_preset("small").model.n_embd)


def test_long_time_budgets_compile_the_tiny_recipe(monkeypatch):
    """--compile None is the budget's: the tiny preset compiles for pure time budgets of COMPILE_BUDGET_S or more
    where a C++ compiler is found; a value the caller gave (`--compile`, `--no-compile`) stays theirs."""
    import dataclasses

    from lmlab import budget as budget_
    from lmlab.cli import _bool_flag
    from lmlab.config import get_preset

    monkeypatch.setattr(budget_, "can_compile", lambda: True)
    tiny, small = get_preset("tiny"), get_preset("small")
    assert tiny.compile is None and small.compile is None

    def compiles(cfg, **changes):
        out, note = budget_.apply_budget(dataclasses.replace(cfg, **changes))
        assert ("compiling the model" in note) == out.compile
        return out.compile

    assert compiles(tiny, max_time=budget_.COMPILE_BUDGET_S) and compiles(tiny, max_time=300.0)
    assert not compiles(tiny, max_time=budget_.COMPILE_BUDGET_S - 1)
    assert not compiles(tiny, max_time=300.0, max_steps=100)  # a step limit: the run may be short
    assert not compiles(tiny, max_time=0.0, max_steps=100000)
    assert not compiles(small, max_time=300.0)
    assert budget_.apply_budget(dataclasses.replace(tiny, max_time=300.0, compile=False))[0].compile is False
    assert budget_.apply_budget(dataclasses.replace(tiny, max_time=20.0, compile=True))[0].compile is True
    monkeypatch.setattr(budget_, "can_compile", lambda: False)
    assert not compiles(tiny, max_time=300.0)
    # the command line: a bare --compile / --no-compile still works as a flag
    assert _bool_flag(["--compile", "--seed", "1"], "--compile") == ["--compile", "True", "--seed", "1"]
    assert _bool_flag(["--no-compile"], "--compile") == ["--compile", "False"]
    assert _bool_flag(["--compile", "False", "--compile"], "--compile") == ["--compile", "False", "--compile", "True"]
    from lmlab.cli import parse
    from lmlab.config import TrainConfig

    for argv, expected in (([], None), (["--compile"], True), (["--no-compile"], False)):
        assert parse(TrainConfig, _bool_flag(argv, "--compile"), "lmlab train", default=tiny).compile is expected


@pytest.mark.slow
def test_python_and_the_cli_apply_the_same_budget_rules(tmp_path):
    """train(config) from Python and `lmlab train` with the same settings write the same config.json and log the
    same losses: the budget rules run inside train()."""
    write_corpus(tmp_path / "corpus.txt", 200)
    common = dict(max_time=20.0, max_steps=4, eval_interval=2, sample_tokens=0, tensorboard=False, progress=False,
                  trajectory_snapshots=0, threads=1)
    script = (
        "import sys; from lmlab.config import get_preset; from lmlab.data import DataConfig; "
        "from lmlab.train import train\n"
        "cfg = get_preset('tiny'); cfg.data = DataConfig(data='corpus.txt'); cfg.out = 'python'\n"
        f"for k, v in {common!r}.items(): setattr(cfg, k, v)\n"
        "train(cfg)\n")
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=cli_env(tmp_path / "cache"),
                          capture_output=True, text=True, timeout=HANG_S)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "short-budget settings" in proc.stderr
    _ok(run_cli(["train", "--data", "corpus.txt", "--out", "cli", "--max-time", "20", "--max-steps", "4",
                 "--eval-interval", "2", "--sample-tokens", "0", "--no-tensorboard", "--no-progress",
                 "--trajectory-snapshots", "0", "--threads", "1"], cwd=tmp_path, cache=tmp_path / "cache"))
    configs = [json.loads((tmp_path / name / "config.json").read_text()) for name in ("python", "cli")]
    for config in configs:
        config.pop("out")
        config.pop("run_id")  # each run's own
    assert configs[0] == configs[1]
    assert (configs[0]["model"]["n_layer"], configs[0]["model"]["block_size"]) == (2, 64)  # the short budget's
    losses = [[r.get("train_loss", r.get("val_loss")) for r in read_jsonl(tmp_path / name / "metrics.jsonl")]
              for name in ("python", "cli")]
    assert losses[0] == losses[1] and len(losses[0]) == 4 + 3


@pytest.mark.slow
def test_train_with_a_short_budget_records_the_recipe_it_used(tmp_path):
    write_corpus(tmp_path / "corpus.txt", 200)
    small = ["--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--sample-tokens", "0", "--eval-interval", "5"]
    proc = run_cli(["train", "--data", "corpus.txt", "--out", "short", "--max-time", "2", "--max-steps", "3", *small],
                   cwd=tmp_path, cache=tmp_path / "cache")
    _ok(proc)
    assert "short-budget settings" in proc.stderr
    config = json.loads((tmp_path / "short" / "config.json").read_text())
    assert (config["batch_size"], config["model"]["block_size"]) == (32, 64)
    assert (config["optim"]["lr"], config["optim"]["muon_momentum"]) == (2e-2, 0.9)
    assert (config["model"]["n_layer"], config["model"]["n_embd"]) == (1, 16)  # given: kept
    proc = run_cli(["train", "--data", "corpus.txt", "--out", "given", "--max-time", "2", "--max-steps", "3",
                    "--block-size", "32", *small], cwd=tmp_path, cache=tmp_path / "cache")
    _ok(proc)
    config = json.loads((tmp_path / "given" / "config.json").read_text())
    assert config["model"]["block_size"] == 32 and config["optim"]["lr"] == 2e-2 and "--block-size" not in proc.stderr


def test_the_tiny_recipe_picks_its_dropout_from_the_passes_over_the_corpus():
    """No dropout up to DROPOUT_FREE_PASSES passes over the training text, then DROPOUT_PER_DOUBLING more for every
    doubling of the passes, up to DROPOUT_MAX; a --dropout of the caller's own is kept."""
    import dataclasses

    from lmlab import budget as budget_
    from lmlab.config import get_preset

    free, per, top = budget_.DROPOUT_FREE_PASSES, budget_.DROPOUT_PER_DOUBLING, budget_.DROPOUT_MAX
    assert [budget_.corpus_dropout(p) for p in (0.5, free, 2 * free, 4 * free)] == [0.0, 0.0, per, 2 * per]
    assert budget_.corpus_dropout(1e6) == top
    tiny = budget_.apply_budget(get_preset("tiny"))[0]
    cfg, note = budget_.fit_to_corpus(tiny, 1000, 4 * free * 1000)
    assert cfg.model.dropout == 2 * per and cfg.model.attn_dropout == 0.0 and tiny.model.dropout is None
    assert f"about {4 * free:.1f} passes" in note and f"dropout {2 * per:g}" in note
    own = dataclasses.replace(tiny, model=dataclasses.replace(tiny.model, dropout=0.05))
    assert budget_.fit_to_corpus(own, 1000, 1e9) == (own, "")


def test_a_time_budget_estimates_its_steps_without_touching_the_random_streams():
    import torch

    from lmlab.budget import apply_budget
    from lmlab.config import get_preset
    from lmlab.distributed import Dist
    from lmlab.train import budget_steps

    cfg = apply_budget(get_preset("tiny"))[0]
    cfg.model.block_size, cfg.batch_size, cfg.compile = 16, 2, False
    assert budget_steps(dataclasses_replace(cfg, max_time=0.0, max_steps=77), 50, torch.device("cpu"),
                        torch.float32, Dist()) == 77
    torch.manual_seed(3)
    before = torch.get_rng_state()
    steps = budget_steps(dataclasses_replace(cfg, max_time=10.0, max_steps=0), 50, torch.device("cpu"),
                         torch.float32, Dist())
    assert torch.equal(torch.get_rng_state(), before)
    assert 0 < steps < float("inf")
    capped = budget_steps(dataclasses_replace(cfg, max_time=1e6, max_steps=5), 50, torch.device("cpu"),
                          torch.float32, Dist())
    assert capped == 5


def test_a_slow_step_at_the_start_does_not_fool_the_estimate(monkeypatch):
    """Steps made slow by something else starting at the same time (here: a fake clock that adds 3 s to three of the five
    timed steps) leave the estimate at the quiet steps' pace: the fastest timed step counts."""
    import types

    import torch

    import lmlab.train as train_
    from lmlab.budget import apply_budget
    from lmlab.config import get_preset
    from lmlab.distributed import Dist

    clock = {"t": 0.0, "calls": 0}
    monkeypatch.setattr(train_, "time", types.SimpleNamespace(perf_counter=lambda: clock["t"]))

    def fake_step(*args, **kwargs):
        clock["calls"] += 1
        clock["t"] += 3.0 if clock["calls"] in (3, 4, 6) else 0.25  # three of the five timed steps slowed

    monkeypatch.setattr(train_, "train_step", fake_step)
    cfg = apply_budget(get_preset("tiny"))[0]
    cfg.model.block_size, cfg.batch_size, cfg.compile = 16, 2, False
    steps = train_.budget_steps(dataclasses_replace(cfg, max_time=100.0, max_steps=0), 50, torch.device("cpu"),
                                torch.float32, Dist())
    assert clock["calls"] == train_.BUDGET_WARMUP + train_.BUDGET_TIMED
    assert steps == pytest.approx(100.0 / 0.25)


def dataclasses_replace(cfg, **changes):
    import dataclasses

    return dataclasses.replace(cfg, **changes)


@pytest.mark.slow
def test_train_says_and_records_the_dropout_it_chose(tmp_path):
    write_corpus(tmp_path / "corpus.txt", 30, seed=3)
    proc = run_cli(["train", "--data", "corpus.txt", "--out", "run", "--max-steps", "100", "--max-time", "0",
                    "--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--block-size", "16", "--batch-size", "8",
                    "--sample-tokens", "0", "--eval-interval", "100"], cwd=tmp_path, cache=tmp_path / "cache")
    assert proc.returncode == 0, proc.stderr
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    passes = 100 * 8 * 16 / config_train_tokens(tmp_path / "run")
    from lmlab.budget import corpus_dropout

    assert config["model"]["dropout"] == corpus_dropout(passes) > 0
    assert f"passes over it: dropout {config['model']['dropout']:g}" in proc.stderr


def config_train_tokens(run) -> int:
    """The training split's size, from the passes the run logged at its last evaluation."""
    last = [r for r in read_jsonl(run / "metrics.jsonl") if "val_loss" in r][-1]
    return round(last["tokens"] / last["passes"])
