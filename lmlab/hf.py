"""Models out to Hugging Face `transformers` and in from it: a run becomes a folder that stock classes load (GPT-2,
Llama, Qwen3, Arcee, Apertus, GPT-NeoX), and such a folder, or a hub id, becomes the start of a run (--init-from).

Writing and reading these folders needs only safetensors, tokenizers and JSON; `transformers` checks an export
when it is installed, and `huggingface_hub` downloads a hub id. Weights are read from safetensors only: a pickled
.bin file can run code when it is loaded.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from . import rundir
from . import tokenizer as tok
from .common import LmlabError, atomic_write_bytes, atomic_write_json, check_new_folder
from .config import TrainConfig
from .model import NORM_EPS, ModelConfig, build_model, check_fits

# The files of a Hugging Face model folder (a folder of its own, not a run folder: rundir names those)
HF_CONFIG = "config.json"
HF_WEIGHTS = "model.safetensors"
HF_WEIGHTS_INDEX = "model.safetensors.index.json"
HF_TOKENIZER = "tokenizer.json"
HF_TOKENIZER_CONFIG = "tokenizer_config.json"
HF_GENERATION_CONFIG = "generation_config.json"
HF_CHAT_TEMPLATE = "chat_template.jinja"  # where newer transformers save a tokenizer's chat template
PICKLES = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")

TOLERANCE = 1e-4  # the largest |logit difference| an export may show against transformers (float32)

GPT2, LLAMA, QWEN3, ARCEE, APERTUS, NEOX = ("GPT2LMHeadModel", "LlamaForCausalLM", "Qwen3ForCausalLM",
                                             "ArceeForCausalLM", "ApertusForCausalLM", "GPTNeoXForCausalLM")
MODEL_TYPES = {GPT2: "gpt2", LLAMA: "llama", QWEN3: "qwen3", ARCEE: "arcee", APERTUS: "apertus", NEOX: "gpt_neox"}
BASE = {GPT2: "transformer.", LLAMA: "model.", QWEN3: "model.", ARCEE: "model.", APERTUS: "model.",
        NEOX: "gpt_neox."}  # the prefix of the base model's tensors
HEAD = {arch: "embed_out.weight" if arch == NEOX else "lm_head.weight" for arch in MODEL_TYPES}
# buffers some checkpoints carry (GPT-2's causal mask, rotary tables): nothing to import
IGNORED = re.compile(r".*(\.attn\.bias|\.attn\.masked_bias|\.attention\.bias|\.attention\.masked_bias|"
                     r"rotary_emb\.inv_freq)$")

# lmlab's MLP non-linearity as each class's activation name; for SwiGLU, the gate's
ACTIVATIONS = {"gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh", "relu2": "relu2", "swiglu": "silu"}
FROM_ACTIVATION = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "relu2": "relu2"}
GATED_ACTIVATIONS = ("silu", "swish")

# The char tokenizer as a tokenizer.json: each character is its own pre-token, looked up in a WordLevel vocabulary
# that has no unknown token, so a character outside it is an error there too. (?m) is Oniguruma's dot-all.
ONE_CHARACTER = "(?m)."


# ---------------------------------------------------------------------------------------------------------------
# Which class: lmlab's options -> the closest stock transformers class


def architecture(cfg: ModelConfig) -> str:
    """The transformers class that computes exactly what this model computes, or an error that names the option
    in the way and the nearest choice that maps."""
    if cfg.arch != "gpt":
        raise LmlabError(f"--arch {cfg.arch} has no transformers class (it is a bare table of logits); the nearest "
                         f"that maps is the gpt architecture (e.g. --preset tiny)")
    for option, on, nearest in (("--logit-softcap", cfg.logit_softcap, "--logit-softcap 0"),
                                ("--value-embed", cfg.value_embed, "--no-value-embed"),
                                ("--unet-skips", cfg.unet_skips, "--no-unet-skips")):
        if on:
            raise LmlabError(f"{option} has no place in the transformers classes lmlab exports to; nearest that "
                             f"maps: {nearest}")
    if cfg.pos == "learned":
        if cfg.norm != "layernorm":
            raise LmlabError("--pos learned with --norm rmsnorm has no stock transformers class; nearest that maps: "
                             "--norm layernorm (GPT2LMHeadModel) or --pos rope (ArceeForCausalLM, LlamaForCausalLM)")
        if cfg.mlp == "swiglu":
            raise LmlabError("--mlp swiglu with --pos learned has no stock transformers class; nearest that maps: "
                             "--mlp gelu (GPT2LMHeadModel) or --pos rope --norm rmsnorm (LlamaForCausalLM)")
        if cfg.qk_norm:
            raise LmlabError("--qk-norm with --pos learned has no stock transformers class (GPT-2 has no QK-norm); "
                             "nearest that maps: --no-qk-norm (GPT2LMHeadModel)")
        return GPT2
    if cfg.norm == "layernorm":
        if cfg.mlp == "swiglu":
            raise LmlabError("--mlp swiglu with --norm layernorm has no stock transformers class; nearest that maps: "
                             "--norm rmsnorm (LlamaForCausalLM) or --mlp gelu (GPTNeoXForCausalLM)")
        if cfg.qk_norm:
            raise LmlabError("--qk-norm with --norm layernorm has no stock transformers class; nearest that maps: "
                             "--norm rmsnorm (ApertusForCausalLM, Qwen3ForCausalLM) or --no-qk-norm "
                             "(GPTNeoXForCausalLM)")
        return NEOX
    if cfg.qk_norm and cfg.bias:
        raise LmlabError("--bias with --qk-norm has no stock transformers class (the MLPs of Qwen3 and Apertus have "
                         "no biases); nearest that maps: --no-bias, or --no-qk-norm (LlamaForCausalLM, "
                         "ArceeForCausalLM)")
    if cfg.mlp == "swiglu":
        return QWEN3 if cfg.qk_norm else LLAMA
    return APERTUS if cfg.qk_norm else ARCEE


def norm_eps(cfg: ModelConfig) -> float:
    return NORM_EPS[cfg.norm] if cfg.norm_eps is None else cfg.norm_eps


def _lm_shapes(cfg: ModelConfig, vocab_size: int) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):  # shapes only: no memory, no initialisation cost
        model = build_model(cfg, vocab_size)
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


# ---------------------------------------------------------------------------------------------------------------
# Where each tensor goes: one table, read one way to export and the other way to import


@dataclass(frozen=True)
class Piece:
    """A block of rows of a tensor, as lmlab and as the transformers class store it.

    hf: the class's tensor that holds it (None: the class has no place for it, so it must be zero); lm: lmlab's
    tensor (None: lmlab has none, and the class's must be zero); rows: which rows of lmlab's tensor (None: all);
    shape: the block's shape in lmlab; op: how the class stores the block: "" as it is, "T" transposed (GPT-2's
    Conv1D), "rope" with each head's rows reordered from lmlab's RoPE pairs (2i, 2i+1) to rotate_half's (i, i+D/2),
    "prefix" as the first rows of a longer table (a learned position table longer than the run's context).
    A class's tensor made of several pieces is their rows, stacked in order.
    """

    hf: Optional[str]
    lm: Optional[str]
    shape: tuple[int, ...]
    rows: Optional[tuple[int, int]] = None
    op: str = ""


class _Plan:
    """The pieces of a plan as they are added: add(hf, lm, rows, op, shape) for a tensor lmlab has (its shape, or its
    rows' shape, from lmlab's), bias(kind, hf, lm, size, rows, op) for a bias, which either side may lack."""

    def __init__(self, cfg: ModelConfig, vocab_size: int, hf_bias: dict[str, bool]):
        self.cfg, self.hf_bias = cfg, hf_bias
        self.shapes = _lm_shapes(cfg, vocab_size)
        self.hidden = self.shapes["blocks.0.mlp.proj.weight"][1]
        self.pieces: list[Piece] = []

    def add(self, hf, lm, rows=None, op="", shape=None):
        if shape is None:
            shape = self.shapes[lm] if rows is None else (rows[1] - rows[0], *self.shapes[lm][1:])
        self.pieces.append(Piece(hf, lm, tuple(shape), rows, op))

    def bias(self, kind, hf, lm, size, rows=None, op=""):
        lm_has = self.cfg.bias and (kind != "norm" or self.cfg.norm == "layernorm")
        if self.hf_bias[kind] or lm_has:
            self.add(hf if self.hf_bias[kind] else None, lm if lm_has else None, rows, op, (size,))


def _gpt2_plan(p: _Plan, base: str) -> None:
    """GPT2LMHeadModel's tensors: Conv1D weights (transposed), the learned position table as a prefix."""
    C, hidden = p.cfg.n_embd, p.hidden
    p.add(base + "wte.weight", "wte.weight")
    p.add(base + "wpe.weight", "wpe.weight", op="prefix")
    for i in range(p.cfg.n_layer):
        a, h = f"blocks.{i}.", f"{base}h.{i}."
        for lm_norm, hf_norm in (("norm1", "ln_1"), ("norm2", "ln_2")):
            p.add(h + hf_norm + ".weight", a + lm_norm + ".weight")
            p.bias("norm", h + hf_norm + ".bias", a + lm_norm + ".bias", C)
        for lm_lin, hf_lin, width in (("attn.qkv", "attn.c_attn", 3 * C), ("attn.proj", "attn.c_proj", C),
                                      ("mlp.fc", "mlp.c_fc", hidden), ("mlp.proj", "mlp.c_proj", C)):
            p.add(h + hf_lin + ".weight", a + lm_lin + ".weight", op="T")
            p.bias("attn" if lm_lin.startswith("attn") else "mlp", h + hf_lin + ".bias", a + lm_lin + ".bias", width)
    p.add(base + "ln_f.weight", "norm_f.weight")
    p.bias("norm", base + "ln_f.bias", "norm_f.bias", C)


def _neox_plan(p: _Plan, base: str) -> None:
    """GPTNeoXForCausalLM's tensors: one fused query-key-value projection, interleaved head by head."""
    C, D, hidden = p.cfg.n_embd, p.cfg.head_dim, p.hidden
    p.add(base + "embed_in.weight", "wte.weight")
    for i in range(p.cfg.n_layer):
        a, h = f"blocks.{i}.", f"{base}layers.{i}."
        for lm_norm, hf_norm in (("norm1", "input_layernorm"), ("norm2", "post_attention_layernorm")):
            p.add(h + hf_norm + ".weight", a + lm_norm + ".weight")
            p.bias("norm", h + hf_norm + ".bias", a + lm_norm + ".bias", C)
        for head in range(p.cfg.n_head):  # GPT-NeoX keeps each head's query, key and value rows together
            for j in range(3):
                rows, op = (j * C + head * D, j * C + (head + 1) * D), "rope" if j < 2 else ""
                p.add(h + "attention.query_key_value.weight", a + "attn.qkv.weight", rows, op)
                p.bias("attn", h + "attention.query_key_value.bias", a + "attn.qkv.bias", D, rows, op)
        p.add(h + "attention.dense.weight", a + "attn.proj.weight")
        p.bias("attn", h + "attention.dense.bias", a + "attn.proj.bias", C)
        p.add(h + "mlp.dense_h_to_4h.weight", a + "mlp.fc.weight")
        p.bias("mlp", h + "mlp.dense_h_to_4h.bias", a + "mlp.fc.bias", hidden)
        p.add(h + "mlp.dense_4h_to_h.weight", a + "mlp.proj.weight")
        p.bias("mlp", h + "mlp.dense_4h_to_h.bias", a + "mlp.proj.bias", C)
    p.add(base + "final_layer_norm.weight", "norm_f.weight")
    p.bias("norm", base + "final_layer_norm.bias", "norm_f.bias", C)


def _llama_plan(p: _Plan, base: str, arch: str) -> None:
    """The Llama family's tensors (Llama, Qwen3, Arcee, Apertus): separate q, k, v projections, and SwiGLU's gate and
    up projections as the two halves of lmlab's fc."""
    C, hidden = p.cfg.n_embd, p.hidden
    norms = (("attention_layernorm", "feedforward_layernorm") if arch == APERTUS
             else ("input_layernorm", "post_attention_layernorm"))
    p.add(base + "embed_tokens.weight", "wte.weight")
    for i in range(p.cfg.n_layer):
        a, h = f"blocks.{i}.", f"{base}layers.{i}."
        p.add(h + norms[0] + ".weight", a + "norm1.weight")
        p.add(h + norms[1] + ".weight", a + "norm2.weight")
        for j, name in enumerate("qkv"):
            rows, op = (j * C, (j + 1) * C), "rope" if name != "v" else ""
            p.add(h + f"self_attn.{name}_proj.weight", a + "attn.qkv.weight", rows, op)
            p.bias("attn", h + f"self_attn.{name}_proj.bias", a + "attn.qkv.bias", C, rows, op)
        p.add(h + "self_attn.o_proj.weight", a + "attn.proj.weight")
        p.bias("attn", h + "self_attn.o_proj.bias", a + "attn.proj.bias", C)
        if p.cfg.qk_norm:
            p.add(h + "self_attn.q_norm.weight", a + "attn.q_norm.weight", op="rope")
            p.add(h + "self_attn.k_norm.weight", a + "attn.k_norm.weight", op="rope")
        inputs = ("gate_proj", "up_proj") if p.cfg.mlp == "swiglu" else ("up_proj",)  # lmlab: gate rows first
        for j, name in enumerate(inputs):
            rows = (j * hidden, (j + 1) * hidden)
            p.add(h + f"mlp.{name}.weight", a + "mlp.fc.weight", rows)
            p.bias("mlp", h + f"mlp.{name}.bias", a + "mlp.fc.bias", hidden, rows)
        p.add(h + "mlp.down_proj.weight", a + "mlp.proj.weight")
        p.bias("mlp", h + "mlp.down_proj.bias", a + "mlp.proj.bias", C)
    p.add(base + "norm.weight", "norm_f.weight")


def plan(arch: str, cfg: ModelConfig, vocab_size: int, hf_bias: dict[str, bool]) -> list[Piece]:
    """Every tensor of the model, where lmlab keeps it and where the class `arch` keeps it. hf_bias says which
    biases the class has: "attn", "mlp" and "norm" (LayerNorm)."""
    p = _Plan(cfg, vocab_size, hf_bias)
    if arch == GPT2:
        _gpt2_plan(p, BASE[arch])
    elif arch == NEOX:
        _neox_plan(p, BASE[arch])
    else:
        _llama_plan(p, BASE[arch], arch)
    if not cfg.tie_embeddings:
        p.add(HEAD[arch], "lm_head.weight")
    return p.pieces


def _rope_order(head_dim: int) -> torch.Tensor:
    """Row j of a head in rotate_half's layout is row order[j] in lmlab's: lmlab rotates the pairs (2i, 2i+1),
    rotate_half the pairs (i, i + D/2), by the same angle. q.k is unchanged when q and k are reordered alike."""
    return torch.cat((torch.arange(0, head_dim, 2), torch.arange(1, head_dim, 2)))


def _reorder_heads(t: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    D = len(order)
    return t.reshape(-1, D, *t.shape[1:])[:, order].reshape(t.shape)


def _groups(pieces: list[Piece]) -> dict[str, list[Piece]]:
    groups: dict[str, list[Piece]] = {}
    for p in pieces:
        if p.hf is not None:
            groups.setdefault(p.hf, []).append(p)
    return groups


def to_hf(pieces: list[Piece], state: dict[str, torch.Tensor], head_dim: int, arch: str) -> dict[str, torch.Tensor]:
    """The class's tensors from lmlab's state dict (each a fresh contiguous float32 tensor, as safetensors needs)."""
    order = _rope_order(head_dim)
    for p in pieces:
        if p.hf is None and p.lm is not None and _block(state, p).any():
            raise LmlabError(f"{p.lm} is not zero, and {arch} has no place for it")
    out = {}
    for name, group in _groups(pieces).items():
        parts = []
        for p in group:
            t = _block(state, p) if p.lm is not None else torch.zeros(p.shape)
            if p.op == "rope":
                t = _reorder_heads(t, order)
            parts.append(t.t() if p.op == "T" else t)
        out[name] = torch.cat(parts).float().contiguous().clone()
    return out


def _block(state: dict[str, torch.Tensor], p: Piece) -> torch.Tensor:
    t = state[p.lm].detach().cpu()
    return t if p.rows is None else t[p.rows[0] : p.rows[1]]


def check_shapes(pieces: list[Piece], shapes: dict[str, tuple[int, ...]], arch: str, tied: bool, where: str) -> None:
    """Every tensor of the class is there in the shape its config.json says, and there is no other (buffers
    aside): checked on the safetensors headers, before a tensor is read or lmlab's model is built."""
    for name, group in _groups(pieces).items():
        if name not in shapes:
            raise LmlabError(f"{where} has no tensor {name}")
        want = (sum(p.shape[0] for p in group), *group[0].shape[1:])  # as lmlab stores it
        op, got = group[0].op, tuple(shapes[name])
        if op == "T":
            want = want[::-1]
        fits = (len(got) == len(want) and got[0] >= want[0] and got[1:] == want[1:]) if op == "prefix" else got == want
        if not fits:
            raise LmlabError(f"{where}: {name} has shape {got}; its config.json says {want}")
    used = {p.hf for p in pieces} | ({HEAD[arch]} if tied else set())
    extra = sorted(n for n in shapes if n not in used and not IGNORED.match(n))
    if extra:
        raise LmlabError(f"{where} holds tensors that a plain {arch} of this config has no place for: "
                         f"{', '.join(extra[:3])}{' ...' if len(extra) > 3 else ''}")


def from_hf(pieces: list[Piece], tensors: dict[str, torch.Tensor], head_dim: int, shapes: dict[str, tuple],
            where: str) -> dict[str, torch.Tensor]:
    """lmlab's state dict from the class's tensors (float32), whose shapes check_shapes has checked; a tensor
    lmlab's model has no place for must be zero."""
    inverse = torch.argsort(_rope_order(head_dim))
    state = {name: torch.zeros(shape) for name, shape in shapes.items()}
    for name, group in _groups(pieces).items():
        t = tensors[name].float()
        if group[0].op == "T":
            t = t.t()
        elif group[0].op == "prefix":
            t = t[: group[0].shape[0]]
        for p, part in zip(group, t.split([p.shape[0] for p in group])):
            if p.op == "rope":
                part = _reorder_heads(part, inverse)
            if p.lm is None:
                if part.any():
                    raise LmlabError(f"{where}: {name} is not zero, and lmlab's model has no place for it")
                continue
            target = state[p.lm] if p.rows is None else state[p.lm][p.rows[0] : p.rows[1]]
            target.copy_(part)
    return state


# ---------------------------------------------------------------------------------------------------------------
# config.json, both ways


def hf_config(arch: str, cfg: ModelConfig, vocab_size: int) -> dict:
    """The class's config.json, every field that changes what the model computes written out: defaults differ
    from class to class (head_dim 128 in Qwen3, llama3 RoPE scaling and xIELU in Apertus, a quarter of each head
    rotated in GPT-NeoX), and no bos/eos id, so that generation never stops at an ordinary character."""
    C, H, L = cfg.n_embd, cfg.n_head, cfg.n_layer
    hidden, eps = cfg.mlp_width, norm_eps(cfg)
    attn_p = cfg.dropout if cfg.attn_dropout is None else cfg.attn_dropout
    out: dict[str, Any] = {"architectures": [arch], "model_type": MODEL_TYPES[arch], "vocab_size": vocab_size,
                           "tie_word_embeddings": cfg.tie_embeddings, "bos_token_id": None, "eos_token_id": None,
                           "pad_token_id": None, "use_cache": True, "dtype": "float32", "initializer_range": 0.02}
    if arch == GPT2:
        return {**out, "n_embd": C, "n_layer": L, "n_head": H, "n_positions": cfg.block_size, "n_ctx": cfg.block_size,
                "n_inner": hidden, "activation_function": ACTIVATIONS[cfg.mlp], "layer_norm_epsilon": eps,
                "resid_pdrop": cfg.dropout, "embd_pdrop": cfg.dropout, "attn_pdrop": attn_p,
                "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
                "reorder_and_upcast_attn": False, "add_cross_attention": False}
    rope = {"rope_type": "default", "rope_theta": cfg.rope_base}
    if arch == NEOX:
        return {**out, "hidden_size": C, "num_hidden_layers": L, "num_attention_heads": H, "intermediate_size": hidden,
                "hidden_act": ACTIVATIONS[cfg.mlp], "max_position_embeddings": cfg.block_size, "layer_norm_eps": eps,
                "use_parallel_residual": False, "attention_bias": cfg.bias, "attention_dropout": attn_p,
                "hidden_dropout": cfg.dropout, "rotary_pct": 1.0, "rotary_emb_base": cfg.rope_base,
                "rope_scaling": None, "rope_parameters": {**rope, "partial_rotary_factor": 1.0}}
    out.update({"hidden_size": C, "num_hidden_layers": L, "num_attention_heads": H, "num_key_value_heads": H,
                "head_dim": cfg.head_dim, "intermediate_size": hidden, "hidden_act": ACTIVATIONS[cfg.mlp],
                "max_position_embeddings": cfg.block_size, "rms_norm_eps": eps, "rope_theta": cfg.rope_base,
                "rope_scaling": None, "rope_parameters": rope, "attention_bias": cfg.bias,
                "attention_dropout": attn_p})
    if arch in (LLAMA, ARCEE):
        out["mlp_bias"] = cfg.bias
    if arch == QWEN3:
        out.update({"use_sliding_window": False, "sliding_window": None, "max_window_layers": L,
                    "layer_types": ["full_attention"] * L})
    return out


def hf_bias_of(arch: str, bias: bool) -> dict[str, bool]:
    """Which biases the class has when exporting a model with (or without) biases."""
    if arch == GPT2:
        return {"attn": True, "mlp": True, "norm": True}
    if arch == NEOX:
        return {"attn": bias, "mlp": True, "norm": True}
    return {"attn": bias, "mlp": bias and arch in (LLAMA, ARCEE), "norm": False}


@dataclass
class Spec:
    """What a transformers config.json says about the model, in lmlab's terms."""

    arch: str
    model: ModelConfig  # with block_size = the class's longest context, bias still to be read from the weights
    vocab_size: int
    hf_bias: dict[str, bool]


class _Fields:
    """The fields of a config.json of class `arch`, read with their types checked: get(key, default, kind) and
    refuse(what, why), both of which raise LmlabError naming the file."""

    def __init__(self, c: dict, where: str, arch: str):
        self.c, self.where, self.arch = c, where, arch

    def get(self, key: str, default, kind=int):
        value = self.c.get(key, default)
        if value is None and default is None:
            return None
        ok = isinstance(value, kind) and (kind is bool or not isinstance(value, bool))
        if kind is float:
            ok = _finite_number(value)
            value = float(value) if ok else value
        if not ok:
            what = "a finite number" if kind is float else kind.__name__
            raise LmlabError(f"{self.where}: {key} must be {what}, got {value!r:.40}")
        return value

    def refuse(self, what: str, why: str):
        raise LmlabError(f"{self.where} ({self.arch}): {what} does not fit lmlab's model ({why})")


def _class_of(c: Any, where: str) -> str:
    """The supported class (MODEL_TYPES) that a config.json names in `architectures`, or else by `model_type`."""
    if not isinstance(c, dict):
        raise LmlabError(f"{where} is not a JSON object")
    names = c.get("architectures") or []
    arch = names[0] if isinstance(names, list) and names and isinstance(names[0], str) else None
    model_type = c.get("model_type")
    if model_type is not None and not isinstance(model_type, str):
        raise LmlabError(f"{where}: model_type must be a string, got {model_type!r:.80}")
    if arch not in MODEL_TYPES:
        arch = {t: a for a, t in MODEL_TYPES.items()}.get(model_type, arch)
    if arch not in MODEL_TYPES:
        raise LmlabError(f"{where} describes a {arch or model_type or 'model of unknown class'}; lmlab "
                         f"imports {', '.join(MODEL_TYPES)}")
    return arch


def _gpt2_fields(f: _Fields) -> dict:
    """GPT2LMHeadModel's config as ModelConfig's fields (and hf_bias, act, hidden for read_hf_config)."""
    C = f.get("n_embd", 768)
    if not f.get("scale_attn_weights", True, bool) or f.get("scale_attn_by_inverse_layer_idx", False, bool):
        f.refuse("attention scaled other than by 1/sqrt(head_dim)", "lmlab scales by 1/sqrt(head_dim)")
    if f.get("add_cross_attention", False, bool):
        f.refuse("add_cross_attention", "lmlab is decoder-only")
    return dict(n_embd=C, n_layer=f.get("n_layer", 12), n_head=f.get("n_head", 12),
                block_size=f.get("n_positions", 1024), hidden=f.get("n_inner", None) or 4 * C,
                act=f.get("activation_function", "gelu_new", str), norm_eps=f.get("layer_norm_epsilon", 1e-5, float),
                tie_embeddings=f.get("tie_word_embeddings", True, bool), rope_base=10000.0, pos="learned",
                norm="layernorm", qk_norm=False, hf_bias={"attn": True, "mlp": True, "norm": True})


def _rotary_fields(f: _Fields) -> dict:
    """The rotary classes' configs (Llama, Qwen3, Arcee, Apertus, GPT-NeoX) as ModelConfig's fields (and hf_bias,
    act, hidden for read_hf_config)."""
    arch = f.arch
    C, L, H = f.get("hidden_size", None), f.get("num_hidden_layers", None), f.get("num_attention_heads", None)
    if None in (C, L, H) or min(C, L, H) <= 0 or C % H:
        raise LmlabError(f"{f.where}: hidden_size, num_hidden_layers and num_attention_heads must be positive ints, "
                         f"with hidden_size divisible by num_attention_heads")
    theta, rope_type, partial = _rope(f.c, arch, f.where)
    if rope_type not in (None, "default"):
        f.refuse(f"RoPE scaling {rope_type!r}", "lmlab's RoPE is the plain kind, with --rope-base")
    if partial != 1.0:
        f.refuse(f"rotary on {partial:g} of each head", "lmlab rotates whole heads")
    default_act = {NEOX: "gelu", ARCEE: "relu2", APERTUS: "xielu"}.get(arch, "silu")
    out = dict(n_embd=C, n_layer=L, n_head=H, block_size=f.get("max_position_embeddings", 2048),
               hidden=f.get("intermediate_size", None), act=f.get("hidden_act", default_act, str),
               tie_embeddings=f.get("tie_word_embeddings", False, bool), rope_base=theta, pos="rope",
               qk_norm=arch in (QWEN3, APERTUS))
    if arch == NEOX:
        if f.get("use_parallel_residual", True, bool):
            f.refuse("use_parallel_residual", "lmlab's blocks add attention, then the MLP, to the residual stream")
        return out | dict(norm="layernorm", norm_eps=f.get("layer_norm_eps", 1e-5, float),
                          hf_bias={"attn": f.get("attention_bias", True, bool), "mlp": True, "norm": True})
    eps = f.get("rms_norm_eps", 1e-6 if arch in (LLAMA, QWEN3) else 1e-5, float)
    kv = f.get("num_key_value_heads", None) or H
    if kv != H:
        f.refuse(f"{kv} key/value heads for {H} query heads (grouped-query attention)",
                 "lmlab gives every query head its own keys and values")
    head_dim = f.get("head_dim", 128 if arch == QWEN3 else None) or C // H
    if head_dim != C // H:
        f.refuse(f"head_dim {head_dim}", f"lmlab's heads are hidden_size / heads = {C // H} wide")
    if arch == QWEN3 and f.get("use_sliding_window", False, bool):
        f.refuse("use_sliding_window", "lmlab's attention sees the whole context")
    return out | dict(norm="rmsnorm", norm_eps=eps, hf_bias={
        "attn": f.get("attention_bias", False, bool),
        "mlp": f.get("mlp_bias", False, bool) if arch in (LLAMA, ARCEE) else False, "norm": False})


def _mlp_kind(f: _Fields, act: str) -> str:
    """lmlab's --mlp for a class and its activation function."""
    if f.arch in (LLAMA, QWEN3):
        if act not in GATED_ACTIVATIONS:
            f.refuse(f"hidden_act {act!r}", "lmlab's gated MLP is SwiGLU (silu)")
        return "swiglu"
    if act not in FROM_ACTIVATION:
        f.refuse(f"activation {act!r}", "lmlab has gelu, gelu_new (tanh), relu2 and, gated, silu")
    return FROM_ACTIVATION[act]


def read_hf_config(c: Any, where: str, run: Optional[ModelConfig] = None) -> Spec:
    """A config.json of a supported class as an lmlab ModelConfig; anything lmlab's model cannot express is an
    error that names it. `run` gives what the config does not decide (dropout, zero_init_proj)."""
    arch = _class_of(c, where)
    f = _Fields(c, where, arch)
    run = run or ModelConfig()
    vocab = f.get("vocab_size", None)
    if vocab is None or vocab <= 0:
        raise LmlabError(f"{where}: vocab_size must be a positive int")
    fields = _gpt2_fields(f) if arch == GPT2 else _rotary_fields(f)
    hf_bias, act, hidden = fields.pop("hf_bias"), fields.pop("act"), fields.pop("hidden")
    mlp = _mlp_kind(f, act)
    if hidden is None or hidden <= 0 or fields["block_size"] <= 0:
        raise LmlabError(f"{where}: the MLP width and the context length must be positive ints")
    try:
        model = ModelConfig(**fields, mlp=mlp, mlp_hidden=hidden, bias=True, dropout=run.dropout,
                            attn_dropout=run.attn_dropout, zero_init_proj=run.zero_init_proj)
    except LmlabError as e:  # its checks speak of lmlab's options, which here come from the config
        raise LmlabError(f"{where} ({arch}) does not fit lmlab's model: {e}") from None
    return Spec(arch, model, vocab, hf_bias)


def _finite_number(value: Any) -> bool:
    """An int or float that is a finite float (JSON may hold Infinity, NaN, or an int too large for a float)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def _rope(c: dict, arch: str, where: str) -> tuple[float, Optional[str], float]:
    """RoPE's base, scaling type and rotated fraction, from the config's newer rope_parameters or the older
    rope_theta / rope_scaling / rotary_pct fields, with each class's defaults."""
    params = c.get("rope_parameters") or c.get("rope_scaling")
    if params is None and arch == APERTUS:
        params = {"rope_type": "llama3"}  # Apertus' default
    params = params if isinstance(params, dict) else {}
    theta = params.get("rope_theta", c.get("rope_theta", c.get("rotary_emb_base", 10000.0)))
    partial = params.get("partial_rotary_factor", c.get("partial_rotary_factor",
                                                        c.get("rotary_pct", 0.25 if arch == NEOX else 1.0)))
    kind = params.get("rope_type", params.get("type"))
    for name, value in (("rope_theta", theta), ("partial_rotary_factor", partial)):
        if not _finite_number(value) or value <= 0:
            raise LmlabError(f"{where}: {name} must be a positive finite number, got {value!r:.40}")
    return float(theta), kind, float(partial)


# ---------------------------------------------------------------------------------------------------------------
# Tokenizers, both ways


def hf_tokenizer(tokenizer: tok.Tokenizer):
    """The tokenizer as a Hugging Face `tokenizers.Tokenizer` with the same ids and the same decoding; its special
    tokens are special added tokens there too."""
    from tokenizers import AddedToken, Regex, Tokenizer as HFTokenizer, decoders, models, pre_tokenizers

    if tokenizer.kind == "bpe":
        return HFTokenizer.from_str(tokenizer.hf.to_str())
    if tokenizer.kind == "char":
        hf = HFTokenizer(models.WordLevel({c: i for i, c in enumerate(tokenizer.chars)}, unk_token="<unk>"))
        hf.pre_tokenizer = pre_tokenizers.Split(Regex(ONE_CHARACTER), behavior="isolated")
        hf.decoder = decoders.Fuse()
    elif tokenizer.kind == "byte":  # id b is byte b, under byte-level BPE's printable stand-in for it, and no merges
        hf = HFTokenizer(models.BPE({ch: b for ch, b in tok._byte_level_alphabet().items()}, []))
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        hf.decoder = decoders.ByteLevel()
    else:
        raise LmlabError(f"no tokenizer.json for a {tokenizer.kind!r} tokenizer")
    hf.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in tokenizer.special_tokens])
    return hf


