"""`lmlab bench`: hardware peak, training throughput and MFU, time to quality, generation and data speed.

Benchmarks are measurements, not tests: medians over many steps, with warm-up and compile time reported apart.
With --nanogpt PATH it also runs a nanoGPT checkout (never vendored) on the same machine and reports ratios.
"""

from __future__ import annotations

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
from .model import build_model, count_params, matmul_params
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
    """A nanoGPT checkout to measure side by side (optional). Its code runs here: lmlab imports PATH/model.py and,
    without --quick, runs PATH/train.py; give only a checkout you trust."""
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


def training_step(preset: str, device: torch.device, dtype: torch.dtype, compile: bool, vocab: int = 65):
    """The training loop's own step (forward, loss, backward, clip, optimizer update on one micro-batch) of the
    preset's model and optimizer, on random tokens: returns step(i), the model and the config."""
    from .evaluate import autocast_context
    from .loss import LossConfig, training_loss
    from .train import train_step

    cfg, _ = apply_budget(get_preset(preset))
    torch.manual_seed(0)
    model = build_model(cfg.model, vocab).to(device)
    opt = build_optimizer(model, cfg.optim)
    run = torch.compile(model) if compile else model
    objective = torch.compile(training_loss) if compile else training_loss
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, vocab, (cfg.batch_size, cfg.model.block_size + 1), generator=gen).to(device)
               for _ in range(4)]
    autocast = autocast_context(device, dtype)

    def step(i: int) -> None:
        w = batches[i % len(batches)]
        train_step(run, opt, [(w[:, :-1], w[:, 1:])], LossConfig(), cfg.optim.grad_clip, autocast,
                   objective=objective)
        _sync(device)

    return step, model, cfg


def throughput(preset: str, device: torch.device, dtype: torch.dtype, compile: bool, steps: int,
               warmup: int = 3, vocab: int = 65) -> dict:
    """Steady-state tokens/s of full training steps (forward, backward, clip, optimizer update) on random tokens."""
    step, model, cfg = training_step(preset, device, dtype, compile, vocab)
    B, T = cfg.batch_size, cfg.model.block_size
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


def nanogpt_process(path: str, data: str, iters: int) -> dict:
    """Run nanoGPT's documented CPU config from a checkout as its own process: its peak memory and loss (its speed
    is compared in one process, alternated: alternated_throughput)."""
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
        return result


# ---------------------------------------------------------------------------------------------------------------
# nanoGPT side by side, in one process: blocks of steps alternate, so the machine's drift hits both alike


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


def _twin_models(path: str, device: torch.device):
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


def _alternate(steps: dict, blocks: int, per_block: int) -> dict:
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


def _ratios(medians: dict, slow: str, fast: str) -> dict:
    """Per-block ratios slow/fast: their median and spread (min, max)."""
    ratios = [a / b for a, b in zip(medians[slow], medians[fast])]
    return {"ratio_median": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios),
            "ratios": ratios}


def alternated_throughput(path: str, device: torch.device, compile: bool, peak_gflops: float, blocks: int = 5,
                          per_block: int = 10) -> dict:
    """Training steps of lmlab and nanoGPT at nanoGPT's CPU shape, on the same batches, fp32, clipping at 1.0, each
    with its own optimizer and step; eager against eager or compiled against compiled."""
    from .evaluate import autocast_context
    from .loss import LossConfig, training_loss
    from .train import train_step

    cfg, ours, our_opt, theirs, their_opt = _twin_models(path, device)
    B, T, V = NANOGPT_CPU["batch_size"], NANOGPT_CPU["block_size"], NANOGPT_CPU["vocab_size"]
    gen = torch.Generator().manual_seed(0)
    windows = [torch.randint(0, V, (B, T + 1), generator=gen) for _ in range(4)]
    batches = [(w[:, :-1].contiguous().to(device), w[:, 1:].contiguous().to(device)) for w in windows]  # as loaders give
    our_run = torch.compile(ours) if compile else ours
    objective = torch.compile(training_loss) if compile else training_loss
    their_run = torch.compile(theirs) if compile else theirs

    def lmlab_step(i):
        train_step(our_run, our_opt, [batches[i % len(batches)]], LossConfig(), cfg.optim.grad_clip,
                   autocast_context(device, torch.float32), objective=objective)
        _sync(device)

    def nanogpt_step(i):  # nanoGPT's train.py, one micro-step per iteration as in its CPU config
        _, loss = their_run(*batches[i % len(batches)])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(theirs.parameters(), 1.0)
        their_opt.step()
        their_opt.zero_grad(set_to_none=True)
        _sync(device)

    t = time.perf_counter()
    for i in range(3):  # warm-up (and, compiled, the compilation) of both
        lmlab_step(i)
        nanogpt_step(i)
    warmup_s = time.perf_counter() - t
    medians = _alternate({"lmlab": lmlab_step, "nanogpt": nanogpt_step}, blocks, per_block)
    flops = flops_per_token(ours, T)
    result = {"compile": compile, "blocks": blocks, "steps_per_block": per_block, "warmup_s": warmup_s,
              **_ratios(medians, "nanogpt", "lmlab")}
    for name in ("lmlab", "nanogpt"):
        step = statistics.median(medians[name])
        result[name] = {"step_ms": step * 1000, "tokens_per_s": B * T / step,
                        "mfu_vs_float32": B * T / step * flops / (peak_gflops * 1e9)}
    return result


