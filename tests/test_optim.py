"""Optimizers against torch.optim step by step, schedules against hand-computed values, grouping, Muon, clipping."""

import math

import pytest
import torch
from helpers import HANG_S

from lmlab.common import LmlabError
from lmlab.loss import cross_entropy
from lmlab.model import GPT, ModelConfig
from lmlab.optim import (
    SGD,
    AdamW,
    Muon,
    OptimConfig,
    build_optimizer,
    clip_grad_norm,
    lr_multiplier,
    gram_newton_schulz,
    newton_schulz,
    orthogonalize,
    param_groups,
    set_lr,
)

STEPS = 10


def _toy_params(seed=0):
    """A matrix, a vector and a 3-D tensor, float64."""
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randn(4, 3, dtype=torch.float64, generator=g),
        torch.randn(4, dtype=torch.float64, generator=g),
        torch.randn(2, 2, 3, dtype=torch.float64, generator=g),
    ]


def _toy_data(seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(8, 3, dtype=torch.float64, generator=g), torch.randn(8, 4, dtype=torch.float64, generator=g)


def _toy_loss(params, x, y):
    W, b, c = params
    pred = torch.tanh(x @ W.T + b)  # (8, 4)
    extra = torch.sin(c.sum(dim=0) @ x.T).pow(2).mean()  # (2, 3) @ (3, 8): a second, non-trivial term
    return (pred - y).pow(2).mean() + 0.1 * extra + 0.05 * (W**4).sum()


def _clone_leaves(params):
    return [p.clone().requires_grad_(True) for p in params]


def _run_side_by_side(make_ours, make_ref, groups_of):
    """Step both optimizers on identical copies of the toy problem; the params must agree after every step."""
    init = _toy_params()
    x, y = _toy_data()
    ours_p, ref_p = _clone_leaves(init), _clone_leaves(init)
    ours, ref = make_ours(groups_of(ours_p)), make_ref(groups_of(ref_p))
    for step in range(STEPS):
        for opt, params in ((ours, ours_p), (ref, ref_p)):
            opt.zero_grad(set_to_none=True)
            _toy_loss(params, x, y).backward()
            opt.step()
        for a, b in zip(ours_p, ref_p):
            torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10, msg=lambda m, step=step: f"step {step}: {m}")
    # the params really moved (a no-op optimizer would not pass as a match of a no-op reference)
    assert max((a - b).abs().max() for a, b in zip(ours_p, init)) > 1e-3


def _single_group(params):
    return params


def _two_groups(params):
    # per-group hyperparameters: the second group overrides lr and weight_decay
    return [{"params": [params[0], params[2]]}, {"params": [params[1]], "lr": 0.03, "weight_decay": 0.0}]


@pytest.mark.parametrize("groups_of", [_single_group, _two_groups])
@pytest.mark.parametrize("lr,wd", [(0.1, 0.0), (0.05, 0.2)])
def test_sgd_matches_torch(lr, wd, groups_of):
    _run_side_by_side(
        lambda p: SGD(p, lr=lr, weight_decay=wd),
        lambda p: torch.optim.SGD(p, lr=lr, weight_decay=wd),
        groups_of,
    )


@pytest.mark.parametrize("groups_of", [_single_group, _two_groups])
@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("momentum,wd", [(0.9, 0.0), (0.5, 0.1)])
def test_momentum_matches_torch(momentum, wd, nesterov, groups_of):
    _run_side_by_side(
        lambda p: SGD(p, lr=0.05, momentum=momentum, nesterov=nesterov, weight_decay=wd),
        lambda p: torch.optim.SGD(p, lr=0.05, momentum=momentum, nesterov=nesterov, weight_decay=wd),
        groups_of,
    )


@pytest.mark.parametrize("groups_of", [_single_group, _two_groups])
@pytest.mark.parametrize(
    "lr,betas,eps,wd",
    [
        (1e-2, (0.9, 0.95), 1e-8, 0.0),
        (1e-2, (0.9, 0.95), 1e-8, 0.1),
        (3e-2, (0.8, 0.99), 1e-3, 0.5),
        (5e-3, (0.0, 0.9), 1e-6, 0.01),
    ],
)
def test_adamw_matches_torch(lr, betas, eps, wd, groups_of):
    _run_side_by_side(
        lambda p: AdamW(p, lr=lr, betas=betas, eps=eps, weight_decay=wd),
        lambda p: torch.optim.AdamW(p, lr=lr, betas=betas, eps=eps, weight_decay=wd),
        groups_of,
    )


