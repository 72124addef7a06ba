"""Hand-written autograd functions that eager training takes on the CPU: each does the work of several autograd
nodes in one, with fewer passes over the activations. Each is checked against the plain modules (the same outputs
and gradients) and against finite differences (tests/test_model.py, tests/test_fused.py); model.py decides when
each applies.

- `_RMSNormFunction`: RMSNorm's forward and backward, fewer kernels than autograd's decomposition.
- `_SquaredReLU`, `_ReLU2MLPFunction`, `_GeluMLPFunction`: the MLP's activation, or the whole bias-free MLP.
- `gpt2_block`: a whole GPT-2 block (LayerNorm, causal attention, LayerNorm, GELU MLP, both residual sums) as one
  node, for the configuration nanoGPT and GPT-2 use; its forward and backward math run as TorchScript, which
  releases the GIL for the whole call (threads.py's parts take fewer turns at it), bit for bit the Python.
- `scripted(fn)`: a function as TorchScript, compiled once, or as Python where TorchScript refuses it.

Each reads its modules' weights instead of calling them, so each applies only to modules of the classes model.py
builds with nothing more to run when called (`untouched`: no forward hooks, no forward of their own): an adapter or
a hook on a linear layer is then run by the modules' own path.
"""

from __future__ import annotations

import functools
import threading
import warnings
from typing import Callable, List, Optional, Tuple

import torch
import torch.nn.functional as F