def alternated_generation(path: str, device: torch.device, new_tokens: int, compile: bool = False, blocks: int = 5,
                          per_block: int = 1) -> dict:
    """Batch-1 sampling of new_tokens tokens (temperature 1): lmlab's KV-cached generation (compiled, if asked)
    against nanoGPT's generate, which runs the whole window for every token; alternated blocks."""
    from .sample import generate

    _, ours, _, theirs, _ = _twin_models(path, device)
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
    medians = _alternate({"lmlab": lmlab_run, "nanogpt": nanogpt_run}, blocks, per_block)
    result = {"new_tokens": new_tokens, "compiled": compile, "blocks": blocks, "warmup_s": warmup_s,
              **_ratios(medians, "nanogpt", "lmlab")}
    for name in ("lmlab", "nanogpt"):
        result[name] = {"tokens_per_s": new_tokens / statistics.median(medians[name])}
    return result


# ---------------------------------------------------------------------------------------------------------------


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run_bench(cfg: BenchConfig) -> dict:
    """The sections asked for (all by default), in an order where each can use the figures before it."""
    device = resolve_device(cfg.device)
    sections = set(cfg.only) or {"peak", "throughput", "quality", "generation", "data", "nanogpt"}
    check_inputs(cfg, sections, device)
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
    if cfg.nanogpt:  # asked for by giving the checkout, whatever --only says
        bench_nanogpt(cfg, device, out)
    return out


def check_inputs(cfg: BenchConfig, sections: set, device: torch.device) -> None:
    """Refuse a bad nanoGPT checkout or corpus before anything is measured, so a refusal comes at once."""
    if cfg.nanogpt:
        if not Path(cfg.nanogpt).is_dir():
            raise LmlabError(f"--nanogpt {cfg.nanogpt}: no such folder (give the root of a nanoGPT checkout)")
        if not cfg.quick and not (Path(cfg.nanogpt) / "train.py").is_file():
            raise LmlabError(f"--nanogpt {cfg.nanogpt}: no train.py there (give the root of a nanoGPT checkout)")
        _twin_models(cfg.nanogpt, device)  # imports its model.py and checks the architecture: a second or less
    if sections & {"data", "quality"} or (cfg.nanogpt and not cfg.quick):
        resolve_source(cfg.data)


def bench_peak(cfg: BenchConfig, device: torch.device, out: dict) -> None:
    n = 8192 if device.type == "cuda" else 1024 if cfg.quick else 2048  # a GPU needs large matmuls to reach its peak
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
    if device.type == "cuda":  # a GPU: the GPT-2 small shape in bf16, the figure GPU users compare
        combos = [("gpt2-124m", torch.bfloat16, False)] + ([] if cfg.quick else [("gpt2-124m", torch.bfloat16, True)])
    elif not cfg.quick:
        combos += [("nanogpt-char-cpu", torch.float32, True), ("nanogpt-char-cpu", torch.bfloat16, True),
                   ("nanogpt-char", torch.float32, False), ("nanogpt-char", torch.float32, True)]
        if bf16_pays:
            combos += [("nanogpt-char", torch.bfloat16, False), ("nanogpt-char", torch.bfloat16, True)]
    for preset, dtype, comp in combos:
        big = preset == "nanogpt-char" and device.type != "cuda"
        vocab = 50257 if preset == "gpt2-124m" else 65
        r = throughput(preset, device, dtype, comp, 3 if big else steps, warmup=2 if big else 3, vocab=vocab)
        for peak_name, peak in out["peak_gflops"].items():
            r[f"mfu_vs_{peak_name}"] = r["tokens_per_s"] * r["flops_per_token"] / (peak * 1e9)
        rows.append(r)
        peak_name = "bfloat16" if dtype == torch.bfloat16 else "float32"
        say(f"throughput {preset} {r['dtype']} compile={comp}: {r['tokens_per_s']:,.0f} tok/s, "
            f"{r['step_ms']:.1f} ms/step, MFU {r[f'mfu_vs_{peak_name}']:.0%} of the measured {peak_name} peak "
            f"(first step {r['first_step_s']:.1f}s)")
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


