"""`lmlab bench`: the quick version runs and prints valid JSON (benchmarks are not tests: no timing is asserted),
the nanoGPT comparison alternates the two in one process, and its own run is parsed from a checkout's output."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap

import pytest

from helpers import HANG_S, run_cli, write_corpus


@pytest.mark.slow
def test_bench_quick_prints_json_on_stdout_and_writes_its_files(tmp_path):
    """--json: one JSON object on stdout and everything else on stderr (`lmlab bench --json > out.json` works);
    --out DIR: the same figures in DIR/bench.json, and as Markdown tables in DIR/bench.md."""
    corpus = write_corpus(tmp_path / "corpus.txt", n_lines=3000)
    folder = tmp_path / "figures"
    # --target-budget 3: the time-to-target run is timed (15 s with --quick alone); any budget gives a val loss
    proc = run_cli(["bench", "--quick", "--target-budget", "3", "--data", str(corpus), "--json", "--out",
                    str(folder)], cwd=tmp_path, timeout=HANG_S)
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads(proc.stdout)
    assert json.dumps(data, sort_keys=True) == json.dumps(json.loads((folder / "bench.json").read_text()),
                                                          sort_keys=True)
    assert data["quick"] is True
    assert data["peak_gflops"]["float32"] > 0 and data["peak_gflops"]["bfloat16"] > 0
    rows = data["throughput"]
    assert {r["dtype"] for r in rows} == {"float32", "bfloat16"}
    for r in rows:
        assert r["tokens_per_s"] > 0 and 0 < r["mfu_vs_float32"] < 1.5
        # tokens/s is tokens per step over the median step time
        assert math.isclose(r["tokens_per_s"], r["batch"] * r["block"] / (r["step_ms"] / 1000), rel_tol=1e-9)
    assert {(g["new_tokens"], g["kv_cache"]) for g in data["generation"]} == {(500, True), (500, False)}
    assert {(g["shape"], g["batch"]) for g in data["generation_batched"]} == {(s, b) for s in ("nanogpt-cpu", "tiny")
                                                                            for b in (1, 8)}
    assert {t["tokenizer"] for t in data["tokenizers"]} == {"char", "bpe"}
    assert data["memory"]["peak_rss_mb"] > 50
    assert math.isfinite(data["time_to_target"]["final_val_loss"])
    assert "hardware peak" in proc.stderr and "tok/s" in proc.stderr  # the table, on stderr beside the JSON
    text = (folder / "bench.md").read_text()
    assert "| training config |" in text and "| generation" in text


def test_bench_json_is_all_of_stdout_and_out_is_a_folder(tmp_path, capsys):
    """A section that takes seconds (peak): with --json, stdout is one JSON object, the figures that --out DIR also
    writes to DIR/bench.json, and the table goes to stderr; without it, the table is on stdout, as it was."""
    from lmlab.cli import main

    folder = tmp_path / "figures"
    assert main(["bench", "--quick", "--only", "peak", "--json", "--out", str(folder)]) == 0
    captured = capsys.readouterr()
    data = json.loads(captured.out)
    assert data == json.loads((folder / "bench.json").read_text())
    assert data["quick"] is True and data["peak_gflops"]["float32"] > 0
    assert "hardware peak" in captured.err and "hardware peak" in (folder / "bench.md").read_text()
    assert main(["bench", "--quick", "--only", "peak"]) == 0
    captured = capsys.readouterr()
    assert "hardware peak" in captured.out and "{" not in captured.out
    (tmp_path / "file").write_text("")
    assert main(["bench", "--out", str(tmp_path / "file")]) == 2  # refused before anything is measured
    assert capsys.readouterr().err.strip() == f"lmlab bench: error: --out {tmp_path / 'file'} is a file; give a folder"


def test_nanogpt_process_parses_a_checkout(tmp_path):
    """A stand-in checkout with nanoGPT's file layout and log format (not nanoGPT's code)."""
    from lmlab.bench.nanogpt import nanogpt_process

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
    result = nanogpt_process(str(root), str(corpus), iters=12)
    assert result["step_ms"] == 30.0  # the median after warm-up iterations
    assert result["tokens_per_s"] == 12 * 64 / 0.030
    assert result["final_val_loss_20_batches"] == 2.2
    assert result["peak_rss_mb"] > 0


def test_whole_runs_alternate_and_compare_per_round(monkeypatch):
    """Rounds alternate which tool goes first; the ratio is nanoGPT's ms/step over lmlab's, round by round."""
    from lmlab.bench import nanogpt

    order, times = [], {"lmlab": iter([40.0, 50.0, 45.0]), "nanogpt": iter([60.0, 55.0, 90.0])}

    def fake(name):
        def run(*args):
            order.append(name)
            return {"step_ms": next(times[name]), "peak_rss_mb": 1.0}
        return run

    monkeypatch.setattr(nanogpt, "lmlab_process", fake("lmlab"))
    monkeypatch.setattr(nanogpt, "nanogpt_process", fake("nanogpt"))
    r = nanogpt.whole_runs("ng", "data", rounds=3, iters=20)
    assert order == ["lmlab", "nanogpt", "nanogpt", "lmlab", "lmlab", "nanogpt"]
    assert r["ratios"] == [60 / 40, 55 / 50, 90 / 45]
    assert r["ratio_median"] == 1.5 and r["ratio_min"] == 1.1 and r["ratio_max"] == 2.0
    assert r["lmlab"]["step_ms"] == 45.0 and r["nanogpt"]["step_ms"] == 60.0
    assert r["lmlab"]["tokens_per_s"] == 12 * 64 / 0.045


@pytest.mark.slow
def test_lmlab_process_reads_its_own_step_times(tmp_path):
    """A real `lmlab train --preset nanogpt-char-cpu` run: its logged step times, from step 10 on."""
    from lmlab.bench.nanogpt import lmlab_process

    corpus = write_corpus(tmp_path / "corpus.txt", n_lines=300)
    r = lmlab_process(str(corpus), iters=14)
    assert r["iters"] == 14 and 0 < r["step_ms"] < 10_000 and r["peak_rss_mb"] > 0
    assert r["tokens_per_s"] == pytest.approx(12 * 64 / (r["step_ms"] / 1000))


# A stand-in for nanoGPT's model.py with its interface (GPT, GPTConfig, forward(idx, targets) -> (logits, loss),
# configure_optimizers, generate), built on lmlab's own model at the same shape: not nanoGPT's code.
STAND_IN = textwrap.dedent("""
    from dataclasses import dataclass
    import torch
    import torch.nn.functional as F
    from lmlab.model import ModelConfig, build_model

    @dataclass
    class GPTConfig:
        block_size: int = 64
        vocab_size: int = 65
        n_layer: int = 4
        n_head: int = 4
        n_embd: int = 128
        dropout: float = 0.0
        bias: bool = False

    class GPT(torch.nn.Module):
        def __init__(self, config):
            super().__init__()
            print("number of parameters: (printed, as nanoGPT does)")
            self.config = config
            self.inner = build_model(ModelConfig(block_size=config.block_size, n_layer=config.n_layer,
                                                 n_head=config.n_head, n_embd=config.n_embd + EXTRA, pos="learned",
                                                 norm="layernorm", mlp="gelu", qk_norm=False, tie_embeddings=True,
                                                 bias=False), config.vocab_size)

        def forward(self, idx, targets=None):
            logits = self.inner(idx)
            loss = None if targets is None else F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))
            return logits, loss

        def configure_optimizers(self, weight_decay, learning_rate, betas, device_type):
            return torch.optim.AdamW(self.parameters(), lr=learning_rate, betas=betas, weight_decay=weight_decay)

        @torch.no_grad()
        def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None):
            for _ in range(max_new_tokens):
                logits, _ = self(idx[:, -self.config.block_size:])
                idx = torch.cat((idx, logits[:, -1:].argmax(-1)), dim=1)
            return idx
    """)


@pytest.mark.slow
def test_nanogpt_comparison_alternates_in_one_process(tmp_path):
    import statistics

    import torch

    from lmlab.bench.nanogpt import alternated_generation, alternated_throughput

    (tmp_path / "model.py").write_text(STAND_IN.replace("EXTRA", "0"))
    r = alternated_throughput(str(tmp_path), torch.device("cpu"), False, peak_gflops=100.0, blocks=3, per_block=2)
    assert len(r["ratios"]) == 3 and r["ratio_min"] <= r["ratio_median"] <= r["ratio_max"]
    assert r["ratio_median"] == statistics.median(r["ratios"])
    for name in ("lmlab", "nanogpt"):
        assert r[name]["tokens_per_s"] == 12 * 64 / (r[name]["step_ms"] / 1000)
        assert 0 < r[name]["mfu_vs_float32"]
    g = alternated_generation(str(tmp_path), torch.device("cpu"), 20, blocks=3)
    assert len(g["ratios"]) == 3 and g["lmlab"]["tokens_per_s"] > 0 and g["nanogpt"]["tokens_per_s"] > 0


@pytest.mark.slow
@pytest.mark.parametrize("model_py, message", [
    (None, "no train.py there"),
    ("raise ImportError('broken checkout')\n", "cannot use its model.py"),
    (STAND_IN.replace("EXTRA", "4"), "not the architecture this comparison assumes"),  # wider: not nanoGPT's shape
], ids=["empty", "broken", "another-architecture"])
def test_a_bad_nanogpt_checkout_is_refused_before_anything_is_measured(tmp_path, model_py, message):
    if model_py is not None:
        (tmp_path / "model.py").write_text(model_py)
        (tmp_path / "train.py").write_text("raise SystemExit('never run')\n")
    proc = run_cli(["bench", "--only", "peak", "--nanogpt", str(tmp_path)], cwd=tmp_path)
    assert proc.returncode == 2 and message in proc.stderr.strip().splitlines()[-1], proc.stderr
    assert "peak:" not in proc.stderr  # refused before the hardware peak (or anything else) was measured


MALLOC = """
import ctypes, sys, torch
from lmlab.common import keep_freed_memory
class MallInfo2(ctypes.Structure):  # glibc's malloc statistics
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
                                               "uordblks", "fordblks", "keepcost")]
