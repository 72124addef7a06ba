"""`lmlab experiment truth`: answers drawn by the text's frequencies, the split, the KL against a direct computation,
the claims and conclusion from a hand-made result, and --quick end to end with result.json's exact shape."""

from __future__ import annotations

import copy
import html
import json

import pytest
import torch
from helpers import write_corpus

from lmlab.experiments.base import ExperimentConfig
from lmlab.experiments.patterns import RATIOS, make_facts
from lmlab.experiments.truth import TREATMENTS, mean_kl, sampled_answers, split_facts


def test_answers_are_drawn_by_the_texts_frequencies():
    facts = make_facts(seed=0, per_group=2)
    draws = sampled_answers(facts, 3000, seed=5)
    for f in facts:
        answers = [a for g, a in draws if g is f]
        assert len(answers) == 3000 and set(answers) <= {f.true, f.false}
        share = answers.count(f.false) / len(answers)
        if f.ratio == 0:
            assert share == 0  # a control is only ever true
        else:
            assert share == pytest.approx(f.ratio / (f.ratio + 1), abs=0.03), (f.ratio, share)
    assert sampled_answers(facts, 50, seed=5) == sampled_answers(facts, 50, seed=5)
    assert sampled_answers(facts, 50, seed=5) != sampled_answers(facts, 50, seed=6)


def test_the_statements_are_split_once_into_halves_of_every_group():
    facts = make_facts(seed=3, per_group=8)
    halves = split_facts(facts)
    trained, held = halves["trained"], halves["held_out"]
    assert not {f.prompt for f in trained} & {f.prompt for f in held}
    assert sorted(f.prompt for f in trained + held) == sorted(f.prompt for f in facts)
    for ratio in (*RATIOS, 0):
        assert sum(f.ratio == ratio for f in trained) == 4 == sum(f.ratio == ratio for f in held)


def test_mean_kl_against_a_direct_computation():
    from lmlab.model import ModelConfig, build_model

    cfg = ModelConfig(block_size=8, n_layer=1, n_head=2, n_embd=16, zero_init_proj=False)
    torch.manual_seed(0)
    p, q = build_model(cfg, 11).eval(), build_model(cfg, 11).eval()
    ids = torch.randint(0, 11, (20,)).tolist()
    assert mean_kl(p, p, ids, 8) == pytest.approx(0.0, abs=1e-12)
    total, count = 0.0, 0
    for start in (0, 8, 16):  # windows of 8, the last one shorter
        x = torch.tensor([ids[start:start + 8]])
        with torch.no_grad():
            lp, lq = p(x).double().log_softmax(-1)[0], q(x).double().log_softmax(-1)[0]
        for t in range(x.shape[1]):
            total += sum(float(lp[t, v].exp() * (lp[t, v] - lq[t, v])) for v in range(11))
            count += 1
    assert count == 20 and mean_kl(p, q, ids, 8) == pytest.approx(total / count, rel=1e-9) and total > 0


def test_the_kl_text_is_the_ordinary_text_after_the_corpus():
    from lmlab import tokenizer as tok
    from lmlab.experiments.patterns import patterns_corpus
    from lmlab.experiments.truth import held_out_text

    facts = make_facts(seed=0, per_group=1)
    ordinary = "\n".join(f"line {i} of the text" for i in range(400)) + "\nnever seen: \u00e9\nthe line is 1\n"
    corpus, statements = patterns_corpus(facts, ordinary, seed=0)
    used = corpus.count("\n") - statements.count("\n")
    tokenizer = tok.CharTokenizer(corpus + "1")
    text = held_out_text(ordinary, used, tokenizer, 10_000).splitlines()
    assert text[0] == f"line {used} of the text" and f"line {used - 1} of the text" in corpus.splitlines()
    assert not set(text) & set(corpus.splitlines()) and text[-1] == "the line is 1"  # the line with \u00e9 left out
    assert held_out_text(ordinary, 10_000, tokenizer, 10_000).splitlines()[-1] == "the line is 1"  # nothing follows


def hand_result(rl_true: float = 0.95, sft_true: float = 0.1) -> dict:
    p = {"next_token": 0.08, "sft": sft_true, "dpo": 0.5, "rl": rl_true}
    rows = [{"name": n, "ratio": r, "split": s, "p_true": p[n] if (r, s) == (9, "trained") else 0.3,
             "p_frequent": 1 - p[n] if (r, s) == (9, "trained") else 0.6}
            for n in TREATMENTS for r in RATIOS for s in ("trained", "held_out")]
    return {"treatments": rows, "before": [{"ratio": r, "p_true": 0.05 if r == 9 else 0.3, "p_frequent": 0.9}
                                           for r in RATIOS],
            "kl": [{"name": n, "kl": k} for n, k in zip(TREATMENTS, (0.5, 0.4, 0.9, 0.7))],
            "steps": {"pretrain": 400, "treatment": 100}, "seconds": {}}