def _special_added_tokens(obj: dict, first: int, where: str) -> list[str]:
    """The added tokens of an lmlab char or byte export: special tokens with ids first, first + 1, ..."""
    added = obj.get("added_tokens") or []
    if not isinstance(added, list) or not all(isinstance(a, dict) for a in added):
        raise LmlabError(f"{where}: added_tokens must be a list of objects")
    added = sorted(added, key=lambda a: a.get("id") if type(a.get("id")) is int else -1)
    if [a.get("id") for a in added] != list(range(first, first + len(added))) or not all(
            a.get("special") is True and isinstance(a.get("content"), str) for a in added):
        raise LmlabError(f"{where}: the added tokens of a char or byte tokenizer must be special tokens with the ids "
                         f"after its {first} ordinary ones")
    return [a["content"] for a in added]


def tokenizer_from_hf(obj: Any, where: str, config: Any = None) -> tok.Tokenizer:
    """An lmlab tokenizer with the same ids as a tokenizer.json: lmlab's own char and byte exports, or any
    byte-level BPE (GPT-2's, Llama 3's, lmlab's). lmlab encodes text as it is: no BOS or EOS is added. A BPE
    tokenizer keeps the chat template of its tokenizer_config.json (`config`), if it has one other than lmlab's,
    with its bos and eos tokens."""
    if not isinstance(obj, dict) or not isinstance(obj.get("model"), dict):
        raise LmlabError(f"{where} is not a tokenizer.json")
    model, pre, decoder = (obj.get(k) if isinstance(obj.get(k), dict) else {} for k in
                           ("model", "pre_tokenizer", "decoder"))
    vocab = model.get("vocab")
    plain = obj.get("normalizer") is None
    if (model.get("type") == "WordLevel" and isinstance(vocab, dict) and plain and decoder.get("type") == "Fuse"
            and pre.get("type") == "Split" and pre.get("pattern") == {"Regex": ONE_CHARACTER}):
        chars = sorted(vocab, key=lambda c: vocab[c]) if all(type(i) is int for i in vocab.values()) else []
        if (not chars or not all(len(c) == 1 for c in chars) or sorted(vocab.values()) != list(range(len(chars)))
                or chars != sorted(chars)):
            raise LmlabError(f"{where}: a one-character-per-token vocabulary must hold single characters with ids "
                             f"0..n-1 in code-point order, as lmlab's char tokenizer numbers them")
        return tok.CharTokenizer(chars, _special_added_tokens(obj, len(chars), where))
    if model.get("type") != "BPE" or decoder.get("type") != "ByteLevel" or model.get("byte_fallback"):
        raise LmlabError(f"{where} is a {model.get('type')} tokenizer that is not byte-level BPE; lmlab reads "
                         f"byte-level BPE tokenizers (GPT-2, Llama 3, Qwen) and its own char and byte exports, whose "
                         f"tokens are exact byte strings")
    alphabet = tok._byte_level_alphabet()
    if (vocab == {ch: b for ch, b in alphabet.items()} and not model.get("merges") and plain
            and pre.get("type") == "ByteLevel" and not pre.get("use_regex", True)):
        return tok.ByteTokenizer(_special_added_tokens(obj, 256, where))
    obj = {**obj, "post_processor": None, "padding": None, "truncation": None}  # text in, its tokens out: no BOS
    try:
        from tokenizers import Tokenizer as HFTokenizer

        hf = HFTokenizer.from_str(json.dumps(obj))
    except Exception as e:  # noqa: BLE001 - the Rust library raises its own exception types
        detail = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise LmlabError(f"{where} does not load: {detail}") from None
    ids = hf.get_vocab()
    if sorted(ids.values()) != list(range(len(ids))):
        raise LmlabError(f"{where}: the token ids are not 0..{len(ids) - 1} without gaps")
    special = {t.content for t in hf.get_added_tokens_decoder().values() if t.special}  # spelled as they are
    for token in ids:
        if token not in special and any(ch not in alphabet for ch in token):
            raise LmlabError(f"{where}: token {token!r} is not a byte string in byte-level BPE's alphabet")
    template, bos, eos = chat_template_of(config, where)
    if template == tok.CHAT_TEMPLATE:  # lmlab's own, from its special tokens
        template = bos = eos = None
    return tok.BPETokenizer(hf, template, bos, eos)


