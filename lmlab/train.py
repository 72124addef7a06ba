"""The training loop: batch -> forward -> loss -> backward -> clip -> step -> schedule -> log -> eval -> checkpoint.

`train(config)` is a plain function; the CLI calls it, and so can tests and notebooks.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shlex
import signal
import sys
import time
from pathlib import Path
from typing import Optional

import torch

from . import rundir
from .checkpoint import check_tokenizer, latest_good_checkpoint, load_newest, load_tokenizer, save_checkpoint
from .common import LmlabError, fmt_count, resolve_device, resolve_dtype, seed_everything
from .config import TrainConfig
from .data import BatchSampler, load_splits
from . import distributed as dist_
from .distributed import Dist, all_reduce_sum, barrier, unwrap
from .evaluate import autocast_context, evaluate
from .loss import training_loss
from .model import ModelConfig, build_model, count_params
from .optim import build_optimizer, clip_grad_norm, lr_multiplier, set_lr
from .sample import generate, prompt_ids, stream_text
from .rundir import RunLock, write_status  # noqa: F401 - RunLock is part of this module's interface
from .telemetry import (
    GradientTelemetry, SpikeDetector, TensorBoard, default_probe_prompts, probe, prune_snapshots_after, save_snapshot,
)


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


class Interrupted(Exception):
    """Ctrl-C or SIGTERM arrived; a checkpoint was written."""


_quiet = False  # ranks other than 0 say nothing


def _say(msg: str) -> None:
    if not _quiet:
        print(msg, file=sys.stderr, flush=True)


def accumulation_steps(cfg: TrainConfig, world: int) -> tuple[int, int]:
    """(grad_accum, global batch): processes x micro-batch x accumulation steps = the global batch."""
    if not cfg.global_batch:
        return cfg.grad_accum, cfg.batch_size * cfg.grad_accum * world
    per_pass = cfg.batch_size * world
    if cfg.global_batch % per_pass:
        raise LmlabError(f"--global-batch {cfg.global_batch} is not a multiple of {world} processes x "
                         f"--batch-size {cfg.batch_size} = {per_pass}; change one of them")
    return cfg.global_batch // per_pass, cfg.global_batch


class _Viewer:
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


def _test_kill_step(d: Dist) -> int:
    """LMLAB_TEST_KILL=RANK:STEP: the step at which this rank kills itself (first launch only; -1: never), for the
    failure tests."""
    spec = os.environ.get("LMLAB_TEST_KILL")
    if not spec or dist_.restart_count():
        return -1
    rank, at = (int(v) for v in spec.split(":"))
    return at if d.rank == rank else -1


def _rng_state(sampler: BatchSampler) -> dict[str, torch.Tensor]:
    rng = {"torch": torch.get_rng_state(), "sampler": sampler.state_dict()["generator"]}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        rng["cuda"] = torch.cuda.get_rng_state()
    return rng


def _prepare_run_dir(cfg: TrainConfig) -> Path:
    if cfg.resume:
        run_dir = Path(cfg.resume)
        rundir.read_config(run_dir)
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


def train(cfg: TrainConfig) -> dict:
    """Run (or resume) training as configured. Returns a summary: steps, tokens, val losses, run directory.

    Under torchrun with --parallel ddp|fsdp every process calls this; rank 0 owns the run directory's logs.
    """
    global _quiet
    if cfg.max_steps == 0 and cfg.max_time == 0:
        raise LmlabError("set a budget: --max-steps N and/or --max-time SECONDS")
    d = dist_.setup(cfg.parallel, resolve_device(cfg.device), cfg.dist_timeout)
    _quiet = not d.main
    try:
        accumulation_steps(cfg, d.world)  # refuse a global batch that does not divide before touching any file
        if dist_.restart_count() and cfg.out and not cfg.resume and (Path(cfg.out) / "config.json").exists():
            cfg = dataclasses.replace(cfg, resume=cfg.out)  # an elastic restart: go on from the last checkpoint
            _say(f"restart {dist_.restart_count()}: resuming {cfg.out}")
        with contextlib.ExitStack() as lock:
            message = ""
            if d.main:  # rank 0 creates and locks the run directory; the others learn its name, or rank 0's error
                try:
                    run_dir = _prepare_run_dir(cfg)
                    lock.enter_context(RunLock(run_dir))
                    rundir.remove_stale_temp_files(run_dir)
                    message = str(run_dir)
                except LmlabError as e:
                    message = "\0" + str(e)
            message = dist_.broadcast_str(message, d)
            if message.startswith("\0"):
                raise LmlabError(message[1:])
            run_dir = Path(message)
            started: list[bool] = []  # set once the run is under way: a refused start leaves status.json alone
            try:
                summary = _train_locked(cfg, run_dir, d, started)
            except Interrupted:
                if d.main:
                    write_status(run_dir, "interrupted")
                raise
            except BaseException as e:
                if d.main and started:
                    write_status(run_dir, "failed", error=f"{type(e).__name__}: {e}".splitlines()[0])
                if isinstance(e, Exception) and _lost_peer(e, d):
                    raise LmlabError(f"rank {d.rank} lost contact with the other processes (one crashed or took "
                                     f"longer than --dist-timeout {cfg.dist_timeout:g} s): "
                                     f"{str(e).splitlines()[0][:200]}") from None
                raise
            if d.main:
                write_status(run_dir, "finished", steps=summary["steps"], val_loss=summary["val_loss"])
            return summary
    finally:
        dist_.teardown(d)
        _quiet = False


RESUME_FIXED = {"seed": "--seed", "preset": "--preset", "data.tokenizer": "--tokenizer",
                "data.vocab_size": "--vocab-size", "optim.optimizer": "--optimizer"}


def check_resume_settings(saved: TrainConfig, cfg: TrainConfig, run_dir: Path) -> None:
    """Every setting changed on resume must take effect; refuse those that cannot. The model and tokenizer are the
    checkpoint's, the seed's streams are restored from it, and another optimizer has no state to go on from."""
    if dataclasses.asdict(saved.model) != dataclasses.asdict(cfg.model):
        raise LmlabError(f"the model settings differ from those of the run in {run_dir}; they cannot change on resume")
    for path, option in RESUME_FIXED.items():
        old, new = saved, cfg
        for part in path.split("."):
            old, new = getattr(old, part), getattr(new, part)
        if old != new and not (path == "data.vocab_size" and cfg.data.tokenizer != "bpe"):
            raise LmlabError(f"{option} cannot change on resume (the run in {run_dir} has {old!r}, not {new!r}); "
                             f"start a new run to change it")


def _lost_peer(e: Exception, d: Dist) -> bool:
    """A collective failed because another rank died or timed out (gloo and nccl say so in several ways)."""
    if not d.active or isinstance(e, LmlabError):
        return False
    return isinstance(e, (RuntimeError, OSError)) and any(
        word in str(e) for word in ("gloo", "Gloo", "NCCL", "Connection", "connection", "timed out", "Timeout", "peer"))


def _train_locked(cfg: TrainConfig, run_dir: Path, d: Dist, started: list[bool]) -> dict:
    device = dist_.rank_device(resolve_device(cfg.device), d)
    dtype = resolve_dtype(cfg.dtype, device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    seed_everything(cfg.seed)

    resume_path = None
    if cfg.resume:
        saved_json = rundir.read_config(run_dir)
        check_resume_settings(TrainConfig.from_json(saved_json), cfg, run_dir)
        tokenizer = load_tokenizer(run_dir)
        check_tokenizer(saved_json, tokenizer, run_dir)
        resume_path = latest_good_checkpoint(run_dir, warn=_say)
        if resume_path is None:  # it died before its first checkpoint: nothing to keep, start it over
            _say(f"run {run_dir} has no complete checkpoint yet; starting it again from step 0")
            for name in rundir.STEP_LOGS if d.main else ():
                rundir.cut_jsonl(run_dir, name, -1)
    else:
        tokenizer = None

    if not d.main:
        barrier(d)  # rank 0 tokenizes and fills the cache first; the others then read it
    splits = load_splits(cfg.data, tokenizer=tokenizer)
    if d.main:
        barrier(d)
    tokenizer = splits.tokenizer
    block = cfg.model.block_size
    if len(splits.val) < 2:
        raise LmlabError(f"the validation split has {len(splits.val)} tokens; use more text or --val-data")
    grad_accum, global_batch = accumulation_steps(cfg, d.world)
    sampler = BatchSampler(splits.train, block, cfg.batch_size, cfg.seed, device, grad_accum, d.rank, d.world)
    token_bytes = torch.from_numpy(tokenizer.byte_lengths())

    model = dist_.wrap(build_model(cfg.model, tokenizer.vocab_size).to(device), d, device)  # same init on all ranks
    optimizer = build_optimizer(unwrap(model), cfg.optim)
    if d.rank:
        torch.manual_seed(cfg.seed + 1_000_003 * d.rank)  # dropout differs between ranks
    step, tokens_seen, elapsed = 0, 0, 0.0
    best_val = math.inf
    lr_scale, skipped_total, rollbacks = 1.0, 0, 0
    spikes = SpikeDetector()

    def restore() -> Path:
        """Put model, optimizer, sampler, RNGs and counters back as they were at the newest checkpoint that loads."""
        nonlocal step, tokens_seen, elapsed, best_val, lr_scale, skipped_total, rollbacks
        ckpt = load_newest(run_dir, model, optimizer, device, warn=_say)
        if ckpt is None:
            raise LmlabError(f"no checkpoint of run {run_dir} can be loaded")
        sampler.load_state_dict({"generator": ckpt.rng["sampler"]})
        torch.set_rng_state(ckpt.rng["torch"])
        if d.rank:
            torch.manual_seed(cfg.seed + 1_000_003 * d.rank + ckpt.step)
        if "cuda" in ckpt.rng and device.type == "cuda":
            torch.cuda.set_rng_state(ckpt.rng["cuda"])
        step, tokens_seen, elapsed = ckpt.step, ckpt.state["tokens"], ckpt.state["elapsed_s"]
        best_val = ckpt.state.get("best_val_loss") or math.inf
        lr_scale = ckpt.state.get("lr_scale", 1.0)
        skipped_total = ckpt.state.get("skipped_steps", 0)
        rollbacks = ckpt.state.get("rollbacks", 0)
        if "spikes" in ckpt.state:
            spikes.load_state_dict(ckpt.state["spikes"])
        if d.main:
            for name in rundir.STEP_LOGS:
                rundir.cut_jsonl(run_dir, name, step)
            prune_snapshots_after(run_dir, step)
        return ckpt.path

    if resume_path is not None:
        resume_path = restore()
        _say(f"resuming {run_dir} from {resume_path.name} (step {step}, {fmt_count(tokens_seen)} tokens)")
    elif d.main:
        rundir.write_json(run_dir, rundir.TOKENIZER, tokenizer.to_json())
    if d.main:
        saved = dataclasses.replace(cfg, global_batch=global_batch, grad_accum=grad_accum)
        rundir.write_json(run_dir, rundir.CONFIG, {**saved.to_json(), "vocab_size": tokenizer.vocab_size,
                                                   "tokenizer_fingerprint": tokenizer.fingerprint()})
        write_status(run_dir, "running", world_size=d.world)
    started.append(True)

    tokens_per_step = global_batch * block
    _say(
        f"run {run_dir}: {cfg.model.arch} {cfg.model.n_layer}L/{cfg.model.n_head}H/{cfg.model.n_embd}d, "
        f"{fmt_count(count_params(model))} params; {tokenizer.kind} tokenizer, vocab {tokenizer.vocab_size}; "
        f"train {fmt_count(len(splits.train))} / val {fmt_count(len(splits.val))} tokens"
    )
    _say(
        f"device {device} ({'asked for' if cfg.device != 'auto' else 'auto-selected'}), autocast {str(dtype)[6:]}, "
        f"{tokens_per_step:,} tokens/step ({global_batch} sequences x {block}), "
        f"optimizer {cfg.optim.optimizer}, schedule {cfg.optim.schedule}, "
        f"budget {cfg.max_steps or '-'} steps / {cfg.max_time or '-'} s, threads {torch.get_num_threads()}"
    )
    if d.active:
        _say(f"data parallel ({d.strategy}, {'nccl' if device.type == 'cuda' else 'gloo'}): global batch "
             f"{global_batch} sequences = {d.world} processes x {cfg.batch_size} micro-batch x {grad_accum} "
             f"accumulation steps")
        if d.sharded and cfg.telemetry_interval:
            _say("note: per-layer gradient telemetry is off under fsdp (the gradients are sharded)")

    train_model = torch.compile(model) if cfg.compile else model
    # compiled too, the loss fuses the float32 upcast of the logits into its softmax instead of writing a copy
    objective = torch.compile(training_loss) if cfg.compile else training_loss
    probe_prompts = (list(cfg.probe_prompts) or default_probe_prompts(splits.val, tokenizer, block)) if cfg.probe else []
    telemetry = GradientTelemetry(unwrap(model), cfg.telemetry_interval if d.main and not d.sharded else 0)
    board = TensorBoard(run_dir, cfg.tensorboard and d.main)
    params = [p for p in model.parameters() if p.requires_grad]
    open_log = (lambda: rundir.open_append(run_dir, rundir.METRICS)) if d.main else (lambda: open(os.devnull, "a"))
    metrics_file = open_log()
    viewer = _Viewer(model, d, cfg.model, tokenizer.vocab_size)
    last_saved = step
    last_val = None

    def progress() -> float:
        done = 0.0
        if cfg.max_steps:
            done = max(done, step / cfg.max_steps)
        if cfg.max_time:
            done = max(done, elapsed / cfg.max_time)
        return done

    def finished() -> bool:
        return progress() >= 1.0

    def run_eval() -> float:
        nonlocal best_val, last_val
        m = evaluate(unwrap(model), splits.val, token_bytes, block, cfg.batch_size, cfg.eval_tokens, dtype, d)
        best_val = min(best_val, m.loss)
        last_val = m
        record = {"step": step, "tokens": tokens_seen, "elapsed_s": round(elapsed, 3), "val_loss": m.loss,
                  "val_bits_per_byte": m.bits_per_byte, "val_accuracy": m.accuracy, "val_perplexity": m.perplexity,
                  "val_tokens": m.tokens}
        metrics_file.write(json.dumps(record) + "\n")
        metrics_file.flush()
        board.scalars(step, {"val/loss": m.loss, "val/bits_per_byte": m.bits_per_byte, "val/accuracy": m.accuracy})
        view = viewer.get() if probe_prompts or cfg.trajectory_snapshots else None  # rank 0 only
        if view is not None and probe_prompts:
            results = probe(view, tokenizer, probe_prompts)
            rundir.append_jsonl(run_dir, rundir.PROBES, {"step": step, "probes": results})
            board.text(step, "probe", "\n\n".join(f"{r['prompt']!r} -> {r['continuation']!r}" for r in results))
        if view is not None and cfg.trajectory_snapshots:
            save_snapshot(run_dir, view, step, cfg.trajectory_snapshots)
        return m.loss

    def checkpoint() -> None:
        nonlocal last_saved
        metrics_file.flush()  # every record up to this step is on disk before the checkpoint that covers it
        if d.main:
            os.fsync(metrics_file.fileno())
        state = {"tokens": tokens_seen, "elapsed_s": elapsed, "lr_scale": lr_scale, "skipped_steps": skipped_total,
                 "spikes": spikes.state_dict(),
                 "rollbacks": rollbacks, "best_val_loss": best_val if math.isfinite(best_val) else None}
        try:
            save_checkpoint(run_dir, step, model, optimizer, _rng_state(sampler), state, cfg.keep_checkpoints, d)
        except OSError as e:
            raise LmlabError(f"could not write a checkpoint in {run_dir}: {e.strerror or e}; "
                             f"the previous checkpoint is intact") from None
        last_saved = step

    bar = None
    if cfg.progress and sys.stderr.isatty():
        from tqdm import tqdm

        total = cfg.max_steps if cfg.max_steps and not cfg.max_time else None
        bar = tqdm(total=total, initial=step, unit="step", dynamic_ncols=True, file=sys.stderr)

    stop_requested: list[int] = []  # set by SIGINT/SIGTERM; acted on between steps, never inside one

    def on_signal(signum, frame):
        if stop_requested:  # a second Ctrl-C while the checkpoint is written: give up at once
            raise KeyboardInterrupt
        stop_requested.append(signum)

    previous_handlers = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            previous_handlers[sig] = signal.signal(sig, on_signal)
        except ValueError:  # not the main thread: leave signals alone
            break

    if step == 0:
        run_eval()  # the loss before any learning: about ln(vocab)
        _say(f"step 0: val loss {last_val.loss:.4f} (uniform guess: {math.log(tokenizer.vocab_size):.4f})")

    bad_in_row = 0
    stop_all = False  # with several processes, all stop at the same step when any of them got a signal
    kill_at = _test_kill_step(d)
    autocast = autocast_context(device, dtype)
    train_model.train()
    try:
        while not finished():
            if stop_all if d.world > 1 else stop_requested:
                raise KeyboardInterrupt
            if step == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            t0 = time.perf_counter()
            multiplier = lr_multiplier(cfg.optim.schedule, step, progress(), cfg.optim.warmup,
                                       cfg.optim.decay_fraction, cfg.optim.final_lr_frac,
                                       cfg.optim.warmup_fraction if cfg.max_time else 0.0)
            set_lr(optimizer, multiplier * lr_scale)
            loss_sum = torch.zeros((), device=device)
            for micro in range(grad_accum):
                x, y = sampler.next()
                with dist_.no_sync(model, d, last_micro_step=micro == grad_accum - 1):
                    with autocast:
                        loss = objective(train_model(x), y, cfg.loss)
                    (loss / grad_accum).backward()
                loss_sum += loss.detach()
            grad_norm = clip_grad_norm(params, cfg.optim.grad_clip)
            mean_loss = all_reduce_sum(loss_sum / grad_accum, d) / d.world  # the loss of the global batch
            train_loss = float(mean_loss)
            grad_norm = float(dist_.full_tensor(grad_norm))
            finite = math.isfinite(train_loss) and math.isfinite(grad_norm)
            watch = finite and telemetry.active(step + 1)
            if watch:
                telemetry.before_update()
            if finite:
                optimizer.step()
                bad_in_row = 0
            else:  # skip the update: one bad batch or one overflow must not wreck the weights
                skipped_total += 1
                bad_in_row += 1
            optimizer.zero_grad(set_to_none=True)
            step += 1
            tokens_seen += tokens_per_step
            dt = time.perf_counter() - t0
            if d.world > 1:  # rank 0's clock drives the time budget on every rank; any rank's signal stops all
                sync = all_reduce_sum(torch.tensor([dt if d.main else 0.0, float(bool(stop_requested))],
                                                   dtype=torch.float64, device=device), d)
                dt, stop_all = float(sync[0]), bool(sync[1] > 0)
            elapsed += dt
            record = {"step": step, "tokens": tokens_seen, "train_loss": train_loss,
                      "lr": optimizer.param_groups[0]["lr"], "grad_norm": grad_norm,
                      "tokens_per_s": tokens_per_step / dt, "elapsed_s": round(elapsed, 4)}
            if not finite:
                record.update(skipped=True, skipped_total=skipped_total)
            if cfg.optim.grad_clip and grad_norm > cfg.optim.grad_clip:
                record["clipped"] = True
            spike = spikes.update(train_loss)
            if spike is not None:
                record["spike_z"] = round(spike, 2)
            if watch:
                rundir.append_jsonl(run_dir, rundir.TELEMETRY, telemetry.after_update(step))
            board.scalars(step, {"train/loss": train_loss, "train/lr": record["lr"],
                                 "train/grad_norm": record["grad_norm"], "train/tokens_per_s": record["tokens_per_s"]})
            metrics_file.write(json.dumps(record) + "\n")
            metrics_file.flush()  # live readers (and the crash test) see every step
            if bad_in_row >= cfg.max_bad_steps:
                metrics_file.flush()
                if latest_good_checkpoint(run_dir, warn=_say) is None or rollbacks >= cfg.max_rollbacks:
                    raise LmlabError(diagnose_divergence(cfg, step, bad_in_row, rollbacks, dtype, lr_scale))
                done_rollbacks, scale = rollbacks, lr_scale
                last_good = restore()  # (this reloads the counters as they were at that checkpoint)
                rollbacks, lr_scale = done_rollbacks + 1, scale * 0.5
                bad_in_row = 0
                metrics_file.close()
                metrics_file = open_log()
                metrics_file.write(json.dumps({"step": step, "rollback": rollbacks, "lr_scale": lr_scale}) + "\n")
                _say(f"warning: {cfg.max_bad_steps} non-finite steps in a row; rolled back to {last_good.name} "
                     f"with the learning rate scaled by {lr_scale:g}")
                continue
            if bar is not None:
                bar.update(1)
                bar.set_postfix_str(f"loss {train_loss:.4f} | {fmt_count(tokens_per_step / dt)} tok/s | {elapsed:.0f}s")
            if step % cfg.eval_interval == 0 or finished():
                run_eval()
                line = f"step {step}: train {train_loss:.4f}, val {last_val.loss:.4f} ({last_val.bits_per_byte:.3f} bits/byte), {elapsed:.1f}s"
                if bar is not None:
                    bar.write(line, file=sys.stderr)
                else:
                    _say(line)
            if (step % cfg.checkpoint_interval == 0 or finished()) and bad_in_row == 0:
                checkpoint()  # never while non-finite steps are piling up: a rollback must land on good weights
    except KeyboardInterrupt:
        if bar is not None:
            bar.close()
        if step > last_saved:
            checkpoint()
        metrics_file.close()
        cmd = f"lmlab train --resume {shlex.quote(str(run_dir))}"
        if d.active:
            cmd = f"torchrun --nproc-per-node N -m {cmd.replace('lmlab train', f'lmlab train --parallel {d.strategy}')}"
        _say(f"\ninterrupted at step {step}; checkpoint written. Resume with:\n  {cmd}")
        raise Interrupted(cmd) from None
    finally:
        for sig, handler in previous_handlers.items():
            signal.signal(sig, handler)
        if bar is not None:
            bar.close()
        if not metrics_file.closed:
            metrics_file.close()
        board.close()

    summary = {
        "run_dir": str(run_dir),
        "rank": d.rank,
        "steps": step,
        "tokens": tokens_seen,
        "train_time_s": elapsed,
        "best_val_loss": best_val,
        "val_loss": last_val.loss if last_val else None,
        "val_bits_per_byte": last_val.bits_per_byte if last_val else None,
        "val_accuracy": last_val.accuracy if last_val else None,
    }
    if last_val is not None:
        _say(f"done: {step} steps, {fmt_count(tokens_seen)} tokens in {elapsed:.1f}s of training; val loss "
             f"{last_val.loss:.4f} (best {best_val:.4f}), {last_val.bits_per_byte:.3f} bits/byte, "
             f"accuracy {last_val.accuracy:.1%}")
    view = viewer.get() if cfg.sample_tokens else None  # rank 0 only
    if view is not None:
        model = view
        model.eval()
        gen = torch.Generator().manual_seed(cfg.seed)
        ids = prompt_ids(tokenizer, cfg.sample_prompt)
        _say(f"sample ({cfg.sample_tokens} tokens, temperature 0.8):")
        text = cfg.sample_prompt
        sys.stdout.write(cfg.sample_prompt)
        for piece in stream_text(tokenizer, generate(model, ids, cfg.sample_tokens, 0.8, 0, 1.0, gen)):
            sys.stdout.write(piece)
            sys.stdout.flush()
            text += piece
        sys.stdout.write("\n")
        rundir.append_text(run_dir, rundir.SAMPLES_TXT, f"--- step {step} ---\n{text}\n")
        rundir.append_jsonl(run_dir, rundir.SAMPLES_JSONL, {"step": step, "prompt": cfg.sample_prompt,
                                                            "temperature": 0.8, "text": text})
        summary["sample"] = text
    return summary
