"""`lmlab experiment descent`: gradient descent takes greedy steps on noisy mini-batches. A learning-rate sweep from
too small to divergent, the gradient noise of each batch size, and SGD, momentum, AdamW and Muon on one loss
landscape."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import torch

from ..run import load_run
from ..data import DataConfig, load_splits
from ..loss import LossConfig, training_loss
from ..model import unique_parameters
from ..optim import OptimConfig
from ..report.chart import color, figure, finish, smooth
from ..report.landscape import fixed_tokens, readable_snapshots, scan, trajectory_plane
from ..report.page import fmt
from .base import (TITLE_SIZE, Budget, Context, Experiment, finite, nan, read_metrics, run_training, train_config,
                   verdict)

DESCENT_BUDGET = {False: Budget(n_layer=2, n_head=4, n_embd=64, block_size=64, batch_size=16, steps=300,
                                eval_interval=30, eval_tokens=4096),
                  True: Budget(n_layer=1, n_head=2, n_embd=16, block_size=16, batch_size=4, steps=8, eval_interval=4,
                               eval_tokens=256)}
# AdamW at a constant learning rate, no clipping and no weight decay: each step is the plain update rule
SWEEP_LRS = {False: (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0), True: (1e-4, 1e-2, 1.0)}
# each optimizer at a learning rate that trains well on this budget (Muon: for its hidden matrices; the rest of the
# model takes AdamW at 3e-3)
OPTIMIZER_LRS = {"sgd": 0.2, "momentum": 0.03, "adamw": 3e-3, "muon": 0.02}
BATCH_SIZES = {False: (1, 2, 4, 8, 16, 32), True: (1, 2, 4)}
FULL_BATCH_WINDOWS = {False: 64, True: 8}  # the "full batch": this many fixed windows of the training split
GRADIENT_DRAWS = {False: 16, True: 3}  # mini-batches drawn per batch size
LANDSCAPE_POINTS = {False: 21, True: 5}
LANDSCAPE_WINDOWS = 8  # validation windows the landscape's loss is measured on
WELL_ABOVE = 0.2  # nats: "the smallest learning rate ends well above the best"


def descent_optim(optimizer: str, lr: float) -> OptimConfig:
    return OptimConfig(optimizer=optimizer, lr=3e-3 if optimizer == "muon" else lr, muon_lr=lr, weight_decay=0.0,
                       schedule="constant", warmup=0, grad_clip=0.0)


def experiment_descent(ctx: Context) -> dict:
    quick = ctx.cfg.quick
    budget = DESCENT_BUDGET[quick]
    snapshots = budget.steps // budget.eval_interval + 2
    sweep = []
    for i, lr in enumerate(SWEEP_LRS[quick]):
        ctx.say(f"descent: adamw at learning rate {lr:g} ({i + 1}/{len(SWEEP_LRS[quick])}), {budget.steps} steps")
        run_training(ctx, train_config(ctx, budget, f"lr_{lr:g}", descent_optim("adamw", lr)))
        steps, evals = read_metrics(ctx.run_dir(f"lr_{lr:g}"))
        initial, final = evals[0].val_loss, evals[-1].val_loss
        sweep.append({"lr": lr, "final_loss": finite(final), "initial_loss": finite(initial),
                      "diverged": not math.isfinite(final) or final > initial,
                      "curve": {"step": [r.step for r in steps],
                                "train_loss": [finite(r.train_loss) for r in steps]}})
    optimizers = []
    for i, (name, lr) in enumerate(OPTIMIZER_LRS.items()):
        ctx.say(f"descent: {name} ({i + 1}/{len(OPTIMIZER_LRS)}), {budget.steps} steps")
        run_training(ctx, train_config(ctx, budget, f"opt_{name}", descent_optim(name, lr), snapshots=snapshots))
        steps, evals = read_metrics(ctx.run_dir(f"opt_{name}"))
        optimizers.append({"name": name, "val_loss": finite(evals[-1].val_loss), "lr": lr,
                           "curve": {"step": [r.step for r in evals],
                                     "val_loss": [finite(r.val_loss) for r in evals]}})
    ctx.say("descent: gradient noise per batch size")
    noise = batch_noise(ctx, ctx.run_dir("opt_adamw"), budget)
    ctx.say("descent: the optimizers' paths on one loss landscape")
    land = optimizer_landscape(ctx, [ctx.run_dir(f"opt_{o['name']}") for o in optimizers], budget)
    return {"lr_sweep": sweep, "batch_noise": noise.pop("batch_noise"), "full_batch_tokens": noise.pop("tokens"),
            "gradient_noise": noise, "optimizers": optimizers, "landscape": land,
            "settings": {"budget": dataclasses.asdict(budget),
                         "sweep": "adamw, constant learning rate, no clipping, no weight decay",
                         "optimizer_lrs": OPTIMIZER_LRS}}


def flat_grad(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The gradient of the mean cross-entropy over (x, y), as one float64 vector (autograd, as training computes it)."""
    model.zero_grad(set_to_none=True)
    training_loss(model(x), y, LossConfig()).backward()
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten().double()
                      for _, p in unique_parameters(model)])


