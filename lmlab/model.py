"""The decoder-only transformer (and a bigram baseline): token ids in, next-token logits for every position out.

What other modules may use of a model, and nothing more (both architectures have all of it):
- `build_model(cfg, vocab_size)`; `model(idx)` -> logits (B, T, V) for every position (the loss is loss.py's);
  `model(idx, cache=cache)` and `model(idx, cache=cache, pos=pos)` for cached decoding (sample.py);
  `model(idx, documents=docs)` for rows that pack several sequences (fine-tuning on conversations): docs (B, T)
  says where each sequence starts, no token attends across a boundary and positions restart at each (`Packing`).
- `model.cfg` (a ModelConfig; `cfg.block_size` is the longest context), `model.vocab_size`,
  `model.make_cache(batch)` (a KVCache).
- `model.blocks`: the transformer blocks, in order (distributed.py shards each; empty for the bigram).
- Looking inside (inside.py): `with model.capture(*names) as seen:` keeps the named activations of the forwards
  run in the block (`model.hook_points()` lists the names), and `model.head(x)` turns a residual stream into
  logits (the logit lens).
- `grow_vocab(model, vocab_size)`: room for new token ids (special tokens added to a tokenizer from before them).
- Parameters by name only through the helpers below: `unique_parameters` (tied weights once), `layer_of`
  (embed / block.N / head, for telemetry), `is_hidden_matrix` (Muon's share), `count_params`, `matmul_params`.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterable, Iterator, Literal, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import fused_decode
from .common import MEMORY_ENV, LmlabError, fmt_bytes, memory_limit
from .fused import (FUSED_MLPS, _RMSNormFunction, _SquaredReLU, eager_training, gpt2_block, gpt2_block_fits,
                    untouched)
from .kvcache import KVCache


SIZES = ("block_size", "n_layer", "n_head", "n_embd")
# No size (a count of layers, heads or tokens, a width) above this: the bytes of every tensor then fit in int64, so
# shapes can be counted on the meta device. What fits in memory is a much smaller bound, checked before anything is
# allocated (check_fits).
MAX_SIZE = 1 << 28


@dataclass
class ModelConfig:
    """The architecture."""

    arch: Literal["gpt", "bigram"] = "gpt"
    """gpt: the transformer; bigram: one VxV table of logits, the simplest next-token predictor."""
    block_size: Optional[int] = 128
    """Context length in tokens (None: the preset's recipe picks it for the time budget)."""
    n_layer: Optional[int] = 4
    """Number of transformer blocks (None: picked for the time budget)."""
    n_head: Optional[int] = 4
    """Attention heads per block (None: picked for the time budget)."""
    n_embd: Optional[int] = 128
    """Width of the residual stream (None: picked for the time budget)."""
    pos: Literal["learned", "rope"] = "rope"
    """Position information: a learned table, or rotary embeddings in attention."""
    norm: Literal["layernorm", "rmsnorm"] = "rmsnorm"
    """Normalisation before attention, MLP and head."""
    mlp: Literal["gelu", "gelu_tanh", "relu2", "swiglu"] = "relu2"
    """MLP non-linearity: GELU, GELU's tanh approximation (GPT-2's), squared ReLU, or a SwiGLU gate."""
    mlp_ratio: float = 4.0
    """MLP hidden width as a multiple of n_embd (SwiGLU uses 2/3 of it, keeping the parameter count)."""
    mlp_hidden: Optional[int] = None
    """MLP hidden width in units, overriding --mlp-ratio (for SwiGLU: the width of the gate and of the value)."""
    norm_eps: Optional[float] = None
    """Epsilon of every norm (None: 1e-6 for RMSNorm, 1e-5 for LayerNorm, PyTorch's default)."""
    qk_norm: bool = True
    """Normalise queries and keys per head before attention (with the same kind of norm as the blocks)."""
    tie_embeddings: bool = False
    """Share the input embedding with the output head."""
    bias: bool = False
    """Biases in linear layers and LayerNorm."""
    dropout: Optional[float] = 0.0
    """Dropout on the embeddings and the residual branches (and, unless --attn-dropout says otherwise, the
    attention weights) while training (None: picked for the size of the corpus, see `lmlab train --help`)."""
    attn_dropout: Optional[float] = None
    """Dropout on the attention weights while training (None: the same as --dropout). 0 keeps the fast fused
    attention kernels, which a nonzero value replaces by a slower path on CPU."""
    rope_base: float = 10000.0
    """RoPE frequency base."""
    zero_init_proj: bool = True
    """Start the output projections of attention and MLP at zero, so each block starts as the identity."""
    logit_softcap: float = 0.0
    """Bound the logits smoothly to (-cap, cap): cap * tanh(logits / cap) (0: off)."""
    value_embed: bool = False
    """A second token table added to every layer's attention values, times a learned weight per layer."""
    unet_skips: bool = False
    """U-net skips: the output of block i of the first half, times a learned weight, joins the input of its mirror
    block n_layer-1-i of the second half."""

    def __post_init__(self) -> None:
        for name in (*SIZES, "mlp_hidden"):
            value = getattr(self, name)
            if value is not None and not 0 < value <= MAX_SIZE:
                raise LmlabError(f"--{name.replace('_', '-')} must be between 1 and {MAX_SIZE:,}, got {value!r:.40}")
        if not self.unset():  # else the budget rules fill them in (budget.apply_budget), then these checks run
            if self.n_embd % self.n_head:
                raise LmlabError(f"--n-embd ({self.n_embd}) must be divisible by --n-head ({self.n_head})")
            if self.pos == "rope" and (self.n_embd // self.n_head) % 2:
                raise LmlabError(f"RoPE needs an even head size; n_embd/n_head = {self.n_embd // self.n_head}")
            if not 0 < self.mlp_width <= MAX_SIZE:
                raise LmlabError(f"the MLP width (--mlp-ratio x --n-embd, or --mlp-hidden) must be between 1 and "
                                 f"{MAX_SIZE:,}, got {self.mlp_width:,}")
        if self.dropout is not None and not 0.0 <= self.dropout < 1.0:
            raise LmlabError(f"--dropout must be in [0, 1), got {self.dropout}")
        if self.attn_dropout is not None and not 0.0 <= self.attn_dropout < 1.0:
            raise LmlabError(f"--attn-dropout must be in [0, 1), got {self.attn_dropout}")
        if not 0 < self.mlp_ratio <= 1024:
            raise LmlabError(f"--mlp-ratio must be positive and at most 1024, got {self.mlp_ratio}")
        if not 0 <= self.logit_softcap < math.inf:
            raise LmlabError(f"--logit-softcap must be >= 0 (0: off), got {self.logit_softcap}")
        if not 0 < self.rope_base < math.inf:
            raise LmlabError(f"--rope-base must be a positive finite number, got {self.rope_base}")
        if self.norm_eps is not None and not 0 < self.norm_eps < 1:
            raise LmlabError(f"--norm-eps must be in (0, 1), got {self.norm_eps}")

    def unset(self) -> list[str]:
        """The sizes left for the budget rules to choose (None)."""
        return [name for name in SIZES if getattr(self, name) is None]

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def mlp_width(self) -> int:
        """The MLP's hidden width (for SwiGLU, that of the gate and of the value each)."""
        hidden = int(self.mlp_ratio * self.n_embd)
        if self.mlp == "swiglu":
            return self.mlp_hidden or int(2 * hidden / 3)
        return self.mlp_hidden or hidden


class Packing:
    """Rows that each hold several sequences one after another (conversations packed for fine-tuning), read from
    per-token document ids (B, T): a sequence starts at a row's first token and wherever the id changes. What the
    model makes of it: a token attends only to the earlier tokens of its own sequence (a block-diagonal causal
    mask), and positions (RoPE's angles, the learned table's rows) restart at 0 at each sequence's first token. So
    every sequence gets the logits it would get alone in a row of its own."""

    def __init__(self, documents: torch.Tensor):
        B, T = documents.shape
        starts = torch.ones(B, T, dtype=torch.bool, device=documents.device)
        starts[:, 1:] = documents[:, 1:] != documents[:, :-1]
        index = torch.arange(T, device=documents.device).expand(B, T)
        first = torch.where(starts, index, 0).cummax(dim=1).values  # (B, T): where each token's sequence starts
        self.positions = index - first  # (B, T)
        causal = torch.ones(T, T, dtype=torch.bool, device=documents.device).tril()
        self.mask = (first[:, :, None] == first[:, None, :]) & causal  # (B, T, T): query t sees key s
        self.mask = self.mask.unsqueeze(1)  # (B, 1, T, T), for every head


class Capture(dict):
    """The activations that a `with model.capture(*names)` block asked for, by hook name. Each holds its value from
    the latest forward run in the block; a name whose hook point has not run yet is missing. The tensors are the
    forward's own, not copies, and keep their autograd history when gradients are on."""

    def __init__(self, names: Iterable[str]):
        super().__init__()
        self.names = frozenset(names)

    def keep(self, name: str, value: torch.Tensor) -> None:
        """Called by the forward at each hook point it reaches while capturing."""
        if name in self.names:
            self[name] = value


class HookedModel(nn.Module):
    """What both architectures share for looking inside: named activations (hook points) that a caller captures,
    in the spirit of TransformerLens's run_with_cache. Outside a capture nothing is kept and no attention weights
    are formed: a forward only checks, at each hook point, that no capture is on."""

    def __init__(self):
        super().__init__()
        self._capture: Optional[Capture] = None  # set by capture() for the duration of its block

    def hook_points(self) -> list[str]:
        """The names capture() takes, in the order a forward reaches them."""
        raise NotImplementedError

    @contextmanager
    def capture(self, *names: str) -> Iterator[Capture]:
        """Keep the named activations (see hook_points) of the forwards run inside the block, in the Capture it
        yields:

            with torch.no_grad(), model.capture("blocks.0.attn.weights", "logits") as seen:
                model(idx)
            seen["blocks.0.attn.weights"]  # (B, H, T, T)

        Attention weights are written out (softmax(q k^T / sqrt(D)), masked) only in the layers whose weights are
        asked for; the other layers keep the fused kernel. One capture at a time per model, so not for threads that
        share a model."""
        points = self.hook_points()
        unknown = [name for name in names if name not in points]
        if unknown:
            raise ValueError(f"no hook point {', '.join(map(repr, unknown))}; this model has {', '.join(points)}")
        if self._capture is not None:
            raise RuntimeError("this model is capturing already (captures do not nest)")
        self._capture = Capture(names)
        try:
            yield self._capture
        finally:
            self._capture = None


class RMSNorm(nn.Module):
    """Root-mean-square normalisation with a learned gain (no mean subtraction, no bias)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float() if x.dtype != self.weight.dtype else x  # autocast: normalise in float32
        if torch.is_grad_enabled():
            y = _RMSNormFunction.apply(x32, self.weight, self.eps)
        else:  # inference (sampling, evaluation): the fused op, without the autograd Function's overhead
            y = F.rms_norm(x32, (x.size(-1),), self.weight, self.eps)
        return y.to(x.dtype)


NORM_EPS = {"rmsnorm": 1e-6, "layernorm": 1e-5}  # the defaults, when ModelConfig.norm_eps is None


def norm_layer(cfg: ModelConfig, dim: int) -> nn.Module:
    eps = NORM_EPS[cfg.norm] if cfg.norm_eps is None else cfg.norm_eps
    if cfg.norm == "rmsnorm":
        return RMSNorm(dim, eps)
    return nn.LayerNorm(dim, eps=eps, bias=cfg.bias)


def rotary_tables(block_size: int, head_dim: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the angle pos / base^(2i/D) for every position and pair i: each (block_size, D/2)."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(block_size, dtype=torch.float32), inv_freq)  # (T, D/2)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the pairs (x_{2i}, x_{2i+1}) of each head by position-dependent angles, as one complex product.

    x: (B, T, H, D); cos/sin: (T, D/2), or (B, T, D/2) for positions that differ between rows (packed sequences).
    """
    if torch.compiler.is_compiling():  # inductor has no complex kernels: the same product in real arithmetic
        work = torch.float64 if x.dtype == torch.float64 else torch.float32
        re, im = x.to(work).unflatten(-1, (-1, 2)).unbind(-1)  # each (B, T, H, D/2)
        c, s = cos.to(work)[..., None, :], sin.to(work)[..., None, :]
        return torch.stack((re * c - im * s, re * s + im * c), dim=-1).flatten(-2).to(x.dtype)
    return fused_decode.rotate(x, fused_decode.rotation(cos, sin, x.dtype))


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.q_norm = norm_layer(cfg, cfg.head_dim) if cfg.qk_norm else None
        self.k_norm = norm_layer(cfg, cfg.head_dim) if cfg.qk_norm else None

    def heads(self, x: torch.Tensor, rope, ve: Optional[torch.Tensor] = None
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries, keys and values of every head, each (B, H, T, D): normalised (QK-norm) and rotated (RoPE); ve, a
        (B, T, C) value embedding already weighted, is added to the values."""
        B, T, _ = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.cfg.n_head, self.cfg.head_dim).unbind(dim=2)  # each (B, T, H, D)
        if ve is not None:
            v = v + ve.view_as(v)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def forward(self, x, rope, cache: Optional[KVCache], layer: int, pos: Optional[torch.Tensor] = None,
                ve: Optional[torch.Tensor] = None, hooks: Optional[Capture] = None,
                mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x: (B, T, C), already normalised. hooks: the model's capture, if one is on (HookedModel.capture); when it
        asks for this layer's attention weights, they are written out instead of fused. mask: packed sequences'
        (B, 1, T, T) mask (Packing.mask), instead of the plain causal one; None: causal, with no mask tensor."""
        B, T, C = x.shape
        D = self.cfg.head_dim
        q, k, v = self.heads(x, rope, ve)  # (B, H, T, D)
        dropout = (self.cfg.dropout or 0.0) if self.training else 0.0
        attn_dropout = ((self.cfg.dropout or 0.0) if self.cfg.attn_dropout is None else self.cfg.attn_dropout) \
            if self.training else 0.0
        weights_name = f"blocks.{layer}.attn.weights" if hooks is not None else None
        explicit = hooks is not None and weights_name in hooks.names
        if cache is not None and T == 1 and not explicit and not torch.compiler.is_compiling():
            y = fused_decode.write_attend(q, k, v, *cache.step(layer, pos, B * self.cfg.n_head), attn_dropout)
        elif pos is not None:  # a static decode step, compiled or written out: the query at pos sees slots 0..pos
            keys, values, past, rows, at, _, visible = cache.step(layer, pos, B * self.cfg.n_head)
            fused_decode.write(k, v, keys, values, past, rows, at)
            k, v = keys, values  # (B, H, max_len, D); visible (B|1, 1, 1, max_len)
            # the (B, H, max_len) scores of one query, written out as products and sums, which inductor fuses into
            # one loop: an SDPA call would cost more in overhead than this arithmetic (eagerly, it takes twice the
            # time of attend's two batched products)
            scores = (q * k).sum(-1).mul_(1.0 / math.sqrt(D)).masked_fill_(~visible[:, :, 0], float("-inf"))
            weights = scores.softmax(-1)  # (B, H, max_len)
            if explicit:
                hooks.keep(weights_name, weights.unsqueeze(-2))  # (B, H, 1, max_len)
            y = (weights.unsqueeze(-1) * v).sum(-2, keepdim=True)  # (B, H, 1, D)
        else:
            past = 0
            if cache is not None:
                past = cache.pos
                k, v = cache.append(layer, k, v)  # (B, H, past+T, D)
            if explicit:  # the weights written out: query past+t sees the keys up to its own position
                visible = mask if mask is not None else torch.ones(T, past + T, dtype=torch.bool,
                                                                   device=x.device).tril(diagonal=past)
                scores = q @ k.transpose(-2, -1) / math.sqrt(D)  # (B, H, T, past+T)
                weights = scores.masked_fill(~visible, float("-inf")).softmax(-1)
                hooks.keep(weights_name, weights)
                y = (F.dropout(weights, attn_dropout, True) if attn_dropout else weights) @ v  # (B, H, T, D)
            elif mask is not None:  # packed sequences: each token sees the earlier tokens of its own only
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=attn_dropout)
            elif past == 0:
                y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=attn_dropout)
            elif T == 1:
                y = F.scaled_dot_product_attention(q, k, v, dropout_p=attn_dropout)
            else:  # queries at past..past+T-1 see keys up to their own position
                mask = torch.ones(T, past + T, dtype=torch.bool, device=x.device).tril(diagonal=past)
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=attn_dropout)
        y = self.proj(y.transpose(1, 2).reshape(B, T, C))  # (B, T, C)
        return F.dropout(y, dropout, True) if dropout else y


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.kind = cfg.mlp
        hidden = cfg.mlp_width
        gates = 2 if self.kind == "swiglu" else 1  # SwiGLU: gate and value in one matmul
        self.fc = nn.Linear(cfg.n_embd, gates * hidden, bias=cfg.bias)
        self.proj = nn.Linear(hidden, cfg.n_embd, bias=cfg.bias)
        self.dropout = cfg.dropout or 0.0
        self.fused = self.kind in FUSED_MLPS and not cfg.bias  # training in eager mode takes FUSED_MLPS[kind]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused and not self.dropout and eager_training(x, [self.fc.weight, self.proj.weight]) \
                and type(self.fc) is nn.Linear and type(self.proj) is nn.Linear and untouched((self.fc, self.proj)):
            return FUSED_MLPS[self.kind].apply(x, self.fc.weight, self.proj.weight)
        h = self.fc(x)
        if self.kind == "gelu":
            h = F.gelu(h)
        elif self.kind == "gelu_tanh":
            h = F.gelu(h, approximate="tanh")
        elif self.kind == "relu2":
            h = _SquaredReLU.apply(h) if torch.is_grad_enabled() else torch.relu(h).square()
        else:
            gate, value = h.chunk(2, dim=-1)
            h = F.silu(gate) * value
        h = self.proj(h)
        return F.dropout(h, self.dropout, True) if self.dropout and self.training else h


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm1 = norm_layer(cfg, cfg.n_embd)
        self.attn = CausalSelfAttention(cfg)
        self.norm2 = norm_layer(cfg, cfg.n_embd)
        self.mlp = MLP(cfg)
        # GPT-2's block (LayerNorm, learned positions, exact GELU, no QK-norm): eager CPU training takes it whole as
        # one hand-written function (fused.gpt2_block) when nothing else is asked of it (forward)
        self.gpt2 = cfg.norm == "layernorm" and cfg.mlp == "gelu" and not cfg.qk_norm and cfg.pos == "learned"
        self.decode_weights: Optional[tuple] = None  # fused_decode.block's, gathered on its first call

    def forward(self, x, rope, cache, layer, pos=None, ve=None, hooks=None, mask=None):
        dropout = self.training and bool(self.attn.cfg.dropout or self.attn.cfg.attn_dropout)
        if self.gpt2 and cache is None and mask is None and ve is None and not dropout \
                and (hooks is None or f"blocks.{layer}.attn.weights" not in hooks.names) \
                and fused_decode.unhooked(self, OWN_KINDS):
            params = self.gpt2_params()
            if gpt2_block_fits(x, params):
                return gpt2_block(x, self.attn.cfg.n_head, self.norm1.eps, *params)
        if cache is not None and x.size(1) == 1 and hooks is None and not self.training \
                and fused_decode.decode_fits(x, self.attn.qkv.weight) and fused_decode.unhooked(self, OWN_KINDS):
            # a decode step: as one TorchScript call
            return fused_decode.block(x, self, rope, ve, cache.step(layer, pos, x.size(0) * self.attn.cfg.n_head))
        x = x + self.attn(self.norm1(x), rope, cache, layer, pos, ve, hooks, mask)
        return x + self.mlp(self.norm2(x))

    def gpt2_params(self) -> list[Optional[torch.Tensor]]:
        """The block's weights and biases in fused.gpt2_block's order."""
        return [t for m in (self.norm1, self.attn.qkv, self.attn.proj, self.norm2, self.mlp.fc, self.mlp.proj)
                for t in (m.weight, m.bias)]


