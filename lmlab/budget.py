"""The budget rules: the settings a preset leaves to the run (None in its config) filled in from the time budget and the
size of the corpus. The tiny recipe's size, context, AdamW learning rate, Muon momentum and weight decay follow
--max-time (TINY_RECIPE, SHORT_BUDGET, LONG_BUDGET), whether to compile follows it for every preset, and the tiny
recipe's dropout follows the passes the budget makes over the training text. docs/performance.md has the measurements
behind each number."""

from __future__ import annotations

import dataclasses
import math
import os
import shutil

from .config import STAGE_DEFAULTS, TrainConfig
from .model import SIZES


SHORT_BUDGET_S = 60.0  # at or under this many seconds, the tiny recipe trades model size and context for steps

# The tiny recipe's settings (docs/performance.md has the sweeps behind them), and those for budgets of
# SHORT_BUDGET_S or less: in 20 s, steps are what is scarce. A 2-layer, 96-wide model over sequences of 64 tokens
# takes about a third of the time per step of the 4-layer, 128-wide one over 128, and learns more in the ~300 steps
# it then gets; over so few steps a higher learning rate for the AdamW part and less Muon momentum learn faster. At
# 60 s these settings still won by 0.08 (1.618 against 1.697).
TINY_RECIPE = {"block_size": 128, "n_layer": 4, "n_head": 4, "n_embd": 128, "lr": 1e-2, "muon_momentum": 0.95,
               "weight_decay": 0.1}
SHORT_BUDGET = {"block_size": 64, "n_layer": 2, "n_embd": 96, "lr": 2e-2, "muon_momentum": 0.9}

# At or over LONG_BUDGET_S, the model is what is scarce: the recipe's 4 x 128 levels off near 1.48 on Tiny
# Shakespeare (1.4760 at 720 s without dropout, after memorising to a training loss of 1.05; 1.5040 with the corpus
# rule's 0.18), while 6 layers 192 wide (2.7M parameters) reached 1.4597, 1.4649 and 1.4717 at 720 s. At 480 s the
# two tie (1.5010 each); at 300 s the larger one is behind (1.5378 against 1.4855). It does not gain from more time
# on this corpus (900 s: 1.4710, training loss 1.14) nor from dropout (0.1 at 720 s: 1.4934); weight decay 0.3
# instead of 0.1 held back its memorising at no cost a step: 1.4560 against 1.4734 after 1,200 steps (seed 1, the
# same steps, 1 thread each), and five seeds at 720 s a mean of 1.4585 (the 1.47 record). docs/records.md has the runs.
LONG_BUDGET_S = 600.0
LONG_BUDGET = {"n_layer": 6, "n_embd": 192, "weight_decay": 0.3}


# At or over this many seconds of a pure time budget, the tiny recipe compiles: on 2 CPU cores a compiled step takes
# about 0.85x the time; compiling takes about 8 s once inductor's cache holds the graphs (every run after the first on
# a machine), paid back after about a minute, and 20-28 s the very first time, paid back after about 4 (see
# docs/performance.md).
COMPILE_BUDGET_S = 180.0


def can_compile() -> bool:
    """torch.compile's CPU code needs a C++ compiler (inductor asks for $CXX, else g++ or clang++)."""
    return bool(os.environ.get("CXX") or shutil.which("g++") or shutil.which("clang++") or shutil.which("c++"))


def _budget_compiles(cfg: TrainConfig) -> bool:
    return (cfg.preset == "tiny" and cfg.stage == "pretrain" and not cfg.max_steps and cfg.max_time >= COMPILE_BUDGET_S
            and can_compile())


def _section(cfg: TrainConfig, name: str):
    for part in (cfg.model, cfg.optim):
        if hasattr(part, name):
            return part
    raise KeyError(name)


