"""Three ideas of how language models learn, as measured experiments (`lmlab experiment loss|descent|patterns`).

- loss: a loss must be specific, computable and smooth. The same model trains on cross-entropy, on the squared
  error of its predicted probabilities, and on top-1 accuracy, whose gradient is zero.
- descent: gradient descent takes greedy steps on noisy mini-batches. A learning-rate sweep from too small to
  divergent, the gradient noise of each batch size, and SGD, momentum, AdamW and Muon on one loss landscape.
- patterns: next-token prediction rewards the patterns of the text, not truth. Arithmetic statements whose false
  answer is more frequent in the corpus than the true one.

Each experiment trains with `train()` and measures with the library's own functions (stream_losses, the landscape's
scans, training_loss). Its budget is counted in steps, so a seed gives the same numbers. It writes DIR/result.json
and DIR/index.html (charts also as PNGs), and its conclusion is computed from its measurements.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import html
import math
import os
import platform
import random
import shlex
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from . import __version__, rundir
from .checkpoint import load_run
from .common import LmlabError, atomic_write_bytes, atomic_write_json
from .config import TrainConfig
from .data import BUILTIN, DataConfig, encode_text, iter_text, load_splits, resolve_source
from .evaluate import stream_losses
from .landscape import fixed_tokens, readable_snapshots, scan, trajectory_plane
from .loss import OBJECTIVES, LossConfig, training_loss
from .model import ModelConfig, unique_parameters
from .optim import OptimConfig
from .train import train

EXPERIMENTS = ("loss", "descent", "patterns")
MARKER = ".lmlab-experiment"  # marks a folder an experiment wrote, so running it again may replace its runs
RUNS = "runs"  # DIR/runs/NAME: the training runs of an experiment (lmlab report and landscape read them)


@dataclass
class ExperimentConfig:
    """Where an experiment reads and writes, and its seed; each experiment's model and steps are its own (Budget)."""

    data: str = BUILTIN
    """Text to train on: a file, folder, glob, 'builtin' or a corpus name (as for `lmlab train --data`)."""
    out: str = ""
    """Folder for index.html, result.json, the charts and the training runs (default: experiments/NAME)."""
    json: bool = False
    """Print result.json on stdout (the table goes to stderr)."""
    seed: int = 1337
    """Seed of every run: initial weights, batches, generated statements."""
    quick: bool = False
    """A micro budget of a few seconds (for tests): a tiny model and a few steps, whose numbers show little."""
    device: str = "cpu"
    """auto, cpu, cuda or mps."""


@dataclass(frozen=True)
class Budget:
    """The model and the steps of an experiment, fixed so that the same seed gives the same numbers."""

    n_layer: int
    n_head: int
    n_embd: int
    block_size: int
    batch_size: int
    steps: int
    eval_interval: int
    eval_tokens: int

    def model(self) -> ModelConfig:
        return ModelConfig(block_size=self.block_size, n_layer=self.n_layer, n_head=self.n_head, n_embd=self.n_embd)


# ---------------------------------------------------------------------------------------------------------------
# Plumbing shared by the experiments: runs in DIR/runs, quiet training, the logs it wrote


@dataclass
class Context:
    """One experiment's settings, its output folder and its log."""

    name: str
    cfg: ExperimentConfig
    out: Path
    say: Callable[[str], None]

    @property
    def log(self) -> Path:
        return self.out / "log.txt"

    def run_dir(self, name: str) -> Path:
        return self.out / RUNS / name


def prepare_out(out: Path) -> None:
    """Create the output folder, or reuse one an experiment wrote before (its old runs are removed)."""
    if out.exists() and not out.is_dir():
        raise LmlabError(f"--out {out} is a file; give a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / MARKER).is_file():
        raise LmlabError(f"--out {out} holds files that no experiment wrote; give a new or empty folder")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / MARKER, b"written by lmlab experiment\n")
    runs = out / RUNS
    if runs.is_symlink():
        runs.unlink()  # a link is removed itself, never what it points to
    elif runs.exists():
        shutil.rmtree(runs)
    runs.mkdir()
    if (out / "log.txt").is_file():
        (out / "log.txt").unlink()


def train_config(ctx: Context, budget: Budget, run: str, optim: OptimConfig, loss: Optional[LossConfig] = None,
                 data: Optional[DataConfig] = None, steps: int = 0, snapshots: int = 0,
                 resume: bool = False) -> TrainConfig:
    """A run of `budget` on the experiment's data, recording only what the experiment reads: metrics, one checkpoint
    at the end, and `snapshots` weight snapshots (first and last kept). A non-finite step never stops it: a
    divergent learning rate is part of what the descent experiment shows."""
    steps = steps or budget.steps
    run_dir = ctx.run_dir(run)
    return TrainConfig(
        data=data or DataConfig(data=ctx.cfg.data, tokenizer="char"), model=budget.model(), optim=optim,
        loss=loss or LossConfig(), preset=f"experiment-{ctx.name}", out=str(run_dir),
        resume=str(run_dir) if resume else None, max_steps=steps, max_time=0.0, batch_size=budget.batch_size,
        eval_interval=budget.eval_interval, eval_tokens=budget.eval_tokens, checkpoint_interval=steps,
        keep_checkpoints=1, seed=ctx.cfg.seed, device=ctx.cfg.device, sample_tokens=0, progress=False, probe=False,
        inside=False, telemetry_interval=0, trajectory_snapshots=snapshots, tensorboard=False,
        max_bad_steps=steps + 1)


