"""nanoGPT side by side (`lmlab bench --nanogpt PATH`): a checkout, never vendored, run on the same machine. Speed is
compared in one process, in blocks of steps that alternate between the two, so the machine's drift hits both alike;
peak memory and loss come from nanoGPT's own training run, as its own process."""

from __future__ import annotations

import dataclasses
import pickle
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from ..common import LmlabError
from ..budget import apply_budget
from ..config import get_preset
from ..data import iter_text, resolve_source
from ..model import build_model, count_params
from ..optim import build_optimizer
from .measure import child_env, flops_per_token, run_measured, sync


def _nanogpt_data(text: str, folder: Path) -> None:
    """Write Tiny Shakespeare in nanoGPT's shakespeare_char format (uint16 ids, meta.pkl with the vocabulary)."""
    chars = sorted(set(text))
    stoi = {c: i for i, c in enumerate(chars)}
    ids = np.array([stoi[c] for c in text], dtype=np.uint16)
    cut = int(len(text) * 0.9)
    folder.mkdir(parents=True, exist_ok=True)
    ids[:cut].tofile(folder / "train.bin")
    ids[cut:].tofile(folder / "val.bin")
    with open(folder / "meta.pkl", "wb") as f:
        pickle.dump({"vocab_size": len(chars), "itos": dict(enumerate(chars)), "stoi": stoi}, f)


STEADY_FROM = 10  # per-step times are compared from this step on: the first steps warm up allocators and caches


def nanogpt_process(path: str, data: str, iters: int) -> dict:
    """Run nanoGPT's README CPU command (`train.py config/train_shakespeare_char.py --device=cpu --compile=False
    ...`, with max_iters = lr_decay_iters = iters) from a checkout as its own process: its per-step times as it
    logs them, the median from step STEADY_FROM on, its peak memory and loss."""
    root = Path(path).resolve()
    if not (root / "train.py").exists():
        raise LmlabError(f"--nanogpt {path}: no train.py there")
    text = "".join(iter_text(resolve_source(data)))
    with tempfile.TemporaryDirectory() as d:
        work = Path(d)
        _nanogpt_data(text, work / "data" / "shakespeare_char")
        (work / "configurator.py").symlink_to(root / "configurator.py")  # nanoGPT reads it from its working dir
        args = [sys.executable, str(root / "train.py"), str(root / "config" / "train_shakespeare_char.py"),
                "--device=cpu", "--compile=False", "--eval_iters=20", "--log_interval=1", "--block_size=64",
                "--batch_size=12", "--n_layer=4", "--n_head=4", "--n_embd=128", f"--max_iters={iters}",
                f"--lr_decay_iters={iters}", "--dropout=0.0", f"--out_dir={work}/out"]
        env = {**child_env(), "PYTHONPATH": str(root)}
        t = time.perf_counter()
        code, stdout, stderr, rss = run_measured(args, cwd=work, env=env)
        wall = time.perf_counter() - t
        if code:
            raise LmlabError(f"nanoGPT failed: {(stderr.strip().splitlines() or ['?'])[-1]}")
        times = [float(m) for m in re.findall(r"iter \d+: loss [\d.]+, time ([\d.]+)ms", stdout)]
        return _run_figures(times, iters, wall, rss) | _last_val(stdout)


def _last_val(stdout: str) -> dict:
    vals = re.findall(r"val loss ([\d.]+)", stdout)
    return {"final_val_loss_20_batches": float(vals[-1])} if vals else {}


def _run_figures(step_ms: list[float], iters: int, wall: float, rss: float) -> dict:
    steady = step_ms[STEADY_FROM:] or step_ms
    if not steady:
        raise LmlabError("the run logged no step times")
    step = statistics.median(steady)
    return {"iters": iters, "step_ms": step, "tokens_per_s": 12 * 64 / (step / 1000), "wall_s": wall,
            "peak_rss_mb": rss}


def lmlab_process(data: str, iters: int) -> dict:
    """`lmlab train --preset nanogpt-char-cpu --data DATA --max-steps iters` as a user runs it, its own process: the
    per-step times it logs (metrics.jsonl), the median from step STEADY_FROM on, and its peak memory."""
    from ..run import Run

    with tempfile.TemporaryDirectory() as d:
        args = [sys.executable, "-m", "lmlab", "train", "--preset", "nanogpt-char-cpu", "--data", data,
                "--max-steps", str(iters), "--out", f"{d}/run", "--no-progress"]
        t = time.perf_counter()
        code, _, stderr, rss = run_measured(args, env=child_env())
        wall = time.perf_counter() - t
        if code:
            raise LmlabError(f"lmlab train failed: {(stderr.strip().splitlines() or ['?'])[-1]}")
        steps = [r for r in Run(f"{d}/run").metrics().train if r.tokens_per_s]
        times = [12 * 64 / r.tokens_per_s * 1000 for r in steps]
        return _run_figures(times, iters, wall, rss)


