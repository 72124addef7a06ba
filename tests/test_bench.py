"""`lmlab bench`: the quick version runs and writes valid JSON (benchmarks are not tests: no timing is asserted),
and the nanoGPT side-by-side path parses a checkout's output."""

from __future__ import annotations

import json
import math
import textwrap

from helpers import run_cli, write_corpus


def test_bench_quick_runs_and_writes_valid_json(tmp_path):
    corpus = write_corpus(tmp_path / "corpus.txt", n_lines=3000)
    out, md = tmp_path / "bench.json", tmp_path / "bench.md"
    proc = run_cli(["bench", "--quick", "--data", str(corpus), "--json", str(out), "--markdown", str(md)],
                   cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads(out.read_text())
    assert data["quick"] is True
    assert data["peak_gflops"]["float32"] > 0 and data["peak_gflops"]["bfloat16"] > 0
    rows = data["throughput"]
    assert {r["dtype"] for r in rows} == {"float32", "bfloat16"}
    for r in rows:
        assert r["tokens_per_s"] > 0 and 0 < r["mfu_vs_float32"] < 1.5
        # tokens/s is tokens per step over the median step time
        assert math.isclose(r["tokens_per_s"], r["batch"] * r["block"] / (r["step_ms"] / 1000), rel_tol=1e-9)
    assert {(g["new_tokens"], g["kv_cache"]) for g in data["generation"]} == {(500, True), (500, False)}
    assert {t["tokenizer"] for t in data["tokenizers"]} == {"char", "bpe"}
    assert data["memory"]["peak_rss_mb"] > 50
    assert math.isfinite(data["time_to_target"]["final_val_loss"])
    assert "hardware peak" in proc.stdout and "tok/s" in proc.stdout
    text = md.read_text()
    assert "| training config |" in text and "| generation" in text


def test_nanogpt_side_by_side_parses_a_checkout(tmp_path):
    """A stand-in checkout with nanoGPT's file layout and log format (not nanoGPT's code)."""
    from lmlab.bench import nanogpt_side_by_side

    root = tmp_path / "fake-nanogpt"
    (root / "config").mkdir(parents=True)
    (root / "config" / "train_shakespeare_char.py").write_text("dataset = 'shakespeare_char'\n")
    (root / "configurator.py").write_text("")
    (root / "train.py").write_text(textwrap.dedent("""
        import os, pickle, sys
        meta = pickle.load(open(os.path.join('data', 'shakespeare_char', 'meta.pkl'), 'rb'))
        assert meta['vocab_size'] == len(meta['itos']) > 10
        assert os.path.getsize(os.path.join('data', 'shakespeare_char', 'train.bin')) > 0
        for i in range(12):
            print(f"iter {i}: loss 2.5000, time {40 if i < 5 else 30}.00ms, mfu 50.00%")
        print("step 12: train loss 2.1000, val loss 2.2000")
        """))
    (root / "sample.py").write_text("print('ROMEO: hello')\n")
    corpus = write_corpus(tmp_path / "corpus.txt", n_lines=300)
    result = nanogpt_side_by_side(str(root), str(corpus), iters=12)
    assert result["step_ms"] == 30.0  # the median after warm-up iterations
    assert result["tokens_per_s"] == 12 * 64 / 0.030
    assert result["final_val_loss_20_batches"] == 2.2
    assert result["peak_rss_mb"] > 0
    assert set(result["generation"]) == {500, 2000}
