"""Preference tuning (lmlab train --stage dpo, lmlab/dpo.py): the DPO loss and its gradient against a hand computation,
the implicit rewards, margin and accuracy, masking (no gradient from prompt tokens or to the reference), encoding of
text and conversational pairs, the sampler, bad input refused in one line, a run that learns the preferences,
exact resume, and `lmlab eval` of a DPO run."""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import HANG_S, cli_env, crash_test, read_jsonl, stage_config, tiny_config

from lmlab import chat, dpo
from lmlab import tokenizer as tok
from lmlab.common import LmlabError
from lmlab.config import DPO_DEFAULTS, TrainConfig, get_preset
from lmlab.loss import LossConfig, completion_logprob, dpo_loss
from lmlab.model import ModelConfig, build_model



# ---------------------------------------------------------------------------------------------------------------
# The loss, by hand


def test_the_dpo_loss_and_its_gradient_by_hand_on_a_two_token_vocabulary():
    """Vocabulary {0, 1}; one prompt whose next-token logits are z = (z0, z1); the chosen completion is token 0, the
    rejected one token 1. Then log pi(c) = z0 - lse(z), log pi(r) = z1 - lse(z), with lse(z) = log(e^z0 + e^z1), and
    with reference log-probabilities a (chosen) and b (rejected):
        h = beta * ((log pi(c) - a) - (log pi(r) - b)) = beta * ((z0 - z1) - (a - b))   (lse cancels)
        loss = -log sigmoid(h) = log(1 + e^-h)
        d loss / d z0 = -beta * sigmoid(-h),   d loss / d z1 = +beta * sigmoid(-h)."""
    z0, z1, a, b, beta = 0.3, -0.5, -0.9, -0.4, 0.5
    z = torch.tensor([z0, z1], dtype=torch.float64, requires_grad=True)
    logits = z.expand(2, 1, 2)  # (rows: chosen, rejected; T = 1; V = 2), both rows the same prompt's logits
    logps = completion_logprob(logits, torch.tensor([[0], [1]]), torch.ones(2, 1, dtype=torch.bool))
    ref = torch.tensor([a, b], dtype=torch.float64)
    loss, chosen_reward, rejected_reward = dpo_loss(logps[:1], logps[1:], ref[:1], ref[1:], beta)
    loss.sum().backward()

    lse = math.log(math.exp(z0) + math.exp(z1))
    h = beta * ((z0 - z1) - (a - b))
    sigmoid = 1 / (1 + math.exp(h))  # sigmoid(-h)
    assert logps.tolist() == pytest.approx([z0 - lse, z1 - lse], abs=1e-12)
    assert float(chosen_reward.detach()) == pytest.approx(beta * (z0 - lse - a), abs=1e-12)
    assert float(rejected_reward.detach()) == pytest.approx(beta * (z1 - lse - b), abs=1e-12)
    assert float(loss.detach()) == pytest.approx(math.log(1 + math.exp(-h)), abs=1e-12)
    assert z.grad.tolist() == pytest.approx([-beta * sigmoid, beta * sigmoid], abs=1e-12)


def test_the_loss_stays_finite_for_any_margin():
    big = torch.tensor([1e4], dtype=torch.float32)
    for sign in (1, -1):
        loss, _, _ = dpo_loss(sign * big, -sign * big, torch.zeros(1), torch.zeros(1), 1.0)
        assert torch.isfinite(loss).all()
    assert float(dpo_loss(-big, big, torch.zeros(1), torch.zeros(1), 1.0)[0]) == pytest.approx(2e4)


def batch_of(policy: list[tuple[float, float]], reference: list[tuple[float, float]]) -> tuple[torch.Tensor,
                                                                                                 dpo.PairBatch]:
    """Logits over a two-token vocabulary whose completion log-probabilities are `policy`: each row is one token,
    token 0, of probability p, so log p is the log-probability (its logit log p, the other's log(1 - p))."""
    rows = [c for c, _ in policy] + [r for _, r in policy]
    logits = torch.tensor([[[lp, math.log(1 - math.exp(lp))]] for lp in rows], dtype=torch.float64)
    ref = torch.tensor([c for c, _ in reference] + [r for _, r in reference], dtype=torch.float32)
    return logits, dpo.PairBatch(torch.zeros(len(rows), 1, dtype=torch.long), torch.zeros(len(rows), 1,
                                 dtype=torch.long), torch.ones(len(rows), 1, dtype=torch.bool), ref)


