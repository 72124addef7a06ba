"""A shared run never reads the user's files, never allocates what it names without bound, and damaged entries in it
never crash a command (issue 26): one test or more per finding, each of which failed before the fix.

1. A corpus path in a run's config.json is read only for a run made here, in this folder (or with --data again, or
   --trust-data-path); every read says its path.
2. Sizes from a run's config.json or an HF config.json are checked against memory before anything is allocated,
   and an HF config against its safetensors headers before a tensor is read.
3. Damaged entries (checkpoints/step_², a Unicode seed, an HF model_type list, an infinite rope_theta) are skipped
   or refused with one line, and the server never answers 500 for them.
4. lmlab report deletes or overwrites only the charts it wrote.
5. Every option given with --resume is applied or refused with one line naming it; config.json records what is used.
6. Run text is never parsed as markup, an inside page draws a bounded grid, a hard-linked log is never appended to,
   an export never follows a dangling link, and a new run never overwrites a user's tokenizer.json.

Oracles: the bytes of a private file (never found in the run or the cache), exit codes and the one-line error
contract, peak RSS of a child process whose address space is capped (so that a regression fails instead of
exhausting the machine), and files outside lmlab's that must not change."""

from __future__ import annotations

import json
import os
import re
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import HANG_S, cli_env, http, tiny_config, write_corpus
from lmlab.cli import main

CHILD_LIMIT = 4 << 30  # the address space of the child processes below (torch needs about 1.5 GiB of it)
PROMPT = "let $\\foo{x}$ be"  # mathtext that matplotlib cannot parse
# A private file that the run's char vocabulary covers (so that, read, it would be trained on), and that nothing
# else the run holds looks like: any 12 bytes of it found in a file are a leak.
SECRET = b"}{$x}{$x\\}{x$\n"


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A small run trained here (its cache is `cache`), with a probe prompt that looks like TeX."""
    from lmlab.train import train

    root = tmp_path_factory.mktemp("untrusted2")
    corpus = write_corpus(root / "corpus.txt", 150, extra=PROMPT + "\n")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LMLAB_CACHE", str(root / "cache"))
        train(tiny_config(corpus, root / "run", max_steps=8, eval_interval=4, checkpoint_interval=4,
                          sample_tokens=8, trajectory_snapshots=2, tensorboard=False, probe_prompts=(PROMPT,)))
    return root


@pytest.fixture
def copied(made, tmp_path, monkeypatch):
    """A copy of the run (so, not made here) in the user's cache, and the corpus it was trained on."""
    monkeypatch.setenv("LMLAB_CACHE", str(made / "cache"))
    shutil.copytree(made / "run", tmp_path / "run")
    return tmp_path / "run", made / "corpus.txt"


def _cli(capsys, *argv) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def _one_error(rc: int, err: str, *words: str) -> str:
    """Exit 2 and exactly one error line naming each of `words`; no traceback."""
    assert "Traceback" not in err and "internal error" not in err, err
    errors = [ln for ln in err.splitlines() if ": error: " in ln]
    assert rc == 2 and len(errors) == 1, f"exit {rc}:\n{err}"
    for word in words:
        assert word in errors[0], f"{word!r} not in {errors[0]}"
    return errors[0]


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _edit_config(run: Path, edit) -> None:
    config = json.loads((run / "config.json").read_text())
    edit(config)
    (run / "config.json").write_text(json.dumps(config))


def _limit_memory():
    resource.setrlimit(resource.RLIMIT_AS, (CHILD_LIMIT, CHILD_LIMIT))


CHILD = ("import resource, sys\nfrom lmlab.cli import main\nrc = main(sys.argv[1:])\n"
         "print('peak rss kb', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)\nsys.exit(rc)\n")


