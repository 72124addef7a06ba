"""The training loop: batch -> forward -> loss -> backward -> clip -> step -> schedule -> log -> eval -> checkpoint.

`train(config)` is a plain function; the CLI calls it, and so can tests and notebooks. It reads top to bottom:
setup (`prepare`), the loop (`train_step` and what is recorded after it), and the finish (`finish`). Everything that
changes as training runs lives in one `TrainState`, which a checkpoint saves and a resume restores.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import shlex
import signal
import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Optional

import torch

from . import distributed as dist_
from . import rundir
from . import tokenizer as tok
from . import dpo, rl, sft, tasks
from .checkpoint import chosen_checkpoints, latest_good_checkpoint, load_newest, save_checkpoint
from .common import (LmlabError, default_dtype, fmt_count, keep_freed_memory, resolve_device, resolve_dtype,
                     seed_everything)
from .budget import apply_budget, fit_to_corpus, needs_corpus
from .config import TrainConfig
from .data import BatchSampler, Splits, is_conversations, load_splits
from .distributed import Dist, all_reduce_sum, barrier, unwrap
from .evaluate import autocast_context, eval_stride, evaluate, window_stride
from .hf import init_from
from .inside import InsideRecorder
from .loss import LossConfig, Metrics, masked_loss, training_loss
from .model import ModelConfig, build_model, check_fits, count_params, grow_vocab
from .optim import build_optimizer, clip_grad_norm, lr_multiplier, set_lr
from .run import Run, init_from_run, is_lmlab_run
from .rundir import RunLock, write_status  # noqa: F401 - RunLock is part of this module's interface
from .sample import default_probe_prompts, generate, probe, prompt_ids, stream_text, text_banned
from .telemetry import (OVERFIT_EVALS, EvalHistory, GradientTelemetry, SpikeDetector, TensorBoard,
                        prune_snapshots_after, save_snapshot)
from .threads import backward_in_parts, share_optimizer, shared_backward, split_parts, step_threads


class Interrupted(Exception):
    """Ctrl-C or SIGTERM arrived; a checkpoint was written."""


def say(d: Dist, msg: str) -> None:
    """Progress for the user, from rank 0 only."""
    if d.main:
        print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------------------------
# What a run is trained with (chosen once) and what changes as it trains


@dataclass
class Setup:
    """What a run is trained with, chosen once at its start."""

    cfg: TrainConfig
    d: Dist
    run_dir: Path
    device: torch.device
    dtype: torch.dtype
    tokenizer: tok.Tokenizer
    splits: Splits
    grad_accum: int
    global_batch: int
    chat: Optional[sft.ChatData] = None
    """--stage sft: the conversations (splits then holds their token streams, for the inside records)."""
    val_blocks: Optional[tuple] = None
    """--stage sft: the held-out conversations packed into blocks, the same at every evaluation."""
    pairs: Optional[dpo.PairData] = None
    """--stage dpo: the preference pairs and the reference's log-probabilities (splits holds their token streams)."""
    split: int = 1
    """How many threads share each micro-batch's rows (threads.split_parts)."""

    @property
    def tokens_per_step(self) -> int:
        if self.pairs is not None:  # pairs: the tokens of a chosen and a rejected completion, on average
            return round(self.global_batch * self.pairs.pair_tokens)
        return self.global_batch * self.cfg.model.block_size

    @property
    def token_bytes(self) -> torch.Tensor:
        return torch.from_numpy(self.tokenizer.byte_lengths())


@dataclass
class TrainState:
    """Everything that changes as training runs: model, optimizer, batch sampler, RNGs and counters. A checkpoint
    holds all of it, so a resumed run goes on exactly as if it had never stopped."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    sampler: BatchSampler | sft.PackedSampler | dpo.PairSampler | rl.RolloutSampler
    step: int = 0
    tokens: int = 0
    elapsed: float = 0.0
    best_val: float = math.inf
    best_reward: float = -math.inf
    """--stage rl: the highest held-out reward so far (its best checkpoint is chosen by it, not the loss)."""
    lr_scale: float = 1.0
    skipped: int = 0
    rollbacks: int = 0
    spikes: SpikeDetector = field(default_factory=SpikeDetector)
    evals: EvalHistory = field(default_factory=EvalHistory)

    def state_dict(self) -> dict:
        """The counters (JSON, in state.json) and the RNG states (tensors); model and optimizer save themselves."""
        rng = {"torch": torch.get_rng_state(), "sampler": self.sampler.state_dict()["generator"]}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            rng["cuda"] = torch.cuda.get_rng_state()
        counters = {"tokens": self.tokens, "elapsed_s": self.elapsed, "lr_scale": self.lr_scale,
                    "skipped_steps": self.skipped, "spikes": self.spikes.state_dict(), "rollbacks": self.rollbacks,
                    "evals": self.evals.state_dict(),
                    "best_val_loss": self.best_val if math.isfinite(self.best_val) else None}
        if isinstance(self.sampler, rl.RolloutSampler):  # which model the KL penalty is to; the best reward
            counters["reference"] = self.sampler.reference_id
            counters["best_heldout_reward"] = self.best_reward if math.isfinite(self.best_reward) else None
        return {"step": self.step, "counters": counters, "rng": rng}

    def load_state_dict(self, sd: dict, seed: int, d: Dist) -> None:
        counters, rng = sd["counters"], sd["rng"]
        self.sampler.load_state_dict({"generator": rng["sampler"]})
        torch.set_rng_state(rng["torch"])
        if d.rank:
            torch.manual_seed(seed + 1_000_003 * d.rank + sd["step"])  # dropout differs between ranks
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
        self.step, self.tokens, self.elapsed = sd["step"], counters["tokens"], counters["elapsed_s"]
        self.best_val = counters.get("best_val_loss") or math.inf
        best_reward = counters.get("best_heldout_reward")
        self.best_reward = -math.inf if best_reward is None else best_reward
        self.lr_scale = counters.get("lr_scale", 1.0)
        self.skipped = counters.get("skipped_steps", 0)
        self.rollbacks = counters.get("rollbacks", 0)
        if "spikes" in counters:
            self.spikes.load_state_dict(counters["spikes"])
        if "evals" in counters:
            self.evals.load_state_dict(counters["evals"])
        if isinstance(self.sampler, rl.RolloutSampler):
            self.sampler.check_reference(counters.get("reference"))


def check_stage(cfg: TrainConfig) -> None:
    """Refuse what the stage cannot train: fine-tuning needs a model to start from and conversations (sft),
    preference pairs (dpo) or a task whose verifier rewards (rl)."""
    if cfg.stage == "pretrain":
        return
    if not cfg.init_from and not cfg.resume:
        raise LmlabError(f"--stage {cfg.stage} fine-tunes a model: give --init-from RUN (an lmlab run folder) or a "
                         f"transformers model folder or hub id")
    if cfg.stage == "dpo":
        return dpo.check_config(cfg)
    if cfg.stage == "rl":
        return rl.check_config(cfg)
    for option, source in (("--data", cfg.data.data), ("--val-data", cfg.data.val_data)):
        if source and not is_conversations(source):
            raise LmlabError(f"--stage sft trains on conversations: {option} must be a .jsonl or .parquet file of "
                             f"{{\"messages\": [...]}} records (or of {{\"prompt\", \"completion\"}} texts), or "
                             f"synthetic:chat, not {source}")
    if cfg.loss.objective != "cross_entropy":
        raise LmlabError(f"--stage sft trains cross_entropy on the assistant's tokens, not --objective "
                         f"{cfg.loss.objective}")


def accumulation_steps(cfg: TrainConfig, world: int) -> tuple[int, int]:
    """(grad_accum, global batch): processes x micro-batch x accumulation steps = the global batch."""
    if not cfg.global_batch:
        return cfg.grad_accum, cfg.batch_size * cfg.grad_accum * world
    per_pass = cfg.batch_size * world
    if cfg.global_batch % per_pass:
        raise LmlabError(f"--global-batch {cfg.global_batch} is not a multiple of {world} processes x "
                         f"--batch-size {cfg.batch_size} = {per_pass}; change one of them")
    return cfg.global_batch // per_pass, cfg.global_batch


def step_tokens(setup: Setup, state: TrainState) -> int:
    """The tokens of the last step: the batch's (rl: its prompts and completions, as long as they came out)."""
    if isinstance(state.sampler, rl.RolloutSampler):
        return state.sampler.step_tokens()
    return setup.tokens_per_step


