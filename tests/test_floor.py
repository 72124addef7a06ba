"""The floor of a step (lmlab/bench/floor.py): its list of matmuls against a hand count from the model's config and
against the matmuls torch.profiler sees in one real step; the floor is the sum of its parts; the JSON's keys."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from lmlab.bench import floor
from lmlab.model import ModelConfig, build_model

B, T, L, H, C, V = 3, 24, 2, 2, 32, 11  # batch, block, layers, heads, width, vocabulary
MLP = 4 * C


def small_model(**changes):
    torch.manual_seed(0)
    return build_model(ModelConfig(block_size=T, n_layer=L, n_head=H, n_embd=C, **changes), V)


def hand_linear() -> Counter:
    """(m, k, n) of each linear GEMM, by hand: per layer qkv C->3C, proj C->C, fc C->4C, proj 4C->C; the head C->V.
    Forward (M, in, out), input grad (M, out, in), weight grad dY^T X (out, M, in)."""
    M = B * T
    shapes = Counter()
    for _ in range(L):
        for i, o in ((C, 3 * C), (C, C), (C, MLP), (MLP, C)):
            shapes.update([(M, i, o), (M, o, i), (o, M, i)])
    shapes.update([(M, C, V), (M, V, C), (V, M, C)])
    return shapes


def hand_attention() -> Counter:
    D = C // H
    return Counter({(B * H, T, D, T): 2 * L, (B * H, T, T, D): 4 * L})


def test_the_gemm_list_is_three_per_linear_layer_and_six_per_attention():
    gemms = floor.step_gemms(small_model(), B, T, L, H, C // H)
    assert sum(g.count for g in gemms) == 3 * (4 * L + 1) + 6 * L
    linear, attention = Counter(), Counter()
    for g in gemms:
        if g.batch:
            attention[(g.batch, g.m, g.k, g.n)] += g.count
        else:
            linear[(g.m, g.k, g.n)] += g.count
    assert linear == hand_linear()
    assert attention == hand_attention()
    doubled = floor.step_gemms(small_model(), B, T, L, H, C // H, micro_batches=2)  # grad accumulation
    assert [g.count for g in doubled] == [2 * g.count for g in gemms]


@pytest.mark.parametrize("mlp", ["relu2", "gelu"])
def test_the_linear_gemms_are_the_matmuls_of_a_real_step(mlp):
    """One real train_step (forward, backward, clip, AdamW) under torch.profiler: its aten::mm/addmm calls are the
    linear GEMMs, shape for shape (attention runs in the fused SDPA kernel, with no separate matmuls)."""
    from torch.profiler import ProfilerActivity, profile

    from lmlab.evaluate import autocast_context
    from lmlab.loss import LossConfig
    from lmlab.train import train_step

    model = small_model(mlp=mlp)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    w = torch.randint(0, V, (B, T + 1), generator=torch.Generator().manual_seed(0))
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        train_step(model, opt, [(w[:, :-1], w[:, 1:])], LossConfig(), 1.0, autocast_context(torch.device("cpu"),
                                                                                            torch.float32))
    seen = Counter()
    for e in prof.events():
        if e.name in ("aten::mm", "aten::addmm"):
            (m, k), (_, n) = e.input_shapes[-2], e.input_shapes[-1]
            seen[(m, k, n)] += 1
        assert e.name not in ("aten::bmm", "aten::baddbmm")  # no Muon here, and attention is one kernel
    assert seen == hand_linear()
    gemms = floor.step_gemms(model, B, T, L, H, C // H)
    listed = Counter()
    for g in gemms:
        if not g.batch:
            listed[(g.m, g.k, g.n)] += g.count
    assert seen == listed


def test_newton_schulz_matmuls_follow_muons_stacks():
    from lmlab.optim import OptimConfig, build_optimizer

    opt = build_optimizer(small_model(), OptimConfig(optimizer="muon", lr=1e-3, muon_lr=0.02, muon_momentum=0.95))
    gemms = floor.newton_schulz_gemms(opt)
    # stacks by sorted shape: (C, 3C) and (C, 4C) x2 per layer -> (C, 4C) holds fc and proj; (C, C)
    sizes = {g.key: g.count for g in gemms}  # (batch, m, k, n, a transposed, b transposed)
    assert sizes == {(L, C, 3 * C, C, False, True): 1, (2 * L, C, 4 * C, C, False, True): 1,  # X X^T
                     (L, C, C, C, False, True): 1,
                     (L, C, C, 3 * C, False, False): 1, (2 * L, C, C, 4 * C, False, False): 1,  # R X
                     # m x m products: 5 + 4 + 8 per stack; the (C, C) stack's R X has their shape
                     (2 * L, C, C, C, False, False): 17, (L, C, C, C, False, False): 17 + 17 + 1}
    assert floor.newton_schulz_gemms(torch.optim.AdamW(small_model().parameters())) == []


@pytest.mark.parametrize("batch", [0, 2])
def test_a_gemm_is_timed_on_operands_of_its_shape_and_layout(batch):
    g = floor.Gemm("x", batch, 3, 4, 5, a_t=True, b_t=False)
    a, b, c = floor.gemm_operands(g, torch.float64, torch.device("cpu"))
    lead = (batch,) if batch else ()
    assert a.shape == (*lead, 3, 4) and not a.is_contiguous() and a.mT.is_contiguous()
    assert b.shape == (*lead, 4, 5) and b.is_contiguous() and c.shape == (*lead, 3, 5)
    assert g.flops == 2 * max(batch, 1) * 3 * 4 * 5
    g2 = floor.Gemm("x", batch, 3, 4, 5)
    call = floor.gemm_call(g2, torch.float64, torch.device("cpu"))
    out = call()
    assert out.shape == (*lead, 3, 5) and torch.isfinite(out).all()


def test_the_floor_is_the_sum_of_its_parts_and_the_row_has_its_keys(monkeypatch):
    def fake_interleaved(steps, calls, device, rounds):
        return dict.fromkeys(steps, 0.050), {name: [0.001 * (i + 1) for i in range(len(cs))] for name, cs in calls.items()}

    monkeypatch.setattr(floor, "interleaved", fake_interleaved)
    monkeypatch.setattr(floor, "op_table", lambda step, steps: [{"kind": k, "ms": 1.0} for k in floor.KINDS])
    from lmlab.optim import OptimConfig, build_optimizer

    model = small_model()
    opt = build_optimizer(model, OptimConfig(optimizer="muon", lr=1e-3, muon_lr=0.02, muon_momentum=0.95))
    row = floor.floor_row("lmlab", "tiny", lambda i: None, model, opt, B, T, L, H, C // H, 1, torch.float32,
                          torch.device("cpu"), rounds=1, profile_steps=1)
    assert set(row) == {"tool", "shape", "step_ms", "floor_ms", "optimizer_floor_ms", "step_over_floor", "gemms",
                        "ops"}
    model_gemms = floor.step_gemms(model, B, T, L, H, C // H)
    assert row["floor_ms"] == pytest.approx(sum(1.0 * (i + 1) * g.count for i, g in enumerate(model_gemms)))
    ns = floor.newton_schulz_gemms(opt)
    assert row["optimizer_floor_ms"] == pytest.approx(sum(1.0 * (i + 1) * g.count for i, g in enumerate(ns)))
    assert row["step_over_floor"] == pytest.approx(50.0 / row["floor_ms"])
    assert len(row["gemms"]) == len(model_gemms) + len(ns)
    assert all(set(o) == {"kind", "ms"} for o in row["ops"])


def test_steps_of_one_shape_are_timed_in_turns_against_one_floor(monkeypatch):
    """Two tools' steps: each round times both (the order reversed every other round), each right after an untimed
    step of its own, before the products; their rows share one floor and each keeps its own optimizer's matmuls."""
    order = []
    g = floor.Gemm("tiny", 0, 4, 4, 4)
    steps = {"a": lambda i: order.append(("a", i)), "b": lambda i: order.append(("b", i))}
    calls = {"model": [floor.gemm_call(g, torch.float32, torch.device("cpu"))]}
    step_s, medians = floor.interleaved(steps, calls, torch.device("cpu"), rounds=3)
    assert order == [("a", 0), ("b", 0), ("a", 1), ("a", 1), ("b", 1), ("b", 1), ("b", 2), ("b", 2), ("a", 2), ("a", 2),
                     ("a", 3), ("a", 3), ("b", 3), ("b", 3)]
    assert set(step_s) == {"a", "b"} and all(t >= 0 for t in step_s.values()) and len(medians["model"]) == 1

    monkeypatch.setattr(floor, "op_table", lambda step, steps: [{"kind": k, "ms": 1.0} for k in floor.KINDS])
    from lmlab.optim import OptimConfig, build_optimizer

    model = small_model()
    muon = build_optimizer(model, OptimConfig(optimizer="muon", lr=1e-3, muon_lr=0.02, muon_momentum=0.95))
    adamw = build_optimizer(model, OptimConfig(optimizer="adamw", lr=1e-3))
    rows = floor.floor_rows([floor.Stepper("x", lambda i: None, model, muon),
                             floor.Stepper("y", lambda i: None, model, adamw)], "tiny", B, T, L, H, C // H, 1,
                            torch.float32, torch.device("cpu"), rounds=1, profile_steps=1)
    assert [r["tool"] for r in rows] == ["x", "y"] and rows[0]["floor_ms"] == rows[1]["floor_ms"] > 0
    assert rows[0]["optimizer_floor_ms"] > 0 and rows[1]["optimizer_floor_ms"] == 0


