"""Gradient descent: SGD (with momentum / Nesterov), AdamW and Muon, learning-rate schedules, clipping.

The update rules are written out here (multi-tensor `_foreach` ops for speed); tests check SGD, momentum and AdamW
against `torch.optim` step by step.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, Literal, Optional

import torch
import torch.nn as nn

from .common import LmlabError
from .distributed import full_tensor, is_sharded, like
from .model import is_hidden_matrix, unique_parameters


@dataclass
class OptimConfig:
    """The optimizer and learning-rate schedule."""

    optimizer: Literal["sgd", "momentum", "adamw", "muon"] = "adamw"
    """sgd; momentum (heavy ball, --nesterov for Nesterov); adamw; muon (hidden matrices, AdamW for the rest)."""
    lr: Optional[float] = 3e-3
    """Peak learning rate (for muon: of the AdamW part; None: picked for the time budget)."""
    muon_lr: float = 0.02
    """Peak learning rate of Muon's hidden-matrix updates."""
    weight_decay: Optional[float] = 0.1
    """Decoupled weight decay, applied to matrices only (not to norms or biases; None: picked for the time budget)."""
    beta1: float = 0.9
    """AdamW first-moment decay."""
    beta2: float = 0.95
    """AdamW second-moment decay."""
    eps: float = 1e-8
    """AdamW denominator epsilon."""
    momentum: float = 0.9
    """Momentum of SGD-momentum (Muon uses muon_momentum)."""
    muon_momentum: Optional[float] = 0.95
    """Momentum of Muon (None: picked for the time budget)."""
    nesterov: bool = False
    """Use Nesterov momentum with --optimizer momentum."""
    schedule: Literal["constant", "cosine", "wsd"] = "wsd"
    """constant; cosine (decay over the whole budget); wsd (warmup, stable, then linear decay at the end)."""
    warmup: int = 50
    """Linear warmup steps."""
    warmup_fraction: float = 0.1
    """With --max-time, warmup also ends once this share of the time budget is done, so short budgets are not all
    warmup (0: off). Step budgets ignore it, so extending a run's --max-steps on resume changes nothing before."""
    decay_fraction: float = 0.4
    """wsd: share of the budget spent decaying."""
    decay_shape: Literal["linear", "sqrt", "cosine"] = "linear"
    """wsd: shape of the decay, with t from 0 to 1 across it: 1 - t (linear), 1 - sqrt(t), or (1 + cos(pi t)) / 2."""
    final_lr_frac: float = 0.0
    """Learning rate at the end of the budget, as a fraction of the peak."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value (0 turns clipping off)."""

    def __post_init__(self) -> None:
        if (self.lr is not None and self.lr <= 0) or self.muon_lr <= 0:
            raise LmlabError(f"--lr must be positive, got {self.lr}")
        if self.warmup < 0:
            raise LmlabError(f"--warmup must be >= 0, got {self.warmup}")
        if not 0.0 <= self.warmup_fraction <= 1.0:
            raise LmlabError(f"--warmup-fraction must be in [0, 1], got {self.warmup_fraction}")
        if not 0.0 <= self.decay_fraction <= 1.0:
            raise LmlabError(f"--decay-fraction must be in [0, 1], got {self.decay_fraction}")
        if self.grad_clip < 0 or (self.weight_decay is not None and self.weight_decay < 0):
            raise LmlabError("--grad-clip and --weight-decay must be >= 0")

    def unset(self) -> list[str]:
        """The settings left for the budget rules to choose (None)."""
        return [name for name in ("lr", "muon_momentum", "weight_decay") if getattr(self, name) is None]


# ---------------------------------------------------------------------------------------------------------------
# Schedules: pure functions of the step and of the share of the budget done


DECAY_SHAPES = {  # the wsd decay: the share of the peak left at t in [0, 1] of the decay
    "linear": lambda t: 1.0 - t,
    "sqrt": lambda t: 1.0 - math.sqrt(t),
    "cosine": lambda t: 0.5 * (1.0 + math.cos(math.pi * t)),
}