def apply_budget(cfg: TrainConfig) -> tuple[TrainConfig, str]:
    """The config with every setting left to the budget (None) filled in; returns it and a note saying what the
    budget changed ("" if nothing). `train(config)` calls this, so Python callers and `lmlab train` get the same.

    A setting is the caller's own when it is not None: set `cfg.model.n_layer = 4` (or pass `--n-layer 4`) and the
    rules leave it alone. The `tiny` preset leaves its sizes, context, AdamW learning rate, Muon momentum and weight
    decay to the budget: TINY_RECIPE, SHORT_BUDGET when 0 < max_time <= 60 s, LONG_BUDGET when max_time >= 600 s and
    there is no step limit. A caller who sets the head count keeps the recipe's full width too, which their head count may be
    chosen to divide. Whether to compile (None) is decided for every preset: the tiny one compiles for pure time
    budgets of COMPILE_BUDGET_S or more, the others do not.

    For --stage sft and dpo the model comes from the base (--init-from), so the sizes stay unset here and are the
    base's; an unset learning rate is the stage's (STAGE_DEFAULTS), an unset dropout 0 (no corpus rule), and neither
    the short-budget settings nor compiling apply.
    """
    unset = [name for name in TINY_RECIPE if getattr(_section(cfg, name), name) is None]
    if cfg.stage in STAGE_DEFAULTS:  # the sizes are the base's (--init-from), filled in when it is read
        unset = [name for name in unset if name not in SIZES]
        if cfg.model.dropout is None:  # no corpus rule either
            cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model,
                                                                     dropout=STAGE_DEFAULTS[cfg.stage]["dropout"]))
    if not unset and cfg.compile is not None:
        return cfg, ""
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model), optim=dataclasses.replace(cfg.optim))
    notes = []
    if cfg.compile is None:
        cfg.compile = _budget_compiles(cfg)
        if cfg.compile:
            notes.append(f"budget of {cfg.max_time:g} s: compiling the model (the first step takes 10-30 s more; "
                         f"--no-compile to run eager)")
    recipe, kind = _budget_recipe(cfg)
    keep_width = cfg.model.n_head is not None
    changed = []
    for name in unset:
        value = STAGE_DEFAULTS[cfg.stage]["lr"] if name == "lr" and cfg.stage in STAGE_DEFAULTS else TINY_RECIPE[name]
        if name in recipe and not (name == "n_embd" and keep_width):
            value = recipe[name]
            changed.append(f"--{name.replace('_', '-')} {value:g}")
        setattr(_section(cfg, name), name, value)
    cfg.model.__post_init__()  # the checks that wait for every size (divisibility, the RoPE head size)
    cfg.optim.__post_init__()
    if changed:
        notes.append(f"budget of {cfg.max_time:g} s: the tiny recipe's {kind} settings, {' '.join(changed)} "
                     f"(set them to override)")
    return cfg, "\n".join(notes)


def _budget_recipe(cfg: TrainConfig) -> tuple[dict, str]:
    """The settings a pretraining budget of the tiny preset changes from TINY_RECIPE, and what to call them."""
    if cfg.preset != "tiny" or cfg.stage != "pretrain":
        return {}, ""
    if 0 < cfg.max_time <= SHORT_BUDGET_S:
        return SHORT_BUDGET, "short-budget"
    if cfg.max_time >= LONG_BUDGET_S and not cfg.max_steps:  # a pure time budget: a step limit may end it early
        return LONG_BUDGET, "long-budget"
    return {}, ""


# The tiny recipe and the size of the corpus: how many passes over the training text the budget makes decides the
# dropout (on the residual branches and embeddings; attention dropout stays off, which keeps the fused attention
# kernels: the same step time). docs/performance.md, "Small corpora", has the sweeps behind these numbers.
DROPOUT_FREE_PASSES = 6.0  # up to this many passes no dropout (at 4.5 passes 0.1 cost 0.034 of validation loss)
DROPOUT_PER_DOUBLING = 0.14  # then this much more for every doubling of the passes: 0.1 at 10, 0.41 at 45
DROPOUT_MAX = 0.5


def corpus_dropout(passes: float) -> float:
    """The tiny recipe's dropout for a budget that makes `passes` passes over the training text."""
    if passes <= DROPOUT_FREE_PASSES:
        return 0.0
    return round(min(DROPOUT_MAX, DROPOUT_PER_DOUBLING * math.log2(passes / DROPOUT_FREE_PASSES)), 2)


def needs_corpus(cfg: TrainConfig) -> bool:
    """Whether settings are left to the size of the corpus (the tiny preset's dropout)."""
    return cfg.model.dropout is None


def fit_to_corpus(cfg: TrainConfig, train_tokens: int, budget_tokens: float) -> tuple[TrainConfig, str]:
    """The config with the settings left to the corpus filled in, for a budget that trains on about budget_tokens
    tokens of a training split of train_tokens; returns it and a note saying what was chosen and why."""
    if not needs_corpus(cfg):
        return cfg, ""
    passes = budget_tokens / max(1, train_tokens)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, dropout=corpus_dropout(passes)))
    return cfg, (f"corpus of {train_tokens:,} training tokens; the budget makes about {passes:.1f} passes over it: "
                 f"dropout {cfg.model.dropout:g} (set --dropout to override)")
