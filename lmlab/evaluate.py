"""Evaluation: loss, bits/byte, perplexity and accuracy of a model over a token stream.

Every token after the first is predicted exactly once, from the non-overlapping block_size window it falls in.
"""

from __future__ import annotations

import contextlib
from typing import Optional

import numpy as np
import torch

from .data import eval_windows
from .distributed import Dist, all_reduce_sum
from .loss import Metrics, cross_entropy


def autocast_context(device: torch.device, dtype: torch.dtype):
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def eval_batches(tokens: np.ndarray, block_size: int, batch_size: int, max_tokens: int = 0):
    """The evaluation windows grouped into batches of equal-length windows, in order."""
    pending_x, pending_y = [], []
    for x, y in eval_windows(tokens, block_size, max_tokens):
        if pending_x and len(x) != len(pending_x[0]):
            yield pending_x, pending_y
            pending_x, pending_y = [], []
        pending_x.append(x)
        pending_y.append(y)
        if len(pending_x) == batch_size:
            yield pending_x, pending_y
            pending_x, pending_y = [], []
    if pending_x:
        yield pending_x, pending_y


@torch.no_grad()
def evaluate(model: torch.nn.Module, tokens: np.ndarray, token_bytes: torch.Tensor, block_size: int,
             batch_size: int = 32, max_tokens: int = 0, dtype: torch.dtype = torch.float32,
             d: Optional[Dist] = None) -> Metrics:
    """Metrics over `tokens` (the first max_tokens predictions when max_tokens > 0).

    Data-parallel: batch i is scored by rank i % world and the totals are summed over ranks, so every rank returns
    the metrics of the whole split. Under FSDP each forward is collective, so a rank without a batch in the last
    round scores a stand-in batch and drops the result.
    """
    d = d or Dist()
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    metrics = Metrics()
    token_bytes = token_bytes.to(device)
    batches = list(eval_batches(tokens, block_size, batch_size, max_tokens))
    rounds = -(-len(batches) // d.world)
    for i in range(rounds * d.world if d.sharded else len(batches)):
        if i % d.world != d.rank:
            continue
        xs, ys = batches[i] if i < len(batches) else batches[0]
        x = torch.from_numpy(np.stack(xs).astype(np.int64)).to(device)
        y = torch.from_numpy(np.stack(ys).astype(np.int64)).to(device)
        with autocast_context(device, dtype):
            logits, _ = model(x)
        if i < len(batches):
            metrics.add(cross_entropy(logits, y, reduction="none"), logits, y, token_bytes)
    if d.world > 1:
        totals = torch.tensor([metrics.nats, metrics.tokens, metrics.bytes, metrics.correct], dtype=torch.float64,
                              device=device)
        all_reduce_sum(totals, d)
        metrics = Metrics(float(totals[0]), int(totals[1]), int(totals[2]), int(totals[3]))
    model.train(was_training)
    return metrics
