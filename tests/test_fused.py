"""fused.gpt2_block, the whole GPT-2 block as one hand-written autograd function: eager CPU training takes it for
GPT-2's configuration (LayerNorm, learned positions, exact GELU, no QK-norm). Its output and every gradient equal the
modules' own autograd, and finite differences; it applies only where nothing else is asked of the block."""

import copy

import pytest
import torch

from lmlab.fused import _GPT2BlockFunction
from lmlab.loss import LossConfig
from lmlab.model import GPT, ModelConfig
from lmlab.optim import OptimConfig, build_optimizer

VOCAB = 11


def gpt2_cfg(**kw) -> ModelConfig:
    base = dict(block_size=10, n_layer=2, n_head=2, n_embd=8, pos="learned", norm="layernorm", mlp="gelu",
                qk_norm=False, zero_init_proj=False)
    return ModelConfig(**(base | kw))


@torch.no_grad()
def randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every parameter random, norm gains near one, biases and all: nothing trivially symmetric or zero."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype)
        p.copy_(1.0 + 0.2 * noise if "norm" in name and name.endswith("weight") else 0.3 * noise)
    return model


def block_nodes(model: GPT, idx: torch.Tensor) -> int:
    """How many of the model's blocks ran as the fused function in a forward of idx."""
    seen = []
    hooks = [b.register_forward_hook(lambda m, i, out: seen.append(type(out.grad_fn).__name__)) for b in model.blocks]
    try:
        model(idx)
    finally:
        for h in hooks:
            h.remove()
    return sum(name == "_GPT2BlockFunctionBackward" for name in seen)


