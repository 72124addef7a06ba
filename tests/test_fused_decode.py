"""fused_decode: a block's decode step as one TorchScript call (eager CPU inference). The oracle is the model's own
modules (the same forward with fused_decode.decode_fits saying no): the logits and the cache's contents must be the
same bit for bit, for every model option, every way a decode step reads the cache, and as TorchScript or Python."""

from __future__ import annotations

import itertools

import pytest
import torch

from lmlab import fused, fused_decode, kvcache
from lmlab.model import GPT
from test_model import VOCAB, make_cfg, randomize

OPTIONS = [
    dict(norm=norm, mlp=mlp, bias=bias, qk_norm=qk, pos=pos)
    for norm, mlp, bias, qk, pos in itertools.product(("rmsnorm", "layernorm"), ("gelu", "gelu_tanh", "relu2", "swiglu"),
                                                       (False, True), (False, True), ("rope", "learned"))
    if (norm, bias) != ("rmsnorm", True) or mlp == "relu2"  # RMSNorm has no bias: one MLP is enough there
] + [dict(value_embed=True, unet_skips=True, logit_softcap=15.0, tie_embeddings=True)]


def model_of(dtype=torch.float32, seed=0, **kw):
    torch.manual_seed(seed)
    return randomize(GPT(make_cfg(n_layer=3, **kw), VOCAB).to(dtype), std=0.3, seed=seed).eval()


def decode(model, prompt: torch.Tensor, steps: int, *, per_row: bool = False, whole: bool = False):
    """The prompt's encoding, then `steps` decode steps (the next token: the row's argmax): every step's logits and
    the cache's buffers. per_row: each step at a position tensor per row (KVCache.step's static steps); whole: the
    steps read the whole cache, its unfilled slots masked (KVCache.unfilled)."""
    B, T = prompt.shape
    with torch.no_grad(), pytest.MonkeyPatch.context() as mp:
        mp.setattr(kvcache, "WHOLE_CACHE_HEADS", 1 if whole else 1 << 30)
        mp.setattr(kvcache, "GROW_SLOTS", 3)
        cache = model.make_cache(B, grow=not per_row)
        out = [model(prompt, cache=cache)[:, -1]]
        pos = torch.full((B,), T) if per_row else None
        for _ in range(steps):
            token = out[-1].argmax(-1, keepdim=True)  # (B, 1)
            out.append(model(token, cache=cache, pos=pos)[:, -1])
            if per_row:
                pos = pos + 1
        return torch.stack(out, 1), [t.clone() for t in cache.k + cache.v]


def count_steps(monkeypatch) -> list:
    """A list that gets an entry for every fused decode step of a block: `run`, which GPT.forward calls for the
    blocks it takes itself and Block.forward's `block` calls too."""
    calls = []
    real = fused_decode.run
    monkeypatch.setattr(fused_decode, "run", lambda *a: calls.append(1) or real(*a))
    return calls


def fused_and_plain(monkeypatch, model, prompt_len=4, **kw):
    """decode() with the fused steps (checking they ran) and with the model's modules."""
    calls = count_steps(monkeypatch)
    prompt = torch.randint(0, VOCAB, (3, prompt_len), generator=torch.Generator().manual_seed(1))
    fast = decode(model, prompt, 6, **kw)
    # every decode step of every block, and the prompt's encoding only when it is one token
    assert len(calls) == (6 + (prompt_len == 1)) * model.cfg.n_layer
    monkeypatch.setattr(fused_decode, "decode_fits", lambda x, weight: False)
    plain = decode(model, prompt, 6, **kw)
    monkeypatch.undo()
    return fast, plain


def one_step(model) -> torch.Tensor:
    """A two-token prompt of two rows, then one decode step: its logits."""
    with torch.no_grad():
        cache = model.make_cache(2)
        model(torch.tensor([[1, 2], [3, 4]]), cache=cache)
        return model(torch.tensor([[5], [6]]), cache=cache)


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_a_fused_decode_step_is_the_models_bit_for_bit(monkeypatch, options):
    (logits, cache), (ref_logits, ref_cache) = fused_and_plain(monkeypatch, model_of(**options))
    assert torch.equal(logits, ref_logits)
    assert all(torch.equal(a, b) for a, b in zip(cache, ref_cache))


