"""Data-parallel training with torchrun on CPU (gloo, 2 processes): DDP and FSDP2 against one process.

The oracle is the one-process run with the same global batch: the sampler gives rank r of N the chunks a one-process
run would see, so the losses must agree to float rounding, and checkpoints must resume at any world size.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from helpers import HANG_S, write_corpus

pytestmark = [pytest.mark.dist, pytest.mark.slow]  # every test here

ARGS = [
    "--tokenizer", "char", "--n-layer", "2", "--n-head", "2", "--n-embd", "32", "--block-size", "32",
    "--max-steps", "20", "--max-time", "0", "--eval-interval", "10", "--checkpoint-interval", "10",
    "--sample-tokens", "0", "--no-progress", "--no-tensorboard", "--trajectory-snapshots", "0",
]


def _env(cache: Path) -> dict:
    env = dict(os.environ, LMLAB_CACHE=str(cache), OMP_NUM_THREADS="1")
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LMLAB_TEST_KILL"):
        env.pop(name, None)
    return env


def _train(cwd: Path, cache: Path, nproc: int, *args: str, extra_env: dict | None = None, torchrun_args=(),
           timeout: float = HANG_S) -> subprocess.CompletedProcess:
    """`lmlab train` in 1 plain process (nproc 0) or under torchrun with nproc processes."""
    if nproc:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
               *torchrun_args, "-m", "lmlab", "train", *args]
    else:
        cmd = [sys.executable, "-m", "lmlab", "train", *args]
    env = {**_env(cache), **(extra_env or {})}
    if "LMLAB_TEST_KILL" in env:  # tests/sitecustomize.py does the killing, in the processes torchrun starts
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).parent), env.get("PYTHONPATH")]))
    return _run(cmd, cwd, env, timeout)


def _run(cmd: list[str], cwd: Path, env: dict, timeout: float) -> subprocess.CompletedProcess:
    """Run in a new session, so a timeout kills torchrun's workers too instead of leaving them running."""
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"{' '.join(cmd[:8])} ... ran over {timeout} s:\n{err[-3000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _records(run: Path) -> tuple[list[dict], list[dict]]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r for r in rows if "train_loss" in r], [r for r in rows if "val_loss" in r]


def _assert_close(a: list[float], b: list[float], rel: float) -> None:
    assert len(a) == len(b) and a, (len(a), len(b))
    for i, (x, y) in enumerate(zip(a, b)):
        assert abs(x - y) <= rel * abs(y), (i, x, y)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    write_corpus(root / "corpus.txt", 400)
    return root


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("dist-cache")


@pytest.fixture(scope="module")
def reference(workdir, cache):
    """One plain process, global batch 8, 20 steps, checkpoints at steps 10 and 20."""
    _ok(_train(workdir, cache, 0, "--data", "corpus.txt", *ARGS, "--batch-size", "8", "--out", "ref"))
    return workdir / "ref"


@pytest.fixture(scope="module")
def fsdp_run(workdir, cache):
    """2 FSDP processes, micro-batch 4, trained once for two tests: the run ("two-to-one", which the resume test
    resumes with 1 process) and its torchrun process; "fsdp-4-4" is a copy of the run as it finished."""
    proc = _ok(_train(workdir, cache, 2, "--data", "corpus.txt", *ARGS, "--batch-size", "4", "--parallel", "fsdp",
                      "--out", "two-to-one"))
    shutil.copytree(workdir / "two-to-one", workdir / "fsdp-4-4")
    return proc


@pytest.mark.parametrize("strategy,batch", [
    ("ddp", ["--batch-size", "4"]),
    ("fsdp", ["--batch-size", "4"]),
    ("ddp", ["--global-batch", "8", "--batch-size", "2"]),  # 2 processes x 2 x 2 accumulation steps
], ids=["ddp", "fsdp", "ddp-accumulation"])
def test_two_processes_match_one_process(workdir, cache, reference, strategy, batch, request):
    out = f"{strategy}-{batch[1]}-{batch[-1]}"
    if out == "fsdp-4-4":  # the run the resume test starts from
        proc = request.getfixturevalue("fsdp_run")
    else:
        proc = _ok(_train(workdir, cache, 2, "--data", "corpus.txt", *ARGS, *batch, "--parallel", strategy, "--out",
                          out))
    accum = 2 if "--global-batch" in batch else 1
    assert (f"global batch 8 sequences = 2 processes x {batch[-1]} micro-batch x {accum} accumulation steps"
            in proc.stderr)
    train, val = _records(workdir / out)
    ref_train, ref_val = _records(reference)
    assert [r["step"] for r in train] == list(range(1, 21))  # rank 0 alone writes the log: no duplicates
    _assert_close([train[0]["train_loss"]], [ref_train[0]["train_loss"]], 1e-5)  # the first step's loss
    _assert_close([r["train_loss"] for r in train], [r["train_loss"] for r in ref_train], 1e-4)
    _assert_close([r["grad_norm"] for r in train], [r["grad_norm"] for r in ref_train], 1e-3)
    # evaluation is split over the ranks and summed: the same tokens, the same loss
    assert [r["val_tokens"] for r in val] == [r["val_tokens"] for r in ref_val]
    _assert_close([r["val_loss"] for r in val], [r["val_loss"] for r in ref_val], 1e-4)
    assert len((workdir / out / "probes.jsonl").read_text().splitlines()) == len(ref_val)
    status = json.loads((workdir / out / "status.json").read_text())
    assert status["status"] == "finished"