def run_capped(*argv, cwd: Path, env: dict | None = None) -> tuple[int, str, float]:
    """`lmlab ARGV` in a child process whose address space is capped at CHILD_LIMIT: (exit code, stderr without the
    last line, the child's peak RSS in MiB, measured by itself with resource)."""
    proc = subprocess.run([sys.executable, "-c", CHILD, *map(str, argv)], cwd=cwd, env=env or cli_env(),
                          capture_output=True, text=True, timeout=HANG_S, preexec_fn=_limit_memory)
    lines = proc.stderr.splitlines()
    peak = [ln for ln in lines if ln.startswith("peak rss kb ")]
    assert peak, f"the child did not finish (exit {proc.returncode}):\n{proc.stderr[-3000:]}"
    return proc.returncode, "\n".join(ln for ln in lines if ln not in peak), int(peak[-1].split()[-1]) / 1024


# ---------------------------------------------------------------------------------------------------------------
# 1. Corpus paths from a run's config


def _plant_secret(run: Path, tmp_path: Path, monkeypatch, how: str) -> None:
    """Point the run's config at a private file outside it (SECRET, repeated)."""
    home = tmp_path / "home"
    (home / ".aws").mkdir(parents=True)
    secret = home / ".aws" / "credentials"
    secret.write_bytes(SECRET * 400)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(run)
    where = {"absolute": ("data", str(secret)), "home": ("data", "~/.aws/credentials"),
             "dotdot": ("data", "../home/.aws/credentials"), "val_data": ("val_data", str(secret))}[how]

    def edit(config):
        if how == "val_data":
            config["data"]["data"] = "builtin"  # not a path: only the validation data is refused
        config["data"][where[0]] = where[1]
    _edit_config(run, edit)


@pytest.mark.parametrize("how", ["absolute", "home", "dotdot", "val_data"])
def test_a_shared_run_never_reads_a_path_its_config_names(copied, tmp_path, monkeypatch, capsys, how):
    """config.json names a private file (absolute, ~, .., or as the validation data): resume, eval and landscape
    read nothing from it, write nothing, and say how to name the data; its bytes are nowhere in the run or the
    cache."""
    run, _ = copied
    _plant_secret(run, tmp_path, monkeypatch, how)
    before = _files(run)
    for argv in (["train", "--resume", run, "--max-steps", "10", "--no-progress"], ["eval", run, "--json"],
                 ["landscape", run, "--points", "3", "--batch-size", "1"]):
        line = _one_error(*_cli(capsys, *argv)[::2], "-data PATH", "--trust-data-path", "credentials")
        assert "made here" in line
        assert _files(run) == before, f"`lmlab {argv[0]}` wrote into the run"
    pieces = {(SECRET * 2)[i:i + 12] for i in range(len(SECRET))}
    for folder in (run, Path(os.environ["LMLAB_CACHE"])):
        for path, data in _files(folder).items():
            assert not any(piece in data for piece in pieces), f"{folder / path} holds the private file's bytes"


@pytest.mark.slow
def test_the_run_made_here_reads_its_corpus_and_says_so(tmp_path, capsys):
    """A run trained here, in this folder, resumes, evaluates and scans its landscape without --data, each saying
    the path it reads; a named corpus is not a path and needs nothing either."""
    corpus = write_corpus(tmp_path / "texts" / "corpus.txt", 150)
    tiny = ["--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--block-size", "16", "--batch-size", "4",
            "--max-time", "0", "--eval-interval", "4", "--sample-tokens", "0", "--no-progress"]
    rc, _, err = _cli(capsys, "train", "--data", corpus, "--out", tmp_path / "run", "--max-steps", "4", *tiny)
    assert rc == 0 and f"reading corpus {corpus}" in err, err
    for argv in (["train", "--resume", tmp_path / "run", "--max-steps", "6", "--no-progress"],
                 ["eval", tmp_path / "run", "--json"], ["landscape", tmp_path / "run", "--points", "3"]):
        rc, _, err = _cli(capsys, *argv)
        assert rc == 0 and f"reading corpus {corpus}" in err, (argv, err)
    rc, _, err = _cli(capsys, "train", "--data", "synthetic:markov", "--out", tmp_path / "synthetic", "--max-steps",
                      "4", *tiny)
    assert rc == 0, err
    shutil.copytree(tmp_path / "synthetic", tmp_path / "synthetic-copy")
    rc, _, err = _cli(capsys, "train", "--resume", tmp_path / "synthetic-copy", "--max-steps", "6", "--no-progress")
    assert rc == 0 and "reading corpus synthetic:markov" in err, err


