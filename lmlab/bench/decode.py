"""Batched generation against its floor (`lmlab bench`, generation section): tokens/s of generate_batch at several
batch sizes on a random model of each floor shape, and the floor of its decode step, timed alone with floor.py's
machinery: every linear layer at B rows and attention's two products (QK^T, AV) per head against the cache, at the
cache's mean length over the run. B / floor is the tokens/s that a decode loop could not beat with these kernels.

floor.py times each product on one set of operands, called again and again, so they stay in the CPU's caches. A
decode step reads each layer's own keys and values (17 MB at batch 64 on the tiny shape), which do not: the cold floor
times all of a step's products in one call, each on operands of its own, as the step's layers read theirs.

Each row is one prompt token (a different one per row) and its own seed, `new_tokens` drawn with no stop: every row
takes every step, so the figure is the loop's, not the batch's shape. The runs of all configs and the products are
timed in turns (round by round), and each figure is a median over rounds.
"""

from __future__ import annotations

import statistics

import torch

from typing import Callable

from .floor import SHAPES, Gemm, gemm_call, interleaved, linear_gemms, merge
from .measure import sync

VOCAB = 65  # a character vocabulary, as the tiny runs on Tiny Shakespeare have


def decode_spans(prompt: int, new_tokens: int, block: int) -> list[int]:
    """The cache length each decode step reads (its window's length), drawing new_tokens after a prompt of `prompt`
    tokens with generate's window policy: the prompt's encoding draws the first token, and a window that outgrows the
    block is cut to block // 2 tokens and encoded again (which draws a token too, and is no decode step)."""
    keep, spans = max(1, block // 2), []
    window = min(prompt, block) + 1
    for _ in range(new_tokens - 1):
        if window > block:
            window = keep
        else:
            spans.append(window)
        window += 1
    return spans


def decode_gemms(model: torch.nn.Module, batch: int, span: int) -> list[Gemm]:
    """A decode step's matmuls at `batch` rows: every linear's forward, and per layer QK^T (batch x heads products of
    1 x head_dim by head_dim x span) and AV (1 x span by span x head_dim)."""
    cfg = model.cfg
    bh, D = batch * cfg.n_head, cfg.head_dim
    attention = [Gemm("attention QK^T", bh, 1, D, span, b_t=True), Gemm("attention AV", bh, 1, span, D)]
    return merge(linear_gemms(model, batch, backward=False) + attention * cfg.n_layer)


def cold_step(gemms: list[Gemm], dtype: torch.dtype, device: torch.device) -> Callable[[], None]:
    """All of a step's products in one call, each of the `count` calls of a product on operands of its own."""
    calls = [gemm_call(g, dtype, device) for g in gemms for _ in range(g.count)]

    def run() -> None:
        for call in calls:
            call()

    return run


def batched_generation(device: torch.device, batches: tuple[int, ...], new_tokens: int, rounds: int,
                       shapes: tuple[str, ...] = tuple(SHAPES), min_s: float = 0.002) -> list[dict]:
    """{shape, batch, new_tokens, compiled, tokens_per_s, step_ms, floor_ms_per_step, floor_tokens_per_s,
    floor_over_speed, floor_cold_ms_per_step, floor_cold_over_speed} for every shape and batch: eager generate_batch,
    medians over `rounds` rounds, each round running every config in turns and then timing their products
    (floor.interleaved). step_ms is the run's time over new_tokens (the prompt's encoding included); *_over_speed
    is floor tokens/s over tokens/s."""
    from ..budget import apply_budget
    from ..config import get_preset
    from ..generate import generate_batch
    from ..model import build_model

    models = {}
    for shape in shapes:
        cfg, _ = apply_budget(get_preset(SHAPES[shape]))
        torch.manual_seed(0)
        models[shape] = build_model(cfg.model, VOCAB).to(device).eval()
    configs = [(shape, b) for shape in shapes for b in batches]
    spans = {shape: decode_spans(1, new_tokens, m.cfg.block_size) for shape, m in models.items()}
    gemms = {(shape, b): decode_gemms(models[shape], b, round(statistics.mean(spans[shape] or [1])))
             for shape, b in configs}
    calls = {c: [gemm_call(g, torch.float32, device) for g in gs] + [cold_step(gs, torch.float32, device)]
             for c, gs in gemms.items()}

    def run(shape: str, batch: int, n: int) -> None:
        out = generate_batch(models[shape], [[i % VOCAB] for i in range(batch)], n, seeds=list(range(batch)))
        sync(device)
        assert all(len(row.tokens) == n for row in out)

    steps = {c: (lambda r, c=c: run(*c, new_tokens if r else min(new_tokens, 8))) for c in configs}
    run_s, call_s = interleaved(steps, calls, device, rounds, min_s)
    rows = []
    for shape, batch in configs:
        seconds = run_s[shape, batch]
        gs, medians = gemms[shape, batch], call_s[shape, batch]
        floor_s = sum(g.count * s for g, s in zip(gs, medians))
        cold_s = medians[-1]
        tokens_per_s = batch * new_tokens / seconds
        rows.append({"shape": shape, "batch": batch, "new_tokens": new_tokens, "compiled": False,
                     "tokens_per_s": tokens_per_s, "step_ms": seconds / new_tokens * 1000,
                     "floor_ms_per_step": floor_s * 1000, "floor_tokens_per_s": batch / floor_s,
                     "floor_over_speed": batch / floor_s / tokens_per_s, "floor_cold_ms_per_step": cold_s * 1000,
                     "floor_cold_over_speed": batch / cold_s / tokens_per_s, "rounds": rounds})
    return rows


def batched_lines(rows: list[dict]) -> list[str]:
    """The batched generation table for the terminal, with each batch's speed-up over batch 1 of its shape."""
    one = {r["shape"]: r["tokens_per_s"] for r in rows if r["batch"] == 1}
    return [f"{'generate batch %d at %s' % (r['batch'], r['shape']):34s} {r['tokens_per_s']:9,.0f} tok/s"
            + (f" ({r['tokens_per_s'] / one[r['shape']]:.1f}x batch 1)" if r["shape"] in one else "")
            + f", {r['step_ms']:.2f} ms/step, floor {r['floor_ms_per_step']:.2f} ms/step "
            f"({r['floor_tokens_per_s']:,.0f} tok/s: {r['floor_over_speed']:.2f}x), cold floor "
            f"{r['floor_cold_ms_per_step']:.2f} ms/step ({r['floor_cold_over_speed']:.2f}x)" for r in rows]
