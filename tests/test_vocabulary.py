"""One CLI vocabulary: `lmlab --help` lists the commands of the one table by stage, `import lmlab.cli` imports no
torch, `--device` defaults to auto, `--json` prints one JSON object on stdout, `--out` is where a command writes,
and one stride rule refuses the same strides in `train` and `eval`."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from helpers import HANG_S, TINY_ARGS, cli_env, run_cli, tiny_config, write_corpus
from lmlab.cli import COMMANDS, STAGES, Command, main

BY_STAGE = {  # issue 27: data and training · use a model · look inside · share · measure
    "data and training": ["data", "train"],
    "use a model": ["sample", "chat", "next", "serve"],
    "look inside": ["inside", "surprisal", "landscape"],
    "share": ["report", "export"],
    "measure": ["eval", "bench", "experiment"],
}
RUN_MODEL = {"train", "sample", "chat", "next", "serve", "surprisal", "landscape", "eval", "bench", "experiment"}  # --device


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny trained run (block size 16), trained in this process with --eval-stride at the block size, the
    largest stride the rule accepts; its cache (ROOT/cache) records that the run was made here."""
    from lmlab.train import train

    root = tmp_path_factory.mktemp("vocabulary")
    corpus = write_corpus(root / "corpus.txt", 200, seed=0)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LMLAB_CACHE", str(root / "cache"))
        train(tiny_config(corpus, root / "run", eval_stride=16))
    return root


def _groups(text: str) -> dict[str, list[str]]:
    """The commands under each `stage:` heading of `lmlab --help`."""
    groups: dict[str, list[str]] = {}
    for line in text.splitlines():
        if line.endswith(":") and not line.startswith(" "):
            groups[line[:-1]] = []
        elif line.startswith("  ") and groups:
            groups[list(groups)[-1]].append(line.split()[0])
    return groups


def test_help_lists_every_command_once_under_its_stage(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    groups = _groups(out)
    assert list(groups) == list(STAGES) == list(BY_STAGE)
    assert groups == BY_STAGE
    assert sorted(sum(groups.values(), [])) == sorted(COMMANDS)  # the table, all of it, nothing else
    for name, command in COMMANDS.items():
        assert f"  {name} " in out and command.help in out
    assert main([]) == 0 and capsys.readouterr().out == out


def test_the_table_drives_dispatch(monkeypatch, capsys):
    """main runs the handler that COMMANDS names, with the rest of the command line; each handler loads."""
    for name, command in COMMANDS.items():
        assert callable(command.load()) and command.load().__name__ == command.handler.split(":")[1], name
    calls = []
    monkeypatch.setattr(Command, "load", lambda self: lambda argv: calls.append((self.handler, argv)) or 7)
    for name in COMMANDS:
        assert main([name, "x", "--y"]) == 7
    assert calls == [(command.handler, ["x", "--y"]) for command in COMMANDS.values()]
    assert main(["frobnicate"]) == 2 and "unknown command 'frobnicate'" in capsys.readouterr().err


def _imported(*args: str) -> list[str]:
    """The modules that `python -X importtime ARGS` imports."""
    proc = subprocess.run([sys.executable, "-X", "importtime", *args], capture_output=True, text=True,
                          env=cli_env(), timeout=HANG_S)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return [line.rsplit("|", 1)[1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")]


def test_import_lmlab_cli_and_its_help_import_no_torch():
    assert "torch" in _imported("-c", "import lmlab.common")  # the check sees torch where it is imported
    for args in (("-c", "import lmlab.cli"), ("-m", "lmlab", "--help")):
        modules = _imported(*args)
        assert "lmlab.cli" in modules and "tyro" in modules
        assert [m for m in modules if "torch" in m] == [], args


@pytest.mark.parametrize("name", list(COMMANDS))
def test_device_defaults_to_auto_wherever_a_command_has_one(name, capsys):
    assert main([name, "--help"]) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.strip().startswith("--device ")]
    assert len(lines) == (name in RUN_MODEL), lines
    assert all("(default: auto)" in ln for ln in lines), lines


def test_eval_device_auto_json_prints_one_json_object_on_stdout(run, monkeypatch, capsys):
    proc = run_cli(["eval", "run", "--device", "auto", "--json"], cwd=run, cache=run / "cache")
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    result = json.loads(proc.stdout)  # the whole of stdout
    assert set(result) == {"loss", "bits_per_byte", "perplexity", "accuracy", "tokens", "stride"}
    assert result["stride"] == 8  # half the context, by default
    import lmlab.common

    asked = []
    resolve = lmlab.common.resolve_device
    monkeypatch.setattr(lmlab.common, "resolve_device", lambda name: asked.append(name) or resolve(name))
    monkeypatch.chdir(run)
    monkeypatch.setenv("LMLAB_CACHE", str(run / "cache"))
    assert main(["eval", "run", "--json"]) == 0
    assert asked == ["auto"]  # the default
    assert json.loads(capsys.readouterr().out) == pytest.approx(result, rel=1e-5)


def _one_line(rc: int, err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith("reading corpus ")]
    assert rc == 2 and "Traceback" not in err and len(lines) == 1, (rc, err)
    return lines[0]


@pytest.mark.parametrize("stride", [17, 999])
def test_a_stride_beyond_the_context_is_refused_alike_by_train_and_eval(run, tmp_path, monkeypatch, capsys, stride):
    """Training used to clamp --eval-stride 999 to the block size while eval refused --stride 999."""
    monkeypatch.setenv("LMLAB_CACHE", str(run / "cache"))
    out = tmp_path / "new"
    rc = main(["train", "--data", str(run / "corpus.txt"), *TINY_ARGS, "--eval-stride", str(stride), "--out",
               str(out)])
    trained = _one_line(rc, capsys.readouterr().err)
    rc = main(["eval", str(run / "run"), "--stride", str(stride)])
    evaluated = _one_line(rc, capsys.readouterr().err)
    rule = f"must be between 1 and the context length 16, got {stride}"
    assert trained == f"lmlab train: error: --eval-stride {rule}"
    assert evaluated == f"lmlab eval: error: --stride {rule}"
    assert not out.exists()  # refused before anything is written
    assert main(["eval", str(run / "run"), "--stride", "16", "--json"]) == 0  # the block size: accepted by both
    assert json.loads(capsys.readouterr().out)["stride"] == 16


@pytest.mark.parametrize("argv", [
    ["bench", "--json", "bench.json"],
    ["bench", "--markdown", "bench.md"],
    ["surprisal", "RUN", "--text", "the", "--html", "heat.html"],
    ["inside", "RUN", "--html", "inside.html"],
    ["export", "RUN", "OUT"],
], ids=["bench-json-file", "bench-markdown", "surprisal-html", "inside-html", "export-positional-out"])
def test_the_old_flags_are_refused_in_one_line(argv, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    line = _one_line(main(argv), capsys.readouterr().err)
    assert line.startswith(f"lmlab {argv[0]}: error:") and f"lmlab {argv[0]} --help" in line
    assert list(tmp_path.iterdir()) == []  # nothing measured, nothing written
