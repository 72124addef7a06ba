"""Cross-entropy of the true next token: the training objective (LossConfig: optional z-loss and label smoothing,
or the squared-error and top-1-accuracy objectives that `lmlab experiment loss` compares it with), and every metric
derived from the same per-token numbers; a completion's log-probability and the DPO loss built on it.

Perplexity, bits/token, bits/byte and surprisal are all computed from `cross_entropy(..., reduction="none")`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Optional

import torch
import torch.nn.functional as F

from .common import LmlabError

LN2 = math.log(2.0)


@dataclass
class LossConfig:
    """The training objective (the logged train_loss); evaluation and val_loss stay plain cross-entropy."""

    objective: Literal["cross_entropy", "squared_error", "accuracy"] = "cross_entropy"
    """What training minimises: cross_entropy, the negative log-likelihood of the next token; squared_error, the
    squared distance of the predicted probabilities from the one-hot target (Brier score); accuracy, the top-1 error
    rate, whose gradient is zero almost everywhere (`lmlab experiment loss` shows what that means)."""
    z_loss: float = 0.0
    """Weight of logsumexp(logits)^2 per token, which keeps the softmax normaliser near 1 (PaLM; 0: off)."""
    label_smoothing: float = 0.0
    """Share of the target mass spread uniformly over the vocabulary (0: off)."""
    dpo_beta: float = 0.1
    """--stage dpo: how far the preferences may pull the model from the reference (the implicit reward is beta x the
    log-probability ratio to it; smaller lets it move further)."""

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise LmlabError(f"--objective must be one of {', '.join(OBJECTIVES)}, got {self.objective!r}")
        if self.objective != "cross_entropy" and (self.z_loss or self.label_smoothing):
            raise LmlabError("--z-loss and --label-smoothing apply to --objective cross_entropy only")
        if not (math.isfinite(self.z_loss) and self.z_loss >= 0.0):
            raise LmlabError(f"--z-loss must be a number >= 0, got {self.z_loss}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise LmlabError(f"--label-smoothing must be in [0, 1), got {self.label_smoothing}")
        if not (math.isfinite(self.dpo_beta) and self.dpo_beta > 0.0):
            raise LmlabError(f"--dpo-beta must be a number > 0, got {self.dpo_beta}")


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


def squared_error(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The mean over tokens of sum_v (softmax(logits)_v - onehot(target)_v)^2 (the Brier score; 0 to 2).

    logits: (..., V); targets: (...) int64. Its gradient through the softmax fades as p(target) goes to 0, where
    cross-entropy's grows: a confidently wrong prediction is what squared error corrects least.
    """
    flat = logits.reshape(-1, logits.size(-1)).float()
    probs = flat.softmax(-1)  # (N, V)
    onehot = F.one_hot(targets.reshape(-1), flat.size(-1)).to(probs.dtype)
    return (probs - onehot).square().sum(-1).mean()


