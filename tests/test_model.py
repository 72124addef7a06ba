"""The transformer: causality, shapes and loss, attention against a naive implementation, learning, KV cache, init,
and the hook points that look inside its forward."""

import math

import pytest
import torch
import torch.nn as nn

from lmlab.common import LmlabError
from lmlab.loss import cross_entropy
from lmlab.model import (
    GPT, Bigram, Capture, CausalSelfAttention, ModelConfig, apply_rotary, build_model, count_params, is_hidden_matrix,
    layer_of, matmul_params, rotary_tables, unique_parameters,
)
from lmlab.optim import OptimConfig, build_optimizer

VOCAB = 13


def make_cfg(**kw):
    base = dict(block_size=12, n_layer=2, n_head=2, n_embd=16, zero_init_proj=False)
    base.update(kw)
    return ModelConfig(**base)


@torch.no_grad()
def randomize(model: nn.Module, std: float = 0.3, seed: int = 0) -> nn.Module:
    """Give every parameter (norm gains and biases included) a random value, so nothing is trivially symmetric."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype)
        if p.dim() == 1 and ("norm" in name) and name.endswith("weight"):
            p.copy_(1.0 + 0.2 * noise)
        else:
            p.copy_(std * noise)
    return model


def tiny_gpt(seed=0, std=0.3, dtype=torch.float64, vocab=VOCAB, **kw):
    torch.manual_seed(seed)
    model = GPT(make_cfg(**kw), vocab).to(dtype)
    randomize(model, std=std, seed=seed)
    return model.eval()


# ---------------------------------------------------------------------------------------------------------------
# Causality

CAUSAL_CONFIGS = [
    dict(pos="learned", norm="layernorm", mlp="gelu", qk_norm=False, tie_embeddings=False, bias=True),
    dict(pos="rope", norm="rmsnorm", mlp="relu2", qk_norm=True, tie_embeddings=True, bias=False),
    dict(pos="rope", norm="layernorm", mlp="swiglu", qk_norm=True, tie_embeddings=False, bias=True),
    dict(pos="learned", norm="rmsnorm", mlp="swiglu", qk_norm=False, tie_embeddings=True, bias=False),
    dict(pos="rope", norm="rmsnorm", mlp="gelu", qk_norm=False, tie_embeddings=False, bias=True),
    dict(pos="learned", norm="layernorm", mlp="relu2", qk_norm=True, tie_embeddings=True, bias=False),
]


@pytest.mark.parametrize("kw", CAUSAL_CONFIGS, ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()))
def test_causality(kw):
    model = tiny_gpt(seed=1, **kw)
    T = model.cfg.block_size
    g = torch.Generator().manual_seed(2)
    idx = torch.randint(0, VOCAB, (2, T), generator=g)
    with torch.no_grad():
        base = model(idx)
        for t in (0, 3, T // 2, T - 1):
            changed = idx.clone()
            changed[:, t] = (changed[:, t] + 1 + torch.randint(0, VOCAB - 1, (2,), generator=g)) % VOCAB
            assert (changed[:, t] != idx[:, t]).all()
            out = model(changed)
            # earlier positions are unaffected by a change at position t ...
            torch.testing.assert_close(out[:, :t], base[:, :t], atol=1e-12, rtol=0)
            # ... and the change is visible from position t on (so the check above is not vacuous)
            assert (out[:, t] - base[:, t]).abs().max() > 1e-6
            if t < T - 1:
                assert (out[:, t + 1 :] - base[:, t + 1 :]).abs().max() > 1e-6


def test_causality_with_every_later_token_changed():
    model = tiny_gpt(seed=3, pos="rope")
    T = model.cfg.block_size
    idx = torch.randint(0, VOCAB, (1, T), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        base = model(idx)
        for t in range(1, T):
            changed = idx.clone()
            changed[:, t:] = (changed[:, t:] + 5) % VOCAB
            out = model(changed)
            torch.testing.assert_close(out[:, :t], base[:, :t], atol=1e-12, rtol=0)


# ---------------------------------------------------------------------------------------------------------------
# Forward: shapes and loss


@pytest.mark.parametrize("pos", ["learned", "rope"])
def test_forward_returns_logits_for_every_position(pos):
    model = tiny_gpt(seed=5, pos=pos)
    B, T = 3, 10
    idx = torch.randint(0, VOCAB, (B, T), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        logits = model(idx)
        assert isinstance(logits, torch.Tensor) and logits.shape == (B, T, VOCAB)
        # position t's logits are those of the prefix ending at t
        torch.testing.assert_close(model(idx[:, :4]), logits[:, :4], atol=1e-12, rtol=0)
        # shorter sequences than block_size work, longer ones are refused
        assert model(idx[:, :1]).shape == (B, 1, VOCAB)
        with pytest.raises(ValueError):
            model(torch.zeros(1, model.cfg.block_size + 1, dtype=torch.long))


def test_loss_backpropagates_to_every_parameter():
    model = tiny_gpt(seed=7, pos="learned", bias=True, norm="layernorm")
    idx = torch.randint(0, VOCAB, (2, 8))
    loss = cross_entropy(model(idx), torch.randint(0, VOCAB, (2, 8)))
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


# ---------------------------------------------------------------------------------------------------------------
# Attention against a naive implementation


def naive_rope_tables(T, D, base):
    """cos/sin of angle pos * base^(-2i/D), i < D/2, in float64."""
    i = torch.arange(D // 2, dtype=torch.float64)
    inv_freq = base ** (-2.0 * i / D)
    angles = torch.arange(T, dtype=torch.float64)[:, None] * inv_freq[None, :]
    return angles.cos(), angles.sin(), angles


def naive_rotate(x, angles):
    """Rotate the pairs (x_{2i}, x_{2i+1}) by the angles with explicit 2x2 rotations. x: (B, T, H, D)."""
    even, odd = x[..., 0::2], x[..., 1::2]
    cos, sin = angles.cos()[None, :, None, :], angles.sin()[None, :, None, :]
    out = torch.empty_like(x)
    out[..., 0::2] = even * cos - odd * sin
    out[..., 1::2] = even * sin + odd * cos
    return out


def naive_rmsnorm(x, weight, eps=1e-6):
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def naive_attention(attn: CausalSelfAttention, x, angles=None):
    """The attention's output (B, T, C) and its weights (B, H, T, T), head by head."""
    cfg = attn.cfg
    B, T, C = x.shape
    H, D = cfg.n_head, cfg.n_embd // cfg.n_head
    W = attn.qkv.weight
    out = x @ W.T
    if attn.qkv.bias is not None:
        out = out + attn.qkv.bias
    q, k, v = out[..., :C], out[..., C : 2 * C], out[..., 2 * C :]
    q, k, v = (t.reshape(B, T, H, D) for t in (q, k, v))
    if cfg.qk_norm and cfg.norm == "rmsnorm":
        q = naive_rmsnorm(q, attn.q_norm.weight)
        k = naive_rmsnorm(k, attn.k_norm.weight)
    elif cfg.qk_norm:
        q = torch.nn.functional.layer_norm(q, (D,), attn.q_norm.weight, attn.q_norm.bias, eps=attn.q_norm.eps)
        k = torch.nn.functional.layer_norm(k, (D,), attn.k_norm.weight, attn.k_norm.bias, eps=attn.k_norm.eps)
    if angles is not None:
        q, k = naive_rotate(q, angles), naive_rotate(k, angles)
    y = torch.zeros(B, T, H, D, dtype=x.dtype)
    weights = torch.zeros(B, H, T, T, dtype=x.dtype)
    for b in range(B):
        for h in range(H):
            scores = q[b, :, h] @ k[b, :, h].T / math.sqrt(D)  # (T, T)
            mask = torch.ones(T, T, dtype=torch.bool).triu(diagonal=1)  # j > i is the future
            weights[b, h] = scores.masked_fill(mask, float("-inf")).softmax(-1)
            y[b, :, h] = weights[b, h] @ v[b, :, h]
    y = y.reshape(B, T, C) @ attn.proj.weight.T
    if attn.proj.bias is not None:
        y = y + attn.proj.bias
    return y, weights


