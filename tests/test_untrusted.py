"""A run from someone else is data, never code: planted payloads, symbolic links and malformed files, put through
every command that reads a run, and lmlab serve.

Oracles: a marker file that only unpickling a payload can create; the bytes of every file outside the run; and the
error contract (exit 0, where a fallback is possible, or exit 2 with one error line; never a traceback)."""

from __future__ import annotations

import json
import math
import os
import pickle
import random
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from helpers import HANG_S, ServerThread, cli_env, http, lmlab_cmd, tiny_config, write_corpus
from lmlab import rundir
from lmlab.checkpoint import checkpoint_dirs
from lmlab.cli import main
from lmlab.common import sha256_file

STEPS = 12


class Payload:
    """Unpickling this creates the marker file: proof that code from the run ran."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A small real run with everything a run can hold: 3 checkpoints, probes, telemetry, samples, weight snapshots
    and a landscape."""
    from lmlab.train import train

    root = tmp_path_factory.mktemp("untrusted")
    corpus = write_corpus(root / "corpus.txt", 120)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LMLAB_CACHE", str(root / "cache"))
        train(tiny_config(corpus, root / "run", max_steps=STEPS, eval_interval=4, checkpoint_interval=4,
                          sample_tokens=8, trajectory_snapshots=3, telemetry_interval=2, tensorboard=False))
        assert main(["landscape", str(root / "run"), "--points", "3", "--batch-size", "1"]) == 0
    return root / "run"


@pytest.fixture
def env(base, tmp_path, monkeypatch):
    """A copy of the base run, a folder of files outside it that nothing may change, and the payload's marker."""
    monkeypatch.setenv("LMLAB_CACHE", str(base.parent / "cache"))
    run = tmp_path / "run"
    shutil.copytree(base, run)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "profile").write_text("export SECRET=do-not-leak\n")
    (outside / "notes.jsonl").write_text('{"text": "SECRET private note"}\n')
    return run, outside, tmp_path / "PWNED"


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _plant(path: Path, marker: Path, as_torch: bool = False) -> None:
    if path.is_symlink() or path.exists():
        path.unlink()
    if as_torch:
        torch.save({"weights": Payload(str(marker))}, str(path))
    else:
        path.write_bytes(pickle.dumps(Payload(str(marker)), protocol=2))


def _rehash(ckpt: Path) -> None:
    """Make state.json agree with the files the checkpoint now holds, as someone crafting a run would."""
    state = json.loads((ckpt / "state.json").read_text())
    state["files"] = {name: sha256_file(ckpt / name) for name in state["files"]}
    (ckpt / "state.json").write_text(json.dumps(state))


# ---------------------------------------------------------------------------------------------------------------
# Planted runs


def plant_pickles_everywhere(run: Path, outside: Path, marker: Path) -> None:
    for path in [p for p in run.rglob("*") if p.is_file() and p.name != ".lock"]:
        _plant(path, marker, as_torch=path.suffix in (".safetensors", ".pt"))


def plant_rehashed_pickle_checkpoints(run: Path, outside: Path, marker: Path) -> None:
    for ckpt in checkpoint_dirs(run):
        _plant(ckpt / "model.safetensors", marker, as_torch=True)
        _plant(ckpt / "optimizer.safetensors", marker)
        _rehash(ckpt)


def plant_dcp_claim(run: Path, outside: Path, marker: Path) -> None:
    """The newest checkpoint says it is an old torch.distributed.checkpoint one; its pickled metadata is a payload."""
    ckpt = checkpoint_dirs(run)[-1]
    (ckpt / "dcp").mkdir()
    _plant(ckpt / "dcp" / ".metadata", marker)
    _plant(ckpt / "dcp" / "__0_0.distcp", marker, as_torch=True)
    (ckpt / "rng.safetensors").write_bytes((ckpt / "optimizer.safetensors").read_bytes())
    state = json.loads((ckpt / "state.json").read_text())
    state.update(format="dcp", world_size=1, files={})
    state["files"] = {n: sha256_file(ckpt / n) for n in ("rng.safetensors", "dcp/.metadata", "dcp/__0_0.distcp")}
    (ckpt / "state.json").write_text(json.dumps(state))


