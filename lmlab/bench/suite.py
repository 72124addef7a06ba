"""`lmlab bench`: what to measure (BenchConfig), and the sections that measure it, each adding its figures to one
result: hardware peak, data, training throughput and MFU, generation, time to quality, and nanoGPT side by side."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from ..common import LmlabError, keep_freed_memory, resolve_device
from ..data import BUILTIN, resolve_source
from .decode import batched_generation, batched_lines
from .floor import SHAPES, floor_lines, lmlab_floor
from .measure import (chat_speed, generation_label, generation_speed, matmul_peak, quality_run, throughput,
                      tokenizer_speed, training_rss)
from .nanogpt import alternated_generation, alternated_throughput, twin_models, whole_runs
from .records import check_record, record_row


@dataclass
class BenchConfig:
    """What to measure."""

    quick: bool = False
    """A small version that finishes in under 2 minutes."""
    json: bool = False
    """Print all figures as one JSON object on stdout (the table and the progress go to stderr)."""
    data: str = BUILTIN
    """Corpus for time-to-quality and tokenizer speed: a file, folder, glob, 'builtin' or a corpus name (the figures
    in docs/performance.md are on tinyshakespeare)."""
    device: str = "auto"
    """auto, cpu, cuda or mps."""
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
    """Budget (s) of the run that times the target (with --quick, at most 15)."""
    only: tuple[str, ...] = ()
    """Run only these sections: peak, throughput (with the floor), quality, generation, data, nanogpt; or chat (only
    the chat answer of the generation section), or floor (only the floor of the throughput section). A --quick run
    of every section leaves the floor out."""
    out: Optional[str] = None
    """Folder to write the figures to: bench.json (all of them) and bench.md (as Markdown tables)."""
    record: Optional[float] = None
    """A record attempt instead of the sections (docs/records.md): train --seeds seeds of `lmlab train --data DATA
    --max-time BUDGET` and test whether their mean final val loss is below this target (one-sided t-test)."""
    budget: Optional[float] = None
    """With --record: the training budget (--max-time, seconds) of each seed."""
    seeds: int = 5
    """With --record: how many seeds (1, 2, ... N), each its own run."""


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run_bench(cfg: BenchConfig) -> dict:
    """The sections asked for (all by default), in an order where each can use the figures before it."""
    device = resolve_device(cfg.device)
    if cfg.record is not None or cfg.budget is not None:
        return {"record": bench_record(cfg)}
    sections = set(cfg.only) or {"peak", "throughput", "quality", "generation", "data", "nanogpt"}
    check_inputs(cfg, sections, device)
    if device.type == "cpu":  # as `lmlab train` runs (a process-wide malloc setting: nanoGPT's steps here share it)
        keep_freed_memory()
    out: dict = {"device": str(device), "threads": torch.get_num_threads(), "torch": torch.__version__,
                 "quick": cfg.quick}
    if "peak" in sections or "throughput" in sections:
        bench_peak(cfg, device, out)
    if "data" in sections:
        bench_data(cfg, out)
    if "throughput" in sections:
        bench_throughput(cfg, device, out)
    if "floor" in sections or ("throughput" in sections and not (cfg.quick and not cfg.only)):
        bench_floor(cfg, device, out)  # a plain --quick (a smoke run of every section) leaves it out
    if "generation" in sections:
        bench_generation(cfg, device, out)
    if "generation" in sections or "chat" in sections:
        bench_chat(cfg, device, out)
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
        twin_models(cfg.nanogpt, device)  # imports its model.py and checks the architecture: a second or less
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


def bench_floor(cfg: BenchConfig, device: torch.device, out: dict) -> None:
    """The step against its own matmuls (floor.py), for lmlab at both shapes and, given a checkout, nanoGPT."""
    rounds, profile_steps = (3, 2) if cfg.quick else (9, 5)
    out["floor"] = []
    for shape in SHAPES:  # at nanoGPT's CPU shape, nanoGPT's step (given a checkout) in turns with lmlab's
        out["floor"] += lmlab_floor(shape, device, rounds, profile_steps, nanogpt=cfg.nanogpt)
    for line in floor_lines(out["floor"]):
        say(line)


def bench_record(cfg: BenchConfig) -> dict:
    """--record TARGET --budget SECONDS --seeds N: the seeds trained one after another, and the row."""
    check_record(cfg.record, cfg.budget, cfg.seeds)
    resolve_source(cfg.data)
    return record_row(cfg.record, cfg.budget, cfg.seeds, cfg.data, cfg.device, say)


def bench_generation(cfg: BenchConfig, device: torch.device, out: dict) -> None:
    out["generation"] = []
    # compiled decoding is left out of --quick: its first compile takes one to two minutes with a cold cache
    paths = ((True, False), (False, False)) if cfg.quick else ((True, False), (True, True), (False, False))
    for n in ((500,) if cfg.quick else (500, 2000)):
        for cache, comp in paths:
            r = generation_speed(device, n, cache, comp)
            out["generation"].append(r)
            say(f"generation {n} tokens, {generation_label(r)}: {r['tokens_per_s']:,.0f} tok/s"
                + (f" (compiling and warm-up: {r['first_s']:.1f} s)" if comp else ""))
    # batched, against the floor of its decode step (decode.py), eager: at 128 new tokens compiling is not repaid
    batches, new_tokens, rounds = ((1, 8), 32, 2) if cfg.quick else ((1, 8, 64), 128, 5)
    out["generation_batched"] = batched_generation(device, batches, new_tokens, rounds)
    for line in batched_lines(out["generation_batched"]):
        say(line)


def bench_chat(cfg: BenchConfig, device: torch.device, out: dict) -> None:
    """A chat answer after a conversation filling three quarters of the tiny preset's context (a second or so)."""
    r = chat_speed(device, repeats=3 if cfg.quick else 10)
    out["chat"] = r
    say(f"chat answer after {r['prompt_tokens']} of {r['block']} tokens ({r['preset']}): first token in "
        f"{r['first_token_ms']:.1f} ms, then {r['tokens_per_s']:,.0f} tok/s")