def test_adamw_changing_lr_between_steps_matches_torch():
    """The schedule rewrites group['lr'] before each step; bias correction and decay must follow torch."""
    init = _toy_params()
    x, y = _toy_data()
    ours_p, ref_p = _clone_leaves(init), _clone_leaves(init)
    ours = AdamW(ours_p, lr=1e-2, weight_decay=0.1)
    ref = torch.optim.AdamW(ref_p, lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    for step in range(STEPS):
        lr = 1e-2 * lr_multiplier("cosine", step, step / STEPS, warmup=3)
        for opt, params in ((ours, ours_p), (ref, ref_p)):
            for g in opt.param_groups:
                g["lr"] = lr
            opt.zero_grad(set_to_none=True)
            _toy_loss(params, x, y).backward()
            opt.step()
        for a, b in zip(ours_p, ref_p):
            torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("skipped", [0, 1])
def test_adamw_with_intermittent_grads_matches_torch(skipped):
    """A parameter without a gradient on some step is skipped, and its own step count (hence its bias correction)
    does not advance, as in torch.optim.AdamW; the other parameters of the group keep their own counts."""
    init = _toy_params()
    x, y = _toy_data()
    ours_p, ref_p = _clone_leaves(init), _clone_leaves(init)
    ours = AdamW(ours_p, lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    ref = torch.optim.AdamW(ref_p, lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    for step in range(6):
        for opt, params in ((ours, ours_p), (ref, ref_p)):
            opt.zero_grad(set_to_none=True)
            _toy_loss(params, x, y).backward()
            if step in (1, 2):
                params[skipped].grad = None  # e.g. a parameter unused by this step's forward
            opt.step()
        for i, (a, b) in enumerate(zip(ours_p, ref_p)):
            torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10, msg=lambda m, step=step, i=i: f"step {step}, param {i}: {m}")


def test_params_without_grad_are_left_alone():
    a = torch.ones(3, dtype=torch.float64, requires_grad=True)
    b = torch.ones(3, dtype=torch.float64, requires_grad=True)
    for opt in (SGD([a, b], lr=0.1, momentum=0.9, weight_decay=0.1), AdamW([a, b], lr=0.1, weight_decay=0.1)):
        a.grad = torch.ones_like(a)
        b.grad = None
        opt.step()
        assert torch.equal(b, torch.ones(3, dtype=torch.float64))
        assert not torch.equal(a, torch.ones(3, dtype=torch.float64))


# ---------------------------------------------------------------------------------------------------------------
# Schedules


def test_constant_schedule_with_warmup():
    assert lr_multiplier("constant", 0, 0.0, warmup=10) == pytest.approx(0.1)
    assert lr_multiplier("constant", 4, 0.1, warmup=10) == pytest.approx(0.5)
    assert lr_multiplier("constant", 9, 0.2, warmup=10) == pytest.approx(1.0)
    assert lr_multiplier("constant", 10, 0.5, warmup=10) == pytest.approx(1.0)
    assert lr_multiplier("constant", 500, 1.0, warmup=10) == pytest.approx(1.0)
    assert lr_multiplier("constant", 0, 0.0, warmup=0) == pytest.approx(1.0)


@pytest.mark.parametrize("final", [0.0, 0.1, 0.5])
def test_cosine_schedule(final):
    assert lr_multiplier("cosine", 100, 0.0, final_frac=final) == pytest.approx(1.0)
    assert lr_multiplier("cosine", 100, 0.5, final_frac=final) == pytest.approx((1.0 + final) / 2)
    assert lr_multiplier("cosine", 100, 1.0, final_frac=final) == pytest.approx(final)
    quarter = final + (1 - final) * 0.5 * (1 + math.cos(math.pi / 4))
    assert lr_multiplier("cosine", 100, 0.25, final_frac=final) == pytest.approx(quarter)
    # progress past the budget is clamped
    assert lr_multiplier("cosine", 100, 1.5, final_frac=final) == pytest.approx(final)
    # warmup multiplies the shape: step 2 of a 10-step warmup is 3/10
    assert lr_multiplier("cosine", 2, 0.5, warmup=10, final_frac=final) == pytest.approx(0.3 * (1.0 + final) / 2)


def test_cosine_is_monotone_after_warmup():
    values = [lr_multiplier("cosine", 50, p / 100, warmup=5, final_frac=0.1) for p in range(101)]
    assert all(a >= b for a, b in zip(values, values[1:]))


@pytest.mark.parametrize("final", [0.0, 0.2])
def test_wsd_schedule(final):
    kw = dict(warmup=0, decay_fraction=0.4, final_frac=final)
    # stable: 1 until progress 0.6
    for p in (0.0, 0.3, 0.59, 0.6):
        assert lr_multiplier("wsd", 100, p, **kw) == pytest.approx(1.0), p
    # then linear from 1 at 0.6 to final at 1.0
    for p in (0.7, 0.8, 0.9, 1.0):
        expected = 1.0 + (final - 1.0) * (p - 0.6) / 0.4
        assert lr_multiplier("wsd", 100, p, **kw) == pytest.approx(expected), p
    assert lr_multiplier("wsd", 100, 0.8, **kw) == pytest.approx((1.0 + final) / 2)
    assert lr_multiplier("wsd", 100, 1.0, **kw) == pytest.approx(final)
    assert lr_multiplier("wsd", 100, 2.0, **kw) == pytest.approx(final)
    # with warmup
    assert lr_multiplier("wsd", 1, 0.01, warmup=4, decay_fraction=0.4, final_frac=final) == pytest.approx(0.5)
    assert lr_multiplier("wsd", 3, 0.9, warmup=4, decay_fraction=0.4, final_frac=final) == pytest.approx(
        1.0 + (final - 1.0) * 0.75
    )


@pytest.mark.parametrize("shape,f", [
    ("linear", lambda t: 1.0 - t),
    ("sqrt", lambda t: 1.0 - math.sqrt(t)),
    ("cosine", lambda t: 0.5 * (1.0 + math.cos(math.pi * t))),
])
def test_wsd_decay_shapes(shape, f):
    """Hand values: stable at 1 until progress 0.6, then final + (1 - final) f(t), t = (progress - 0.6) / 0.4."""
    kw = dict(warmup=0, decay_fraction=0.4, final_frac=0.1, decay_shape=shape)
    assert lr_multiplier("wsd", 100, 0.6, **kw) == pytest.approx(1.0)
    for p, t in ((0.7, 0.25), (0.8, 0.5), (0.9, 0.75), (1.0, 1.0)):
        assert lr_multiplier("wsd", 100, p, **kw) == pytest.approx(0.1 + 0.9 * f(t)), (p, t)


def test_wsd_without_decay_is_constant():
    for p in (0.0, 0.5, 0.99, 1.0):
        assert lr_multiplier("wsd", 100, p, decay_fraction=0.0, final_frac=0.0) == pytest.approx(1.0)


def test_wsd_all_decay_is_linear():
    for p in (0.0, 0.25, 0.5, 1.0):
        assert lr_multiplier("wsd", 100, p, decay_fraction=1.0, final_frac=0.0) == pytest.approx(1.0 - p)


def test_unknown_schedule_raises():
    with pytest.raises(LmlabError):
        lr_multiplier("linear", 0, 0.0)


def test_set_lr_scales_the_configs_peak_learning_rates():
    model = GPT(ModelConfig(block_size=8, n_layer=1, n_head=2, n_embd=16), 11)
    cfg = OptimConfig(optimizer="muon", lr=1e-3, muon_lr=0.02)
    opt = build_optimizer(model, cfg)
    set_lr(opt, cfg, 0.25)
    for g in opt.param_groups:
        expected = 0.02 * 0.25 if g.get("use_muon") else 1e-3 * 0.25
        assert g["lr"] == pytest.approx(expected)


# ---------------------------------------------------------------------------------------------------------------
# Grouping


def _tiny_model(**kw):
    base = dict(block_size=8, n_layer=2, n_head=2, n_embd=16, norm="layernorm", bias=True, pos="learned")
    base.update(kw)
    torch.manual_seed(0)
    return GPT(ModelConfig(**base), 11)


def _names(model, params):
    by_id = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), name)
    return {by_id[id(p)] for p in params}