def plant_sharded_claim(run: Path, outside: Path, marker: Path) -> None:
    """The newest checkpoint says it is sharded; its shard is a pickle (with hashes that match)."""
    ckpt = checkpoint_dirs(run)[-1]
    _plant(ckpt / "shard_00000.safetensors", marker, as_torch=True)
    (ckpt / "rng.safetensors").write_bytes((ckpt / "optimizer.safetensors").read_bytes())
    state = json.loads((ckpt / "state.json").read_text())
    state.update(format="sharded", world_size=1, tensors={})
    state["files"] = {n: sha256_file(ckpt / n) for n in ("rng.safetensors", "shard_00000.safetensors")}
    (ckpt / "state.json").write_text(json.dumps(state))


def _link(path: Path, target: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()
    path.symlink_to(target)


def link_samples(run: Path, outside: Path, marker: Path) -> None:
    """samples.txt and samples.jsonl point at a private file: resume would append to it, report would embed it."""
    _link(run / "samples.txt", outside / "profile")
    _link(run / "samples.jsonl", outside / "notes.jsonl")


def link_config(run: Path, outside: Path, marker: Path) -> None:
    shutil.copy(run / "config.json", outside / "config.json")
    _link(run / "config.json", outside / "config.json")


def link_logs(run: Path, outside: Path, marker: Path) -> None:
    for name in ("metrics.jsonl", "probes.jsonl", "telemetry.jsonl"):
        shutil.copy(run / name, outside / name)
        _link(run / name, outside / name)


def link_checkpoint_file(run: Path, outside: Path, marker: Path) -> None:
    """The newest checkpoint's weights are a link to a copy outside (its hash still matches)."""
    ckpt = checkpoint_dirs(run)[-1]
    shutil.copy(ckpt / "model.safetensors", outside / "model.safetensors")
    _link(ckpt / "model.safetensors", outside / "model.safetensors")


def link_checkpoints_folder(run: Path, outside: Path, marker: Path) -> None:
    shutil.copytree(run / "checkpoints", outside / "checkpoints")
    _link(run / "checkpoints", outside / "checkpoints")


def link_trajectory_and_landscape(run: Path, outside: Path, marker: Path) -> None:
    for name in ("trajectory", "landscape"):
        shutil.copytree(run / name, outside / name)
        _link(run / name, outside / name)


PLANTS = [plant_pickles_everywhere, plant_rehashed_pickle_checkpoints, plant_dcp_claim, plant_sharded_claim,
          link_samples, link_config, link_logs, link_checkpoint_file, link_checkpoints_folder,
          link_trajectory_and_landscape]


def commands(run: Path, out: Path, corpus: Path) -> dict[str, list[str]]:
    """Every command on the run; those that read its data name it (a copy is not the run made here)."""
    data = ["--data", str(corpus)]
    return {
        "sample": ["sample", str(run), "--max-new-tokens", "8", "--temperature", "0", "--prompt", "the "],
        "eval": ["eval", str(run), "--json", *data],
        "next": ["next", str(run), "the ", "--json"],
        "surprisal": ["surprisal", str(run), "--text", "the cat sees", "--json"],
        "landscape": ["landscape", str(run), "--points", "3", "--batch-size", "1", "--2d", *data],
        "report": ["report", str(run), "--out", str(out / "report.html")],
        "export": ["export", str(run), "--out", str(out / "export")],
        "resume": ["train", "--resume", str(run), "--max-steps", str(STEPS + 2), "--sample-tokens", "4",
                   "--no-progress", *data],
    }


def _cli(capsys, argv: list[str]) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def assert_contract(rc: int, err: str, what: str) -> None:
    """Exit 0 (maybe after a warning) or exit 2 with exactly one error line; never a traceback."""
    assert "Traceback" not in err and "internal error" not in err, f"{what}:\n{err}"
    assert rc in (0, 2), f"{what}: exit {rc}\n{err}"
    if rc == 2:
        errors = [ln for ln in err.splitlines() if ": error: " in ln]
        assert len(errors) == 1, f"{what}: expected one error line:\n{err}"


def serve_requests(run: Path) -> list[tuple[str, int]]:
    """Every kind of request that reads a run, against a real server; (what, HTTP status)."""
    from lmlab.serve.app import create_app
    from lmlab.serve.request import Limits
    from lmlab.serve.runs import RunSet

    answers = []
    with ServerThread(create_app(RunSet([run]), Limits(max_tokens=8, max_prompt_chars=200))) as url:
        status, body = http(url + "/api/runs")
        answers.append(("runs", status))
        name = body["runs"][0]["name"] if status == 200 and body.get("runs") else "run"
        for log in ("metrics", "probes"):
            answers.append((log, http(f"{url}/api/log?run={name}&file={log}")[0]))
        answers.append(("models", http(url + "/v1/models")[0]))
        answers.append(("next", http(url + "/api/next", {"model": name, "prompt": "the "})[0]))
        answers.append(("surprisal", http(url + "/api/surprisal", {"model": name, "text": "the cat"})[0]))
        answers.append(("completion", http(url + "/v1/completions", {"model": name, "prompt": "the ",
                                                                     "max_tokens": 4})[0]))
    return answers


@pytest.mark.slow
@pytest.mark.parametrize("plant", PLANTS, ids=lambda f: f.__name__)
def test_planted_runs_never_run_code_or_touch_files_outside(base, env, capsys, plant):
    run, outside, marker = env
    corpus = base.parent / "corpus.txt"
    plant(run, outside, marker)
    before = _snapshot(outside)
    results = {}
    for name, argv in commands(run, run.parent / f"out-{plant.__name__}", corpus).items():
        rc, out, err = _cli(capsys, argv)
        assert not marker.exists(), f"`lmlab {name}` ran code from the run"
        assert_contract(rc, err, name)
        results[name] = (rc, err)
        assert _snapshot(outside) == before, f"`lmlab {name}` changed a file outside the run"
    for what, status in serve_requests(run):
        assert not marker.exists(), f"serve ({what}) ran code from the run"
        assert status < 500, f"serve ({what}) answered {status}"
    assert _snapshot(outside) == before

    shared = run.parent / f"out-{plant.__name__}"
    for page in [shared / "report.html", *(shared / "export").rglob("*")]:
        if page.is_file():
            assert b"SECRET" not in page.read_bytes(), f"{page} holds the contents of a private file"
    if plant is plant_dcp_claim:
        for name in ("sample", "eval", "export", "resume"):
            assert results[name][0] == 2 and "--trust-pickle" in results[name][1], results[name]
    if plant in (plant_sharded_claim, link_checkpoint_file):  # the previous checkpoint is used instead
        for name in ("sample", "eval", "next", "surprisal", "export"):
            assert results[name][0] == 0 and "warning" in results[name][1], (name, results[name])
    if plant.__name__.startswith("link_"):  # training refuses the folder before it writes anything
        assert results["resume"][0] == 2 and "symbolic link" in results["resume"][1], results["resume"]


def test_export_trust_pickle_converts_an_old_dcp_checkpoint_after_a_warning(env, capsys):
    """The one exception: a real old-format (torch.distributed.checkpoint) checkpoint converts with --trust-pickle,
    after a warning, into single files with the same weights; without the flag it is refused."""
    import torch.distributed.checkpoint as dcp
    from safetensors.torch import load_file

    run, outside, marker = env
    ckpt = checkpoint_dirs(run)[-1]
    weights = load_file(str(ckpt / "model.safetensors"))
    optimizer = {k: v for k, v in load_file(str(ckpt / "optimizer.safetensors")).items() if k.startswith("state.")}
    rng = {k[4:]: v for k, v in load_file(str(ckpt / "optimizer.safetensors")).items() if k.startswith("rng.")}
    tensors = {**{f"model.{k}": v for k, v in weights.items()}, **{f"optimizer.{k}": v for k, v in optimizer.items()}}
    dcp.save(tensors, checkpoint_id=str(ckpt / "dcp"), no_dist=True)
    from safetensors.torch import save_file

    save_file(rng, str(ckpt / "rng.safetensors"))
    (ckpt / "model.safetensors").unlink()
    (ckpt / "optimizer.safetensors").unlink()
    state = json.loads((ckpt / "state.json").read_text())
    names = ["rng.safetensors"] + sorted(f"dcp/{p.name}" for p in (ckpt / "dcp").iterdir())
    state.update(format="dcp", world_size=1, optimizer_tensors=sorted(optimizer),
                 files={n: sha256_file(ckpt / n) for n in names})
    (ckpt / "state.json").write_text(json.dumps(state))

    rc, _, err = _cli(capsys, ["export", str(run), "--out", str(run.parent / "refused")])
    assert rc == 2 and "--trust-pickle" in err and not (run.parent / "refused").exists()
    rc, _, err = _cli(capsys, ["export", str(run), "--out", str(run.parent / "converted"), "--trust-pickle"])
    assert rc == 0, err
    assert err.index("warning") < err.index("exported") and "run code" in err
    converted = checkpoint_dirs(run.parent / "converted")[-1]
    assert converted.name == ckpt.name
    again = load_file(str(converted / "model.safetensors"))
    assert again.keys() == weights.keys() and all(torch.equal(again[k], weights[k]) for k in weights)
    rc, _, err = _cli(capsys, ["eval", str(run.parent / "converted"), "--json", "--trust-data-path"])
    assert rc == 0, err


def test_out_never_deletes_what_lmlab_did_not_make(base, tmp_path, capsys):
    """--out on a folder that is not a run is refused; a run's own temporary names are cleaned, nothing else."""
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / ".notes.tmp").write_text("mine")
    rc, _, err = _cli(capsys, ["train", "--out", str(folder), "--max-steps", "1"])
    assert rc == 2 and "not an lmlab run" in err and (folder / ".notes.tmp").read_text() == "mine"

    run = tmp_path / "run"
    shutil.copytree(base, run)
    ours = [run / ".metrics.jsonl.ab12cd_x.tmp", run / "checkpoints" / ".step_00000016.k2j3h4.tmp",
            run / "trajectory" / ".step_00000016.safetensors.tmp"]
    theirs = [run / ".bashrc.tmp", run / ".x.tmp", run / "checkpoints" / ".mine.tmp", run / "notes.tmp"]
    for p in ours + theirs:
        p.write_text("x")
    rc, _, err = _cli(capsys, ["train", "--resume", str(run), "--max-steps", str(STEPS + 1), "--sample-tokens", "0",
                               "--no-progress", "--data", str(base.parent / "corpus.txt")])
    assert rc == 0, err
    assert not any(p.exists() for p in ours)
    assert all(p.read_text() == "x" for p in theirs)