def progress(cfg: TrainConfig, state: TrainState) -> float:
    """The share of the budget done: of the steps, or of the seconds, whichever is further."""
    return max(state.step / cfg.max_steps if cfg.max_steps else 0.0,
               state.elapsed / cfg.max_time if cfg.max_time else 0.0)


# ---------------------------------------------------------------------------------------------------------------
# One step


@dataclass
class StepResult:
    loss: float
    grad_norm: float
    stats: dict = field(default_factory=dict)
    """What else the step measured, logged with it: --stage dpo's rewards, margin, accuracy, log-probabilities."""

    @property
    def finite(self) -> bool:
        return math.isfinite(self.loss) and math.isfinite(self.grad_norm)


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batches: Iterable, loss_cfg: LossConfig,
               grad_clip: float, autocast, d: Dist = Dist(), objective: Callable = training_loss,
               telemetry: Optional[GradientTelemetry] = None, split: int = 1) -> StepResult:
    """forward -> loss -> backward on every micro-batch, clip, then the optimizer step, skipped when the loss or the
    gradient norm is not finite (one bad batch must not wreck the weights). `model` may be compiled or wrapped;
    telemetry, when given, looks at the weights just before the update. A micro-batch is (x, y), or packed
    conversations (sft.PackedBatch), whose objective (masked_loss) takes the mask of trained targets and their
    count, or preference pairs (dpo.PairBatch), whose objective (dpo.objective) also returns what it measured.
    split > 1: each (x, y) or packed micro-batch's rows are shared among that many threads (threads.split_parts
    decides)."""
    batches = list(batches)
    with step_threads(split):
        return _train_step(model, optimizer, batches, loss_cfg, grad_clip, autocast, d, objective, telemetry, split)


def _train_step(model, optimizer, batches: list, loss_cfg, grad_clip, autocast, d, objective, telemetry, split
                ) -> StepResult:
    loss_sum = stats_sum = None
    for micro, batch in enumerate(batches):
        if split > 1:  # the rows shared among threads (threads.py): plain (inputs, targets), or packed (--stage sft)
            scale = 1 / len(batches)
            if isinstance(batch, sft.PackedBatch):
                loss = backward_in_parts(model, sft.row_parts(model, batch, objective, loss_cfg, split), scale)
            else:
                loss = shared_backward(model, *batch, objective, loss_cfg, split, scale)
            loss_sum = loss if loss_sum is None else loss_sum + loss
            continue
        with dist_.no_sync(model, d, last_micro_step=micro == len(batches) - 1):
            with autocast:
                if isinstance(batch, sft.PackedBatch):
                    logits = model(batch.x, documents=batch.documents)
                    loss = objective(logits, batch.y, loss_cfg, batch.mask, batch.count)
                elif isinstance(batch, dpo.PairBatch):
                    loss, stats = objective(model(batch.x), batch, loss_cfg)
                    stats_sum = stats if stats_sum is None else stats_sum + stats
                elif isinstance(batch, rl.Rollout):  # completions sampled and scored: the policy loss
                    loss = batch.loss(model)
                else:
                    x, y = batch
                    loss = objective(model(x), y, loss_cfg)
            (loss / len(batches) if len(batches) > 1 else loss).backward()
        loss_sum = loss.detach() if loss_sum is None else loss_sum + loss.detach()
    grad_norm = clip_grad_norm([p for p in unwrap(model).parameters() if p.requires_grad], grad_clip)
    mean_loss = all_reduce_sum(loss_sum / len(batches), d) / d.world  # the loss of the global batch
    result = StepResult(float(mean_loss), float(dist_.full_tensor(grad_norm)), {} if stats_sum is None else
                        dpo.named(all_reduce_sum(stats_sum / len(batches), d) / d.world))
    if result.finite:
        if telemetry is not None:
            telemetry.before_update()
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return result


# ---------------------------------------------------------------------------------------------------------------
# Setup