@pytest.mark.parametrize("qk_norm", [False, True])
@pytest.mark.parametrize("use_rope", [False, True])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("norm", ["rmsnorm", "layernorm"])
@pytest.mark.parametrize("explicit", [False, True], ids=["fused", "weights-asked"])
def test_attention_matches_naive(qk_norm, use_rope, bias, norm, explicit):
    """Fused, and with its weights written out because a capture asks for them."""
    cfg = make_cfg(n_embd=24, n_head=3, qk_norm=qk_norm, bias=bias, pos="rope" if use_rope else "learned", norm=norm)
    torch.manual_seed(8)
    attn = CausalSelfAttention(cfg).double().eval()
    randomize(attn, std=0.4, seed=9)
    B, T = 2, 9
    x = torch.randn(B, T, cfg.n_embd, dtype=torch.float64, generator=torch.Generator().manual_seed(10))
    rope, angles = None, None
    if use_rope:
        cos, sin, angles = naive_rope_tables(T, cfg.head_dim, cfg.rope_base)
        rope = (cos, sin)
    keep = Capture(["blocks.3.attn.weights"] if explicit else [])
    with torch.no_grad():
        ours = attn(x, rope, None, 3, hooks=keep)
        ref, weights = naive_attention(attn, x, angles)
    torch.testing.assert_close(ours, ref, atol=1e-10, rtol=1e-9)
    if explicit:
        torch.testing.assert_close(keep["blocks.3.attn.weights"], weights, atol=1e-12, rtol=0)
    else:
        assert not keep