def lr_multiplier(
    schedule: str, step: int, progress: float, warmup: int = 0, decay_fraction: float = 0.4, final_frac: float = 0.0,
    warmup_fraction: float = 0.0, decay_shape: str = "linear",
) -> float:
    """Multiplier of the peak learning rate at optimizer step `step` (0-based), `progress` in [0, 1] of the budget.

    Warmup is linear over `warmup` steps, or over `warmup_fraction` of the budget when that comes first.
    """
    progress = min(max(progress, 0.0), 1.0)
    warm = (step + 1) / warmup if step < warmup else 1.0
    if warmup_fraction > 0 and warm < 1.0:
        warm = min(1.0, max(warm, progress / warmup_fraction))
    if schedule == "constant":
        shape = 1.0
    elif schedule == "cosine":
        shape = final_frac + (1.0 - final_frac) * 0.5 * (1.0 + math.cos(math.pi * progress))
    elif schedule == "wsd":
        start = 1.0 - decay_fraction
        if progress <= start or decay_fraction == 0.0:
            shape = 1.0
        else:
            shape = final_frac + (1.0 - final_frac) * DECAY_SHAPES[decay_shape]((progress - start) / decay_fraction)
    else:
        raise LmlabError(f"unknown schedule {schedule!r}; use constant, cosine or wsd")
    return warm * shape


# ---------------------------------------------------------------------------------------------------------------
# Optimizers


def _undecorated(method):
    return getattr(method, "__wrapped__", method)


class Optimizer(torch.optim.Optimizer):
    """torch.optim.Optimizer, calling its methods as written. torch wraps add_param_group, zero_grad, state_dict and
    load_state_dict so that torch.compile does not trace them, and the wrapper imports torch._dynamo on its first
    call: about 70 MB of memory (a fifth of a small CPU run's peak) in a process that compiles nothing. lmlab never
    compiles an optimizer, so it needs no wrapper."""

    add_param_group = _undecorated(torch.optim.Optimizer.add_param_group)
    zero_grad = _undecorated(torch.optim.Optimizer.zero_grad)
    state_dict = _undecorated(torch.optim.Optimizer.state_dict)
    load_state_dict = _undecorated(torch.optim.Optimizer.load_state_dict)