@pytest.mark.parametrize("optimizer", ["sgd", "momentum", "adamw"])
@pytest.mark.parametrize("norm,bias", [("layernorm", True), ("rmsnorm", False)])
def test_build_optimizer_weight_decay_groups(optimizer, norm, bias):
    model = _tiny_model(norm=norm, bias=bias)
    opt = build_optimizer(model, OptimConfig(optimizer=optimizer, weight_decay=0.1))
    groups = {g["name"]: g for g in opt.param_groups}
    assert set(groups) == {"decay", "no_decay"}
    assert groups["decay"]["weight_decay"] == 0.1
    assert groups["no_decay"]["weight_decay"] == 0.0
    decay = _names(model, groups["decay"]["params"])
    no_decay = _names(model, groups["no_decay"]["params"])
    matrices = {n for n, p in model.named_parameters() if p.dim() == 2}
    vectors = {n for n, p in model.named_parameters() if p.dim() == 1}
    assert decay == matrices
    assert no_decay == vectors
    assert all("norm" in n or n.endswith("bias") for n in no_decay)
    if bias:
        assert "blocks.0.attn.qkv.bias" in no_decay and "blocks.1.norm2.bias" in no_decay
    assert "blocks.0.norm1.weight" in no_decay and "norm_f.weight" in no_decay
    assert {"wte.weight", "wpe.weight", "lm_head.weight", "blocks.0.mlp.fc.weight"} <= decay
    # every parameter exactly once
    listed = [p for g in opt.param_groups for p in g["params"]]
    assert len(listed) == len({id(p) for p in listed}) == len(list(model.parameters()))


