"""One micro-batch's rows shared among threads on the CPU (--thread-split): data parallelism inside one process.

On a CPU with two cores, a small model's step spends a fifth of its time outside its matrix products: Python, the
dispatcher and small kernels that run one after another while the other core waits. Split the micro-batch's rows
into equal parts, one per thread, each thread running its part's forward and backward with its share of PyTorch's
threads (one each on two cores), and that time overlaps the other thread's products instead (their Python still
takes turns under the GIL; the GPT-2 block's math runs as TorchScript, one turn per block: fused.py). The parts'
gradients are summed in an order that cannot change the result (`backward_in_parts`), so a run stays bit for bit
reproducible from its seed, whichever thread finishes first. The matrix products themselves cost the same: on two
cores, half the rows on one thread take as long as all of them on two.
docs/performance.md has the measurements.

The mean loss over equal parts of (inputs, targets) is the mean of their means, so the step is the full batch's
step up to rounding.
What the threads would have to share in order is refused (`split_parts`): dropout draws from one random generator,
and autocast is a per-thread state. A compiled step keeps one part (split, it was no faster: 0.98x at the tiny
recipe's shape), and so do preference pairs and rewards' rollouts, and several processes. Packed conversations
(--stage sft) are cut by rows too (sft.row_parts): each part's masked loss is over the step's count of trained
targets, so the parts' losses add up to the batch's.
"""

from __future__ import annotations

import functools
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Optional

import torch

from .common import LmlabError
from .config import TrainConfig


def split_parts(cfg: TrainConfig, device: torch.device, dtype: torch.dtype, world: int) -> int:
    """How many threads share each micro-batch: --thread-split, or for 0 (auto) 2 where PyTorch has two threads or
    more and the step allows it, else 1. An explicit split that the step does not allow is refused with the reason."""
    threads = torch.get_num_threads()
    reasons = [why for bad, why in (
        (device.type != "cpu", "the CPU"),
        (dtype not in (torch.float32, torch.float64), "float32 or float64 (autocast is per thread)"),
        (bool(cfg.compile), "an eager model (--no-compile)"),
        (cfg.stage not in ("pretrain", "sft"), "--stage pretrain or sft"),
        (world > 1, "one process"),
        (bool(cfg.model.dropout) or bool(cfg.model.attn_dropout), "no dropout (one random generator)"),
    ) if bad]
    if cfg.thread_split == 0:
        parts = 2 if threads >= 2 and not reasons else 1
        return parts if cfg.batch_size % parts == 0 else 1
    if cfg.thread_split > 1:
        if reasons:
            raise LmlabError(f"--thread-split {cfg.thread_split} needs {', '.join(reasons)}")
        if cfg.batch_size % cfg.thread_split:
            raise LmlabError(f"--thread-split {cfg.thread_split} must divide --batch-size {cfg.batch_size}")
    return cfg.thread_split


@functools.lru_cache(maxsize=None)
def _pool(workers: int, threads: int) -> ThreadPoolExecutor:
    """The worker threads (the caller runs the first part itself), each with `threads` PyTorch threads."""
    return ThreadPoolExecutor(workers, thread_name_prefix="lmlab-part", initializer=torch.set_num_threads,
                              initargs=(threads,))


class Parts:
    """Runs `parts` jobs at once, the first on the calling thread and the others on the workers (each with as many
    PyTorch threads as the caller has), and returns their results in order."""

    def __init__(self, parts: int):
        self.parts = parts

    def __call__(self, jobs: list[Callable[[], Any]]) -> list:
        futures = [_pool(self.parts - 1, torch.get_num_threads()).submit(job) for job in jobs[1:]]
        return [jobs[0]()] + [f.result() for f in futures]


def share_optimizer(optimizer: torch.optim.Optimizer, parts: int) -> None:
    """An optimizer with work that parts of a step can share (`run_parts`: Muon's orthogonalisations, AdamW's fused
    update) gets the step's threads for it: on one core each, the tiny recipe's Muon update took about 14 ms against
    21 on one thread, nanoGPT's CPU model's AdamW update 0.55 against 0.68."""
    if hasattr(optimizer, "run_parts"):
        optimizer.run_parts = Parts(parts) if parts > 1 else None


@contextmanager
def step_threads(parts: int) -> Iterator[int]:
    """For a step whose micro-batches `parts` threads share: the calling thread at one part's share of PyTorch's
    threads for the block (the parts, then the update, which is slower for switching back in between), and back
    after it. Yields the share."""
    threads = torch.get_num_threads()
    share = max(1, threads // parts)
    if share != threads:
        torch.set_num_threads(share)
    try:
        yield share
    finally:
        if share != threads:
            torch.set_num_threads(threads)


def shared_backward(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, objective: Callable, loss_cfg,
                    parts: int, scale: float) -> torch.Tensor:
    """The backward of `scale` times the micro-batch's mean loss, its rows shared among `parts` threads: each part's
    loss is the mean over its rows, so the batch's is their mean (equal parts). Returns it, detached."""
    xs, ys = x.chunk(parts), y.chunk(parts)
    return backward_in_parts(model, [lambda i=i: objective(model(xs[i]), ys[i], loss_cfg) / parts
                                     for i in range(parts)], scale)


def backward_in_parts(model: torch.nn.Module, losses: list[Callable[[], torch.Tensor]], scale: float
                      ) -> torch.Tensor:
    """The backward of `scale` times the sum of the parts' losses (each a function computing its part's share of the
    micro-batch's loss), each part's forward and backward on its own thread (Parts: the caller's and
    len(losses) - 1 workers, each with as many PyTorch threads as the caller has), the parts' gradients added to the
    parameters' .grad in an order that cannot change the result. Two parts into empty gradients: each part's
    backward adds its own as it goes (autograd's accumulation is thread-safe, and a + b == b + a, so whichever comes
    first), which keeps the sum off the step's serial tail; otherwise each part's gradients come back from
    torch.autograd.grad and are added in the parts' order. Returns the sum of the losses, detached."""
    params = [p for p in model.parameters() if p.requires_grad]
    in_backward = len(losses) == 2 and all(p.grad is None for p in params)

    def part(loss_of: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, Optional[tuple]]:
        loss = loss_of()
        if in_backward:
            (loss * scale).backward()
            return loss.detach(), None
        return loss.detach(), torch.autograd.grad(loss * scale, params, allow_unused=True)

    results = Parts(len(losses))([functools.partial(part, loss_of) for loss_of in losses])
    if not in_backward:
        for j, p in enumerate(params):
            grads = [grads[j] for _, grads in results if grads[j] is not None]
            if grads:
                total = functools.reduce(torch.add, grads)
                p.grad = total if p.grad is None else p.grad.add_(total)
    return functools.reduce(torch.add, [loss for loss, _ in results])