def run_training(ctx: Context, cfg: TrainConfig) -> dict:
    """train(cfg), its progress lines appended to DIR/log.txt instead of the terminal."""
    with open(ctx.log, "a", encoding="utf-8") as log, contextlib.redirect_stderr(log), contextlib.redirect_stdout(log):
        return train(cfg)


def read_metrics(run_dir: Path) -> tuple[list[dict], list[dict]]:
    """The records of the run's training steps, and of its evaluations."""
    records = rundir.read_jsonl(run_dir, rundir.METRICS)
    return [r for r in records if "train_loss" in r], [r for r in records if "val_loss" in r]


def finite(x) -> Optional[float]:
    """A float for result.json: None where it is not finite (JSON has no NaN or infinity)."""
    return float(x) if isinstance(x, (int, float)) and math.isfinite(x) else None


def cpu_name() -> str:
    """The CPU's model name, as lscpu shows it."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def weight_change(run_dir: Path, model: torch.nn.Module) -> Optional[float]:
    """||w_last - w_first|| / ||w_first|| over the run's first and last weight snapshots."""
    snaps = readable_snapshots(run_dir, model)
    if len(snaps) < 2:
        return None
    first, last = snaps[0][1], snaps[-1][1]
    names = [n for n, _ in unique_parameters(model)]
    diff = math.sqrt(sum(float((last[n].double() - first[n].double()).square().sum()) for n in names))
    size = math.sqrt(sum(float(first[n].double().square().sum()) for n in names))
    return diff / max(size, 1e-30)


# ---------------------------------------------------------------------------------------------------------------
# loss: cross-entropy, squared error and accuracy as training objectives


LOSS_BUDGET = {False: Budget(n_layer=2, n_head=4, n_embd=96, block_size=64, batch_size=32, steps=300,
                             eval_interval=25, eval_tokens=8192),
               True: Budget(n_layer=1, n_head=2, n_embd=32, block_size=32, batch_size=8, steps=12, eval_interval=4,
                            eval_tokens=1024)}
# The tiny recipe's short-budget optimizer, without weight decay: decay shrinks the weights even where the gradient
# is zero, and the experiment asks what each objective's gradient alone does to the model.
LOSS_OPTIM = dict(optimizer="muon", lr=0.02, muon_lr=0.02, muon_momentum=0.9, weight_decay=0.0, schedule="wsd",
                  decay_fraction=0.4, grad_clip=1.0)
ACCURACY_DRIFT = 0.02  # "stays": within this of its value at step 0
ACCURACY_GAP = 0.2  # "learns more": cross-entropy's final accuracy at least this much higher