def test_build_optimizer_kinds_and_hyperparameters():
    model = _tiny_model()
    adamw = build_optimizer(model, OptimConfig(optimizer="adamw", lr=2e-3, beta1=0.8, beta2=0.9, eps=1e-7))
    assert isinstance(adamw, AdamW)
    for g in adamw.param_groups:
        assert g["lr"] == 2e-3 and g["betas"] == (0.8, 0.9) and g["eps"] == 1e-7
    sgd = build_optimizer(model, OptimConfig(optimizer="sgd", lr=0.1))
    assert isinstance(sgd, SGD) and all(g["momentum"] == 0 for g in sgd.param_groups)
    mom = build_optimizer(model, OptimConfig(optimizer="momentum", momentum=0.7, nesterov=True))
    assert all(g["momentum"] == 0.7 and g["nesterov"] for g in mom.param_groups)
    with pytest.raises(LmlabError):
        build_optimizer(model, OptimConfig(optimizer="lion"))


def test_tied_embedding_is_listed_once():
    model = _tiny_model(tie_embeddings=True)
    groups = param_groups(model, 0.1)
    listed = [p for g in groups for p in g["params"]]
    assert len(listed) == len({id(p) for p in listed})
    assert sum(p is model.wte.weight for p in listed) == 1


def test_built_adamw_matches_torch_with_same_groups():
    """build_optimizer's AdamW, weight decay on matrices only, against torch.optim.AdamW on the same split."""
    cfg = OptimConfig(optimizer="adamw", lr=1e-2, weight_decay=0.3, beta1=0.85, beta2=0.97, eps=1e-7)
    ours_model, ref_model = _tiny_model().double(), _tiny_model().double()
    ours = build_optimizer(ours_model, cfg)
    ref = torch.optim.AdamW(
        [
            {"params": [p for p in ref_model.parameters() if p.dim() >= 2], "weight_decay": 0.3},
            {"params": [p for p in ref_model.parameters() if p.dim() < 2], "weight_decay": 0.0},
        ],
        lr=1e-2, betas=(0.85, 0.97), eps=1e-7,
    )
    g = torch.Generator().manual_seed(3)
    idx = torch.randint(0, 11, (2, 8), generator=g)
    targets = torch.randint(0, 11, (2, 8), generator=g)
    for _ in range(5):
        for model, opt in ((ours_model, ours), (ref_model, ref)):
            opt.zero_grad(set_to_none=True)
            cross_entropy(model(idx), targets).backward()
            opt.step()
    for (name, a), b in zip(ours_model.named_parameters(), ref_model.parameters()):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-8, msg=name)