@pytest.mark.parametrize("read", ["slice", "first", "whole", "per_row"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_every_way_a_step_reads_the_cache_is_the_models(monkeypatch, read, dtype):
    """The slots filled so far (and a one-token prompt's, a causal window), the whole buffers with an additive
    mask, each row at its own slot with a boolean mask (generate_batch's rows of different lengths)."""
    model = model_of(dtype, seed=3)
    n = 1 if read == "first" else 4
    (logits, cache), (ref_logits, ref_cache) = fused_and_plain(monkeypatch, model, n, whole=read == "whole",
                                                               per_row=read == "per_row")
    assert torch.equal(logits, ref_logits)
    assert all(torch.equal(a, b) for a, b in zip(cache, ref_cache))
    with torch.no_grad():  # and both are the uncached forward's, to rounding
        prompt = torch.randint(0, VOCAB, (3, n), generator=torch.Generator().manual_seed(1))
        idx = torch.cat([prompt, logits[:, :-1].argmax(-1)], 1)
        torch.testing.assert_close(model(idx)[:, n - 1 :], logits, atol=1e-5, rtol=1e-5)


def test_the_scripted_step_is_the_python_step_and_calls_nothing(monkeypatch):
    """TorchScript runs the step (its helpers inlined: no calls between functions, each costing microseconds), and
    gives what the same functions give run as Python."""
    script = fused.scripted(fused_decode._block)
    assert isinstance(script, torch.jit.ScriptFunction) and "prim::CallFunction" not in str(script.graph)
    model = model_of(seed=4)
    prompt = torch.randint(0, VOCAB, (3, 4), generator=torch.Generator().manual_seed(2))
    scripted = decode(model, prompt, 5)
    monkeypatch.setattr(fused, "SCRIPTED", False)
    python = decode(model, prompt, 5)
    assert torch.equal(scripted[0], python[0]) and all(torch.equal(a, b) for a, b in zip(scripted[1], python[1]))


def test_the_step_is_fused_only_for_eager_cpu_inference(monkeypatch):
    """Gradients on, training mode, a capture, or a forward being compiled take the modules; a replaced weight (not
    only changed in place) is the one the next fused step uses."""
    calls = count_steps(monkeypatch)
    model = model_of(seed=5)
    cache = model.make_cache(2)
    model(torch.tensor([[1, 2], [3, 4]]), cache=cache)  # gradients on: no
    model(torch.tensor([[5], [6]]), cache=cache)
    with torch.no_grad():
        model.train()
        model(torch.tensor([[7], [8]]), cache=cache)
        model.eval()
        with model.capture("logits"):
            model(torch.tensor([[9], [10]]), cache=cache)
        with monkeypatch.context() as mp:  # as inside torch.compile's tracing
            mp.setattr(torch.compiler, "is_compiling", lambda: True)
            model(torch.tensor([[3], [4]]), cache=cache)
        assert calls == []
        model(torch.tensor([[11], [12]]), cache=cache)
        assert len(calls) == model.cfg.n_layer
        before = cache.pos
        first = model(torch.tensor([[1], [2]]), cache=cache)
        old = model.blocks[1].mlp.fc.weight
        model.blocks[1].mlp.fc.weight = torch.nn.Parameter(old * 2)
        cache.pos = before
        replaced = model(torch.tensor([[1], [2]]), cache=cache)
        monkeypatch.setattr(fused_decode, "decode_fits", lambda x, weight: False)
        cache.pos = before
        assert torch.equal(replaced, model(torch.tensor([[1], [2]]), cache=cache))
        assert not torch.equal(first, replaced)


def test_the_model_takes_the_blocks_itself_only_when_no_module_call_is_missed(monkeypatch):
    """GPT.forward calls fused_decode.block for each block of a decode step without calling the block modules
    (fused_decode.direct); a forward hook on a block or on every module, or a block in training mode, sends the step
    through the modules' calls, and the hooks run: the logits are the same either way. A block swapped for another
    module, or given its own forward, runs as itself."""
    model = model_of(seed=6)
    direct = []
    real = fused_decode.direct

    def recorded(*args):
        out = real(*args)
        direct.append(out is not None)  # whether the model took the blocks itself
        return out

    monkeypatch.setattr(fused_decode, "direct", recorded)
    seen = []

    def step():
        return one_step(model)

    plain = step()
    assert direct == [True]
    handle = model.blocks[1].register_forward_hook(lambda module, args, out: seen.append(tuple(out.shape)))
    # the hook saw the prompt's output and the step's
    assert torch.equal(step(), plain) and direct[-1] is False and seen == [(2, 2, 16), (2, 1, 16)]
    handle.remove()
    handle = torch.nn.modules.module.register_module_forward_pre_hook(lambda module, args: seen.append("pre"))
    assert torch.equal(step(), plain) and direct[-1] is False and "pre" in seen
    handle.remove()
    model.blocks[2].train()
    assert torch.equal(step(), plain) and direct[-1] is False
    model.blocks[2].eval()
    assert torch.equal(step(), plain) and direct[-1] is True
    # a block swapped for another module, or given a forward of its own, runs as itself
    original = model.blocks[1]

    class Doubled(type(original)):
        def forward(self, x, *args):
            return 2 * super().forward(x, *args)

    doubled = Doubled(original.attn.cfg)
    doubled.load_state_dict(original.state_dict())
    model.blocks[1] = doubled.eval()
    swapped = step()
    assert direct[-1] is False and not torch.equal(swapped, plain)
    model.blocks[1] = original
    original.forward = lambda x, *args: 2 * type(original).forward(original, x, *args)
    assert torch.equal(step(), swapped) and direct[-1] is False
    del original.forward
    assert torch.equal(step(), plain) and direct[-1] is True


def test_a_hooked_or_adapted_layer_inside_a_block_is_called_by_the_decode_step():
    """The fused step reads the block's weights instead of calling its layers; a forward hook on one of them, or a
    layer swapped for a subclass with a forward of its own, sends the step through the modules: the hook runs on the
    decode step and the logits are the plain step's; the adapter's output counts."""
    model = model_of(seed=7)

    def step():
        return one_step(model)

    plain = step()
    qkv = model.blocks[0].attn.qkv
    seen = []
    handle = qkv.register_forward_hook(lambda module, args, out: seen.append(tuple(out.shape)))
    hooked = step()
    handle.remove()
    assert seen == [(2, 2, 48), (2, 1, 48)] and torch.equal(hooked, plain)

    class Adapter(torch.nn.Linear):
        def forward(self, x):
            return super().forward(x) + 1.0

    proj = model.blocks[1].attn.proj
    adapter = Adapter(proj.in_features, proj.out_features, bias=proj.bias is not None)
    adapter.load_state_dict(proj.state_dict())
    model.blocks[1].attn.proj = adapter
    adapted = step()
    with torch.no_grad(), pytest.MonkeyPatch.context() as mp:  # the modules' own path, the oracle
        mp.setattr(fused_decode, "decode_fits", lambda x, weight: False)
        assert torch.equal(step(), adapted) and not torch.equal(adapted, plain)


@pytest.mark.parametrize("read", ["slice", "whole", "per_row"])
def test_a_caches_steps_at_once_are_each_layers_step(monkeypatch, read):
    """KVCache.steps (what GPT.forward hands the blocks it takes itself) is KVCache.step of every layer: the same
    buffers (the same memory, shapes and strides), slots, rows, mode and mask."""
    monkeypatch.setattr(kvcache, "WHOLE_CACHE_HEADS", 1 if read == "whole" else 1 << 30)
    monkeypatch.setattr(kvcache, "GROW_SLOTS", 3)
    model = model_of(seed=8)
    cache = model.make_cache(3, grow=read != "per_row")
    with torch.no_grad():
        model(torch.randint(0, VOCAB, (3, 4), generator=torch.Generator().manual_seed(3)), cache=cache)
    pos = torch.tensor([4, 2, 3]) if read == "per_row" else None
    together = cache.steps(pos, 3 * model.cfg.n_head)
    assert len(together) == model.cfg.n_layer
    for layer, handed in enumerate(together):
        alone = cache.step(layer, pos, 3 * model.cfg.n_head)
        assert len(handed) == len(alone) and handed[5] == alone[5] and handed[2] == alone[2]
        for i, (a, b) in enumerate(zip(handed, alone)):
            if isinstance(a, torch.Tensor):
                assert torch.equal(a, b) and a.stride() == b.stride()
                assert i > 1 or a.data_ptr() == b.data_ptr()  # the layer's own buffers, written in place
            else:
                assert a == b