@pytest.mark.parametrize("name, parents, kind", [
    ("aten::mm", ["MmBackward0"], "matmul"),
    ("aten::mul", ["_RMSNormFunction"], "norms"),
    ("aten::_scaled_dot_product_flash_attention_for_cpu", ["aten::scaled_dot_product_attention"], "attention"),
    ("aten::exp", ["aten::_log_softmax"], "loss"),
    ("aten::bmm", ["Optimizer.step#Muon.step"], "optimizer"),
    ("aten::_foreach_mul_", [], "optimizer"),
    ("aten::add", ["aten::add_"], "elementwise"),
    ("aten::view", [], "python/dispatch/other"),
    ("MmBackward0", [], "python/dispatch/other"),
])
def test_profiled_ops_are_grouped_by_kind(name, parents, kind):
    assert floor.op_kind(name, parents) == kind


def test_a_real_floor_row_is_positive_and_its_profile_covers_the_step():
    [row] = floor.lmlab_floor("nanogpt-cpu", torch.device("cpu"), rounds=1, profile_steps=1)
    assert row["tool"] == "lmlab" and row["shape"] == "nanogpt-cpu"
    assert row["step_ms"] > 0 and row["floor_ms"] > 0 and row["optimizer_floor_ms"] == 0  # AdamW: no Newton-Schulz
    assert [o["kind"] for o in row["ops"]] == list(floor.KINDS) and all(o["ms"] >= 0 for o in row["ops"])
    assert row["ops"][floor.KINDS.index("matmul")]["ms"] > 0
    assert all(g["ms"] > 0 and g["count"] >= 1 for g in row["gemms"])


