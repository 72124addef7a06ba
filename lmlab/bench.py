"""`lmlab bench`: hardware peak, training throughput and MFU, time to quality, generation and data speed.

Benchmarks are measurements, not tests: medians over many steps, with warm-up and compile time reported apart.
With --nanogpt PATH it also runs a nanoGPT checkout (never vendored) on the same machine and reports ratios.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from . import rundir
from .common import LmlabError, resolve_device
from .data import resolve_source, iter_text
from .model import build_model, matmul_params
from .optim import build_optimizer
from .config import apply_budget, get_preset


@dataclass
class BenchConfig:
    """What to measure."""

    quick: bool = False
    """A small version that finishes in under 2 minutes."""
    json: Optional[str] = None
    """Also write all figures to this JSON file."""
    data: str = "tinyshakespeare"
    """Corpus for time-to-quality and tokenizer speed (a file path works offline)."""
    device: str = "cpu"
    """cpu, cuda or mps."""
    nanogpt: Optional[str] = None
    """A nanoGPT checkout to measure side by side (optional)."""
    steps: int = 0
    """Measured steps per throughput config (0: 30, or 8 with --quick)."""
    budgets: tuple[float, ...] = (60.0, 180.0, 300.0)
    """Training budgets (s) for the val-loss-after-time figures."""
    target: float = 1.88
    """The val loss whose time-to-reach is reported."""
    target_budget: float = 20.0
    """Budget (s) of the run that times the target."""
    only: tuple[str, ...] = ()
    """Run only these sections: peak, throughput, quality, generation, data, nanogpt."""
    markdown: Optional[str] = None
    """Also write the figures as Markdown tables to this file."""


def flops_per_token(model: torch.nn.Module, block_size: int) -> float:
    """Training FLOPs per token: 6 x (weights used in matmuls) + attention (12 x layers x width x context)."""
    cfg = model.cfg
    return 6 * matmul_params(model) + 12 * cfg.n_layer * cfg.n_embd * block_size


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_peak(dtype: torch.dtype, device: torch.device, n: int = 2048, reps: int = 5) -> float:
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    a @ b
    times = []
    for _ in range(reps):
        _sync(device)
        t = time.perf_counter()
        a @ b
        _sync(device)
        times.append(time.perf_counter() - t)
    return 2 * n**3 / statistics.median(times) / 1e9


def throughput(preset: str, device: torch.device, dtype: torch.dtype, compile: bool, steps: int,
               warmup: int = 3, vocab: int = 65) -> dict:
    """Steady-state tokens/s of full training steps (forward, backward, clip, AdamW) on random tokens."""
    from .evaluate import autocast_context
    from .loss import LossConfig, training_loss
    from .train import train_step

    cfg, _ = apply_budget(get_preset(preset))
    torch.manual_seed(0)
    model = build_model(cfg.model, vocab).to(device)
    opt = build_optimizer(model, cfg.optim)
    run = torch.compile(model) if compile else model
    objective = torch.compile(training_loss) if compile else training_loss
    B, T = cfg.batch_size, cfg.model.block_size
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, vocab, (B, T + 1), generator=gen).to(device) for _ in range(4)]
    autocast = autocast_context(device, dtype)

    def step(i):  # the training loop's own step, on one micro-batch
        w = batches[i % len(batches)]
        train_step(run, opt, [(w[:, :-1], w[:, 1:])], LossConfig(), cfg.optim.grad_clip, autocast,
                   objective=objective)
        _sync(device)

    t0 = time.perf_counter()
    step(0)
    first = time.perf_counter() - t0
    for i in range(warmup - 1):
        step(i + 1)
    times = []
    for i in range(steps):
        t = time.perf_counter()
        step(i)
        times.append(time.perf_counter() - t)
    median = statistics.median(times)
    tokens = B * T
    return {"preset": preset, "dtype": str(dtype)[6:], "compile": compile, "batch": B, "block": T,
            "step_ms": median * 1000, "tokens_per_s": tokens / median, "first_step_s": first,
            "flops_per_token": flops_per_token(model, T), "steps": steps}


def generation_speed(device: torch.device, new_tokens: int, use_cache: bool, compile: bool = False) -> dict:
    """Batch-1 sampling (temperature 1) from a random nanogpt-char-cpu model, after a warm-up that crosses the window
    cut once (so a compiled run has compiled its decode step and its re-encode; that time is first_s)."""
    from .sample import generate

    cfg = get_preset("nanogpt-char-cpu")
    torch.manual_seed(0)
    model = build_model(cfg.model, 65).to(device).eval()
    gen = torch.Generator().manual_seed(0)
    t = time.perf_counter()
    list(generate(model, [0], cfg.model.block_size + 1, 1.0, 0, 1.0, gen, use_cache, compile))  # warm-up
    first = time.perf_counter() - t
    t = time.perf_counter()
    n = sum(1 for _ in generate(model, [0], new_tokens, 1.0, 0, 1.0, gen, use_cache, compile))
    dt = time.perf_counter() - t
    return {"new_tokens": n, "kv_cache": use_cache, "compiled": compile, "tokens_per_s": n / dt, "seconds": dt,
            "first_s": first}


def _generation_label(r: dict) -> str:
    return "KV cache " + ("on, compiled" if r.get("compiled") else "on" if r["kv_cache"] else "off")


def tokenizer_speed(data: str, kind: str, vocab_size: int = 1024) -> dict:
    from .data import build_tokenizer, encode_corpus

    corpus = resolve_source(data)
    nbytes = corpus.num_bytes()
    t = time.perf_counter()
    tok = build_tokenizer(corpus, kind, vocab_size)
    build = time.perf_counter() - t
    with tempfile.TemporaryDirectory() as d:
        t = time.perf_counter()
        encode_corpus(corpus, tok, Path(d) / "t.bin")
        enc = time.perf_counter() - t
    return {"tokenizer": kind, "vocab_size": tok.vocab_size, "bytes": nbytes, "build_s": build, "encode_s": enc,
            "encode_mb_per_s": nbytes / enc / 1e6}


def _child_env() -> dict:
    env = dict(os.environ)
    env.pop("LMLAB_DEBUG", None)
    return env


def training_rss(data: str, preset: str, steps: int) -> dict:
    """Peak resident memory of a real `lmlab train` process (a child, so nothing else is counted)."""
    with tempfile.TemporaryDirectory() as d:
        cmd = [sys.executable, "-m", "lmlab", "train", "--preset", preset, "--data", data, "--out", f"{d}/run",
               "--max-steps", str(steps), "--max-time", "0", "--sample-tokens", "0", "--eval-interval", "100000",
               "--no-progress", "--no-tensorboard"]
        code, _, err, rss = run_measured(cmd, env=_child_env())
        if code:
            raise LmlabError(f"training for the memory figure failed: {(err.strip().splitlines() or ['?'])[-1]}")
        return {"preset": preset, "steps": steps, "peak_rss_mb": rss}


def _vm_hwm_mb(pid: int) -> Optional[float]:
    """Peak resident memory of a live process (Linux), from /proc/PID/status."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def run_measured(cmd: list[str], cwd=None, env=None) -> tuple[int, str, str, float]:
    """Run a child process; return (exit code, stdout, stderr, its own peak RSS in MB).

    The peak is read from the child's /proc status while it runs: the rusage of a child also counts the memory
    its parent had when it forked, which would charge this benchmark's own big-model runs to the child.
    """
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=err, stdin=subprocess.DEVNULL)
        peak = 0.0
        while True:
            hwm = _vm_hwm_mb(proc.pid)
            if hwm is not None:
                peak = max(peak, hwm)
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            time.sleep(0.02)
        proc.returncode = os.waitstatus_to_exitcode(status)
        if peak == 0.0:  # no /proc (not Linux): fall back to rusage
            peak = usage.ru_maxrss / 1024
        out.seek(0)
        err.seek(0)
        return proc.returncode, out.read(), err.read(), peak


