"""The floor of a training step (`lmlab bench --only floor`, part of the throughput section): the step's matrix
products timed alone, at its exact shapes, dtype and thread count, interleaved with the step itself. Their sum is the
time a step could not beat with these kernels; step/floor says how much of the step is spent elsewhere, and a
profile of the step, grouped by kind of op, says where.

A linear layer y = x W^T costs three GEMMs per micro-batch: the forward x W^T, the input's gradient dY W and the
weight's gradient dY^T X, with the operands laid out as autograd hands them. Attention costs six batched products
per layer: QK^T and AV forward, dY V^T, P^T dY, dS K and dS^T Q backward, counted whole (a causal kernel may skip
the masked half, so the real floor of attention is lower). Muon's Newton-Schulz iteration is a separate line: the
optimizer's own matmuls, not the model's.
"""

from __future__ import annotations

import re
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn

from .measure import sync

SHAPES = {"nanogpt-cpu": "nanogpt-char-cpu", "tiny": "tiny"}  # the floor's shape names -> lmlab's presets
KINDS = ("attention", "matmul", "norms", "elementwise", "loss", "optimizer", "data", "python/dispatch/other")
NS_STEPS = 5  # optim.orthogonalize's default, which Muon uses


@dataclass(frozen=True)
class Gemm:
    """One matrix product of a step: `batch` (0: torch.mm, else torch.bmm over that many) of (m x k) @ (k x n), each
    operand a transposed view where autograd hands it so (a_t, b_t); `count` times per step."""

    name: str
    batch: int
    m: int
    k: int
    n: int
    a_t: bool = False
    b_t: bool = False
    count: int = 1

    @property
    def key(self) -> tuple:
        return (self.batch, self.m, self.k, self.n, self.a_t, self.b_t)

    @property
    def flops(self) -> int:
        return 2 * max(self.batch, 1) * self.m * self.k * self.n


def linear_gemms(model: nn.Module, rows: int, backward: bool = True) -> list[Gemm]:
    """Every nn.Linear of the model (lmlab's or nanoGPT's), on `rows` = batch x block input rows: its three GEMMs, in
    the orientation the step computes them (autograd, like lmlab's fused ReLU^2 MLP, gets the weight's gradient as
    dY^T X, in the weight's own layout); without backward, the forward alone (a decode step)."""
    out = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            label = re.sub(r"\.\d+\.", ".*.", name)  # blocks.0.mlp.fc -> blocks.*.mlp.fc: one entry for all layers
            i, o = module.in_features, module.out_features
            out.append(Gemm(f"{label} forward", 0, rows, i, o, b_t=True))  # x (M, in) @ W^T (in, out)
            if backward:
                out += [Gemm(f"{label} input grad", 0, rows, o, i),  # dY (M, out) @ W (out, in)
                        Gemm(f"{label} weight grad", 0, o, rows, i, a_t=True)]  # dY^T (out, M) @ X (M, in)
    return out


def attention_gemms(n_layer: int, batch: int, n_head: int, block: int, head_dim: int) -> list[Gemm]:
    """The six batched products of causal attention per layer, over batch x heads matrices of block x head_dim."""
    bh, T, D = batch * n_head, block, head_dim
    one = [Gemm("attention QK^T forward", bh, T, D, T, b_t=True), Gemm("attention AV forward", bh, T, T, D),
           Gemm("attention dY V^T", bh, T, D, T, b_t=True), Gemm("attention P^T dY", bh, T, T, D, a_t=True),
           Gemm("attention dS K", bh, T, T, D), Gemm("attention dS^T Q", bh, T, T, D, a_t=True)]
    return [g for _ in range(n_layer) for g in one]


def step_gemms(model: nn.Module, batch: int, block: int, n_layer: int, n_head: int, head_dim: int,
               micro_batches: int = 1) -> list[Gemm]:
    """The forward and backward matmuls of one step (micro_batches micro-batches), same shapes merged and counted."""
    return merge(linear_gemms(model, batch * block) + attention_gemms(n_layer, batch, n_head, block, head_dim),
                 micro_batches)


