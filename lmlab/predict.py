"""What a trained model predicts, token by token: its distribution over the next token after a prompt (and what
sampling settings keep of it), and the surprisal of every token of a text (the per-token loss that `lmlab eval`
averages). `lmlab next`, `lmlab surprisal` and the playground of `lmlab serve` show them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .data import encode_text
from .evaluate import stream_losses
from .loss import LN2, Metrics
from .sample import prompt_ids, sampling_probs
from .tokenizer import visible


@dataclass
class NextTokenRow:
    rank: int
    token_id: int
    token: str
    """The token's text, made visible (␣ for a space, \\n for a newline)."""
    probability: float
    cumulative: float
    logit: float
    kept: bool
    """Whether the sampling settings keep this token."""
    renormalized: float
    """Its probability after temperature, top-k and top-p (0 when not kept)."""


@torch.no_grad()
def next_token_distribution(model, tokenizer, prompt: str, top: int = 10, temperature: float = 1.0,
                            top_k: int = 0, top_p: float = 1.0,
                            banned: Optional[list[int]] = None) -> list[NextTokenRow]:
    """The model's distribution over the token after `prompt`: the `top` most likely tokens, most likely first.

    `probability` is the plain softmax of the logits; `renormalized` is what sampling with the given temperature,
    top-k and top-p would draw from (temperature 0 keeps only the most likely token), the `banned` ids never
    (sample.generate's: text_banned for a continuation of text).
    """
    ids = prompt_ids(tokenizer, prompt)[-model.cfg.block_size:]
    device = next(model.parameters()).device
    logits = model(torch.tensor([ids], device=device))[0, -1].float().cpu()
    probs = logits.softmax(-1)
    drawn = logits.clone()
    if banned:
        drawn[[i for i in banned if 0 <= i < drawn.numel()]] = float("-inf")
    sampled = sampling_probs(drawn, temperature, top_k, top_p)
    order = torch.argsort(probs, descending=True)[: max(1, top)]
    cumulative = probs[order].cumsum(0)
    rows = []
    for rank, (i, cum) in enumerate(zip(order.tolist(), cumulative.tolist()), start=1):
        rows.append(NextTokenRow(rank, i, visible(tokenizer.decode([i])), float(probs[i]), cum, float(logits[i]),
                                 bool(sampled[i] > 0), float(sampled[i])))
    return rows


@dataclass
class TokenSurprisal:
    token_id: int
    text: str
    nats: float
    top: list[tuple[str, float]]
    """The model's top predictions at this position: (token text, probability)."""

    @property
    def bits(self) -> float:
        return self.nats / LN2


@torch.no_grad()
def surprisal(model, tokenizer, text: str, top: int = 5, batch_size: int = 32,
              stride: int = 0) -> tuple[list[TokenSurprisal], Metrics, str]:
    """Per-token loss of `text`, windowed exactly as `lmlab eval` does with the same stride (so the totals are the
    same numbers; 0: non-overlapping windows).

    Returns the tokens after the first (each with its surprisal and the model's top predictions there), the
    metrics over them, and the text of the first token, which has no prediction.
    """
    ids = encode_text(tokenizer, text)
    if len(ids) < 2:
        from .common import LmlabError

        raise LmlabError("the text needs at least 2 tokens: the first one is the context for the second")
    losses = stream_losses(model, ids, model.cfg.block_size, batch_size, top=top, stride=stride)
    metrics = losses.metrics(torch.from_numpy(tokenizer.byte_lengths()))
    out = [TokenSurprisal(target, tokenizer.decode([target]), nats,
                          [(tokenizer.decode([i]), q) for q, i in zip(probs, top_ids)])
           for target, nats, probs, top_ids in zip(losses.targets.tolist(), losses.nats.tolist(),
                                                   losses.top_probs.tolist(), losses.top_ids.tolist())]
    return out, metrics, tokenizer.decode([int(ids[0])])