def test_rewards_margin_and_accuracy_are_the_means_over_the_pairs():
    beta = 0.1
    policy = [(-1.0, -2.0), (-3.0, -1.5)]
    reference = [(-1.5, -1.5), (-2.0, -2.0)]
    logits, batch = batch_of(policy, reference)
    loss, stats = dpo.objective(logits, batch, LossConfig(dpo_beta=beta))
    chosen = [beta * (p[0] - r[0]) for p, r in zip(policy, reference)]  # 0.05, -0.1
    rejected = [beta * (p[1] - r[1]) for p, r in zip(policy, reference)]  # -0.05, 0.05
    margins = [c - r for c, r in zip(chosen, rejected)]  # 0.1, -0.15: one pair preferred
    named = dpo.named(stats)
    assert named["chosen_reward"] == pytest.approx(np.mean(chosen), abs=1e-6)
    assert named["rejected_reward"] == pytest.approx(np.mean(rejected), abs=1e-6)
    assert named["margin"] == pytest.approx(np.mean(margins), abs=1e-6)
    assert named["preference_accuracy"] == 0.5
    assert named["chosen_logp"] == pytest.approx(-2.0, abs=1e-6) and named["rejected_logp"] == pytest.approx(-1.75)
    assert float(loss) == pytest.approx(np.mean([math.log(1 + math.exp(-m)) for m in margins]), abs=1e-6)
    _, tie = dpo.objective(*batch_of(reference, reference), LossConfig(dpo_beta=beta))
    assert dpo.named(tie)["preference_accuracy"] == 0.0  # a margin of 0 is no preference


# ---------------------------------------------------------------------------------------------------------------
# Masking and the reference


def test_only_completion_targets_count_in_the_log_probability():
    torch.manual_seed(0)
    logits = torch.randn(2, 6, 5)
    targets = torch.randint(5, (2, 6))
    mask = torch.tensor([[0, 0, 1, 1, 1, 0], [0, 0, 0, 1, 1, 1]], dtype=torch.bool)
    before = completion_logprob(logits, targets, mask)
    prompt = logits.clone()
    prompt[~mask] += 10 * torch.randn(int((~mask).sum()), 5)  # a prompt (or padding) position's logits changed
    assert torch.equal(completion_logprob(prompt, targets, mask), before)
    completion = logits.clone()
    completion[0, 3, targets[0, 3]] += 1.0
    assert completion_logprob(completion, targets, mask)[0] > before[0]
    by_hand = torch.log_softmax(logits, -1).gather(-1, targets[..., None])[..., 0]
    assert torch.allclose(before, (by_hand * mask).sum(-1))