def test_claims_and_conclusion_follow_the_numbers():
    from lmlab.experiments.registry import REGISTRY

    truth = REGISTRY["truth"]
    result = hand_result()
    assert all(truth.claims(result).values())
    text = truth.conclusion(result)
    assert "p = 0.05" in text and "RL with the verifier as the reward 0.95" in text and "rl +0.25 (trained +0.90)" in text
    assert "0.4000 (sft), 0.5000 (next_token), 0.7000 (rl), 0.9000 (dpo) nats per token; rl more than" in text
    assert "rl, stayed with the statements it trained on: it taught those answers" in text
    assert "rewarding the true one" in text and "left less than half" not in text
    result["treatments"][-1].update(p_true=0.1, p_frequent=0.2)  # rl, 9:1, held out: 0.3 on the two answers
    assert "rl left less than half the probability on their two answers together (p(true) + p(frequent): 0.30), " \
           "against 0.95 before" in truth.conclusion(result)
    worse = hand_result(rl_true=0.6, sft_true=0.3)
    claims = truth.claims(worse)
    assert not claims["rl_makes_the_trained_statements_true"] and not claims["imitation_keeps_the_false_answer"]
    assert claims["dpo_raises_p_true"]
    assert "do not back every claim" in truth.conclusion(worse) and "rewarding the true one" not in truth.conclusion(worse)
    headers, rows = truth.table(result)
    assert len(rows) == 1 + 2 * len(TREATMENTS) and rows[-1][:2] == ["rl", "held_out"] and rows[-2][4] == "0.950"


def test_quick_runs_end_to_end_with_the_shape_of_result_json(tmp_path, monkeypatch):
    from lmlab.experiments.registry import REGISTRY, run_experiment
    from lmlab.run import Run

    monkeypatch.setenv("LMLAB_CACHE", str(tmp_path / "cache"))
    corpus = write_corpus(tmp_path / "corpus.txt", 300, seed=1)
    result = run_experiment("truth", ExperimentConfig(data=str(corpus), out=str(tmp_path / "out"), quick=True, seed=7))
    saved = json.loads((tmp_path / "out" / "result.json").read_text())
    assert saved == json.loads(json.dumps(result))
    keys = {"treatments", "before", "kl", "steps", "seconds"}
    assert keys <= set(saved) and not set(saved) - keys - {"experiment", "seed", "data", "quick", "device", "claims",
                                                           "conclusion", "wall_time_s", "machine", "command"}
    cells = {(r["name"], r["ratio"], r["split"]) for r in saved["treatments"]}
    assert len(saved["treatments"]) == len(cells) == len(TREATMENTS) * len(RATIOS) * 2
    assert {n for n, _, _ in cells} == set(TREATMENTS) and {s for _, _, s in cells} == {"trained", "held_out"}
    for row in saved["treatments"]:
        assert set(row) == {"name", "ratio", "split", "p_true", "p_frequent"}
        assert 0 <= row["p_true"] <= 1 and 0 <= row["p_frequent"] <= 1 and row["ratio"] in RATIOS
    assert [set(r) for r in saved["before"]] == [{"ratio", "p_true", "p_frequent"}] * len(RATIOS)
    assert [k["name"] for k in saved["kl"]] == list(TREATMENTS) and all(k["kl"] >= 0 for k in saved["kl"])
    # every treatment: a run from the pretrained model, of the same number of optimizer steps
    steps = saved["steps"]["treatment"]
    for name in TREATMENTS:
        run = Run(tmp_path / "out" / "runs" / name)
        assert run.config.init_from == str(tmp_path / "out" / "runs" / "pretrained")
        assert [r.step for r in run.metrics().train] == list(range(1, steps + 1)), name
    assert result["claims"] == REGISTRY["truth"].claims(copy.deepcopy(result))
    assert html.escape(result["conclusion"]) in (tmp_path / "out" / "index.html").read_text()
    assert sorted(p.name for p in (tmp_path / "out").glob("*.png")) == ["truth_held_out.png", "truth_kl.png",
                                                                       "truth_trained.png"]