def unfused(model: GPT) -> GPT:
    twin = copy.deepcopy(model)
    for block in twin.blocks:
        block.gpt2 = False
    return twin


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype,atol", [(torch.float64, 1e-11), (torch.float32, 2e-5)])
def test_fused_block_matches_the_modules(bias, dtype, atol):
    """Logits, loss and the gradient of every parameter (tied embeddings included) as the plain modules give them."""
    torch.manual_seed(0)
    model = randomize(GPT(gpt2_cfg(bias=bias, tie_embeddings=True), VOCAB), seed=1).to(dtype).train()
    plain = unfused(model)
    g = torch.Generator().manual_seed(2)
    idx, targets = torch.randint(0, VOCAB, (3, 10), generator=g), torch.randint(0, VOCAB, (3, 10), generator=g)
    assert block_nodes(model, idx) == 2 and block_nodes(plain, idx) == 0
    losses = []
    for m in (model, plain):
        logits = m(idx)
        loss = torch.nn.functional.cross_entropy(logits.view(-1, VOCAB), targets.view(-1))
        loss.backward()
        losses.append((logits, loss))
    torch.testing.assert_close(losses[0][0], losses[1][0], atol=atol, rtol=0)
    for (name, p), (_, q) in zip(model.named_parameters(), plain.named_parameters()):
        assert p.grad is not None and p.grad.abs().sum() > 0, name
        torch.testing.assert_close(p.grad, q.grad, atol=atol, rtol=1e-4 if dtype == torch.float32 else 1e-9,
                                   msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("bias", [False, True])
def test_fused_block_passes_finite_differences(bias):
    """torch.autograd.gradcheck on the function itself: the input and every weight and bias."""
    torch.manual_seed(3)
    B, T, C, H = 2, 5, 6, 2
    shapes = [(C,), (C,), (3 * C, C), (3 * C,), (C, C), (C,), (C,), (C,), (4 * C, C), (4 * C,), (C, 4 * C), (C,)]
    params = [torch.randn(s, dtype=torch.float64, requires_grad=True) if bias or i % 2 == 0 else None
              for i, s in enumerate(shapes)]  # weights at even places, biases at odd ones
    x = torch.randn(B, T, C, dtype=torch.float64, requires_grad=True)
    inputs = (x, H, 1e-5, *params)
    assert torch.autograd.gradcheck(_GPT2BlockFunction.apply, inputs)


def test_fused_block_applies_only_where_nothing_else_is_asked():
    """Not when sampling with a cache, without gradients, under dropout in training, when a capture asks for the
    attention weights, for packed rows, nor for other architectures; the plain path's answer is the same."""
    torch.manual_seed(4)
    g = torch.Generator().manual_seed(5)
    idx = torch.randint(0, VOCAB, (2, 7), generator=g)
    model = randomize(GPT(gpt2_cfg(), VOCAB), seed=6).train()
    assert block_nodes(model, idx) == 2
    with torch.no_grad():
        assert block_nodes(model, idx) == 0
    with model.capture("blocks.1.attn.weights", "blocks.0.resid_out") as seen:
        assert block_nodes(model, idx) == 1  # block 0 is fused: nothing asked of its attention
    assert seen["blocks.1.attn.weights"].shape == (2, 2, 7, 7)
    documents = torch.tensor([[0, 0, 0, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0, 0]])
    seen = []
    hook = model.blocks[0].register_forward_hook(lambda m, i, out: seen.append(type(out.grad_fn).__name__))
    model(idx, documents=documents)
    hook.remove()
    assert seen == ["AddBackward0"]  # the plain path's residual sum
    dropped = randomize(GPT(gpt2_cfg(dropout=0.1), VOCAB), seed=6).train()
    assert block_nodes(dropped, idx) == 0 and block_nodes(dropped.eval(), idx) == 2
    for other in (dict(pos="rope"), dict(norm="rmsnorm"), dict(mlp="relu2"), dict(qk_norm=True)):
        assert block_nodes(GPT(gpt2_cfg(**other), VOCAB).train(), idx) == 0, other


def test_training_steps_match_the_unfused_model():
    """Several AdamW steps of the loop's own train_step with clipping: the weights stay with the plain modules'."""
    from contextlib import nullcontext

    from lmlab.train import train_step

    torch.manual_seed(7)
    model = randomize(GPT(gpt2_cfg(n_embd=16, n_head=4), VOCAB), seed=8).train()
    plain = unfused(model)
    cfg = OptimConfig(optimizer="adamw", lr=1e-2, weight_decay=0.1)
    opts = [build_optimizer(m, cfg) for m in (model, plain)]
    g = torch.Generator().manual_seed(9)
    for _ in range(5):
        batch = torch.randint(0, VOCAB, (4, 11), generator=g)
        results = [train_step(m, opt, [(batch[:, :-1], batch[:, 1:])], LossConfig(), 1.0, nullcontext())
                   for m, opt in zip((model, plain), opts)]
        assert results[0].loss == pytest.approx(results[1].loss, rel=1e-5)
    for p, q in zip(model.parameters(), plain.parameters()):
        torch.testing.assert_close(p, q, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("bias", [False, True])
def test_the_scripted_block_is_the_python_block_bit_for_bit(monkeypatch, bias):
    """The block's math runs as TorchScript (one GIL release per call, for threads.py's parts): its output and
    every gradient equal the same functions run as Python exactly, in float32."""
    from lmlab import fused

    assert all(isinstance(f, torch.jit.ScriptFunction) for f in fused._block_code())  # the fast path is the one taken
    torch.manual_seed(10)
    C, H = 128, 4  # big enough that an addmm split into a GEMM and a sum (the executor's optimisation) would show
    shapes = [(C,), (C,), (3 * C, C), (3 * C,), (C, C), (C,), (C,), (C,), (4 * C, C), (4 * C,), (C, 4 * C), (C,)]
    params = [(1.0 if i in (0, 6) else 0.0) + 0.3 * torch.randn(s) if bias or i % 2 == 0 else None
              for i, s in enumerate(shapes)]
    x = torch.randn(2, 32, C)
    results = []
    for scripted in (True, False):
        monkeypatch.setattr(fused, "SCRIPTED", scripted)
        for _ in range(3):  # TorchScript's executor profiles the first calls and would optimise the later ones
            inputs = [x.clone().requires_grad_()] + [p.clone().requires_grad_() if p is not None else None
                                                     for p in params]
            out = _GPT2BlockFunction.apply(inputs[0], H, 1e-5, *inputs[1:])
            out.pow(2).sum().backward()
        results.append([out.detach()] + [t.grad for t in inputs if t is not None])
    assert all(torch.equal(a, b) for a, b in zip(*results))
    assert len(results[0]) == 1 + 1 + (12 if bias else 6)


def test_the_block_runs_as_python_where_torchscript_refuses_it(monkeypatch):
    """A PyTorch whose TorchScript is gone or fails on the block: the same functions run as Python, same output."""
    from lmlab import fused

    def refuse(fn):
        raise RuntimeError("no TorchScript here")

    torch.manual_seed(11)
    C, H = 8, 2
    params = [torch.randn(s, dtype=torch.float64) for s in
              [(C,), (C,), (3 * C, C), (3 * C,), (C, C), (C,), (C,), (C,), (4 * C, C), (4 * C,), (C, 4 * C), (C,)]]
    x = torch.randn(2, 5, C, dtype=torch.float64)
    scripted = _GPT2BlockFunction.apply(x, H, 1e-5, *params)
    monkeypatch.setattr(torch.jit, "script", refuse)
    fused._script.cache_clear()
    try:
        assert fused._block_code() == (fused._block_forward, fused._block_backward)
        assert torch.equal(_GPT2BlockFunction.apply(x, H, 1e-5, *params), scripted)
    finally:
        fused._script.cache_clear()  # the next caller scripts again


class _Adapter(torch.nn.Linear):
    """A linear layer with something of its own added to its output (as a LoRA adapter or a probe would)."""

    def forward(self, x):
        return super().forward(x) + 1.0


@pytest.mark.parametrize("arch", ["gpt2", "relu2"])
def test_a_hand_written_function_leaves_hooked_or_adapted_layers_to_their_own_calls(arch):
    """The GPT-2 block and the ReLU² MLP read the linear layers' weights instead of calling them; a forward hook on
    one (or on every module), or a layer swapped for a subclass with its own forward, makes the step call it: the
    hook runs, the adapter's output counts, and with an inert hook the outputs and gradients are the plain path's."""
    cfg = gpt2_cfg() if arch == "gpt2" else gpt2_cfg(norm="rmsnorm", mlp="relu2", pos="rope", qk_norm=True)
    idx = torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(7))
    model = randomize(GPT(cfg, VOCAB), seed=8).train()
    fc = model.blocks[0].mlp.fc

    def run():
        model.zero_grad()
        out = model(idx)
        out.square().mean().backward()
        return out.detach(), fc.weight.grad.clone()

    fused_out, fused_grad = run()
    seen = []
    handle = fc.register_forward_hook(lambda m, args, out: seen.append(out.shape))
    hooked_out, hooked_grad = run()
    handle.remove()
    assert seen == [(2, 7, fc.out_features)] or seen == [(14, fc.out_features)]
    torch.testing.assert_close(hooked_out, fused_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(hooked_grad, fused_grad, atol=1e-5, rtol=1e-5)
    handle = torch.nn.modules.module.register_module_forward_hook(lambda m, args, out: seen.append(type(m).__name__))
    run()
    handle.remove()
    assert "Linear" in seen
    adapter = _Adapter(fc.in_features, fc.out_features, bias=fc.bias is not None)
    adapter.load_state_dict(fc.state_dict())
    model.blocks[0].mlp.fc = fc = adapter
    adapted_out, _ = run()
    assert not torch.allclose(adapted_out, fused_out, atol=1e-3)