# ---------------------------------------------------------------------------------------------------------------
# Fuzzing the JSON and JSONL files of a real run


def _retype(value, rng: random.Random):
    return rng.choice([None, "x", -1, 1e308, math.nan, [], {}, True, [value], {"v": value}])


def _mutate_obj(obj, rng: random.Random):
    """One random change deep inside a JSON value: a key dropped, or a value of another type."""
    path = []
    node = obj
    while isinstance(node, (dict, list)) and node and rng.random() < 0.7:
        key = rng.choice(list(node)) if isinstance(node, dict) else rng.randrange(len(node))
        path.append(key)
        node = node[key]
    if not path:
        return _retype(obj, rng)
    parent = obj
    for key in path[:-1]:
        parent = parent[key]
    if isinstance(parent, dict) and rng.random() < 0.4:
        del parent[path[-1]]
    else:
        parent[path[-1]] = _retype(parent[path[-1]], rng)
    return obj


def mutations(data: bytes, jsonl: bool, seed: int) -> list[bytes]:
    """Fixed damage (truncation, other types, deep nesting) plus seeded random changes of the parsed content. For
    JSONL, the damaged lines go into two files, alone and between the good lines."""
    rng = random.Random(seed)
    deep = b"[" * 100_000 + b"]" * 100_000
    fixed = [data[: len(data) // 2], data[:1], b"", b"[]", b"{}", b"null", b'"text"', deep, b"\xff\xfe garbage",
             b'{"step": "12", "train_loss": "x", "val_loss": [], "probes": {}}\n']
    if jsonl:  # a reader takes JSONL line by line: every damaged line in one file, between the good lines
        lines = data.splitlines(keepends=True)
        mixed = b"".join(line + bad + b"\n" for line, bad in zip(lines, fixed[3:] * len(lines)))
        out = [fixed[0] + b"\n", fixed[1] + b"\n", fixed[2], b"".join(bad + b"\n" for bad in fixed[3:]), mixed]
    else:
        out = fixed
    for _ in range(2 if jsonl else 4):  # JSONL: fewer copies, each one more page for report to draw
        if jsonl:
            lines = data.decode().splitlines()
            i = rng.randrange(len(lines))
            lines[i] = json.dumps(_mutate_obj(json.loads(lines[i]), rng))
            if rng.random() < 0.5:
                lines.insert(rng.randrange(len(lines)), rng.choice(["[1, 2]", "7", "{", "nan", '"s"', "{}"]))
            out.append(("\n".join(lines) + "\n").encode())
        else:
            out.append(json.dumps(_mutate_obj(json.loads(data), rng)).encode())
        flipped = bytearray(data)
        flipped[rng.randrange(len(flipped))] ^= 1 << rng.randrange(8)
        out.append(bytes(flipped))
    return out


FUZZED = ["config.json", "tokenizer.json", "status.json", "metrics.jsonl", "probes.jsonl", "telemetry.jsonl",
          "samples.jsonl", "inside.jsonl", "checkpoints/step_00000012/state.json"]


@pytest.fixture(scope="module")
def fuzzed_runs(base, tmp_path_factory) -> dict[str, list[Path]]:
    """For each file, copies of the run, each with one mutation of that file. Only the copies that damage
    inside.jsonl keep it: the report's inside section (four charts a run, most of a report's time) would otherwise
    be drawn again from the same good records in every copy of every other file."""
    root = tmp_path_factory.mktemp("fuzz")
    runs: dict[str, list[Path]] = {}
    for i, rel in enumerate(FUZZED):
        data = (base / rel).read_bytes()
        for j, mutated in enumerate(mutations(data, rel.endswith(".jsonl"), seed=i)):
            run = root / f"{Path(rel).name.split('.')[0]}-{j:02d}"
            shutil.copytree(base, run, ignore=None if rel == "inside.jsonl" else shutil.ignore_patterns("inside.jsonl"))
            (run / rel).write_bytes(mutated)
            runs.setdefault(rel, []).append(run)
    return runs


@pytest.fixture(scope="module")
def fuzzed_reports(fuzzed_runs, base):
    """`lmlab report` over every damaged copy of each JSONL file, a child process a file, all started at once (their
    charts, 18 runs' worth each, are most of this module's work; side by side they use every core while the other
    files' tests run here): {file: (process, its stderr file)}."""
    reports = {}
    for rel in [rel for rel in FUZZED if rel.endswith(".jsonl")]:
        runs = fuzzed_runs[rel]
        out = runs[0].parent / f"{Path(rel).name}-out"
        err = runs[0].parent / f"{Path(rel).name}-report.err"
        with open(err, "w") as f:
            proc = subprocess.Popen(lmlab_cmd("report", *map(str, runs), "--out", str(out / "report.html")),
                                    env=cli_env(base.parent / "cache"), stdout=subprocess.DEVNULL, stderr=f)
        reports[rel] = proc, err
    yield reports
    for proc, _ in reports.values():
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.slow
@pytest.mark.parametrize("rel", FUZZED)
def test_fuzzed_files_fall_back_or_fail_cleanly(fuzzed_runs, fuzzed_reports, rel, capsys, base, monkeypatch):
    """Item by item: a damaged state.json falls back to the previous checkpoint; a damaged config.json or
    tokenizer.json is one error line and exit 2 (or works, when the change left it valid); a damaged status.json
    reads as unknown; JSONL lines that do not parse, or hold fields of other types, are skipped."""
    monkeypatch.setenv("LMLAB_CACHE", str(base.parent / "cache"))
    runs = fuzzed_runs[rel]
    out = runs[0].parent / f"{Path(rel).name}-out"
    if rel.endswith(".jsonl"):  # only report reads these: one report over every damaged copy (in fuzzed_reports)
        proc, err_file = fuzzed_reports[rel]
        rc = proc.wait(timeout=HANG_S)
        err = err_file.read_text()
        assert rc == 0 and "Traceback" not in err, err
        for run in runs:
            assert all(isinstance(r.get("step", 0), int) for r in rundir.read_jsonl(run, rel))
            if rel == "inside.jsonl":
                for argv in (["inside", str(run), "--json"], ["inside", str(run), "--out", str(out / "inside.html")]):
                    assert_contract(*_cli(capsys, argv)[::2], f"{argv[0]} with a damaged {rel} ({run.name})")
        return
    for i, run in enumerate(runs):
        if rel == "status.json":
            _check_status(run)
            continue
        for name in ("eval", "sample") + (("report",) if rel == "config.json" else ()):
            rc, _, err = _cli(capsys, commands(run, out, base.parent / "corpus.txt")[name])
            assert_contract(rc, err, f"{name} with a damaged {rel} ({run.name})")
            if rel.endswith("state.json"):
                assert rc == 0, f"{name} with a damaged {rel} ({run.name}) did not fall back:\n{err}"
        if rel.endswith("state.json") and i % 4 == 0:
            rc, _, err = _cli(capsys, commands(run, out, base.parent / "corpus.txt")["resume"])
            assert rc == 0, f"resume with a damaged {rel} ({run.name}) did not fall back:\n{err}"


def _check_status(run: Path) -> None:
    status = rundir.run_status(run)["status"]
    try:
        parsed = json.loads((run / "status.json").read_bytes())
    except (ValueError, RecursionError):
        parsed = None
    if isinstance(parsed, dict) and parsed.get("status") in rundir.STATUSES:
        assert status in rundir.STATUSES, (run.name, status)
    else:
        assert status == "unknown", (run.name, status)


@pytest.mark.slow
def test_fuzzed_runs_served(fuzzed_runs):
    """One server over every fuzzed run: each request is answered, never with a 500."""
    from lmlab.serve.app import create_app
    from lmlab.serve.request import Limits
    from lmlab.serve.runs import RunSet

    folders = sorted({p.parent for runs in fuzzed_runs.values() for p in runs})
    with ServerThread(create_app(RunSet(folders), Limits(max_tokens=4, max_prompt_chars=200))) as url:
        status, body = http(url + "/api/runs")
        assert status == 200
        names = [r["name"] for r in body["runs"]]
        assert len(names) >= sum(len(v) for k, v in fuzzed_runs.items() if k != "config.json") // 2
        for run in body["runs"]:
            assert run["status"] in (*rundir.STATUSES, "unknown")
        for name in names:
            for log in ("metrics", "probes", "inside"):
                status, _ = http(f"{url}/api/log?run={name}&file={log}")
                assert status == 200, (name, log, status)
            status, _ = http(url + "/api/next", {"model": name, "prompt": "the "})
            assert status in (200, 400, 404, 409), (name, status)


def test_untrusted_json_is_depth_bounded():
    from lmlab.common import LmlabError

    assert rundir.parse_json('{"a": [1, {"b": "[[[["}]}', "x") == {"a": [1, {"b": "[[[["}]}
    for text in ("[" * 100_000 + "]" * 100_000, "[" * 65 + "]" * 65):
        with pytest.raises(LmlabError, match="nested"):
            rundir.parse_json(text, "x")
    assert rundir.parse_json("[" * 64 + "]" * 64, "x") is not None
    assert rundir.parse_jsonl(b'{"step": 1}\n[1]\n{\n' + b"[" * 100_000 + b'\n{"step": 2}\n') == [
        {"step": 1}, {"step": 2}]


def test_one_json_bound_for_disk_and_network(tmp_path):
    """Files (common.read_json, a run's JSON) and request bodies (serve) are parsed by one reader with one depth
    limit: one level more than it is refused by each, as one error."""
    from lmlab import common
    from lmlab.serve import request

    assert request.MAX_JSON_DEPTH == common.MAX_JSON_DEPTH and request.parse_json is common.parse_json
    deep = tmp_path / "deep.json"
    deep.write_text("[" * (common.MAX_JSON_DEPTH + 1) + "]" * (common.MAX_JSON_DEPTH + 1))
    with pytest.raises(common.LmlabError, match="nested more than 64"):
        common.read_json(deep)
    deep.write_text("[" * common.MAX_JSON_DEPTH + "]" * common.MAX_JSON_DEPTH)
    assert common.read_json(deep) is not None
    assert common.json_depth(rb'{"a": [1, {"b": "]]\"[[["}], "c": "\\"}') == 3


def test_links_are_never_written_through(tmp_path):
    """The run folder's own writes refuse a link, or replace the link itself; what it points to never changes."""
    run = tmp_path / "run"
    run.mkdir()
    victim = tmp_path / "victim"
    victim.write_text("keep")
    for name in ("samples.txt", "metrics.jsonl", "config.json"):
        _link(run / name, victim)
    from lmlab.common import LmlabError

    with pytest.raises(LmlabError, match="symbolic link"):
        rundir.append_text(run, "samples.txt", "appended")
    with pytest.raises(LmlabError, match="symbolic link"):
        rundir.open_append(run, "metrics.jsonl")
    rundir.write_json(run, "config.json", {"a": 1})  # replaces the link itself
    assert victim.read_text() == "keep" and not (run / "config.json").is_symlink()
    os.symlink(tmp_path, run / "checkpoints")
    with pytest.raises(LmlabError, match="symbolic link"):
        rundir.make_dir(run, "checkpoints")
    with pytest.raises(LmlabError, match="symbolic link"):
        rundir.read_text(run, "checkpoints/victim")


@pytest.mark.slow
def test_only_the_trust_pickle_export_reaches_torch_distributed_checkpoint():
    """An AST scan: torch.distributed.checkpoint (which unpickles) is imported in one function of the package, the
    one `lmlab export --trust-pickle` calls, and that function is called from one place, behind the flag."""
    import ast

    package = Path(__file__).resolve().parents[1] / "lmlab"
    places, callers = [], []
    for path in sorted(package.rglob("*.py")):
        tree = ast.parse(path.read_text())
        for func in [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]:
            for node in ast.walk(func):
                names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                         [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
                if any(n.startswith("torch.distributed.checkpoint") for n in names):
                    places.append(f"{path.name}:{func.name}")
                if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "load_dcp_trusting_pickle":
                    callers.append(f"{path.name}:{func.name}")
        top_level = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
        for node in top_level:
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            assert not any(n.startswith("torch.distributed.checkpoint") for n in names), path.name
    assert places == ["checkpoint.py:load_dcp_trusting_pickle"]
    assert callers == ["run.py:export_run"]
