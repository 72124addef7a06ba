"""Typed settings of a run: TrainConfig and its parts, the named presets, the stages' defaults, and the one
loader from JSON (`from_dict`), which checks every field's type, so a config.json from anywhere becomes a valid
config or one clear error. The rules that fill in what a preset leaves to the budget are in budget.py."""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Optional, Union

from . import __version__
from .common import SCHEMA_VERSION, LmlabError
from .data import DataConfig
from .loss import LossConfig
from .model import ModelConfig
from .optim import OptimConfig
from .synthetic import is_chat

META_KEYS = ("schema_version", "lmlab_version", "vocab_size", "tokenizer_fingerprint", "run_id", "chat")
COMMAND_ONLY = ("trust_data_path",)  # options of one command, never saved in config.json nor read from one


@dataclass
class RlConfig:
    """--stage rl: the task rewarded, and GRPO's settings (lmlab/rl.py, loss.policy_loss)."""

    task: str = "synthetic:chat"
    """The prompts and their verifier: synthetic:chat[:SEED] (conversations, checked by their skill) or patterns ("A
    plus B is ", rewarded when the completion starts with the true sum and a full stop). A reward function of one's
    own is given from Python only: train(config, reward=fn)."""
    group_size: int = 8
    """Completions sampled for each prompt (a group); each reward counts against its group's mean and spread.
    --batch-size prompts x group_size completions are sampled in one batch each micro-step."""
    kl_beta: float = 0.0
    """Weight of the KL penalty to the initial model (0: none, and no reference model is kept)."""
    clip_eps: float = 0.2
    """The policy ratio is clipped to [1 - clip_eps, 1 + clip_eps]."""
    rl_max_new_tokens: int = 32
    """At most this many tokens a completion (a conversation's ends at its end of turn, a text's at a newline)."""
    rl_temperature: float = 1.0
    """Sampling temperature of the completions (the policy trained is the distribution they are drawn from)."""
    rl_oversample: int = 4
    """DAPO's dynamic sampling: each micro-step samples the groups of --batch-size x rl_oversample prompts and trains
    on the first --batch-size groups whose rewards are not all equal (a group whose completions all score the same
    has zero advantages and teaches nothing); the reward is logged over every group drawn. 1: every group drawn is
    trained, as GRPO does."""

    def __post_init__(self) -> None:
        if self.group_size < 1 or self.rl_max_new_tokens < 1 or self.rl_oversample < 1:
            raise LmlabError("--group-size, --rl-max-new-tokens and --rl-oversample must be positive")
        if not (math.isfinite(self.kl_beta) and self.kl_beta >= 0):
            raise LmlabError(f"--kl-beta must be a number >= 0, got {self.kl_beta}")
        if not 0 < self.clip_eps < 1:
            raise LmlabError(f"--clip-eps must be in (0, 1), got {self.clip_eps}")
        if not (math.isfinite(self.rl_temperature) and self.rl_temperature > 0):
            raise LmlabError(f"--rl-temperature must be > 0, got {self.rl_temperature}")