def test_a_copied_or_moved_run_reads_its_corpus_once_named_again(copied, tmp_path, capsys):
    """A copy (or a moved folder) of a run made here is not made here: it resumes with --data (the same path or
    another) or --trust-data-path, and from then on, in its new folder, without; an export made here is made
    here."""
    run, corpus = copied
    refused = ["train", "--resume", run, "--max-steps", "10", "--no-progress"]
    _one_error(*_cli(capsys, *refused)[::2], "--data")
    rc, _, err = _cli(capsys, *refused, "--data", corpus)
    assert rc == 0 and f"reading corpus {corpus}" in err, err
    rc, _, err = _cli(capsys, "train", "--resume", run, "--max-steps", "11", "--no-progress")
    assert rc == 0, err
    moved = tmp_path / "moved"
    run.rename(moved)
    _one_error(*_cli(capsys, "eval", moved)[::2], "--data")
    rc, _, err = _cli(capsys, "eval", moved, "--trust-data-path")
    assert rc == 0 and f"reading corpus {corpus}" in err, err
    rc, _, err = _cli(capsys, "export", moved, tmp_path / "export")
    assert rc == 0, err
    _one_error(*_cli(capsys, "eval", tmp_path / "export")[::2], "--data")  # exported from a run not made here
    made_here = tmp_path / "again"
    rc, _, err = _cli(capsys, "train", "--resume", moved, "--max-steps", "12", "--no-progress", "--data", corpus)
    assert rc == 0, err
    rc, _, err = _cli(capsys, "export", moved, made_here)
    assert rc == 0, err
    rc, _, err = _cli(capsys, "eval", made_here)
    assert rc == 0, err


# ---------------------------------------------------------------------------------------------------------------
# 2. Sizes


SIZES = {"n_layer 10**400": {"n_layer": 10**400}, "n_layer 10**6": {"n_layer": 10**6},
         "n_embd 2**20": {"n_embd": 2**20, "n_head": 2**10}, "200 layers 2048 wide": {"n_layer": 200, "n_embd": 2048}}


def _oversize(run: Path, sizes: dict) -> None:
    _edit_config(run, lambda config: config["model"].update(sizes))


@pytest.mark.slow
@pytest.mark.parametrize("what", SIZES)
def test_a_run_too_big_for_memory_is_refused_before_anything_is_allocated(copied, what):
    """Sample, eval and resume of a run whose config names sizes that cannot fit: exit 2 with one line that states
    the limit and how to raise it, in a child whose peak RSS stays under 1 GB."""
    run, corpus = copied
    _oversize(run, SIZES[what])
    for argv in (["sample", run, "--max-new-tokens", "4"], ["eval", run, "--data", corpus],
                 ["train", "--resume", run, "--data", corpus, "--max-steps", "20", "--no-progress"]):
        t = time.perf_counter()
        rc, err, peak = run_capped(*argv, cwd=run.parent)
        line = _one_error(rc, err)
        assert peak < 1024, f"{argv[0]}: peak RSS {peak:.0f} MiB"
        if what != "n_layer 10**400":  # (that one is refused as it is read: no integer is that large)
            assert "this process may use" in line and "LMLAB_MAX_MEMORY" in line, line
        print(f"{what}, {argv[0]}: {time.perf_counter() - t:.1f} s, peak RSS {peak:.0f} MiB")


