"""Hand-written autograd functions that eager training takes on the CPU: each does the work of several autograd
nodes in one, with fewer passes over the activations. Each is checked against the plain modules (the same outputs
and gradients) and against finite differences (tests/test_model.py, tests/test_fused.py); model.py decides when
each applies.

- `_RMSNormFunction`: RMSNorm's forward and backward, fewer kernels than autograd's decomposition.
- `_SquaredReLU`, `_ReLU2MLPFunction`, `_GeluMLPFunction`: the MLP's activation, or the whole bias-free MLP.
- `gpt2_block`: a whole GPT-2 block (LayerNorm, causal attention, LayerNorm, GELU MLP, both residual sums) as one
  node, for the configuration nanoGPT and GPT-2 use.
"""

from __future__ import annotations

from typing import Optional

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


def _linear(x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor], residual: Optional[torch.Tensor] = None
            ) -> torch.Tensor:
    """x W^T (+ b) (+ residual), the residual's sum inside the GEMM (addmm) when there is one."""
    if residual is None:
        return F.linear(x, w, b)
    y = torch.addmm(residual, x, w.t())
    return y if b is None else y.add_(b)


def _heads(qkv: torch.Tensor, B: int, T: int, n_head: int) -> tuple[torch.Tensor, ...]:
    """Queries, keys and values, each (B, H, T, D), as views of the fused projection's (B*T, 3C) output."""
    return qkv.view(B, T, 3, n_head, -1).permute(2, 0, 3, 1, 4).unbind(0)


def _bias_grad(grad: torch.Tensor, b: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if b is None else grad.sum(0)


class _GPT2BlockFunction(torch.autograd.Function):
    """x + attn(ln_1(x)), then + mlp(ln_2(that)), with causal flash attention and an exact-GELU MLP, as one autograd
    node: both residual sums inside the projections' GEMMs (addmm), the heads read in place from the fused QKV
    projection, and GELU's derivative written over its incoming gradient. The weights' gradients are those the
    modules' autograd computes, from the same kernels (PyTorch's LayerNorm, flash attention and GELU)."""

    @staticmethod
    def forward(ctx, x, n_head: int, eps: float, ln1_w, ln1_b, qkv_w, qkv_b, proj_w, proj_b, ln2_w, ln2_b, fc_w,
                fc_b, out_w, out_b):
        B, T, C = x.shape
        x = x.reshape(B * T, C)
        h1, mean1, rstd1 = _aten.native_layer_norm(x, [C], ln1_w, ln1_b, eps)
        qkv = _linear(h1, qkv_w, qkv_b)  # (B*T, 3C)
        q, k, v = _heads(qkv, B, T, n_head)
        y, lse = _FLASH[0](q, k, v, 0.0, True)  # y: (B, H, T, D), laid out as (B, T, H, D)
        a = y.transpose(1, 2).reshape(B * T, C)
        x2 = _linear(a, proj_w, proj_b, residual=x)
        h2, mean2, rstd2 = _aten.native_layer_norm(x2, [C], ln2_w, ln2_b, eps)
        f = _linear(h2, fc_w, fc_b)  # (B*T, 4C)
        g = F.gelu(f)
        out = _linear(g, out_w, out_b, residual=x2)
        ctx.n_head, ctx.shape = n_head, (B, T, C)
        ctx.save_for_backward(x, h1, mean1, rstd1, qkv, y, lse, a, x2, h2, mean2, rstd2, f, g, ln1_w, ln1_b, qkv_w,
                              qkv_b, proj_w, proj_b, ln2_w, ln2_b, fc_w, fc_b, out_w, out_b)
        return out.view(B, T, C)

    @staticmethod
    def backward(ctx, grad):
        (x, h1, mean1, rstd1, qkv, y, lse, a, x2, h2, mean2, rstd2, f, g, ln1_w, ln1_b, qkv_w, qkv_b, proj_w, proj_b,
         ln2_w, ln2_b, fc_w, fc_b, out_w, out_b) = ctx.saved_tensors
        B, T, C = ctx.shape
        H = ctx.n_head
        grad = grad.reshape(B * T, C)
        # the MLP: out = x2 + gelu(h2 fc^T) out^T
        d_out_w, d_out_b = grad.t() @ g, _bias_grad(grad, out_b)
        df = grad @ out_w
        _aten.gelu_backward.grad_input(df, f, grad_input=df)  # in place: d loss / d (fc output)
        d_fc_w, d_fc_b = df.t() @ h2, _bias_grad(df, fc_b)
        dx2, d_ln2_w, d_ln2_b = _aten.native_layer_norm_backward(
            df @ fc_w, x2, [C], mean2, rstd2, ln2_w, ln2_b, [True, ln2_w is not None, ln2_b is not None])
        dx2.add_(grad)  # the residual's share
        # attention: x2 = x + attn(h1) proj^T
        d_proj_w, d_proj_b = dx2.t() @ a, _bias_grad(dx2, proj_b)
        da = (dx2 @ proj_w).view(B, T, H, C // H).transpose(1, 2)
        q, k, v = _heads(qkv, B, T, H)
        dq, dk, dv = _FLASH[1](da, q, k, v, y, lse, 0.0, True)
        dqkv = torch.stack([t.transpose(1, 2) for t in (dq, dk, dv)], dim=2).view(B * T, 3 * C)
        d_qkv_w, d_qkv_b = dqkv.t() @ h1, _bias_grad(dqkv, qkv_b)
        dx, d_ln1_w, d_ln1_b = _aten.native_layer_norm_backward(
            dqkv @ qkv_w, x, [C], mean1, rstd1, ln1_w, ln1_b, [True, ln1_w is not None, ln1_b is not None])
        dx.add_(dx2)
        return (dx.view(B, T, C), None, None, d_ln1_w, d_ln1_b, d_qkv_w, d_qkv_b, d_proj_w, d_proj_b, d_ln2_w,
                d_ln2_b, d_fc_w, d_fc_b, d_out_w, d_out_b)


def eager_training(x: torch.Tensor, params: list[Optional[torch.Tensor]]) -> bool:
    """Whether a hand-written function may replace the modules for this input now: a training forward (gradients
    on, eager, no autocast) with every weight a plain tensor of the input's dtype."""
    return (torch.is_grad_enabled() and not torch.compiler.is_compiling()
            and not torch.is_autocast_enabled(x.device.type)
            and all(p is None or (type(p) in (torch.Tensor, torch.nn.Parameter) and p.dtype == x.dtype)
                    for p in params))


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
