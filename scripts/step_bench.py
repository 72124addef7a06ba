"""What each speed-up of the CPU training step is worth, measured with the alternatives interleaved in one run.

    python scripts/step_bench.py [--blocks 8] [--per-block 5] [--preset tiny] [--compile] [--only NAME ...]

- page faults: the same steps in fresh processes, glibc's malloc defaults against `keep_freed_memory()`, alternating
  process by process; minor page faults and wall time per step.
- fused MLP: in one process, the step with the MLP's hand-written function (ReLU² for `tiny`, GELU for
  nanogpt-char-cpu) against the plain modules, alternating block by block; for a preset of GPT-2 blocks
  (nanogpt-char-cpu), the whole block as one function (fused.gpt2_block) against the MLP's function alone.
- scripted block and shared update: for a preset of GPT-2 blocks, the step as training takes it (its rows shared
  between two threads where PyTorch has two) with the block's math run as TorchScript against the same functions run
  as Python, then AdamW's update cut among the step's threads against one thread.
- compile (with --compile): eager against `torch.compile`, alternating in one process, with the first compiled step
  (its compile time) reported.
- decode (with --only decode): eager generation, each block's decode step as one TorchScript call (fused_decode)
  against the model's modules, then GPT.forward calling those steps itself (fused_decode.direct) against calling the
  block modules: generate_batch of 1 and 64 rows (--batches), 128 new tokens each, alternating run by run; and one
  decode forward with and without the direct calls, alternating call by call.

Prints medians of the per-block medians and the per-block ratios (median, min-max). Nothing is asserted: this is a
benchmark, the tests check that each path computes the same thing.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch

from lmlab.bench.measure import training_step
from lmlab.bench.nanogpt import alternated_medians, block_ratios
from lmlab.common import keep_freed_memory
from lmlab.budget import apply_budget
from lmlab.config import get_preset


def make_step(preset: str, compile_model: bool = False):
    """A training step of the preset's model and optimizer on random tokens, fp32 on the CPU, as `lmlab bench`
    times it: (step(i), model, config)."""
    return training_step(preset, torch.device("cpu"), torch.float32, compile_model)


def child(preset: str, keep: bool, steps: int) -> None:
    """One process's share of the page-fault comparison: JSON with faults and seconds per step."""
    if keep and not keep_freed_memory():
        sys.exit("keep_freed_memory() did not apply here (glibc only)")
    step, _, _ = make_step(preset)
    for i in range(3):
        step(i)
    before, t0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
    times = []
    for i in range(steps):
        t = time.perf_counter()
        step(i)
        times.append(time.perf_counter() - t)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    print(json.dumps({"faults_per_step": faults / steps, "step_ms": statistics.median(times) * 1e3,
                      "total_s": time.perf_counter() - t0}))


def page_faults(preset: str, rounds: int, steps: int) -> None:
    runs: dict[str, list[dict]] = {"default": [], "keep": []}
    for r in range(rounds):
        for mode in ("default", "keep") if r % 2 == 0 else ("keep", "default"):
            proc = subprocess.run([sys.executable, __file__, "--child", mode, "--preset", preset, "--steps",
                                   str(steps)], capture_output=True, text=True, check=True)
            runs[mode].append(json.loads(proc.stdout.strip().splitlines()[-1]))
    ratios = [d["step_ms"] / k["step_ms"] for d, k in zip(runs["default"], runs["keep"])]
    for mode, rs in runs.items():
        print(f"page faults, malloc {mode:7s}: {statistics.median(r['faults_per_step'] for r in rs):8.0f} faults/step, "
              f"{statistics.median(r['step_ms'] for r in rs):6.1f} ms/step (per process: "
              f"{', '.join(format(r['step_ms'], '.0f') for r in rs)})")
    print(f"  default / keep: {statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f})")


def report(title: str, medians: dict, slow: str, fast: str) -> None:
    r = block_ratios(medians, slow, fast)
    print(f"{title}: " + ", ".join(f"{name} {statistics.median(m) * 1e3:.2f} ms" for name, m in medians.items())
          + f"; {slow} / {fast}: {r['ratio_median']:.2f}x ({r['ratio_min']:.2f}-{r['ratio_max']:.2f})")


def fused(preset: str, blocks: int, per_block: int) -> None:
    """The hand-written functions against the plain modules: the MLP's (the GPT-2 block off on both sides), then,
    where the preset's blocks are GPT-2's, the whole block's (fused.gpt2_block) against the MLP's alone."""
    step, model, _ = make_step(preset)
    gpt2 = all(block.gpt2 for block in model.blocks)

    def with_fused(mlp: bool, block: bool):
        def run(i: int) -> None:
            for b in model.blocks:
                b.mlp.fused, b.gpt2 = mlp, block
            step(i)
        return run

    for i in range(3):
        step(i)
    medians = alternated_medians({"plain": with_fused(False, False), "fused": with_fused(True, False)}, blocks,
                                 per_block)
    report("fused MLP", medians, "plain", "fused")
    if gpt2:
        medians = alternated_medians({"MLP": with_fused(True, False), "block": with_fused(True, True)}, blocks,
                                     per_block)
        report("GPT-2 block", medians, "MLP", "block")


def threads_levers(preset: str, blocks: int, per_block: int) -> None:
    """What the step's two threads gain from the block as TorchScript (fewer turns at the GIL) and from AdamW's update
    cut among them, each alternated against its absence."""
    from lmlab import fused as fused_mod
    from lmlab import optim

    step, model, _ = make_step(preset)
    if not all(block.gpt2 for block in model.blocks):
        return
    share_from = optim.SHARE_FROM

    def run_with(scripted: bool, shared: bool):
        def run(i: int) -> None:
            fused_mod.SCRIPTED, optim.SHARE_FROM = scripted, share_from if shared else 1 << 62
            step(i)
        return run

    for i in range(3):
        step(i)
    report("block as TorchScript", alternated_medians({"Python": run_with(False, True),
                                                        "TorchScript": run_with(True, True)}, blocks, per_block),
           "Python", "TorchScript")
    report("AdamW cut among threads", alternated_medians({"one": run_with(True, False), "cut": run_with(True, True)},
                                                         blocks, per_block), "one", "cut")
    fused_mod.SCRIPTED, optim.SHARE_FROM = True, share_from


