"""The timings of `lmlab bench`: hardware peak (matmul GFLOP/s), training throughput of the loop's own train_step,
generation speed, tokenizer speed, the peak memory of a training process, and the loss reached in a time budget.

Benchmarks are measurements, not tests: medians over many steps, with warm-up and compile time reported apart.
"""

from __future__ import annotations

import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import torch

from ..common import LmlabError
from ..budget import apply_budget
from ..config import get_preset
from ..data import resolve_source
from ..model import build_model, matmul_params
from ..optim import build_optimizer
from ..run import Run
from ..threads import share_optimizer, split_parts


def flops_per_token(model: torch.nn.Module, block_size: int) -> float:
    """Training FLOPs per token: 6 x (weights used in matmuls) + attention (12 x layers x width x context)."""
    cfg = model.cfg
    return 6 * matmul_params(model) + 12 * cfg.n_layer * cfg.n_embd * block_size


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_peak(dtype: torch.dtype, device: torch.device, n: int = 2048, reps: int = 10, warm_s: float = 0.2
                ) -> float:
    """GFLOP/s of an n x n matmul: the best of `reps` timings after warm_s seconds of the same matmul. A peak is the
    best the machine does: a median of 5 caught this VM's slow spells (142 GFLOP/s fp32 in one bench run, 266 in
    another on the same machine, which made the MFU of the steps timed beside it look high)."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    start = time.perf_counter()
    while True:  # at least once, then until the clocks and caches have settled
        a @ b
        sync(device)
        if time.perf_counter() - start >= warm_s:
            break
    best = math.inf
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


def training_step(preset: str, device: torch.device, dtype: torch.dtype, compile: bool, vocab: int = 65,
                  micro_batches: int = 1, split: Optional[int] = None):
    """The training loop's own step (forward, loss, backward on each of micro_batches micro-batches (0: the
    preset's grad_accum), clip, optimizer update) of the preset's model and optimizer, on random tokens, each
    micro-batch shared among threads as training shares it (threads.split_parts; `split` overrides): returns step(i),
    the model and the config."""
    from ..evaluate import autocast_context
    from ..loss import LossConfig, training_loss
    from ..train import train_step

    cfg, _ = apply_budget(get_preset(preset))
    cfg.compile = compile
    split = split_parts(cfg, device, dtype, 1) if split is None else split
    torch.manual_seed(0)
    model = build_model(cfg.model, vocab).to(device)
    opt = build_optimizer(model, cfg.optim)
    share_optimizer(opt, split)
    run = torch.compile(model) if compile else model
    objective = torch.compile(training_loss) if compile else training_loss
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, vocab, (cfg.batch_size, cfg.model.block_size + 1), generator=gen).to(device)
               for _ in range(4)]
    autocast = autocast_context(device, dtype)
    micro = micro_batches or cfg.grad_accum

    def step(i: int) -> None:
        windows = [batches[(i * micro + j) % len(batches)] for j in range(micro)]
        train_step(run, opt, [(w[:, :-1], w[:, 1:]) for w in windows], LossConfig(), cfg.optim.grad_clip, autocast,
                   objective=objective, split=split)
        sync(device)

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
    from ..sample import generate

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


def generation_label(r: dict) -> str:
    return "KV cache " + ("on, compiled" if r.get("compiled") else "on" if r["kv_cache"] else "off")


def tokenizer_speed(data: str, kind: str, vocab_size: int = 1024) -> dict:
    from ..data import build_tokenizer, encode_corpus

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


def child_env() -> dict:
    env = dict(os.environ)
    env.pop("LMLAB_DEBUG", None)
    return env


def training_rss(data: str, preset: str, steps: int) -> dict:
    """Peak resident memory of a real `lmlab train` process (a child, so nothing else is counted)."""
    with tempfile.TemporaryDirectory() as d:
        cmd = [sys.executable, "-m", "lmlab", "train", "--preset", preset, "--data", data, "--out", f"{d}/run",
               "--max-steps", str(steps), "--max-time", "0", "--sample-tokens", "0", "--eval-interval", "100000",
               "--no-progress", "--no-tensorboard"]
        code, _, err, rss = run_measured(cmd, env=child_env())
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
    from ..train import train

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
        evals = Run(Path(d) / "run").metrics().evals
    return {"budget_s": budget, "val_loss": summary["val_loss"], "steps": summary["steps"], "wall_s": wall,
            "curve": [(e.elapsed_s, e.val_loss) for e in evals]}


def chat_conversation(tokenizer, target: int, seed: int = 0) -> list[dict]:
    """User and assistant turns of random letters whose rendering with the generation prompt is `target` tokens
    (a char tokenizer: one token a letter), the last user message's length making up the difference."""
    from .. import chat

    rng = torch.Generator().manual_seed(seed)

    def letters(n: int) -> str:
        return "".join(chr(ord("a") + int(i)) for i in torch.randint(0, 26, (n,), generator=rng))

    def length(msgs: list[dict]) -> int:
        return len(chat.render(tokenizer, msgs, add_generation_prompt=True).ids)

    messages = [{"role": "user", "content": "a"}]
    while True:  # whole turns while they fit, each a user message and its answer of 4 to 16 letters
        more = [{"role": "user", "content": letters(4 + int(torch.randint(0, 13, (1,), generator=rng)))},
                {"role": "assistant", "content": letters(4 + int(torch.randint(0, 13, (1,), generator=rng)))}]
        if length(more + messages) > target:
            break
        messages = messages[:-1] + more + messages[-1:]
    messages[-1]["content"] = letters(max(1, 1 + target - length(messages)))
    return messages


def chat_speed(device: torch.device, new_tokens: int = 32, repeats: int = 5, fill: float = 0.75,
               preset: str = "tiny") -> dict:
    """A chat answer (batch 1, KV cache, temperature 1) from a random-init `preset` model with a char tokenizer,
    after a conversation that fills `fill` of its context: time to first token (rendering and encoding the
    conversation, the prompt's forward and the first draw) and tokens/s over the rest of the answer. A fixed
    new_tokens are drawn (no stop id ends it: sample.generate on the rendered ids). Medians over `repeats`, after a
    warm-up answer."""
    from .. import chat
    from ..sample import generate
    from ..tokenizer import CharTokenizer

    if new_tokens < 2:
        raise LmlabError("a chat answer's tokens/s needs at least 2 new tokens")
    cfg, _ = apply_budget(get_preset(preset))
    tokenizer = CharTokenizer("abcdefghijklmnopqrstuvwxyz ")
    torch.manual_seed(0)
    model = build_model(cfg.model, tokenizer.vocab_size).to(device).eval()
    block = cfg.model.block_size
    messages = chat_conversation(tokenizer, round(block * fill))
    gen = torch.Generator().manual_seed(0)
    firsts, rates = [], []
    for i in range(repeats + 1):  # the first is the warm-up
        t = time.perf_counter()
        ids = chat.render(tokenizer, messages, add_generation_prompt=True).ids.tolist()
        tokens = generate(model, ids, new_tokens, 1.0, 0, 1.0, gen)
        next(tokens)
        sync(device)
        first = time.perf_counter() - t
        t = time.perf_counter()
        n = sum(1 for _ in tokens)
        sync(device)
        if i:
            firsts.append(first)
            rates.append(n / (time.perf_counter() - t))
    return {"preset": preset, "block": block, "prompt_tokens": len(ids), "new_tokens": new_tokens,
            "repeats": repeats, "first_token_ms": statistics.median(firsts) * 1000,
            "tokens_per_s": statistics.median(rates)}