def whole_runs(path: str, data: str, rounds: int = 3, iters: int = 300) -> dict:
    """Whole training runs, each its own process, alternated round by round (which goes first alternates too):
    lmlab's preset against nanoGPT's README CPU command at the same shape. Each run's figure is its median ms/step
    from step STEADY_FROM on, as its own log gives it; the ratio is nanoGPT's over lmlab's, per round."""
    runs: dict[str, list[dict]] = {"lmlab": [], "nanogpt": []}
    for r in range(rounds):
        order = ("lmlab", "nanogpt") if r % 2 == 0 else ("nanogpt", "lmlab")
        for name in order:
            runs[name].append(lmlab_process(data, iters) if name == "lmlab" else nanogpt_process(path, data, iters))
    ratios = [n["step_ms"] / m["step_ms"] for m, n in zip(runs["lmlab"], runs["nanogpt"])]
    result = {"rounds": rounds, "iters": iters, "steady_from": STEADY_FROM, "ratio_median": statistics.median(ratios),
              "ratio_min": min(ratios), "ratio_max": max(ratios), "ratios": ratios}
    for name, got in runs.items():
        step = statistics.median(g["step_ms"] for g in got)
        result[name] = {"step_ms": step, "tokens_per_s": 12 * 64 / (step / 1000), "runs": got}
    return result


NANOGPT_CPU = {"block_size": 64, "batch_size": 12, "n_layer": 4, "n_head": 4, "n_embd": 128, "vocab_size": 65}


def load_nanogpt(path: str):
    """nanoGPT's model.py from a checkout, imported as a module (it is the user's checkout: its code runs here)."""
    import importlib.util

    source = Path(path).resolve() / "model.py"
    if not source.is_file():
        raise LmlabError(f"--nanogpt {path}: no model.py there (give the root of a nanoGPT checkout)")
    spec = importlib.util.spec_from_file_location("nanogpt_model", source)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
        module.GPT, module.GPTConfig  # noqa: B018 - what lmlab needs of it
    except Exception as e:  # noqa: BLE001 - another version of nanoGPT may fail in many ways
        raise LmlabError(f"--nanogpt {path}: cannot use its model.py ({type(e).__name__}: {e})") from None
    return module


def twin_models(path: str, device: torch.device):
    """lmlab's nanogpt-char-cpu model and nanoGPT's own at the same shape (same parameter count), each with the
    optimizer its training uses: lmlab's AdamW, and the AdamW of nanoGPT's configure_optimizers."""
    import contextlib
    import io

    ng = load_nanogpt(path)
    shape = NANOGPT_CPU
    cfg, _ = apply_budget(get_preset("nanogpt-char-cpu"))
    torch.manual_seed(0)
    ours = build_model(cfg.model, shape["vocab_size"]).to(device)
    with contextlib.redirect_stdout(io.StringIO()):  # it prints its parameter counts
        theirs = ng.GPT(ng.GPTConfig(block_size=shape["block_size"], vocab_size=shape["vocab_size"],
                                     n_layer=shape["n_layer"], n_head=shape["n_head"], n_embd=shape["n_embd"],
                                     dropout=0.0, bias=False)).to(device)
        their_opt = theirs.configure_optimizers(cfg.optim.weight_decay, cfg.optim.lr, (cfg.optim.beta1,
                                                                                     cfg.optim.beta2), device.type)
    n_ours, n_theirs = count_params(ours), sum(p.numel() for p in theirs.parameters())
    if n_ours != n_theirs:
        raise LmlabError(f"--nanogpt {path}: its model has {n_theirs:,} parameters at nanoGPT's CPU shape, lmlab's "
                         f"{n_ours:,}; not the architecture this comparison assumes")
    return cfg, ours, build_optimizer(ours, cfg.optim), theirs, their_opt


def alternated_medians(steps: dict, blocks: int, per_block: int) -> dict:
    """Run each step function per_block times per block, alternating which goes first; per-block medians."""
    names = list(steps)
    medians: dict[str, list[float]] = {name: [] for name in names}
    for b in range(blocks):
        for name in names if b % 2 == 0 else names[::-1]:
            times = []
            for i in range(per_block):
                t = time.perf_counter()
                steps[name](i)
                times.append(time.perf_counter() - t)
            medians[name].append(statistics.median(times))
    return medians


def block_ratios(medians: dict, slow: str, fast: str) -> dict:
    """Per-block ratios slow/fast: their median and spread (min, max)."""
    ratios = [a / b for a, b in zip(medians[slow], medians[fast])]
    return {"ratio_median": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios),
            "ratios": ratios}