def quality_run(data: str, budget: float, device: str, eval_every: int) -> dict:
    """Train the CPU recipe (the tiny preset) for `budget` seconds; return its eval curve."""
    from .train import train

    cfg = get_preset("tiny")
    cfg.data.data = data
    cfg.max_time = budget  # train() applies the budget rules
    cfg.device = device
    cfg.eval_interval = eval_every
    cfg.eval_tokens = 0
    cfg.sample_tokens = 0
    cfg.progress = False
    cfg.tensorboard = False
    cfg.checkpoint_interval = 10**9
    with tempfile.TemporaryDirectory() as d:
        cfg.out = f"{d}/run"
        t = time.perf_counter()
        summary = train(cfg)
        wall = time.perf_counter() - t
        evals = [r for r in rundir.read_jsonl(Path(d) / "run", rundir.METRICS) if "val_loss" in r]
    return {"budget_s": budget, "val_loss": summary["val_loss"], "steps": summary["steps"], "wall_s": wall,
            "curve": [(e["elapsed_s"], e["val_loss"]) for e in evals]}


# ---------------------------------------------------------------------------------------------------------------
# nanoGPT side by side


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


def nanogpt_side_by_side(path: str, data: str, iters: int) -> dict:
    """Run nanoGPT's documented CPU config from a checkout; parse its per-iteration times and peak memory."""
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
                f"--lr_decay_iters={iters}", "--dropout=0.0", f"--eval_interval={iters}", f"--out_dir={work}/out",
                "--always_save_checkpoint=True"]
        env = {**_child_env(), "PYTHONPATH": str(root)}
        t = time.perf_counter()
        code, stdout, stderr, rss = run_measured(args, cwd=work, env=env)
        wall = time.perf_counter() - t
        if code:
            raise LmlabError(f"nanoGPT failed: {(stderr.strip().splitlines() or ['?'])[-1]}")
        times = [float(m) for m in re.findall(r"iter \d+: loss [\d.]+, time ([\d.]+)ms", stdout)]
        steady = times[5:] or times
        step_ms = statistics.median(steady)
        result = {"iters": iters, "step_ms": step_ms, "tokens_per_s": 12 * 64 / (step_ms / 1000), "wall_s": wall,
                  "peak_rss_mb": rss}
        vals = re.findall(r"val loss ([\d.]+)", stdout)
        if vals:
            result["final_val_loss_20_batches"] = float(vals[-1])
        result["generation"] = gen = {}
        base = None
        for n in (1, 500, 2000):  # the 1-token run times loading, which is subtracted
            t = time.perf_counter()
            p = subprocess.run([sys.executable, str(root / "sample.py"), f"--out_dir={work}/out", "--device=cpu",
                                "--compile=False", "--num_samples=1", f"--max_new_tokens={n}", "--start=ROMEO:"],
                               cwd=work, capture_output=True, text=True, env=env)
            dt = time.perf_counter() - t
            if p.returncode:
                result["generation_error"] = (p.stderr.strip().splitlines() or ["?"])[-1]
                break
            if n == 1:
                base = dt
            else:
                gen[n] = {"seconds": dt - base, "tokens_per_s": n / max(dt - base, 1e-9)}
        return result


