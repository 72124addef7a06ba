"""Looking inside the model as it trains: attention weights and the residual stream of every layer, head scores on a
repeated random sequence, the loss by position in the window, and the logit lens. Training records them at every
evaluation (one line of inside.jsonl); `lmlab inside` and the report read them.

Everything here comes from the model's own forward, through its hook points (model.capture): the training forward
uses fused attention, which never forms the weights, and a capture asks it to write them out.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Optional, Union

import numpy as np
import torch
import torch.nn as nn

from .common import LmlabError, json_safe
from .evaluate import eval_windows, stream_losses
from .loss import cross_entropy

SCORES = ("previous_token", "induction", "duplicate_token")
REPEAT_LENGTH = 32  # the random sequence is at most this long (and at most block_size/2 and the vocabulary size)
REPEAT_SEQUENCES = 4  # scores and repeat losses average over this many random sequences
ATTENTION_TOKENS = 32  # attention patterns keep the last this many tokens of each probe prompt
LENS_TOP = 5  # predictions per layer in the logit lens
POSITION_TOKENS = 8192  # validation predictions behind the loss by position (64 windows of 128 tokens)


# ---------------------------------------------------------------------------------------------------------------
# One forward, captured


@dataclass
class Trace:
    """What a forward pass computes on the way, for a batch of B sequences of T tokens through L layers."""

    logits: torch.Tensor
    """(B, T, V): the model's own output."""
    attention: list[torch.Tensor]
    """L tensors (B, H, T, T): row t is how much position t attends to each position (zero after t)."""
    residual: list[torch.Tensor]
    """L + 1 tensors (B, T, C): the stream before the first block (the embeddings) and after each block."""


def has_layers(model: nn.Module) -> bool:
    """Whether the model has attention layers to look into (the bigram has none)."""
    return "blocks.0.attn.weights" in model.hook_points()


@torch.no_grad()
def trace(model: nn.Module, idx: torch.Tensor) -> Trace:
    """Run a GPT on idx (B, T) once, keeping each layer's attention weights and residual stream: model(idx) in
    eval mode, with the attention written out instead of fused (the same logits, to rounding)."""
    layers = range(model.cfg.n_layer)
    weights = [f"blocks.{i}.attn.weights" for i in layers]
    streams = ["blocks.0.resid_in"] + [f"blocks.{i}.resid_out" for i in layers]
    with model.capture(*weights, *streams, "logits") as seen:
        model(idx)
    return Trace(seen["logits"], [seen[name] for name in weights], [seen[name] for name in streams])


def logit_lens(model: nn.Module, stream: torch.Tensor) -> torch.Tensor:
    """The logits the model would give if its blocks ended here: the final norm and the head applied to a residual
    stream (B, T, C). On the last layer's stream these are the model's own logits."""
    return model.head(stream)


# ---------------------------------------------------------------------------------------------------------------
# Scores