def test_the_memory_limit_is_the_smallest_known_and_can_be_overridden(monkeypatch):
    from lmlab.common import LmlabError, memory_limit
    from lmlab.model import ModelConfig, check_fits

    limit, source = memory_limit()
    assert 0 < limit and source
    cfg = ModelConfig(n_layer=200, n_embd=2048, n_head=16)
    monkeypatch.setenv("LMLAB_MAX_MEMORY", "1G")
    assert memory_limit() == (1 << 30, "$LMLAB_MAX_MEMORY")
    with pytest.raises(LmlabError, match="LMLAB_MAX_MEMORY"):
        check_fits(cfg, 65, "a run")
    monkeypatch.setenv("LMLAB_MAX_MEMORY", "1T")
    check_fits(cfg, 65, "a run")  # a real model that big goes ahead when the user says it fits
    monkeypatch.setenv("LMLAB_MAX_MEMORY", "lots")
    with pytest.raises(LmlabError, match="not a size"):
        memory_limit()


def test_the_parameter_count_is_that_of_the_model_built():
    """check_fits counts parameters without building the model: the count must be the built model's."""
    import itertools

    from lmlab.model import ModelConfig, build_model, count_params, parameter_count

    for pos, tie, value_embed, unet, mlp, bias, norm in itertools.product(
            ["learned", "rope"], [False, True], [False, True], [False, True], ["swiglu", "relu2"], [False, True],
            ["layernorm", "rmsnorm"]):
        cfg = ModelConfig(pos=pos, tie_embeddings=tie, value_embed=value_embed, unet_skips=unet, mlp=mlp, bias=bias,
                          norm=norm, n_layer=3, n_embd=32, n_head=4, block_size=16)
        model = build_model(cfg, 37)
        assert parameter_count(cfg, 37) == count_params(model) + sum(b.numel() for b in model.buffers()), cfg


@pytest.fixture
def hf_folder(tmp_path):
    """A small LlamaForCausalLM folder, written by lmlab."""
    from lmlab import hf
    from lmlab.model import ModelConfig, build_model
    from lmlab.tokenizer import CharTokenizer

    tokenizer = CharTokenizer(sorted(set("abcdefghijklmnopqrstuvwxyz .,\n")))
    model = build_model(ModelConfig(block_size=16, n_layer=2, n_head=2, n_embd=16, mlp="swiglu", qk_norm=False),
                        tokenizer.vocab_size)
    hf.write_hf(model, tokenizer, tmp_path / "hf")
    write_corpus(tmp_path / "corpus.txt", 100)
    return tmp_path / "hf"


HF_SIZES = {"num_hidden_layers": 10**6, "intermediate_size": 2**40, "hidden_size": 2**30,
            "max_position_embeddings": 2**40, "vocab_size": 2**40, "num_attention_heads": 2**40}


@pytest.mark.slow
@pytest.mark.parametrize("field", HF_SIZES)
def test_an_hf_folder_too_big_for_memory_is_refused_before_anything_is_allocated(hf_folder, field):
    config = json.loads((hf_folder / "config.json").read_text())
    config[field] = HF_SIZES[field]
    if field == "hidden_size":
        config.pop("head_dim")
    (hf_folder / "config.json").write_text(json.dumps(config))
    rc, err, peak = run_capped("train", "--init-from", hf_folder, "--data", hf_folder.parent / "corpus.txt", "--out",
                               hf_folder.parent / "run", "--max-steps", "1", "--max-time", "0", "--no-progress",
                               cwd=hf_folder.parent)
    _one_error(rc, err)
    assert peak < 1024, f"peak RSS {peak:.0f} MiB"


def test_an_hf_config_is_checked_against_the_safetensors_headers_before_a_tensor_is_read(hf_folder, monkeypatch):
    """A config.json that does not match its weights is refused at once, from the headers (a few KB), naming the
    tensor; the weights are never read."""
    from lmlab import hf
    from lmlab.common import LmlabError

    config = json.loads((hf_folder / "config.json").read_text())
    config["intermediate_size"] += 8
    (hf_folder / "config.json").write_text(json.dumps(config))

    def never(*args, **kwargs):
        raise AssertionError("the weights were read before their shapes were checked")
    monkeypatch.setattr(hf, "read_weights", never)
    monkeypatch.setattr("safetensors.torch.load_file", never)
    with pytest.raises(LmlabError, match=r"mlp\.gate_proj\.weight has shape .* its config\.json says"):
        hf.load_hf(str(hf_folder))