@pytest.mark.slow
def test_bench_only_floor_with_nanogpt_prints_the_table_and_the_json(tmp_path):
    """`lmlab bench --quick --only floor --nanogpt PATH --json`: floor[{tool, shape, step_ms, floor_ms, ops}] for
    lmlab at both shapes and nanoGPT (a stand-in checkout) at its CPU shape; the table on stderr."""
    import json

    from helpers import HANG_S, run_cli
    from test_bench import STAND_IN

    (tmp_path / "model.py").write_text(STAND_IN.replace("EXTRA", "0"))
    proc = run_cli(["bench", "--quick", "--only", "floor", "--nanogpt", str(tmp_path), "--json"], cwd=tmp_path,
                   timeout=HANG_S)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads(proc.stdout)["floor"]
    assert [(r["tool"], r["shape"]) for r in rows] == [("lmlab", "nanogpt-cpu"), ("nanogpt", "nanogpt-cpu"),
                                                       ("lmlab", "tiny")]
    for r in rows:
        assert {"tool", "shape", "step_ms", "floor_ms", "ops"} <= set(r) and r["step_ms"] > 0 and r["floor_ms"] > 0
        assert [o["kind"] for o in r["ops"]] == list(floor.KINDS)
    # the same model shapes: the same GEMMs
    assert [g["shape"] for g in rows[0]["gemms"]] == [g["shape"] for g in rows[1]["gemms"]]
    assert rows[2]["optimizer_floor_ms"] > 0 and rows[1]["optimizer_floor_ms"] == 0  # Muon in tiny; AdamW
    assert "floor lmlab at tiny" in proc.stderr and "step/floor" in proc.stderr