def tiny_model(vocab: int, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model(ModelConfig(block_size=32, n_layer=1, n_head=2, n_embd=16, zero_init_proj=False), vocab)


def text_pairs() -> list[dpo.Pair]:
    return [dpo.Pair("the sky is", " blue.", " green."), dpo.Pair("two and two make", " four.", " five."),
            dpo.Pair("cats say", " meow.", " woof, woof.")]


def byte_tokenizer() -> tok.Tokenizer:
    return tok.ByteTokenizer()


def test_no_gradient_reaches_the_reference_or_comes_from_prompt_tokens():
    tokenizer = byte_tokenizer()
    data = dpo.encode(dpo.PairSplits(text_pairs(), text_pairs()[:1], "pairs"), None, tokenizer, 32, lambda m: None)
    reference, policy = tiny_model(tokenizer.vocab_size, 0), tiny_model(tokenizer.vocab_size, 0)
    data.reference = {"train": dpo.logprobs(reference, data.train, 8, torch.float32)}
    assert not any(p.grad is not None for p in reference.parameters())
    batch = dpo.to_batch(data.train, data.reference["train"], 0, torch.device("cpu"))
    assert not batch.reference.requires_grad
    logits = policy(batch.x)
    logits.retain_grad()
    loss, stats = dpo.objective(logits, batch, LossConfig(dpo_beta=0.5))
    assert dpo.named(stats)["margin"] == 0.0 and float(loss.detach()) == pytest.approx(math.log(2))  # policy = reference
    loss.backward()
    assert all(p.grad is None for p in reference.parameters())  # the frozen base is never part of the graph
    grad_by_position = logits.grad.abs().sum(-1)  # (2B, T)
    assert (grad_by_position[~batch.mask] == 0).all()  # a prompt or padding target sends back nothing
    assert (grad_by_position[batch.mask] > 0).all()
    torch.optim.SGD(policy.parameters(), lr=1.0).step()
    again = dpo.logprobs(reference, data.train, 8, torch.float32)
    assert np.array_equal(again, data.reference["train"])  # stepping the policy leaves the reference as it was


def test_text_pairs_mask_their_completion_and_conversations_only_the_answer_after_the_prompt():
    tokenizer = byte_tokenizer()
    ids, mask = dpo.encode_completion(tokenizer, text_pairs()[0], " blue.")
    assert tokenizer.decode(ids[~mask].tolist()) == "the sky is" and tokenizer.decode(ids[mask].tolist()) == " blue."
    prompt = [{"role": "user", "content": "Remember: a=1."}, {"role": "assistant", "content": "OK."},
              {"role": "user", "content": "What is a?"}]
    pair = dpo.Pair(prompt, [{"role": "assistant", "content": "1"}], [{"role": "assistant", "content": "2"}])
    ids, mask = dpo.encode_completion(tokenizer, pair, pair.chosen)
    rendered = chat.render(tokenizer, prompt + pair.chosen)
    assert np.array_equal(ids, rendered.ids)
    assert mask.sum() < rendered.mask.sum()  # the earlier answer ("OK.") is the prompt's, not the completion's
    assert tokenizer.decode(ids[mask].tolist()) == "1" + tok.END  # the answer and the end of its turn
    head = chat.render(tokenizer, prompt, add_generation_prompt=True).ids
    assert not mask[:len(head)].any() and mask[len(head):].all()


def test_the_sampler_draws_from_its_seed_and_resumes_exactly():
    tokenizer = byte_tokenizer()
    pairs = [dpo.Pair(f"prompt {i}", f" yes {i}", f" no {i}") for i in range(20)]
    data = dpo.encode(dpo.PairSplits(pairs, pairs[:2], "p"), None, tokenizer, 32, lambda m: None)
    data.reference = {"train": np.arange(40, dtype=np.float64).reshape(20, 2)}
    one = dpo.PairSampler(data, 4, seed=3, device=torch.device("cpu"), grad_accum=2)
    first = [one.next() for _ in range(2)]  # a step: two micro-batches of 4 pairs
    state = one.state_dict()
    after = [one.next() for _ in range(2)]
    two = dpo.PairSampler(data, 4, seed=3, device=torch.device("cpu"), grad_accum=2)
    two.load_state_dict(state)
    assert all(torch.equal(a.x, b.x) and torch.equal(a.reference, b.reference)
               for a, b in zip(after, [two.next() for _ in range(2)]))
    assert not torch.equal(first[0].reference, after[0].reference)
    # the reference of pair i is (2i, 2i + 1): rows 0..3 the chosen, 4..7 the rejected of the same pairs
    assert torch.equal(first[0].reference[4:], first[0].reference[:4] + 1)
    whole = dpo.PairSampler(data, 8, seed=3, device=torch.device("cpu"))  # the same step in one micro-batch
    halves = [b.reference for b in first]
    assert torch.equal(whole.next().reference, torch.cat([halves[0][:4], halves[1][:4], halves[0][4:], halves[1][4:]]))


# ---------------------------------------------------------------------------------------------------------------
# Reading pairs


GOOD = {"prompt": "a", "chosen": " b", "rejected": " c"}
USER = [{"role": "user", "content": "hi"}]
ANSWER = [{"role": "assistant", "content": "yo"}]


@pytest.mark.parametrize("line, expected", [
    ("not json", "not valid JSON"),
    ({"prompt": "a", "chosen": " b"}, "no 'rejected'"),
    ({"prompt": "a", "chosen": ANSWER, "rejected": " c"}, "three texts or three message lists"),
    ({"prompt": "a", "chosen": "", "rejected": " c"}, "chosen is empty"),
    ({"prompt": USER + ANSWER, "chosen": ANSWER, "rejected": ANSWER}, "prompt: the last message is the assistant's"),
    ({"prompt": USER, "chosen": USER, "rejected": ANSWER}, "chosen must start with the assistant's message"),
    ({"prompt": USER, "chosen": ANSWER, "rejected": [{"role": "assistant", "content": 3}]}, "rejected after the"),
    ({"prompt": USER, "chosen": ANSWER, "rejected": ANSWER}, "holds messages where line 1 holds texts"),
])
def test_a_malformed_line_is_one_error_naming_it(tmp_path, line, expected):
    path = tmp_path / "prefs.jsonl"
    path.write_text(json.dumps(GOOD) + "\n" + (line if isinstance(line, str) else json.dumps(line)) + "\n"
                    + json.dumps(GOOD) + "\n")
    with pytest.raises(LmlabError) as e:
        dpo.read_pairs(str(path))
    message = str(e.value)
    assert expected in message and len(message.splitlines()) == 1, message
    if "line 1" not in expected:
        assert "line 2" in message and "nothing of this file is used" in message


def test_good_lines_read_both_kinds(tmp_path):
    path = tmp_path / "prefs.jsonl"
    path.write_text("\n".join(json.dumps({**GOOD, "score_chosen": 9}) for _ in range(3)) + "\n\n")
    assert [p.chosen for p in dpo.read_pairs(str(path))] == [" b"] * 3
    path.write_text(json.dumps({"prompt": USER, "chosen": ANSWER, "rejected": ANSWER}) + "\n")
    assert dpo.read_pairs(str(path))[0].conversational


# ---------------------------------------------------------------------------------------------------------------
# Runs


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> tuple[Path, Path]:
    """A base run (char tokenizer) on statements whose false colour is 3 times as frequent as the true one, and the
    preference pairs that prefer the true colour: (base run, pairs file)."""
    from lmlab.train import train

    root = tmp_path_factory.mktemp("dpo-base")
    rng = np.random.default_rng(0)
    colours = ["red", "blue", "green", "black", "white", "pink"]
    lines, pairs = [], []
    for i in range(24):
        true, false = rng.choice(colours, 2, replace=False)
        lines += [f"the colour of item{i} is {true}."] + [f"the colour of item{i} is {false}."] * 3
        pairs.append(dpo.Pair(f"the colour of item{i} is", f" {true}.", f" {false}."))
    order = rng.permutation(len(lines) * 4)
    (root / "corpus.txt").write_text("\n".join((lines * 4)[i] for i in order) + "\n")
    (root / "prefs.jsonl").write_text(dpo.pairs_json(pairs))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LMLAB_CACHE", str(root / "cache"))
        train(tiny_config(root / "corpus.txt", root / "base", model_block_size=32, model_n_embd=32, max_steps=100,
                          eval_interval=100, inside=False))
    return root / "base", root / "prefs.jsonl"


def dpo_config(base: Path, data: Path, out: Path, **overrides) -> TrainConfig:
    """A DPO run of the base on its own pairs (validated on the same pairs: the training pairs' accuracy)."""
    settings = dict(max_steps=40, batch_size=8, eval_interval=20, checkpoint_interval=20)
    return stage_config("dpo", base, str(data), out, str(data), **{**settings, **overrides})


def test_a_dpo_run_learns_the_preferences_and_logs_them(base, tmp_path):
    from lmlab.run import Run, load_run
    from lmlab.train import train

    run_dir, data = base
    summary = train(dpo_config(run_dir, data, tmp_path / "dpo", max_steps=60,
                               optim=dataclasses.replace(get_preset("tiny", "dpo").optim, lr=1e-2, muon_lr=0.02)))
    run = Run.open(summary["run_dir"])
    metrics = run.metrics()
    first, last = metrics.evals[0], metrics.evals[-1]
    assert first.val_loss == pytest.approx(math.log(2), abs=1e-5) and first.val_margin == pytest.approx(0, abs=1e-5)
    assert last.val_preference_accuracy >= 0.9 and last.val_margin > 0 and last.val_pairs == 24
    assert not run.is_chat  # preferences between texts: a text model still
    assert last.val_loss < 0.5
    assert last.passes == pytest.approx(60 * 8 / 24, rel=0.01)  # 60 steps of 8 pairs over 24 pairs
    # the model's own preference: how often it gives the chosen completion more probability, before and after
    reference = json.loads((Path(summary["run_dir"]) / "reference.json").read_text())
    tuned = load_run(summary["run_dir"], "cpu", "last")
    splits = dpo.load_pairs(str(data), None, 0.1, 0)
    pairs = dpo.encode(dpo.PairSplits(splits.train + splits.val, splits.val, ""), None, tuned.tokenizer, 32,
                       lambda m: None)
    after = dpo.logprobs(tuned.model, pairs.train, 8, torch.float32)
    assert np.mean([c > r for c, r in reference["val"]]) < 0.7 and np.mean(after[:, 0] > after[:, 1]) >= 0.9
    step = metrics.train[-1]
    assert step.margin == pytest.approx(step.chosen_reward - step.rejected_reward, abs=1e-9)
    assert 0 <= step.preference_accuracy <= 1 and step.chosen_logp < 0 and step.rejected_logp < 0
    config = json.loads((Path(summary["run_dir"]) / "config.json").read_text())
    assert config["stage"] == "dpo" and config["loss"]["dpo_beta"] == 0.1


def test_a_dpo_run_resumes_exactly_and_refuses_other_pairs(base, tmp_path):
    from lmlab.train import train

    run_dir, data = base
    options = dict(eval_interval=4, checkpoint_interval=4,  # a schedule that does not depend on the budget
                   optim=dataclasses.replace(get_preset("tiny", "dpo").optim, schedule="constant", warmup=0))
    train(dpo_config(run_dir, data, tmp_path / "whole", max_steps=8, **options))
    train(dpo_config(run_dir, data, tmp_path / "cut", max_steps=4, **options))
    saved = TrainConfig.from_json(json.loads((tmp_path / "cut" / "config.json").read_text()))
    train(dataclasses.replace(saved, resume=str(tmp_path / "cut"), max_steps=8))

    def steps(run):
        return [{k: v for k, v in r.items() if k not in ("tokens_per_s", "elapsed_s")}
                for r in read_jsonl(run / "metrics.jsonl") if "train_loss" in r]

    assert steps(tmp_path / "cut") == steps(tmp_path / "whole") and len(steps(tmp_path / "whole")) == 8
    reference = tmp_path / "cut" / "reference.json"
    kept = reference.read_text()
    changed = json.loads(kept)
    changed["train"][0][0] += 1.0
    reference.write_text(json.dumps(changed))  # the same pairs, another reference
    with pytest.raises(LmlabError, match="another reference"):
        train(dataclasses.replace(saved, resume=str(tmp_path / "cut"), max_steps=12))
    reference.write_text(kept)
    other = tmp_path / "other.jsonl"
    other.write_text(data.read_text().replace("blue", "pink"))
    with pytest.raises(LmlabError, match="not those the run"):
        train(dataclasses.replace(saved, resume=str(tmp_path / "cut"), max_steps=12,
                                  data=dataclasses.replace(saved.data, data=str(other), val_data=str(other))))


def test_lmlab_eval_of_a_dpo_run_measures_its_held_out_pairs(base, tmp_path):
    from lmlab.run import Run, load_run
    from lmlab.train import train

    run_dir, data = base
    summary = train(dpo_config(run_dir, data, tmp_path / "dpo", max_steps=4, eval_interval=4, checkpoint_interval=4))
    result = dpo.evaluate_run(load_run(summary["run_dir"], "cpu", "last"))
    last = Run.open(summary["run_dir"]).metrics().evals[-1]
    assert result["loss"] == pytest.approx(last.val_loss, abs=1e-6) and result["pairs"] == 24
    assert result["preference_accuracy"] == last.val_preference_accuracy
    assert "preference accuracy" in dpo.describe_eval(result)


def test_conversational_pairs_train_from_a_base_with_a_chat_template(tmp_path, monkeypatch):
    from lmlab.run import Run
    from lmlab.train import train

    monkeypatch.setenv("LMLAB_CACHE", str(tmp_path / "cache"))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the model reads a window of tokens and predicts the next one\n" * 50)
    train(tiny_config(corpus, tmp_path / "base", data_tokenizer="byte", model_block_size=96, max_steps=2))
    data = tmp_path / "chat_pairs.jsonl"
    data.write_text(dpo.pairs_json(dpo.chat_pairs(0, "train", 24)))
    summary = train(stage_config("dpo", tmp_path / "base", str(data), tmp_path / "dpo", max_steps=3))
    metrics = Run.open(summary["run_dir"]).metrics()
    assert len(metrics.train) == 3 and metrics.evals[-1].val_pairs == 2  # a tenth of 24 held out
    assert metrics.evals[0].val_loss == pytest.approx(math.log(2), abs=1e-5)
    # preferences between answers in conversations make a chat model (chat, serve and export treat it as one);
    # the text base is not one
    assert Run(summary["run_dir"]).is_chat and not Run(tmp_path / "base").is_chat


# ---------------------------------------------------------------------------------------------------------------
# The command line


def test_the_stage_has_its_own_defaults_and_beta():
    cfg = get_preset("tiny", "dpo")
    assert cfg.stage == "dpo" and cfg.optim.lr == DPO_DEFAULTS["lr"] and cfg.model.dropout == 0.0
    assert cfg.max_time == DPO_DEFAULTS["max_time"] and cfg.loss.dpo_beta == 0.1
    with pytest.raises(LmlabError, match="--dpo-beta must be a number > 0"):
        LossConfig(dpo_beta=0.0)


@pytest.mark.parametrize("case", ["line", "no_base", "parquet", "objective", "beta"])
def test_the_command_line_refuses_bad_dpo_input_in_one_line_with_exit_2(base, tmp_path, case, capsys):
    from lmlab.cli import main

    run_dir, good = base
    data = tmp_path / "bad.jsonl"
    data.write_text(json.dumps(GOOD) + "\n" + json.dumps({"prompt": "a", "chosen": " b"}) + "\n")
    args = ["train", "--stage", "dpo", "--init-from", str(run_dir), "--max-steps", "2", "--out", str(tmp_path / "r"),
            "--data", str(good)]
    expected = {"line": "line 2", "no_base": "--init-from", "parquet": ".jsonl file", "objective": "DPO loss",
                "beta": "--dpo-beta"}[case]
    if case == "line":
        args[-1] = str(data)
    elif case == "no_base":
        del args[3:5]
    elif case == "parquet":
        args[-1] = str(tmp_path / "prefs.parquet")
    elif case == "objective":
        args += ["--z-loss", "1e-4"]
    else:
        args += ["--dpo-beta", "-1"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("lmlab train: error:") and expected in err, err
    assert not (tmp_path / "r" / "config.json").exists()


@pytest.mark.slow  # a subprocess of its own
def test_the_command_line_trains_a_dpo_run(base, tmp_path):
    run_dir, data = base
    proc = subprocess.run([sys.executable, "-m", "lmlab", "train", "--stage", "dpo", "--init-from", str(run_dir),
                           "--data", str(data), "--dpo-beta", "0.2", "--max-steps", "3", "--max-time", "0",
                           "--batch-size", "4", "--sample-tokens", "0", "--no-progress", "--out", str(tmp_path / "d")],
                          cwd=str(tmp_path), env=cli_env(tmp_path / "cache"), capture_output=True, text=True,
                          timeout=HANG_S)
    assert proc.returncode == 0, proc.stderr
    config = json.loads((tmp_path / "d" / "config.json").read_text())
    assert config["loss"]["dpo_beta"] == 0.2 and config["optim"]["lr"] == DPO_DEFAULTS["lr"]
    records = read_jsonl(tmp_path / "d" / "metrics.jsonl")
    assert all(set(dpo.STATS) <= set(r) for r in records if "train_loss" in r)
    assert "preference accuracy" in proc.stderr


@pytest.mark.slow
def test_crash_test_covers_dpo(tmp_path):
    crash_test("dpo", tmp_path / "crash")