def chat_template_of(config: Any, where: str) -> tuple[Optional[str], Optional[str], Optional[str]]:
    """(chat template, bos token, eos token) of a tokenizer_config.json: its chat_template (a string, or the one
    named "default" of a list), and its bos_token and eos_token (a string, or an added token's "content"); Nones
    where there are none."""
    if not isinstance(config, dict):
        return None, None, None
    template = config.get("chat_template")
    if isinstance(template, list):
        template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"),
                        None)
    if template is not None and not isinstance(template, str):
        raise LmlabError(f"{where}: chat_template must be a string, or a list of named templates")

    def token(value: Any) -> Optional[str]:
        value = value.get("content") if isinstance(value, dict) else value
        return value if isinstance(value, str) else None

    return template, token(config.get("bos_token")), token(config.get("eos_token"))


def tokenizer_config(block_size: int, tokenizer: Optional[tok.Tokenizer] = None, chat: bool = False) -> dict:
    """tokenizer_config.json: the fast tokenizer class as it is, no special tokens added to a text, spaces never
    "cleaned"; the bos, eos and pad tokens of special_names; where the tokenizer has a chat template, the template,
    so that apply_chat_template gives lmlab's ids (chat.render)."""
    out = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
           "model_max_length": block_size, "add_bos_token": False, "add_eos_token": False, "bos_token": None,
           "eos_token": None, "unk_token": None, "pad_token": None,
           "model_input_names": ["input_ids", "attention_mask"]}
    if tokenizer is not None:
        out.update(special_names(tokenizer, chat))
        if tokenizer.chat_template is not None:
            out["chat_template"] = tokenizer.chat_template
    return out