def prepare_run_dir(cfg: TrainConfig) -> Path:
    """The run folder: the one to resume (checked for links), or a new one (refused if it holds anything else)."""
    if cfg.resume:
        run_dir = Path(cfg.resume)
        Run.open(run_dir)
        rundir.check_no_links(run_dir)
        return run_dir
    run_dir = Path(cfg.out or os.path.join("runs", f"{cfg.preset}-{time.strftime('%Y%m%d-%H%M%S')}"))
    rundir.check_new_run_dir(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise LmlabError(f"cannot create run directory {run_dir}: {e.strerror}") from None
    if not os.access(run_dir, os.W_OK):
        raise LmlabError(f"run directory {run_dir} is not writable")
    return run_dir


def lock_run_dir(cfg: TrainConfig, d: Dist, stack: ExitStack) -> Path:
    """Rank 0 creates and locks the run folder; the others learn its name, or rank 0's error."""
    message = ""
    if d.main:
        try:
            run_dir = prepare_run_dir(cfg)
            stack.enter_context(RunLock(run_dir))
            rundir.remove_stale_temp_files(run_dir)
            message = str(run_dir)
        except LmlabError as e:
            message = "\0" + str(e)
    message = dist_.broadcast_str(message, d)
    if message.startswith("\0"):
        raise LmlabError(message[1:])
    return Path(message)


RESUME_FIXED = {"seed": "--seed", "preset": "--preset", "stage": "--stage", "data.tokenizer": "--tokenizer",
                "data.vocab_size": "--vocab-size", "optim.optimizer": "--optimizer"}


def check_resume_settings(saved: TrainConfig, cfg: TrainConfig, run_dir: Path) -> None:
    """Every setting changed on resume must take effect; refuse those that cannot. The model and tokenizer are the
    checkpoint's, the seed's streams are restored from it, another optimizer has no state to go on from, the run
    goes on in its own folder, and its weights come from its checkpoint, not from --init-from."""
    if dataclasses.asdict(saved.model) != dataclasses.asdict(cfg.model):
        raise LmlabError(f"the model settings differ from those of the run in {run_dir}; they cannot change on resume")
    for path, option in RESUME_FIXED.items():
        old, new = saved, cfg
        for part in path.split("."):
            old, new = getattr(old, part), getattr(new, part)
        if old != new and not (path == "data.vocab_size" and cfg.data.tokenizer != "bpe"):
            raise LmlabError(f"{option} cannot change on resume (the run in {run_dir} has {old!r}, not {new!r}); "
                             f"start a new run to change it")
    if cfg.out not in ("", saved.out) and Path(cfg.out).resolve() != run_dir.resolve():
        raise LmlabError(f"--out {cfg.out} cannot be given with --resume: the run goes on in {run_dir}, its own "
                         f"folder; to go on in another, copy the folder there and resume the copy (with --data)")
    if cfg.init_from != saved.init_from:
        raise LmlabError(f"--init-from cannot change on resume: the run goes on from its own checkpoint (it started "
                         f"from {saved.init_from or 'its own initialisation'}); start a new run to import a model")


def resume_batch(saved: TrainConfig, cfg: TrainConfig, world: int) -> tuple[TrainConfig, str]:
    """The global batch stays the run's on resume (it is what the step sizes and the data order were made with):
    --batch-size or --grad-accum, given, split it anew, the other one derived, and a split that does not divide it
    is refused naming the option given. Returns the config with the split, and a line saying it when it changed."""
    total = saved.global_batch or saved.batch_size * saved.grad_accum
    if cfg.global_batch not in (0, total):
        raise LmlabError(f"--global-batch cannot change on resume (the run's is {total} sequences a step, which its "
                         f"learning rates and data order were made with); start a new run to change it")
    batch, accum = cfg.batch_size, cfg.grad_accum
    batch_given, accum_given = batch != saved.batch_size, accum != saved.grad_accum
    if batch_given and accum_given:
        if batch * accum * world != total:
            raise LmlabError(f"--batch-size {batch} x --grad-accum {accum} x {world} process(es) = "
                             f"{batch * accum * world} sequences a step, but the run's global batch is {total}, "
                             f"which cannot change on resume")
    elif accum_given:
        if total % (accum * world):
            raise LmlabError(f"--grad-accum {accum} x {world} process(es) does not divide the run's global batch of "
                             f"{total} sequences a step, which cannot change on resume")
        batch = total // (accum * world)
    else:
        if total % (batch * world):
            given = f"--batch-size {batch}" if batch_given else f"the run's batch of {batch}"
            raise LmlabError(f"{given} x {world} process(es) does not divide the run's global batch of {total} "
                             f"sequences a step, which cannot change on resume; set --batch-size or --grad-accum")
        accum = total // (batch * world)
    note = ""
    if (batch, accum) != (saved.batch_size, saved.grad_accum):
        note = (f"resuming with the run's global batch of {total} sequences a step: --batch-size {batch} x "
                f"{accum} accumulation step(s) x {world} process(es)")
    return dataclasses.replace(cfg, batch_size=batch, grad_accum=accum, global_batch=total), note


def resume_point(cfg: TrainConfig, run_dir: Path, d: Dist) -> tuple[Optional[tok.Tokenizer], bool]:
    """On resume: the run's tokenizer, and whether it has a checkpoint to go on from (a run that died before its
    first one starts over, its logs emptied)."""
    if not cfg.resume:
        return None, False
    tokenizer = Run.open(run_dir).tokenizer()
    if latest_good_checkpoint(run_dir, warn=lambda m: say(d, m)) is not None:
        return tokenizer, True
    say(d, f"run {run_dir} has no complete checkpoint yet; starting it again from step 0")
    for name in rundir.STEP_LOGS if d.main else ():
        rundir.cut_jsonl(run_dir, name, -1)
    return tokenizer, False


BUDGET_WARMUP = 2  # untimed steps before the estimate's: the first two of a tiny model take 1.5-5 s on 2 cores
BUDGET_TIMED = 5


def budget_steps(cfg: TrainConfig, vocab_size: int, device: torch.device, dtype: torch.dtype, d: Dist,
                 grad_accum: int = 1) -> float:
    """The optimizer steps the budget will make: --max-steps, or for a time budget an estimate from a few timed steps
    of this model on this machine (rank 0's, for every rank). Leaves the random number generators as they were."""
    if not cfg.max_time:
        return float(cfg.max_steps)
    seconds = ""
    if d.main:
        with torch.random.fork_rng(devices=[]):
            model = build_model(dataclasses.replace(cfg.model, dropout=0.0), vocab_size).to(device)
            optimizer = build_optimizer(model, cfg.optim)
            x = torch.randint(0, vocab_size, (cfg.batch_size, cfg.model.block_size + 1), device=device)
            batch = [(x[:, :-1], x[:, 1:])] * grad_accum
            times = []
            for _ in range(BUDGET_WARMUP + BUDGET_TIMED):
                t = time.perf_counter()
                train_step(model, optimizer, batch, cfg.loss, cfg.optim.grad_clip, autocast_context(device, dtype))
                if device.type == "cuda":
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - t)
            # the fastest timed eager step: whatever else wakes up at the start (compile workers, a browser) slows
            # some steps by seconds, never speeds one up. A compiled run's steps take about as long: compiling saves
            # about what the loop adds (batches, logs, telemetry) on 2 cores (docs/performance.md, Small corpora)
            seconds = repr(min(times[BUDGET_WARMUP:]))
    per_step = float(dist_.broadcast_str(seconds, d))
    steps = cfg.max_time / max(per_step, 1e-6)
    return min(steps, cfg.max_steps) if cfg.max_steps else steps


def prepare(cfg: TrainConfig, run_dir: Path, d: Dist, reward: Optional[rl.Reward] = None,
            task: Optional[tasks.Task] = None) -> tuple[Setup, TrainState, bool]:
    """Device, dtype, data, model and optimizer, in the order that makes a run reproducible from its seed."""
    device = dist_.rank_device(resolve_device(cfg.device), d)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if device.type == "cpu":
        keep_freed_memory()  # about 12,000 page faults a step fewer (common.py)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    seed_everything(cfg.seed)
    tokenizer, resuming = resume_point(cfg, run_dir, d)
    conversations = sft.read_chat_data(cfg.data.data, cfg.data.val_data, cfg.data.val_fraction, cfg.seed) \
        if cfg.stage == "sft" else None  # a malformed file is refused before the base is read
    pairs = dpo.load_pairs(cfg.data.data, cfg.data.val_data, cfg.data.val_fraction, cfg.seed) \
        if cfg.stage == "dpo" else None
    weights, base_vocab = None, None
    if cfg.init_from and not resuming:  # an lmlab run's, or a transformers model's, architecture, tokenizer, weights
        cfg, tokenizer, weights = (init_from_run if is_lmlab_run(cfg.init_from) else init_from)(
            cfg, lambda m: say(d, m))
        if cfg.stage == "sft" and not sft.are_completions(conversations) and tokenizer.chat_template is None:
            # a base from before the special tokens, to be fine-tuned on conversations
            base_vocab = tokenizer.vocab_size
            tokenizer, added = tok.add_special_tokens(tokenizer)
            say(d, f"the base has no chat template: added the special tokens {' '.join(added)} (ids {base_vocab}-"
                   f"{tokenizer.vocab_size - 1}), their embedding and output rows starting as the mean of the others")
    grad_accum, global_batch = accumulation_steps(cfg, d.world)
    splits, sampler, chat_data, val_blocks, pair_data = stage_data(cfg, tokenizer, conversations, pairs, device,
                                                                   grad_accum, d, reward, task)
    dtype = resolve_dtype(cfg.dtype, device)
    check_fits(cfg.model, splits.tokenizer.vocab_size, f"run {run_dir}", training=not d.sharded,  # fsdp: shards
               batch=cfg.batch_size, value_bytes=8 if dtype == torch.float64 else 4)  # before any model is built
    if needs_corpus(cfg):  # the tiny preset's dropout follows the passes the budget makes over the training text
        steps = budget_steps(cfg, splits.tokenizer.vocab_size, device, dtype, d, grad_accum)
        cfg, note = fit_to_corpus(cfg, len(splits.train), steps * global_batch * cfg.model.block_size)
        say(d, note)
    setup = Setup(cfg, d, run_dir, device, dtype, splits.tokenizer, splits, grad_accum, global_batch, chat_data,
                  val_blocks, pair_data, split_parts(cfg, device, dtype, d.world))
    with default_dtype(torch.float64 if setup.dtype == torch.float64 else torch.get_default_dtype()):
        model = build_model(cfg.model, base_vocab or setup.tokenizer.vocab_size)  # float64: its init in float64 too
    if weights is not None:
        model.load_state_dict(weights)
    if base_vocab is not None:  # before the optimizer is built: the grown tables are new parameters
        grow_vocab(model, setup.tokenizer.vocab_size)
    if pair_data is not None:  # the base, frozen: its log-probabilities, computed once (or the run's, on resume)
        dpo.reference(model.to(device), pair_data, cfg, run_dir, resuming, dtype, sft.pad_id(tokenizer), d.main,
                      lambda m: say(d, m))
    model = dist_.wrap(model.to(device), d, device)  # same on all ranks
    if isinstance(sampler, rl.RolloutSampler):  # it samples from the model, and keeps the reference
        sampler.bind(unwrap(model), weights, lambda m: say(d, m))
    state = TrainState(model, build_optimizer(unwrap(model), cfg.optim), sampler)
    if d.rank:
        torch.manual_seed(cfg.seed + 1_000_003 * d.rank)  # dropout differs between ranks
    return setup, state, resuming