# ---------------------------------------------------------------------------------------------------------------


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run_bench(cfg: BenchConfig) -> dict:
    """The sections asked for (all by default), in an order where each can use the figures before it."""
    device = resolve_device(cfg.device)
    sections = set(cfg.only) or {"peak", "throughput", "quality", "generation", "data", "nanogpt"}
    out: dict = {"device": str(device), "threads": torch.get_num_threads(), "torch": torch.__version__,
                 "quick": cfg.quick}
    if "peak" in sections or "throughput" in sections:
        bench_peak(cfg, device, out)
    if "data" in sections:
        bench_data(cfg, out)
    if "throughput" in sections:
        bench_throughput(cfg, device, out)
    if "generation" in sections:
        bench_generation(cfg, device, out)
    if "quality" in sections:
        bench_quality(cfg, out)
    if cfg.nanogpt and "nanogpt" in sections:
        bench_nanogpt(cfg, out)
    return out


def bench_peak(cfg: BenchConfig, device: torch.device, out: dict) -> None:
    n = 1024 if cfg.quick else 2048
    out["peak_gflops"] = {"float32": matmul_peak(torch.float32, device, n),
                          "bfloat16": matmul_peak(torch.bfloat16, device, n)}
    say(f"peak: {out['peak_gflops']['float32']:.0f} GFLOP/s fp32, {out['peak_gflops']['bfloat16']:.0f} bf16")