def _serve(folder: Path, env: dict):
    """`lmlab serve FOLDER --port 0` in a capped child; returns (process, url)."""
    proc = subprocess.Popen([sys.executable, "-m", "lmlab", "serve", str(folder), "--port", "0"], env=env,
                            stderr=subprocess.PIPE, text=True, preexec_fn=_limit_memory)
    deadline = time.monotonic() + HANG_S
    seen = ""
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        seen += line
        found = re.search(r"at (http://127\.0\.0\.1:\d+)/", line)
        if found:
            return proc, found.group(1)
        if not line and proc.poll() is not None:
            break
    proc.kill()
    raise AssertionError(f"the server did not start:\n{seen}")


@pytest.mark.slow
def test_serve_answers_409_for_a_run_too_big_and_200_for_the_others(copied, tmp_path):
    run, _ = copied
    folder = tmp_path / "runs"
    folder.mkdir()
    run.rename(folder / "good")
    for name, sizes in SIZES.items():
        shutil.copytree(folder / "good", folder / name.replace(" ", "-").replace("*", ""))
        _oversize(folder / name.replace(" ", "-").replace("*", ""), sizes)
    proc, url = _serve(folder, cli_env())
    try:
        status, body = http(url + "/api/runs")
        assert status == 200 and len(body["runs"]) == 1 + len(SIZES), body
        for run_info in body["runs"]:
            request = {"model": run_info["name"], "prompt": "the ", "max_tokens": 4}
            status, answer = http(url + "/v1/completions", request)
            assert status == (200 if run_info["name"] == "good" else 409), (run_info["name"], status, answer)
        assert http(url + "/v1/models")[0] == 200
        assert http(url + "/api/runs")[0] == 200
    finally:
        proc.terminate()
        proc.wait(HANG_S)


# ---------------------------------------------------------------------------------------------------------------
# 3. Damaged entries


@pytest.mark.slow
def test_a_damaged_checkpoint_entry_is_skipped_and_named_once(copied, tmp_path, capsys):
    """checkpoints/step_² (and a trajectory snapshot and a telemetry layer with such digits): every command works on
    the run's good checkpoints, the entry is named in a warning, and the server lists the run."""
    from helpers import ServerThread

    from lmlab.serve.app import create_app
    from lmlab.serve.request import Limits
    from lmlab.serve.runs import RunSet

    run, corpus = copied
    (run / "checkpoints" / "step_²").mkdir()
    (run / "trajectory" / "step_²²²²²²²².safetensors").write_bytes(b"")
    with open(run / "telemetry.jsonl", "a") as f:
        f.write(json.dumps({"step": 1, "grad_norm": {"block.²": 1.0}, "update_ratio": {"block.²": 0.1}}) + "\n")
    out = tmp_path / "out"
    for argv in (["sample", run, "--max-new-tokens", "4"], ["eval", run, "--data", corpus],
                 ["next", run, "the "], ["surprisal", run, "--text", "the cat"],
                 ["landscape", run, "--points", "3", "--2d", "--data", corpus], ["inside", run],
                 ["report", run, "--out", out / "report.html"], ["export", run, out / "export"],
                 ["train", "--resume", run, "--data", corpus, "--max-steps", "10", "--no-progress"]):
        rc, _, err = _cli(capsys, *argv)
        assert rc == 0 and "Traceback" not in err, (argv[0], err)
    with ServerThread(create_app(RunSet([run]), Limits(max_tokens=4))) as url:
        for path in ("/api/runs", "/v1/models"):
            assert http(url + path)[0] == 200, path
        assert http(url + "/v1/completions", {"model": "run", "prompt": "the ", "max_tokens": 2})[0] == 200