def stage_data(cfg: TrainConfig, tokenizer: tok.Tokenizer, conversations, pairs, device: torch.device,
               grad_accum: int, d: Dist, reward: Optional[rl.Reward], task: Optional[tasks.Task]) -> tuple:
    """The stage's data: (splits, the sampler of its micro-batches, and what sft, rl and dpo keep beside them: the
    conversations, the packed validation blocks, the preference pairs; None where the stage has none)."""
    chat_data, val_blocks, pair_data = None, None, None
    if cfg.stage == "dpo":
        pair_data = dpo.encode(pairs, cfg.data.val_data, tokenizer, cfg.model.block_size, lambda m: say(d, m))
        splits = Splits(pair_data.stream("train"), pair_data.stream("val"), tokenizer,
                        {"corpus": cfg.data.data, "pairs": len(pair_data.train)},
                        {"corpus": cfg.data.val_data or cfg.data.data, "pairs": len(pair_data.val)})
        sampler = dpo.PairSampler(pair_data, cfg.batch_size, cfg.seed, device, grad_accum, d.rank, d.world,
                                  sft.pad_id(tokenizer))
    elif cfg.stage == "sft":
        splits, chat_data, val_blocks = load_chat(cfg, tokenizer, conversations, d)
        sampler = sft.PackedSampler(chat_data.train, cfg.model.block_size, cfg.batch_size, cfg.seed, device,
                                    grad_accum, d.rank, d.world, sft.pad_id(tokenizer))
    elif cfg.stage == "rl":
        rl_data = rl.load(cfg, tokenizer, lambda m: say(d, m), task)
        splits, chat_data, val_blocks = rl_data.splits, rl_data.chat, rl_data.val_blocks
        sampler = rl.RolloutSampler(rl_data, tokenizer, cfg, device, reward, grad_accum)
    else:
        if not d.main:
            barrier(d)  # rank 0 tokenizes and fills the cache first; the others then read it
        splits = load_splits(cfg.data, tokenizer=tokenizer, say=lambda m: say(d, m))
        if d.main:
            barrier(d)
        if len(splits.val) < 2:
            raise LmlabError(f"the validation split has {len(splits.val)} tokens; use more text or --val-data")
        sampler = BatchSampler(splits.train, cfg.model.block_size, cfg.batch_size, cfg.seed, device, grad_accum,
                               d.rank, d.world)  # (refuses a training split shorter than a block)
    return splits, sampler, chat_data, val_blocks, pair_data


def load_chat(cfg: TrainConfig, tokenizer: tok.Tokenizer, conversations, d: Dist
              ) -> tuple[Splits, sft.ChatData, tuple]:
    """--stage sft: the conversations rendered for the tokenizer, their token streams as the run's splits (what the
    inside records and the pass count read), and the held-out ones packed for validation."""
    chat_data = sft.load_chat_data(conversations, cfg.data.val_data, tokenizer, cfg.model.block_size,
                                   lambda m: say(d, m))
    meta = {"corpus": cfg.data.data, "conversations": len(chat_data.train)}
    splits = Splits(chat_data.stream("train"), chat_data.stream("val"), tokenizer, meta,
                    {"corpus": cfg.data.val_data or cfg.data.data, "conversations": len(chat_data.val)})
    val_blocks = sft.validation_blocks(chat_data.val, cfg.model.block_size, cfg.eval_tokens, sft.pad_id(tokenizer))
    return splits, chat_data, val_blocks


def restore(setup: Setup, state: TrainState) -> Path:
    """Put the state back as it was at the newest checkpoint that loads, and cut the logs back to it."""
    d, run_dir = setup.d, setup.run_dir
    ckpt = load_newest(run_dir, state.model, state.optimizer, setup.device, warn=lambda m: say(d, m))
    if ckpt is None:
        raise LmlabError(f"no checkpoint of run {run_dir} can be loaded")
    state.load_state_dict({"step": ckpt.step, "counters": ckpt.state, "rng": ckpt.rng}, setup.cfg.seed, d)
    if setup.pairs is not None:
        dpo.check_reference(setup.pairs, ckpt.state, ckpt.path)
    if d.main:
        for name in rundir.STEP_LOGS:
            rundir.cut_jsonl(run_dir, name, state.step)
        prune_snapshots_after(run_dir, state.step)
    return ckpt.path


def answers_turns(setup: Setup) -> bool:
    """Whether the run is trained to answer in conversations (a chat model): sft on conversations (not on
    prompt-completion texts), rl on synthetic:chat (TrainConfig.chat_model), and dpo on pairs of messages."""
    plain = setup.chat is not None and setup.chat.plain
    return (setup.cfg.chat_model and not plain) or (setup.pairs is not None and setup.pairs.chat)


def write_run_files(setup: Setup, resumed: bool) -> None:
    """config.json says what the run uses, as it uses it; status.json says it is running. The user's cache records
    that this folder's run, with its id, reads the corpus paths its config names (rundir.check_data_paths)."""
    if not setup.d.main:
        return
    cfg, tokenizer, run_dir = setup.cfg, setup.tokenizer, setup.run_dir
    if not resumed:
        rundir.write_json(run_dir, rundir.TOKENIZER, tokenizer.to_json())
    run_id = (Run(run_dir).run_id if cfg.resume else None) or rundir.new_run_id()
    saved = dataclasses.replace(cfg, global_batch=setup.global_batch, grad_accum=setup.grad_accum)
    rundir.write_json(run_dir, rundir.CONFIG, {**saved.to_json(), "vocab_size": tokenizer.vocab_size,
                                               "tokenizer_fingerprint": tokenizer.fingerprint(), rundir.RUN_ID: run_id,
                                               rundir.CHAT: answers_turns(setup)})
    rundir.remember_sources(run_dir, run_id, [cfg.data.data, cfg.data.val_data], lambda m: say(setup.d, m))
    write_status(run_dir, "running", world_size=setup.d.world)