def bench_data(cfg: BenchConfig, out: dict) -> None:
    out["tokenizers"] = [tokenizer_speed(cfg.data, "char"), tokenizer_speed(cfg.data, "bpe", 1024)]
    for r in out["tokenizers"]:
        say(f"tokenize {r['tokenizer']}: {r['encode_mb_per_s']:.1f} MB/s (building took {r['build_s']:.2f}s)")
    out["memory"] = training_rss(cfg.data, "nanogpt-char-cpu", 20 if cfg.quick else 100)
    say(f"peak RSS of training nanogpt-char-cpu: {out['memory']['peak_rss_mb']:.0f} MB")


def bench_throughput(cfg: BenchConfig, device: torch.device, out: dict) -> None:
    steps = cfg.steps or (8 if cfg.quick else 30)
    rows = []
    bf16_pays = out["peak_gflops"]["bfloat16"] > out["peak_gflops"]["float32"]
    if not bf16_pays:
        say("bf16 matmuls are slower than fp32 on this CPU (no native bf16): bf16 is measured on the small config only")
    combos = [("nanogpt-char-cpu", torch.float32, False), ("nanogpt-char-cpu", torch.bfloat16, False)]
    if not cfg.quick:
        combos += [("nanogpt-char-cpu", torch.float32, True), ("nanogpt-char-cpu", torch.bfloat16, True),
                   ("nanogpt-char", torch.float32, False), ("nanogpt-char", torch.float32, True)]
        if bf16_pays:
            combos += [("nanogpt-char", torch.bfloat16, False), ("nanogpt-char", torch.bfloat16, True)]
    for preset, dtype, comp in combos:
        big = preset == "nanogpt-char"
        r = throughput(preset, device, dtype, comp, 3 if big else steps, warmup=2 if big else 3)
        for peak_name, peak in out["peak_gflops"].items():
            r[f"mfu_vs_{peak_name}"] = r["tokens_per_s"] * r["flops_per_token"] / (peak * 1e9)
        rows.append(r)
        say(f"throughput {preset} {r['dtype']} compile={comp}: {r['tokens_per_s']:,.0f} tok/s, "
            f"{r['step_ms']:.1f} ms/step, MFU {r['mfu_vs_float32']:.0%} of fp32 peak (first step {r['first_step_s']:.1f}s)")
    out["throughput"] = rows


def bench_generation(cfg: BenchConfig, device: torch.device, out: dict) -> None:
    out["generation"] = []
    # compiled decoding is left out of --quick: its first compile takes one to two minutes with a cold cache
    paths = ((True, False), (False, False)) if cfg.quick else ((True, False), (True, True), (False, False))
    for n in ((500,) if cfg.quick else (500, 2000)):
        for cache, comp in paths:
            r = generation_speed(device, n, cache, comp)
            out["generation"].append(r)
            say(f"generation {n} tokens, {_generation_label(r)}: {r['tokens_per_s']:,.0f} tok/s"
                + (f" (compiling and warm-up: {r['first_s']:.1f} s)" if comp else ""))


def bench_quality(cfg: BenchConfig, out: dict) -> None:
    budgets = (15.0,) if cfg.quick else tuple(cfg.budgets)
    target_run = quality_run(cfg.data, cfg.target_budget if not cfg.quick else 15.0, cfg.device, 10)
    reached = [t for t, v in target_run["curve"] if v <= cfg.target]
    out["time_to_target"] = {"target": cfg.target, "budget_s": target_run["budget_s"],
                             "seconds": reached[0] if reached else None, "final_val_loss": target_run["val_loss"]}
    say(f"time to val {cfg.target}: {f'{reached[0]:.1f} s' if reached else 'not reached'} "
        f"(run of {target_run['budget_s']:.0f} s ended at {target_run['val_loss']:.4f})")
    out["quality"] = []
    for b in budgets if not cfg.quick else ():
        r = quality_run(cfg.data, b, cfg.device, 100)
        out["quality"].append(r)
        say(f"val loss after {b:.0f} s: {r['val_loss']:.4f} ({r['steps']} steps)")