def test_muon_groups():
    model = _tiny_model(tie_embeddings=False)
    opt = build_optimizer(model, OptimConfig(optimizer="muon", lr=1e-3, muon_lr=0.02, weight_decay=0.1))
    assert isinstance(opt, Muon)
    muon = [g for g in opt.param_groups if g.get("use_muon")]
    assert len(muon) == 1
    muon_names = _names(model, muon[0]["params"])
    expected = {n for n, p in model.named_parameters() if p.dim() == 2 and n.startswith("blocks.")}
    assert muon_names == expected
    assert "blocks.0.attn.qkv.weight" in muon_names and "blocks.1.mlp.proj.weight" in muon_names
    assert muon[0]["lr"] == 0.02 and muon[0]["weight_decay"] == 0.1
    others = [g for g in opt.param_groups if not g.get("use_muon")]
    other_names = set().union(*(_names(model, g["params"]) for g in others))
    for name in ("wte.weight", "wpe.weight", "lm_head.weight", "blocks.0.norm1.weight", "blocks.0.attn.qkv.bias"):
        assert name in other_names and name not in muon_names
    for g in others:
        assert g["lr"] == 1e-3
    decay = [g for g in others if g["name"] == "decay"][0]
    assert _names(model, decay["params"]) == {"wte.weight", "wpe.weight", "lm_head.weight"}
    listed = [p for g in opt.param_groups for p in g["params"]]
    assert len(listed) == len({id(p) for p in listed}) == len(list(model.parameters()))