def newton_schulz_gemms(optimizer: torch.optim.Optimizer) -> list[Gemm]:
    """Muon's orthogonalisation per step, as optim.Muon runs it: the hidden matrices stacked by shape (a tall one
    transposed), then optim.gram_newton_schulz on each stack: G = X X^T, per iteration P = a + b G + c G^2 (one
    baddbmm), R = P R (all but the first) and G = P G P (all but the last), and finally R X."""
    stacks: dict[tuple, int] = {}
    for group in optimizer.param_groups:
        if group.get("use_muon"):
            for p in group["params"]:
                shape = tuple(sorted(p.shape))
                stacks[shape] = stacks.get(shape, 0) + 1
    out = []
    for (m, k), n in stacks.items():
        out += [Gemm("Newton-Schulz X X^T", n, m, k, m, b_t=True),
                Gemm("Newton-Schulz m x m", n, m, m, m, count=NS_STEPS + (NS_STEPS - 1) * 3),
                Gemm("Newton-Schulz R X", n, m, m, k)]
    return merge(out)


def merge(gemms: list[Gemm], times: int = 1) -> list[Gemm]:
    """Products of the same shape and layout as one entry, its count the sum (times `times`)."""
    merged: dict[tuple, Gemm] = {}
    for g in gemms:
        seen = merged.get(g.key)
        if seen is None:
            merged[g.key] = g
            continue
        name = seen.name if g.name in seen.name.split(" + ") else f"{seen.name} + {g.name}"
        merged[g.key] = Gemm(name, *g.key[:4], g.a_t, g.b_t, seen.count + g.count)
    return [Gemm(g.name, *g.key[:4], g.a_t, g.b_t, g.count * times) for g in merged.values()]


def gemm_operands(g: Gemm, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, ...]:
    """Random operands a, b of g's shapes and layouts (a transposed one a view of a contiguous tensor), and c for
    the product."""
    lead = (g.batch,) if g.batch else ()

    def operand(rows: int, cols: int, transposed: bool) -> torch.Tensor:
        if transposed:
            return torch.randn(*lead, cols, rows, device=device, dtype=dtype).transpose(-2, -1)
        return torch.randn(*lead, rows, cols, device=device, dtype=dtype)

    return operand(g.m, g.k, g.a_t), operand(g.k, g.n, g.b_t), torch.empty(*lead, g.m, g.n, device=device,
                                                                            dtype=dtype)


def gemm_call(g: Gemm, dtype: torch.dtype, device: torch.device) -> Callable[[], torch.Tensor]:
    """torch.mm/bmm(a, b, out=c) on preallocated operands (gemm_operands)."""
    a, b, c = gemm_operands(g, dtype, device)
    mm = torch.bmm if g.batch else torch.mm
    return lambda: mm(a, b, out=c)


def seconds_per_call(fn: Callable[[], None], calls: int, device: torch.device) -> float:
    sync(device)
    t = time.perf_counter()
    for _ in range(calls):
        fn()
    sync(device)
    return (time.perf_counter() - t) / calls


def interleaved(steps: dict, calls: dict[object, list[Callable[[], object]]], device: torch.device, rounds: int,
                min_s: float = 0.002) -> tuple[dict, dict]:
    """Median seconds of each step and of each product, timed in turns: each round times every step once (in turns,
    the order reversed every other round), right after an untimed step of its own (as a training loop runs it:
    after the products, whose idle OpenMP threads spin for some milliseconds, a step whose rows are shared among
    threads would lose a core to them), then every product call (gemm_call, or any callable; repeated to at least
    min_s, the count fixed after warm-up); the medians are over rounds. step(i) gets the round, from 1, and 0 for
    its warm-up."""
    for step in steps.values():
        step(0)  # warm-up
    repeats = {name: [max(1, min(50, round(min_s / seconds_per_call(c, 1, device)))) for c in cs]
               for name, cs in calls.items()}
    step_s: dict = {name: [] for name in steps}
    call_s = {name: [[] for _ in cs] for name, cs in calls.items()}
    for r in range(rounds):
        for name in list(steps) if r % 2 == 0 else list(steps)[::-1]:
            steps[name](r + 1)  # untimed: the timed step follows one of its own, as in a training loop
            sync(device)
            t = time.perf_counter()
            steps[name](r + 1)
            step_s[name].append(time.perf_counter() - t)
        for name, cs in calls.items():
            for i, c in enumerate(cs):
                call_s[name][i].append(seconds_per_call(c, repeats[name][i], device))
    return ({name: statistics.median(t) for name, t in step_s.items()},
            {name: [statistics.median(t) for t in ts] for name, ts in call_s.items()})