def compiled(preset: str, blocks: int, per_block: int) -> None:
    eager, _, _ = make_step(preset)
    comp, _, _ = make_step(preset, compile_model=True)
    t0 = time.perf_counter()
    comp(0)
    print(f"compile: first compiled step {time.perf_counter() - t0:.1f} s")
    for i in range(3):
        eager(i)
        comp(i)
    report("compile", alternated_medians({"eager": eager, "compiled": comp}, blocks, per_block), "eager",
           "compiled")


def decode(preset: str, blocks: int, per_block: int, batches: tuple[int, ...] = (1, 64)) -> None:
    """Each block's decode step as one TorchScript call against the model's modules, in whole generate_batch runs
    (one-token prompts, 128 new tokens, no stops) of a random model of the preset's shape; ms per decode step."""
    from lmlab import fused_decode
    from lmlab.generate import generate_batch
    from lmlab.model import build_model

    cfg, _ = apply_budget(get_preset(preset))
    torch.manual_seed(0)
    model = build_model(cfg.model, 65).eval()
    fits, direct, new = fused_decode.decode_fits, fused_decode.direct, 128

    def run_with(fused: bool, batch: int, called: bool = True):
        def run(i: int) -> None:
            fused_decode.decode_fits = fits if fused else (lambda x, weight: False)
            fused_decode.direct = direct if called else (lambda *args: None)
            generate_batch(model, [[r % 65] for r in range(batch)], new, seeds=list(range(batch)))
        return run

    def compare(title: str, runs: dict) -> None:
        for run in runs.values():
            run(0)
        medians = {name: [m / new for m in ms] for name, ms in alternated_medians(runs, blocks, per_block).items()}
        report(title, medians, *runs)

    for batch in batches:
        compare(f"decode step at batch {batch}", {"modules": run_with(False, batch),
                                                   "TorchScript": run_with(True, batch)})
        # GPT.forward calling each block's TorchScript step itself, against calling the block modules
        compare(f"blocks called directly at batch {batch}", {"module calls": run_with(True, batch, False),
                                                              "direct": run_with(True, batch)})
        fused_decode.decode_fits, fused_decode.direct = fits, direct  # as the runs above may have left them
        forward_calls(model, batch, 200 * blocks)


def forward_calls(model, batch: int, calls: int) -> None:
    """One decode forward of `batch` rows at the middle slot of the block, the blocks taken by the model (direct)
    against the block modules' calls, alternated call by call (finer than whole runs, which the machine's drift
    blurs): medians of the calls and of the paired differences."""
    from lmlab import fused_decode

    direct, slot = fused_decode.direct, model.cfg.block_size // 2
    cache = model.make_cache(batch, grow=True)
    token = torch.arange(batch).view(batch, 1) % 65
    times: dict = {"module calls": [], "direct": []}
    with torch.inference_mode():
        for _ in range(slot):
            model(token, cache=cache)
        for i in range(calls + 20):
            for name in ("module calls", "direct") if i % 2 == 0 else ("direct", "module calls"):
                fused_decode.direct = direct if name == "direct" else (lambda *args: None)
                t = time.perf_counter()
                model(token, cache=cache)
                if i >= 20:  # after a warm-up
                    times[name].append(time.perf_counter() - t)
                cache.pos = slot
    fused_decode.direct = direct
    medians = {name: statistics.median(ts) * 1e6 for name, ts in times.items()}
    saved = statistics.median([a - b for a, b in zip(times["module calls"], times["direct"])]) * 1e6
    print(f"decode forward at batch {batch}: module calls {medians['module calls']:.0f} us, direct "
          f"{medians['direct']:.0f} us; module calls / direct: {medians['module calls'] / medians['direct']:.3f}x "
          f"(paired difference {saved:.0f} us)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--blocks", type=int, default=8)
    ap.add_argument("--per-block", type=int, default=5)
    ap.add_argument("--compile", action="store_true", help="also compare torch.compile against eager")
    ap.add_argument("--only", nargs="+", choices=("faults", "fused", "threads", "compile", "decode"),
                    help="run only these comparisons (compile: as --compile; decode only so)")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 64], help="decode: the batch sizes")
    ap.add_argument("--child", choices=("default", "keep"), help=argparse.SUPPRESS)
    ap.add_argument("--steps", type=int, default=20, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.preset, args.child == "keep", args.steps)
        return
    cfg, _ = apply_budget(get_preset(args.preset))
    batch, block = cfg.batch_size, cfg.model.block_size
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, preset {args.preset}: {batch} x {block} "
          f"tokens a step")
    only = set(args.only or ("faults", "fused", "threads") + (("compile",) if args.compile else ()))
    if "faults" in only:
        page_faults(args.preset, max(2, args.blocks // 2), args.steps)
    keep_freed_memory()  # as `lmlab train` does on CPU
    if "fused" in only:
        fused(args.preset, args.blocks, args.per_block)
    if "threads" in only:
        threads_levers(args.preset, args.blocks, args.per_block)
    if "compile" in only:
        compiled(args.preset, args.blocks, args.per_block)
    if "decode" in only:
        decode(args.preset, args.blocks, args.per_block, tuple(args.batches))


if __name__ == "__main__":
    main()