OWN_KINDS = (Block, CausalSelfAttention, MLP, RMSNorm)  # a block and its parts as built here: fused_decode.unhooked


class GPT(HookedModel):
    def __init__(self, cfg: ModelConfig, vocab_size: int):
        super().__init__()
        if vocab_size <= 0:
            raise LmlabError(f"vocab_size must be positive, got {vocab_size}")
        self.cfg = cfg
        self.vocab_size = vocab_size
        self.wte = nn.Embedding(vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd) if cfg.pos == "learned" else None
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm_f = norm_layer(cfg, cfg.n_embd)
        self.lm_head = nn.Linear(cfg.n_embd, vocab_size, bias=False)
        self.vte = nn.Embedding(vocab_size, cfg.n_embd) if cfg.value_embed else None
        self.ve_weights = nn.Parameter(torch.empty(cfg.n_layer)) if cfg.value_embed else None
        self.skip_weights = nn.Parameter(torch.empty(cfg.n_layer // 2)) if cfg.unet_skips else None
        if cfg.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        if cfg.pos == "rope":
            cos, sin = rotary_tables(cfg.block_size, cfg.head_dim, cfg.rope_base)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Initialise every tensor.

        - embeddings (token, learned position) and linear weights: normal(0, 0.02), as in GPT-2;
        - the output projections of attention and MLP: zero when zero_init_proj (each block starts as the identity,
          so depth does not disturb the first steps), otherwise normal(0, 0.02/sqrt(2 n_layer)), GPT-2's scaling
          for the residual sum of 2 n_layer branches;
        - biases: zero; norm gains: one (their defaults);
        - the value embedding's weight per layer: 0.5; the U-net skip weights: one.
        """
        std = 0.02
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, 0.0, std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, 0.0, std)
        for block in self.blocks:
            for proj in (block.attn.proj, block.mlp.proj):
                if self.cfg.zero_init_proj:
                    nn.init.zeros_(proj.weight)
                else:
                    nn.init.normal_(proj.weight, 0.0, std / math.sqrt(2 * self.cfg.n_layer))
        if self.ve_weights is not None:
            nn.init.constant_(self.ve_weights, 0.5)
        if self.skip_weights is not None:
            nn.init.ones_(self.skip_weights)

    def make_cache(self, batch: int, device=None, dtype=None, max_len: Optional[int] = None,
                   grow: bool = False) -> KVCache:
        """A KVCache of `batch` rows of max_len slots (default and at most block_size); grow: see KVCache."""
        p = self.wte.weight
        return KVCache(
            self.cfg.n_layer, batch, self.cfg.n_head, min(max_len or self.cfg.block_size, self.cfg.block_size),
            self.cfg.head_dim, device or p.device, dtype or p.dtype, grow,
        )

    def hook_points(self) -> list[str]:
        """The names capture() takes, in the order a forward reaches them: for each block, the residual stream
        going in (with the U-net skip joined) and coming out, (B, T, C), and its attention weights (B, H, T, keys:
        row t is how much position t attends to each position, zero after t); then the final norm's output
        (B, T, C) and the logits (B, T, V)."""
        per_block = ("resid_in", "attn.weights", "resid_out")
        return [f"blocks.{i}.{p}" for i in range(self.cfg.n_layer) for p in per_block] + ["final_norm", "logits"]

    def forward(self, idx: torch.Tensor, cache: Optional[KVCache] = None,
                pos: Optional[torch.Tensor] = None, documents: Optional[torch.Tensor] = None) -> torch.Tensor:
        """idx: (B, T) token ids. Returns the next-token logits (B, T, V) at every position.

        With a cache, idx holds only the new tokens; positions continue from cache.pos.
        With a cache and pos, a (1,) tensor: one decode step, idx (B, 1) at position pos, with the same shapes at
        every position (see KVCache.step); cache.pos is left alone, the caller keeps pos. pos (B,) puts each row at
        its own position (rows of different lengths: generate.generate_batch).
        With documents, (B, T) ids: each row packs several sequences (Packing); no cache. Without, nothing of this
        runs: the plain causal path.
        """
        B, T = idx.shape
        mask = None
        if documents is not None:
            if cache is not None or documents.shape != idx.shape:
                raise ValueError("packed sequences take document ids shaped like idx, and no cache")
            if T > self.cfg.block_size:
                raise ValueError(f"sequence of {T} tokens exceeds block_size {self.cfg.block_size}")
            packing = Packing(documents)
            positions, mask = packing.positions, packing.mask  # (B, T) and (B, 1, T, T)
        elif pos is not None:
            if cache is None or T != 1 or pos.dim() != 1 or pos.size(0) not in (1, B):
                raise ValueError("a decode step at a position tensor takes one token per row, a cache, and one "
                                 "position (1,) or one per row (B,)")
            positions = pos.view(-1, 1)  # (1, 1) or (B, 1)
        else:
            past = cache.pos if cache is not None else 0
            if past + T > self.cfg.block_size:
                raise ValueError(f"sequence of {past + T} tokens exceeds block_size {self.cfg.block_size}")
            positions = slice(past, past + T)
        hooks = self._capture  # the capture on (HookedModel.capture); None, the usual case, costs a check per hook
        x = self.wte(idx)  # (B, T, C)
        if self.wpe is not None:  # learned positions join the stream; rotary ones turn queries and keys instead
            x, rope = x + self.wpe.weight[positions], None
        else:
            # each (T, D/2), or (B, T, D/2) for per-row positions (packed sequences, a decode step at pos)
            rope = (self.rope_cos[positions], self.rope_sin[positions])
        if self.cfg.dropout and self.training:
            x = F.dropout(x, self.cfg.dropout, True)
        ve = self.vte(idx) if self.vte is not None else None  # (B, T, C): the value embedding, weighted per layer
        half = self.cfg.n_layer // 2
        mirrored = self.cfg.n_layer - half  # U-net skips: blocks from here on get their mirror's output added
        skips: list[torch.Tensor] = []  # the outputs of the first half's blocks
        # a decode step of eager CPU inference: each block as one TorchScript call (Block.forward's own decode path),
        # without the block module's call around it
        direct = fused_decode.direct(x, self.blocks, OWN_KINDS) if cache is not None and T == 1 and hooks is None \
            else None
        steps = cache.steps(pos, B * self.cfg.n_head) if direct else None  # where each layer's step writes and reads
        with fused_decode.executing(bool(direct)):
            for layer, block in enumerate(self.blocks):
                if self.skip_weights is not None and layer >= mirrored:
                    x = x + self.skip_weights[layer - mirrored] * skips.pop()
                if hooks is not None:
                    hooks.keep(f"blocks.{layer}.resid_in", x)
                value = None if ve is None else self.ve_weights[layer] * ve
                if direct:
                    x = fused_decode.run(x, *direct, layer, rope, value, steps[layer])
                else:
                    x = block(x, rope, cache, layer, pos, value, hooks, mask)
                if hooks is not None:
                    hooks.keep(f"blocks.{layer}.resid_out", x)
                if self.skip_weights is not None and layer < half:
                    skips.append(x)
        if cache is not None and pos is None:
            cache.pos += T
        return self.head(x, hooks)  # (B, T, V)

    def head(self, x: torch.Tensor, hooks: Optional[Capture] = None) -> torch.Tensor:
        """Logits (B, T, V) from a residual stream (B, T, C): the final norm, the output head, and the soft cap if
        any. On a block's output other than the last, these are the logit lens's (inside.py)."""
        x = self.norm_f(x)  # (B, T, C)
        if hooks is not None:
            hooks.keep("final_norm", x)
        logits = self.lm_head(x)  # (B, T, V)
        cap = self.cfg.logit_softcap
        if cap:
            logits = cap * torch.tanh(logits / cap)
        if hooks is not None:
            hooks.keep("logits", logits)
        return logits


class Bigram(HookedModel):
    """Next-token logits that depend on the current token only: a learned VxV table."""

    def __init__(self, cfg: ModelConfig, vocab_size: int):
        super().__init__()
        if vocab_size <= 0:
            raise LmlabError(f"vocab_size must be positive, got {vocab_size}")
        self.cfg = cfg
        self.vocab_size = vocab_size
        self.table = nn.Embedding(vocab_size, vocab_size)
        self.blocks = nn.ModuleList()  # none: the model interface has them for every architecture
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """All logits start at zero: the uniform distribution, loss ln(V)."""
        nn.init.zeros_(self.table.weight)

    def make_cache(self, batch: int, device=None, dtype=None, max_len: Optional[int] = None,
                   grow: bool = False) -> KVCache:
        return KVCache(0, batch, 1, max_len or self.cfg.block_size, 1, device or self.table.weight.device,
                       dtype or torch.float32)

    def hook_points(self) -> list[str]:
        return ["logits"]

    def forward(self, idx: torch.Tensor, cache: Optional[KVCache] = None,
                pos: Optional[torch.Tensor] = None, documents: Optional[torch.Tensor] = None) -> torch.Tensor:
        """idx: (B, T) token ids. Returns the logits (B, T, V); a cache only counts the positions. Packed sequences
        (documents) change nothing: a logit depends on its own token only."""
        if cache is not None and pos is None:
            cache.pos += idx.size(1)
        logits = self.table(idx)  # (B, T, V)
        if self._capture is not None:
            self._capture.keep("logits", logits)
        return logits


def parameter_count(cfg: ModelConfig, vocab_size: int) -> int:
    """Elements of the model's parameters and buffers (GPT.__init__'s list), counted without allocating them: one
    block and the final norm are built on the meta device (shapes only), the tables are counted."""
    if cfg.arch == "bigram":
        return vocab_size * vocab_size
    with torch.device("meta"):
        block = sum(p.numel() for p in Block(cfg).parameters())
        final_norm = sum(p.numel() for p in norm_layer(cfg, cfg.n_embd).parameters())
    C, T = cfg.n_embd, cfg.block_size
    tables = (1 + (not cfg.tie_embeddings) + cfg.value_embed) * vocab_size * C  # token, head, value embedding
    positions = T * C if cfg.pos == "learned" else T * cfg.head_dim  # a learned table, or RoPE's cos and sin
    scalars = cfg.n_layer * cfg.value_embed + cfg.n_layer // 2 * cfg.unet_skips
    return cfg.n_layer * block + final_norm + tables + positions + scalars


BLOCK_OVERHEAD = 64 << 10  # bytes of Python objects per transformer block (about 40 KiB measured), whatever its size


def memory_needed(cfg: ModelConfig, vocab_size: int, training: bool = False, batch: int = 1,
                  value_bytes: int = 4) -> int:
    """A lower bound on the bytes a model of `cfg` takes: its weights (twice while a checkpoint loads into them),
    or, to train it, weights, gradients and two optimizer moments; plus the activations of a batch of `batch`
    windows (those a backward pass keeps, when training) and the logits."""
    weights = parameter_count(cfg, vocab_size) * value_bytes
    tokens = batch * cfg.block_size
    if cfg.arch == "bigram":
        per_token = 3 * vocab_size
    elif training:  # kept for the backward pass: about 7 widths and 2 MLP widths a block, and the logits 3 times
        per_token = cfg.n_layer * (7 * cfg.n_embd + 2 * cfg.mlp_width) + 3 * vocab_size
    else:  # one block's activations at a time, a key and a value cache per block, and the logits
        per_token = 8 * cfg.n_embd + 2 * cfg.mlp_width + 2 * cfg.n_layer * cfg.n_embd + 2 * vocab_size
    return ((4 if training else 2) * weights + tokens * per_token * value_bytes
            + (cfg.n_layer if cfg.arch == "gpt" else 0) * BLOCK_OVERHEAD)


def check_fits(cfg: ModelConfig, vocab_size: int, what: str, training: bool = False, batch: int = 1,
               value_bytes: int = 4) -> None:
    """Refuse, before anything is allocated, a model that cannot fit in the memory this process may use (see
    common.memory_limit): one line with the need, the limit and how to raise it, instead of the kernel's
    out-of-memory killer or an allocation error halfway through."""
    needed = memory_needed(cfg, vocab_size, training, batch, value_bytes)
    limit, source = memory_limit()
    if needed > limit:
        use = f"to train with batches of {batch} x {cfg.block_size} tokens" if training else "to load and run"
        raise LmlabError(
            f"{what}: a model of {cfg.n_layer:,} layer{'s' * (cfg.n_layer != 1)}, {cfg.n_embd:,} wide, context "
            f"{cfg.block_size:,} and vocabulary {vocab_size:,} needs at least {fmt_bytes(needed)} {use}, more than "
            f"the {fmt_bytes(limit)} this process may use, set by {source}; for a real model that big, free memory "
            f"or set {MEMORY_ENV}=SIZE (e.g. {MEMORY_ENV}={-(-needed // (1 << 30))}G) to go ahead")


def build_model(cfg: ModelConfig, vocab_size: int) -> nn.Module:
    """The model named by cfg.arch, for a tokenizer with vocab_size symbols."""
    if cfg.unset():
        raise LmlabError(f"the model's {', '.join(cfg.unset())} are left to the budget rules; apply them first "
                         f"(lmlab.budget.apply_budget)")
    return Bigram(cfg, vocab_size) if cfg.arch == "bigram" else GPT(cfg, vocab_size)


@torch.no_grad()
def grow_vocab(model: nn.Module, vocab_size: int) -> int:
    """Grow a model in place to `vocab_size` token ids, for ids appended to its tokenizer (tokenizer.
    add_special_tokens): each new row of the token table, of an untied output head and of the value embedding
    starts as the mean of that table's existing rows (the bigram's table grows new rows and columns, each the mean
    of the existing ones), so a new token starts as an average token rather than a random one. A tied head stays
    tied. Call it before the optimizer is built: the grown tensors are new parameters. Returns how many rows were
    added (0 when the model is that size already)."""
    added = vocab_size - model.vocab_size
    if added < 0:
        raise LmlabError(f"cannot shrink a model's vocabulary from {model.vocab_size} to {vocab_size}")
    if added == 0:
        return 0

    def grown(weight: torch.Tensor, dim: int = 0) -> torch.Tensor:  # `added` more rows (dim 0) or columns (dim 1)
        return torch.cat([weight, weight.mean(dim, keepdim=True).expand(*((added, -1) if dim == 0 else (-1, added)))],
                         dim)

    def parameter(weight: torch.Tensor, like: nn.Parameter) -> nn.Parameter:
        return nn.Parameter(weight.contiguous(), requires_grad=like.requires_grad)

    if isinstance(model, Bigram):
        old = model.table.weight  # (V, V): row = the current token, column = the next one's logit
        model.table.weight = parameter(grown(grown(old), 1), old)
        model.table.num_embeddings = vocab_size
    else:
        tied = model.lm_head.weight is model.wte.weight
        model.wte.weight = parameter(grown(model.wte.weight), model.wte.weight)
        model.wte.num_embeddings = vocab_size
        model.lm_head.weight = model.wte.weight if tied else parameter(grown(model.lm_head.weight),
                                                                       model.lm_head.weight)
        model.lm_head.out_features = vocab_size
        if model.vte is not None:
            model.vte.weight = parameter(grown(model.vte.weight), model.vte.weight)
            model.vte.num_embeddings = vocab_size
    model.vocab_size = vocab_size
    return added


# Parameter names, for the modules that treat parameters by role (telemetry, optim)
EMBEDDING_NAMES = ("wte.", "wpe.", "vte.", "table.")  # lookup tables: token, learned position, value, the bigram's
BLOCK_NAMES = "blocks."  # then the block's index


def unique_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) pairs with each tensor once: a tied weight keeps its first name (wte.weight, not
    lm_head.weight). Counting, optimising or perturbing a tied tensor twice would be wrong."""
    return list(model.named_parameters(remove_duplicate=True))