def bench_nanogpt(cfg: BenchConfig, device: torch.device, out: dict) -> None:
    """nanoGPT side by side: training and generation speed alternated in one process, peak memory of its own run."""
    if "peak_gflops" not in out:
        bench_peak(cfg, device, out)
    blocks, per_block = (3, 5) if cfg.quick else (5, 10)
    ng: dict = {"throughput": [], "generation": []}
    out["nanogpt"] = ng
    for comp in (False,) if cfg.quick else (False, True):
        r = alternated_throughput(cfg.nanogpt, device, comp, out["peak_gflops"]["float32"], blocks, per_block)
        ng["throughput"].append(r)
        say(f"against nanoGPT, training {'compiled' if comp else 'eager'}: {_ratio_text(r)}; lmlab "
            f"{r['lmlab']['step_ms']:.1f} ms/step (MFU {r['lmlab']['mfu_vs_float32']:.0%}), nanoGPT "
            f"{r['nanogpt']['step_ms']:.1f} ms/step (MFU {r['nanogpt']['mfu_vs_float32']:.0%})")
    for n, comp in ((500, False),) if cfg.quick else ((500, False), (2000, False), (2000, True)):
        r = alternated_generation(cfg.nanogpt, device, n, comp, blocks=3 if cfg.quick else 5)
        ng["generation"].append(r)
        say(f"against nanoGPT, generating {n} tokens ({_generation_label({'kv_cache': True, 'compiled': comp})}): "
            f"{_ratio_text(r)}; lmlab {r['lmlab']['tokens_per_s']:,.0f} tok/s, nanoGPT "
            f"{r['nanogpt']['tokens_per_s']:,.0f} tok/s")
    if not cfg.quick:
        ng["process"] = nanogpt_process(cfg.nanogpt, cfg.data, 300)
        say(f"nanoGPT's own CPU-config run: peak RSS {ng['process']['peak_rss_mb']:.0f} MB")


def _ratio_text(r: dict) -> str:
    return (f"lmlab is {r['ratio_median']:.2f}x nanoGPT's speed (median of {r['blocks']} alternated blocks; "
            f"{r['ratio_min']:.2f}-{r['ratio_max']:.2f})")


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
    lines += _nanogpt_lines(out.get("nanogpt"))
    print("\n".join(lines))


def _nanogpt_lines(ng: Optional[dict]) -> list[str]:
    if not ng:
        return []
    lines = []
    for r in ng["throughput"]:
        lines.append(f"{'vs nanoGPT, train ' + ('compiled' if r['compile'] else 'eager'):34s} {r['ratio_median']:9.2f}x "
                     f"(blocks {r['ratio_min']:.2f}-{r['ratio_max']:.2f})  lmlab {r['lmlab']['step_ms']:.1f} / "
                     f"nanoGPT {r['nanogpt']['step_ms']:.1f} ms/step  MFU {r['lmlab']['mfu_vs_float32']:.0%} / "
                     f"{r['nanogpt']['mfu_vs_float32']:.0%}")
    for r in ng["generation"]:
        label = f"vs nanoGPT, generate {r['new_tokens']}" + (" compiled" if r["compiled"] else "")
        lines.append(f"{label:34s} {r['ratio_median']:9.2f}x (blocks {r['ratio_min']:.2f}-{r['ratio_max']:.2f})  "
                     f"lmlab {r['lmlab']['tokens_per_s']:,.0f} / nanoGPT {r['nanogpt']['tokens_per_s']:,.0f} tok/s")
    if "process" in ng:
        lines.append(f"{'nanoGPT peak RSS (its own run)':34s} {ng['process']['peak_rss_mb']:9.0f} MB")
    return lines


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
        md += ["| against nanoGPT (its CPU shape, alternated in one process) | lmlab / nanoGPT (median) | spread "
               "over blocks | lmlab | nanoGPT |", "|---|---|---|---|---|"]
        for r in ng["throughput"]:
            md.append(f"| training, {'compiled' if r['compile'] else 'eager'}, fp32 ({r['blocks']} blocks of "
                      f"{r['steps_per_block']} steps) | {r['ratio_median']:.2f}x | {r['ratio_min']:.2f}-"
                      f"{r['ratio_max']:.2f} | {r['lmlab']['step_ms']:.1f} ms/step, MFU "
                      f"{r['lmlab']['mfu_vs_float32']:.0%} | {r['nanogpt']['step_ms']:.1f} ms/step, MFU "
                      f"{r['nanogpt']['mfu_vs_float32']:.0%} |")
        for r in ng["generation"]:
            label = _generation_label({"kv_cache": True, "compiled": r["compiled"]})
            md.append(f"| generation, {r['new_tokens']} tokens, batch 1 ({label}; nanoGPT recomputes its window) "
                      f"| {r['ratio_median']:.2f}x | "
                      f"{r['ratio_min']:.2f}-{r['ratio_max']:.2f} | {r['lmlab']['tokens_per_s']:,.0f} tok/s | "
                      f"{r['nanogpt']['tokens_per_s']:,.0f} tok/s |")
        if "process" in ng:
            md.append(f"| peak RSS, nanoGPT's own CPU-config run | | | | {ng['process']['peak_rss_mb']:.0f} MB |")
        md.append("")
    return "\n".join(md)
