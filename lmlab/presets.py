"""Named starting points for a run. Each is a plain function returning a TrainConfig; CLI options override it."""

from __future__ import annotations

from typing import Callable

from .common import LmlabError
from .data import DataConfig
from .model import ModelConfig
from .optim import OptimConfig
from .train import TrainConfig


def tiny() -> TrainConfig:
    """The CPU recipe: a 4-layer, 128-wide modern GPT (RoPE, RMSNorm, QK-norm, ReLU², untied head, zero-init
    projections), Muon for the hidden matrices and AdamW (lr 1e-2) for the rest, with a warmup-stable-decay
    schedule over a wall-clock budget. About 4 minutes of training. docs/performance.md has what each choice
    bought; budgets of 60 s or less use SHORT_BUDGET (below)."""
    return TrainConfig(
        preset="tiny",
        model=ModelConfig(block_size=128, n_layer=4, n_head=4, n_embd=128),
        optim=OptimConfig(optimizer="muon", lr=1e-2, muon_lr=0.02, schedule="wsd", warmup=50, decay_fraction=0.4),
        batch_size=32,
        max_time=240.0,
        eval_interval=100,
        checkpoint_interval=500,
    )


def small() -> TrainConfig:
    """A 6-layer, 384-wide modern GPT with context 256: better text, wants a GPU or patience."""
    return TrainConfig(
        preset="small",
        model=ModelConfig(block_size=256, n_layer=6, n_head=6, n_embd=384),
        optim=OptimConfig(optimizer="adamw", lr=2e-3, schedule="wsd", warmup=100),
        batch_size=32,
        max_steps=5000,
        eval_interval=500,
    )


def nanogpt_char() -> TrainConfig:
    """nanoGPT's shakespeare_char config: 6 layers/6 heads/384 wide, block 256, batch 64, dropout 0.2."""
    return TrainConfig(
        preset="nanogpt-char",
        model=ModelConfig(block_size=256, n_layer=6, n_head=6, n_embd=384, pos="learned", norm="layernorm",
                          mlp="gelu", qk_norm=False, tie_embeddings=True, bias=False, dropout=0.2,
                          zero_init_proj=False),
        optim=OptimConfig(optimizer="adamw", lr=1e-3, beta2=0.99, weight_decay=0.1, schedule="cosine", warmup=100,
                          final_lr_frac=0.1),
        batch_size=64,
        max_steps=5000,
        eval_interval=250,
    )


def nanogpt_char_cpu() -> TrainConfig:
    """nanoGPT's documented CPU config: 4 layers/4 heads/128 wide, block 64, batch 12, 2000 steps, no dropout."""
    cfg = nanogpt_char()
    cfg.preset = "nanogpt-char-cpu"
    cfg.model.block_size, cfg.model.n_layer, cfg.model.n_head, cfg.model.n_embd = 64, 4, 4, 128
    cfg.model.dropout = 0.0
    cfg.batch_size = 12
    cfg.max_steps = 2000
    return cfg


def gpt2_124m() -> TrainConfig:
    """The GPT-2 small shape: 12 layers/12 heads/768 wide, context 1024, BPE vocabulary 50257, tied embeddings."""
    return TrainConfig(
        preset="gpt2-124m",
        data=DataConfig(tokenizer="bpe", vocab_size=50257),
        model=ModelConfig(block_size=1024, n_layer=12, n_head=12, n_embd=768, pos="learned", norm="layernorm",
                          mlp="gelu", qk_norm=False, tie_embeddings=True, bias=True, zero_init_proj=False),
        optim=OptimConfig(optimizer="adamw", lr=6e-4, weight_decay=0.1, schedule="cosine", warmup=700,
                          final_lr_frac=0.1),
        batch_size=8,
        grad_accum=8,
        max_steps=20000,
        eval_interval=500,
    )


def bigram() -> TrainConfig:
    """The bigram baseline: a table of next-token logits indexed by the current token."""
    return TrainConfig(
        preset="bigram",
        model=ModelConfig(arch="bigram", block_size=64),
        optim=OptimConfig(optimizer="adamw", lr=1e-2, weight_decay=0.0, schedule="constant", warmup=0),
        batch_size=32,
        max_steps=3000,
        eval_interval=500,
    )


PRESETS: dict[str, Callable[[], TrainConfig]] = {
    "tiny": tiny,
    "small": small,
    "nanogpt-char": nanogpt_char,
    "nanogpt-char-cpu": nanogpt_char_cpu,
    "gpt2-124m": gpt2_124m,
    "bigram": bigram,
}


SHORT_BUDGET_S = 60.0  # at or under this many seconds, the tiny recipe trades model size and context for steps

# The tiny recipe's settings for budgets of SHORT_BUDGET_S or less (docs/performance.md, the short-budget tables).
# In 20 s, steps are what is scarce: a 2-layer, 96-wide model over sequences of 64 tokens takes about a third of
# the time per step of the 4-layer, 128-wide one over 128, and learns more in the ~300 steps it then gets; over so
# few steps a higher learning rate for the AdamW part and less Muon momentum learn faster. At 60 s these settings
# still won by 0.08 (1.618 against 1.697); longer budgets have not been compared yet.
SHORT_BUDGET = {"block_size": 64, "n_layer": 2, "n_embd": 96, "lr": 2e-2, "muon_momentum": 0.9}


def _section(cfg: TrainConfig, name: str):
    for part in (cfg, cfg.model, cfg.optim):
        if hasattr(part, name):
            return part
    raise KeyError(name)


def for_budget(cfg: TrainConfig, max_time: float, explicit: set[str]) -> tuple[TrainConfig, str]:
    """The tiny recipe adjusted to a time budget; returns the config and a note saying what changed ("" if nothing).

    With 60 s or less, each setting of SHORT_BUDGET replaces the preset's, unless the user gave that option
    (names as in `explicit`, e.g. "n_layer"). A user who sets --n-head keeps the preset's width too, which their
    head count may be chosen to divide.
    """
    if cfg.preset != "tiny" or not 0 < max_time <= SHORT_BUDGET_S:
        return cfg, ""
    changed = []
    for name, value in SHORT_BUDGET.items():
        if name not in explicit and not (name == "n_embd" and "n_head" in explicit):
            setattr(_section(cfg, name), name, value)
            changed.append(f"--{name.replace('_', '-')} {value:g}")
    if not changed:
        return cfg, ""
    return cfg, (f"budget of {max_time:g} s: the tiny recipe's short-budget settings, {' '.join(changed)} "
                 f"(set them to override)")


def get_preset(name: str) -> TrainConfig:
    if name not in PRESETS:
        raise LmlabError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    return PRESETS[name]()