def special_names(tokenizer: tok.Tokenizer, chat: bool) -> dict[str, str]:
    """The bos, eos and pad tokens of an export. Where the tokenizer has lmlab's end of text, it opens a text (the
    prefix lm-eval scores a text's first token from) and ends it, and pads; a chat model (chat) ends at the end of
    its turn instead. An imported chat template keeps its own tokens. None of them ({}) for a tokenizer without
    special tokens (a run older than them): export_run_hf says what lm-eval then needs."""
    ids = tokenizer.special_tokens
    if tokenizer.own_template is None and tok.ENDOFTEXT in ids:
        eos = tok.END if chat and tok.END in ids else tok.ENDOFTEXT
        return {"bos_token": tok.ENDOFTEXT, "eos_token": eos, "pad_token": tok.ENDOFTEXT}
    if tokenizer.chat_template is not None:
        return {"bos_token": tokenizer.bos_token, "eos_token": tokenizer.eos_token, "pad_token": pad_token(tokenizer)}
    return {}


def pad_token(tokenizer: tok.Tokenizer) -> Optional[str]:
    """The token that pads a batch: the end of a text where the tokenizer has lmlab's, else its eos token."""
    return tok.ENDOFTEXT if tok.ENDOFTEXT in tokenizer.special_tokens else tokenizer.eos_token


