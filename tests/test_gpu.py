"""On a CUDA GPU: the same numbers as on the CPU (training step, generation, evaluation) and an end-to-end run.
Skipped where there is no GPU; scripts/gpu_check.sh runs them on one."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from helpers import HANG_S, run_cli, write_corpus
from lmlab.evaluate import evaluate
from lmlab.loss import cross_entropy
from lmlab.model import ModelConfig, build_model
from lmlab.sample import generate

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU here")
VOCAB = 50


@pytest.fixture(autouse=True)
def exact_fp32():
    """fp32 matmuls without TF32, so CPU and GPU may be compared to float rounding."""
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = before


def _pair(**kw):
    torch.manual_seed(0)
    cfg = ModelConfig(block_size=32, n_layer=2, n_head=2, n_embd=64, zero_init_proj=False, **kw)
    cpu = build_model(cfg, VOCAB)
    gpu = build_model(cfg, VOCAB).cuda()
    gpu.load_state_dict(cpu.state_dict())
    return cpu, gpu


@pytest.mark.parametrize("kw", [{}, {"pos": "learned", "norm": "layernorm", "mlp": "gelu", "qk_norm": False}])
def test_a_training_step_on_the_gpu_matches_the_cpu(kw):
    cpu, gpu = _pair(**kw)
    x = torch.randint(0, VOCAB, (4, 32), generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, VOCAB, (4, 32), generator=torch.Generator().manual_seed(2))
    losses = []
    for model, device in ((cpu, "cpu"), (gpu, "cuda")):
        loss = cross_entropy(model(x.to(device)), y.to(device))
        loss.backward()
        losses.append(float(loss))
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)
    for (name, p), q in zip(cpu.named_parameters(), gpu.parameters()):
        assert torch.allclose(p.grad, q.grad.cpu(), rtol=1e-3, atol=1e-5), name


def test_bf16_autocast_stays_close_to_fp32():
    _, gpu = _pair()
    x = torch.randint(0, VOCAB, (4, 32), device="cuda")
    with torch.no_grad():
        full = cross_entropy(gpu(x[:, :-1]), x[:, 1:])
        with torch.autocast("cuda", dtype=torch.bfloat16):
            half = cross_entropy(gpu(x[:, :-1]), x[:, 1:])
    assert torch.isfinite(half) and float(half) == pytest.approx(float(full), rel=2e-2)


def test_cached_generation_on_the_gpu_equals_the_uncached_path():
    _, gpu = _pair()
    gpu.eval()
    prompt = [1, 2, 3]
    cached = list(generate(gpu, prompt, 80, 0.0, 0, 1.0, torch.Generator().manual_seed(0), use_cache=True))
    uncached = list(generate(gpu, prompt, 80, 0.0, 0, 1.0, torch.Generator().manual_seed(0), use_cache=False))
    assert cached == uncached and len(cached) == 80  # crosses the window cut at 32


def test_evaluation_on_the_gpu_matches_the_cpu():
    cpu, gpu = _pair()
    tokens = np.random.default_rng(3).integers(0, VOCAB, 500).astype(np.uint16)
    token_bytes = torch.ones(VOCAB, dtype=torch.long)
    for stride in (0, 8):
        a = evaluate(cpu, tokens, token_bytes, 32, stride=stride)
        b = evaluate(gpu, tokens, token_bytes, 32, stride=stride)
        assert a.tokens == b.tokens and b.loss == pytest.approx(a.loss, rel=1e-5)


def test_train_on_the_gpu_then_evaluate_on_the_cpu(tmp_path):
    write_corpus(tmp_path / "corpus.txt", 300)
    args = ["--data", "corpus.txt", "--n-layer", "2", "--n-head", "2", "--n-embd", "64", "--block-size", "64",
            "--max-steps", "30", "--max-time", "0", "--eval-interval", "30", "--sample-tokens", "20",
            "--no-progress", "--no-tensorboard", "--trajectory-snapshots", "0"]
    proc = run_cli(["train", *args, "--device", "cuda", "--out", "run"], cwd=tmp_path, cache=tmp_path / "cache",
                   timeout=HANG_S)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "device cuda" in proc.stderr and "autocast bfloat16" in proc.stderr
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in logged if "val_loss" in r][-1]
    ev = run_cli(["eval", "run", "--device", "cpu", "--stride", "64", "--json"], cwd=tmp_path,
                 cache=tmp_path / "cache")
    assert ev.returncode == 0, ev.stderr
    # bf16 autocast on the GPU against fp32 on the CPU: close, not equal
    assert json.loads(ev.stdout)["loss"] == pytest.approx(last["val_loss"], rel=2e-2)