def describe(setup: Setup, state: TrainState) -> None:
    """What the run chose and why: model, data, device, dtype, batch layout, budget."""
    cfg, d, tokenizer, splits = setup.cfg, setup.d, setup.tokenizer, setup.splits
    m = cfg.model
    if setup.pairs is not None:
        data = f"preference tuning on {len(setup.pairs.train):,} pairs, validating on {len(setup.pairs.val):,}"
    elif setup.chat is not None:
        data = (f"fine-tuning on {len(setup.chat.train):,} conversations ({fmt_count(len(splits.train))} tokens), "
                f"validating on {len(setup.chat.val):,}" + (f" and {len(setup.chat.tasks)} prompts answered"
                                                           if setup.chat.tasks else ""))
    else:
        data = f"train {fmt_count(len(splits.train))} / val {fmt_count(len(splits.val))} tokens"
    if isinstance(state.sampler, rl.RolloutSampler):
        data = state.sampler.describe()
    say(d, f"run {setup.run_dir}: {m.arch} {m.n_layer}L/{m.n_head}H/{m.n_embd}d, "
           f"{fmt_count(count_params(state.model))} params; {tokenizer.kind} tokenizer, vocab {tokenizer.vocab_size}; "
           f"{data}")
    batch = (f"{setup.tokens_per_step:,} tokens/step ({setup.global_batch} sequences x {m.block_size})"
             if cfg.stage != "rl" else f"context {m.block_size}")  # rl: as many tokens as the completions take
    say(d, f"device {setup.device} ({'asked for' if cfg.device != 'auto' else 'auto-selected'}), autocast "
           f"{str(setup.dtype)[6:]}, {batch}, optimizer {cfg.optim.optimizer}, schedule {cfg.optim.schedule}, "
           f"budget {cfg.max_steps or '-'} steps / {cfg.max_time or '-'} s, threads {torch.get_num_threads()}"
           f"{f' (each micro-batch shared by {setup.split})' if setup.split > 1 else ''}"
           f"{', compiled' if cfg.compile else ''}")
    if d.active:
        say(d, f"data parallel ({d.strategy}, {'nccl' if setup.device.type == 'cuda' else 'gloo'}): global batch "
               f"{setup.global_batch} sequences = {d.world} processes x {cfg.batch_size} micro-batch x "
               f"{setup.grad_accum} accumulation steps")
        if d.sharded and cfg.telemetry_interval:
            say(d, "note: per-layer gradient telemetry is off under fsdp (the gradients are sharded)")


# ---------------------------------------------------------------------------------------------------------------
# What training records, and where


class Viewer:
    """The whole model on rank 0, for probes, weight snapshots and samples (None on other ranks).

    Under FSDP the shards are gathered (a collective: every rank calls get()) into a plain copy on the CPU.
    """

    def __init__(self, model: torch.nn.Module, d: Dist, model_cfg: ModelConfig, vocab_size: int):
        self.model, self.d, self.model_cfg, self.vocab_size = model, d, model_cfg, vocab_size
        self.copy: Optional[torch.nn.Module] = None

    def get(self) -> Optional[torch.nn.Module]:
        if not self.d.sharded:
            return unwrap(self.model) if self.d.main else None
        weights = dist_.full_state_dict(self.model, self.d)
        if weights is None:
            return None
        if self.copy is None:
            self.copy = build_model(self.model_cfg, self.vocab_size)
        self.copy.load_state_dict(weights)
        return self.copy