class _RMSNormFunction(torch.autograd.Function):
    """y = x / rms(x) * w with a hand-written backward: fewer kernels than autograd's decomposition on CPU."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        rstd = torch.rsqrt(x.square().mean(-1, keepdim=True).add_(eps))
        x_hat = x * rstd
        ctx.save_for_backward(x_hat, rstd, weight)
        return x_hat * weight

    @staticmethod
    def backward(ctx, grad):
        x_hat, rstd, weight = ctx.saved_tensors
        g = grad * weight
        grad_x = rstd * (g - x_hat * (g * x_hat).mean(-1, keepdim=True))
        grad_w = (grad * x_hat).reshape(-1, x_hat.size(-1)).sum(0)
        return grad_x, grad_w, None


class _SquaredReLU(torch.autograd.Function):
    """relu(x)^2, keeping only relu(x) for the backward pass (2 relu(x) g)."""

    @staticmethod
    def forward(ctx, x):
        r = torch.relu(x)
        ctx.save_for_backward(r)
        return r * r

    @staticmethod
    def backward(ctx, grad):
        (r,) = ctx.saved_tensors
        return grad * (2 * r)


class _ReLU2MLPFunction(torch.autograd.Function):
    """proj(relu(fc(x))^2) for bias-free weights, with a hand-written backward that makes fewer passes over the
    (B, T, hidden) activations, the largest tensors of a step: the relu is taken in place, and the 2 of the square's
    derivative multiplies the small weight matrices instead of the activations."""

    @staticmethod
    def forward(ctx, x, w_fc, w_proj):
        r = F.linear(x, w_fc).relu_()
        a = r * r
        ctx.save_for_backward(x, w_fc, w_proj, r, a)
        return F.linear(a, w_proj)

    @staticmethod
    def backward(ctx, grad):
        x, w_fc, w_proj, r, a = ctx.saved_tensors
        half = (grad @ w_proj).mul_(r)  # half of d loss / d (fc output): relu(h)^2 has derivative 2 relu(h)
        return _mlp_grads(ctx, grad, x, w_fc, a, half, 2.0)


class _GeluMLPFunction(torch.autograd.Function):
    """proj(gelu(fc(x))) for bias-free weights (GPT-2's MLP, exact erf GELU), with a hand-written backward: one
    autograd node instead of three, and GELU's derivative written over the incoming gradient in place, so the step
    allocates one (B, T, hidden) tensor fewer."""

    @staticmethod
    def forward(ctx, x, w_fc, w_proj):
        h = F.linear(x, w_fc)
        a = F.gelu(h)
        ctx.save_for_backward(x, w_fc, w_proj, h, a)
        return F.linear(a, w_proj)

    @staticmethod
    def backward(ctx, grad):
        x, w_fc, w_proj, h, a = ctx.saved_tensors
        dh = grad @ w_proj
        torch.ops.aten.gelu_backward.grad_input(dh, h, grad_input=dh)  # d loss / d (fc output), in place
        return _mlp_grads(ctx, grad, x, w_fc, a, dh, 1.0)


def _mlp_grads(ctx, grad, x, w_fc, a, dh, scale: float):
    """The gradients of an MLP function's inputs (x, w_fc, w_proj) from the output's gradient, the activations a and
    `scale` times the gradient of the fc output, dh (the activation's derivative folded into the small weights)."""
    grad_x = grad_fc = grad_proj = None
    if ctx.needs_input_grad[2]:
        grad_proj = grad.reshape(-1, grad.size(-1)).t() @ a.reshape(-1, a.size(-1))
    if ctx.needs_input_grad[1]:
        grad_fc = dh.reshape(-1, dh.size(-1)).t() @ x.reshape(-1, x.size(-1))
        grad_fc = grad_fc.mul_(scale) if scale != 1.0 else grad_fc
    if ctx.needs_input_grad[0]:
        grad_x = dh @ (scale * w_fc if scale != 1.0 else w_fc)
    return grad_x, grad_fc, grad_proj


FUSED_MLPS = {"relu2": _ReLU2MLPFunction, "gelu": _GeluMLPFunction}  # eager training takes these (bias-free)


_aten = torch.ops.aten
# PyTorch's CPU flash attention, forward and backward, as SDPA calls them: the block calls them itself to keep the
# logsumexp for its own backward. None where this PyTorch lacks them (the block then never applies).
_FLASH = (getattr(_aten, "_scaled_dot_product_flash_attention_for_cpu", None),
          getattr(_aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None))


def _block_forward(x: torch.Tensor, n_head: int, eps: float, ln1_w: Optional[torch.Tensor],
                   ln1_b: Optional[torch.Tensor], qkv_w: torch.Tensor, qkv_b: Optional[torch.Tensor],
                   proj_w: torch.Tensor, proj_b: Optional[torch.Tensor], ln2_w: Optional[torch.Tensor],
                   ln2_b: Optional[torch.Tensor], fc_w: torch.Tensor, fc_b: Optional[torch.Tensor],
                   out_w: torch.Tensor, out_b: Optional[torch.Tensor]) -> Tuple[torch.Tensor, List[torch.Tensor]]:
    """The block's output (B, T, C) and what its backward keeps. Written for TorchScript too (see _block_code)."""
    B, T, C = x.size(0), x.size(1), x.size(2)
    x = x.reshape(B * T, C)
    h1, mean1, rstd1 = torch.native_layer_norm(x, [C], ln1_w, ln1_b, eps)
    qkv = F.linear(h1, qkv_w, qkv_b)  # (B*T, 3C); the heads are views of it
    q, k, v = qkv.view(B, T, 3, n_head, -1).permute(2, 0, 3, 1, 4).unbind(0)
    y, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, True)  # y laid out (B,T,H,D)
    a = y.transpose(1, 2).reshape(B * T, C)
    x2 = torch.addmm(x, a, proj_w.t())  # the residual's sum inside the GEMM
    if proj_b is not None:
        x2 = x2.add_(proj_b)
    h2, mean2, rstd2 = torch.native_layer_norm(x2, [C], ln2_w, ln2_b, eps)
    f = F.linear(h2, fc_w, fc_b)  # (B*T, 4C)
    g = F.gelu(f)
    out = torch.addmm(x2, g, out_w.t())
    if out_b is not None:
        out = out.add_(out_b)
    return out.view(B, T, C), [x, h1, mean1, rstd1, qkv, y, lse, a, x2, h2, mean2, rstd2, f, g]


def _block_backward(grad: torch.Tensor, saved: List[torch.Tensor], n_head: int, ln1_w: Optional[torch.Tensor],
                    ln1_b: Optional[torch.Tensor], qkv_w: torch.Tensor, qkv_b: Optional[torch.Tensor],
                    proj_w: torch.Tensor, proj_b: Optional[torch.Tensor], ln2_w: Optional[torch.Tensor],
                    ln2_b: Optional[torch.Tensor], fc_w: torch.Tensor, fc_b: Optional[torch.Tensor],
                    out_w: torch.Tensor, out_b: Optional[torch.Tensor]) -> List[Optional[torch.Tensor]]:
    """The gradients of the block's input and of its weights and biases in gpt2_block's order (None for a missing
    bias), from the output's gradient and what _block_forward kept."""
    x, h1, mean1, rstd1, qkv, y, lse, a, x2, h2, mean2, rstd2, f, g = saved
    B, T, C = grad.size(0), grad.size(1), grad.size(2)
    grad = grad.reshape(B * T, C)
    # the MLP: out = x2 + gelu(h2 fc^T) out^T
    d_out_w = grad.t() @ g
    df = grad @ out_w
    torch.ops.aten.gelu_backward(df, f, grad_input=df)  # in place: d loss / d (fc output)
    d_fc_w = df.t() @ h2
    dx2, d_ln2_w, d_ln2_b = torch.ops.aten.native_layer_norm_backward(
        df @ fc_w, x2, [C], mean2, rstd2, ln2_w, ln2_b, [True, ln2_w is not None, ln2_b is not None])
    dx2.add_(grad)  # the residual's share
    # attention: x2 = x + attn(h1) proj^T
    d_proj_w = dx2.t() @ a
    da = (dx2 @ proj_w).view(B, T, n_head, C // n_head).transpose(1, 2)
    q, k, v = qkv.view(B, T, 3, n_head, -1).permute(2, 0, 3, 1, 4).unbind(0)
    dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(da, q, k, v, y, lse, 0.0, True)
    dqkv = torch.stack([dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2)], dim=2).view(B * T, 3 * C)
    d_qkv_w = dqkv.t() @ h1
    dx, d_ln1_w, d_ln1_b = torch.ops.aten.native_layer_norm_backward(
        dqkv @ qkv_w, x, [C], mean1, rstd1, ln1_w, ln1_b, [True, ln1_w is not None, ln1_b is not None])
    dx.add_(dx2)
    grads: List[Optional[torch.Tensor]] = [dx.view(B, T, C)]
    for d_w, d_b, w, b in ((d_ln1_w, d_ln1_b, ln1_w, ln1_b), (d_qkv_w, dqkv, qkv_w, qkv_b),
                           (d_proj_w, dx2, proj_w, proj_b), (d_ln2_w, d_ln2_b, ln2_w, ln2_b),
                           (d_fc_w, df, fc_w, fc_b), (d_out_w, grad, out_w, out_b)):
        # a bias's gradient: layer norm's from its backward, a projection's the sum of its output's gradient
        grads.append(d_w if w is not None else None)
        grads.append(None if b is None else (d_b if d_b.dim() == 1 else d_b.sum(0)))
    return grads


PARAMS = 12  # two norms and four projections, each a weight and a bias (or None)
_SCRIPT_LOCK = threading.Lock()


@functools.lru_cache(maxsize=None)
def _script(fn: Callable) -> Callable:
    """fn compiled by TorchScript; fn itself where TorchScript is missing or refuses it (it is deprecated)."""
    try:
        inline = torch._C._jit_get_inline_everything_mode()
        # the functions fn calls are compiled into its graph rather than called (each call costs microseconds)
        torch._C._jit_set_inline_everything_mode(True)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return torch.jit.script(fn)
        finally:
            torch._C._jit_set_inline_everything_mode(inline)
    except Exception:  # noqa: BLE001 - any failure to compile leaves the same code running as Python
        return fn


SCRIPTED = True
"""Run the TorchScript-compatible functions (this module's GPT-2 block, fused_decode's decode step) as TorchScript
(tests switch it off to compare with the Python functions)."""


def scripted(fn: Callable) -> Callable:
    """fn as TorchScript, compiled once (by whichever thread comes first): its interpreter runs the ops without
    Python between them, a few microseconds less per op, and releases the GIL for the whole call instead of around
    every op. Where two threads share a step (threads.py), a GPT-2 block is then one turn at the GIL instead of some
    forty: on 2 cores nanoGPT's CPU step ran 1.09x as fast (docs/performance.md, `scripts/step_bench.py --only
    threads`). Call the result under `torch.jit.optimized_execution(False)` (a per-thread switch): the executor's
    optimisations would change the rounding (an addmm split into a GEMM and a sum), and once a plan is optimised
    it stays so."""
    if not SCRIPTED:
        return fn
    with _SCRIPT_LOCK:
        return _script(fn)


def _block_code() -> tuple[Callable, Callable]:
    return scripted(_block_forward), scripted(_block_backward)


class _GPT2BlockFunction(torch.autograd.Function):
    """x + attn(ln_1(x)), then + mlp(ln_2(that)), with causal flash attention and an exact-GELU MLP, as one autograd
    node: both residual sums inside the projections' GEMMs (addmm), the heads read in place from the fused QKV
    projection, and GELU's derivative written over its incoming gradient. The weights' gradients are those the
    modules' autograd computes, from the same kernels (PyTorch's LayerNorm, flash attention and GELU). The math runs
    without the graph executor's optimisations, which would split the residual sums out of the GEMMs (other
    rounding)."""

    @staticmethod
    def forward(ctx, x, n_head: int, eps: float, *params):
        with torch.jit.optimized_execution(False):  # a per-thread switch
            out, saved = _block_code()[0](x, n_head, eps, *params)
        ctx.n_head = n_head
        ctx.save_for_backward(*params, *saved)
        return out

    @staticmethod
    def backward(ctx, grad):
        saved = ctx.saved_tensors
        with torch.jit.optimized_execution(False):
            grads = _block_code()[1](grad, list(saved[PARAMS:]), ctx.n_head, *saved[:PARAMS])
        return grads[0], None, None, *grads[1:]


def eager_training(x: torch.Tensor, params: list[Optional[torch.Tensor]]) -> bool:
    """Whether a hand-written function may replace the modules for this input now: a training forward (gradients
    on, eager, no autocast) with every weight a plain tensor of the input's dtype."""
    return (torch.is_grad_enabled() and not torch.compiler.is_compiling()
            and not torch.is_autocast_enabled(x.device.type)
            and all(p is None or (type(p) in (torch.Tensor, torch.nn.Parameter) and p.dtype == x.dtype)
                    for p in params))


def untouched(modules) -> bool:
    """Whether a hand-written function may read these modules' weights instead of calling them: none has forward
    hooks (its own or every module's: register_forward_hook, register_forward_pre_hook) or a forward of its own,
    which calling it would run. (Which class each module is, the caller checks.)"""
    everyone = torch.nn.modules.module
    return not (everyone._global_forward_hooks or everyone._global_forward_pre_hooks
                or any(m._forward_hooks or m._forward_pre_hooks or "forward" in m.__dict__ for m in modules))


def gpt2_block_fits(x: torch.Tensor, params: list[Optional[torch.Tensor]]) -> bool:
    """Whether gpt2_block applies to this input now: eager_training, in float32 or float64 on the CPU, where PyTorch
    has its CPU flash attention."""
    return (x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64) and _FLASH[1] is not None
            and eager_training(x, params))


def gpt2_block(x: torch.Tensor, n_head: int, eps: float, *params: Optional[torch.Tensor]) -> torch.Tensor:
    """A GPT-2 block's output for x (B, T, C): params are ln_1's weight and bias, the QKV projection's, attention's
    output projection's, ln_2's, the MLP's fc and its output projection's, each weight followed by its bias (None
    where there is none)."""
    return _GPT2BlockFunction.apply(x, n_head, eps, *params)