def batch_noise(ctx: Context, run_dir: Path, budget: Budget) -> dict:
    """Mini-batch gradients against the full-batch gradient, at a run's final weights.

    The full batch is FULL_BATCH_WINDOWS windows of the training split drawn once from the seed; mini-batches of B
    of those windows are drawn from it without replacement. grad_variance is the mean of ||g_B - g_full||^2.
    """
    quick = ctx.cfg.quick
    run = load_run(run_dir, ctx.cfg.device)
    model = run.model.train()
    train_tokens = load_splits(DataConfig(data=ctx.cfg.data, tokenizer="char"), tokenizer=run.tokenizer).train
    gen = torch.Generator().manual_seed(ctx.cfg.seed)
    n, block = FULL_BATCH_WINDOWS[quick], budget.block_size
    starts = torch.randint(len(train_tokens) - block, (n,), generator=gen).numpy()
    windows = torch.from_numpy(np.asarray(train_tokens)[starts[:, None] + np.arange(block + 1)].astype(np.int64))
    device = next(model.parameters()).device
    x, y = windows[:, :-1].to(device), windows[:, 1:].to(device)
    chunk = min(n, 16)  # equal chunks: the mean of their gradients is the full batch's
    full = torch.stack([flat_grad(model, x[i:i + chunk], y[i:i + chunk]) for i in range(0, n, chunk)]).mean(0)
    rows = []
    for size in BATCH_SIZES[quick]:
        cosines, sq_dists = [], []
        for _ in range(GRADIENT_DRAWS[quick]):
            idx = torch.randperm(n, generator=gen)[:size].to(x.device)
            g = flat_grad(model, x[idx], y[idx])
            cosines.append(float(g @ full / (g.norm() * full.norm()).clamp_min(1e-30)))
            sq_dists.append(float((g - full).square().sum()))
        rows.append({"batch_size": size, "grad_cosine_to_full": float(np.mean(cosines)),
                     "grad_cosine_std": float(np.std(cosines)), "grad_variance": float(np.mean(sq_dists)),
                     "tokens": size * block})
    model.zero_grad(set_to_none=True)
    return {"batch_noise": rows, "tokens": n * block, "full_grad_norm": float(full.norm()),
            "draws": GRADIENT_DRAWS[quick], "at": f"the final weights of the adamw run ({run_dir.name})"}