def generation_config(tokenizer: tok.Tokenizer, chat: bool) -> dict:
    """generation_config.json: greedy by default; the ids of special_names' bos, eos and pad tokens; for a chat model
    (chat), every eos id that ends its turn: the end of a turn and the end of a text (tokenizer.stop_ids, the eos
    token first). A text model's generation stops at the end of its text (lmlab's own never draws one: it ends at
    --max-new-tokens)."""
    ids, names = tokenizer.special_tokens, special_names(tokenizer, chat)
    bos, eos, pad = (ids.get(names.get(key)) for key in ("bos_token", "eos_token", "pad_token"))
    if chat:
        eos = list(dict.fromkeys(ids[t] for t in (names.get("eos_token"), tok.END, tok.ENDOFTEXT) if t in ids)) or None
    return {"bos_token_id": bos, "eos_token_id": eos, "pad_token_id": pad, "do_sample": False}


# ---------------------------------------------------------------------------------------------------------------
# Export


def write_hf(model: torch.nn.Module, tokenizer: tok.Tokenizer, out: str | Path, chat: bool = False) -> str:
    """Write model and tokenizer as a transformers folder (config.json, model.safetensors, tokenizer.json,
    tokenizer_config.json with the bos and eos tokens and the chat template, generation_config.json, which ends
    generation at the end of a text, or for a chat model (chat) at the end of a turn). Returns the class's name."""
    from safetensors.torch import save

    cfg, vocab = model.cfg, model.vocab_size
    arch = architecture(cfg)
    out = Path(out)
    check_new_folder(out)
    pieces = plan(arch, cfg, vocab, hf_bias_of(arch, cfg.bias))
    tensors = to_hf(pieces, model.state_dict(), cfg.head_dim, arch)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / HF_WEIGHTS, save(tensors, metadata={"format": "pt"}))
    atomic_write_json(out / HF_CONFIG, hf_config(arch, cfg, vocab))
    atomic_write_bytes(out / HF_TOKENIZER, hf_tokenizer(tokenizer).to_str(pretty=True).encode())
    atomic_write_json(out / HF_TOKENIZER_CONFIG, tokenizer_config(cfg.block_size, tokenizer, chat))
    atomic_write_json(out / HF_GENERATION_CONFIG, generation_config(tokenizer, chat))
    return arch


