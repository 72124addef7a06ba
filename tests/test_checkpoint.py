"""Checkpoints: exact round trip, damage detection and fallback, pruning, exact resume, and eval by hand."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from helpers import read_jsonl, tiny_config, write_corpus
from lmlab.checkpoint import (
    checkpoint_dirs, latest_good_checkpoint, load_checkpoint, save_checkpoint, verify_checkpoint,
)
from lmlab.common import LmlabError
from lmlab.evaluate import evaluate
from lmlab.loss import cross_entropy
from lmlab.model import Bigram, ModelConfig, build_model
from lmlab.optim import OptimConfig, build_optimizer
from lmlab.train import train

VOCAB = 11


def _model_and_optimizer(seed: int, optimizer: str = "adamw", **model_kw):
    torch.manual_seed(seed)
    cfg = ModelConfig(block_size=8, n_layer=2, n_head=2, n_embd=16, **model_kw)
    model = build_model(cfg, VOCAB)
    opt = build_optimizer(model, OptimConfig(optimizer=optimizer, lr=1e-2, weight_decay=0.1))
    return model, opt


def _train_steps(model, opt, n: int, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        x = torch.randint(VOCAB, (4, 8), generator=g)
        y = torch.randint(VOCAB, (4, 8), generator=g)
        loss = cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def _rng() -> dict[str, torch.Tensor]:
    return {"torch": torch.get_rng_state(), "sampler": torch.Generator().manual_seed(42).get_state()}


def _assert_same_optimizer_state(a: torch.optim.Optimizer, b: torch.optim.Optimizer) -> None:
    sa, sb = a.state_dict(), b.state_dict()

    def plain(groups):  # JSON has no tuples: (0.9, 0.95) comes back as [0.9, 0.95], which is the same setting
        return [{k: list(v) if isinstance(v, tuple) else v for k, v in g.items()} for g in groups]

    assert plain(sa["param_groups"]) == plain(sb["param_groups"])
    assert sa["state"].keys() == sb["state"].keys()
    assert len(sa["state"]) > 0
    for idx in sa["state"]:
        assert sa["state"][idx].keys() == sb["state"][idx].keys()
        for key, va in sa["state"][idx].items():
            vb = sb["state"][idx][key]
            if isinstance(va, torch.Tensor):
                assert isinstance(vb, torch.Tensor) and va.dtype == vb.dtype
                assert torch.equal(va, vb), (idx, key)
            else:
                assert va == vb, (idx, key)


@pytest.mark.parametrize("optimizer,model_kw", [
    ("adamw", {}),
    ("adamw", {"tie_embeddings": True, "pos": "learned", "norm": "layernorm", "bias": True}),
    ("momentum", {}),
    ("muon", {}),
])
def test_checkpoint_round_trip(tmp_path, optimizer, model_kw):
    model, opt = _model_and_optimizer(0, optimizer, **model_kw)
    _train_steps(model, opt, 3)
    rng = _rng()
    path = save_checkpoint(tmp_path, 3, model, opt, rng, {"tokens": 96, "elapsed_s": 1.25, "best_val_loss": 2.5})
    assert path == tmp_path / "checkpoints" / "step_00000003"

    fresh, fresh_opt = _model_and_optimizer(1, optimizer, **model_kw)
    assert any(not torch.equal(p, q) for p, q in zip(model.state_dict().values(), fresh.state_dict().values()))
    ckpt = load_checkpoint(path, fresh, fresh_opt)
    assert ckpt.step == 3
    assert ckpt.state["tokens"] == 96 and ckpt.state["elapsed_s"] == 1.25 and ckpt.state["best_val_loss"] == 2.5
    assert set(ckpt.rng) == set(rng) and all(torch.equal(ckpt.rng[k], rng[k]) for k in rng)

    sd, fresh_sd = model.state_dict(), fresh.state_dict()
    assert sd.keys() == fresh_sd.keys()
    for name in sd:
        assert torch.equal(sd[name], fresh_sd[name]), name
    if model_kw.get("tie_embeddings"):
        assert fresh.lm_head.weight.data_ptr() == fresh.wte.weight.data_ptr()  # still tied after loading
    _assert_same_optimizer_state(opt, fresh_opt)

    # Continuing both from here gives bit-identical parameters.
    _train_steps(model, opt, 2, seed=5)
    _train_steps(fresh, fresh_opt, 2, seed=5)
    for (name, p), q in zip(model.named_parameters(), fresh.parameters()):
        assert torch.equal(p, q), name


def test_checkpoint_of_other_model_shape_is_an_error(tmp_path):
    model, opt = _model_and_optimizer(0)
    _train_steps(model, opt, 1)
    path = save_checkpoint(tmp_path, 1, model, opt, _rng(), {"tokens": 0, "elapsed_s": 0.0})
    torch.manual_seed(0)
    other = build_model(ModelConfig(block_size=8, n_layer=1, n_head=2, n_embd=16), VOCAB)
    with pytest.raises(LmlabError):
        load_checkpoint(path, other)


def _save_steps(run_dir: Path, steps, keep: int = 10):
    model, opt = _model_and_optimizer(0)
    for step in steps:
        _train_steps(model, opt, 1, seed=step)
        save_checkpoint(run_dir, step, model, opt, _rng(), {"tokens": step, "elapsed_s": 0.0}, keep=keep)
    return model, opt


def _flip_byte(path: Path, where: float = 0.5) -> None:
    raw = bytearray(path.read_bytes())
    i = int(len(raw) * where)
    raw[i] ^= 0xFF
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("damage", ["flip-model", "flip-optimizer", "truncate-model", "delete-state", "bad-state-json"])
def test_damaged_checkpoint_is_detected_and_previous_one_used(tmp_path, damage):
    _save_steps(tmp_path, [10, 20])
    newest = tmp_path / "checkpoints" / "step_00000020"
    if damage == "flip-model":
        _flip_byte(newest / "model.safetensors")
    elif damage == "flip-optimizer":
        _flip_byte(newest / "optimizer.safetensors", 0.9)
    elif damage == "truncate-model":
        raw = (newest / "model.safetensors").read_bytes()
        (newest / "model.safetensors").write_bytes(raw[: len(raw) // 2])
    elif damage == "delete-state":
        (newest / "state.json").unlink()
    else:
        (newest / "state.json").write_text('{"step": 20, "files": ')
    with pytest.raises(LmlabError):
        verify_checkpoint(newest)
    model, opt = _model_and_optimizer(3)
    with pytest.raises(LmlabError):
        load_checkpoint(newest, model, opt)
    warnings = []
    good = latest_good_checkpoint(tmp_path, warn=warnings.append)
    assert good == tmp_path / "checkpoints" / "step_00000010"
    assert len(warnings) == 1 and "step_00000020" in warnings[0]
    assert load_checkpoint(good, model, opt).step == 10


def test_no_good_checkpoint_gives_none(tmp_path):
    assert latest_good_checkpoint(tmp_path, warn=lambda m: None) is None
    _save_steps(tmp_path, [5])
    _flip_byte(tmp_path / "checkpoints" / "step_00000005" / "model.safetensors")
    assert latest_good_checkpoint(tmp_path, warn=lambda m: None) is None


def test_keep_prunes_old_checkpoints_and_leaves_no_temporary_files(tmp_path):
    _save_steps(tmp_path, [1, 2, 3, 4, 5, 10], keep=2)
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["step_00000005", "step_00000010"]
    assert [p.name for p in checkpoint_dirs(tmp_path)] == ["step_00000005", "step_00000010"]
    for d in root.iterdir():
        assert sorted(p.name for p in d.iterdir()) == ["model.safetensors", "optimizer.safetensors", "state.json"]
        verify_checkpoint(d)
    # saving the same step again replaces it cleanly
    _save_steps(tmp_path, [10], keep=2)
    assert sorted(p.name for p in root.iterdir()) == ["step_00000005", "step_00000010"]


def test_checkpoint_dirs_sorts_numerically_and_ignores_others(tmp_path):
    root = tmp_path / "checkpoints"
    for name in ["step_00000900", "step_00010000", "step_00001000", ".step_00020000.abc.tmp", "step_x", "notes"]:
        (root / name).mkdir(parents=True)
    assert [p.name for p in checkpoint_dirs(tmp_path)] == ["step_00000900", "step_00001000", "step_00010000"]


# ---------------------------------------------------------------------------------------------------------------
# Exact resume

N = 15


def _config(data, out, **kw):
    # constant schedule with warmup (so the learning rate does not depend on the step budget), dropout on (so the
    # global torch RNG matters), evaluation every 5 steps.
    base = dict(max_steps=2 * N, eval_interval=5, model_dropout=0.1, optim_schedule="constant", optim_warmup=5,
                seed=3)
    base.update(kw)
    return tiny_config(data, out, **base)


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    """Run A: 2N steps in one go (checkpoints every 10 steps, which does not change the training)."""
    root = tmp_path_factory.mktemp("resume")
    corpus = write_corpus(root / "corpus.txt", 200, seed=4)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LMLAB_CACHE", str(tmp_path_factory.mktemp("cache")))
        train(_config(corpus, root / "A", checkpoint_interval=10))
    return corpus, root / "A"


def _records(run_dir: Path):
    records = read_jsonl(run_dir / "metrics.jsonl")
    train_keys = ("step", "tokens", "train_loss", "lr", "grad_norm")
    val_keys = ("step", "tokens", "val_loss", "val_accuracy", "val_bits_per_byte", "val_tokens")
    trains = [tuple(r[k] for k in train_keys) for r in records if "train_loss" in r]
    vals = [tuple(r[k] for k in val_keys) for r in records if "val_loss" in r]
    return trains, vals


def _final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(checkpoint_dirs(run_dir)[-1] / "model.safetensors"))


@pytest.mark.slow
def test_exact_resume_matches_an_uninterrupted_run(reference_run, tmp_path):
    corpus, run_a = reference_run
    run_b = tmp_path / "B"
    first = train(_config(corpus, run_b, max_steps=N))
    assert first["steps"] == N
    second = train(_config(corpus, "", resume=str(run_b), max_steps=2 * N))
    assert second["steps"] == 2 * N

    trains_a, vals_a = _records(run_a)
    trains_b, vals_b = _records(run_b)
    assert [t[0] for t in trains_a] == list(range(1, 2 * N + 1))
    assert [v[0] for v in vals_a] == [0, 5, 10, 15, 20, 25, 30]
    assert trains_b == trains_a  # exactly equal floats: same batches, same dropout masks, same optimizer state
    assert vals_b == vals_a
    assert len({t[2] for t in trains_a}) > 1

    wa, wb = _final_weights(run_a), _final_weights(run_b)
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_resume_after_losing_the_last_checkpoint_replays_exactly(reference_run, tmp_path):
    """A damaged newest checkpoint: resume falls back to the one before and the log is cut back to it."""
    corpus, run_a = reference_run
    run_c = tmp_path / "C"
    shutil.copytree(run_a, run_c)
    (run_c / ".lock").unlink(missing_ok=True)
    # every 10 steps, and at each new best evaluation (every 5 steps here): the newest 3 are kept
    assert [p.name for p in checkpoint_dirs(run_c)] == ["step_00000020", "step_00000025", "step_00000030"]
    _flip_byte(run_c / "checkpoints" / "step_00000030" / "model.safetensors")
    summary = train(_config(corpus, "", resume=str(run_c), checkpoint_interval=10))
    assert summary["steps"] == 2 * N
    assert _records(run_c) == _records(run_a)  # records after step 25 were dropped and written again, identically
    wa, wc = _final_weights(run_a), _final_weights(run_c)
    assert all(torch.equal(wa[k], wc[k]) for k in wa)


def test_resume_with_other_model_settings_is_refused(reference_run, tmp_path):
    corpus, run_a = reference_run
    run_c = tmp_path / "C"
    shutil.copytree(run_a, run_c)
    before = (run_c / "metrics.jsonl").read_bytes()
    with pytest.raises(LmlabError, match="model settings"):
        train(_config(corpus, "", resume=str(run_c), model_n_embd=32))
    assert (run_c / "metrics.jsonl").read_bytes() == before


def test_settings_changed_on_resume_take_effect(reference_run, tmp_path, capsys):
    """`lmlab train --resume RUN --lr X --weight-decay W --max-time T`: training goes on at the new learning rate
    (each logged lr = X times the schedule's multiplier), and config.json and the optimizer hold X, W and T."""
    import json

    from lmlab.cli import main
    from lmlab.optim import lr_multiplier

    corpus, run_a = reference_run
    run = tmp_path / "R"
    shutil.copytree(run_a, run)
    shutil.rmtree(run / "checkpoints" / "step_00000030")
    start = int(checkpoint_dirs(run)[-1].name[5:])  # the newest left (25: the best evaluations have checkpoints)
    new_lr, new_wd, new_time = 7e-4, 0.03, 1e6
    rc = main(["train", "--resume", str(run), "--lr", str(new_lr), "--weight-decay", str(new_wd), "--max-time",
               str(new_time), "--schedule", "cosine", "--no-progress", "--data", str(corpus)])  # a copy: --data
    assert rc == 0, capsys.readouterr().err
    config = json.loads((run / "config.json").read_text())
    assert (config["optim"]["lr"], config["optim"]["weight_decay"], config["max_time"]) == (new_lr, new_wd, new_time)
    resumed = [r for r in read_jsonl(run / "metrics.jsonl") if "train_loss" in r and r["step"] > start]
    assert [r["step"] for r in resumed] == list(range(start + 1, 2 * N + 1))
    for r in resumed:  # progress is the share of the step budget done (the time budget is far away)
        multiplier = lr_multiplier("cosine", r["step"] - 1, (r["step"] - 1) / (2 * N), 5, 0.4, 0.0, 0.1)
        assert r["lr"] == pytest.approx(new_lr * multiplier, rel=1e-9), r
    groups = json.loads((checkpoint_dirs(run)[-1] / "state.json").read_text())["optimizer"]["param_groups"]
    assert {g["lr"] for g in groups} == {resumed[-1]["lr"]}  # the last step's: new_lr times the multiplier
    assert {g["weight_decay"] for g in groups} == {new_wd, 0.0}  # matrices decay; norms and biases never do


@pytest.mark.parametrize("option,value", [("--seed", "4"), ("--tokenizer", "byte"), ("--optimizer", "sgd"),
                                          ("--preset", "small")])
def test_settings_that_cannot_change_on_resume_are_refused(reference_run, tmp_path, capsys, option, value):
    from lmlab.cli import main

    corpus, run_a = reference_run
    run = tmp_path / "R"
    shutil.copytree(run_a, run)
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    rc = main(["train", "--resume", str(run), option, value, "--no-progress", "--data", str(corpus)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and option in err[0] and "cannot change on resume" in err[0], err
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


# ---------------------------------------------------------------------------------------------------------------
# Evaluation checked by hand

TABLE = [
    [2.0, 0.5, -1.0, 0.0, 1.0],
    [0.0, 0.0, 3.0, -2.0, 0.5],
    [1.5, -0.5, 0.0, 2.5, 0.0],
    [-1.0, 2.0, 0.5, 0.0, 1.0],
    [0.3, 0.1, 0.2, 0.4, 1.2],
]
TOKENS = [0, 1, 2, 3, 1, 2, 0, 4, 4, 3, 1, 0, 2]
BYTES = [1, 2, 3, 1, 4]


def _bigram() -> Bigram:
    model = Bigram(ModelConfig(arch="bigram", block_size=5), len(TABLE))
    with torch.no_grad():
        model.table.weight.copy_(torch.tensor(TABLE))
    return model


def _by_hand(tokens: list[int]) -> dict:
    nats, correct, nbytes = 0.0, 0, 0
    for cur, nxt in zip(tokens[:-1], tokens[1:]):
        row = TABLE[cur]
        log_norm = math.log(sum(math.exp(v) for v in row))
        nats += log_norm - row[nxt]
        correct += int(max(range(len(row)), key=row.__getitem__) == nxt)
        nbytes += BYTES[nxt]
    n = len(tokens) - 1
    return {"loss": nats / n, "accuracy": correct / n, "bits_per_byte": nats / math.log(2) / nbytes,
            "perplexity": math.exp(nats / n), "tokens": n, "bytes": nbytes}


@pytest.mark.parametrize("block_size", [5, 4, 1, 12, 50])
@pytest.mark.parametrize("batch_size", [1, 2, 32])
def test_evaluate_matches_a_hand_computation(block_size, batch_size):
    model = _bigram()
    tokens = np.array(TOKENS, dtype=np.uint16)
    m = evaluate(model, tokens, torch.tensor(BYTES), block_size=block_size, batch_size=batch_size)
    expected = _by_hand(TOKENS)
    assert m.tokens == expected["tokens"] == 12
    assert m.bytes == expected["bytes"]
    assert m.loss == pytest.approx(expected["loss"], rel=1e-6)
    assert m.accuracy == pytest.approx(expected["accuracy"], abs=1e-12)
    assert m.bits_per_byte == pytest.approx(expected["bits_per_byte"], rel=1e-6)
    assert m.perplexity == pytest.approx(expected["perplexity"], rel=1e-6)
    assert m.bits_per_token == pytest.approx(expected["loss"] / math.log(2), rel=1e-6)


@pytest.mark.parametrize("max_tokens", [1, 5, 11, 12, 100])
def test_evaluate_max_tokens_is_a_prefix(max_tokens):
    m = evaluate(_bigram(), np.array(TOKENS, dtype=np.uint16), torch.tensor(BYTES), block_size=5, batch_size=2,
                 max_tokens=max_tokens)
    n_pred = min(max_tokens, len(TOKENS) - 1)
    expected = _by_hand(TOKENS[: n_pred + 1])
    assert m.tokens == n_pred
    assert m.loss == pytest.approx(expected["loss"], rel=1e-6)
    assert m.accuracy == pytest.approx(expected["accuracy"], abs=1e-12)
    assert m.bits_per_byte == pytest.approx(expected["bits_per_byte"], rel=1e-6)


def test_evaluate_restores_training_mode():
    model = _bigram()
    model.train()
    evaluate(model, np.array(TOKENS, dtype=np.uint16), torch.tensor(BYTES), block_size=5)
    assert model.training
    model.eval()
    evaluate(model, np.array(TOKENS, dtype=np.uint16), torch.tensor(BYTES), block_size=5)
    assert not model.training