def test_muon_adamw_part_matches_torch():
    """Groups without use_muon are plain AdamW."""
    init = _toy_params()
    x, y = _toy_data()
    ours_p, ref_p = _clone_leaves(init), _clone_leaves(init)
    ours = Muon([{"params": ours_p, "weight_decay": 0.1}], lr=1e-2, betas=(0.9, 0.95), eps=1e-8)
    ref = torch.optim.AdamW(ref_p, lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    for _ in range(STEPS):
        for opt, params in ((ours, ours_p), (ref, ref_p)):
            opt.zero_grad(set_to_none=True)
            _toy_loss(params, x, y).backward()
            opt.step()
    for a, b in zip(ours_p, ref_p):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


# ---------------------------------------------------------------------------------------------------------------
# Muon


@pytest.mark.parametrize("shape", [(48, 16), (16, 48), (32, 20), (20, 32)])
def test_orthogonalize_singular_values_near_one(shape):
    g = torch.Generator().manual_seed(4)
    G = torch.randn(*shape, generator=g)
    O = orthogonalize(G)
    assert O.shape == G.shape and O.dtype == G.dtype
    s = torch.linalg.svdvals(O.double())
    assert s.min() > 0.5 and s.max() < 1.5, s
    # the singular vectors are those of G: U^T O V is (nearly) diagonal
    U, _, Vh = torch.linalg.svd(G.double(), full_matrices=False)
    M = U.T @ O.double() @ Vh.T
    off = M - torch.diag(torch.diagonal(M))
    assert off.norm() < 1e-3 * M.norm()
    assert torch.diagonal(M).min() > 0.5


def test_orthogonalize_is_scale_invariant_and_keeps_dtype():
    G = torch.randn(24, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    O = orthogonalize(G)
    assert O.dtype == torch.float64
    torch.testing.assert_close(orthogonalize(1000.0 * G), O, atol=1e-4, rtol=1e-4)


def test_orthogonalize_ill_conditioned_matrix():
    """A matrix with singular values spread over 1e-1 .. 1e1 comes out with all of them near 1."""
    g = torch.Generator().manual_seed(6)
    U, _ = torch.linalg.qr(torch.randn(20, 12, generator=g))
    V, _ = torch.linalg.qr(torch.randn(12, 12, generator=g))
    s = torch.logspace(-1, 1, 12)
    O = orthogonalize(U @ torch.diag(s) @ V.T)
    sv = torch.linalg.svdvals(O)
    assert sv.min() > 0.5 and sv.max() < 1.5, sv


@pytest.mark.parametrize("shape", [(16, 48), (3, 12, 40), (2, 24, 24)])
def test_gram_newton_schulz_equals_the_plain_iteration(shape):
    """The Gram-matrix form is the same polynomial: equal to the written-out iteration to 1e-10 in fp64, 1e-4 in
    fp32, and within 5e-4 (entries of size ~0.2) for an ill-conditioned input, singular values 1 .. 1e-6."""
    g = torch.Generator().manual_seed(9)
    x = torch.randn(*shape, dtype=torch.float64, generator=g)
    x = x / torch.linalg.matrix_norm(x, keepdim=True)
    torch.testing.assert_close(gram_newton_schulz(x, 5), newton_schulz(x, 5), atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(gram_newton_schulz(x.float(), 5).double(), newton_schulz(x, 5), atol=1e-4, rtol=0)
    m, n = shape[-2:]
    U, _ = torch.linalg.qr(torch.randn(m, m, dtype=torch.float64, generator=g))
    V, _ = torch.linalg.qr(torch.randn(n, m, dtype=torch.float64, generator=g))
    ill = U @ torch.diag(torch.logspace(0, -6, m, dtype=torch.float64)) @ V.T
    reference = newton_schulz(ill, 5)
    torch.testing.assert_close(gram_newton_schulz(ill.float(), 5).double(), reference, atol=5e-4, rtol=0)
    assert gram_newton_schulz(x, 0) is x


def test_muon_orthogonalises_a_matrix_and_its_transpose_together():
    """Tall matrices join the stack of their transpose's shape; each update equals orthogonalising it alone."""
    g = torch.Generator().manual_seed(10)
    shapes = [(12, 4), (4, 12), (12, 4), (6, 6)]
    p0 = [torch.randn(*s, dtype=torch.float64, generator=g) for s in shapes]
    grads = [torch.randn(*s, dtype=torch.float64, generator=g) for s in shapes]
    ps = [p.clone().requires_grad_(True) for p in p0]
    for p, gr in zip(ps, grads):
        p.grad = gr.clone()
    Muon([{"params": ps, "use_muon": True, "weight_decay": 0.0}], lr=0.1, momentum=0.5).step()
    for p, start, gr in zip(ps, p0, grads):
        scale = math.sqrt(max(1.0, start.size(0) / start.size(1)))
        expected = start - 0.1 * scale * orthogonalize(gr * 1.5)
        torch.testing.assert_close(p.detach(), expected, atol=1e-10, rtol=1e-10)


def test_muon_reduces_least_squares_loss():
    g = torch.Generator().manual_seed(7)
    X = torch.randn(8, 64, generator=g)
    W_true = torch.randn(16, 8, generator=g) / math.sqrt(8)
    Y = W_true @ X
    W = torch.zeros(16, 8, requires_grad=True)
    opt = Muon([{"params": [W], "use_muon": True, "weight_decay": 0.0}], lr=0.02, momentum=0.95)

    def loss_fn():
        return ((W @ X - Y) ** 2).mean()

    def value():
        with torch.no_grad():
            return float(loss_fn())

    initial = value()
    for _ in range(100):
        opt.zero_grad(set_to_none=True)
        loss = loss_fn()
        loss.backward()
        opt.step()
    final = value()
    assert final < 0.1 * initial, (initial, final)
    assert opt.state[W]["momentum_buffer"].abs().sum() > 0


def test_muon_first_step_is_scaled_orthogonal_update():
    """Step 1 from zero momentum: buf = g, update = orth(g + mu g), p -= lr * sqrt(max(1, rows/cols)) * update."""
    g = torch.Generator().manual_seed(8)
    for shape in ((12, 4), (4, 12)):
        p0 = torch.randn(*shape, generator=g)
        grad = torch.randn(*shape, generator=g)
        p = p0.clone().requires_grad_(True)
        p.grad = grad.clone()
        opt = Muon([{"params": [p], "use_muon": True, "weight_decay": 0.1}], lr=0.05, momentum=0.9)
        opt.step()
        # an exact orthogonalisation: the update has singular values ~1 and the direction of U V^T of 1.9 g
        delta = (p0 * (1 - 0.05 * 0.1) - p.detach()) / (0.05 * math.sqrt(max(1.0, shape[0] / shape[1])))
        sv = torch.linalg.svdvals(delta)
        assert sv.min() > 0.5 and sv.max() < 1.5, sv
        U, _, Vh = torch.linalg.svd(grad, full_matrices=False)
        cos = (delta * (U @ Vh)).sum() / (delta.norm() * (U @ Vh).norm())
        assert cos > 0.95


# ---------------------------------------------------------------------------------------------------------------
# Clipping


def _with_grads():
    a = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(1, 1, dtype=torch.float64, requires_grad=True)
    c = torch.zeros(3, dtype=torch.float64, requires_grad=True)  # no grad: ignored
    a.grad = torch.tensor([3.0, 4.0], dtype=torch.float64)  # norm 5
    b.grad = torch.tensor([[12.0]], dtype=torch.float64)  # global norm sqrt(25 + 144) = 13
    return a, b, c


def test_clip_grad_norm_scales_to_max_norm():
    a, b, c = _with_grads()
    total = clip_grad_norm([a, b, c], 6.5)
    assert float(total) == pytest.approx(13.0)
    new_norm = math.sqrt(float(a.grad.pow(2).sum() + b.grad.pow(2).sum()))
    assert new_norm == pytest.approx(6.5, rel=1e-5)
    torch.testing.assert_close(a.grad, torch.tensor([1.5, 2.0], dtype=torch.float64), rtol=1e-5, atol=0)
    torch.testing.assert_close(b.grad, torch.tensor([[6.0]], dtype=torch.float64), rtol=1e-5, atol=0)
    assert c.grad is None


def test_clip_grad_norm_leaves_small_grads_alone():
    a, b, c = _with_grads()
    total = clip_grad_norm([a, b, c], 100.0)
    assert float(total) == pytest.approx(13.0)
    assert torch.equal(a.grad, torch.tensor([3.0, 4.0], dtype=torch.float64))
    assert torch.equal(b.grad, torch.tensor([[12.0]], dtype=torch.float64))


def test_clip_grad_norm_zero_means_off():
    a, b, c = _with_grads()
    total = clip_grad_norm([a, b, c], 0.0)
    assert float(total) == pytest.approx(13.0)
    assert torch.equal(a.grad, torch.tensor([3.0, 4.0], dtype=torch.float64))


@pytest.mark.parametrize("max_norm", [0.5, 3.0, 1e9])
def test_clip_grad_norm_on_cpu_is_torchs_bit_for_bit(max_norm):
    """The CPU path (its own norm and scaling) gives torch.nn.utils.clip_grad_norm_'s norm and gradients exactly,
    whether it clips or not."""
    g = torch.Generator().manual_seed(4)
    shapes = [(65, 16), (16,), (48, 16), (16, 64)]
    ours = [torch.zeros(s, requires_grad=True) for s in shapes]
    ref = [torch.zeros(s, requires_grad=True) for s in shapes]
    for a, b in zip(ours, ref):
        a.grad = torch.randn(a.shape, generator=g) * 0.3
        b.grad = a.grad.clone()
    before = ours[0].grad.clone()
    total = clip_grad_norm(ours, max_norm)
    expected = torch.nn.utils.clip_grad_norm_(ref, max_norm, foreach=True)
    assert torch.equal(total, expected)
    assert all(torch.equal(a.grad, b.grad) for a, b in zip(ours, ref))
    assert torch.equal(ours[0].grad, before) == (float(total) <= max_norm)  # scaled only when over the limit


def test_clip_grad_norm_random_against_hand_computation():
    g = torch.Generator().manual_seed(9)
    params = [torch.zeros(s, dtype=torch.float64, requires_grad=True) for s in ((5, 3), (7,), (2, 2, 2))]
    for p in params:
        p.grad = torch.randn(p.shape, dtype=torch.float64, generator=g)
    old = [p.grad.clone() for p in params]
    norm = math.sqrt(sum(float(gr.pow(2).sum()) for gr in old))
    total = clip_grad_norm(params, 0.5)
    assert float(total) == pytest.approx(norm, rel=1e-9)
    for p, gr in zip(params, old):
        torch.testing.assert_close(p.grad, gr * 0.5 / norm, rtol=1e-5, atol=0)


# ---------------------------------------------------------------------------------------------------------------
# Config validation


@pytest.mark.parametrize(
    "kw", [dict(lr=0.0), dict(lr=-1.0), dict(muon_lr=0.0), dict(warmup=-1), dict(decay_fraction=1.5),
           dict(decay_fraction=-0.1), dict(grad_clip=-1.0), dict(weight_decay=-0.1)]
)
def test_optim_config_validation(kw):
    with pytest.raises(LmlabError):
        OptimConfig(**kw)


def test_warmup_also_ends_after_a_share_of_the_budget():
    # 100 warmup steps, but a short budget: warmup ends once 10% of the budget is done, whichever comes first
    assert lr_multiplier("constant", 2, 0.05, warmup=100, warmup_fraction=0.1) == pytest.approx(0.5)
    assert lr_multiplier("constant", 2, 0.10, warmup=100, warmup_fraction=0.1) == pytest.approx(1.0)
    assert lr_multiplier("constant", 2, 0.05, warmup=100, warmup_fraction=0.0) == pytest.approx(3 / 100)
    # a long run: the step count ends warmup first, the fraction changes nothing
    assert lr_multiplier("constant", 49, 0.01, warmup=50, warmup_fraction=0.1) == pytest.approx(1.0)
    assert lr_multiplier("constant", 9, 0.002, warmup=50, warmup_fraction=0.1) == pytest.approx(10 / 50)
    # after warmup the schedule's shape applies as before
    assert lr_multiplier("wsd", 60, 0.8, warmup=50, decay_fraction=0.4, warmup_fraction=0.1) == pytest.approx(0.5)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.float64, 1e-12)])