def op_kind(name: str, parents: list[str]) -> str:
    """The kind of a profiled op, from its own name and those of the ops and regions around it (innermost first)."""
    names = [name.lower()] + [p.lower() for p in parents]
    if any(n.startswith("optimizer.") or "_foreach" in n or "clip_grad" in n for n in names):
        return "optimizer"
    if any("data" == n or n.startswith("data ") for n in names):
        return "data"
    if any("scaled_dot_product" in n or "flash_attention" in n for n in names):
        return "attention"
    if any(s in n for n in names for s in ("cross_entropy", "log_softmax", "nll_loss", "logsoftmax", "nllloss")):
        return "loss"
    if any("norm" in n for n in names):
        return "norms"
    base = name.removeprefix("aten::")
    if base in ("mm", "addmm", "bmm", "baddbmm"):
        return "matmul"
    if name.startswith("aten::") and base not in VIEWS:
        return "elementwise"
    return "python/dispatch/other"


# ops that only make views or empty tensors: their self time is dispatch, not arithmetic
VIEWS = {"view", "reshape", "_reshape_alias", "t", "transpose", "permute", "expand", "as_strided", "slice", "select",
         "unsqueeze", "squeeze", "detach", "alias", "_unsafe_view", "unbind", "split", "chunk", "empty", "empty_like",
         "empty_strided", "resize_", "linear", "matmul", "contiguous", "numpy_T", "lift_fresh", "result_type",
         "split_with_sizes", "narrow", "flatten", "view_as", "to", "_to_copy", "zeros_like", "ones_like"}


def op_table(step: Callable[[int], None], steps: int) -> list[dict]:
    """Milliseconds per step by kind, from torch.profiler over `steps` steps: each op's own (self) time goes to the
    kind of its name or of the nearest region around it that has one; what no op accounts for (Python, dispatch, the
    profiler's own cost) goes to python/dispatch/other, so the kinds add up to the profiled step. The bench's step
    takes batches already made (lmlab train draws them outside train_step), so data is near zero here."""
    from torch.profiler import ProfilerActivity, profile

    step(0)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t = time.perf_counter()
        for i in range(steps):
            step(i + 1)
        wall_us = (time.perf_counter() - t) * 1e6
    per_kind = dict.fromkeys(KINDS, 0.0)
    for event in prof.events():
        parents, up = [], event.cpu_parent
        while up is not None:
            parents.append(up.name)
            up = up.cpu_parent
        per_kind[op_kind(event.name, parents)] += event.self_cpu_time_total
    accounted = sum(per_kind.values())
    per_kind["python/dispatch/other"] += max(0.0, wall_us - accounted)
    total = sum(per_kind.values())
    scale = wall_us / total if total else 0.0  # self times on other threads (autograd's) can overlap the caller's
    return [{"kind": k, "ms": per_kind[k] * scale / steps / 1000} for k in KINDS]


@dataclass
class Stepper:
    """A training step to set against the floor: its tool's name, step(i), model and optimizer."""

    tool: str
    step: Callable[[int], None]
    model: nn.Module
    optimizer: torch.optim.Optimizer