def layer_of(name: str) -> str:
    """The layer a parameter belongs to: "embed", "block.N", or "head" (the final norm and the output head)."""
    if name.startswith(BLOCK_NAMES):
        return "block." + name[len(BLOCK_NAMES):].split(".", 1)[0]
    if name.startswith(EMBEDDING_NAMES):
        return "embed"
    return "head"


def is_hidden_matrix(name: str, p: torch.Tensor) -> bool:
    """A 2-D weight inside a transformer block: what Muon orthogonalises (embeddings and the head are not)."""
    return p.dim() == 2 and name.startswith(BLOCK_NAMES)


def count_params(model: nn.Module, non_embedding: bool = False) -> int:
    """Parameters, each tensor once; non_embedding leaves out the transformer's token and position tables."""
    n = sum(p.numel() for _, p in unique_parameters(model))
    if non_embedding and isinstance(model, GPT):
        n -= model.wte.weight.numel()
        for table in (model.wpe, model.vte):
            if table is not None:
                n -= table.weight.numel()
    return n


def matmul_params(model: nn.Module) -> int:
    """Weights that multiply every token's activations: count_params(non_embedding=True), plus a head tied to the
    token table, which is left out there but still multiplies."""
    n = count_params(model, non_embedding=True)
    if isinstance(model, GPT) and model.cfg.tie_embeddings:
        n += model.lm_head.weight.numel()
    return n