def experiment_loss(ctx: Context) -> dict:
    budget = LOSS_BUDGET[ctx.cfg.quick]
    optim = OptimConfig(warmup=max(1, budget.steps // 15), **LOSS_OPTIM)
    objectives = []
    for i, name in enumerate(OBJECTIVES):
        ctx.say(f"loss: training on {name} ({i + 1}/{len(OBJECTIVES)}), {budget.steps} steps")
        cfg = train_config(ctx, budget, name, optim, LossConfig(objective=name), snapshots=2)
        run_training(ctx, cfg)
        steps, evals = read_metrics(ctx.run_dir(name))
        grad_norms = [r["grad_norm"] for r in steps]
        accuracies = [r["val_accuracy"] for r in evals]
        model = load_run(ctx.run_dir(name)).model
        objectives.append({
            "name": name,
            "val_loss": finite(evals[-1]["val_loss"]),
            "val_accuracy": finite(evals[-1]["val_accuracy"]),
            # autograd's gradient, as train_step measured it: the global norm of every parameter's .grad after
            # backward, before clipping; it is exactly 0 only when every entry of every gradient is 0
            "nonzero_grad_fraction": sum(g != 0 for g in grad_norms) / len(grad_norms),
            "steps": len(steps),
            "val_accuracy_at_step_0": finite(accuracies[0]),
            "max_accuracy_drift": finite(max(abs(a - accuracies[0]) for a in accuracies)),
            "mean_grad_norm": finite(float(np.mean(grad_norms))),
            "weight_change": finite(weight_change(ctx.run_dir(name), model)),
            "curve": {"step": [r["step"] for r in evals], "val_loss": [finite(r["val_loss"]) for r in evals],
                      "val_accuracy": [finite(a) for a in accuracies]},
            "grad_norm": [finite(g) for g in grad_norms],
        })
        ctx.say(f"  val loss {objectives[-1]['val_loss']:.4f}, accuracy {objectives[-1]['val_accuracy']:.1%}, "
                f"non-zero gradient at {objectives[-1]['nonzero_grad_fraction']:.0%} of steps")
    return {"objectives": objectives,
            "settings": {"budget": dataclasses.asdict(budget), "optimizer": {**LOSS_OPTIM, "warmup": optim.warmup}}}


def loss_claims(result: dict) -> dict:
    by_name = {o["name"]: o for o in result["objectives"]}
    acc, ce = by_name["accuracy"], by_name["cross_entropy"]
    return {
        "accuracy_gives_no_gradient": acc["nonzero_grad_fraction"] == 0,
        "accuracy_model_stays": acc["max_accuracy_drift"] is not None and acc["max_accuracy_drift"] <= ACCURACY_DRIFT,
        "cross_entropy_learns_more": (ce["val_accuracy"] or 0.0) - (acc["val_accuracy"] or 0.0) >= ACCURACY_GAP,
    }


def loss_conclusion(result: dict) -> str:
    """What the measurements say, in words computed from them."""
    by_name = {o["name"]: o for o in result["objectives"]}
    acc, ce, se = by_name["accuracy"], by_name["cross_entropy"], by_name["squared_error"]
    claims = loss_claims(result)
    zero_steps = round((1 - acc["nonzero_grad_fraction"]) * acc["steps"])
    parts = [f"Top-1 accuracy as the objective gave an exactly zero gradient at {zero_steps} of its {acc['steps']} "
             f"steps"]
    if claims["accuracy_gives_no_gradient"]:
        moved = ("did not change at all" if acc["weight_change"] == 0 else
                 f"changed by {_pct(acc['weight_change'])}, though not by a gradient")
        stayed = (f"stayed at its {_pct(acc['val_accuracy_at_step_0'])} of step 0" if acc["max_accuracy_drift"] == 0
                  else f"stayed within {100 * (acc['max_accuracy_drift'] or 0):.1f} points of its "
                       f"{_pct(acc['val_accuracy_at_step_0'])} at step 0")
        parts[-1] += f", so the optimizer had nothing to follow: the weights {moved} and validation accuracy {stayed}."
    else:
        parts[-1] += (f"; its gradient was non-zero at the other {acc['steps'] - zero_steps}, and validation "
                      f"accuracy moved by up to {100 * (acc['max_accuracy_drift'] or 0):.1f} points.")
    gap = 100 * ((ce["val_accuracy"] or 0) - (acc["val_accuracy"] or 0))
    parts.append(f"Cross-entropy, a smooth function of the same predictions, took the same model to "
                 f"{_pct(ce['val_accuracy'])} accuracy ({gap:+.1f} points against the accuracy objective) and a "
                 f"validation loss of {_num(ce['val_loss'])}; squared error on the probabilities reached "
                 f"{_pct(se['val_accuracy'])} and {_num(se['val_loss'])}.")
    parts.append(_verdict(claims, "The metric we care about cannot be the loss we train on: it has no slope to "
                                  "descend, while a specific, computable and smooth loss improves that very metric."))
    return " ".join(parts)


def loss_table(result: dict) -> tuple[list[str], list[list[str]]]:
    rows = [[o["name"], _num(o["val_loss"]), _pct(o["val_accuracy"]), _pct(o["val_accuracy_at_step_0"]),
             f"{o['nonzero_grad_fraction']:.0%}", _num(o["mean_grad_norm"], ".3g"), _pct(o["weight_change"])]
            for o in result["objectives"]]
    return (["objective", "val loss", "val accuracy", "accuracy at step 0", "steps with a gradient",
             "mean grad norm", "weight change"], rows)


def loss_charts(result: dict) -> list[tuple[str, object, str]]:
    objs = result["objectives"]
    fig1, ax = _figure("validation cross-entropy", "step", "loss (nats/token)")
    for i, o in enumerate(objs):
        ax.plot(o["curve"]["step"], _nan(o["curve"]["val_loss"]), marker="o", ms=3, color=_color(i), label=o["name"])
    fig2, ax = _figure("validation accuracy (top-1)", "step", "accuracy (%)")
    for i, o in enumerate(objs):
        ax.plot(o["curve"]["step"], [100 * v if v is not None else math.nan for v in o["curve"]["val_accuracy"]],
                marker="o", ms=3, color=_color(i), label=o["name"])
    fig3, ax = _figure("gradient norm each objective produced (0 drawn at the bottom)", "step",
                       "global gradient norm")
    for i, o in enumerate(objs):
        zero = all(g == 0 for g in o["grad_norm"])
        ax.plot(range(1, len(o["grad_norm"]) + 1), _nan(o["grad_norm"]), color=_color(i), lw=3 if zero else 1,
                label=o["name"] + (" (0 at every step)" if zero else ""))
    ax.set_yscale("symlog", linthresh=1e-3)
    ax.set_ylim(bottom=0)
    return [("loss_val_loss.png", _finish(fig1), "validation cross-entropy against steps, per training objective"),
            ("loss_val_accuracy.png", _finish(fig2), "validation accuracy against steps, per training objective"),
            ("loss_grad_norm.png", _finish(fig3), "gradient norm against steps, per training objective")]


# ---------------------------------------------------------------------------------------------------------------
# descent: learning rates, batch sizes and optimizers


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
        initial, final = evals[0]["val_loss"], evals[-1]["val_loss"]
        sweep.append({"lr": lr, "final_loss": finite(final), "initial_loss": finite(initial),
                      "diverged": not math.isfinite(final) or final > initial,
                      "curve": {"step": [r["step"] for r in steps], "train_loss": [finite(r["train_loss"])
                                                                                  for r in steps]}})
    optimizers = []
    for i, (name, lr) in enumerate(OPTIMIZER_LRS.items()):
        ctx.say(f"descent: {name} ({i + 1}/{len(OPTIMIZER_LRS)}), {budget.steps} steps")
        run_training(ctx, train_config(ctx, budget, f"opt_{name}", descent_optim(name, lr), snapshots=snapshots))
        steps, evals = read_metrics(ctx.run_dir(f"opt_{name}"))
        optimizers.append({"name": name, "val_loss": finite(evals[-1]["val_loss"]), "lr": lr,
                           "curve": {"step": [r["step"] for r in evals],
                                     "val_loss": [finite(r["val_loss"]) for r in evals]}})
    ctx.say("descent: gradient noise per batch size")
    noise = batch_noise(ctx, ctx.run_dir("opt_adamw"), budget)
    ctx.say("descent: the optimizers' paths on one loss landscape")
    land = optimizer_landscape(ctx, [ctx.run_dir(f"opt_{o['name']}") for o in optimizers], budget)
    return {"lr_sweep": sweep, "batch_noise": noise.pop("batch_noise"), "full_batch_tokens": noise.pop("tokens"),
            "gradient_noise": noise, "optimizers": optimizers, "landscape": land,
            "settings": {"budget": dataclasses.asdict(budget), "sweep": "adamw, constant learning rate, no clipping, no weight "
                                                             "decay", "optimizer_lrs": OPTIMIZER_LRS}}


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
                     f"{_num(small['final_loss'])}, {_num(small['final_loss'] - best['final_loss'], '.2f')} nats "
                     f"above the best, {_num(best['final_loss'])} at {best['lr']:g};")
    else:
        parts.append("No learning rate of the sweep ended below its starting loss;")
    if diverged:
        parts[-1] += (f" at {', '.join(diverged)} it diverged (the loss ended above where it started"
                      f"{', at ' + _num(large['final_loss']) if large['diverged'] else ''}).")
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
            f"{o['name']} ({_num(o['val_loss'])})" for o in ranked) + " by validation loss.")
    parts.append(_verdict(claims, "Too small a step crawls, too large a step diverges, and a small batch is a "
                                  "noisy estimate of the way down."))
    return " ".join(parts)