def bench_nanogpt(cfg: BenchConfig, out: dict) -> None:
    ng = nanogpt_side_by_side(cfg.nanogpt, cfg.data, 60 if cfg.quick else 300)
    out["nanogpt"] = ng
    ours = next((r for r in out.get("throughput", []) if r["preset"] == "nanogpt-char-cpu"), None)
    say(f"nanoGPT CPU config: {ng['tokens_per_s']:,.0f} tok/s, {ng['step_ms']:.1f} ms/step, "
        f"peak RSS {ng['peak_rss_mb']:.0f} MB")
    if ours:
        best = max((r for r in out["throughput"] if r["preset"] == "nanogpt-char-cpu"),
                   key=lambda r: r["tokens_per_s"])
        out["ratios"] = {"throughput_fp32_eager": ours["tokens_per_s"] / ng["tokens_per_s"],
                         "throughput_best": best["tokens_per_s"] / ng["tokens_per_s"]}
    for r in out.get("generation", []):
        g = ng.get("generation", {}).get(r["new_tokens"])
        if g and r["kv_cache"]:
            key = f"generation_{r['new_tokens']}" + ("_compiled" if r.get("compiled") else "")
            out.setdefault("ratios", {})[key] = r["tokens_per_s"] / g["tokens_per_s"]
    say(f"ratios: {json.dumps(out.get('ratios', {}))}")


def print_table(out: dict) -> None:
    lines = []
    p = out.get("peak_gflops")
    if p:
        lines.append(f"{'hardware peak':34s} fp32 {p['float32']:7.0f} GFLOP/s   bf16 {p['bfloat16']:7.0f} GFLOP/s")
    for r in out.get("throughput", []):
        lines.append(f"{'train ' + r['preset'] + ' ' + r['dtype'] + (' compiled' if r['compile'] else ''):34s} "
                     f"{r['tokens_per_s']:9,.0f} tok/s  {r['step_ms']:8.1f} ms/step  MFU {r['mfu_vs_float32']:5.1%} "
                     f"(fp32 peak) {r['mfu_vs_bfloat16']:5.1%} (bf16 peak)  first step {r['first_step_s']:.1f}s")
    t = out.get("time_to_target")
    if t:
        reached = f"{t['seconds']:.1f} s" if t["seconds"] is not None else "not reached"
        lines.append(f"{'time to val ' + str(t['target']):34s} {reached}  (run of {t['budget_s']:.0f} s ended at "
                     f"{t['final_val_loss']:.4f})")
    for r in out.get("quality", []):
        lines.append(f"{'val loss after %.0f s' % r['budget_s']:34s} {r['val_loss']:.4f}  ({r['steps']} steps)")
    for r in out.get("generation", []):
        lines.append(f"{'generate %d, %s' % (r['new_tokens'], _generation_label(r)):34s} {r['tokens_per_s']:9,.0f} tok/s"
                     + (f"  (compiling and warm-up {r['first_s']:.1f} s)" if r.get("compiled") else ""))
    for r in out.get("tokenizers", []):
        lines.append(f"{'tokenize ' + r['tokenizer']:34s} {r['encode_mb_per_s']:9.1f} MB/s")
    if "memory" in out:
        lines.append(f"{'peak RSS, training ' + out['memory']['preset']:34s} {out['memory']['peak_rss_mb']:9.0f} MB")
    ng = out.get("nanogpt")
    if ng:
        lines.append(f"{'nanoGPT CPU config':34s} {ng['tokens_per_s']:9,.0f} tok/s  {ng['step_ms']:8.1f} ms/step  "
                     f"peak RSS {ng['peak_rss_mb']:.0f} MB")
        for n, g in ng.get("generation", {}).items():
            lines.append(f"{'nanoGPT generate %s tokens' % n:34s} {g['tokens_per_s']:9,.0f} tok/s (load time subtracted)")
    for k, v in out.get("ratios", {}).items():
        lines.append(f"{'ratio lmlab/nanoGPT ' + k:34s} {v:9.2f}x")
    print("\n".join(lines))