class Recorder:
    """The run's logs: a record per step and per evaluation in metrics.jsonl (rank 0 only), probes, gradient
    telemetry, weight snapshots and TensorBoard; and the progress bar on a terminal."""

    def __init__(self, setup: Setup, state: TrainState):
        cfg, d = setup.cfg, setup.d
        self.setup, self.cfg, self.d = setup, cfg, d
        self.probe_prompts = ((list(cfg.probe_prompts) or self.default_prompts()) if cfg.probe else [])
        self.telemetry = GradientTelemetry(unwrap(state.model), cfg.telemetry_interval if d.main and not d.sharded else 0)
        self.board = TensorBoard(setup.run_dir, cfg.tensorboard and d.main)
        self.viewer = Viewer(state.model, d, cfg.model, setup.tokenizer.vocab_size)
        self.inside = InsideRecorder(setup.tokenizer, self.probe_prompts or self.default_prompts(),
                                     setup.splits.val, cfg.model.block_size, cfg.batch_size) \
            if cfg.inside and d.main else None
        self.inside_seconds, self.started = 0.0, time.perf_counter()
        self.history = state.evals
        self.metrics = self.open_log()
        self.last_val: Optional[Metrics] = None
        self.last_val_step = -1
        self.answers: Optional[dict] = None  # sft: the last evaluation's exact match by skill and ended turns
        self.overfitting = 0  # evaluations in a row where validation loss rose while training loss fell
        self.warning = ""  # said after the evaluation's line
        self.bar = None
        if cfg.progress and sys.stderr.isatty() and d.main:
            from tqdm import tqdm

            total = cfg.max_steps if cfg.max_steps and not cfg.max_time else None
            self.bar = tqdm(total=total, initial=state.step, unit="step", dynamic_ncols=True, file=sys.stderr)

    def default_prompts(self) -> list:
        """The probe's prompts: 3 cut from the validation text; for sft, 3 held-out prompts rendered to be
        answered (as token ids: they hold special tokens)."""
        setup = self.setup
        if setup.chat is not None or setup.pairs is not None:
            return list((setup.chat or setup.pairs).prompts)
        return default_probe_prompts(setup.splits.val, setup.tokenizer, self.cfg.model.block_size)

    def open_log(self):
        return rundir.open_append(self.setup.run_dir, rundir.METRICS) if self.d.main else open(os.devnull, "a")

    def write(self, record: dict) -> None:
        self.metrics.write(json.dumps(record) + "\n")
        self.metrics.flush()  # live readers (and the crash test) see every step

    def step(self, state: TrainState, result: StepResult, dt: float, watched: bool) -> None:
        record = {"step": state.step, "tokens": state.tokens, "train_loss": result.loss,
                  "lr": state.optimizer.param_groups[0]["lr"], "grad_norm": result.grad_norm,
                  "tokens_per_s": step_tokens(self.setup, state) / dt, "elapsed_s": round(state.elapsed, 4)}
        record.update(result.stats)
        if isinstance(state.sampler, rl.RolloutSampler):  # rewards, KL, entropy, lengths, where the time went
            record.update(state.sampler.step_record(dt))
        if not result.finite:
            record.update(skipped=True, skipped_total=state.skipped)
        if self.cfg.optim.grad_clip and result.grad_norm > self.cfg.optim.grad_clip:
            record["clipped"] = True
        if result.finite:
            self.history.train(result.loss)
        spike = state.spikes.update(result.loss)
        if spike is not None:
            record["spike_z"] = round(spike, 2)
        if watched:
            rundir.append_jsonl(self.setup.run_dir, rundir.TELEMETRY, self.telemetry.after_update(state.step))
        self.board.scalars(state.step, {"train/loss": result.loss, "train/lr": record["lr"],
                                        "train/grad_norm": result.grad_norm, "train/tokens_per_s": record["tokens_per_s"]})
        self.write(record)
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix_str(f"loss {result.loss:.4f} | {fmt_count(record['tokens_per_s'])} tok/s | "
                                     f"{state.elapsed:.0f}s")

    def evaluation(self, state: TrainState) -> bool:
        """Validation loss, then the probe, what the model learnt inside, and a weight snapshot (rank 0). True when
        this is the best validation loss so far (for --stage rl, the best held-out reward: the later of equals)."""
        setup, cfg = self.setup, self.cfg
        stride = window_stride(cfg.eval_stride, cfg.model.block_size)
        m = self.validation(unwrap(state.model), stride)
        best = m.loss < state.best_val
        state.best_val = min(state.best_val, m.loss)
        self.last_val, self.last_val_step = m, state.step
        # rl trades the reference answers' likelihood for reward: a rising validation loss is not memorising there
        self.overfitting = self.history.evaluation(m.loss) if cfg.stage != "rl" else 0
        passes = state.tokens / len(setup.splits.train)
        record = {"step": state.step, "tokens": state.tokens, "elapsed_s": round(state.elapsed, 3),
                  "val_loss": m.loss, "val_bits_per_byte": m.bits_per_byte, "val_accuracy": m.accuracy,
                  "val_perplexity": m.perplexity, "val_tokens": m.tokens, "val_stride": stride,
                  "passes": round(passes, 4), "best": best}
        tasks = setup.chat.tasks if setup.chat is not None else []
        if setup.chat is not None or setup.pairs is not None:
            del record["val_stride"]  # whole conversations, not windows of a stream
        if isinstance(m, dpo.PreferenceMetrics):
            record.update(m.record())
        view = self.viewer.get() if self.probe_prompts or cfg.trajectory_snapshots or cfg.inside or tasks \
            else None  # rank 0's model (under fsdp every rank calls get)
        self.answers = sft.answer_tasks(view, setup.tokenizer, tasks) if view is not None and tasks else None
        if isinstance(state.sampler, rl.RolloutSampler):  # greedy answers to the held-out prompts, rewarded
            self.answers = state.sampler.evaluate(unwrap(state.model), setup.run_dir, state.step)
            best = self.answers["heldout_reward"] >= state.best_reward
            state.best_reward = max(state.best_reward, self.answers["heldout_reward"])
            record["best"] = best
        record.update(self.answers or {})
        self.warning = ""
        if self.overfitting >= OVERFIT_EVALS:
            record["overfitting"] = self.overfitting
            if not self.history.said:
                self.history.said = True
                self.warning = (f"validation loss has risen for {self.overfitting} evaluations while training loss "
                                f"fell: the model is memorising the training text; passes so far: {passes:.1f}")
        self.write(record)
        self.board.scalars(state.step, {"val/loss": m.loss, "val/bits_per_byte": m.bits_per_byte,
                                        "val/accuracy": m.accuracy})
        if self.answers is not None and self.answers.get("exact_match"):
            self.board.scalars(state.step, {"val/ended_turn": self.answers["ended_turn"], **{
                f"val/exact_match/{skill}": share for skill, share in self.answers["exact_match"].items()}})
        if view is not None:
            self.look_inside(view, state.step)
        return best

    def validation(self, model: torch.nn.Module, stride: int):
        """The stage's validation metrics: the DPO loss of the held-out pairs, the loss of the trained (assistant)
        tokens of the held-out conversations (sft, rl), or the loss of the validation text."""
        setup, cfg = self.setup, self.cfg
        if setup.pairs is not None:
            return dpo.evaluate_pairs(model, setup.pairs, cfg.loss.dpo_beta, setup.token_bytes, cfg.batch_size,
                                      setup.dtype, sft.pad_id(setup.tokenizer))
        if setup.chat is not None:
            return sft.evaluate_chat(model, setup.val_blocks, setup.token_bytes, cfg.batch_size, setup.dtype, self.d)
        return evaluate(model, setup.splits.val, setup.token_bytes, cfg.model.block_size, cfg.batch_size,
                        cfg.eval_tokens, setup.dtype, self.d, stride=stride)

    def look_inside(self, view: torch.nn.Module, step: int) -> None:
        """Rank 0's model at an evaluation: the probe's continuations, the inside record, a weight snapshot."""
        setup, cfg = self.setup, self.cfg
        if self.probe_prompts:
            results = probe(view, setup.tokenizer, self.probe_prompts)
            rundir.append_jsonl(setup.run_dir, rundir.PROBES, {"step": step, "probes": results})
            self.board.text(step, "probe", "\n\n".join(f"{r['prompt']!r} -> {r['continuation']!r}" for r in results))
        if self.inside is not None:
            record = self.inside.record(view, step)
            rundir.append_text(setup.run_dir, rundir.INSIDE, json.dumps(record, separators=(",", ":")) + "\n")
            self.inside_seconds += record["seconds"]
        if cfg.trajectory_snapshots:
            save_snapshot(setup.run_dir, view, step, cfg.trajectory_snapshots)

    def val_at(self, step: int) -> Optional[float]:
        """The validation loss of the evaluation at this step, if there was one."""
        return self.last_val.loss if self.last_val is not None and self.last_val_step == step else None

    def say_line(self, line: str) -> None:
        if self.bar is not None:
            self.bar.write(line, file=sys.stderr)
        else:
            say(self.d, line)

    def say_evaluation(self, state: TrainState, train_loss: Optional[float]) -> None:
        m = self.last_val
        if train_loss is None and self.setup.pairs is not None:
            line = f"step 0: val DPO loss {m.loss:.4f} (ln 2 = 0.6931 where the model is the reference)"
        elif train_loss is None and self.setup.chat is not None:
            line = (f"step 0: val loss {m.loss:.4f} on the assistant's tokens, before "
                    f"{'reinforcement learning' if self.cfg.stage == 'rl' else 'fine-tuning'}")
        elif train_loss is None:
            line = (f"step 0: val loss {m.loss:.4f} (uniform guess: "
                    f"{math.log(self.setup.tokenizer.vocab_size):.4f})")
        else:
            line = (f"step {state.step}: train {train_loss:.4f}, val {m.loss:.4f} ({m.bits_per_byte:.3f} bits/byte), "
                    f"{state.elapsed:.1f}s")
        if isinstance(m, dpo.PreferenceMetrics):
            line += f"; {dpo.describe(m)}"
        if self.answers is not None and isinstance(state.sampler, rl.RolloutSampler):
            line += f"; held-out reward {self.answers['heldout_reward']:.3f} (greedy)"
        if self.answers is not None and self.answers.get("exact_match"):
            shares = self.answers["exact_match"]
            line += (f"; exact match {', '.join(f'{k} {v:.0%}' for k, v in shares.items())}, "
                     f"ended turn {self.answers['ended_turn']:.0%}")
        self.say_line(line)
        if self.warning:
            self.say_line(self.warning)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if not self.metrics.closed:
            self.metrics.close()
        self.board.close()


def checkpoint(setup: Setup, state: TrainState, recorder: Recorder) -> None:
    """Every record up to this step is on disk before the checkpoint that covers it."""
    recorder.metrics.flush()
    if setup.d.main:
        os.fsync(recorder.metrics.fileno())
    sd = state.state_dict()
    val = recorder.val_at(state.step)
    sd["counters"]["val_loss"] = val if val is not None and math.isfinite(val) else None  # --checkpoint best's key
    if val is not None and isinstance(state.sampler, rl.RolloutSampler):  # rl's: the held-out reward
        sd["counters"]["heldout_reward"] = recorder.answers["heldout_reward"]
    if setup.pairs is not None:  # the reference the steps compared with, checked on resume
        sd["counters"][dpo.REFERENCE_KEY] = setup.pairs.reference_sha256()
    try:
        save_checkpoint(setup.run_dir, state.step, state.model, state.optimizer, sd["rng"], sd["counters"],
                        setup.cfg.keep_checkpoints, setup.d)
    except OSError as e:
        raise LmlabError(f"could not write a checkpoint in {setup.run_dir}: {e.strerror or e}; "
                         f"the previous checkpoint is intact") from None