def floor_rows(steppers: list[Stepper], shape: str, batch: int, block: int, n_layer: int, n_head: int,
               head_dim: int, micro_batches: int, dtype: torch.dtype, device: torch.device, rounds: int,
               profile_steps: int) -> list[dict]:
    """The rows of the floor table for steps of one model shape (lmlab's and nanoGPT's at nanoGPT's CPU shape): each
    step's median time, timed in turns with one set of the model's matmuls, so that the steps are set against the
    same floor; each one's optimizer matmuls apart, and its profile by kind."""
    groups = {"model": step_gemms(steppers[0].model, batch, block, n_layer, n_head, head_dim, micro_batches)}
    groups |= {f"optimizer {s.tool}": newton_schulz_gemms(s.optimizer) for s in steppers}
    calls = {name: [gemm_call(g, dtype, device) for g in gs] for name, gs in groups.items()}
    step_s, medians = interleaved({s.tool: s.step for s in steppers}, calls, device, rounds)
    parts = {name: [{"name": g.name, "shape": [g.batch, g.m, g.k, g.n], "count": g.count, "ms": t * 1000}
                    for g, t in zip(groups[name], medians[name])] for name in groups}
    floor_ms = sum(p["ms"] * p["count"] for p in parts["model"])
    rows = []
    for s in steppers:
        optimizer = parts[f"optimizer {s.tool}"]
        rows.append({"tool": s.tool, "shape": shape, "step_ms": step_s[s.tool] * 1000, "floor_ms": floor_ms,
                     "optimizer_floor_ms": sum(p["ms"] * p["count"] for p in optimizer),
                     "step_over_floor": step_s[s.tool] * 1000 / floor_ms, "gemms": parts["model"] + optimizer,
                     "ops": op_table(s.step, profile_steps)})
    return rows


def floor_row(tool: str, shape: str, step: Callable[[int], None], model: nn.Module, optimizer, batch: int,
              block: int, n_layer: int, n_head: int, head_dim: int, micro_batches: int, dtype: torch.dtype,
              device: torch.device, rounds: int, profile_steps: int) -> dict:
    """One row of the floor table: one step alone against its model's matmuls (floor_rows)."""
    return floor_rows([Stepper(tool, step, model, optimizer)], shape, batch, block, n_layer, n_head, head_dim,
                      micro_batches, dtype, device, rounds, profile_steps)[0]


def lmlab_floor(shape: str, device: torch.device, rounds: int, profile_steps: int,
                dtype: torch.dtype = torch.float32, nanogpt: Optional[str] = None) -> list[dict]:
    """lmlab's step at one of SHAPES (its preset's model and optimizer, as `lmlab bench` times it); at nanoGPT's CPU
    shape with a nanoGPT checkout, nanoGPT's eager step (its model, its AdamW, fp32) in turns with it, against the
    same floor."""
    from ..optim import build_optimizer
    from .measure import training_step

    step, model, cfg = training_step(SHAPES[shape], device, dtype, False, micro_batches=0)
    steppers = [Stepper("lmlab", step, model, build_optimizer(model, cfg.optim))]
    if nanogpt and shape == "nanogpt-cpu":
        from .nanogpt import twin_steps

        _, their_step, _, theirs, their_opt = twin_steps(nanogpt, device, False)
        steppers.append(Stepper("nanogpt", their_step, theirs, their_opt))
    m = cfg.model
    return floor_rows(steppers, shape, cfg.batch_size, m.block_size, m.n_layer, m.n_head, m.head_dim,
                      cfg.grad_accum, dtype, device, rounds, profile_steps)


def floor_lines(rows: list[dict]) -> list[str]:
    """The floor table for the terminal: one line per tool and shape, then its profile by kind."""
    lines = []
    for r in rows:
        lines.append(f"{'floor ' + r['tool'] + ' at ' + r['shape']:34s} step {r['step_ms']:8.1f} ms  floor "
                     f"{r['floor_ms']:7.1f} ms  step/floor {r['step_over_floor']:5.2f}  (+ optimizer matmuls "
                     f"{r['optimizer_floor_ms']:.1f} ms)")
        total = sum(o["ms"] for o in r["ops"]) or 1.0
        lines.append(f"{'':34s} profile: " + ", ".join(f"{o['kind']} {o['ms']:.1f} ms ({o['ms'] / total:.0%})"
                                                       for o in r["ops"] if o["ms"] > 0))
    return lines
