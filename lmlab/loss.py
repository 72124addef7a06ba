"""Cross-entropy of the true next token: the training objective (LossConfig: optional z-loss and label smoothing),
and every metric derived from the same per-token numbers.

Perplexity, bits/token, bits/byte and surprisal are all computed from `cross_entropy(..., reduction="none")`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from .common import LmlabError

LN2 = math.log(2.0)


@dataclass
class LossConfig:
    """The training objective (the logged train_loss); evaluation and val_loss stay plain cross-entropy."""

    objective: Literal["cross_entropy"] = "cross_entropy"
    """What training minimises: cross_entropy, the negative log-likelihood of the next token."""
    z_loss: float = 0.0
    """Weight of logsumexp(logits)^2 per token, which keeps the softmax normaliser near 1 (PaLM; 0: off)."""
    label_smoothing: float = 0.0
    """Share of the target mass spread uniformly over the vocabulary (0: off)."""

    def __post_init__(self) -> None:
        if self.objective != "cross_entropy":
            raise LmlabError(f"--objective must be cross_entropy, got {self.objective!r}")
        if not (math.isfinite(self.z_loss) and self.z_loss >= 0.0):
            raise LmlabError(f"--z-loss must be a number >= 0, got {self.z_loss}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise LmlabError(f"--label-smoothing must be in [0, 1), got {self.label_smoothing}")


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
    flat = logits.reshape(-1, logits.size(-1))
    if flat.dtype in (torch.float16, torch.bfloat16):
        flat = flat.float()
    flat_targets = targets.reshape(-1)
    # PyTorch's fused kernel (log-softmax and the pick of the target in one pass, one backward kernel) takes half
    # the time of logsumexp minus gather; z_loss needs the per-token loss, so it reduces afterwards
    loss = F.cross_entropy(flat, flat_targets, reduction="none" if z_loss else reduction,
                           label_smoothing=label_smoothing)
    if z_loss:
        loss = loss + z_loss * torch.logsumexp(flat, dim=-1).square()
        loss = loss.mean() if reduction == "mean" else loss.sum() if reduction == "sum" else loss
    return loss.view(targets.shape) if reduction == "none" else loss


def training_loss(logits: torch.Tensor, targets: torch.Tensor, cfg: LossConfig) -> torch.Tensor:
    """The mean loss that training minimises, as `cfg` sets it."""
    return cross_entropy(logits, targets, z_loss=cfg.z_loss, label_smoothing=cfg.label_smoothing)


@dataclass
class Metrics:
    """Totals over a set of predicted tokens; every reported figure is derived from them."""

    nats: float = 0.0
    tokens: int = 0
    bytes: int = 0
    correct: int = 0

    def add(self, per_token_nats: torch.Tensor, targets: torch.Tensor, correct: torch.Tensor,
            token_bytes: torch.Tensor) -> None:
        """Count predicted tokens: their losses, ids, whether the most likely token was the target, and the byte
        length of every id."""
        self.nats += float(per_token_nats.double().sum())
        self.tokens += targets.numel()
        self.bytes += int(token_bytes[targets].sum())
        self.correct += int(correct.sum())

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
