"""A transformer block's decode step (one new token per row, the earlier ones in the KV cache) as one TorchScript
call, for eager inference on the CPU: the first norm, the QKV projection, QK-norm and rotary, the cache's write,
attention against the cache, the output projection, the residual sums, the second norm and the MLP. The interpreter
runs the block's forty-odd small ops without Python between them (docs/performance.md has the figures). The
arithmetic is model.py's, in its order (queries and keys are normalised and turned as one tensor, each row as alone),
so the logits are the same bit for bit (tests/test_fused_decode.py, over every model option). model.Block.forward
decides when this applies (decode_fits, unhooked), and GPT.forward calls `block` for each of a decode step's blocks
itself when no module call would be missed (direct).

`write_attend`, the cache's write and the attention of one query per row against it, is the model's own for these
steps (CausalSelfAttention calls it too), and `rotate` its rotary product: each is written once.
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from .fused import scripted, untouched


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mode: str, mask: Optional[torch.Tensor],
           dropout: float = 0.0) -> torch.Tensor:
    """Attention of one query per row and head, q (B, H, 1, D), against the cache's keys and values k, v
    (B, H, slots, D), read as `mode` says (kvcache.py: whole, masked, causal or plain) with its mask: (B, H, 1, D)."""
    D = q.size(-1)
    if mode == "whole" and mask is not None:
        B, H, S = k.size(0), k.size(1), k.size(2)
        # one product per head against its contiguous slots, the scale and the mask in the same call
        scores = torch.baddbmm(mask, q.reshape(-1, 1, D), k.reshape(-1, S, D).transpose(1, 2), alpha=1.0 / math.sqrt(D))
        return torch.bmm(scores.softmax(-1), v.reshape(-1, S, D)).view(B, H, 1, D)
    if mode == "masked" and mask is not None:
        scores = (q @ k.transpose(-2, -1)).mul_(1.0 / math.sqrt(D)).masked_fill_(~mask, float("-inf"))
        return scores.softmax(-1) @ v
    return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=mode == "causal")


def write(k: torch.Tensor, v: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, past: int,
          rows: Optional[torch.Tensor], at: Optional[torch.Tensor]) -> None:
    """A decode step's key and value, k and v (B, H, 1, D), into the cache's buffers keys and values (B, H, slots, D)
    where KVCache.step says: slot at[i] of row rows[i] (each row at its own slot), else slot `past` of every row."""
    if rows is not None and at is not None:
        keys[rows, :, at] = k[:, :, 0]  # an index_put: half the time of a scatter here
        values[rows, :, at] = v[:, :, 0]
    else:
        keys[:, :, past : past + 1] = k
        values[:, :, past : past + 1] = v


def write_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                 past: int, rows: Optional[torch.Tensor], at: Optional[torch.Tensor], mode: str,
                 mask: Optional[torch.Tensor], dropout: float = 0.0) -> torch.Tensor:
    """A decode step's attention, q, k, v (B, H, 1, D), with the cache as KVCache.step hands it (keys, values, past,
    rows, at, mode, mask): k and v written into the buffers, then attend. (B, H, 1, D)."""
    write(k, v, keys, values, past, rows, at)
    if mode == "causal" or mode == "plain":
        keys, values = keys[:, :, : past + 1], values[:, :, : past + 1]
    return attend(q, keys, values, mode, mask, dropout)


def rotation(cos: torch.Tensor, sin: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """RoPE's rotations for rotate, as complex numbers (T, 1, D/2) or (B, T, 1, D/2), from cos and sin (T, D/2) or
    (B, T, D/2), for queries and keys of `dtype`."""
    work = torch.float64 if dtype == torch.float64 else torch.float32
    return torch.complex(cos.to(work), sin.to(work)).unsqueeze(-2)


def rotate(x: torch.Tensor, rot: torch.Tensor) -> torch.Tensor:
    """RoPE as one complex product (model.apply_rotary's eager path): the pairs (x_{2i}, x_{2i+1}) of x (B, T, H, D),
    or (B, T, 2, H, D) for queries and keys at once, turned by rot (rotation's, with one more axis for the latter)."""
    z = torch.view_as_complex(x.to(rot.real.dtype).reshape(list(x.shape[:-1]) + [-1, 2]))  # (B, T, H, D/2)
    return torch.view_as_real(z * rot).flatten(-2).to(x.dtype)


def _rms(x: torch.Tensor, weight: Optional[torch.Tensor], eps: float) -> torch.Tensor:
    """F.rms_norm(x, [C], weight, eps) written out: the same kernels in the same order (x over the root of the mean
    square plus eps, then times the weight), so the same bits, without the dispatches of F.rms_norm's CPU composite
    around them (about 4 us of each norm's 20 in a TorchScript call on the Intel Xeon; a decode step has 4 a layer)."""
    y = x * torch.rsqrt(torch.mean(x * x, -1, keepdim=True).add_(eps))
    return y if weight is None else y.mul_(weight)


def _norm(x: torch.Tensor, rms: bool, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
          eps: float) -> torch.Tensor:
    if rms:
        return _rms(x, weight, eps)
    return F.layer_norm(x, [x.size(-1)], weight, bias, eps)


def _block(x: torch.Tensor, n_head: int, rms: bool, eps: float, norm1_w: Optional[torch.Tensor],
           norm1_b: Optional[torch.Tensor], qkv_w: torch.Tensor, qkv_b: Optional[torch.Tensor],
           ve: Optional[torch.Tensor], qk_norm: bool, q_w: Optional[torch.Tensor], q_b: Optional[torch.Tensor],
           k_w: Optional[torch.Tensor], k_b: Optional[torch.Tensor], cos: Optional[torch.Tensor],
           sin: Optional[torch.Tensor], keys: torch.Tensor, values: torch.Tensor, past: int,
           rows: Optional[torch.Tensor], at: Optional[torch.Tensor], mode: str, mask: Optional[torch.Tensor],
           proj_w: torch.Tensor, proj_b: Optional[torch.Tensor], norm2_w: Optional[torch.Tensor],
           norm2_b: Optional[torch.Tensor], mlp: str, fc_w: torch.Tensor, fc_b: Optional[torch.Tensor],
           out_w: torch.Tensor, out_b: Optional[torch.Tensor]) -> torch.Tensor:
    """Block.forward's output (B, T, C) for x (B, T, C): its modules' inference paths, in their order."""
    B, T, C = x.size(0), x.size(1), x.size(2)
    # the heads (CausalSelfAttention.heads)
    qkv = F.linear(_norm(x, rms, norm1_w, norm1_b, eps), qkv_w, qkv_b).view(B, T, 3, n_head, C // n_head)
    q, k, v = qkv.unbind(2)
    if ve is not None:
        v = v + ve.view_as(v)
    rot = rotation(cos, sin, x.dtype) if cos is not None and sin is not None else None
    if qk_norm and rms and q_w is not None and k_w is not None:
        # queries and keys (B, T, 2, H, D) normalised as one tensor, each row's arithmetic the same as alone, then
        # each times its own gain, and turned as one: half the kernels of doing each apart
        qk = _rms(qkv[:, :, :2], None, eps)
        qk[:, :, 0].mul_(q_w)
        qk[:, :, 1].mul_(k_w)
        if rot is not None:
            qk = rotate(qk, rot.unsqueeze(-2))
        q, k = qk.unbind(2)
    else:
        if qk_norm:
            q, k = _norm(q, rms, q_w, q_b, eps), _norm(k, rms, k_w, k_b, eps)
        if rot is not None:
            q, k = rotate(q, rot), rotate(k, rot)
    # attention against the cache, its projection and the residual sum
    y = write_attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), keys, values, past, rows, at, mode, mask)
    x = x + F.linear(y.transpose(1, 2).reshape(B, T, C), proj_w, proj_b)
    # the MLP (MLP.forward) and its sum
    h = F.linear(_norm(x, rms, norm2_w, norm2_b, eps), fc_w, fc_b)
    if mlp == "gelu":
        h = F.gelu(h)
    elif mlp == "gelu_tanh":
        h = F.gelu(h, approximate="tanh")
    elif mlp == "relu2":  # in place (h is the product's own): relu(h).square()'s arithmetic, without two new tensors
        h = torch.relu_(h)
        h = h.mul_(h)
    else:
        gate, value = h.chunk(2, dim=-1)
        h = F.silu(gate) * value
    return x + F.linear(h, out_w, out_b)


def decode_fits(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `block` may take a block's step now: eager inference (no gradients, no autocast, not being compiled) on
    the CPU, in float32 or float64, the block's weights (one stands for all) plain tensors of the input's dtype."""
    return (x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64) and not torch.is_grad_enabled()
            and not torch.compiler.is_compiling() and not torch.is_autocast_enabled("cpu")
            and type(weight) in (torch.Tensor, torch.nn.Parameter) and weight.dtype == x.dtype)


def direct(x: torch.Tensor, blocks: torch.nn.ModuleList, kinds: tuple) -> Optional[tuple[Callable, list]]:
    """For GPT.forward to take a decode step's blocks itself (`run` for each, under `executing`) instead of calling
    the block modules: the step's function and each block's weights, or None where the modules must run. It applies
    where every block is of the class model.py builds (kinds[0], its forward not replaced: a block swapped for
    another module runs as that module), in eval mode, without forward hooks (its own or every module's), `unhooked`,
    with weights that decode_fits. The Python this leaves out (the block module's call, Block.forward's checks and
    `block`'s, a cache step per layer) made a decode forward of tiny 1.08x slower at batch 64 and 1.13x at batch 1
    on the 2-vCPU Intel Xeon (`scripts/step_bench.py --only decode`)."""
    everyone = torch.nn.modules.module
    if not blocks or everyone._global_forward_hooks or everyone._global_forward_pre_hooks:
        return None
    weights = []
    for b in blocks:
        if type(b) is not kinds[0] or b.training or b._forward_hooks or b._forward_pre_hooks or "forward" in b.__dict__:
            return None
        parts, gathered = _gathered(b, kinds)
        if parts is None or not untouched(parts):
            return None
        weights.append(gathered)
    if not decode_fits(x, weights[0][0][5]) or any(type(w[0][5]) not in (torch.Tensor, torch.nn.Parameter)
                                                   or w[0][5].dtype != x.dtype for w in weights):
        return None
    return scripted(_block), weights


def executing(on: bool):
    """The context `run`'s steps are called under (TorchScript's executor without its optimisations, as `block`
    calls them; fused.scripted says why), or none."""
    return torch.jit.optimized_execution(False) if on else contextlib.nullcontext()


def run(x: torch.Tensor, step_fn: Callable, weights: list, layer: int,
        rope: Optional[tuple[torch.Tensor, torch.Tensor]], ve: Optional[torch.Tensor], step: tuple) -> torch.Tensor:
    """Block `layer`'s decode step, as `block` takes it, from what `direct` handed out (step_fn and the blocks'
    weights), under `executing`."""
    cos, sin = rope if rope is not None else (None, None)
    w = weights[layer]
    return step_fn(x, *w[0], ve, *w[1], cos, sin, *step, *w[2])


_VERSION = [0]  # how many parameters and modules any module has been given: a block's weights are gathered again after


def _given(module, name, value) -> None:
    _VERSION[0] += 1


torch.nn.modules.module.register_module_parameter_registration_hook(_given)
torch.nn.modules.module.register_module_module_registration_hook(_given)


def _parts(block: torch.nn.Module, kinds: tuple) -> Optional[list[torch.nn.Module]]:
    """The modules under the block whose weights _block reads instead of calling them, when each is of the class
    model.py builds there (kinds: model.py's Block, CausalSelfAttention, MLP and RMSNorm; and torch's LayerNorm and
    Linear); None when one was swapped for another module or a subclass (an adapter, say), whose own forward the
    step must run."""
    _, attention, perceptron, rms = kinds
    attn, mlp, norm1 = block.attn, block.mlp, block.norm1
    if type(attn) is not attention or type(mlp) is not perceptron or type(norm1) not in (rms, torch.nn.LayerNorm):
        return None
    norms = [norm1, block.norm2] + ([attn.q_norm, attn.k_norm] if attn.q_norm is not None else [])
    linears = [attn.qkv, attn.proj, mlp.fc, mlp.proj]
    if any(type(m) is not type(norm1) for m in norms) or any(type(m) is not torch.nn.Linear for m in linears):
        return None
    return [attn, mlp] + norms + linears


def _weights(block: torch.nn.Module) -> tuple[tuple, tuple, tuple]:
    """_block's arguments that come from the block's modules, before the value embedding, before the rotary tables
    and after the cache's."""
    attn, mlp, norm1, norm2, q_norm, k_norm = block.attn, block.mlp, block.norm1, block.norm2, block.attn.q_norm, \
        block.attn.k_norm
    layer_norm = isinstance(norm1, torch.nn.LayerNorm)  # else RMSNorm, which has no bias
    qk = q_norm is not None
    qkv, proj, fc, out = attn.qkv, attn.proj, mlp.fc, mlp.proj
    return ((attn.cfg.n_head, not layer_norm, norm1.eps, norm1.weight, norm1.bias if layer_norm else None, qkv.weight,
             qkv.bias),
            (qk, q_norm.weight if qk else None, q_norm.bias if qk and layer_norm else None,
             k_norm.weight if qk else None, k_norm.bias if qk and layer_norm else None),
            (proj.weight, proj.bias, norm2.weight, norm2.bias if layer_norm else None, mlp.kind, fc.weight, fc.bias,
             out.weight, out.bias))


def _gathered(block: torch.nn.Module, kinds: tuple) -> tuple[Optional[list], Optional[tuple]]:
    """The block's parts and weights (_parts, _weights; both None when a part is not model.py's own), gathered once
    (each step it took about 30 us a block), and again once any module was given a parameter or a module (torch's
    registration hooks): a weight or a module replaced, not only changed in place, is then seen."""
    cached = block.decode_weights
    if cached is None or cached[0] != _VERSION[0]:
        parts = _parts(block, kinds)
        cached = block.decode_weights = (_VERSION[0], parts, None if parts is None else _weights(block))
    return cached[1], cached[2]


def unhooked(block: torch.nn.Module, kinds: tuple) -> bool:
    """Whether a step may take the block's modules as `block` (or fused.gpt2_block) does, reading their weights
    without calling them: each of them model.py's own class (_parts, with model.py's `kinds`), and
    fused.untouched."""
    parts, _ = _gathered(block, kinds)
    return parts is not None and untouched(parts)


def block(x: torch.Tensor, block: torch.nn.Module, rope: Optional[tuple[torch.Tensor, torch.Tensor]],
          ve: Optional[torch.Tensor], step: tuple) -> torch.Tensor:
    """model.Block's output (B, 1, C) for a decode step of x (B, 1, C) of a block that is `unhooked`: rope its
    (cos, sin) at the step's position, ve its weighted value embedding, step the cache as KVCache.step hands it."""
    cached = block.decode_weights  # gathered by unhooked, which the caller asked first
    weights = cached[2] if cached is not None and cached[0] == _VERSION[0] and cached[2] is not None \
        else _weights(block)
    with executing(True):
        return run(x, scripted(_block), [weights], 0, rope, ve, step)