def test_checkpoints_resume_across_world_sizes(workdir, cache, reference, fsdp_run):
    ref_train, _ = _records(reference)
    tail = [r["train_loss"] for r in ref_train[10:]]

    # 2 processes with FSDP write sharded checkpoints (fsdp_run); 1 plain process resumes from the one at step 10
    step10 = workdir / "two-to-one" / "checkpoints" / "step_00000010"
    assert sorted(p.name for p in step10.iterdir()) == [
        "rng.safetensors", "shard_00000.safetensors", "shard_00001.safetensors", "state.json"]
    _assert_data_only(workdir / "two-to-one")
    shutil.copytree(workdir / "two-to-one", workdir / "two-to-two")
    shutil.rmtree(workdir / "two-to-one" / "checkpoints" / "step_00000020")
    _ok(_train(workdir, cache, 0, "--resume", "two-to-one", "--batch-size", "8"))
    train, _ = _records(workdir / "two-to-one")
    assert [r["step"] for r in train] == list(range(1, 21))
    _assert_close([r["train_loss"] for r in train[10:]], tail, 1e-4)

    # 2 FSDP processes resume from the sharded checkpoint at step 10
    shutil.rmtree(workdir / "two-to-two" / "checkpoints" / "step_00000020")
    # (a copy is not the run made there: it names its data again)
    _ok(_train(workdir, cache, 2, "--resume", "two-to-two", "--parallel", "fsdp", "--batch-size", "4", "--data",
               "corpus.txt"))
    train, _ = _records(workdir / "two-to-two")
    assert [r["step"] for r in train] == list(range(1, 21))
    _assert_close([r["train_loss"] for r in train[10:]], tail, 1e-4)
    _assert_data_only(workdir / "two-to-two")

    # 1 plain process wrote a single-file checkpoint at step 10; 2 FSDP processes resume from it
    one_fsdp = workdir / "one-to-two-fsdp"
    shutil.copytree(reference, one_fsdp)
    shutil.rmtree(one_fsdp / "checkpoints" / "step_00000020")
    _ok(_train(workdir, cache, 2, "--resume", "one-to-two-fsdp", "--parallel", "fsdp", "--batch-size", "4", "--data",
               "corpus.txt"))
    train, _ = _records(one_fsdp)
    _assert_close([r["train_loss"] for r in train[10:]], tail, 1e-4)

    # 1 plain process wrote a single-file checkpoint at step 10; 2 DDP processes resume from it
    one = workdir / "one-to-two"
    shutil.copytree(reference, one)
    shutil.rmtree(one / "checkpoints" / "step_00000020")
    _ok(_train(workdir, cache, 2, "--resume", "one-to-two", "--parallel", "ddp", "--batch-size", "4", "--data",
               "corpus.txt"))
    train, _ = _records(one)
    assert [r["step"] for r in train] == list(range(1, 21))
    _assert_close([r["train_loss"] for r in train[10:]], tail, 1e-4)

    # a sharded run is readable for eval without any process group, and exports to a single-file run
    ev = _run([sys.executable, "-m", "lmlab", "eval", "two-to-one", "--json", "--stride", "32"], workdir, _env(cache),
              120)
    assert ev.returncode == 0, ev.stderr
    _, val = _records(workdir / "two-to-one")
    assert abs(json.loads(ev.stdout)["loss"] - val[-1]["val_loss"]) < 1e-4


def _assert_data_only(run: Path) -> None:
    """Every file of a run is JSON, JSONL, text or a safetensors file: never a pickle or a torch.save zip."""
    from safetensors import safe_open

    files = [p for p in run.rglob("*") if p.is_file() and "tensorboard" not in p.parts and p.name != ".lock"]
    assert files
    for path in files:
        head = path.read_bytes()[:2]
        assert head not in (b"\x80\x02", b"\x80\x04", b"\x80\x05", b"PK"), path  # pickle or zip
        if path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt") as f:
                assert list(f.keys()), path
        elif path.suffix == ".json":
            json.loads(path.read_text())
        elif path.suffix == ".jsonl":
            for line in path.read_text().splitlines():
                json.loads(line)
        else:
            assert path.suffix == ".txt", path
            path.read_text()


def test_a_killed_rank_ends_the_job_within_the_timeout(workdir, cache):
    start = time.monotonic()
    proc = _train(workdir, cache, 2, "--data", "corpus.txt", *ARGS, "--batch-size", "4", "--parallel", "ddp",
                  "--dist-timeout", "30", "--out", "killed", extra_env={"LMLAB_TEST_KILL": "1:5"})
    elapsed = time.monotonic() - start
    assert proc.returncode != 0
    # not a speed check: the default --dist-timeout is 300 s, so ending before it shows that 30 s was applied (the
    # start and 5 steps take seconds, even on a slow machine)
    assert elapsed < 300, elapsed
    assert "lost contact with the other processes" in proc.stderr
    assert json.loads((workdir / "killed" / "status.json").read_text())["status"] == "failed"