def descent_table(result: dict) -> tuple[list[str], list[list[str]]]:
    rows = [[f"lr {r['lr']:g}", _num(r["final_loss"]), "diverged" if r["diverged"] else ""] for r in result["lr_sweep"]]
    rows += [[f"batch {r['batch_size']}", f"cos {r['grad_cosine_to_full']:.3f}", f"var {r['grad_variance']:.3g}"]
             for r in result["batch_noise"]]
    rows += [[o["name"], _num(o["val_loss"]), f"lr {o['lr']:g}"] for o in result["optimizers"]]
    return ["setting", "loss / cosine", "note"], rows


def descent_charts(result: dict) -> list[tuple[str, object, str]]:
    sweep = sorted(result["lr_sweep"], key=lambda r: r["lr"])
    fig1, ax = _figure("loss curves of a learning-rate sweep (AdamW)", "step", "train loss (smoothed)")
    for i, r in enumerate(sweep):
        ys = _smooth(_nan(r["curve"]["train_loss"]))
        label = f"lr {r['lr']:g}" + (" (diverged)" if r["diverged"] else "")
        ax.plot(r["curve"]["step"], ys, color=_color(i), lw=1.3, ls="--" if r["diverged"] else "-", label=label)
        if r["diverged"] and r["curve"]["step"]:
            last = next((y for y in reversed(ys) if math.isfinite(y)), None)
            if last is not None:
                ax.plot([r["curve"]["step"][-1]], [last], "x", color=_color(i), ms=9, mew=2)
    ax.set_yscale("log")
    fig2, ax = _figure("final validation loss against learning rate", "learning rate", "loss (nats/token)")
    xs = [r["lr"] for r in sweep]
    ax.plot(xs, [r["final_loss"] if r["final_loss"] is not None else math.nan for r in sweep], "o-", color=_color(0))
    for r in sweep:
        if r["diverged"]:
            ax.plot([r["lr"]], [r["final_loss"] if r["final_loss"] is not None else sweep[0]["initial_loss"]], "x",
                    color="#d62728", ms=10, mew=2)
    ax.axhline(sweep[0]["initial_loss"] or math.nan, color="#888", ls=":", label="loss at step 0")
    ax.plot([], [], "x", color="#d62728", ms=8, mew=2, label="diverged")
    ax.set_xscale("log")
    ax.set_yscale("log")
    noise = sorted(result["batch_noise"], key=lambda r: r["batch_size"])
    fig3, ax = _figure(f"mini-batch gradient against the full batch ({result['full_batch_tokens']:,} tokens)",
                       "batch size (sequences)", "cosine to the full-batch gradient")
    ax.errorbar([r["batch_size"] for r in noise], [r["grad_cosine_to_full"] for r in noise],
                yerr=[r.get("grad_cosine_std", 0.0) for r in noise], fmt="o-", color=_color(0), capsize=3,
                label="mean cosine (bars: std over draws)")
    ax2 = ax.twinx()
    ax2.plot([r["batch_size"] for r in noise], [r["grad_variance"] for r in noise], "s--", color=_color(1),
             label="mean ||g_B - g_full||^2")
    ax2.set_yscale("log")
    ax2.set_ylabel("squared distance from the full gradient")
    ax.set_xscale("log", base=2)
    ax.set_xticks([r["batch_size"] for r in noise], [str(r["batch_size"]) for r in noise])
    ax.set_xticks([], minor=True)
    ax2.legend(fontsize=8, loc="center right")
    ax.legend(fontsize=8, loc="upper center")
    fig4, ax = _figure("the same budget, four optimizers", "step", "validation loss (nats/token)")
    for i, o in enumerate(result["optimizers"]):
        ax.plot(o["curve"]["step"], _nan(o["curve"]["val_loss"]), "o-", ms=3, color=_color(i),
                label=f"{o['name']} (lr {o['lr']:g})")
    return [("descent_lr_curves.png", _finish(fig1), "train loss against steps for each learning rate"),
            ("descent_lr_final.png", _finish(fig2), "final validation loss against learning rate"),
            ("descent_batch_noise.png", _finish(fig3), "gradient noise against batch size"),
            ("descent_optimizers.png", _finish(fig4), "validation loss against steps, per optimizer"),
            ("descent_landscape.png", landscape_figure(result["landscape"]),
             "the optimizers' paths on one loss landscape")]