def top1_error(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """1 - top-1 accuracy, as a function of the logits that autograd differentiates: the share of tokens whose
    target logit is not above every other logit (a tie counts half).

    Each token's margin, target logit minus the largest other logit, goes through a step, (sign(margin) + 1) / 2.
    The step's derivative is zero wherever it is defined, and autograd computes exactly that: every gradient this
    loss sends back is zero. Nudging the weights a little changes no prediction, so it tells descent nothing.
    """
    flat = logits.reshape(-1, logits.size(-1)).float()
    index = targets.reshape(-1, 1)
    target_logit = flat.gather(1, index).squeeze(1)  # (N,)
    best_other = flat.scatter(1, index, float("-inf")).max(-1).values  # (N,)
    correct = (torch.sign(target_logit - best_other) + 1) / 2
    return 1 - correct.mean()


OBJECTIVES = ("cross_entropy", "squared_error", "accuracy")


def training_loss(logits: torch.Tensor, targets: torch.Tensor, cfg: LossConfig) -> torch.Tensor:
    """The mean loss that training minimises, as `cfg` sets it."""
    if cfg.objective == "squared_error":
        return squared_error(logits, targets)
    if cfg.objective == "accuracy":
        return top1_error(logits, targets)
    return cross_entropy(logits, targets, z_loss=cfg.z_loss, label_smoothing=cfg.label_smoothing)


def masked_loss(logits: torch.Tensor, targets: torch.Tensor, cfg: LossConfig, mask: torch.Tensor,
                count: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The fine-tuning loss: cross_entropy per token (reduction "none", with cfg's z-loss and label smoothing),
    summed over the trained targets (mask True) and divided by `count`, by default how many there are: the mean over
    the trained tokens, the others (a user's or system's tokens, padding) adding nothing, not even to the gradient.
    Training passes the count of the whole optimizer step's trained tokens (spread over its micro-batches and
    processes), so that a step's loss is the mean over all of them. Cross-entropy only."""
    if cfg.objective != "cross_entropy":
        raise LmlabError(f"fine-tuning on conversations trains cross_entropy, not {cfg.objective}")
    nats = cross_entropy(logits, targets, reduction="none", z_loss=cfg.z_loss, label_smoothing=cfg.label_smoothing)
    total = torch.where(mask, nats, torch.zeros((), dtype=nats.dtype, device=nats.device)).sum()
    return total / (mask.sum().clamp(min=1) if count is None else count)


def completion_logprob(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """log p(completion | prompt) of each row: the log-probabilities of the targets where mask is True (a
    completion's tokens), summed over the row; the others (the prompt, padding) add nothing, not even to the
    gradient. logits (B, T, V), targets and mask (B, T); returns (B,) in float32 or wider."""
    logp = -cross_entropy(logits, targets, reduction="none")  # (B, T)
    return torch.where(mask, logp, torch.zeros((), dtype=logp.dtype, device=logp.device)).sum(-1)


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, reference_chosen: torch.Tensor,
             reference_rejected: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Direct Preference Optimization (Rafailov et al. 2023) per pair, from the summed completion log-probabilities
    of the policy and of the frozen reference (each (N,)): the implicit rewards r = beta * (log pi - log ref) of the
    chosen and the rejected completion, and the loss -log sigmoid(r_chosen - r_rejected) (logsigmoid: finite for
    any margin). Returns (loss, chosen reward, rejected reward), each (N,); the margin is their difference, and a
    pair counts as preferred when it is > 0."""
    chosen_reward = beta * (policy_chosen - reference_chosen)
    rejected_reward = beta * (policy_rejected - reference_rejected)
    return -F.logsigmoid(chosen_reward - rejected_reward), chosen_reward, rejected_reward


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


# ---------------------------------------------------------------------------------------------------------------
# Reinforcement learning with a verifiable reward (--stage rl): GRPO's objective


def group_advantages(rewards: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Each completion's reward against the others of its group: (r_i - mean(r)) / (std(r) + eps), rewards (P, G)
    for P prompts of G completions each. std is the population's (divided by G, not G - 1: defined for G = 1 too).
    A group whose rewards are all equal teaches nothing and gets zero advantages."""
    mean = rewards.mean(-1, keepdim=True)
    std = rewards.std(-1, keepdim=True, correction=0)
    return (rewards - mean) / (std + eps)


@dataclass
class PolicyLoss:
    """The clipped policy-gradient loss of a batch of completions and what it measured, per completion token."""

    loss: torch.Tensor
    """() the mean over the completion tokens of the batch of the per-token loss (differentiable)."""
    kl: float
    """The mean k3 estimate of KL(policy || reference) per completion token (0 without a reference)."""
    clip_fraction: float
    """The share of completion tokens whose ratio lies outside [1 - clip_eps, 1 + clip_eps] (where the clip acts)."""


def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                clip_eps: float = 0.2, ref_logp: Optional[torch.Tensor] = None, kl_beta: float = 0.0) -> PolicyLoss:
    """GRPO's loss over completion tokens. Per token t of completion i, with ratio = exp(logp - old_logp):

        -min(ratio * A_i, clip(ratio, 1 - clip_eps, 1 + clip_eps) * A_i) + kl_beta * k3,
        k3 = exp(ref_logp - logp) - (ref_logp - logp) - 1   (Schulman's unbiased, never negative KL estimator)

    averaged over every completion token of the batch (the token-level mean of DAPO, not GRPO's mean per completion
    then over completions: a long completion weighs by its length, and a short one is not made louder).
    logp, old_logp, ref_logp: (N, T) log-probabilities of the tokens taken; advantages (N,); mask (N, T) bool, True on
    completion tokens (prompt tokens and padding add nothing, not even to the gradient). With one update per batch,
    old_logp = logp.detach(): the ratio is 1 and the gradient is REINFORCE's, mean over tokens of A_i grad logp."""
    ratio = torch.exp(logp - old_logp)
    adv = advantages[:, None].to(logp.dtype)
    per_token = -torch.minimum(ratio * adv, ratio.clamp(1 - clip_eps, 1 + clip_eps) * adv)
    kl = torch.zeros_like(logp)
    if ref_logp is not None:
        delta = ref_logp.detach() - logp
        kl = torch.exp(delta) - delta - 1
        per_token = per_token + kl_beta * kl
    zero = torch.zeros((), dtype=per_token.dtype, device=per_token.device)
    count = mask.sum().clamp(min=1)
    loss = torch.where(mask, per_token, zero).sum() / count
    clipped = ((ratio - 1).abs() > clip_eps) & mask
    return PolicyLoss(loss, float(torch.where(mask, kl.detach(), zero).sum() / count),
                      float(clipped.sum() / count))
