"""The charts of training, one line per run: loss against steps and tokens, validation accuracy, the learning rate,
gradient norms (global and per layer), update-to-weight ratios and throughput; for a fine-tuning run on
conversations with a verifier (synthetic:chat), its held-out answers' exact match by skill and ended turns; for an rl
run, its rewards."""

from __future__ import annotations

import re

from matplotlib import colormaps
from matplotlib.figure import Figure

from .chart import color, figure, finish, finite_points, smooth
from .logs import RunLogs, best_eval


def loss_figure(runs: list[RunLogs], x: str = "step", log: bool = False) -> Figure:
    """Train loss (raw faint, smoothed solid) and val loss (dots) of every run against steps or tokens."""
    by_tokens = x == "tokens"
    fig, ax = figure(f"loss against {'tokens' if by_tokens else 'steps'}", "tokens" if by_tokens else "step",
                     "loss (nats/token)")
    for i, run in enumerate(runs):
        line_color = color(i)
        xs, ys = finite_points([getattr(r, x) for r in run.train], [r.train_loss for r in run.train],
                               positive_x=log and by_tokens, positive_y=log)
        if xs:
            ax.plot(xs, ys, color=line_color, alpha=0.25, linewidth=0.8)
            ax.plot(xs, smooth(ys), color=line_color, linewidth=1.6, label=f"{run.name} train")
        spikes = [r for r in run.train if r.spike_z is not None]
        sx, sy = finite_points([getattr(r, x) for r in spikes], [r.train_loss for r in spikes], log and by_tokens, log)
        if sx:
            ax.scatter(sx, sy, marker="^", color=line_color, s=30, zorder=3, label=f"{run.name} loss spike")
        xs, ys = finite_points([getattr(r, x) for r in run.evals], [r.val_loss for r in run.evals],
                               positive_x=log and by_tokens, positive_y=log)
        if xs:
            ax.plot(xs, ys, color=line_color, linestyle="--", marker="o", markersize=4, linewidth=1.2,
                    label=f"{run.name} val")
        over = [r for r in run.evals if r.overfitting]
        ox, oy = finite_points([getattr(r, x) for r in over], [r.val_loss for r in over], log and by_tokens, log)
        if ox:
            ax.scatter(ox, oy, marker="x", color="#c00", s=40, zorder=4,
                       label=f"{run.name} val rising, train falling: overfitting")
        best = best_eval(run)
        bx, by = finite_points([getattr(best, x)] if best else [], [best.val_loss] if best else [], log and by_tokens,
                               log)
        if bx:
            ax.scatter(bx, by, marker="*", color=line_color, s=120, zorder=4, edgecolors="black", linewidths=0.5,
                       label=f"{run.name} best (the checkpoint used)")
        if not by_tokens:
            for rb in run.rollbacks:
                ax.axvline(rb.step, color=line_color, linestyle=":", alpha=0.7)
    if log and by_tokens:
        ax.set_xscale("log")
    if log:
        ax.set_yscale("log")
    return finish(fig)


def accuracy_figure(runs: list[RunLogs]) -> Figure:
    fig, ax = figure("validation accuracy (top-1)", "step", "accuracy")
    for i, run in enumerate(runs):
        plot_percent(ax, [r.step for r in run.evals], [r.val_accuracy for r in run.evals], color=color(i),
                     marker="o", markersize=4, label=run.name)
    ax.set_ylabel("accuracy (%)")
    return finish(fig)


def answers_figure(run: RunLogs) -> Figure:
    """One SFT run's greedy answers to held-out prompts at each evaluation: exact match by skill (solid) and the
    share of answers that ended their turn (dashed, black)."""
    fig, ax = figure(f"{run.name}: held-out answers", "step", "share of answers (%)")
    skills = sorted({skill for r in run.evals for skill in r.exact_match})
    for j, skill in enumerate(skills):
        rows = [r for r in run.evals if skill in r.exact_match]
        plot_percent(ax, [r.step for r in rows], [r.exact_match[skill] for r in rows], color=color(j), marker="o",
                     markersize=3, label=f"{skill} exact match")
    plot_percent(ax, [r.step for r in run.evals], [r.ended_turn for r in run.evals], color="black", linestyle="--",
                 label="ended their turn")
    ax.set_ylim(-2, 102)
    return finish(fig)