mallinfo2 = ctypes.CDLL(None).mallinfo2
mallinfo2.restype = MallInfo2
if sys.argv[1] == "keep" and not keep_freed_memory():
    sys.exit(3)
size = 24 << 20  # an activation of 24 MiB
before = mallinfo2().hblkhd
activation = torch.empty(size, dtype=torch.uint8)
mapped = mallinfo2().hblkhd - before >= size  # a mapping of its own, given back to the kernel when freed
del activation
kept = mallinfo2().fordblks >= size  # free memory the heap keeps for the next step
print(mapped, kept)
"""


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt is glibc's")
def test_keep_freed_memory_keeps_a_steps_activations_for_the_next():
    """With glibc's defaults a large tensor gets a mapping of its own that goes back to the kernel when it is freed
    (and the next step faults its pages in again); after keep_freed_memory() it comes from the heap, which keeps it.
    Each setting in a fresh process."""
    seen = {}
    for mode in ("default", "keep"):
        proc = subprocess.run([sys.executable, "-c", MALLOC, mode], capture_output=True, text=True, timeout=HANG_S)
        assert proc.returncode == 0, proc.stderr
        seen[mode] = proc.stdout.split()
    assert seen == {"default": ["True", "False"], "keep": ["False", "True"]}


@pytest.mark.slow
def test_step_bench_script_compares_each_speed_up(tmp_path):
    """scripts/step_bench.py runs both sides of each comparison (a few steps of the small nanoGPT shape) and prints
    the fault counts and ratios (what keep_freed_memory does is tested above)."""
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "scripts" / "step_bench.py"
    proc = subprocess.run([sys.executable, str(script), "--preset", "nanogpt-char-cpu", "--blocks", "2",
                           "--per-block", "1", "--steps", "2", "--only", "faults", "fused", "threads", "decode"],
                          capture_output=True, text=True, timeout=HANG_S)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    faults = {mode: float(line.split(":")[1].split()[0]) for line in out.splitlines()
              for mode in ("default", "keep") if line.startswith(f"page faults, malloc {mode}")}
    assert set(faults) == {"default", "keep"} and min(faults.values()) >= 0, out  # counts vary with huge pages
    assert "default / keep:" in out and "fused MLP: plain" in out and "plain / fused:" in out, out
    assert "block as TorchScript: Python" in out and "Python / TorchScript:" in out, out
    assert "AdamW cut among threads: one" in out and "one / cut:" in out, out
    for batch in (1, 64):
        assert f"decode step at batch {batch}: modules" in out, out
        assert f"blocks called directly at batch {batch}: module calls" in out, out
        assert f"decode forward at batch {batch}: module calls" in out, out
    assert out.count("modules / TorchScript:") == 2 and out.count("module calls / direct:") == 4, out


def test_chat_answer_timing_fills_three_quarters_of_the_context_and_renders_a_row():
    """The chat figure: a conversation rendered to 3/4 of the tiny preset's context, a fixed number of new tokens,
    positive times (their values are not asserted), a line in the table and a row in the Markdown."""
    import contextlib
    import io

    import torch

    from lmlab.bench.measure import chat_speed
    from lmlab.bench.tables import print_table, to_markdown

    r = chat_speed(torch.device("cpu"), new_tokens=4, repeats=1)
    assert r["preset"] == "tiny" and r["new_tokens"] == 4
    assert abs(r["prompt_tokens"] - 0.75 * r["block"]) <= 3
    assert r["first_token_ms"] > 0 and r["tokens_per_s"] > 0
    out = {"torch": torch.__version__, "device": "cpu", "threads": 1, "chat": r}
    md = to_markdown(out)
    assert "| chat answer, batch 1 (tiny" in md and f"| {r['prompt_tokens']} |" in md
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        print_table(out)
    assert "chat answer" in buf.getvalue() and "first token" in buf.getvalue()


def test_batched_generation_reports_speed_against_the_decode_floor():
    """generation_batched's rows (a tiny config: one shape, batches 1 and 2, 4 new tokens, one round) hold the keys
    the issue names, the floor's products are a decode step's, and the spans follow generate's window policy."""
    import torch

    from lmlab.bench.decode import batched_generation, batched_lines, decode_gemms, decode_spans
    from lmlab.budget import apply_budget
    from lmlab.config import get_preset
    from lmlab.model import build_model

    rows = batched_generation(torch.device("cpu"), (1, 2), 4, 1, shapes=("tiny",))
    assert [(r["shape"], r["batch"], r["new_tokens"], r["compiled"]) for r in rows] == [("tiny", 1, 4, False),
                                                                                      ("tiny", 2, 4, False)]
    for r in rows:
        assert r["tokens_per_s"] > 0 and r["floor_ms_per_step"] > 0
        assert math.isclose(r["floor_tokens_per_s"], r["batch"] / (r["floor_ms_per_step"] / 1000), rel_tol=1e-9)
    assert len(batched_lines(rows)) == 2
    assert decode_spans(1, 5, 8) == [2, 3, 4, 5]  # the prompt's encoding draws the first token
    assert decode_spans(3, 8, 4) == [4, 3, 4, 3, 4]  # windows of 5 tokens are cut to 2 and encoded again (3 draws)
    cfg, _ = apply_budget(get_preset("tiny"))
    model = build_model(cfg.model, 65)
    gemms = {g.name: g for g in decode_gemms(model, 8, 10)}
    assert gemms["attention QK^T"].key == (8 * cfg.model.n_head, 1, cfg.model.head_dim, 10, False, True)
    assert gemms["attention AV"].count == cfg.model.n_layer
    assert gemms["lm_head forward"].key == (0, 8, cfg.model.n_embd, 65, False, True)
    assert not any("grad" in name for name in gemms)


def test_matmul_peak_is_the_best_timing_after_warm_up(monkeypatch):
    """A clock under the test's control: the warm-up runs until warm_s has passed, and the peak is 2n^3 over the
    shortest of the timed repeats, not their median."""
    from types import SimpleNamespace

    import torch

    from lmlab.bench import measure

    ticks = iter([0.0, 0.1, 0.3,  # warm-up: start, one matmul (0.1 < 0.2), a second (0.3 >= 0.2): done
                  1.0, 1.5, 2.0, 2.1, 3.0, 3.4])  # three repeats of 0.5, 0.1 and 0.4 s
    monkeypatch.setattr(measure, "time", SimpleNamespace(perf_counter=lambda: next(ticks)))
    calls = []
    monkeypatch.setattr(measure, "sync", lambda device: calls.append(device))
    gflops = measure.matmul_peak(torch.float32, torch.device("cpu"), n=8, reps=3, warm_s=0.2)
    assert gflops == pytest.approx(2 * 8**3 / 0.1 / 1e9) and len(calls) == 5
    assert next(ticks, None) is None  # every tick spent: two warm-up matmuls, three timed
