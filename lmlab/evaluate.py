"""Evaluation: loss, bits/byte, perplexity and accuracy of a model over a token stream.

Every token after the first is predicted exactly once, from the non-overlapping block_size window it falls in.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch

from .data import eval_windows
from .loss import Metrics, cross_entropy


def autocast_context(device: torch.device, dtype: torch.dtype):
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


@torch.no_grad()
def evaluate(model: torch.nn.Module, tokens: np.ndarray, token_bytes: torch.Tensor, block_size: int,
             batch_size: int = 32, max_tokens: int = 0, dtype: torch.dtype = torch.float32) -> Metrics:
    """Metrics over `tokens` (the first max_tokens predictions when max_tokens > 0)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    metrics = Metrics()
    token_bytes = token_bytes.to(device)
    pending_x, pending_y = [], []

    def run(xs, ys):
        x = torch.from_numpy(np.stack(xs).astype(np.int64)).to(device)
        y = torch.from_numpy(np.stack(ys).astype(np.int64)).to(device)
        with autocast_context(device, dtype):
            logits, _ = model(x)
        metrics.add(cross_entropy(logits, y, reduction="none"), logits, y, token_bytes)

    for x, y in eval_windows(tokens, block_size, max_tokens):
        if pending_x and len(x) != len(pending_x[0]):
            run(pending_x, pending_y)
            pending_x, pending_y = [], []
        pending_x.append(x)
        pending_y.append(y)
        if len(pending_x) == batch_size:
            run(pending_x, pending_y)
            pending_x, pending_y = [], []
    if pending_x:
        run(pending_x, pending_y)
    model.train(was_training)
    return metrics