def rewards_figure(run: RunLogs) -> Figure:
    """One rl run's rewards: the mean reward of each step's sampled completions (faint raw, solid smoothed), the share
    of prompts with a rewarded completion in their group (pass@G, dashed) and the held-out reward of greedy
    completions at each evaluation (dots)."""
    fig, ax = figure(f"{run.name}: rewards", "step", "reward")
    steps = [r for r in run.train if r.reward is not None]
    xs, ys = finite_points([r.step for r in steps], [r.reward for r in steps])
    if xs:
        ax.plot(xs, ys, color=color(0), alpha=0.25, linewidth=0.8)
        ax.plot(xs, smooth(ys), color=color(0), linewidth=1.6, label="training reward (sampled)")
    xs, ys = finite_points([r.step for r in steps], [r.pass_at_g for r in steps])
    if xs:
        ax.plot(xs, smooth(ys), color=color(2), linestyle="--", label="pass@G (sampled)")
    evals = [r for r in run.evals if r.heldout_reward is not None]
    xs, ys = finite_points([r.step for r in evals], [r.heldout_reward for r in evals])
    if xs:
        ax.plot(xs, ys, color=color(1), marker="o", markersize=4, label="held-out reward (greedy)")
    return finish(fig)


def plot_percent(ax, xs: list, ys: list, **style) -> None:
    """The finite points of shares (0 to 1) as a line of percentages."""
    xs, ys = finite_points(xs, ys)
    if xs:
        ax.plot(xs, [100 * y for y in ys], **style)


def lr_figure(runs: list[RunLogs]) -> Figure:
    fig, ax = figure("learning rate", "step", "learning rate")
    for i, run in enumerate(runs):
        xs, ys = finite_points([r.step for r in run.train], [r.lr for r in run.train])
        if xs:
            ax.plot(xs, ys, color=color(i), label=run.name)
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    return finish(fig)


def grad_norm_figure(runs: list[RunLogs]) -> Figure:
    """The global gradient norm before clipping; x marks a clipped step, the dashed line is the clip threshold."""
    fig, ax = figure("global gradient norm (before clipping)", "step", "grad norm")
    for i, run in enumerate(runs):
        line_color = color(i)
        xs, ys = finite_points([r.step for r in run.train], [r.grad_norm for r in run.train], positive_y=True)
        if xs:
            ax.plot(xs, ys, color=line_color, linewidth=0.9, label=run.name)
        clipped = [r for r in run.train if r.clipped]
        cx, cy = finite_points([r.step for r in clipped], [r.grad_norm for r in clipped], positive_y=True)
        if cx:
            ax.scatter(cx, cy, marker="x", color=line_color, s=14, linewidths=0.8, zorder=3,
                       label=f"{run.name} clipped ({len(cx)} steps)")
        clip = run.config.optim.grad_clip
        if xs and isinstance(clip, (int, float)) and clip > 0:
            ax.axhline(clip, color=line_color, linestyle="--", linewidth=0.8, alpha=0.6)
    ax.set_yscale("log")
    return finish(fig)


def _layer_key(name: str) -> tuple:
    if name == "embed":
        return (0, 0)
    m = re.fullmatch(r"block\.([0-9]+)", name)
    return (1, int(m.group(1))) if m else (2, 0)


def layer_figure(run: RunLogs, kind: str) -> Figure:
    """Per-layer gradient norms (kind='grad_norm') or update-to-weight ratios (kind='update_ratio') of one run."""
    title = {"grad_norm": "per-layer gradient norm", "update_ratio": "per-layer update / weight ratio"}[kind]
    fig, ax = figure(f"{run.name}: {title}", "step", "update ratio" if kind == "update_ratio" else "grad norm")
    layers = sorted({name for r in run.telemetry for name in (r.get(kind) or {})}, key=_layer_key)
    palette = colormaps["viridis"]  # embed -> head, dark to light
    for j, layer in enumerate(layers):
        rows = [r for r in run.telemetry if layer in (r.get(kind) or {})]
        xs, ys = finite_points([r["step"] for r in rows], [r[kind][layer] for r in rows], positive_y=True)
        if xs:
            ax.plot(xs, ys, color=palette(j / max(len(layers) - 1, 1)), linewidth=1.1, label=layer)
    if kind == "update_ratio" and layers:
        ax.axhline(1e-3, color="#888", linestyle=":", linewidth=1, label="1e-3 (rule of thumb)")
    ax.set_yscale("log")
    return finish(fig)


def throughput_figure(runs: list[RunLogs]) -> Figure:
    fig, ax = figure("training throughput", "step", "tokens / s")
    for i, run in enumerate(runs):
        line_color = color(i)
        xs, ys = finite_points([r.step for r in run.train], [r.tokens_per_s for r in run.train])
        if xs:
            ax.plot(xs, ys, color=line_color, alpha=0.25, linewidth=0.8)
            ax.plot(xs, smooth(ys), color=line_color, linewidth=1.5, label=run.name)
    ax.set_ylim(bottom=0)
    return finish(fig)