@dataclass
class TrainConfig:
    """Everything a training run needs; saved as RUN/config.json."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    rl: RlConfig = field(default_factory=RlConfig)
    preset: str = "tiny"
    """Named starting point for all settings (see `lmlab train --help`); explicit options override it."""
    out: str = ""
    """Run directory (default: runs/PRESET-DATE-TIME)."""
    resume: Optional[str] = None
    """Continue the run in this directory from its newest good checkpoint."""
    stage: Literal["pretrain", "sft", "dpo", "rl"] = "pretrain"
    """pretrain: learn to predict the next token of a text (--data: a corpus). sft: supervised fine-tuning of the
    --init-from model on conversations (--data: a .jsonl or .parquet file of {"messages": [...]}, or
    synthetic:chat), packed into blocks, training only what the assistant writes; `lmlab train --stage sft --help`
    shows its defaults (SFT_DEFAULTS). dpo: preference tuning of the --init-from model (Direct Preference
    Optimization, --dpo-beta; --data: a .jsonl file of {"prompt", "chosen", "rejected"}, texts or messages), its
    defaults DPO_DEFAULTS. rl: reinforcement learning of the --init-from model with --task's verifier as the reward
    (GRPO; RL_DEFAULTS). Kept on resume."""
    init_from: Optional[str] = None
    """Start from a model: an lmlab run folder (its config, tokenizer and best checkpoint) or a transformers model (a
    folder, or a hub id such as gpt2: its architecture, weights and tokenizer). --stage sft and dpo need one."""
    max_steps: int = 0
    """Stop after this many optimizer steps (0: no step limit)."""
    max_time: float = 0.0
    """Stop after this many seconds of training, evaluation excluded (0: no time limit)."""
    batch_size: int = 32
    """Sequences per micro-batch."""
    grad_accum: int = 1
    """Micro-batches per optimizer step (tokens per step = batch_size * grad_accum * block_size)."""
    global_batch: int = 0
    """Sequences per optimizer step over all processes; grad_accum is then derived from the number of processes
    (0: batch_size * grad_accum * processes). Kept on resume, so the global batch stays fixed."""
    parallel: Literal["none", "ddp", "fsdp"] = "none"
    """Data parallelism under torchrun: ddp (DistributedDataParallel) or fsdp (FSDP2 fully_shard, sharded
    checkpoints); gloo on CPU, nccl on CUDA."""
    dist_timeout: float = 300.0
    """Seconds a collective may wait for the other processes before the job fails (a dead rank ends the job)."""
    eval_interval: int = 250
    """Evaluate on the validation split every this many steps (and at the end)."""
    eval_stride: int = 0
    """Evaluation windows of block_size tokens start every this many tokens, and each scores only what the windows
    before it did not (0: block_size, non-overlapping windows: the cheapest; a smaller stride gives every scored
    token more context, like `lmlab eval`, at block_size / stride times the cost; above block_size: refused, as
    `lmlab eval --stride` refuses it)."""
    eval_tokens: int = 1_000_000
    """Tokens of the validation split to evaluate, taken from its start (0: all of it)."""
    checkpoint_interval: int = 1000
    """Write a checkpoint every this many steps (and at the end)."""
    keep_checkpoints: int = 3
    """How many recent checkpoints to keep."""
    seed: int = 1337
    """Seed for initialisation, batches and dropout."""
    device: str = "auto"
    """auto, cpu, cuda, cuda:N or mps."""
    dtype: str = "auto"
    """Compute dtype: auto (bfloat16 on CUDA, float32 elsewhere), float32, bfloat16 or float16 (autocast over float32
    weights), or float64 (weights and all arithmetic in double precision: slow, for checking against references; the
    golden-loss test runs so, since its last bits do not depend on the CPU's kernels)."""
    compile: Optional[bool] = None
    """Compile the model and loss with torch.compile: True or False (None: the budget decides; the tiny preset
    compiles for a --max-time of 180 s or more without --max-steps, when a C++ compiler is there)."""
    threads: int = 0
    """CPU threads for PyTorch (0: PyTorch's default)."""
    thread_split: int = 0
    """On the CPU, share each micro-batch's rows among this many threads, each running its part's forward and
    backward with an equal share of the PyTorch threads, the gradients summed in a fixed order (0: auto, 2 where
    PyTorch has two threads or more and the step allows it: eager, float32, pretraining or sft, no dropout, one
    process; 1: off)."""
    sample_tokens: int = 300
    """Length of the sample printed at the end (0: none)."""
    sample_prompt: str = ""
    """Prompt of the final sample."""
    progress: bool = True
    """Show a progress bar on a terminal."""
    probe: bool = True
    """Record the probe (next-token predictions on fixed prompts) at every evaluation."""
    probe_prompts: tuple[str, ...] = ()
    """The probe's prompts (default: 3 cut from the validation text)."""
    inside: bool = True
    """Record what the model learns inside it at every evaluation: attention patterns, head scores (previous-token,
    induction, duplicate-token), the loss on a repeated random sequence, the loss by position, the logit lens."""
    telemetry_interval: int = 25
    """Record per-layer gradient norms and update/weight ratios every this many steps (0: off)."""
    trajectory_snapshots: int = 12
    """Weight snapshots kept for the loss-landscape trajectory, spread over the run (0: off)."""
    tensorboard: bool = True
    """Also write TensorBoard logs to RUN/tensorboard when the tensorboard package is installed."""
    max_bad_steps: int = 5
    """After this many non-finite losses/gradients in a row, roll back to the last checkpoint with a lower LR."""
    max_rollbacks: int = 2
    """Roll back at most this many times (halving the LR each time), then stop with a diagnosis."""
    stop_when_overfitting: bool = False
    """Stop once validation loss has risen for 2 evaluations in a row while training loss fell (the model is
    memorising the training text); the best checkpoint is what sample, eval, export and serve load by default."""
    trust_data_path: bool = False
    """With --resume: read the corpus paths that the run's config.json names although the run was not made here, in
    this folder (it was copied, moved or shared); never saved. Without it such a run needs --data PATH again."""

    def __post_init__(self) -> None:
        self.probe_prompts = tuple(self.probe_prompts)
        if self.global_batch < 0 or self.dist_timeout <= 0:
            raise LmlabError("--global-batch must be >= 0 and --dist-timeout positive")
        for name in ("batch_size", "grad_accum", "eval_interval", "checkpoint_interval", "keep_checkpoints"):
            if getattr(self, name) <= 0:
                raise LmlabError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.max_steps < 0:
            raise LmlabError(f"--max-steps must be >= 0, got {self.max_steps}")
        if self.max_time < 0 or not math.isfinite(self.max_time):
            raise LmlabError(f"--max-time must be a number of seconds >= 0, got {self.max_time}")
        if self.telemetry_interval < 0 or self.trajectory_snapshots < 0:
            raise LmlabError("--telemetry-interval and --trajectory-snapshots must be >= 0")
        if self.max_bad_steps <= 0 or self.max_rollbacks < 0:
            raise LmlabError("--max-bad-steps must be positive and --max-rollbacks >= 0")
        if min(self.eval_tokens, self.sample_tokens, self.threads, self.eval_stride, self.thread_split) < 0:
            raise LmlabError("--eval-tokens, --eval-stride, --sample-tokens, --threads and --thread-split must be >= 0")

    @property
    def chat_model(self) -> bool:
        """Whether the run's model answers in turns: fine-tuned on conversations (sft), or rewarded on them (rl with
        a synthetic:chat task); the chat applications, the export and the harness treat it as a chat model."""
        return self.stage == "sft" or (self.stage == "rl" and is_chat(self.rl.task))

    def to_json(self) -> dict:
        settings = {k: v for k, v in dataclasses.asdict(self).items() if k not in COMMAND_ONLY}
        return {"schema_version": SCHEMA_VERSION, "lmlab_version": __version__, **settings}

    @classmethod
    def from_json(cls, obj: Any) -> "TrainConfig":
        """The config saved in a run's config.json, checked field by field (see from_dict)."""
        if not isinstance(obj, dict):
            raise LmlabError("the run config is not a JSON object")
        version = obj.get("schema_version")
        if not isinstance(version, int) or isinstance(version, bool) or version > SCHEMA_VERSION:
            raise LmlabError(f"the run config has schema version {version!r}; this lmlab reads up to {SCHEMA_VERSION}")
        for name, kind in (("vocab_size", int), ("tokenizer_fingerprint", str), ("lmlab_version", str),
                           ("run_id", str)):
            if obj.get(name) is not None and (not isinstance(obj[name], kind) or isinstance(obj[name], bool)):
                raise LmlabError(f"the run config's {name} must be {kind.__name__}, got {obj[name]!r}")
        fields = {k: v for k, v in obj.items() if k not in META_KEYS + COMMAND_ONLY}
        for section in ("data", "model", "optim"):  # not loss: runs from before it train with its defaults
            if section not in fields:
                raise LmlabError(f"the run config has no {section!r} section")
        config = from_dict(cls, fields)
        unset = config.model.unset() + [n for n in ("lr", "muon_momentum") if getattr(config.optim, n) is None]
        unset += ["dropout"] if config.model.dropout is None else []
        if unset:
            raise LmlabError(f"the run config leaves {', '.join(unset)} unset")
        return config

    def check_reads_back(self) -> None:
        """Refuse (LmlabError) a config whose config.json lmlab would refuse to read (from_json)."""
        TrainConfig.from_json(self.to_json())


# ---------------------------------------------------------------------------------------------------------------
# The one loader from JSON


def from_dict(cls, obj: Any, where: str = ""):
    """Build dataclass `cls` from a JSON object: unknown keys and wrong types are errors, missing keys take their
    defaults, nested dataclasses are built the same way, and each class's own checks (__post_init__) run."""
    if not isinstance(obj, dict):
        raise LmlabError(f"{where or cls.__name__} must be a JSON object, got {type(obj).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(obj) - names)
    if unknown:
        raise LmlabError(f"unknown setting {where + '.' if where else ''}{unknown[0]}")
    values = {name: _typed(obj[name], hints[name], f"{where + '.' if where else ''}{name}") for name in obj}
    try:
        return cls(**values)
    except (TypeError, ValueError, ArithmeticError) as e:  # a check that met a value it did not expect
        raise LmlabError(f"invalid settings in {where or cls.__name__}: {e}") from None


def _typed(value: Any, hint: Any, name: str) -> Any:
    """`value` as type `hint` (int, float, bool, str, Literal, Optional, tuple[X, ...], a dataclass), or an error."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, name)
    if origin is Union or origin is getattr(types, "UnionType", None):
        if value is None and type(None) in args:
            return None
        rest = [a for a in args if a is not type(None)]
        return _typed(value, rest[0], name)
    if origin is Literal:
        if any(value == a and type(value) is type(a) for a in args):
            return value
        raise LmlabError(f"{name} must be one of {', '.join(map(repr, args))}, got {value!r}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise LmlabError(f"{name} must be a list, got {value!r}")
        return tuple(_typed(v, args[0], f"{name}[{i}]") for i, v in enumerate(value))
    if hint is bool and isinstance(value, bool):
        return value
    if hint is int and isinstance(value, int) and not isinstance(value, bool):
        if not -(1 << 63) <= value < 1 << 63:  # beyond what any size or count can be, and what torch can take
            raise LmlabError(f"{name} must be an integer that fits in 64 bits, got {str(value)[:20]}... "
                             f"({len(str(value))} digits)")
        return value
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        if not math.isfinite(value):
            raise LmlabError(f"{name} must be a finite number, got {value!r}")
        return float(value)
    if hint is str and isinstance(value, str):
        return value
    kind = getattr(hint, "__name__", str(hint))
    raise LmlabError(f"{name} must be {'an' if kind[0] in 'aeiou' else 'a'} {kind}, got {value!r}")


# ---------------------------------------------------------------------------------------------------------------
# Presets: named starting points, each a plain function returning a TrainConfig; CLI options override it


def tiny() -> TrainConfig:
    """The CPU recipe: a modern GPT (RoPE, RMSNorm, QK-norm, ReLU², untied head, zero-init projections), Muon for the
    hidden matrices and AdamW for the rest, with a warmup-stable-decay schedule over a wall-clock budget of about 4
    minutes. Its size, context, AdamW learning rate, Muon momentum and weight decay are left to the budget (None):
    budget.apply_budget picks TINY_RECIPE, SHORT_BUDGET for --max-time of 60 s or less, LONG_BUDGET for 600 s or
    more. docs/performance.md has what each choice bought."""
    return TrainConfig(
        preset="tiny",
        model=ModelConfig(block_size=None, n_layer=None, n_head=None, n_embd=None, dropout=None, attn_dropout=0.0),
        optim=OptimConfig(optimizer="muon", lr=None, muon_lr=0.02, muon_momentum=None, weight_decay=None,
                          schedule="wsd", warmup=50, decay_fraction=0.4, decay_shape="sqrt"),
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


# ---------------------------------------------------------------------------------------------------------------
# Supervised fine-tuning (--stage sft): its defaults, measured in docs/chat.md

# What --stage sft changes in a preset. The model, its sizes and its tokenizer are the base's (--init-from), so the
# tiny recipe's sizes and the corpus rule's dropout do not apply. The learning rates are pretraining's (the tiny
# recipe's 1e-2 for AdamW's part, Muon's 0.02): measured from the default base on synthetic:chat (docs/chat.md),
# 3e-3 and 0.01 left the masked validation loss higher at every evaluation of a 3-minute budget (0.57 against 0.54
# at step 200). A short warmup (the base is trained), the tiny recipe's schedule shape
# (warmup, stable, then a 1 - sqrt decay over the last 40%), and no dropout: 3 minutes pass over synthetic:chat's
# 20,000 conversations about once or twice.
SFT_DEFAULTS = {"lr": 1e-2, "muon_lr": 0.02, "warmup": 20, "max_time": 180.0, "eval_interval": 100,
                "checkpoint_interval": 500, "dropout": 0.0}


# What --stage dpo changes (docs/preferences.md has the measurements): the base's model and tokenizer, as for sft; a
# learning rate 10 times lower than SFT's (the base already writes the completions: DPO moves their relative
# probabilities, and at SFT's rates the log-probabilities of both completions fall together), the same warmup and no
# dropout (the policy's and the reference's log-probabilities are compared token for token). A 2-minute budget.
DPO_DEFAULTS = {"lr": 1e-3, "muon_lr": 0.002, "warmup": 10, "max_time": 120.0, "eval_interval": 50,
                "checkpoint_interval": 500, "dropout": 0.0}
# What --stage rl changes (docs/chat.md, "Reinforcement learning", measured from the SFT run of synthetic:chat on 2
# cores): AdamW for every weight at 5e-4, 20x below fine-tuning's rate. Muon takes full-size steps along every
# direction of a noisy policy gradient: at 1e-3 / 0.002 with 4 prompts a step the held-out reward fell in 40 s (0.41
# to 0.30); at 2e-4 / 5e-4 and 6e-4 / 1.5e-3, with dynamic sampling, the reward rose above a frozen control's on the
# same prompts by 0.013-0.014 in the last quarter of 3 minutes, AdamW's at 5e-4 by 0.018, with the best held-out reward
# (0.48 to 0.51-0.53). 8 groups with mixed rewards trained a step (RlConfig.rl_oversample). An evaluation every 25
# steps (a step takes about 1 s); no dropout.
RL_DEFAULTS = {"optimizer": "adamw", "lr": 5e-4, "muon_lr": 5e-4, "warmup": 10, "max_time": 180.0,
               "eval_interval": 25, "checkpoint_interval": 100, "dropout": 0.0, "batch_size": 8}
STAGE_DEFAULTS = {"sft": SFT_DEFAULTS, "dpo": DPO_DEFAULTS, "rl": RL_DEFAULTS}  # the stages that start from a base


def for_stage(cfg: TrainConfig, stage: str) -> TrainConfig:
    """A preset's config for a stage: as it is for pretraining; with the stage's defaults (SFT_DEFAULTS,
    DPO_DEFAULTS, RL_DEFAULTS) for the others (what `lmlab train --stage STAGE` starts from, before its options)."""
    if stage == "pretrain":
        return cfg
    if stage not in STAGE_DEFAULTS:
        raise LmlabError(f"--stage must be pretrain, {', '.join(list(STAGE_DEFAULTS)[:-1])} or "
                         f"{list(STAGE_DEFAULTS)[-1]}, got {stage!r}")
    d = STAGE_DEFAULTS[stage]
    return dataclasses.replace(
        cfg, stage=stage, max_time=d["max_time"], eval_interval=d["eval_interval"],
        checkpoint_interval=d["checkpoint_interval"], batch_size=d.get("batch_size", cfg.batch_size),
        model=dataclasses.replace(cfg.model, dropout=d["dropout"]),
        optim=dataclasses.replace(cfg.optim, optimizer=d.get("optimizer", cfg.optim.optimizer), lr=d["lr"],
                                  muon_lr=d["muon_lr"], warmup=d["warmup"]))


def get_preset(name: str, stage: str = "pretrain") -> TrainConfig:
    """The named preset, with the defaults of `stage` (for_stage)."""
    if name not in PRESETS:
        raise LmlabError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    return for_stage(PRESETS[name](), stage)