def test_elastic_restart_resumes_from_the_last_checkpoint(workdir, cache, reference):
    proc = _ok(_train(workdir, cache, 2, "--data", "corpus.txt", *ARGS, "--batch-size", "4", "--parallel", "fsdp",
                      "--out", "elastic", extra_env={"LMLAB_TEST_KILL": "1:13"}, torchrun_args=["--max-restarts", "1"]))
    assert "restart 1: resuming elastic" in proc.stderr
    assert "resuming elastic from step_00000010" in proc.stderr
    train, _ = _records(workdir / "elastic")
    ref_train, _ = _records(reference)
    assert [r["step"] for r in train] == list(range(1, 21))  # the steps after the checkpoint were cut and redone
    _assert_close([r["train_loss"] for r in train], [r["train_loss"] for r in ref_train], 1e-4)

    # the sharded run exports to single files holding the same weights, loadable without a process group
    from lmlab.run import export_run, load_run

    exported = export_run(workdir / "elastic", workdir / "elastic-single")
    assert sorted(p.name for p in exported.iterdir()) == ["model.safetensors", "optimizer.safetensors", "state.json"]
    sharded, single = load_run(workdir / "elastic").model, load_run(workdir / "elastic-single").model
    for (name, a), b in zip(sharded.state_dict().items(), single.state_dict().values()):
        assert torch.equal(a, b), name


NO_SYNC_SCRIPT = textwrap.dedent("""
    import torch
    from lmlab import distributed as D
    from lmlab.loss import cross_entropy
    from lmlab.model import ModelConfig, build_model

    d = D.setup("{strategy}", torch.device("cpu"), 60)
    torch.manual_seed(0)
    reference = build_model(ModelConfig(n_layer=1, n_head=2, n_embd=16, block_size=8), 20)
    model = build_model(ModelConfig(n_layer=1, n_head=2, n_embd=16, block_size=8), 20)
    model.load_state_dict(reference.state_dict())
    model = D.wrap(model, d, torch.device("cpu"))
    calls = []
    if d.strategy == "ddp":
        def hook(state, bucket):
            calls.append(1)
            fut = torch.futures.Future()
            fut.set_result(bucket.buffer())
            return fut
        model.register_comm_hook(None, hook)
    batches = [torch.randint(0, 20, (2, 8)) for _ in range(3)]
    for i, x in enumerate(batches):
        last = i == len(batches) - 1
        with D.no_sync(model, d, last_micro_step=last):
            loss = cross_entropy(model(x), x)
            (loss / 3).backward()
        if d.strategy == "fsdp" and not last:  # nothing reduced yet: the sharded gradients are still empty
            assert all(p.grad is None for p in model.parameters()), "fsdp reduced on a micro-step"
        ref_loss = cross_entropy(reference(x), x)
        (ref_loss / 3).backward()
    for (name, p), q in zip(D.unwrap(model).named_parameters(), reference.parameters()):
        g = D.full_tensor(p.grad)
        assert torch.allclose(g, q.grad, atol=1e-6, rtol=1e-5), name
    print("hooks", len(calls))
    D.teardown(d)
""")


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_accumulation_reduces_gradients_only_on_the_last_micro_step(tmp_path, cache, strategy):
    script = tmp_path / "no_sync.py"
    script.write_text(NO_SYNC_SCRIPT.format(strategy=strategy))
    proc = _run([sys.executable, str(script)], tmp_path, _env(cache), 120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    hooks = int(proc.stdout.split("hooks")[1])
    if strategy == "ddp":
        # one all-reduce per gradient bucket on the last micro-step only; this tiny model fits one bucket
        assert hooks == 1
    else:
        assert hooks == 0


def test_an_error_on_rank_0_reaches_every_rank(workdir, cache, reference):
    """Rank 0 refuses to overwrite a run; the other rank must stop with it, not wait for the timeout."""
    start = time.monotonic()
    proc = _train(workdir, cache, 2, "--data", "corpus.txt", *ARGS, "--batch-size", "4", "--parallel", "ddp",
                  "--out", "ref")
    assert proc.returncode != 0 and time.monotonic() - start < 60
    assert proc.stderr.count("already holds a run") == 2  # one line from each rank


def test_bad_distributed_settings_are_one_line_errors(workdir, cache):
    proc = _train(workdir, cache, 0, "--data", "corpus.txt", *ARGS, "--global-batch", "7", "--batch-size", "2",
                  "--out", "bad-global")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("lmlab train: error: --global-batch 7 is not a multiple")
    assert "Traceback" not in proc.stderr
    env = {"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}
    proc = _train(workdir, cache, 0, "--data", "corpus.txt", *ARGS, "--out", "bad-world", extra_env=env)
    assert proc.returncode == 2 and "choose --parallel ddp or --parallel fsdp" in proc.stderr
    assert not (workdir / "bad-world").exists()
