"""Cross-entropy of the true next token, and every metric derived from the same per-token numbers.

Perplexity, bits/token, bits/byte and surprisal are all computed from `cross_entropy(..., reduction="none")`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

LN2 = math.log(2.0)


def cross_entropy(
    logits: torch.Tensor,
    targets: torch.Tensor,
    reduction: Literal["mean", "sum", "none"] = "mean",
    z_loss: float = 0.0,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Negative log-likelihood (nats) of `targets` under softmax(`logits`).

    logits: (..., V); targets: (...) int64. reduction "none" returns one loss per token, shaped like targets.
    z_loss adds z_loss * logsumexp(logits)^2 per token, which keeps the softmax normaliser near 1 (PaLM).
    label_smoothing mixes the one-hot target with a uniform distribution over the vocabulary.
    Half-precision logits are upcast to float32; float32 and float64 keep their precision.
    """
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be mean, sum or none, got {reduction!r}")
    vocab = logits.size(-1)
    flat = logits.reshape(-1, vocab)
    if flat.dtype in (torch.float16, torch.bfloat16):
        flat = flat.float()
    flat_targets = targets.reshape(-1)
    log_norm = torch.logsumexp(flat, dim=-1)  # (N,)
    target_logit = flat.gather(1, flat_targets[:, None]).squeeze(1)
    loss = log_norm - target_logit  # -log p(target)
    if label_smoothing > 0.0:
        uniform = log_norm - flat.mean(dim=-1)  # mean over the vocabulary of -log p(v)
        loss = (1.0 - label_smoothing) * loss + label_smoothing * uniform
    if z_loss > 0.0:
        loss = loss + z_loss * log_norm.square()
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    return loss.view(targets.shape)


def fast_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy through PyTorch's fused kernel (the training hot path, no extras)."""
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1))


@dataclass
class Metrics:
    """Totals over a set of predicted tokens; every reported figure is derived from them."""

    nats: float = 0.0
    tokens: int = 0
    bytes: int = 0
    correct: int = 0

    def add(self, per_token_nats: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor, token_bytes: torch.Tensor) -> None:
        self.nats += float(per_token_nats.double().sum())
        self.tokens += targets.numel()
        self.bytes += int(token_bytes[targets].sum())
        self.correct += int((logits.argmax(dim=-1) == targets).sum())

    @property
    def loss(self) -> float:
        """Mean nats per token."""
        return self.nats / max(self.tokens, 1)

    @property
    def bits_per_token(self) -> float:
        return self.loss / LN2

    @property
    def bits_per_byte(self) -> float:
        """Total bits over the UTF-8 bytes of the predicted text: comparable across tokenizers."""
        return self.nats / LN2 / max(self.bytes, 1)

    @property
    def perplexity(self) -> float:
        return math.exp(min(self.loss, 700.0))

    @property
    def accuracy(self) -> float:
        return self.correct / max(self.tokens, 1)

    def as_dict(self) -> dict:
        return {
            "loss": self.loss,
            "bits_per_token": self.bits_per_token,
            "bits_per_byte": self.bits_per_byte,
            "perplexity": self.perplexity,
            "accuracy": self.accuracy,
            "tokens": self.tokens,
            "bytes": self.bytes,
        }
