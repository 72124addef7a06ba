"""--thread-split: one micro-batch's rows shared among threads. The oracle is the plain step: the whole batch's
backward in one thread (the same gradients up to rounding, checked in float64), and a run must stay reproducible bit
for bit from its seed and across a resume whichever thread finishes first."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from helpers import read_jsonl, tiny_config, write_corpus

from lmlab.common import LmlabError
from lmlab.loss import LossConfig, training_loss
from lmlab.model import ModelConfig, build_model
from lmlab.optim import OptimConfig, build_optimizer
from lmlab.threads import shared_backward, split_parts, step_threads
from lmlab.train import train, train_step

CPU = torch.device("cpu")


def _model(style: str = "gpt2") -> torch.nn.Module:
    """The GPT-2 block (one hand-written autograd function, fused.gpt2_block, in each thread), or the default one
    (rotary positions, RMSNorm, QK-norm, the ReLU² MLP's function)."""
    torch.manual_seed(0)
    cfg = dict(block_size=16, n_layer=2, n_head=2, n_embd=16)
    if style == "gpt2":
        cfg |= dict(norm="layernorm", mlp="gelu", pos="learned", qk_norm=False, bias=True)
    return build_model(ModelConfig(**cfg), 40).double()


def _batch(rows: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    w = torch.randint(0, 40, (rows, 17), generator=torch.Generator().manual_seed(seed))
    return w[:, :-1], w[:, 1:]


def _grads(model) -> list[torch.Tensor]:
    return [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("style", ["gpt2", "default"])
@pytest.mark.parametrize("parts", [2, 3])
def test_shared_backward_gives_the_whole_batchs_gradients(style, parts):
    model = _model(style)
    x, y = _batch(6)
    loss = training_loss(model(x), y, LossConfig())
    (loss * 0.5).backward()
    want, want_loss = _grads(model), loss.detach()
    model.zero_grad(set_to_none=True)
    got_loss = shared_backward(model, x, y, training_loss, LossConfig(), parts, 0.5)
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-13, atol=0)
    for g, w in zip(_grads(model), want):
        torch.testing.assert_close(g, w, rtol=1e-11, atol=1e-14)
    # a second micro-batch adds to what is there, as backward() does
    x2, y2 = _batch(6, seed=2)
    training_loss(model(x2), y2, LossConfig()).backward()
    want = _grads(model)
    model.zero_grad(set_to_none=True)
    shared_backward(model, x, y, training_loss, LossConfig(), parts, 0.5)
    shared_backward(model, x2, y2, training_loss, LossConfig(), parts, 1.0)
    for g, w in zip(_grads(model), want):
        torch.testing.assert_close(g, w, rtol=1e-11, atol=1e-14)


def test_shared_backward_is_the_same_bit_for_bit_every_time():
    model = _model()
    x, y = _batch(8)
    runs = []
    for _ in range(5):
        model.zero_grad(set_to_none=True)
        shared_backward(model, x, y, training_loss, LossConfig(), 2, 1.0)
        runs.append(_grads(model))
    for other in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(runs[0], other))


def test_train_step_with_a_split_takes_the_plain_step():
    x, y = _batch(4)
    results, weights = [], []
    for split in (1, 2):
        model = _model("default")
        opt = build_optimizer(model, OptimConfig(optimizer="adamw", lr=1e-2, weight_decay=0.1))
        for _ in range(3):
            results.append(train_step(model, opt, [(x, y), (y, x)], LossConfig(), 1.0, torch.autocast("cpu",
                                      enabled=False), split=split))
        weights.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(results[:3], results[3:]):
        assert a.loss == pytest.approx(b.loss, rel=1e-12) and a.grad_norm == pytest.approx(b.grad_norm, rel=1e-10)
    for a, b in zip(*weights):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_step_threads_gives_each_part_its_share_and_restores():
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(4)
        with step_threads(2) as share:
            assert share == 2 and torch.get_num_threads() == 2
        assert torch.get_num_threads() == 4
        with step_threads(8) as share:  # more parts than threads: one each
            assert share == 1 and torch.get_num_threads() == 1
        assert torch.get_num_threads() == 4
        with step_threads(1) as share:
            assert share == 4
    finally:
        torch.set_num_threads(before)


def test_split_parts_auto_and_its_refusals(tmp_path, monkeypatch):
    cfg = tiny_config(tmp_path / "c.txt", tmp_path / "out", model_dropout=0.0, compile=False, batch_size=4)
    f32 = torch.float32
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    assert split_parts(cfg, CPU, f32, 1) == 2
    assert split_parts(dataclasses.replace(cfg, batch_size=3), CPU, f32, 1) == 1  # does not divide: auto keeps 1
    assert split_parts(dataclasses.replace(cfg, stage="sft"), CPU, f32, 1) == 2  # packed conversations too
    for other, device, dtype, world in [
            (dataclasses.replace(cfg, compile=True), CPU, f32, 1),
            (dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, dropout=0.1)), CPU, f32, 1),
            (dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, attn_dropout=0.1)), CPU, f32, 1),
            (dataclasses.replace(cfg, stage="dpo"), CPU, f32, 1),
            (cfg, CPU, torch.bfloat16, 1), (cfg, torch.device("cuda"), f32, 1), (cfg, CPU, f32, 2)]:
        assert split_parts(other, device, dtype, world) == 1
        with pytest.raises(LmlabError, match="--thread-split 2 needs"):
            split_parts(dataclasses.replace(other, thread_split=2), device, dtype, world)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    assert split_parts(cfg, CPU, f32, 1) == 1  # one thread: nothing to share
    assert split_parts(dataclasses.replace(cfg, thread_split=2), CPU, f32, 1) == 2  # asked for: two threads anyway
    with pytest.raises(LmlabError, match="--thread-split 3 must divide --batch-size 4"):
        split_parts(dataclasses.replace(cfg, thread_split=3), CPU, f32, 1)