def verify(out: str | Path, model: torch.nn.Module, tokenizer: tok.Tokenizer, windows: int = 3,
           seed: int = 0) -> Optional[str]:
    """Load the export with transformers and compare: logits on `windows` random windows of block_size tokens, and
    the tokenizer's ids and decoding of a text drawn from the vocabulary. Returns a one-line summary, None without
    transformers; an error above TOLERANCE or on any tokenizer difference."""
    try:
        import transformers
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError:
        return None
    logging = transformers.utils.logging
    verbosity, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()  # its loading messages and progress bars are not this command's output
    logging.disable_progress_bar()
    try:
        hf_model = AutoModelForCausalLM.from_pretrained(str(out)).float().eval()
        hf_tok = AutoTokenizer.from_pretrained(str(out))
        g = torch.Generator().manual_seed(seed)
        device = next(model.parameters()).device
        worst = 0.0
        with torch.no_grad():
            for _ in range(windows):
                ids = torch.randint(model.vocab_size, (1, model.cfg.block_size), generator=g)
                ours = model(ids.to(device)).float().cpu()
                theirs = hf_model(ids).logits.float()
                worst = max(worst, float((ours - theirs).abs().max()))
        ordinary = tokenizer.ordinary_ids()  # a text that spells no special token: both encode it alike
        text = tokenizer.decode(ordinary[torch.randint(len(ordinary), (400,), generator=g).numpy()].tolist())
        ids = tokenizer.encode(text)
        same_tokens = hf_tok(text, add_special_tokens=False)["input_ids"] == ids and hf_tok.decode(ids) == text
        if tokenizer.chat_template is not None:  # and the chat template renders a conversation as lmlab does
            from .chat import render

            cuts = sorted(torch.randint(len(text) + 1, (3,), generator=g).tolist())
            messages = [{"role": role, "content": text[a:b]} for role, a, b in
                        zip(("system", "user", "assistant", "user"), [0, *cuts], [*cuts, len(text)])]
            same_tokens &= (hf_tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)
                            ["input_ids"] == render(tokenizer, messages, add_generation_prompt=True).ids.tolist())
    finally:
        logging.set_verbosity(verbosity)
        if bars:
            logging.enable_progress_bar()
    if not worst <= TOLERANCE:
        raise LmlabError(f"the export in {out} does not match: transformers' logits differ from lmlab's by up to "
                         f"{worst:.2e} (more than {TOLERANCE:g})")
    if not same_tokens:
        raise LmlabError(f"the export in {out} does not match: transformers' tokenizer gives other ids or text "
                         f"than lmlab's")
    chat = "; the same chat template ids" if tokenizer.chat_template is not None else ""
    return (f"verified with transformers {transformers.__version__}: largest |logit difference| {worst:.1e} over "
            f"{windows} windows of {model.cfg.block_size} tokens; the same token ids and text{chat}")