def bench_quality(cfg: BenchConfig, out: dict) -> None:
    budgets = (15.0,) if cfg.quick else tuple(cfg.budgets)
    target_run = quality_run(cfg.data, min(cfg.target_budget, 15.0) if cfg.quick else cfg.target_budget, cfg.device, 10)
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
        say(f"against nanoGPT, generating {n} tokens ({generation_label({'kv_cache': True, 'compiled': comp})}): "
            f"{_ratio_text(r)}; lmlab {r['lmlab']['tokens_per_s']:,.0f} tok/s, nanoGPT "
            f"{r['nanogpt']['tokens_per_s']:,.0f} tok/s")
    if not cfg.quick:  # whole runs as users start them, each its own process: 5 rounds of 300 steps, alternated
        # (a 2-core VM may change speed between the two runs of a round: the median of 5 rounds rides that out)
        runs = ng["runs"] = whole_runs(cfg.nanogpt, cfg.data, 5, 300)
        ng["process"] = runs["nanogpt"]["runs"][0]
        say(f"against nanoGPT, whole training runs (`lmlab train --preset nanogpt-char-cpu` against its README CPU "
            f"command, {runs['rounds']} rounds of {runs['iters']} steps): lmlab is {runs['ratio_median']:.2f}x "
            f"nanoGPT's tokens/s ({runs['ratio_min']:.2f}-{runs['ratio_max']:.2f}); lmlab "
            f"{runs['lmlab']['step_ms']:.1f} ms/step, nanoGPT {runs['nanogpt']['step_ms']:.1f} ms/step; nanoGPT's "
            f"peak RSS {ng['process']['peak_rss_mb']:.0f} MB")


def _ratio_text(r: dict) -> str:
    return (f"lmlab is {r['ratio_median']:.2f}x nanoGPT's speed (median of {r['blocks']} alternated blocks; "
            f"{r['ratio_min']:.2f}-{r['ratio_max']:.2f})")