def twin_steps(path: str, device: torch.device, compile: bool):
    """Training steps of lmlab and nanoGPT at nanoGPT's CPU shape, on the same batches, fp32, clipping at 1.0, each
    with its own optimizer and step (eager, or both compiled; lmlab's micro-batch shared among threads as training
    shares it, threads.split_parts): (lmlab_step, nanogpt_step, lmlab's model, nanoGPT's model, nanoGPT's
    optimizer)."""
    from ..evaluate import autocast_context
    from ..loss import LossConfig, training_loss
    from ..threads import split_parts
    from ..train import train_step

    cfg, ours, our_opt, theirs, their_opt = twin_models(path, device)
    split = split_parts(dataclasses.replace(cfg, compile=compile), device, torch.float32, 1)
    B, T, V = NANOGPT_CPU["batch_size"], NANOGPT_CPU["block_size"], NANOGPT_CPU["vocab_size"]
    gen = torch.Generator().manual_seed(0)
    windows = [torch.randint(0, V, (B, T + 1), generator=gen) for _ in range(4)]
    batches = [(w[:, :-1].contiguous().to(device), w[:, 1:].contiguous().to(device)) for w in windows]  # as loaders give
    our_run = torch.compile(ours) if compile else ours
    objective = torch.compile(training_loss) if compile else training_loss
    their_run = torch.compile(theirs) if compile else theirs

    def lmlab_step(i):
        train_step(our_run, our_opt, [batches[i % len(batches)]], LossConfig(), cfg.optim.grad_clip,
                   autocast_context(device, torch.float32), objective=objective, split=split)
        sync(device)

    def nanogpt_step(i):  # nanoGPT's train.py, one micro-step per iteration as in its CPU config
        _, loss = their_run(*batches[i % len(batches)])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(theirs.parameters(), 1.0)
        their_opt.step()
        their_opt.zero_grad(set_to_none=True)
        sync(device)

    return lmlab_step, nanogpt_step, ours, theirs, their_opt


def alternated_throughput(path: str, device: torch.device, compile: bool, peak_gflops: float, blocks: int = 5,
                          per_block: int = 10) -> dict:
    """Training steps of lmlab and nanoGPT at nanoGPT's CPU shape (twin_steps), alternated in blocks; eager against
    eager or compiled against compiled."""
    lmlab_step, nanogpt_step, ours, _, _ = twin_steps(path, device, compile)
    B, T = NANOGPT_CPU["batch_size"], NANOGPT_CPU["block_size"]
    t = time.perf_counter()
    for i in range(3):  # warm-up (and, compiled, the compilation) of both
        lmlab_step(i)
        nanogpt_step(i)
    warmup_s = time.perf_counter() - t
    medians = alternated_medians({"lmlab": lmlab_step, "nanogpt": nanogpt_step}, blocks, per_block)
    flops = flops_per_token(ours, T)
    result = {"compile": compile, "blocks": blocks, "steps_per_block": per_block, "warmup_s": warmup_s,
              **block_ratios(medians, "nanogpt", "lmlab")}
    for name in ("lmlab", "nanogpt"):
        step = statistics.median(medians[name])
        result[name] = {"step_ms": step * 1000, "tokens_per_s": B * T / step,
                        "mfu_vs_float32": B * T / step * flops / (peak_gflops * 1e9)}
    return result


def alternated_generation(path: str, device: torch.device, new_tokens: int, compile: bool = False, blocks: int = 5,
                          per_block: int = 1) -> dict:
    """Batch-1 sampling of new_tokens tokens (temperature 1): lmlab's KV-cached generation (compiled, if asked)
    against nanoGPT's generate, which runs the whole window for every token; alternated blocks."""
    from ..sample import generate

    _, ours, _, theirs, _ = twin_models(path, device)
    ours.eval()
    theirs.eval()
    gen = torch.Generator().manual_seed(0)
    start = torch.zeros((1, 1), dtype=torch.long, device=device)

    def lmlab_run(i):
        for _ in generate(ours, [0], new_tokens, 1.0, 0, 1.0, gen, True, compile):
            pass

    def nanogpt_run(i):
        theirs.generate(start, new_tokens, temperature=1.0)

    t = time.perf_counter()
    for _ in generate(ours, [0], NANOGPT_CPU["block_size"] + 1, 1.0, 0, 1.0, gen, True, compile):  # warm-up
        pass
    theirs.generate(start, 8, temperature=1.0)
    warmup_s = time.perf_counter() - t
    medians = alternated_medians({"lmlab": lmlab_run, "nanogpt": nanogpt_run}, blocks, per_block)
    result = {"new_tokens": new_tokens, "compiled": compile, "blocks": blocks, "warmup_s": warmup_s,
              **block_ratios(medians, "nanogpt", "lmlab")}
    for name in ("lmlab", "nanogpt"):
        result[name] = {"tokens_per_s": new_tokens / statistics.median(medians[name])}
    return result