def test_the_damaged_entry_is_named_in_one_warning(copied, capsys):
    from lmlab.checkpoint import checkpoint_dirs

    run, _ = copied
    (run / "checkpoints" / "step_²").mkdir()
    (run / "checkpoints" / "step_٣").mkdir()  # int() reads Arabic-Indic digits: not a name lmlab writes either
    said = []
    for _ in range(3):
        assert [p.name for p in checkpoint_dirs(run, said.append)] == ["step_00000004", "step_00000008"]
    assert len(said) == 2 and all("step_" in s and "skipping" in s for s in said), said


def test_a_synthetic_seed_in_other_digits_is_one_error(capsys):
    _one_error(*_cli(capsys, "data", "prepare", "synthetic:markov:²")[::2], "seed")


@pytest.mark.parametrize("field,value", [("model_type", ["apertus"]), ("rope_theta", float("inf")),
                                         ("rope_theta", float("nan")), ("rope_theta", 10**400),
                                         ("rms_norm_eps", float("nan"))])
def test_hf_values_lmlab_would_refuse_are_refused_at_import(hf_folder, capsys, field, value):
    config = json.loads((hf_folder / "config.json").read_text())
    config[field] = value
    config.pop("rope_parameters", None)  # the newer field would take precedence over rope_theta
    (hf_folder / "config.json").write_text(json.dumps(config))
    out = hf_folder.parent / "run"
    _one_error(*_cli(capsys, "train", "--init-from", hf_folder, "--data", hf_folder.parent / "corpus.txt", "--out",
                     out, "--max-steps", "1", "--max-time", "0", "--no-progress")[::2], field)
    assert not (out / "config.json").exists()


# ---------------------------------------------------------------------------------------------------------------
# 4. lmlab report and the files beside its page