def landscape_figure(land: dict):
    fig, ax = _figure("four optimizers on one loss landscape (from the shared start)", "", "")
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
        ax.plot(pts[:, 0], pts[:, 1], "o-", color=_color(i), ms=3, lw=1.4, label=t["name"])
        if np.abs(pts[-1]).max() > 0.15 * reach:  # names of paths that end near the start would pile up there
            ax.annotate(t["name"], pts[-1], fontsize=8, xytext=(4, 4), textcoords="offset points", color=_color(i))
    ax.plot([0], [0], "*", color="black", ms=10, label="start")
    ev = land["explained_variance"]
    ax.set_xlabel(f"PC1 of the paths ({ev[0]:.0%} of their variance)")
    ax.set_ylabel(f"PC2 ({ev[1]:.0%})")
    return _finish(fig, legend="lower left")


# ---------------------------------------------------------------------------------------------------------------
# patterns: statements whose false completion is the frequent one


PATTERNS_BUDGET = {False: Budget(n_layer=2, n_head=4, n_embd=96, block_size=64, batch_size=32, steps=800,
                                 eval_interval=100, eval_tokens=0),
                   True: Budget(n_layer=1, n_head=2, n_embd=32, block_size=32, batch_size=8, steps=12,
                                eval_interval=6, eval_tokens=0)}
PATTERNS_OPTIM = dict(optimizer="muon", lr=0.01, muon_lr=0.02, muon_momentum=0.9, weight_decay=0.0,
                      schedule="constant", grad_clip=1.0)
RATIOS = (1, 3, 9)  # false : true in the corpus
COPIES = 20  # occurrences of every statement in the corpus, split between its completions by the ratio
FACTS_PER_GROUP = {False: 8, True: 2}
PLATEAU = 0.01  # the statements' loss "stops falling" when a chunk of training lowers it by less than 1%
OFFSETS = (-10, -2, -1, 1, 2, 10)  # a false answer: the true sum moved by one of these


@dataclass
class Fact:
    prompt: str
    true: str
    false: str
    ratio: int
    """false : true occurrences in the corpus; 0 for the control (true only)."""

    @property
    def counts(self) -> tuple[int, int]:
        """(true, false) occurrences in the corpus."""
        if self.ratio == 0:
            return COPIES, 0
        true = COPIES // (self.ratio + 1)
        return true, COPIES - true