def export_run_hf(run_dir: str | Path, out: str | Path, check: bool = True,
                  say: Callable[[str], None] = print, which: str | int = "best") -> str:
    """`lmlab export RUN --out OUT --format hf`: the run's best checkpoint (or `which`) as a transformers folder, then
    checked by transformers itself (unless check is False). Returns the class's name."""
    from .run import load_run

    run = load_run(run_dir, "cpu", which)
    architecture(run.model.cfg)  # refuse before writing anything
    chat = run.is_chat
    arch = write_hf(run.model, run.tokenizer, out, chat)
    turn = ", a chat model: generation ends at the end of its turn" if chat else ""
    say(f"exported {run_dir} ({run.checkpoint.path.name}) to {out} as {arch}{turn}")
    if check:
        summary = verify(out, run.model, run.tokenizer)
        say(summary or "transformers is not installed: the export was not verified (pip install 'lmlab[hf]')")
    note = lm_eval_note(run.tokenizer, out)
    if note:
        say(note)
    return arch


def lm_eval_note(tokenizer: tok.Tokenizer, out: str | Path) -> Optional[str]:
    """What lm-eval needs to be told about an export without a bos or eos token (a run older than the special
    tokens): the token its windows start from, a newline where there is one. None when it needs nothing."""
    if special_names(tokenizer, False):
        return None
    try:
        newline = tokenizer.encode("\n")
    except LmlabError:
        newline = []
    prefix = newline[0] if len(newline) == 1 else 0
    return (f"note: this run's tokenizer has no end-of-text token, so the export names no bos or eos token; lm-eval "
            f"needs the token its texts start from: lm_eval --model hf --model_args "
            f"pretrained={out},prefix_token_id={prefix} (for log-likelihood and perplexity tasks)")


# ---------------------------------------------------------------------------------------------------------------
# Import


@dataclass
class Imported:
    """A transformers model as lmlab's: its architecture, tokenizer and weights."""

    arch: str
    model: ModelConfig
    tokenizer: tok.Tokenizer
    state: dict[str, torch.Tensor]
    positions: int  # the longest context the model was made for


def _read_json(path: Path) -> Any:
    """A JSON file of a model folder from anywhere: its nesting bounded, any fault one error naming it."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise LmlabError(f"cannot read {path}: {e.strerror}") from None
    return rundir.parse_json(data, str(path))


HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?")


def resolve(source: str) -> Path:
    """A local folder as it is; otherwise a hub id, downloaded."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    if path.exists() or not HUB_ID.fullmatch(source) or ".." in source:
        raise LmlabError(f"--init-from {source}: not a folder, and not a hub id (NAME or OWNER/NAME)")
    return download(source)