def test_fused_adamw_kernel_equals_the_written_out_update(monkeypatch, dtype, tol):
    """The fast path (PyTorch's fused AdamW kernel) against this file's foreach definition, with a parameter that
    misses some steps (so the bias corrections differ per parameter) and weight decay on one group only."""
    import lmlab.optim as lo

    def run(fused: bool) -> list[torch.Tensor]:
        monkeypatch.setattr(lo, "FUSED", fused)
        gen = torch.Generator().manual_seed(3)
        params = [torch.randn(5, 4, generator=gen, dtype=dtype).requires_grad_(),
                  torch.randn(7, generator=gen, dtype=dtype).requires_grad_()]
        opt = lo.AdamW([{"params": params[:1], "weight_decay": 0.1}, {"params": params[1:], "weight_decay": 0.0}],
                       lr=1e-2, betas=(0.9, 0.95), eps=1e-8)
        for step in range(6):
            for i, p in enumerate(params):
                p.grad = None if (i == 1 and step % 3 == 1) else torch.randn(p.shape, generator=gen, dtype=dtype)
            opt.step()
        return [p.detach().clone() for p in params]

    for a, b in zip(run(True), run(False)):
        torch.testing.assert_close(a, b, atol=tol, rtol=tol)


@pytest.mark.slow
def test_optimizers_do_not_import_dynamo(tmp_path):
    """torch.optim.Optimizer's wrapped methods import torch._dynamo (about 70 MB) on first call; lmlab's optimizers
    call them unwrapped. A fresh process builds each optimizer, steps it, zeroes the grads and round-trips its state,
    and torch._dynamo is still not loaded. (Its import is also what the check would see if a method were wrapped.)"""
    import subprocess
    import sys

    code = """
import sys, torch
from lmlab.loss import cross_entropy
from lmlab.model import GPT, ModelConfig
from lmlab.optim import OptimConfig, build_optimizer
assert "torch._dynamo" not in sys.modules
for name in ("sgd", "adamw", "muon"):
    model = GPT(ModelConfig(block_size=8, n_layer=1, n_head=2, n_embd=16), 11)
    opt = build_optimizer(model, OptimConfig(optimizer=name))
    loss = cross_entropy(model(torch.randint(0, 11, (2, 8))), torch.randint(0, 11, (2, 8)))
    loss.backward()
    opt.step()
    opt.zero_grad()
    opt.load_state_dict(opt.state_dict())
    assert all(p.grad is None for p in model.parameters())
print("dynamo" if "torch._dynamo" in sys.modules else "clean")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=HANG_S)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "clean"
    # the check can fail: torch's own optimizer loads it
    torch_opt = subprocess.run([sys.executable, "-c", "import sys, torch; torch.optim.SGD([torch.zeros(1)], lr=1.0)\n"
                                "print('torch._dynamo' in sys.modules)"], capture_output=True, text=True, timeout=HANG_S)
    assert torch_opt.stdout.strip() == "True"