@torch.no_grad()
def optimizer_landscape(ctx: Context, run_dirs: list[Path], budget: Budget) -> dict:
    """The runs' weight snapshots projected on the plane of their two principal directions around the shared
    initial weights (one seed: every run starts there), and the loss scanned over that plane."""
    run = load_run(run_dirs[0], ctx.cfg.device)
    model = run.model
    paths = [readable_snapshots(r, model) for r in run_dirs]
    origin = paths[0][0][1]
    same_start = all(all(torch.equal(p[0][1][n], origin[n]) for n in origin) for p in paths)
    for name, p in unique_parameters(model):
        p.copy_(origin[name])
    snapshots = [tensors for path in paths for _, tensors in path]
    directions, coords, ratio = trajectory_plane(model, snapshots)
    val = load_splits(DataConfig(data=ctx.cfg.data, tokenizer="char"), tokenizer=run.tokenizer).val
    tokens = fixed_tokens(val, budget.block_size, LANDSCAPE_WINDOWS)
    reach = float(np.abs(coords).max()) * 1.15 + 1e-8
    plane = scan(model, tokens, directions, LANDSCAPE_POINTS[ctx.cfg.quick], reach)
    trajectories, k = [], 0
    for run_dir, path in zip(run_dirs, paths):
        trajectories.append({"name": run_dir.name.removeprefix("opt_"),
                             "steps": [int(p.stem.split("_")[1]) for p, _ in path],
                             "coords": coords[k:k + len(path)].tolist()})
        k += len(path)
    return {"trajectories": trajectories, "grid_coords": plane.coords, "grid_losses": plane.losses,
            "explained_variance": ratio.tolist(), "same_start": same_start, "windows": len(tokens) // budget.block_size}


def descent_claims(result: dict) -> dict:
    sweep = sorted(result["lr_sweep"], key=lambda r: r["lr"])
    finals = [r["final_loss"] for r in sweep if r["final_loss"] is not None and not r["diverged"]]
    best = min(finals) if finals else None
    smallest = sweep[0]["final_loss"]
    cosines = [r["grad_cosine_to_full"] for r in sorted(result["batch_noise"], key=lambda r: r["batch_size"])]
    return {
        "largest_lr_diverges": sweep[-1]["diverged"],
        "smallest_lr_well_above_best": (best is not None and smallest is not None
                                        and smallest - best >= WELL_ABOVE),
        "cosine_rises_with_batch_size": all(b > a for a, b in zip(cosines, cosines[1:])),
    }


def descent_conclusion(result: dict) -> str:
    sweep = sorted(result["lr_sweep"], key=lambda r: r["lr"])
    claims = descent_claims(result)
    good = [r for r in sweep if r["final_loss"] is not None and not r["diverged"]]
    best = min(good, key=lambda r: r["final_loss"]) if good else None
    small, large = sweep[0], sweep[-1]
    diverged = [f"{r['lr']:g}" for r in sweep if r["diverged"]]
    parts = []
    if best is not None:
        parts.append(f"The learning rate decides the descent: at {small['lr']:g} the loss crawled to "
                     f"{fmt(small['final_loss'])}, {fmt(small['final_loss'] - best['final_loss'], '.2f')} nats "
                     f"above the best, {fmt(best['final_loss'])} at {best['lr']:g};")
    else:
        parts.append("No learning rate of the sweep ended below its starting loss;")
    if diverged:
        parts[-1] += (f" at {', '.join(diverged)} it diverged (the loss ended above where it started"
                      f"{', at ' + fmt(large['final_loss']) if large['diverged'] else ''}).")
    else:
        parts[-1] += f" none diverged, not even {large['lr']:g}."
    noise = sorted(result["batch_noise"], key=lambda r: r["batch_size"])
    parts.append(f"Mini-batch gradients point towards the full-batch gradient (over {result['full_batch_tokens']:,} "
                 f"tokens) the more tokens they average: their cosine to it went from "
                 f"{noise[0]['grad_cosine_to_full']:.2f} at batch size {noise[0]['batch_size']} to "
                 f"{noise[-1]['grad_cosine_to_full']:.2f} at {noise[-1]['batch_size']}"
                 f"{'' if claims['cosine_rises_with_batch_size'] else ', though not at every step in between'}, "
                 f"and their squared distance from it fell from {noise[0]['grad_variance']:.3g} to "
                 f"{noise[-1]['grad_variance']:.3g}.")
    ranked = sorted((o for o in result["optimizers"] if o["val_loss"] is not None), key=lambda o: o["val_loss"])
    if ranked:
        parts.append("On the same budget the optimizers ranked " + ", ".join(
            f"{o['name']} ({fmt(o['val_loss'])})" for o in ranked) + " by validation loss.")
    parts.append(verdict(claims, "Too small a step crawls, too large a step diverges, and a small batch is a "
                                 "noisy estimate of the way down."))
    return " ".join(parts)


def descent_table(result: dict) -> tuple[list[str], list[list[str]]]:
    rows = [[f"lr {r['lr']:g}", fmt(r["final_loss"]), "diverged" if r["diverged"] else ""] for r in result["lr_sweep"]]
    rows += [[f"batch {r['batch_size']}", f"cos {r['grad_cosine_to_full']:.3f}", f"var {r['grad_variance']:.3g}"]
             for r in result["batch_noise"]]
    rows += [[o["name"], fmt(o["val_loss"]), f"lr {o['lr']:g}"] for o in result["optimizers"]]
    return ["setting", "loss / cosine", "note"], rows


def descent_charts(result: dict) -> list[tuple[str, object, str]]:
    sweep = sorted(result["lr_sweep"], key=lambda r: r["lr"])
    fig1, ax = figure("loss curves of a learning-rate sweep (AdamW)", "step", "train loss (smoothed)", title_size=TITLE_SIZE)
    for i, r in enumerate(sweep):
        ys = smooth(nan(r["curve"]["train_loss"]))
        label = f"lr {r['lr']:g}" + (" (diverged)" if r["diverged"] else "")
        ax.plot(r["curve"]["step"], ys, color=color(i), lw=1.3, ls="--" if r["diverged"] else "-", label=label)
        if r["diverged"] and r["curve"]["step"]:
            last = next((y for y in reversed(ys) if math.isfinite(y)), None)
            if last is not None:
                ax.plot([r["curve"]["step"][-1]], [last], "x", color=color(i), ms=9, mew=2)
    ax.set_yscale("log")
    fig2, ax = figure("final validation loss against learning rate", "learning rate", "loss (nats/token)", title_size=TITLE_SIZE)
    xs = [r["lr"] for r in sweep]
    ax.plot(xs, [r["final_loss"] if r["final_loss"] is not None else math.nan for r in sweep], "o-", color=color(0))
    for r in sweep:
        if r["diverged"]:
            ax.plot([r["lr"]], [r["final_loss"] if r["final_loss"] is not None else sweep[0]["initial_loss"]], "x",
                    color="#d62728", ms=10, mew=2)
    ax.axhline(sweep[0]["initial_loss"] or math.nan, color="#888", ls=":", label="loss at step 0")
    ax.plot([], [], "x", color="#d62728", ms=8, mew=2, label="diverged")
    ax.set_xscale("log")
    ax.set_yscale("log")
    noise = sorted(result["batch_noise"], key=lambda r: r["batch_size"])
    fig3, ax = figure(f"mini-batch gradient against the full batch ({result['full_batch_tokens']:,} tokens)",
                      "batch size (sequences)", "cosine to the full-batch gradient", title_size=TITLE_SIZE)
    ax.errorbar([r["batch_size"] for r in noise], [r["grad_cosine_to_full"] for r in noise],
                yerr=[r.get("grad_cosine_std", 0.0) for r in noise], fmt="o-", color=color(0), capsize=3,
                label="mean cosine (bars: std over draws)")
    ax2 = ax.twinx()
    ax2.plot([r["batch_size"] for r in noise], [r["grad_variance"] for r in noise], "s--", color=color(1),
             label="mean ||g_B - g_full||^2")
    ax2.set_yscale("log")
    ax2.set_ylabel("squared distance from the full gradient")
    ax.set_xscale("log", base=2)
    ax.set_xticks([r["batch_size"] for r in noise], [str(r["batch_size"]) for r in noise])
    ax.set_xticks([], minor=True)
    ax2.legend(fontsize=8, loc="center right")
    ax.legend(fontsize=8, loc="upper center")
    fig4, ax = figure("the same budget, four optimizers", "step", "validation loss (nats/token)", title_size=TITLE_SIZE)
    for i, o in enumerate(result["optimizers"]):
        ax.plot(o["curve"]["step"], nan(o["curve"]["val_loss"]), "o-", ms=3, color=color(i),
                label=f"{o['name']} (lr {o['lr']:g})")
    return [("descent_lr_curves.png", finish(fig1), "train loss against steps for each learning rate"),
            ("descent_lr_final.png", finish(fig2), "final validation loss against learning rate"),
            ("descent_batch_noise.png", finish(fig3), "gradient noise against batch size"),
            ("descent_optimizers.png", finish(fig4), "validation loss against steps, per optimizer"),
            ("descent_landscape.png", landscape_figure(result["landscape"]),
             "the optimizers' paths on one loss landscape")]


def landscape_figure(land: dict):
    fig, ax = figure("four optimizers on one loss landscape (from the shared start)", "", "", title_size=TITLE_SIZE)
    grid = np.array(land["grid_losses"], dtype=float)
    finite_grid = grid[np.isfinite(grid)]
    if finite_grid.size:
        top = min(finite_grid.max(), finite_grid.min() + 3 * (np.median(finite_grid) - finite_grid.min() + 1e-6))
        cs = ax.contour(land["grid_coords"], land["grid_coords"], grid, levels=np.linspace(finite_grid.min(), top, 16),
                        cmap="viridis", linewidths=0.9)
        ax.clabel(cs, cs.levels[::3], inline=True, fontsize=7, fmt="%.2f")
    reach = max(abs(c) for t in land["trajectories"] for point in t["coords"] for c in point) or 1.0
    for i, t in enumerate(land["trajectories"]):
        pts = np.array(t["coords"])
        ax.plot(pts[:, 0], pts[:, 1], "o-", color=color(i), ms=3, lw=1.4, label=t["name"])
        if np.abs(pts[-1]).max() > 0.15 * reach:  # names of paths that end near the start would pile up there
            ax.annotate(t["name"], pts[-1], fontsize=8, xytext=(4, 4), textcoords="offset points", color=color(i))
    ax.plot([0], [0], "*", color="black", ms=10, label="start")
    ev = land["explained_variance"]
    ax.set_xlabel(f"PC1 of the paths ({ev[0]:.0%} of their variance)")
    ax.set_ylabel(f"PC2 ({ev[1]:.0%})")
    return finish(fig, legend="lower left")


EXPERIMENT = Experiment(experiment_descent, descent_claims, descent_conclusion, descent_table, descent_charts,
                        "Gradient descent: step size, batch noise and optimizers",
                        "Gradient descent takes greedy downhill steps on noisy mini-batches: a learning-rate sweep, "
                        "the noise of mini-batch gradients per batch size, and four optimizers on one budget and "
                        "one landscape.")