@pytest.mark.slow
def test_a_split_run_is_reproducible_and_resumes_exactly(tmp_path):
    corpus = write_corpus(tmp_path / "corpus.txt", 200, seed=4)

    def config(out, **kw):
        return tiny_config(corpus, tmp_path / out, **({"thread_split": 2, "model_dropout": 0.0, "max_steps": 20,
                                                       "checkpoint_interval": 10, "eval_interval": 5, "seed": 3,
                                                       "model_tie_embeddings": True} | kw))  # a weight used twice

    train(config("A"))
    train(config("B"))
    train(config("C", max_steps=10))
    train(dataclasses.replace(config("C"), out="", resume=str(tmp_path / "C")))
    logs = {name: [(r["step"], r.get("train_loss"), r.get("val_loss")) for r in read_jsonl(tmp_path / name /
                                                                                         "metrics.jsonl")
                   if "train_loss" in r or "val_loss" in r] for name in "ABC"}
    assert len(logs["A"]) > 20 and logs["A"] == logs["B"] == logs["C"]
    plain = config("D", thread_split=1)
    train(plain)
    ours = [r for r in read_jsonl(tmp_path / "A" / "metrics.jsonl") if "val_loss" in r]
    theirs = [r for r in read_jsonl(tmp_path / "D" / "metrics.jsonl") if "val_loss" in r]
    assert [r["val_loss"] for r in ours] == pytest.approx([r["val_loss"] for r in theirs], rel=1e-4)


def test_cli_refuses_a_split_the_step_cannot_take_before_writing_anything(tmp_path, capsys, monkeypatch):
    """In process (the refusals come before anything is set up): exit 2 and one error line, no run folder."""
    from lmlab.cli import main

    monkeypatch.setenv("LMLAB_CACHE", str(tmp_path / "cache"))
    corpus = write_corpus(tmp_path / "corpus.txt", 50, seed=1)
    for args, message in [(["--thread-split", "2", "--dropout", "0.1"], "--thread-split 2 needs no dropout"),
                          (["--thread-split", "3"], "--thread-split 3 must divide --batch-size 4"),
                          (["--thread-split", "-1"], "--thread-split must be >= 0")]:
        rc = main(["train", "--data", str(corpus), "--out", str(tmp_path / "run"), "--max-steps", "2",
                   "--batch-size", "4", "--n-layer", "1", "--n-embd", "16", "--n-head", "2", "--block-size", "16",
                   "--no-compile", *args])
        err = capsys.readouterr().err
        assert rc == 2 and "Traceback" not in err, err
        assert err.strip().count("\n") == 0 and message in err, err
        assert not (tmp_path / "run").exists()


def test_the_bench_times_the_step_as_training_shares_it(monkeypatch):
    """lmlab bench's step (bench.measure.training_step) takes split_parts' answer, as the loop does."""
    import lmlab.train
    from lmlab.bench.measure import training_step

    calls = []
    real = lmlab.train.shared_backward
    monkeypatch.setattr(lmlab.train, "shared_backward", lambda *a: calls.append(a[5]) or real(*a))
    with monkeypatch.context() as m:
        m.setattr(torch, "get_num_threads", lambda: 2)
        step, _, cfg = training_step("nanogpt-char-cpu", CPU, torch.float32, False)
    assert cfg.batch_size % 2 == 0
    step(0)
    assert calls == [2]
    plain, _, _ = training_step("nanogpt-char-cpu", CPU, torch.float32, False, split=1)
    plain(0)
    assert calls == [2]