def download(repo_id: str) -> Path:
    """The one path that needs a network: the config, tokenizer and safetensors files of a hub repository, into
    huggingface_hub's cache (later runs use the cache). Pickled weights are never fetched."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise LmlabError(f"--init-from {repo_id} is a hub id, which needs huggingface_hub (pip install "
                         f"'lmlab[hf]'); or give a local folder") from None
    try:
        return Path(snapshot_download(repo_id, allow_patterns=[HF_CONFIG, HF_TOKENIZER, HF_TOKENIZER_CONFIG,
                                                               HF_CHAT_TEMPLATE, HF_WEIGHTS_INDEX, "*.safetensors"]))
    except Exception as e:  # noqa: BLE001 - network, authentication and missing-repository errors alike
        detail = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise LmlabError(f"--init-from {repo_id}: no such folder here, and the hub did not give it "
                         f"({detail})") from None


def weight_files(folder: Path) -> list[str]:
    """model.safetensors, or the files a model.safetensors.index.json lists. Never a pickle."""
    if (folder / HF_WEIGHTS_INDEX).is_file():
        index = _read_json(folder / HF_WEIGHTS_INDEX)
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
            raise LmlabError(f"{folder / HF_WEIGHTS_INDEX} has no weight_map of file names")
        files = sorted(set(weight_map.values()))
    elif (folder / HF_WEIGHTS).is_file():
        files = [HF_WEIGHTS]
    else:
        pickles = sorted(p.name for pattern in PICKLES for p in folder.glob(pattern))
        found = f"its weights are only in {', '.join(pickles)}, a pickle" if pickles else "it has no model.safetensors"
        raise LmlabError(f"{folder}: {found}; lmlab reads weights from safetensors only, since loading a pickle can "
                         f"run code from it (convert it where you trust it: transformers' save_pretrained writes "
                         f"safetensors)")
    for name in files:
        if Path(name).name != name or not name.endswith(".safetensors"):
            raise LmlabError(f"{folder}: {name!r} is not a safetensors file in that folder")
    return files


MAX_HEADER = 100 << 20  # bytes of a safetensors header at most (the library's own limit)


def header_shapes(folder: Path, files: list[str]) -> dict[str, tuple[int, ...]]:
    """Every tensor's shape, from the JSON headers of the safetensors files alone (8 bytes of length, then the
    header): a few KB read, whatever the size of the weights."""
    shapes: dict[str, tuple[int, ...]] = {}
    for name in files:
        path = folder / name
        try:
            with open(path, "rb") as f:
                size = int.from_bytes(f.read(8), "little")
                header = rundir.parse_json(f.read(size), str(path)) if 0 < size <= MAX_HEADER else None
        except OSError as e:
            raise LmlabError(f"cannot read {path}: {e.strerror}") from None
        if not isinstance(header, dict):
            raise LmlabError(f"{path} is not a valid safetensors file (its header is not a JSON object)")
        for tensor, info in header.items():
            if tensor == "__metadata__":
                continue
            shape = info.get("shape") if isinstance(info, dict) else None
            if not isinstance(shape, list) or not all(type(n) is int and 0 <= n for n in shape):
                raise LmlabError(f"{path} is not a valid safetensors file (tensor {tensor!r:.80} has no shape)")
            shapes[tensor] = tuple(shape)
    return shapes


def read_weights(folder: Path, files: list[str]) -> dict[str, torch.Tensor]:
    """Every tensor of the safetensors files (weight_files) of a model folder."""
    from safetensors.torch import load_file

    tensors: dict[str, torch.Tensor] = {}
    for name in files:
        try:
            tensors.update(load_file(str(folder / name)))
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
            detail = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
            raise LmlabError(f"{folder / name} is not a valid safetensors file ({detail})") from None
    return tensors


def _normalise_names(tensors: dict[str, Any], arch: str) -> dict[str, Any]:
    """Checkpoints of the base model alone name tensors without its prefix (the hub's gpt2: "h.0..."), and
    GPT-NeoX's head is embed_out in older files and lm_head in newer ones."""
    base, heads = BASE[arch], ("lm_head.weight", "embed_out.weight")
    if not any(name.startswith(base) for name in tensors):
        tensors = {name if name in heads else base + name: t for name, t in tensors.items()}
    if arch == NEOX and "lm_head.weight" in tensors:
        tensors = {("embed_out.weight" if name == "lm_head.weight" else name): t for name, t in tensors.items()}
    return tensors


MAX_TEMPLATE_BYTES = 1 << 20


def tokenizer_config_of(folder: Path) -> Optional[dict]:
    """A model folder's tokenizer_config.json (None without one), with the chat template of its
    chat_template.jinja, where newer transformers keep it, when the config has none."""
    config = _read_json(folder / HF_TOKENIZER_CONFIG) if (folder / HF_TOKENIZER_CONFIG).is_file() else None
    if not isinstance(config, dict):
        return None
    jinja = folder / HF_CHAT_TEMPLATE
    if config.get("chat_template") is None and jinja.is_file():
        if jinja.stat().st_size > MAX_TEMPLATE_BYTES:
            raise LmlabError(f"{jinja} is more than {MAX_TEMPLATE_BYTES:,} bytes; not a chat template")
        try:
            config = {**config, "chat_template": jinja.read_text(encoding="utf-8")}
        except (OSError, UnicodeDecodeError) as e:
            raise LmlabError(f"cannot read {jinja} as UTF-8 text ({type(e).__name__})") from None
    return config


def load_hf(source: str, run: Optional[ModelConfig] = None) -> Imported:
    """Read a transformers model folder (or hub id) of a supported class as lmlab's model, tokenizer and weights.
    The context is the run's block_size, up to the model's own; dropout and zero_init_proj are the run's."""
    folder = resolve(source)
    if not (folder / HF_CONFIG).is_file():
        raise LmlabError(f"{folder} has no {HF_CONFIG}; is it a transformers model folder?")
    if not (folder / HF_TOKENIZER).is_file():
        raise LmlabError(f"{folder} has no {HF_TOKENIZER} (lmlab reads the fast tokenizer's file only)")
    spec = read_hf_config(_read_json(folder / HF_CONFIG), str(folder / HF_CONFIG), run)
    tokenizer = tokenizer_from_hf(_read_json(folder / HF_TOKENIZER), str(folder / HF_TOKENIZER),
                                  tokenizer_config_of(folder))
    if tokenizer.vocab_size != spec.vocab_size:
        raise LmlabError(f"{folder}: the model has {spec.vocab_size} token embeddings and its tokenizer "
                         f"{tokenizer.vocab_size} tokens; lmlab needs one embedding per token")
    positions = spec.model.block_size
    block = min(run.block_size, positions) if run is not None and run.block_size else positions
    cfg = dataclasses.replace(spec.model, block_size=block)
    where, D = str(folder), cfg.head_dim
    check_fits(cfg, spec.vocab_size, where)  # before the model's shapes are listed, or a tensor read
    files = weight_files(folder)
    pieces = plan(spec.arch, cfg, spec.vocab_size, spec.hf_bias)  # biases on: the class's tensors are the same
    check_shapes(pieces, _normalise_names(header_shapes(folder, files), spec.arch), spec.arch, cfg.tie_embeddings,
                 where)
    tensors = _normalise_names(read_weights(folder, files), spec.arch)
    biases = [p.hf for p in pieces if p.hf and p.hf.endswith(".bias")]
    cfg.bias = any(tensors[name].any() for name in biases if name in tensors)  # all zero: a model without biases
    pieces = plan(spec.arch, cfg, spec.vocab_size, spec.hf_bias)
    shapes = _lm_shapes(cfg, spec.vocab_size)
    state = from_hf(pieces, tensors, D, {n: s for n, s in shapes.items() if n != "lm_head.weight" or
                                          not cfg.tie_embeddings}, where)
    if cfg.tie_embeddings:
        state["lm_head.weight"] = state["wte.weight"]
    return Imported(spec.arch, cfg, tokenizer, state, positions)


def init_from(cfg: TrainConfig, say: Callable[[str], None] = print
              ) -> tuple[TrainConfig, tok.Tokenizer, dict[str, torch.Tensor]]:
    """`lmlab train --init-from SOURCE`: the run's config with the imported model's architecture and tokenizer
    kind (its own context length, dropout and training settings kept), the imported tokenizer, and the weights
    to start from."""
    imported = load_hf(cfg.init_from, cfg.model)
    t = imported.tokenizer
    data = dataclasses.replace(cfg.data, tokenizer=t.kind, vocab_size=t.vocab_size if t.kind == "bpe"
                               else cfg.data.vocab_size)
    m = imported.model
    say(f"initialised from {cfg.init_from} ({imported.arch}): {m.n_layer} layers, {m.n_head} heads, {m.n_embd} wide, "
        f"context {m.block_size} of its {imported.positions} tokens (--block-size); its {t.kind} tokenizer "
        f"({t.vocab_size} tokens) encodes the data")
    cfg = dataclasses.replace(cfg, model=m, data=data)
    try:  # what the run's config.json will say must read back: a value lmlab refuses to read is refused now
        cfg.check_reads_back()
    except LmlabError as e:
        raise LmlabError(f"--init-from {cfg.init_from}: {e}") from None
    return cfg, t, imported.state