class SGD(Optimizer):
    """p -= lr * (g + wd p), with optional heavy-ball or Nesterov momentum (torch.optim.SGD's convention)."""

    def __init__(self, params, lr: float, momentum: float = 0.0, nesterov: bool = False, weight_decay: float = 0.0):
        super().__init__(params, dict(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            if group["weight_decay"]:
                grads = torch._foreach_add(grads, params, alpha=group["weight_decay"])
            mu = group["momentum"]
            if mu:
                bufs = []
                for p, g in zip(params, grads):
                    state = self.state[p]
                    if "momentum_buffer" not in state:
                        state["momentum_buffer"] = g.clone()  # the first step takes the gradient as is
                    else:
                        state["momentum_buffer"].mul_(mu).add_(g)
                    bufs.append(state["momentum_buffer"])
                grads = torch._foreach_add(grads, bufs, alpha=mu) if group["nesterov"] else bufs
            torch._foreach_add_(params, grads, alpha=-group["lr"])


class AdamW(Optimizer):
    """Adam with decoupled weight decay (Loshchilov & Hutter), bias-corrected, as torch.optim.AdamW computes it."""

    def __init__(self, params, lr: float, betas=(0.9, 0.95), eps: float = 1e-8, weight_decay: float = 0.0):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.run_parts: Optional[Any] = None
        """threads.Parts, set by threads.share_optimizer when a step's rows are shared among threads: the fused
        update of a large group is then cut among them (each element's update is the same wherever it runs)."""

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            adamw_update(self, group, [p for p in group["params"] if p.grad is not None], self.run_parts)


SHARE_FROM = 1 << 16
"""Elements per thread below which AdamW's fused update is not cut among threads: a thread's turn costs tens of
microseconds, about what one core takes for that many elements of AdamW."""


def cut(tensors: list[torch.Tensor], parts: int) -> list[list[int]]:
    """The indices of `tensors` in at most `parts` runs in order, of about equal numbers of elements each (fewer
    runs where there are too few elements to be worth sharing: SHARE_FROM each)."""
    sizes = [t.numel() for t in tensors]
    parts = max(1, min(parts, len(tensors), sum(sizes) // SHARE_FROM))
    runs, total, done = [[]], sum(sizes), 0
    for i, n in enumerate(sizes):
        if runs[-1] and len(runs) < parts and done + n / 2 > total * len(runs) / parts:
            runs.append([])
        runs[-1].append(i)
        done += n
    return runs


def shared(run_parts: Optional[Any], tensors: list[torch.Tensor], job) -> list:
    """job(indices) for runs of `tensors` (cut), at once on run_parts' threads where that pays; the results in
    order."""
    runs = cut(tensors, run_parts.parts) if run_parts is not None else [list(range(len(tensors)))]
    if len(runs) == 1:
        return [job(runs[0])]
    return run_parts([functools.partial(job, run) for run in runs])


def adamw_update(opt: torch.optim.Optimizer, group: dict, params: list[torch.Tensor],
                 run_parts: Optional[Any] = None) -> None:
    """One AdamW step of `group`'s `params` (those with a gradient). run_parts (threads.Parts): the fused kernel's
    work cut among its threads."""
    if not params:
        return
    lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
    grads = [p.grad for p in params]
    exp_avgs, exp_avg_sqs = [], []
    for p in params:
        state = opt.state[p]
        if not state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(p)
            state["exp_avg_sq"] = torch.zeros_like(p)
        state["step"] += 1
        exp_avgs.append(state["exp_avg"])
        exp_avg_sqs.append(state["exp_avg_sq"])
    steps = [opt.state[p]["step"] for p in params]  # per parameter: one without a gradient skips a step
    if _fusable(params):  # the same update in one fused PyTorch kernel: about 5x faster than the steps below on CPU
        if len(set(steps)) == 1:  # the usual case: one tensor read by every parameter's update (the kernel only reads)
            step_tensors = [torch.tensor(float(steps[0]), device=params[0].device)] * len(params)
        else:
            step_tensors = [torch.tensor(float(s), device=p.device) for s, p in zip(steps, params)]

        def fused(run: list[int]) -> None:
            torch._fused_adamw_(*([lst[i] for i in run] for lst in (params, grads, exp_avgs, exp_avg_sqs)), [],
                                [step_tensors[i] for i in run], lr=lr, beta1=beta1, beta2=beta2, weight_decay=wd,
                                eps=eps, amsgrad=False, maximize=False)

        shared(run_parts, params, fused)
        return
    # The definition (and the path for sharded FSDP parameters): decoupled decay, moments, bias-corrected step.
    if wd:
        torch._foreach_mul_(params, 1.0 - lr * wd)
    torch._foreach_lerp_(exp_avgs, grads, 1.0 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1.0 - beta2)
    denom = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(denom, [math.sqrt(1.0 - beta2**s) for s in steps])
    torch._foreach_add_(denom, eps)
    torch._foreach_addcdiv_(params, exp_avgs, denom, [-lr / (1.0 - beta1**s) for s in steps])


FUSED = hasattr(torch, "_fused_adamw_")  # tests switch it off to check the fused kernel against the definition


def _fusable(params: list[torch.Tensor]) -> bool:
    """Plain tensors of one device and dtype: what PyTorch's fused AdamW kernel takes (not FSDP's DTensors)."""
    return (FUSED and params[0].device.type in ("cpu", "cuda") and not any(is_sharded(p) for p in params)
            and len({(p.device, p.dtype) for p in params}) == 1)


NS_COEFFS = (3.4445, -4.7750, 2.0315)


def orthogonalize(g: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """Approximately replace G = U S V^T by U V^T with a quintic Newton-Schulz iteration (Muon, K. Jordan 2024).

    The coefficients (3.4445, -4.7750, 2.0315) push every singular value of the normalised matrix towards ~1 fast.
    g: (rows, cols) or a stack (n, rows, cols) of same-shaped matrices, each orthogonalised on its own.
    On CUDA the iteration runs in bf16 (as written out in `newton_schulz`); in fp32/fp64 it runs on the small Gram
    matrix (`gram_newton_schulz`), the same polynomial with about half the arithmetic for non-square matrices.
    """
    if g.is_cuda:
        x = g.bfloat16()
    else:  # fp64 stays fp64 (the tests' exact reference); anything else runs in fp32
        x = g if g.dtype == torch.float64 else g.float()
    transposed = x.size(-2) > x.size(-1)
    if transposed:  # work with the wide orientation: X X^T is the smaller Gram matrix
        x = x.mT
    x = x / (torch.linalg.matrix_norm(x, keepdim=True) + 1e-7)
    x = newton_schulz(x, steps) if x.dtype == torch.bfloat16 else gram_newton_schulz(x, steps)
    if transposed:
        x = x.mT
    return x.to(g.dtype)


def newton_schulz(x: torch.Tensor, steps: int) -> torch.Tensor:
    """The iteration as defined: X <- a X + (b A + c A^2) X with A = X X^T. x: (..., m, n), m <= n, norm <= 1."""
    a, b, c = NS_COEFFS
    for _ in range(steps):
        A = x @ x.mT
        B = b * A + c * A @ A
        x = a * x + B @ x
    return x


def gram_newton_schulz(x: torch.Tensor, steps: int) -> torch.Tensor:
    """`newton_schulz` carried out on m x m matrices: every iterate is X_k = R_k X_0 with R_k a polynomial in
    G_0 = X_0 X_0^T, so all the factors commute. With P_k = a I + b G_k + c G_k^2:
    R_{k+1} = P_k R_k and G_{k+1} = X_{k+1} X_{k+1}^T = P_k G_k P_k; X_0 is touched only twice (G_0 and R X_0).
    Equal to the plain iteration in exact arithmetic (tests: 1e-10 in fp64); in fp32 it is meant for updates,
    where an error of ~2e-4 on ill-conditioned inputs (entries ~0.2) is far below the gradient noise.
    """
    a, b, c = NS_COEFFS
    G = x @ x.mT
    R = None
    for k in range(steps):
        P = torch.baddbmm(G, G, G, beta=b, alpha=c) if G.dim() == 3 else torch.addmm(G, G, G, beta=b, alpha=c)
        P.diagonal(dim1=-2, dim2=-1).add_(a)
        R = P if R is None else P @ R
        if k < steps - 1:
            G = P @ G @ P
    return R @ x if R is not None else x


class Muon(Optimizer):
    """Muon for 2-D hidden matrices (groups with use_muon=True), AdamW for everything else.

    Muon: momentum buffer m <- mu m + g; update = orthogonalize(g + mu m) (Nesterov), scaled by
    sqrt(max(1, rows/cols)); p <- p (1 - lr wd) - lr update. Matrices of the same shape, or of its transpose, are
    orthogonalised together as one batch, which is the same arithmetic with far fewer kernel launches.
    """

    def __init__(self, param_groups, lr: float, betas=(0.9, 0.95), eps: float = 1e-8, weight_decay: float = 0.0,
                 momentum: float = 0.95):
        super().__init__(param_groups, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                            momentum=momentum, use_muon=False))
        self.run_parts: Optional[Any] = None
        """threads.Parts (its `parts` threads run a list of that many jobs at once and return their results in
        order), set by threads.share_optimizer when a step's rows are shared among threads: each stack's matrices
        are then orthogonalised in as many parts, at once. None: one after another."""

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not group["use_muon"]:
                adamw_update(self, group, params, self.run_parts)
                continue
            lr, wd, mu = group["lr"], group["weight_decay"], group["momentum"]
            bufs = []
            for p in params:
                state = self.state[p]
                if not state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                bufs.append(state["momentum_buffer"])
            grads = [p.grad for p in params]
            torch._foreach_mul_(bufs, mu)
            torch._foreach_add_(bufs, grads)
            nesterov = torch._foreach_add(grads, bufs, alpha=mu)
            if wd:
                torch._foreach_mul_(params, 1.0 - lr * wd)
            by_shape: dict[tuple, list[int]] = {}  # (m, n) and (n, m) together: a tall matrix goes in transposed
            for i, p in enumerate(params):
                by_shape.setdefault(tuple(sorted(p.shape)), []).append(i)
            for idx in by_shape.values():
                # FSDP: orthogonalisation needs whole matrices, so gather each once, then keep this rank's shard
                full = [full_tensor(nesterov[i]) for i in idx]
                tall = [u.size(0) > u.size(1) for u in full]
                stacked = self._orthogonalize(torch.stack([u.mT if t else u for u, t in zip(full, tall)]))
                for i, u, t in zip(idx, stacked.unbind(0), tall):
                    scale = math.sqrt(max(1.0, params[i].size(0) / params[i].size(1)))
                    params[i].add_(like(params[i], u.mT if t else u), alpha=-lr * scale)

    def _orthogonalize(self, stack: torch.Tensor) -> torch.Tensor:
        """The stack orthogonalised, each matrix on its own: at once, or with run_parts cut into as many parts as
        there are threads (as many as it has matrices, at most), each thread taking one."""
        parts = min(len(stack), self.run_parts.parts) if self.run_parts is not None else 1
        if parts <= 1:
            return orthogonalize(stack)
        pieces = stack.tensor_split(parts)
        return torch.cat(self.run_parts([lambda piece=piece: orthogonalize(piece) for piece in pieces]))


def param_groups(model: nn.Module, weight_decay: float, split_hidden: bool = False) -> list[dict]:
    """Matrices get weight decay, vectors (norm gains, biases) do not. With split_hidden, the 2-D weights inside
    transformer blocks form their own group (for Muon); embeddings and the head stay with AdamW."""
    hidden, decay, no_decay = [], [], []
    for name, p in unique_parameters(model):
        if not p.requires_grad:
            continue
        if split_hidden and is_hidden_matrix(name, p):
            hidden.append(p)
        elif p.dim() >= 2:
            decay.append(p)
        else:
            no_decay.append(p)
    groups = [
        {"params": decay, "weight_decay": weight_decay, "name": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"},
    ]
    if split_hidden:
        groups.append({"params": hidden, "weight_decay": weight_decay, "use_muon": True, "name": "muon"})
    return [g for g in groups if g["params"]]


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    if cfg.unset():
        raise LmlabError(f"the optimizer's {', '.join(cfg.unset())} are left to the budget rules; apply them first "
                         f"(lmlab.budget.apply_budget)")
    if cfg.optimizer == "muon":
        groups = param_groups(model, cfg.weight_decay, split_hidden=True)
        for g in groups:
            g["lr"] = peak_lr(cfg, g)
        return Muon(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, momentum=cfg.muon_momentum)
    groups = param_groups(model, cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
    if cfg.optimizer == "sgd":
        return SGD(groups, lr=cfg.lr)
    if cfg.optimizer == "momentum":
        return SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov)
    raise LmlabError(f"unknown optimizer {cfg.optimizer!r}; use sgd, momentum, adamw or muon")


def peak_lr(cfg: OptimConfig, group: dict) -> float:
    """A parameter group's peak learning rate, from the config (the one place it lives): Muon's for the hidden
    matrices it updates, --lr for the rest."""
    return cfg.muon_lr if group.get("use_muon") else cfg.lr


def set_lr(optimizer: torch.optim.Optimizer, cfg: OptimConfig, multiplier: float) -> None:
    """Every group at its peak learning rate times `multiplier` (the schedule's, times any rollback's cut)."""
    for group in optimizer.param_groups:
        group["lr"] = peak_lr(cfg, group) * multiplier


def clip_grad_norm(params, max_norm: float) -> torch.Tensor:
    """Global L2 norm of all gradients; when max_norm > 0 they are scaled down to at most max_norm."""
    params = [p for p in params if p.grad is not None]
    if max_norm > 0 and params and _plain_cpu(params):
        return _clip_on_cpu([p.grad for p in params], max_norm)
    if max_norm > 0:
        return torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params]))


def _plain_cpu(params: list[torch.Tensor]) -> bool:
    return all(p.grad.device.type == "cpu" and not is_sharded(p) for p in params) and \
        len({p.grad.dtype for p in params}) == 1


def _clip_on_cpu(grads: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """torch's clip_grad_norm_ (foreach) for plain CPU gradients, bit for bit: the same norms and the same float32
    coefficient, without its grouping by device, and without multiplying by a coefficient of 1 (the usual case
    once training settles), which on 2 cores was most of the clip's millisecond at nanoGPT's CPU shape. Reading the
    coefficient costs a device sync, which a CPU does not have."""
    total = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    if coef.item() < 1.0:  # NaN too is left alone: the step is skipped for a norm that is not finite
        torch._foreach_mul_(grads, coef)
    return total