def diagnose_divergence(cfg: TrainConfig, step: int, bad: int, rollbacks: int, dtype: torch.dtype,
                        lr_scale: float) -> str:
    """One line that names the most likely cause of a run whose loss or gradients stay non-finite."""
    where = f"the loss or gradient norm was not finite for {bad} steps in a row at step {step}"
    if rollbacks:
        where += f", after {rollbacks} rollback(s) that cut the learning rate to {lr_scale:g}x"
    if dtype == torch.float16:
        cause = "likely cause: float16 overflow; use --dtype bfloat16 or float32"
    elif step <= bad:
        cause = (f"likely cause: the data or the learning rate (--lr {cfg.optim.lr:g}) from the very first step; "
                 f"try a learning rate 10x lower")
    else:
        cause = f"likely cause: the learning rate (--lr {cfg.optim.lr:g}) is too high; try a lower --lr or more --warmup"
    return f"training diverged: {where}; {cause}"


def roll_back(setup: Setup, state: TrainState, recorder: Recorder, bad_in_row: int) -> None:
    """After too many non-finite steps in a row: back to the last checkpoint with half the learning rate, or stop
    with a diagnosis when there is none or the rollbacks are used up."""
    cfg, d = setup.cfg, setup.d
    if latest_good_checkpoint(setup.run_dir, warn=lambda m: say(d, m)) is None or state.rollbacks >= cfg.max_rollbacks:
        raise LmlabError(diagnose_divergence(cfg, state.step, bad_in_row, state.rollbacks, setup.dtype,
                                             state.lr_scale))
    done, scale = state.rollbacks, state.lr_scale
    path = restore(setup, state)  # (the counters come back as they were at that checkpoint)
    state.rollbacks, state.lr_scale = done + 1, scale * 0.5
    recorder.metrics.close()  # restore rewrote metrics.jsonl: append to the new file
    recorder.metrics = recorder.open_log()
    recorder.write({"step": state.step, "rollback": state.rollbacks, "lr_scale": state.lr_scale})
    say(d, f"warning: {cfg.max_bad_steps} non-finite steps in a row; rolled back to {path.name} with the learning "
           f"rate scaled by {state.lr_scale:g}")


class StopSignals:
    """Ctrl-C and SIGTERM ask training to stop between steps (never inside one); a second one gives up at once.

    keep_on_error: when training fails, leave these handlers in place. Under torchrun, the agent sends SIGTERM to
    the other ranks as soon as one dies; a rank that just lost its peer must live to say so, not die silently.
    """

    def __init__(self, keep_on_error: bool = False):
        self.requested = False
        self.keep_on_error = keep_on_error
        self.previous: dict = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self.previous[sig] = signal.signal(sig, self.handle)
            except ValueError:  # not the main thread: leave signals alone
                break
        return self

    def handle(self, signum, frame) -> None:
        if self.requested:  # a second Ctrl-C while the checkpoint is written
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is not None and self.keep_on_error and not issubclass(exc_type, (KeyboardInterrupt, Interrupted)):
            return
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def sync_ranks(dt: float, stop: bool, d: Dist) -> tuple[float, bool]:
    """Rank 0's clock drives the time budget on every rank, and any rank's signal stops all of them."""
    if d.world <= 1:
        return dt, stop
    sync = all_reduce_sum(torch.tensor([dt if d.main else 0.0, float(stop)], dtype=torch.float64), d)
    return float(sync[0]), bool(sync[1] > 0)


# ---------------------------------------------------------------------------------------------------------------
# The loop


def train(cfg: TrainConfig, reward: Optional[rl.Reward] = None, task: Optional[tasks.Task] = None) -> dict:
    """Run (or resume) training as configured. Returns a summary: steps, tokens, val losses, run directory.

    reward: for --stage rl, a function (prompt text, completion text) -> number that replaces the task's verifier
    (given from Python only, never from a file or a run folder; a resumed run needs it again). task: for --stage rl,
    prompts and a verifier of one's own (tasks.Task) in place of --task's, from Python only as well.

    The budget rules (budget.apply_budget) run here, so `train(config)` from Python trains what `lmlab train` with
    the same settings trains. Under torchrun with --parallel ddp|fsdp every process calls this; rank 0 owns the
    run directory's logs.
    """
    if cfg.max_steps == 0 and cfg.max_time == 0:
        raise LmlabError("set a budget: --max-steps N and/or --max-time SECONDS")
    check_stage(cfg)
    cfg, note = apply_budget(cfg)
    d = dist_.setup(cfg.parallel, resolve_device(cfg.device), cfg.dist_timeout)
    try:
        if dist_.restart_count() and cfg.out and not cfg.resume and (Path(cfg.out) / rundir.CONFIG).exists():
            cfg = dataclasses.replace(cfg, resume=cfg.out)  # an elastic restart: go on from the last checkpoint
            say(d, f"restart {dist_.restart_count()}: resuming {cfg.out}")
        if cfg.resume:  # every option given is applied or refused, before any file is touched
            saved = Run.open(cfg.resume).config
            if needs_corpus(cfg):  # left to the corpus (an elastic restart's command line): the run's choice stands
                cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, dropout=saved.model.dropout))
            check_resume_settings(saved, cfg, Path(cfg.resume))
            cfg, batch_note = resume_batch(saved, cfg, d.world)
            cfg = dataclasses.replace(cfg, out=cfg.resume)  # config.json says where the run is
            note = "\n".join(n for n in (note, batch_note) if n)
        accumulation_steps(cfg, d.world)  # refuse a global batch that does not divide before touching any file
        device = resolve_device(cfg.device)
        split_parts(cfg, device, resolve_dtype(cfg.dtype, device), d.world)  # and a --thread-split the step refuses
        if cfg.model.block_size is not None:  # None: --stage sft, whose context is the base's (window_stride caps)
            eval_stride(cfg.eval_stride or cfg.model.block_size, cfg.model.block_size, "--eval-stride")  # 0: block
        if note:
            say(d, note)
        with ExitStack() as stack:
            run_dir = lock_run_dir(cfg, d, stack)
            return run_guarded(cfg, run_dir, d, reward, task)
    finally:
        dist_.teardown(d)


def run_guarded(cfg: TrainConfig, run_dir: Path, d: Dist, reward: Optional[rl.Reward] = None,
                task: Optional[tasks.Task] = None) -> dict:
    """run() with status.json kept true however it ends, and a dead peer reported as such."""
    started: list[bool] = []  # set once the run is under way: a refused start leaves status.json alone
    try:
        summary = run(cfg, run_dir, d, started, reward, task)
    except Interrupted:
        if d.main:
            write_status(run_dir, "interrupted")
        raise
    except BaseException as e:
        if d.main and started:
            write_status(run_dir, "failed", error=f"{type(e).__name__}: {e}".splitlines()[0])
        if isinstance(e, Exception) and dist_.lost_peer(e, d):
            raise LmlabError(f"rank {d.rank} lost contact with the other processes (one crashed or took longer "
                             f"than --dist-timeout {cfg.dist_timeout:g} s): {str(e).splitlines()[0][:200]}") from None
        raise
    if d.main:
        write_status(run_dir, "finished", steps=summary["steps"], val_loss=summary["val_loss"])
    return summary