def repeated_sequences(vocab_size: int, length: int, count: int, seed: int = 0) -> torch.Tensor:
    """(count, 2 * length) token ids: a random sequence of `length` tokens followed by itself, count times. The
    tokens of a sequence are distinct where the vocabulary allows, so each has one earlier occurrence to find."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(count):
        if length <= vocab_size:
            first = torch.randperm(vocab_size, generator=gen)[:length]
        else:
            first = torch.randint(vocab_size, (length,), generator=gen)
        rows.append(torch.cat([first, first]))
    return torch.stack(rows)


def head_scores(weights: torch.Tensor, length: int) -> dict[str, torch.Tensor]:
    """Scores of every head from its attention weights (B, H, 2L, 2L) on sequences of L tokens repeated twice, each
    a mean over the batch and the positions, (H,):
    - previous_token: attention from position t to t-1 (t = 1 .. 2L-1);
    - induction: from L+i to i+1, the token after the earlier occurrence of the current one (i = 0 .. L-1);
    - duplicate_token: from L+i to i, the earlier occurrence itself (i = 0 .. L-1)."""
    t = torch.arange(1, 2 * length, device=weights.device)
    i = torch.arange(length, device=weights.device)
    return {
        "previous_token": weights[:, :, t, t - 1].mean((0, 2)),
        "induction": weights[:, :, length + i, i + 1].mean((0, 2)),
        "duplicate_token": weights[:, :, length + i, i].mean((0, 2)),
    }


def repeat_losses(logits: torch.Tensor, idx: torch.Tensor, length: int) -> tuple[float, float]:
    """(first, second): the mean loss on tokens 1..L-1 of the first copy and on tokens L+1..2L-1 of the second,
    from logits (B, 2L, V) of sequences idx (B, 2L). Token L, the start of the copy, is in neither: nothing says
    yet that a copy begins there."""
    nats = cross_entropy(logits[:, :-1].flatten(0, 1), idx[:, 1:].flatten(), reduction="none").view(idx.size(0), -1)
    return float(nats[:, : length - 1].mean()), float(nats[:, length:].mean())


def loss_by_position(model: nn.Module, tokens: np.ndarray, block_size: int, batch_size: int = 32,
                     max_tokens: int = 0) -> tuple[list[float], list[int]]:
    """(mean loss, number of predictions) at each position of the window, over the evaluation windows of `tokens`
    (the same windows and predictions as evaluate with these arguments): position p predicts from p+1 tokens. The
    lists stop at the last position that some window reaches."""
    losses = stream_losses(model, tokens, block_size, batch_size=batch_size, max_tokens=max_tokens)
    positions = torch.from_numpy(np.concatenate([np.arange(first - start, end - start) for start, end, first
                                                 in eval_windows(len(tokens), block_size, max_tokens)]))
    count = torch.bincount(positions, minlength=block_size)
    total = torch.zeros(block_size, dtype=torch.float64).index_add_(0, positions, losses.nats.double().cpu())
    seen = int((count > 0).sum())  # windows are filled from position 0, so a shorter text has fewer positions
    return (total[:seen] / count[:seen]).tolist(), count[:seen].tolist()


# ---------------------------------------------------------------------------------------------------------------
# What training records at each evaluation


def _round(values, digits: int):
    if isinstance(values, torch.Tensor):
        values = values.tolist()
    if isinstance(values, list):
        return [_round(v, digits) for v in values]
    return round(values, digits) if math.isfinite(values) else values


class InsideRecorder:
    """Builds the inside.jsonl record of an evaluation; its inputs are fixed at the start, so records compare over
    training: the probe prompts, random sequences drawn from a fixed seed, and the first POSITION_TOKENS predictions
    of the validation split."""

    def __init__(self, tokenizer, prompts: list[Union[str, list[int]]], val_tokens: np.ndarray, block_size: int,
                 batch_size: int):
        """prompts: texts, or token ids (shown decoded)."""
        self.tokenizer = tokenizer
        keep = min(ATTENTION_TOKENS, block_size)
        encoded = [(p, tokenizer.encode(p)) if isinstance(p, str) else (tokenizer.decode(p), list(p)) for p in prompts]
        self.prompts = [(p, ids[-keep:]) for p, ids in encoded if ids]
        self.val_tokens, self.block_size, self.batch_size = val_tokens, block_size, batch_size
        ordinary = torch.from_numpy(tokenizer.ordinary_ids())  # special tokens never occur in the text
        self.length = min(block_size // 2, len(ordinary), REPEAT_LENGTH)
        self.repeated = ordinary[repeated_sequences(len(ordinary), self.length, REPEAT_SEQUENCES)]

    @torch.no_grad()
    def record(self, model: nn.Module, step: int) -> dict:
        start = time.perf_counter()
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        looked_inside = has_layers(model)
        record: dict = {"step": step}
        idx = self.repeated.to(device)
        if looked_inside:
            seen = trace(model, idx)
            scores = [head_scores(w, self.length) for w in seen.attention]
            record["heads"] = {name: _round([s[name] for s in scores], 4) for name in SCORES}
            logits = seen.logits
        else:
            logits = model(idx)
        first, second = repeat_losses(logits, idx, self.length)
        record["repeat_loss"] = {"first": round(first, 4), "second": round(second, 4), "length": self.length}
        loss, count = loss_by_position(model, self.val_tokens, self.block_size, self.batch_size, POSITION_TOKENS)
        record["loss_by_position"] = {"loss": _round(loss, 4), "count": count}
        if looked_inside:
            record["attention"], record["lens"] = [], []
            for prompt, ids in self.prompts:
                seen = trace(model, torch.tensor([ids], device=device))
                percent = [(100 * w[0]).round().int().tolist() for w in seen.attention]  # (H, T, T) per layer
                record["attention"].append({
                    "prompt": prompt, "tokens": [self.tokenizer.decode([i]) for i in ids],
                    "percent": [[[row[: q + 1] for q, row in enumerate(head)] for head in layer] for layer in percent]})
                record["lens"].append({"prompt": prompt, "top": [self.top(logit_lens(model, r[0, -1]))
                                                                 for r in seen.residual]})
        model.train(was_training)
        record["seconds"] = round(time.perf_counter() - start, 4)
        return record

    def top(self, logits: torch.Tensor) -> list:
        probs, ids = logits.float().softmax(-1).topk(min(LENS_TOP, logits.numel()))
        return [[self.tokenizer.decode([int(i)]), round(float(p), 4)] for p, i in zip(probs, ids)]


# ---------------------------------------------------------------------------------------------------------------
# Reading the records back (lmlab inside, the report)


def at_step(records: list[dict], step: Optional[int]) -> list[dict]:
    """The records of one step (all of them when step is None); a step that was not recorded is an error that
    names those that were."""
    if step is None:
        return records
    chosen = [r for r in records if r["step"] == step]
    if not chosen:
        steps = [r["step"] for r in records]
        shown = ", ".join(map(str, steps[:20])) + (", ..." if len(steps) > 20 else "")
        raise LmlabError(f"no inside record at step {step}; recorded steps: {shown or 'none'}")
    return chosen


def head_rows(records: list[dict]) -> list[dict]:
    """One row per recorded step, layer and head: {step, layer, head, previous_token, induction, duplicate_token}."""
    rows = []
    for r in records:
        heads = r.get("heads") or {}
        grids = [heads.get(name) or [] for name in SCORES]
        for layer, per_head in enumerate(zip(*grids)):
            for head, values in enumerate(zip(*per_head)):
                rows.append({"step": r["step"], "layer": layer, "head": head, **dict(zip(SCORES, values))})
    return rows


def summary(records: list[dict]) -> dict:
    """What `lmlab inside --json` prints: head scores, repeat losses and loss by position of these records."""
    return json_safe({
        "heads": head_rows(records),
        "repeat_loss": [{"step": r["step"], "first": r["repeat_loss"].get("first"),
                         "second": r["repeat_loss"].get("second")} for r in records if "repeat_loss" in r],
        "loss_by_position": [{"step": r["step"], "loss": r["loss_by_position"].get("loss")}
                             for r in records if "loss_by_position" in r],
    })


def head_table(record: dict) -> str:
    """The head scores of one record as a text table, with its repeat losses."""
    rows = head_rows([record])
    lines = [f"step {record['step']}: attention scores on a random sequence repeated twice"]
    if rows:
        lines.append(f"{'layer':>5} {'head':>4} {'previous':>9} {'induction':>9} {'duplicate':>9}")
        for row in rows:
            lines.append(f"{row['layer']:>5} {row['head']:>4} {row['previous_token']:>9.3f} {row['induction']:>9.3f} "
                         f"{row['duplicate_token']:>9.3f}")
    else:
        lines.append("  (no attention heads recorded)")
    repeat = record.get("repeat_loss")
    if repeat:
        lines.append(f"loss on the first copy {repeat.get('first', math.nan):.3f}, on the second "
                     f"{repeat.get('second', math.nan):.3f} nats/token (sequences of {repeat.get('length')} tokens)")
    return "\n".join(lines)