def to_markdown(out: dict) -> str:
    """The figures as Markdown tables (for docs/performance.md)."""
    md = [f"Measured with torch {out['torch']} on {out['device']}, {out['threads']} threads.", ""]
    p = out.get("peak_gflops")
    if p:
        md += ["| hardware peak (matmul) | GFLOP/s |", "|---|---|",
               f"| fp32 | {p['float32']:.0f} |", f"| bf16 | {p['bfloat16']:.0f} |", ""]
    if out.get("throughput"):
        md += ["| training config | dtype | compiled | tokens/s | ms/step | MFU (fp32 peak) | MFU (bf16 peak) "
               "| first step (s) |", "|---|---|---|---|---|---|---|---|"]
        for r in out["throughput"]:
            md.append(f"| {r['preset']} ({r['batch']}x{r['block']}) | {r['dtype']} | {'yes' if r['compile'] else 'no'} "
                      f"| {r['tokens_per_s']:,.0f} | {r['step_ms']:.1f} | {r['mfu_vs_float32']:.1%} "
                      f"| {r['mfu_vs_bfloat16']:.1%} | {r['first_step_s']:.1f} |")
        md.append("")
    t = out.get("time_to_target")
    if t or out.get("quality"):
        md += ["| time to quality (Tiny Shakespeare, char, full validation split) | figure |", "|---|---|"]
        if t:
            reached = f"{t['seconds']:.1f} s" if t["seconds"] is not None else "not reached"
            md.append(f"| seconds of training to val loss {t['target']} (run with a {t['budget_s']:.0f} s budget) "
                      f"| {reached} (final {t['final_val_loss']:.4f}) |")
        for r in out.get("quality", []):
            md.append(f"| val loss after {r['budget_s']:.0f} s of training ({r['steps']} steps, "
                      f"{r['wall_s']:.0f} s wall with evals) | {r['val_loss']:.4f} |")
        md.append("")
    if out.get("generation"):
        md += ["| generation, batch 1 (nanogpt-char-cpu shape) | tokens/s | compiling and warm-up (s) |",
               "|---|---|---|"]
        for r in out["generation"]:
            first = f"{r['first_s']:.1f}" if r.get("compiled") else "-"
            md.append(f"| {r['new_tokens']} new tokens, {_generation_label(r)} | {r['tokens_per_s']:,.0f} | {first} |")
        md.append("")
    if out.get("tokenizers"):
        md += ["| data | figure |", "|---|---|"]
        for r in out["tokenizers"]:
            md.append(f"| tokenize with {r['tokenizer']} (vocab {r['vocab_size']}) | {r['encode_mb_per_s']:.1f} MB/s "
                      f"(building it: {r['build_s']:.2f} s) |")
        if "memory" in out:
            m = out["memory"]
            md.append(f"| peak RSS of `lmlab train --preset {m['preset']}` | {m['peak_rss_mb']:.0f} MB |")
        md.append("")
    ng = out.get("nanogpt")
    if ng:
        md += ["| nanoGPT, same machine, same run | figure |", "|---|---|",
               f"| training tokens/s, CPU config (4/4/128, 12x64), eager | {ng['tokens_per_s']:,.0f} "
               f"({ng['step_ms']:.1f} ms/step) |",
               f"| peak RSS | {ng['peak_rss_mb']:.0f} MB |"]
        for n, g in ng.get("generation", {}).items():
            md.append(f"| generation, {n} new tokens (no KV cache; load time subtracted) | {g['tokens_per_s']:,.0f} tok/s |")
        for k, v in out.get("ratios", {}).items():
            md.append(f"| ratio lmlab / nanoGPT: {k} | {v:.2f}x |")
        md.append("")
    return "\n".join(md)