def run(cfg: TrainConfig, run_dir: Path, d: Dist, started: list[bool], reward: Optional[rl.Reward] = None,
        task: Optional[tasks.Task] = None) -> dict:
    """setup -> loop (batch -> forward -> loss -> backward -> clip -> step -> schedule -> log -> evaluate ->
    checkpoint) -> finish."""
    setup, state, resuming = prepare(cfg, run_dir, d, reward, task)
    share_optimizer(state.optimizer, setup.split)
    if resuming:
        path = restore(setup, state)
        say(d, f"resuming {run_dir} from {path.name} (step {state.step}, {fmt_count(state.tokens)} tokens)")
    write_run_files(setup, resuming)
    started.append(True)
    describe(setup, state)
    model = torch.compile(state.model) if cfg.compile else state.model
    # compiled too, the loss fuses the float32 upcast of the logits into its softmax instead of writing a copy
    objective = {"sft": masked_loss, "dpo": dpo.objective}.get(cfg.stage, training_loss)
    objective = torch.compile(objective) if cfg.compile else objective
    recorder = Recorder(setup, state)
    autocast = autocast_context(setup.device, setup.dtype)
    last_saved, bad_in_row, stop_all = state.step, 0, False
    with StopSignals(keep_on_error=d.world > 1) as signals:
        try:
            if state.step == 0:
                recorder.evaluation(state)  # the loss before any learning: about ln(vocab)
                recorder.say_evaluation(state, None)
            model.train()
            while progress(cfg, state) < 1.0:
                if stop_all if d.world > 1 else signals.requested:  # between steps, never inside one
                    raise KeyboardInterrupt
                t0 = time.perf_counter()
                set_lr(state.optimizer, cfg.optim, state.lr_scale * lr_multiplier(
                    cfg.optim.schedule, state.step, progress(cfg, state), cfg.optim.warmup, cfg.optim.decay_fraction,
                    cfg.optim.final_lr_frac, cfg.optim.warmup_fraction if cfg.max_time else 0.0, cfg.optim.decay_shape))
                watched = recorder.telemetry.active(state.step + 1)
                result = train_step(model, state.optimizer, (state.sampler.next() for _ in range(setup.grad_accum)),
                                    cfg.loss, cfg.optim.grad_clip, autocast, d, objective,
                                    recorder.telemetry if watched else None, setup.split)
                bad_in_row = 0 if result.finite else bad_in_row + 1
                state.skipped += not result.finite
                state.step, state.tokens = state.step + 1, state.tokens + step_tokens(setup, state)
                dt, stop_all = sync_ranks(time.perf_counter() - t0, signals.requested, d)
                state.elapsed += dt
                recorder.step(state, result, dt, watched and result.finite)
                if bad_in_row >= cfg.max_bad_steps:
                    roll_back(setup, state, recorder, bad_in_row)
                    bad_in_row = 0
                    continue
                done = progress(cfg, state) >= 1.0
                best = False
                if state.step % cfg.eval_interval == 0 or done:
                    best = recorder.evaluation(state)
                    recorder.say_evaluation(state, result.loss)
                    if cfg.stop_when_overfitting and recorder.overfitting >= OVERFIT_EVALS:
                        say(d, "stopping: --stop-when-overfitting (the best checkpoint is kept)")
                        done = True
                if (state.step % cfg.checkpoint_interval == 0 or done or best) and bad_in_row == 0:
                    checkpoint(setup, state, recorder)  # never while bad steps pile up: a rollback needs good weights
                    last_saved = state.step
                if done:
                    break
        except KeyboardInterrupt:
            stop_with_checkpoint(setup, state, recorder, last_saved)
        finally:
            recorder.close()
    return finish(setup, state, recorder)


def stop_with_checkpoint(setup: Setup, state: TrainState, recorder: Recorder, last_saved: int) -> None:
    """Ctrl-C or SIGTERM: write a checkpoint (unless this step has one) and say how to resume."""
    if recorder.bar is not None:
        recorder.bar.close()
    if state.step > last_saved:
        checkpoint(setup, state, recorder)
    recorder.metrics.close()
    d = setup.d
    cmd = f"lmlab train --resume {shlex.quote(str(setup.run_dir))}"
    if d.active:
        cmd = f"torchrun --nproc-per-node N -m {cmd.replace('lmlab train', f'lmlab train --parallel {d.strategy}')}"
    say(d, f"\ninterrupted at step {state.step}; checkpoint written. Resume with:\n  {cmd}")
    raise Interrupted(cmd) from None


def finish(setup: Setup, state: TrainState, recorder: Recorder) -> dict:
    """The summary, and a sample from the trained model (saved in samples.txt and samples.jsonl)."""
    cfg, d, last = setup.cfg, setup.d, recorder.last_val
    summary = {"run_dir": str(setup.run_dir), "rank": d.rank, "steps": state.step, "tokens": state.tokens,
               "train_time_s": state.elapsed, "best_val_loss": state.best_val,
               "val_loss": last.loss if last else None, "val_bits_per_byte": last.bits_per_byte if last else None,
               "val_accuracy": last.accuracy if last else None}
    if last is not None:
        say(d, f"done: {state.step} steps, {fmt_count(state.tokens)} tokens in {state.elapsed:.1f}s of training; val "
               f"loss {last.loss:.4f} (best {state.best_val:.4f}), {last.bits_per_byte:.3f} bits/byte, accuracy "
               f"{last.accuracy:.1%}")
    if recorder.inside is not None:
        wall = time.perf_counter() - recorder.started
        summary["inside_s"] = recorder.inside_seconds
        say(d, f"looking inside the model took {recorder.inside_seconds:.1f}s, {recorder.inside_seconds / wall:.1%} "
               f"of the run's {wall:.0f}s")
    view = recorder.viewer.get() if cfg.sample_tokens else None  # rank 0 only
    if view is not None:
        best = best_model(setup, state)
        if best is not None:
            view, step = best
            say(d, f"the sample comes from the best checkpoint (step {step}), as sample, eval, export and serve use "
                   f"by default (--checkpoint last for the last)")
        summary["sample"] = final_sample(setup, view.eval(), best[1] if best else state.step)
    return summary


def best_model(setup: Setup, state: TrainState) -> Optional[tuple[torch.nn.Module, int]]:
    """The model at the best checkpoint and its step, when that is not the model as it is now; else None."""
    path = next(chosen_checkpoints(setup.run_dir, "best", warn=lambda m: None), None)
    if path is None or rundir.checkpoint_step(path) == state.step:
        return None
    model = build_model(setup.cfg.model, setup.tokenizer.vocab_size).to(setup.device)
    ckpt = load_newest(setup.run_dir, model, None, setup.device, warn=lambda m: say(setup.d, m), which="best")
    return (model, ckpt.step) if ckpt is not None else None


def final_sample(setup: Setup, model: torch.nn.Module, step: int) -> str:
    cfg, tokenizer = setup.cfg, setup.tokenizer
    gen = torch.Generator().manual_seed(cfg.seed)
    prompt, ids = cfg.sample_prompt, prompt_ids(tokenizer, cfg.sample_prompt)
    chat_answer = setup.chat is not None and bool(setup.chat.prompts) and not cfg.sample_prompt
    if chat_answer:  # an answer to a held-out prompt: it may end its turn (a stop id), where it stops
        ids = setup.chat.prompts[0]
        prompt = tokenizer.decode(ids)
        say(setup.d, f"sample (an answer to a held-out prompt, up to {cfg.sample_tokens} tokens, temperature 0.8):")
    else:
        say(setup.d, f"sample ({cfg.sample_tokens} tokens, temperature 0.8):")
    text = prompt
    sys.stdout.write(prompt)
    tokens = generate(model, ids, cfg.sample_tokens, 0.8, 0, 1.0, gen,
                      banned=None if chat_answer else text_banned(tokenizer))
    if chat_answer:
        stops = set(tokenizer.stop_ids)
        tokens = itertools.takewhile(lambda t: t not in stops, tokens)
    for piece in stream_text(tokenizer, tokens):
        sys.stdout.write(piece)
        sys.stdout.flush()
        text += piece
    sys.stdout.write("\n")
    rundir.append_text(setup.run_dir, rundir.SAMPLES_TXT, f"--- step {step} ---\n{text}\n")
    rundir.append_jsonl(setup.run_dir, rundir.SAMPLES_JSONL, {"step": step, "prompt": prompt,
                                                              "temperature": 0.8, "text": text})
    return text
