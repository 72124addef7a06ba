"""`lmlab next`, `lmlab surprisal` and `lmlab landscape` against trusted references: the softmax of the model's
logits, `lmlab eval` on the same text, and the model's own loss at the trained weights."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from helpers import run_cli, tiny_config, write_corpus
from lmlab.run import load_run
from lmlab.cli import main
from lmlab.data import encode_text
from lmlab.predict import next_token_distribution, surprisal
from lmlab.report.landscape import filter_normalized_direction, fixed_tokens, scan
from lmlab.model import unique_parameters
from lmlab.train import train


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("inspect")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LMLAB_CACHE", str(root / "cache"))
        corpus = write_corpus(root / "corpus.txt", n_lines=300)
        train(tiny_config(corpus, root / "run", max_steps=30, eval_interval=10, telemetry_interval=5,
                          model_n_layer=2, model_n_embd=32, model_block_size=24))
    return root / "run"


def test_next_token_probabilities_are_the_softmax_of_the_logits(run_dir):
    run = load_run(run_dir)
    prompt = "the cat sees"
    rows = next_token_distribution(run.model, run.tokenizer, prompt, top=run.tokenizer.vocab_size)
    ids = run.tokenizer.encode(prompt)
    with torch.no_grad():
        logits = run.model(torch.tensor([ids]))
    ref = logits[0, -1].softmax(-1)
    assert len(rows) == run.tokenizer.vocab_size
    assert math.isclose(sum(r.probability for r in rows), 1.0, rel_tol=1e-6)
    for r in rows:
        assert r.probability == pytest.approx(float(ref[r.token_id]), rel=1e-6, abs=1e-9)
        assert r.logit == pytest.approx(float(logits[0, -1, r.token_id]), rel=1e-6)
    probs = [r.probability for r in rows]
    assert probs == sorted(probs, reverse=True)
    assert rows[-1].cumulative == pytest.approx(1.0, rel=1e-6)


def test_next_token_marks_what_sampling_keeps(run_dir):
    run = load_run(run_dir)
    rows = next_token_distribution(run.model, run.tokenizer, "a dog", top=10, temperature=0.7, top_k=3)
    assert [r.kept for r in rows] == [True] * 3 + [False] * 7
    kept = [r for r in rows if r.kept]
    assert sum(r.renormalized for r in kept) == pytest.approx(1.0, rel=1e-6)
    # renormalised = softmax(logit / T) over the kept tokens: a hand computation
    z = [math.exp(r.logit / 0.7) for r in kept]
    for r, zi in zip(kept, z):
        assert r.renormalized == pytest.approx(zi / sum(z), rel=1e-5)
    greedy = next_token_distribution(run.model, run.tokenizer, "a dog", top=5, temperature=0)
    assert [r.kept for r in greedy] == [True, False, False, False, False]


@pytest.mark.slow
@pytest.mark.parametrize("stride", [12, 24])  # block 24: sliding windows, and non-overlapping ones
def test_surprisal_totals_equal_eval(run_dir, tmp_path, stride):
    text = "the old man watches the river.\nA small bird finds a letter near the house.\n" * 3
    path = tmp_path / "probe.txt"
    path.write_text(text)
    run = load_run(run_dir)
    tokens, metrics, first = surprisal(run.model, run.tokenizer, text, stride=stride)
    assert len(tokens) == len(run.tokenizer.encode(text)) - 1
    assert first + "".join(t.text for t in tokens) == text
    total = sum(t.nats for t in tokens)
    proc = run_cli(["eval", str(run_dir), "--data", str(path), "--json", "--stride", str(stride)], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    ev = json.loads(proc.stdout)
    assert ev["tokens"] == len(tokens) and ev["stride"] == stride
    assert total / len(tokens) == pytest.approx(ev["loss"], rel=1e-9, abs=1e-9)
    assert metrics.bits_per_byte == pytest.approx(ev["bits_per_byte"], rel=1e-9)
    assert metrics.accuracy == pytest.approx(ev["accuracy"], rel=1e-12)
    # each token's surprisal is -log p(token) from a forward pass over its window (block 24)
    ids = encode_text(run.tokenizer, text)
    with torch.no_grad():
        logits = run.model(torch.from_numpy(ids[None, :24]))
    logp = logits[0].log_softmax(-1)
    for j in range(23):
        assert tokens[j].nats == pytest.approx(-float(logp[j, ids[j + 1]]), rel=1e-5, abs=1e-6)
        assert tokens[j].bits == pytest.approx(tokens[j].nats / math.log(2))


@pytest.mark.slow
def test_surprisal_cli_html_and_json(run_dir, tmp_path):
    html_path = tmp_path / "heat.html"
    code = main(["surprisal", str(run_dir), "--text", "the cat likes the ball.", "--out", str(html_path)])
    assert code == 0
    page = html_path.read_text()
    assert page.count('class="t"') == len("the cat likes the ball.") - 1  # one span per predicted char
    assert "nats" in page and "title=" in page
    proc = run_cli(["surprisal", str(run_dir), "--text", "the cat", "--json"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert len(data["per_token"]) == len("the cat") - 1
    assert all(len(t["top"]) == 5 for t in data["per_token"])
    proc = run_cli(["surprisal", str(run_dir)], cwd=tmp_path)
    assert proc.returncode == 2 and "error" in proc.stderr and "Traceback" not in proc.stderr


def test_landscape_at_offset_zero_is_the_models_loss(run_dir):
    run = load_run(run_dir)
    from lmlab.data import load_splits

    val = load_splits(run.config.data, tokenizer=run.tokenizer).val
    tokens = fixed_tokens(val, run.model.cfg.block_size, 4)
    assert len(tokens) == 4 * 24 + 1
    # the reference: the first 4 windows of 24 tokens in one forward, -log softmax at each next token, averaged
    ids = torch.from_numpy(tokens.astype("int64"))
    x, y = ids[:-1].view(4, 24), ids[1:].view(4, 24)
    with torch.no_grad():
        logp = run.model(x).double().log_softmax(-1)
    reference = float(-logp.gather(-1, y[..., None]).mean())
    params = dict(unique_parameters(run.model))
    before = {k: v.detach().clone() for k, v in params.items()}
    d = filter_normalized_direction(params, torch.Generator().manual_seed(0))
    land = scan(run.model, tokens, [d], points=5, span=0.5)
    assert land.coords[2] == 0.0
    assert land.losses[2] == pytest.approx(reference, rel=1e-6)
    assert land.center_loss == pytest.approx(reference, rel=1e-6)
    assert land.losses[0] != pytest.approx(reference, rel=1e-3)  # moving away changes the loss
    for k, v in params.items():  # the scan leaves the weights as they were
        assert torch.equal(v, before[k])
    # filter normalisation: each row of a direction has the norm of that row of the weights
    w = params["blocks.0.mlp.fc.weight"]
    torch.testing.assert_close(d["blocks.0.mlp.fc.weight"].norm(dim=1), w.detach().norm(dim=1), rtol=1e-4, atol=1e-6)
    assert torch.count_nonzero(d["blocks.0.norm1.weight"]) == 0


def test_landscape_cli_2d_with_trajectory(run_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("LMLAB_CACHE", str(run_dir.parent / "cache"))  # the user who trained it, reading its corpus
    out = tmp_path / "land"
    code = main(["landscape", str(run_dir), "--2d", "--points", "5", "--out", str(out)])
    assert code == 0
    data = json.loads((out / "landscape.json").read_text())
    for name in ("landscape_1d.png", "landscape_2d.png", "trajectory.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert np.array(data["two_d"]["losses"]).shape == (5, 5)
    assert data["two_d"]["losses"][2][2] == pytest.approx(data["one_d"]["center_loss"], rel=1e-6)
    steps = data["trajectory"]["steps"]
    assert steps[0] == 0 and steps[-1] == 30  # from the initial weights to the end of training
    assert data["trajectory"]["coords"][-1] == pytest.approx([0.0, 0.0], abs=1e-6)  # the final snapshot is the centre


def test_training_records_probes_and_gradient_telemetry(run_dir):
    probes = [json.loads(line) for line in (run_dir / "probes.jsonl").read_text().splitlines()]
    assert [p["step"] for p in probes] == [0, 10, 20, 30]
    for p in probes:
        assert len(p["probes"]) >= 1
        for item in p["probes"]:
            assert len(item["top"]) == 5
            probs = [q for _, q in item["top"]]
            assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1.0 + 1e-6
    tele = [json.loads(line) for line in (run_dir / "telemetry.jsonl").read_text().splitlines()]
    assert [t["step"] for t in tele] == [5, 10, 15, 20, 25, 30]
    assert set(tele[0]["grad_norm"]) == {"embed", "block.0", "block.1", "head"}
    assert all(v > 0 for t in tele for v in t["update_ratio"].values())