def test_model_rope_tables_match_formula():
    model = tiny_gpt(seed=11, pos="rope", n_embd=32, n_head=2, rope_base=500.0)
    cos, sin, _ = naive_rope_tables(model.cfg.block_size, model.cfg.head_dim, 500.0)
    torch.testing.assert_close(model.rope_cos.double(), cos, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(model.rope_sin.double(), sin, atol=1e-6, rtol=1e-6)


def test_rope_attention_scores_depend_on_relative_position_only():
    """With RoPE and no mask, q_i . k_j depends on i - j: shifting both by the same offset changes nothing."""
    D = 8
    _, _, angles = naive_rope_tables(12, D, 10000.0)
    g = torch.Generator().manual_seed(12)
    q = torch.randn(1, 1, 1, D, dtype=torch.float64, generator=g).expand(1, 12, 1, D)
    k = torch.randn(1, 1, 1, D, dtype=torch.float64, generator=g).expand(1, 12, 1, D)
    cos, sin = rotary_tables(12, D, 10000.0)
    qr = apply_rotary(q, cos.double(), sin.double())[0, :, 0]
    kr = apply_rotary(k, cos.double(), sin.double())[0, :, 0]
    s = qr @ kr.T
    for shift in (1, 4):
        torch.testing.assert_close(s[shift:, shift:], s[:-shift, :-shift], atol=1e-5, rtol=1e-5)
    # and rotary matches the complex-number reference
    torch.testing.assert_close(qr, naive_rotate(q, angles)[0, :, 0], atol=1e-6, rtol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# Learning


def test_overfits_one_batch():
    torch.manual_seed(13)
    cfg = ModelConfig(block_size=16, n_layer=2, n_head=2, n_embd=32, pos="rope", mlp="relu2")
    vocab = 20
    model = GPT(cfg, vocab)
    g = torch.Generator().manual_seed(14)
    idx = torch.randint(0, vocab, (4, 16), generator=g)
    targets = torch.randint(0, vocab, (4, 16), generator=g)
    opt = build_optimizer(model, OptimConfig(optimizer="adamw", lr=1e-2, weight_decay=0.0, warmup=0))
    first = None
    for _ in range(300):
        loss = cross_entropy(model(idx), targets)
        if first is None:
            first = float(loss.detach())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if float(loss.detach()) < 0.02:
            break
    model.eval()
    with torch.no_grad():
        final = cross_entropy(model(idx), targets)
    assert first == pytest.approx(math.log(vocab), abs=0.1)
    assert float(final) < 0.05


# ---------------------------------------------------------------------------------------------------------------
# KV cache


@pytest.mark.parametrize("dtype,atol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
@pytest.mark.parametrize("pos", ["rope", "learned"])
@pytest.mark.parametrize("grow", [False, True], ids=["fixed", "growing"])
def test_kv_cache_token_by_token_matches_full_forward(pos, dtype, atol, grow, monkeypatch):
    """Growing: the buffers' slots go up 3 at a time (KVCache.reserve), and every decode step reads the whole
    buffers with the unfilled slots masked (KVCache.unfilled), as many heads do."""
    import lmlab.kvcache as kvcache

    monkeypatch.setattr(kvcache, "GROW_SLOTS", 3)
    monkeypatch.setattr(kvcache, "WHOLE_CACHE_HEADS", 1 if grow else 1 << 30)
    model = tiny_gpt(seed=15, pos=pos, dtype=dtype, std=0.2, qk_norm=pos == "rope")
    T = model.cfg.block_size
    idx = torch.randint(0, VOCAB, (2, T), generator=torch.Generator().manual_seed(16))
    with torch.no_grad():
        full = model(idx)
        cache = model.make_cache(2, grow=grow)
        prefill = 4
        out = model(idx[:, :prefill], cache=cache)
        pieces = [out]
        assert cache.pos == prefill
        for t in range(prefill, T):
            out = model(idx[:, t : t + 1], cache=cache)
            pieces.append(out)
            assert cache.pos == t + 1
            assert cache.k[0].size(2) == (min(T, -(-(t + 1) // 3) * 3) if grow else T)
        cached = torch.cat(pieces, dim=1)
        assert cached.shape == full.shape
        torch.testing.assert_close(cached, full, atol=atol, rtol=0)
        # the cache is full: one more token is refused
        with pytest.raises(ValueError):
            model(idx[:, :1], cache=cache)


@pytest.mark.parametrize("pos", ["rope", "learned"])
def test_kv_cache_chunked_prefill_matches_full_forward(pos):
    """Chunks of several tokens after a non-empty cache: queries must see the past and their own chunk causally."""
    model = tiny_gpt(seed=17, pos=pos, std=0.2)
    T = model.cfg.block_size
    idx = torch.randint(0, VOCAB, (1, T), generator=torch.Generator().manual_seed(18))
    with torch.no_grad():
        full = model(idx)
        cache = model.make_cache(1)
        pieces, start = [], 0
        for size in (3, 1, 4, 2, 2):
            out = model(idx[:, start : start + size], cache=cache)
            pieces.append(out)
            start += size
        assert start == T
        torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-10, rtol=0)


# ---------------------------------------------------------------------------------------------------------------
# Initialisation


@pytest.mark.parametrize("pos", ["rope", "learned"])
@pytest.mark.parametrize("mlp", ["gelu", "relu2", "swiglu"])
def test_zero_init_proj_makes_blocks_identity(pos, mlp):
    torch.manual_seed(19)
    model = GPT(make_cfg(zero_init_proj=True, pos=pos, mlp=mlp, bias=True), VOCAB).eval()
    T = 10
    x = torch.randn(2, T, model.cfg.n_embd)
    rope = (model.rope_cos[:T], model.rope_sin[:T]) if pos == "rope" else None
    idx = torch.randint(0, VOCAB, (2, T))
    with torch.no_grad():
        for layer, block in enumerate(model.blocks):
            assert torch.equal(block(x, rope, None, layer), x)
            assert torch.count_nonzero(block.attn.proj.weight) == 0
            assert torch.count_nonzero(block.mlp.proj.weight) == 0
            assert block.attn.qkv.weight.detach().std() > 0.01  # the rest is not zero
        # the whole model is then embeddings -> final norm -> head
        h = model.wte(idx)
        if model.wpe is not None:
            h = h + model.wpe(torch.arange(T))
        expected = model.lm_head(model.norm_f(h))
        logits = model(idx)
    torch.testing.assert_close(logits, expected, atol=1e-6, rtol=1e-6)


def test_without_zero_init_blocks_are_not_identity():
    torch.manual_seed(20)
    model = GPT(make_cfg(zero_init_proj=False), VOCAB).eval()
    x = torch.randn(2, 6, model.cfg.n_embd)
    rope = (model.rope_cos[:6], model.rope_sin[:6])
    with torch.no_grad():
        assert not torch.allclose(model.blocks[0](x, rope, None, 0), x)
    expected_std = 0.02 / math.sqrt(2 * model.cfg.n_layer)
    assert float(model.blocks[0].mlp.proj.weight.detach().std()) == pytest.approx(expected_std, rel=0.25)


def test_init_statistics():
    torch.manual_seed(21)
    model = GPT(ModelConfig(block_size=16, n_layer=1, n_head=2, n_embd=32, bias=True, norm="layernorm"), 30)
    assert float(model.wte.weight.detach().std()) == pytest.approx(0.02, rel=0.2)
    assert float(model.lm_head.weight.detach().std()) == pytest.approx(0.02, rel=0.2)
    for name, p in model.named_parameters():
        if name.endswith("bias"):
            assert torch.count_nonzero(p) == 0, name
        if "norm" in name and name.endswith("weight"):
            assert torch.equal(p, torch.ones_like(p)), name


def test_tied_embeddings_share_storage():
    model = GPT(make_cfg(tie_embeddings=True), VOCAB)
    assert model.lm_head.weight is model.wte.weight
    untied = GPT(make_cfg(tie_embeddings=False), VOCAB)
    assert untied.lm_head.weight is not untied.wte.weight


def test_parameter_helpers_name_each_tensor_once_by_role():
    tied = GPT(make_cfg(tie_embeddings=True, pos="learned"), VOCAB)
    names = [n for n, _ in unique_parameters(tied)]
    assert "wte.weight" in names and "lm_head.weight" not in names  # a tied tensor keeps its first name
    assert len(names) == len({id(p) for _, p in unique_parameters(tied)}) == 19  # 2 tables, 2 x 8 in blocks, norm
    C, V, T = tied.cfg.n_embd, VOCAB, tied.cfg.block_size
    every_tensor = sum(p.numel() for _, p in tied.named_parameters(remove_duplicate=False))
    assert count_params(tied) == every_tensor - V * C  # the shared table counted once
    assert count_params(tied, non_embedding=True) == count_params(tied) - V * C - T * C
    assert matmul_params(tied) == count_params(tied, non_embedding=True) + V * C  # the tied head still multiplies
    assert {layer_of(n) for n in names} == {"embed", "block.0", "block.1", "head"}
    assert layer_of("wpe.weight") == "embed" and layer_of("blocks.1.mlp.fc.weight") == "block.1"
    assert layer_of("norm_f.weight") == "head" and layer_of("table.weight") == "embed"
    hidden = {n for n, p in unique_parameters(tied) if is_hidden_matrix(n, p)}
    assert hidden == {f"blocks.{i}.{m}.weight" for i in range(2) for m in ("attn.qkv", "attn.proj", "mlp.fc", "mlp.proj")}
    assert list(Bigram(make_cfg(), VOCAB).blocks) == []


# ---------------------------------------------------------------------------------------------------------------
# Config validation and the bigram baseline


@pytest.mark.parametrize(
    "kw",
    [
        dict(n_embd=30, n_head=4, pos="learned"),
        dict(n_embd=16, n_head=3, pos="learned"),
        dict(n_embd=16, n_head=32, pos="learned"),
        dict(block_size=0),
        dict(block_size=-4),
        dict(n_layer=0),
        dict(n_head=0),
        dict(n_head=-2),
        dict(n_embd=0),
        dict(n_embd=-16),
        dict(pos="rope", n_embd=12, n_head=4),  # odd head size 3
        dict(dropout=1.0),
        dict(dropout=-0.1),
        dict(mlp_ratio=0.0),
        dict(logit_softcap=-1.0),
    ],
)
def test_config_validation(kw):
    with pytest.raises(LmlabError):
        ModelConfig(**kw)


def hand_count(C: int, V: int, block: int, layers: int, head_dim: int, learned_pos: bool) -> int:
    """Parameters of a GPT with the default RMSNorm, QK-norm, ReLU² MLP (4C wide), no biases, untied head."""
    per_block = 2 * C + 3 * C * C + C * C + 2 * head_dim + 2 * 4 * C * C  # norms, qkv, proj, qk norms, MLP
    return V * C + (block * C if learned_pos else 0) + layers * per_block + C + V * C  # + final norm and head


@pytest.mark.parametrize("kw,head_dim", [
    (dict(n_embd=30, n_head=5, pos="learned"), 6),
    (dict(n_embd=12, n_head=4, pos="learned"), 3),  # an odd head size is fine without RoPE
    (dict(n_embd=16, n_head=4, pos="rope"), 4),
])
def test_valid_configs_are_accepted(kw, head_dim):
    cfg = ModelConfig(**kw)
    assert cfg.head_dim == head_dim
    model = build_model(cfg, VOCAB)
    idx = torch.randint(0, VOCAB, (2, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert model(idx).shape == (2, 5, VOCAB)
    expected = hand_count(cfg.n_embd, VOCAB, cfg.block_size, cfg.n_layer, head_dim, cfg.pos == "learned")
    assert count_params(model) == sum(p.numel() for p in model.parameters()) == expected


def test_non_positive_vocab_is_refused():
    with pytest.raises(LmlabError):
        GPT(make_cfg(), 0)
    with pytest.raises(LmlabError):
        Bigram(make_cfg(), 0)


@pytest.mark.parametrize("vocab", [2, 13, 30])
def test_bigram_initial_loss_is_log_vocab(vocab):
    model = build_model(make_cfg(arch="bigram"), vocab)
    assert isinstance(model, Bigram)
    g = torch.Generator().manual_seed(22)
    idx = torch.randint(0, vocab, (3, 9), generator=g)
    targets = torch.randint(0, vocab, (3, 9), generator=g)
    logits = model(idx)
    assert logits.shape == (3, 9, vocab)
    assert cross_entropy(logits, targets).item() == pytest.approx(math.log(vocab), rel=1e-6)


def test_bigram_depends_on_current_token_only():
    model = build_model(make_cfg(arch="bigram"), VOCAB)
    randomize(model, seed=23)
    idx = torch.tensor([[1, 2, 3, 2], [5, 2, 7, 1]])
    logits = model(idx)
    torch.testing.assert_close(logits[0, 1], logits[0, 3])
    torch.testing.assert_close(logits[0, 1], logits[1, 1])
    torch.testing.assert_close(logits[1, 2], model.table.weight[7])


@pytest.mark.parametrize("shape", [(3, 5, 8), (2, 4, 3, 6)])
def test_rmsnorm_and_squared_relu_gradients_match_autograd_reference(shape):
    """The hand-written backward passes equal autograd through the plain formulas (and finite differences)."""
    from lmlab.fused import _SquaredReLU
    from lmlab.model import RMSNorm

    g = torch.Generator().manual_seed(21)
    x = torch.randn(*shape, dtype=torch.float64, generator=g, requires_grad=True)
    norm = RMSNorm(shape[-1]).double()
    with torch.no_grad():
        norm.weight.copy_(torch.randn(shape[-1], dtype=torch.float64, generator=g))
    upstream = torch.randn(*shape, dtype=torch.float64, generator=g)
    ours_x, ours_w = torch.autograd.grad((norm(x) * upstream).sum(), (x, norm.weight))
    ref_x, ref_w = torch.autograd.grad((naive_rmsnorm(x, norm.weight) * upstream).sum(), (x, norm.weight))
    torch.testing.assert_close(ours_x, ref_x, atol=1e-10, rtol=1e-9)
    torch.testing.assert_close(ours_w, ref_w, atol=1e-10, rtol=1e-9)
    assert torch.autograd.gradcheck(lambda t: norm(t), (x,))
    (ours,) = torch.autograd.grad((_SquaredReLU.apply(x) * upstream).sum(), x)
    (ref,) = torch.autograd.grad((torch.relu(x) ** 2 * upstream).sum(), x)
    torch.testing.assert_close(ours, ref, atol=1e-12, rtol=1e-12)
    assert torch.autograd.gradcheck(_SquaredReLU.apply, (x,))


@pytest.mark.parametrize("shape", [(3, 5, 8), (2, 4)])
def test_fused_relu2_mlp_matches_the_unfused_modules_and_finite_differences(shape):
    """Training takes _ReLU2MLPFunction (a hand-written backward); its output and gradients for the input and both
    weights equal autograd through the plain fc -> relu^2 -> proj, with some hidden units inactive."""
    from lmlab.fused import _ReLU2MLPFunction
    from lmlab.model import MLP

    torch.manual_seed(5)
    mlp = MLP(ModelConfig(n_embd=shape[-1], n_head=1, mlp_ratio=2.0)).double()
    with torch.no_grad():
        mlp.proj.weight.normal_()  # zero-init would leave the fc gradient at zero
    assert mlp.fused
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(*shape, dtype=torch.float64)
    params = (x, mlp.fc.weight, mlp.proj.weight)
    ours = torch.autograd.grad((mlp(x) * upstream).sum(), params)
    hidden = mlp.fc(x)
    assert (hidden < 0).any() and (hidden > 0).any()
    ref = torch.autograd.grad((mlp.proj(torch.relu(hidden) ** 2) * upstream).sum(), params)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-9)
    torch.testing.assert_close(mlp(x), mlp.proj(torch.relu(mlp.fc(x)) ** 2), atol=1e-12, rtol=1e-12)
    assert torch.autograd.gradcheck(_ReLU2MLPFunction.apply, params)
    mlp.fused = False  # the unfused path is the same function
    torch.testing.assert_close(torch.autograd.grad((mlp(x) * upstream).sum(), params)[1], ref[1])


@pytest.mark.parametrize("shape", [(3, 5, 8), (2, 4)])
def test_fused_gelu_mlp_matches_the_unfused_modules_and_finite_differences(shape):
    """Training takes _GeluMLPFunction for GPT-2's bias-free GELU MLP; its output and gradients equal autograd
    through the plain fc -> gelu -> proj, and finite differences."""
    from lmlab.fused import _GeluMLPFunction
    from lmlab.model import MLP

    torch.manual_seed(6)
    mlp = MLP(ModelConfig(n_embd=shape[-1], n_head=1, mlp_ratio=2.0, mlp="gelu", bias=False)).double()
    with torch.no_grad():
        mlp.proj.weight.normal_()
    assert mlp.fused and not MLP(ModelConfig(n_embd=8, n_head=1, mlp="gelu", bias=True)).fused
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(*shape, dtype=torch.float64)
    params = (x, mlp.fc.weight, mlp.proj.weight)
    ours = torch.autograd.grad((mlp(x) * upstream).sum(), params)
    plain = lambda: (mlp.proj(torch.nn.functional.gelu(mlp.fc(x))) * upstream).sum()  # noqa: E731
    ref = torch.autograd.grad(plain(), params)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-9)
    assert torch.autograd.gradcheck(_GeluMLPFunction.apply, params)
    mlp.fused = False
    torch.testing.assert_close(torch.autograd.grad((mlp(x) * upstream).sum(), params)[0], ref[0])


# ---------------------------------------------------------------------------------------------------------------
# Static-shape decode step (a position tensor; what `lmlab sample --compile` compiles)


@pytest.mark.parametrize("dtype,atol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
@pytest.mark.parametrize("kw", CAUSAL_CONFIGS, ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()))
def test_decode_step_at_position_tensor_matches_full_forward(kw, dtype, atol):
    """Each step attends over the whole cache buffer with a mask; its logits equal the plain forward's."""
    model = tiny_gpt(seed=24, dtype=dtype, **kw)
    T = model.cfg.block_size
    idx = torch.randint(0, VOCAB, (2, T), generator=torch.Generator().manual_seed(25))
    with torch.no_grad():
        full = model(idx)
        cache = model.make_cache(2)
        for round_ in range(2):  # the second round reuses the buffer, whose later slots hold stale entries
            cache.pos = 0
            prefill = 3 + round_
            out = model(idx[:, :prefill], cache=cache)
            pieces = [out]
            pos = torch.tensor([prefill])
            for t in range(prefill, T):
                out = model(idx[:, t : t + 1], cache=cache, pos=pos)
                pieces.append(out)
                pos += 1
            assert cache.pos == prefill  # a step at a position tensor leaves the count to the caller
            torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=atol, rtol=0)
        with pytest.raises(ValueError):
            model(idx[:, :2], cache=cache, pos=pos)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_inference_fast_paths_match_the_autograd_functions(dtype):
    """Without grad, RMSNorm and ReLU² use plain ops; with grad, the hand-written Functions. Same outputs."""
    from lmlab.model import MLP, RMSNorm

    g = torch.Generator().manual_seed(28)
    x = torch.randn(2, 5, 16, dtype=torch.float64, generator=g).to(dtype)
    norm = RMSNorm(16).to(dtype)
    mlp = randomize(MLP(make_cfg(mlp="relu2")).to(dtype), seed=29)
    for module in (norm, mlp):
        with_grad = module(x)
        with torch.no_grad():
            without = module(x)
        assert with_grad.requires_grad and not without.requires_grad
        torch.testing.assert_close(without, with_grad.detach(), atol=1e-6 if dtype == torch.float32 else 1e-12, rtol=0)


# ---------------------------------------------------------------------------------------------------------------
# Logit soft cap


def test_logit_softcap_is_cap_tanh_of_the_uncapped_logits():
    """The capped model's logits are cap * tanh(z / cap) of the same weights' uncapped logits (a hand formula), all
    within (-cap, cap); the KV-cached path caps the same way."""
    plain = tiny_gpt(seed=21, std=1.0)
    capped = tiny_gpt(seed=21, std=1.0, logit_softcap=2.0)
    capped.load_state_dict(plain.state_dict())
    idx = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(22))
    with torch.no_grad():
        z, y = plain(idx), capped(idx)
        assert z.abs().max() > 2.0  # the cap binds somewhere, so the test can tell
        torch.testing.assert_close(y, 2.0 * torch.tanh(z / 2.0), atol=1e-12, rtol=0)
        assert y.abs().max() < 2.0
        cache = capped.make_cache(2)
        steps = [capped(idx[:, t : t + 1], cache=cache) for t in range(12)]
        torch.testing.assert_close(torch.cat(steps, 1), y, atol=1e-10, rtol=0)


# ---------------------------------------------------------------------------------------------------------------
# Value embeddings and U-net skips


def test_value_embedding_is_added_to_the_values_only():
    model = tiny_gpt(seed=23)
    attn = model.blocks[0].attn
    x = torch.randn(2, 12, 16, dtype=torch.float64)
    ve = torch.randn(2, 12, 16, dtype=torch.float64)
    rope = (model.rope_cos[:12], model.rope_sin[:12])
    q0, k0, v0 = attn.heads(x, rope)
    q1, k1, v1 = attn.heads(x, rope, ve)
    torch.testing.assert_close(q1, q0, atol=0, rtol=0)
    torch.testing.assert_close(k1, k0, atol=0, rtol=0)
    torch.testing.assert_close(v1, v0 + ve.view(2, 12, 2, 8).transpose(1, 2), atol=1e-12, rtol=0)


@pytest.mark.parametrize("n_layer", [4, 5])
def test_unet_skips_and_value_embeddings_match_a_hand_written_forward(n_layer):
    """Block by block, by hand: the first half's outputs join the second half's inputs in mirror order, each times its
    skip weight; every layer's values get the value embedding times its weight."""
    model = tiny_gpt(seed=24, n_layer=n_layer, value_embed=True, unet_skips=True)
    idx = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(25))
    with torch.no_grad():
        x, rope = model.wte(idx), (model.rope_cos[:12], model.rope_sin[:12])
        ve = model.vte(idx)
        outputs = []
        for i, block in enumerate(model.blocks):
            mirror = n_layer - 1 - i
            if mirror < n_layer // 2:  # second half: the mirror block's output joins the input
                x = x + model.skip_weights[i - (n_layer - n_layer // 2)] * outputs[mirror]
            x = block(x, rope, None, i, None, model.ve_weights[i] * ve)
            outputs.append(x)
        torch.testing.assert_close(model(idx), model.head(x), atol=1e-12, rtol=0)
        # the skips matter: with their weights at zero the model computes something else
        plain = model(idx)
        model.skip_weights.zero_()
        assert (model(idx) - plain).abs().max() > 1e-3


@pytest.mark.parametrize("kw", [dict(value_embed=True), dict(unet_skips=True), dict(value_embed=True, unet_skips=True)])
def test_value_embeddings_and_skips_keep_the_kv_cache_exact(kw):
    model = tiny_gpt(seed=26, n_layer=4, **kw)
    idx = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(27))
    with torch.no_grad():
        full = model(idx)
        cache = model.make_cache(2)
        pieces = [model(idx[:, :5], cache=cache)] + [model(idx[:, t : t + 1], cache=cache) for t in range(5, 12)]
        torch.testing.assert_close(torch.cat(pieces, 1), full, atol=1e-10, rtol=0)
        cache = model.make_cache(2)
        steps = [model(idx[:, t : t + 1], cache=cache, pos=torch.tensor([t])) for t in range(12)]
        torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-10, rtol=0)


def test_value_embedding_table_counts_as_an_embedding():
    plain, with_ve = tiny_gpt(seed=28), tiny_gpt(seed=28, value_embed=True)
    n_layer = plain.cfg.n_layer
    assert count_params(with_ve) == count_params(plain) + VOCAB * 16 + n_layer
    assert count_params(with_ve, non_embedding=True) == count_params(plain, non_embedding=True) + n_layer
    assert layer_of("vte.weight") == "embed" and not is_hidden_matrix("vte.weight", with_ve.vte.weight)


# ---------------------------------------------------------------------------------------------------------------
# Hook points: model.capture keeps named activations of the forward

HOOK_CONFIGS = [
    dict(pos="rope"), dict(pos="learned", norm="layernorm", bias=True, mlp="swiglu"),
    dict(value_embed=True, unet_skips=True, logit_softcap=3.0, n_layer=4), dict(unet_skips=True, n_layer=3),
]
HOOK_IDS = ["rope", "learned", "ve-unet", "unet-odd"]


def streams_and_logits(model) -> list[str]:
    return [name for name in model.hook_points() if not name.endswith("attn.weights")]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kw", HOOK_CONFIGS, ids=HOOK_IDS)
def test_captured_logits_and_streams_are_the_forwards_bit_for_bit(kw, dtype):
    """Captured without attention weights, the forward is the plain one: the same logits, bit for bit, and each
    stream is what the plain forward computes from the one before."""
    model = tiny_gpt(seed=30, dtype=dtype, **kw)
    idx = torch.randint(0, VOCAB, (3, 12), generator=torch.Generator().manual_seed(31))
    L = model.cfg.n_layer
    with torch.no_grad():
        plain = model(idx)
        with model.capture(*streams_and_logits(model)) as seen:
            out = model(idx)
        assert set(seen) == set(streams_and_logits(model)) and seen["logits"] is out
        assert torch.equal(seen["logits"], plain)
        embedding = model.wte(idx) + (model.wpe.weight[:12] if model.wpe is not None else 0)
        assert torch.equal(seen["blocks.0.resid_in"], embedding)
        assert torch.equal(seen["final_norm"], model.norm_f(seen[f"blocks.{L - 1}.resid_out"]))
        assert torch.equal(model.head(seen[f"blocks.{L - 1}.resid_out"]), plain)
        rope = (model.rope_cos[:12], model.rope_sin[:12]) if model.wpe is None else None
        for i, block in enumerate(model.blocks):
            ve = model.ve_weights[i] * model.vte(idx) if model.vte is not None else None
            block_out = block(seen[f"blocks.{i}.resid_in"], rope, None, i, None, ve)
            assert torch.equal(seen[f"blocks.{i}.resid_out"], block_out)
            mirror = L - 1 - i
            if i and not (model.skip_weights is not None and mirror < L // 2):  # no U-net skip joins here
                assert torch.equal(seen[f"blocks.{i}.resid_in"], seen[f"blocks.{i - 1}.resid_out"])
            elif i:
                skip = model.skip_weights[i - (L - L // 2)] * seen[f"blocks.{mirror}.resid_out"]
                joined = seen[f"blocks.{i - 1}.resid_out"] + skip
                assert torch.equal(seen[f"blocks.{i}.resid_in"], joined)


def test_capturing_in_training_keeps_the_gradients():
    """A capture while training changes neither the loss nor the gradients, and its tensors carry autograd."""
    model = tiny_gpt(seed=32, n_layer=3, value_embed=True, unet_skips=True).train()
    idx = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(33))
    plain = torch.autograd.grad(model(idx).square().mean(), list(model.parameters()))
    with model.capture(*streams_and_logits(model)) as seen:
        loss = model(idx).square().mean()
    assert seen["blocks.1.resid_out"].requires_grad
    for a, b in zip(plain, torch.autograd.grad(loss, list(model.parameters()))):
        assert torch.equal(a, b)


@pytest.mark.parametrize("kw", HOOK_CONFIGS, ids=HOOK_IDS)
def test_captured_attention_weights_match_a_naive_attention(kw):
    """Every layer's weights, from its captured input by the naive loop; the forward that writes them out gives the
    plain forward's logits to rounding."""
    model = tiny_gpt(seed=34, **kw)
    idx = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(35))
    angles = None
    if model.wpe is None:  # the naive angles in float64, in the model's tables too (computed there in float32)
        cos, sin, angles = naive_rope_tables(12, model.cfg.head_dim, model.cfg.rope_base)
        model.rope_cos[:12], model.rope_sin[:12] = cos, sin
    with torch.no_grad():
        plain = model(idx)
        with model.capture(*model.hook_points()) as seen:
            model(idx)
        torch.testing.assert_close(seen["logits"], plain, atol=1e-12, rtol=0)
        for i, block in enumerate(model.blocks):
            weights = seen[f"blocks.{i}.attn.weights"]
            assert weights.shape == (2, model.cfg.n_head, 12, 12)
            _, expected = naive_attention(block.attn, block.norm1(seen[f"blocks.{i}.resid_in"]), angles)
            torch.testing.assert_close(weights, expected, atol=1e-12, rtol=0)


def test_attention_weights_are_formed_only_where_asked(monkeypatch):
    """The fused kernel runs in every layer whose weights are not asked for, and only there."""
    model = tiny_gpt(seed=36, n_layer=3)
    idx = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(37))
    calls = []
    fused = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda *a, **k: calls.append(1) or fused(*a, **k))

    def fused_layers(*names):
        calls.clear()
        with torch.no_grad(), model.capture(*names) as seen:
            model(idx)
        return len(calls), sorted(seen)

    assert fused_layers() == (3, [])
    assert fused_layers(*streams_and_logits(model)) == (3, sorted(streams_and_logits(model)))
    assert fused_layers("blocks.1.attn.weights") == (2, ["blocks.1.attn.weights"])
    assert fused_layers(*[f"blocks.{i}.attn.weights" for i in range(3)])[0] == 0


@pytest.mark.parametrize("kw", [dict(pos="rope"), dict(pos="learned", value_embed=True, unet_skips=True, n_layer=4)],
                         ids=["rope", "learned-ve-unet"])
def test_capture_through_the_kv_cache(kw):
    """Cached decoding captures too: a prefix's weights over its keys, a step's over the keys so far (the static
    decode step's over the whole buffer, zero after its position), each row the full forward's."""
    model = tiny_gpt(seed=38, **kw)
    T = model.cfg.block_size
    idx = torch.randint(0, VOCAB, (2, T), generator=torch.Generator().manual_seed(39))
    name = f"blocks.{model.cfg.n_layer - 1}.attn.weights"
    with torch.no_grad(), model.capture(name, "logits") as seen:
        model(idx)
        full = seen[name]  # (B, H, T, T)
        cache = model.make_cache(2)
        model(idx[:, :5], cache=cache)
        torch.testing.assert_close(seen[name], full[:, :, :5, :5], atol=1e-12, rtol=0)
        model(idx[:, 5:6], cache=cache)
        torch.testing.assert_close(seen[name], full[:, :, 5:6, :6], atol=1e-12, rtol=0)
        for t in range(6, T):
            model(idx[:, t : t + 1], cache=cache, pos=torch.tensor([t]))
            torch.testing.assert_close(seen[name], full[:, :, t : t + 1], atol=1e-12, rtol=0)


def test_capture_names_scope_and_the_bigram():
    model = tiny_gpt(seed=40)
    idx = torch.randint(0, VOCAB, (1, 12), generator=torch.Generator().manual_seed(41))
    assert model.hook_points()[:3] == ["blocks.0.resid_in", "blocks.0.attn.weights", "blocks.0.resid_out"]
    assert model.hook_points()[-2:] == ["final_norm", "logits"] and len(model.hook_points()) == 3 * 2 + 2
    with pytest.raises(ValueError, match="'blocks.2.resid_in'.*blocks.1.resid_out"):
        with model.capture("blocks.2.resid_in"):
            pass
    with torch.no_grad():
        with model.capture("logits") as seen:
            with pytest.raises(RuntimeError, match="capturing already"):
                with model.capture("logits"):
                    pass
            kept = model(idx)
        model((idx + 1) % VOCAB)  # after the block, nothing is kept
        assert seen["logits"] is kept
        with pytest.raises(KeyError):  # an error inside the block ends the capture too
            with model.capture("final_norm"):
                raise KeyError
        with model.capture("final_norm") as seen:
            model(idx)
        assert list(seen) == ["final_norm"]
        bigram = build_model(ModelConfig(arch="bigram", block_size=12), VOCAB)
        assert bigram.hook_points() == ["logits"]
        with bigram.capture("logits") as seen:
            out = bigram(idx)
        assert torch.equal(seen["logits"], bigram(idx)) and seen["logits"] is out


@pytest.mark.slow
@pytest.mark.parametrize("kw", [dict(), dict(value_embed=True, unet_skips=True, n_layer=3)], ids=["plain", "ve-unet"])
def test_hook_points_keep_the_forward_one_graph(kw):
    """Outside a capture the hooks leave nothing for torch.compile to break on: the training forward (with its
    backward) and the static decode step each trace to one graph (dynamo alone, no compiler needed)."""
    model = tiny_gpt(seed=42, dtype=torch.float32, **kw).train()
    idx = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(43))
    explained = torch._dynamo.explain(model)(idx)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0)
    model.eval()
    with torch.no_grad():
        explained = torch._dynamo.explain(model)(idx[:1, :1], cache=model.make_cache(1), pos=torch.tensor([0]))
    assert (explained.graph_count, explained.graph_break_count) == (1, 0)
