"""Evaluation: the loss of every token of a stream (`stream_losses`, which `lmlab surprisal` and the landscape use
too), and the loss, bits/byte, perplexity and accuracy over it; the text a run is measured on, the stride of its
windows and, for a synthetic source, how far the loss is above the source's entropy rate.

Every token after the first is predicted exactly once. Windows of block_size tokens start every `stride` tokens: the
first window scores all its predictions, each later one only those the previous windows did not reach (its last
`stride`). With stride = block_size the windows do not overlap and the first tokens of each are predicted from
almost no context; a smaller stride gives every scored token at least block_size - stride tokens of context, as
published perplexities of fixed-context models are measured, at block_size / stride times the compute.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from .common import LmlabError
from .distributed import Dist, all_reduce_sum
from .loss import Metrics, cross_entropy


def autocast_context(device: torch.device, dtype: torch.dtype):
    if dtype in (torch.float32, torch.float64):
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def window_stride(stride: int, block_size: int) -> int:
    """The stride the evaluation windows use: `stride`, or block_size (non-overlapping) for 0 or anything larger."""
    return block_size if stride <= 0 or stride > block_size else stride


def eval_stride(stride: Optional[int], block_size: int, option: str = "--stride") -> int:
    """The one stride rule, of `lmlab eval --stride`, `lmlab surprisal --stride` and `lmlab train --eval-stride`
    (whose 0, block_size, train passes as such): a stride from 1 to block_size, anything else refused in one line
    that names the option. None: half the context, the default of eval and surprisal."""
    if stride is None:
        return max(1, block_size // 2)
    if not 1 <= stride <= block_size:
        raise LmlabError(f"{option} must be between 1 and the context length {block_size}, got {stride}")
    return stride


def eval_windows(n_tokens: int, block_size: int, max_tokens: int = 0, stride: int = 0):
    """(start, end, first_scored) of each evaluation window over a stream of n_tokens tokens, in order: the window
    predicts tokens start+1 .. end and scores the predictions from first_scored on. Every prediction is scored once.

    stride 0 (or >= block_size): non-overlapping windows. With max_tokens > 0 only the first max_tokens predictions
    are scored (a deterministic prefix).
    """
    n_pred = n_tokens - 1
    if max_tokens > 0:
        n_pred = min(n_pred, max_tokens)
    stride = window_stride(stride, block_size)
    start, scored_to = 0, 0
    while scored_to < n_pred:
        end = min(start + block_size, n_pred)
        yield start, end, scored_to
        start, scored_to = start + stride, end


def eval_batches(tokens: np.ndarray, block_size: int, batch_size: int, max_tokens: int = 0, stride: int = 0):
    """The evaluation windows as (inputs, targets, first scored position) triples, grouped into batches of
    equal-length windows, in order."""
    pending: list[tuple[np.ndarray, np.ndarray, int]] = []
    for start, end, first in eval_windows(len(tokens), block_size, max_tokens, stride):
        window = (np.asarray(tokens[start:end]), np.asarray(tokens[start + 1:end + 1]), first - start)
        if pending and len(window[0]) != len(pending[0][0]):
            yield pending
            pending = []
        pending.append(window)
        if len(pending) == batch_size:
            yield pending
            pending = []
    if pending:
        yield pending


@dataclass
class TokenLosses:
    """Every predicted token of a stream, in order (N of them)."""

    nats: torch.Tensor
    """(N,) float32: -ln p(token), the plain cross-entropy."""
    targets: torch.Tensor
    """(N,) int64: the token ids."""
    correct: torch.Tensor
    """(N,) bool: whether the most likely token was this one."""
    top_probs: torch.Tensor
    """(N, top) float32: the `top` most likely tokens' probabilities at that position, most likely first."""
    top_ids: torch.Tensor
    """(N, top) int64: their ids."""

    def metrics(self, token_bytes: torch.Tensor) -> Metrics:
        """The totals over these tokens; token_bytes holds the UTF-8 length of every id."""
        metrics = Metrics()
        metrics.add(self.nats, self.targets, self.correct, token_bytes.to(self.targets.device))
        return metrics


@torch.no_grad()
def stream_losses(model: torch.nn.Module, tokens: np.ndarray, block_size: int, batch_size: int = 32,
                  max_tokens: int = 0, dtype: torch.dtype = torch.float32, d: Optional[Dist] = None,
                  top: int = 0, stride: int = 0) -> TokenLosses:
    """The loss of every prediction in `tokens` (the first max_tokens when max_tokens > 0), from the windows of
    eval_windows (every `stride` tokens; 0: non-overlapping) in batches of batch_size, with the model in eval mode.

    Data-parallel: rank r scores batches r, r + world, ..., so each rank returns its share. Under FSDP each forward
    is collective, so a rank without a batch in the last round scores a stand-in batch and drops the result.
    """
    return TokenLosses(*_window_columns(model, tokens, block_size, batch_size, max_tokens, dtype, d, stride,
                                        lambda logits, targets: _scored(logits, targets, top)))


