"""`lmlab experiment loss`: a loss must be specific, computable and smooth. The same model and budget trained on
cross-entropy, on the squared error of its predicted probabilities, and on top-1 accuracy, whose gradient is zero."""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from ..run import load_run
from ..loss import OBJECTIVES, LossConfig
from ..optim import OptimConfig
from ..report.chart import color, figure, finish
from ..report.page import fmt
from .base import (TITLE_SIZE, Budget, Context, Experiment, finite, nan, pct, read_metrics, run_training,
                   train_config, verdict, weight_change)

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
        grad_norms = [r.grad_norm for r in steps]
        accuracies = [r.val_accuracy for r in evals]
        model = load_run(ctx.run_dir(name)).model
        objectives.append({
            "name": name,
            "val_loss": finite(evals[-1].val_loss),
            "val_accuracy": finite(evals[-1].val_accuracy),
            # autograd's gradient, as train_step measured it: the global norm of every parameter's .grad after
            # backward, before clipping; it is exactly 0 only when every entry of every gradient is 0
            "nonzero_grad_fraction": sum(g != 0 for g in grad_norms) / len(grad_norms),
            "steps": len(steps),
            "val_accuracy_at_step_0": finite(accuracies[0]),
            "max_accuracy_drift": finite(max(abs(a - accuracies[0]) for a in accuracies)),
            "mean_grad_norm": finite(float(np.mean(grad_norms))),
            "weight_change": finite(weight_change(ctx.run_dir(name), model)),
            "curve": {"step": [r.step for r in evals], "val_loss": [finite(r.val_loss) for r in evals],
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
                 f"changed by {pct(acc['weight_change'])}, though not by a gradient")
        stayed = (f"stayed at its {pct(acc['val_accuracy_at_step_0'])} of step 0" if acc["max_accuracy_drift"] == 0
                  else f"stayed within {100 * (acc['max_accuracy_drift'] or 0):.1f} points of its "
                       f"{pct(acc['val_accuracy_at_step_0'])} at step 0")
        parts[-1] += f", so the optimizer had nothing to follow: the weights {moved} and validation accuracy {stayed}."
    else:
        parts[-1] += (f"; its gradient was non-zero at the other {acc['steps'] - zero_steps}, and validation "
                      f"accuracy moved by up to {100 * (acc['max_accuracy_drift'] or 0):.1f} points.")
    gap = 100 * ((ce["val_accuracy"] or 0) - (acc["val_accuracy"] or 0))
    parts.append(f"Cross-entropy, a smooth function of the same predictions, took the same model to "
                 f"{pct(ce['val_accuracy'])} accuracy ({gap:+.1f} points against the accuracy objective) and a "
                 f"validation loss of {fmt(ce['val_loss'])}; squared error on the probabilities reached "
                 f"{pct(se['val_accuracy'])} and {fmt(se['val_loss'])}.")
    parts.append(verdict(claims, "The metric we care about cannot be the loss we train on: it has no slope to "
                                 "descend, while a specific, computable and smooth loss improves that very metric."))
    return " ".join(parts)


def loss_table(result: dict) -> tuple[list[str], list[list[str]]]:
    rows = [[o["name"], fmt(o["val_loss"]), pct(o["val_accuracy"]), pct(o["val_accuracy_at_step_0"]),
             f"{o['nonzero_grad_fraction']:.0%}", fmt(o["mean_grad_norm"], ".3g"), pct(o["weight_change"])]
            for o in result["objectives"]]
    return (["objective", "val loss", "val accuracy", "accuracy at step 0", "steps with a gradient",
             "mean grad norm", "weight change"], rows)


def loss_charts(result: dict) -> list[tuple[str, object, str]]:
    objs = result["objectives"]
    fig1, ax = figure("validation cross-entropy", "step", "loss (nats/token)", title_size=TITLE_SIZE)
    for i, o in enumerate(objs):
        ax.plot(o["curve"]["step"], nan(o["curve"]["val_loss"]), marker="o", ms=3, color=color(i), label=o["name"])
    fig2, ax = figure("validation accuracy (top-1)", "step", "accuracy (%)", title_size=TITLE_SIZE)
    for i, o in enumerate(objs):
        ax.plot(o["curve"]["step"], [100 * v if v is not None else math.nan for v in o["curve"]["val_accuracy"]],
                marker="o", ms=3, color=color(i), label=o["name"])
    fig3, ax = figure("gradient norm each objective produced (0 drawn at the bottom)", "step",
                      "global gradient norm", title_size=TITLE_SIZE)
    for i, o in enumerate(objs):
        zero = all(g == 0 for g in o["grad_norm"])
        ax.plot(range(1, len(o["grad_norm"]) + 1), nan(o["grad_norm"]), color=color(i), lw=3 if zero else 1,
                label=o["name"] + (" (0 at every step)" if zero else ""))
    ax.set_yscale("symlog", linthresh=1e-3)
    ax.set_ylim(bottom=0)
    return [("loss_val_loss.png", finish(fig1), "validation cross-entropy against steps, per training objective"),
            ("loss_val_accuracy.png", finish(fig2), "validation accuracy against steps, per training objective"),
            ("loss_grad_norm.png", finish(fig3), "gradient norm against steps, per training objective")]


EXPERIMENT = Experiment(experiment_loss, loss_claims, loss_conclusion, loss_table, loss_charts,
                        "Why models train on cross-entropy, not on accuracy",
                        "A loss must be specific, computable and smooth: the same model and budget, trained on "
                        "cross-entropy, on the squared error of its predicted probabilities, and on top-1 accuracy.")