def make_facts(seed: int, per_group: int) -> list[Fact]:
    """Statements 'A plus B is C.' with distinct (A, B): per_group for each ratio, then per_group for the control."""
    rng = random.Random(seed)
    pairs = rng.sample([(a, b) for a in range(2, 50) for b in range(a + 1, 50)], per_group * (len(RATIOS) + 1))
    facts = []
    for i, (a, b) in enumerate(pairs):
        false = a + b + rng.choice([o for o in OFFSETS if a + b + o > 0])
        facts.append(Fact(f"{a} plus {b} is ", f"{a + b}.", f"{false}.", (*RATIOS, 0)[i // per_group]))
    return facts


def patterns_corpus(facts: list[Fact], ordinary: str, seed: int) -> tuple[str, str]:
    """The training text: every statement line as often as its counts say, in random order, put between the lines of
    as many characters of ordinary text (whole lines, in their order) at random places; and the statements alone, in
    another order: the text their loss is measured on."""
    rng = random.Random(seed)
    statements = [f.prompt + c for f in facts for c, n in zip((f.true, f.false), f.counts) for _ in range(n)]
    size = sum(len(s) + 1 for s in statements)
    lines, total = [], 0
    for line in ordinary.splitlines():
        if line.strip():
            lines.append(line)
            total += len(line) + 1
        if total >= size:
            break
    rng.shuffle(statements)
    slots = [True] * len(statements) + [False] * len(lines)  # True: the next statement; False: the next line of text
    rng.shuffle(slots)
    pending_statements, pending_lines = iter(statements), iter(lines)
    mixed = [next(pending_statements) if s else next(pending_lines) for s in slots]
    alone = list(statements)
    rng.shuffle(alone)
    return "\n".join(mixed) + "\n", "\n".join(alone) + "\n"


def ordinary_text(source: str, chars: int) -> str:
    """The first `chars` characters (about) of a corpus."""
    pieces, total = [], 0
    for piece in iter_text(resolve_source(source)):
        pieces.append(piece)
        total += len(piece)
        if total >= chars:
            break
    return "".join(pieces)[:chars]


def completion_probability(model: torch.nn.Module, tokenizer, prompt: str, completion: str) -> float:
    """p(completion | a new line, then prompt): the product of the model's next-token probabilities."""
    context = encode_text(tokenizer, "\n" + prompt)
    ids = encode_text(tokenizer, "\n" + prompt + completion)
    nats = stream_losses(model, ids, model.cfg.block_size, batch_size=1).nats
    return math.exp(-float(nats[len(context) - 1:].double().sum()))


def experiment_patterns(ctx: Context) -> dict:
    quick = ctx.cfg.quick
    budget = PATTERNS_BUDGET[quick]
    facts = make_facts(ctx.cfg.seed, FACTS_PER_GROUP[quick])
    statement_chars = sum((len(f.prompt) + len(f.true) + 1) * COPIES for f in facts)
    train_text, statements = patterns_corpus(facts, ordinary_text(ctx.cfg.data, 3 * statement_chars), ctx.cfg.seed)
    atomic_write_bytes(ctx.out / "corpus.txt", train_text.encode("utf-8"))
    atomic_write_bytes(ctx.out / "statements.txt", statements.encode("utf-8"))
    data = DataConfig(data=str(ctx.out / "corpus.txt"), tokenizer="char", val_data=str(ctx.out / "statements.txt"))
    optim = OptimConfig(warmup=max(1, budget.eval_interval // 2), **PATTERNS_OPTIM)
    done, plateaued, losses = 0, False, []
    while done < budget.steps and not plateaued:
        done = min(done + budget.eval_interval, budget.steps)
        ctx.say(f"patterns: training to step {done} (at most {budget.steps}, until the statements' loss stops "
                f"falling)")
        run_training(ctx, train_config(ctx, budget, "patterns", optim, data=data, steps=done, resume=done > budget.eval_interval))
        losses = read_metrics(ctx.run_dir("patterns"))[1]
        if len(losses) >= 3:  # step 0, then one per chunk: compare the last two chunks
            before, now = losses[-2]["val_loss"], losses[-1]["val_loss"]
            plateaued = before - now < PLATEAU * before
    run = load_run(ctx.run_dir("patterns"), ctx.cfg.device)
    scored = []
    for f in facts:
        scored.append({"statement": f.prompt.strip(), "true": f.true, "false": f.false, "ratio": f.ratio,
                       "counts": {"true": f.counts[0], "false": f.counts[1]},
                       "p_true": completion_probability(run.model, run.tokenizer, f.prompt, f.true),
                       "p_false": completion_probability(run.model, run.tokenizer, f.prompt, f.false)})
    ratios = []
    for r in RATIOS:
        group = [s for s in scored if s["ratio"] == r]
        ratios.append({"corpus_ratio": r, "frequent_share": r / (r + 1),
                       "p_frequent": float(np.mean([s["p_false"] for s in group])),
                       "p_true": float(np.mean([s["p_true"] for s in group])), "facts": group})
    control = [s for s in scored if s["ratio"] == 0]
    return {"ratios": ratios,
            "control": {"p_true": float(np.mean([s["p_true"] for s in control])),
                        "p_false": float(np.mean([s["p_false"] for s in control])), "facts": control},
            "training": {"steps": done, "plateaued": plateaued, "step": [r["step"] for r in losses],
                         "statements_loss": [finite(r["val_loss"]) for r in losses]},
            "corpus": {"characters": len(train_text), "statement_lines": statements.count("\n"),
                       "copies_per_statement": COPIES, "facts_per_group": FACTS_PER_GROUP[quick]},
            "settings": {"budget": dataclasses.asdict(budget), "optimizer": {**PATTERNS_OPTIM, "warmup": optim.warmup},
                         "plateau": PLATEAU}}


def patterns_claims(result: dict) -> dict:
    rows = sorted(result["ratios"], key=lambda r: r["corpus_ratio"])
    p_freq = [r["p_frequent"] for r in rows]
    return {
        "p_frequent_grows_with_ratio": all(b > a for a, b in zip(p_freq, p_freq[1:])),
        "frequent_beats_true_at_largest_ratio": rows[-1]["p_frequent"] > rows[-1]["p_true"],
        "control_true_beats_outnumbered_true": result["control"]["p_true"] > rows[-1]["p_true"],
    }


def patterns_conclusion(result: dict) -> str:
    rows = sorted(result["ratios"], key=lambda r: r["corpus_ratio"])
    claims = patterns_claims(result)
    share = " to ".join(f"{r['frequent_share']:.0%}" for r in rows)
    p_freq = ", ".join(f"{r['p_frequent']:.2f}" for r in rows)
    p_true = ", ".join(f"{r['p_true']:.2f}" for r in rows)
    model_share = ", ".join(f"{r['p_frequent'] / max(r['p_frequent'] + r['p_true'], 1e-30):.0%}" for r in rows)
    last = rows[-1]
    odds = last["p_frequent"] / max(last["p_true"], 1e-30)
    training = result["training"]
    parts = [f"As the false answer's share of a statement's occurrences went from {share}, the model's probability "
             f"of it went {p_freq} ({'rising each time' if claims['p_frequent_grows_with_ratio'] else 'not rising each time'}; "
             f"its share of the two answers' probability: {model_share}), and the true answer's went {p_true}."]
    parts.append(f"At {last['corpus_ratio']}:1 the model {'prefers' if odds > 1 else 'does not prefer'} the false "
                 f"statement, {odds:.1f} to 1. Statements it only ever saw true get p(true) "
                 f"{result['control']['p_true']:.2f}.")
    parts.append(f"(Trained {training['steps']} steps; the statements' loss "
                 f"{'had stopped falling' if training['plateaued'] else 'was still falling when the budget ended'}.)")
    parts.append(_verdict(claims, "The model's confidence tracks how often a completion appears in its text, not "
                                  "whether it is true: fluent, confident output is no evidence of truth."))
    return " ".join(parts)


def patterns_table(result: dict) -> tuple[list[str], list[list[str]]]:
    rows = [[f"{r['corpus_ratio']}:1", f"{r['frequent_share']:.0%}", f"{r['p_frequent']:.3f}", f"{r['p_true']:.3f}"]
            for r in result["ratios"]]
    rows.append(["control (true only)", "0%", f"{result['control']['p_false']:.3f}", f"{result['control']['p_true']:.3f}"])
    return ["false : true in the corpus", "false answer's share", "p(false answer)", "p(true answer)"], rows


def patterns_charts(result: dict) -> list[tuple[str, object, str]]:
    rows = sorted(result["ratios"], key=lambda r: r["corpus_ratio"])
    xs = [r["corpus_ratio"] for r in rows]
    fig1, ax = _figure("the model's probability of each answer against its corpus ratio", "false : true in the corpus",
                       "probability")
    ax.plot(xs, [r["p_frequent"] for r in rows], "o-", color=_color(1), label="p(frequent, false answer)")
    ax.plot(xs, [r["p_true"] for r in rows], "o-", color=_color(2), label="p(true answer)")
    ax.plot(xs, [r["frequent_share"] for r in rows], ":", color=_color(1), label="false answer's corpus share")
    ax.plot(xs, [1 - r["frequent_share"] for r in rows], ":", color=_color(2), label="true answer's corpus share")
    ax.axhline(result["control"]["p_true"], color="#444", ls="--", lw=1, label="p(true), statements seen only true")
    ax.set_xscale("log")
    ax.set_ylim(0, 1.05)
    _finish(fig1)
    ax.set_xticks(xs, [f"{x}:1" for x in xs])
    ax.set_xticks([], minor=True)
    training = result["training"]
    fig2, ax = _figure("loss on the statements while training", "step", "loss (nats/token)")
    ax.plot(training["step"], _nan(training["statements_loss"]), "o-", color=_color(0), label="statements")
    return [("patterns_probability.png", fig1, "p(false) and p(true) against the corpus ratio"),
            ("patterns_statements_loss.png", _finish(fig2), "the statements' loss against steps")]


def patterns_examples(result: dict) -> str:
    rows = []
    for group in [*result["ratios"], {"corpus_ratio": 0, "facts": result["control"]["facts"]}]:
        for s in group["facts"][:3]:
            rows.append([s["statement"], s["true"], s["false"], f"{s['counts']['true']} : {s['counts']['false']}",
                         f"{s['p_true']:.3f}", f"{s['p_false']:.3f}"])
    return _table_html(["statement", "true", "false", "true : false in the corpus", "p(true)", "p(false)"], rows)


# ---------------------------------------------------------------------------------------------------------------
# Running one, and what it writes


@dataclass(frozen=True)
class Experiment:
    run: Callable[[Context], dict]
    claims: Callable[[dict], dict]
    conclusion: Callable[[dict], str]
    table: Callable[[dict], tuple[list[str], list[list[str]]]]
    charts: Callable[[dict], list]
    title: str
    idea: str


REGISTRY = {
    "loss": Experiment(experiment_loss, loss_claims, loss_conclusion, loss_table, loss_charts,
                       "Why models train on cross-entropy, not on accuracy",
                       "A loss must be specific, computable and smooth: the same model and budget, trained on "
                       "cross-entropy, on the squared error of its predicted probabilities, and on top-1 accuracy."),
    "descent": Experiment(experiment_descent, descent_claims, descent_conclusion, descent_table, descent_charts,
                          "Gradient descent: step size, batch noise and optimizers",
                          "Gradient descent takes greedy downhill steps on noisy mini-batches: a learning-rate sweep, "
                          "the noise of mini-batch gradients per batch size, and four optimizers on one budget and "
                          "one landscape."),
    "patterns": Experiment(experiment_patterns, patterns_claims, patterns_conclusion, patterns_table, patterns_charts,
                           "Frequency, not truth",
                           "Next-token prediction rewards matching the patterns of the text: arithmetic statements "
                           "whose false answer appears more often than the true one, mixed with ordinary text."),
}


def run_experiment(name: str, cfg: ExperimentConfig, say: Callable[[str], None] = lambda m: None,
                   command: str = "") -> dict:
    """Run experiment `name`; write result.json, index.html and the charts to cfg.out; return the result."""
    if name not in REGISTRY:
        raise LmlabError(f"unknown experiment {name!r}; choose from {', '.join(EXPERIMENTS)}")
    experiment = REGISTRY[name]
    out = Path(cfg.out or os.path.join("experiments", name))
    prepare_out(out)
    ctx = Context(name, cfg, out, say)
    load_at_start = _load_average()  # the machine is shared? then wall times say little
    started = time.perf_counter()
    result = {"experiment": name, "seed": cfg.seed, "data": cfg.data, "quick": cfg.quick, "device": cfg.device,
              **experiment.run(ctx)}
    result["claims"] = experiment.claims(result)
    result["conclusion"] = experiment.conclusion(result)
    result["wall_time_s"] = round(time.perf_counter() - started, 1)
    result["machine"] = {"cpu": cpu_name(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                         "torch": torch.__version__, "lmlab": __version__, "load_average_at_start": load_at_start,
                         "load_average_at_end": _load_average()}
    result["command"] = command or f"lmlab experiment {name} --out {shlex.quote(str(out))}"
    atomic_write_json(out / "result.json", result)
    write_page(out, experiment, result)
    return result


def _load_average() -> Optional[list[float]]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def format_table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(headers, *rows)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([line(headers), line(["-" * w for w in widths]), *map(line, rows)])


def summary(result: dict) -> str:
    """The table and the conclusion, for the terminal."""
    experiment = REGISTRY[result["experiment"]]
    return f"{format_table(*experiment.table(result))}\n\n{result['conclusion']}"


# ---------------------------------------------------------------------------------------------------------------
# The page: charts as in `lmlab report` (matplotlib on the Agg canvas, PNGs embedded and saved beside the page)


def _figure(title: str, xlabel: str, ylabel: str):
    from .report import figure  # matplotlib loads only to draw: the CLI imports this module

    return figure(title, xlabel, ylabel, title_size=10.5)  # the experiments' titles are longer


def _finish(fig, legend: str = "best"):
    from matplotlib.ticker import FuncFormatter

    def minor(axis):  # on a short range, label 2, 3 and 5 times the powers of ten too
        def label(v, _):
            lo, hi = sorted(axis.get_view_interval())
            if v <= 0 or lo <= 0 or hi / lo > 30:
                return ""
            return f"{v:g}" if round(v / 10 ** math.floor(math.log10(v))) in (2, 3, 5) else ""
        return FuncFormatter(label)

    for ax in fig.axes:
        for axis, scale in ((ax.xaxis, ax.get_xscale()), (ax.yaxis, ax.get_yscale())):
            if scale == "log":  # plain numbers (0.3, 2, 1e-05), not powers of ten
                axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
                axis.set_minor_formatter(minor(axis))
        if ax.get_legend() is None and ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8, loc=legend)
    return fig


def _verdict(claims: dict[str, bool], conclusion: str) -> str:
    """The experiment's conclusion when the measurements back every claim; otherwise the claims they do not back."""
    if all(claims.values()):
        return conclusion
    failed = ", ".join(k.replace("_", " ") for k, v in claims.items() if not v)
    return f"On this budget the measurements do not back every claim (not: {failed})."


def _color(i: int) -> str:
    from .report import COLORS

    return COLORS[i % len(COLORS)]


def _nan(values: list) -> list[float]:
    return [v if v is not None else math.nan for v in values]


def _smooth(values: list[float]) -> list[float]:
    from .report import smooth

    out, kept = [], [v for v in values if math.isfinite(v)]
    smoothed = iter(smooth(kept))
    for v in values:
        out.append(next(smoothed) if math.isfinite(v) else math.nan)
    return out


def _num(value, spec: str = ".4f") -> str:
    return format(value, spec) if isinstance(value, (int, float)) and math.isfinite(value) else "–"


def _pct(value) -> str:
    return f"{100 * value:.1f}%" if isinstance(value, (int, float)) and math.isfinite(value) else "–"


def _table_html(headers: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def write_page(out: Path, experiment: Experiment, result: dict) -> Path:
    """DIR/index.html, self-contained (charts as data URIs), and every chart as a PNG in DIR."""
    from .report import CSS, png_bytes

    figures = []
    for filename, fig, alt in experiment.charts(result):
        data = png_bytes(fig)
        atomic_write_bytes(out / filename, data)
        uri = "data:image/png;base64," + base64.b64encode(data).decode("ascii")
        figures.append(f'<figure><img src="{uri}" alt="{html.escape(alt)}"><figcaption>{html.escape(alt)} '
                       f'<span class=file>({html.escape(filename)})</span></figcaption></figure>')
    extra = patterns_examples(result) if result["experiment"] == "patterns" else ""
    claims = "".join(f"<li>{html.escape(k.replace('_', ' '))}: <b>{'yes' if v else 'no'}</b></li>"
                     for k, v in result["claims"].items())
    machine = result["machine"]
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>lmlab experiment {html.escape(result['experiment'])}</title>
<style>{CSS}
.conclusion {{ background: #f4f8fc; border-left: 4px solid #1f77b4; padding: 10px 14px; }}</style></head>
<body>
<h1>lmlab experiment {html.escape(result['experiment'])}: {html.escape(experiment.title)}</h1>
<p class="meta"><code>{html.escape(result['command'])}</code> · seed {result['seed']} · data
{html.escape(str(result['data']))}{' · quick (micro budget)' if result['quick'] else ''} ·
{result['wall_time_s']:.0f} s on {html.escape(machine['cpu'])} ({machine['torch_threads']} threads) · lmlab
{html.escape(machine['lmlab'])}, torch {html.escape(machine['torch'])}</p>
<p>{html.escape(experiment.idea)}</p>
<h2>Conclusion (computed from the measurements)</h2>
<p class="conclusion">{html.escape(result['conclusion'])}</p>
<ul>{claims}</ul>
<h2>Measurements</h2>
{_table_html(*experiment.table(result))}
{extra}
<div class="charts">{''.join(figures)}</div>
<p class="meta">Every number on this page is in result.json; the training runs are in {RUNS}/ (open one with
<code>lmlab report</code>), and their progress lines in log.txt.</p>
</body></html>
"""
    atomic_write_bytes(out / "index.html", page.encode("utf-8"))
    return out / "index.html"