@pytest.mark.parametrize("n_layer", [1, 3])
def test_muon_orthogonalises_its_stacks_in_parts_as_it_does_whole(n_layer):
    """share_optimizer: Muon's stacks cut among the threads give the update of the whole stacks (one layer: stacks
    of one matrix stay whole; three layers and three parts: a stack of six cut in three)."""
    from lmlab.threads import share_optimizer

    models = []
    for parts in (1, 2, 3):
        torch.manual_seed(0)
        model = build_model(ModelConfig(block_size=16, n_layer=n_layer, n_head=2, n_embd=16), 40).double()
        opt = build_optimizer(model, OptimConfig(optimizer="muon", lr=1e-2, muon_lr=0.05, muon_momentum=0.95,
                                                 weight_decay=0.1))
        share_optimizer(opt, parts)
        assert (opt.run_parts is None) == (parts == 1)
        for seed in range(3):
            x, y = _batch(4, seed)
            training_loss(model(x), y, LossConfig()).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        models.append(model)
    for other in models[1:]:
        for a, b in zip(models[0].parameters(), other.parameters()):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_cut_keeps_every_tensor_once_in_order_in_runs_of_about_equal_size(monkeypatch):
    """optim.cut: runs in order that cover every index once, no more runs than parts or than SHARE_FROM-sized
    shares, the largest run no bigger than an even share plus one tensor."""
    from lmlab import optim

    monkeypatch.setattr(optim, "SHARE_FROM", 100)
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        sizes = torch.randint(1, 400, (int(torch.randint(1, 12, (1,), generator=g)),), generator=g).tolist()
        tensors = [torch.zeros(n) for n in sizes]
        for parts in (1, 2, 3):
            runs = optim.cut(tensors, parts)
            assert [i for run in runs for i in run] == list(range(len(sizes))) and all(runs)
            assert len(runs) <= min(parts, max(1, sum(sizes) // 100))
            assert max(sum(sizes[i] for i in run) for run in runs) <= sum(sizes) / len(runs) + max(sizes)
    assert optim.cut([torch.zeros(150), torch.zeros(20)], 2) == [[0, 1]]  # 170 elements: one share of 100


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_the_update_cut_among_threads_is_the_same_bit_for_bit(monkeypatch, optimizer):
    """share_optimizer: AdamW's fused update (AdamW's part of Muon too) cut among two or three threads gives the
    one-thread weights exactly."""
    from lmlab import optim
    from lmlab.threads import share_optimizer

    monkeypatch.setattr(optim, "SHARE_FROM", 64)  # the test's small model is cut too
    results = []
    for parts in (1, 2, 3):
        torch.manual_seed(0)
        model = build_model(ModelConfig(block_size=16, n_layer=2, n_head=2, n_embd=16), 40)
        opt = build_optimizer(model, OptimConfig(optimizer=optimizer, lr=1e-2, muon_lr=0.05, weight_decay=0.1))
        share_optimizer(opt, parts)
        start = [p.detach().clone() for p in model.parameters()]
        for seed in range(3):
            x, y = _batch(4, seed)
            training_loss(model(x), y, LossConfig()).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        results.append([p.detach().clone() for p in model.parameters()])
    assert len(optim.cut(list(model.parameters()), 3)) == 3
    assert all(not torch.equal(a, b) for a, b in zip(start, model.parameters()))  # every weight moved
    for params in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], params))


@pytest.mark.parametrize("parts", [2, 3])
def test_packed_rows_shared_among_threads_give_the_whole_batchs_loss_and_gradients(parts):
    """--stage sft: a packed micro-batch's rows cut among threads (sft.row_parts), each part's masked loss over the
    step's count, add up to the whole batch's loss and gradients (float64), with several conversations in a row and
    untrained targets."""
    from lmlab import sft
    from lmlab.loss import masked_loss
    from lmlab.threads import backward_in_parts

    model = _model("default")
    x, y = _batch(6, seed=5)
    g = torch.Generator().manual_seed(6)
    documents = 1 + (torch.arange(16) >= torch.randint(3, 13, (6, 1), generator=g)).long()  # two per row
    mask = torch.rand(6, 16, generator=g) < 0.6
    batch = sft.PackedBatch(x, y, documents, mask, mask.sum().double() * 1.5)  # the step's count, not this batch's
    masked_loss(model(x, documents=documents), y, LossConfig(), mask, batch.count).mul(0.5).backward()
    whole = _grads(model)
    model.zero_grad(set_to_none=True)
    loss = backward_in_parts(model, sft.row_parts(model, batch, masked_loss, LossConfig(), parts), 0.5)
    expected = masked_loss(model(x, documents=documents), y, LossConfig(), mask, batch.count)
    torch.testing.assert_close(loss, expected.detach(), rtol=1e-12, atol=0)
    for a, b in zip(whole, _grads(model)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)