@pytest.mark.slow
def test_report_deletes_and_overwrites_only_the_charts_it_wrote(made, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LMLAB_CACHE", str(made / "cache"))
    run = made / "run"
    site = tmp_path / "site"
    (site / "holiday_files").mkdir(parents=True)
    (site / "holiday.html").write_text("<html>my holiday</html>")
    (site / "holiday_files" / "beach.png").write_bytes(b"\x89PNG my beach")
    rc, _, err = _cli(capsys, "report", run, made / "run", "--out", site / "holiday.html")
    assert rc == 0, err
    assert (site / "holiday_files" / "beach.png").read_bytes() == b"\x89PNG my beach"
    charts = {p.name for p in (site / "holiday_files").glob("*.png")} - {"beach.png"}
    assert "loss_steps.png" in charts

    shutil.copytree(run, tmp_path / "second")  # two runs: more charts; then one run: the extra ones go
    rc, _, err = _cli(capsys, "report", run, tmp_path / "second", "--out", site / "holiday.html")
    assert rc == 0, err
    two = {p.name for p in (site / "holiday_files").glob("*.png")}
    rc, _, err = _cli(capsys, "report", run, "--out", site / "holiday.html")
    assert rc == 0, err
    one = {p.name for p in (site / "holiday_files").glob("*.png")}
    assert one < two and "beach.png" in one and (site / "holiday_files" / "beach.png").read_bytes().endswith(b"beach")

    mine = tmp_path / "mine"
    (mine / "page_files").mkdir(parents=True)
    (mine / "page_files" / "loss_steps.png").write_bytes(b"my own chart")
    _one_error(*_cli(capsys, "report", run, "--out", mine / "page.html")[::2], "loss_steps.png")
    assert (mine / "page_files" / "loss_steps.png").read_bytes() == b"my own chart"
    assert not (mine / "page.html").exists()


# ---------------------------------------------------------------------------------------------------------------
# 5. Options given with --resume


def test_resume_applies_every_option_or_refuses_it_naming_it(copied, tmp_path, capsys):
    """--out, --init-from and --global-batch are refused; --grad-accum and --batch-size split the run's global batch
    anew, or are refused (naming themselves) when they cannot; config.json records only what was used."""
    run, corpus = copied
    resume = ["train", "--resume", run, "--data", corpus, "--no-progress", "--sample-tokens", "0"]
    config = lambda: json.loads((run / "config.json").read_text())  # noqa: E731
    before = _files(run)
    for option, value in (("--out", tmp_path / "NEW"), ("--init-from", tmp_path), ("--global-batch", "8"),
                          ("--batch-size", "8"), ("--grad-accum", "3")):
        line = _one_error(*_cli(capsys, *resume, "--max-steps", "10", option, value)[::2], option)
        if option == "--batch-size":
            assert "--global-batch" not in line, line
        assert _files(run) == before and not (tmp_path / "NEW").exists()

    rc, _, err = _cli(capsys, *resume, "--max-steps", "10", "--grad-accum", "2")
    assert rc == 0, err
    assert "--batch-size 2 x 2 accumulation step(s)" in err
    assert (config()["batch_size"], config()["grad_accum"], config()["global_batch"]) == (2, 2, 4)
    rc, _, err = _cli(capsys, *resume, "--max-steps", "12", "--batch-size", "4")
    assert rc == 0, err
    assert (config()["batch_size"], config()["grad_accum"], config()["global_batch"]) == (4, 1, 4)
    assert config()["out"] == str(run) and config()["init_from"] is None


# ---------------------------------------------------------------------------------------------------------------
# 6. Text as text, bounded pages, links


@pytest.mark.slow
def test_run_text_is_never_parsed_as_markup(made, tmp_path, monkeypatch, capsys):
    """The run's probe prompt is TeX-like; a run folder's name holds dollars: report and inside --html draw them."""
    monkeypatch.setenv("LMLAB_CACHE", str(made / "cache"))
    run = tmp_path / "my $\\bar{run}$"
    shutil.copytree(made / "run", run)
    for argv in (["report", run, "--out", tmp_path / "report.html"], ["inside", run, "--html", tmp_path / "in.html"]):
        rc, _, err = _cli(capsys, *argv)
        assert rc == 0, err
    assert "$\\foo{x}$" in (tmp_path / "in.html").read_text(encoding="utf-8")  # drawn, and listed as it is


@pytest.mark.slow
def test_an_inside_page_draws_a_bounded_grid_and_says_what_it_left_out(copied, tmp_path):
    run, _ = copied
    record = json.loads((run / "inside.jsonl").read_text().splitlines()[-1])
    record["attention"] = [{"prompt": "ab", "tokens": ["a", "b"], "percent": [[[[100], [50, 50]]] * 40] * 40}]
    (run / "inside.jsonl").write_text(json.dumps(record) + "\n")
    rc, err, peak = run_capped("inside", run, "--html", tmp_path / "inside.html", cwd=tmp_path)
    assert rc == 0, err
    assert peak < 1024, f"peak RSS {peak:.0f} MiB"
    assert "layers 0-7 of 40 and heads 0-7 of 40 drawn" in (tmp_path / "inside.html").read_text(encoding="utf-8")


def test_resume_never_appends_to_a_hard_linked_file(copied, tmp_path, capsys):
    run, corpus = copied
    outside = tmp_path / "my-notes.txt"
    os.link(run / "samples.txt", outside)
    before = outside.read_bytes()
    _one_error(*_cli(capsys, "train", "--resume", run, "--data", corpus, "--max-steps", "10", "--no-progress")[::2],
               "hard link", "samples.txt")
    assert outside.read_bytes() == before


@pytest.mark.parametrize("fmt", ["lmlab", "hf"])
def test_export_to_a_dangling_link_is_one_error(copied, tmp_path, capsys, fmt):
    run, _ = copied
    (tmp_path / "out").symlink_to(tmp_path / "nowhere")
    _one_error(*_cli(capsys, "export", run, tmp_path / "out", "--format", fmt, "--no-verify")[::2], "link")
    assert not (tmp_path / "nowhere").exists()


def test_a_new_run_never_overwrites_the_users_tokenizer_json(made, tmp_path, capsys):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "tokenizer.json").write_text('{"mine": true}')
    _one_error(*_cli(capsys, "train", "--data", made / "corpus.txt", "--out", folder, "--max-steps", "1")[::2],
               "tokenizer.json")
    assert (folder / "tokenizer.json").read_text() == '{"mine": true}'