@torch.no_grad()
def stream_logprobs(model: torch.nn.Module, tokens, block_size: int, stride: int = 0, top: int = 0,
                    batch_size: int = 32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ln p of every prediction of `tokens` (N,), from stream_losses's windows, and the `top` most likely tokens at
    each position: their ids (N, top) and ln p (N, top), most likely first. All three come from one log_softmax, so
    the ln p of a token that is the most likely equals the first top value exactly (lm-eval's is_greedy compares
    them)."""
    def score(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, ...]:
        logp = logits.float().log_softmax(-1)  # (N, V)
        values, ids = logp.topk(min(top, logp.size(-1)), dim=-1)
        return logp.gather(-1, targets[:, None])[:, 0], ids, values

    return tuple(_window_columns(model, np.asarray(tokens, dtype=np.int64), block_size, batch_size, 0, torch.float32,
                                 None, stride, score))


def _window_columns(model: torch.nn.Module, tokens: np.ndarray, block_size: int, batch_size: int, max_tokens: int,
                    dtype: torch.dtype, d: Optional[Dist], stride: int, score) -> list[torch.Tensor]:
    """score(logits (N, V), targets (N,)) -> columns, over the scored predictions of each batch of windows (see
    stream_losses), each column concatenated over the batches."""
    d = d or Dist()
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    batches = list(eval_batches(tokens, block_size, batch_size, max_tokens, stride))
    rounds = -(-len(batches) // d.world)
    parts = []
    for i in range(rounds * d.world if d.sharded else len(batches)):
        if i % d.world != d.rank:
            continue
        windows = batches[i] if i < len(batches) else batches[0]
        x = torch.from_numpy(np.stack([w[0] for w in windows]).astype(np.int64)).to(device)
        y = torch.from_numpy(np.stack([w[1] for w in windows]).astype(np.int64)).to(device)
        with autocast_context(device, dtype):
            logits = model(x)  # (B, T, V)
        if i < len(batches):
            first = torch.tensor([w[2] for w in windows], device=device)
            keep = (torch.arange(x.size(1), device=device)[None, :] >= first[:, None]).flatten()  # (B*T,)
            parts.append(score(logits.flatten(0, 1)[keep], y.flatten()[keep]))
    model.train(was_training)
    if not parts:  # more ranks than batches: this one scored nothing
        parts.append(score(torch.zeros(0, 1, device=device), torch.zeros(0, dtype=torch.long, device=device)))
    return [torch.cat(column) for column in zip(*parts)]


def _scored(logits: torch.Tensor, targets: torch.Tensor, top: int) -> tuple[torch.Tensor, ...]:
    """TokenLosses' columns for logits (N, V) and targets (N,)."""
    if top:
        probs, ids = logits.float().softmax(-1).topk(min(top, logits.size(-1)), dim=-1)
    else:  # no softmax over the vocabulary that nobody reads
        probs = torch.zeros(len(targets), 0, device=targets.device)
        ids = torch.zeros(len(targets), 0, dtype=torch.long, device=targets.device)
    return cross_entropy(logits, targets, reduction="none"), targets, logits.argmax(-1) == targets, probs, ids


def evaluate(model: torch.nn.Module, tokens: np.ndarray, token_bytes: torch.Tensor, block_size: int,
             batch_size: int = 32, max_tokens: int = 0, dtype: torch.dtype = torch.float32,
             d: Optional[Dist] = None, stride: int = 0) -> Metrics:
    """Metrics over `tokens` (the first max_tokens predictions when max_tokens > 0), from windows every `stride`
    tokens (0: non-overlapping). Data-parallel, every rank returns the metrics of the whole stream (see
    stream_losses)."""
    d = d or Dist()
    losses = stream_losses(model, tokens, block_size, batch_size, max_tokens, dtype, d, stride=stride)
    metrics = losses.metrics(token_bytes)
    if d.world > 1:
        totals = torch.tensor([metrics.nats, metrics.tokens, metrics.bytes, metrics.correct], dtype=torch.float64,
                              device=losses.targets.device)
        all_reduce_sum(totals, d)
        metrics = Metrics(float(totals[0]), int(totals[1]), int(totals[2]), int(totals[3]))
    return metrics


def entropy_excess(source: str, m: Metrics) -> dict:
    """For a source whose entropy rate is known exactly (synthetic:NAME), the rate in nats per token of the text
    scored (nats per character x characters per token; the corpora are ASCII, a byte per character) and the
    model's loss above it; {} for any other text."""
    from .synthetic import entropy_rate, is_synthetic

    if not is_synthetic(source) or not m.tokens:
        return {}
    rate = entropy_rate(source) * m.bytes / m.tokens
    return {"entropy_rate": rate, "excess": m.loss - rate}


def text_tokens(run, data: Optional[str], trust: bool, command: str):
    """The tokens to measure a run on: those of `data`, else the run's validation split, whose corpus paths are
    read only for a run made here, in this folder, or with --trust-data-path (rundir.check_data_paths)."""
    from .data import load_splits, prepare, resolve_source

    if data:
        return prepare(resolve_source(data), run.tokenizer.kind, tokenizer=run.tokenizer).tokens
    saved = run.config.data
    run.run.check_data_paths([("--data", saved.data), ("--data", saved.val_data)], command, trust)
    return load_splits(saved, tokenizer=run.tokenizer).val


def evaluate_run(run, data: Optional[str], stride: Optional[int], batch_size: int, trust: bool,
                 command: str) -> tuple[Metrics, dict]:
    """`lmlab eval`: a loaded run's metrics on `data` (default: its validation split) from windows every `stride`
    tokens (eval_stride, checked before any text is read), and the figures it prints as JSON: loss, bits_per_byte,
    perplexity, accuracy, tokens, stride and, for a synthetic source, entropy_excess's."""
    block = run.model.cfg.block_size
    stride = eval_stride(stride, block)
    tokens = text_tokens(run, data, trust, command)
    if len(tokens) < 2:
        raise LmlabError(f"{data or 'validation split'} has fewer than 2 tokens; nothing to evaluate")
    m = evaluate(run.model, tokens, torch.from_numpy(run.tokenizer.byte_lengths()), block, batch_size, stride=stride)
    saved = run.config.data
    return m, {"loss": m.loss, "bits_per_byte": m.bits_per_byte, "perplexity": m.perplexity, "accuracy": m.accuracy,
               "tokens": m.tokens, "stride": stride, **entropy_excess(data or saved.val_data or saved.data, m)}
