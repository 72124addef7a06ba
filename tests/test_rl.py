"""--stage rl (lmlab/rl.py, loss.group_advantages, loss.policy_loss, lmlab/tasks.py): the advantages and the
clipped loss against hand computations, REINFORCE's gradient, no gradient to the reference or the prompt, the
verifiers, a reward from Python, the same completions from the same seed, a bad task refused in one line."""

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch

from helpers import read_jsonl, run_cli, tiny_config, write_corpus
from lmlab import tasks
from lmlab.common import LmlabError
from lmlab.config import RlConfig
from lmlab.loss import group_advantages, policy_loss
from lmlab.model import ModelConfig, build_model
from lmlab.rl import Rollout, rows_of, select_groups
from lmlab.run import Run, load_run

EPS = 1e-6


def test_group_advantages_by_hand():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [2.0, 2.0, 2.0, 2.0], [3.0, 0.0, 0.0, 0.0]])
    # group 1: mean 0.5, population std 0.5; group 2: all equal, zero; group 3: mean 0.75, std sqrt(27/16) = 1.299
    std3 = math.sqrt((2.25 ** 2 + 3 * 0.75 ** 2) / 4)
    expected = torch.tensor([[0.5 / (0.5 + EPS), -0.5 / (0.5 + EPS), -0.5 / (0.5 + EPS), 0.5 / (0.5 + EPS)],
                             [0.0, 0.0, 0.0, 0.0],
                             [2.25 / (std3 + EPS), -0.75 / (std3 + EPS), -0.75 / (std3 + EPS), -0.75 / (std3 + EPS)]])
    assert torch.allclose(group_advantages(rewards, EPS), expected, atol=1e-6)


def test_clipped_loss_by_hand():
    # two completions of three token slots, the last slot padding; ratios 1.5 and 0.5 on both rows
    old = torch.zeros(2, 3)
    logp = torch.tensor([[math.log(1.5), math.log(0.5), 5.0], [math.log(1.5), math.log(0.5), -5.0]])
    mask = torch.tensor([[True, True, False], [True, True, False]])
    out = policy_loss(logp, old, torch.tensor([1.0, -2.0]), mask, clip_eps=0.2)
    # A = +1: -min(1.5, 1.2) = -1.2 and -min(0.5, 0.8) = -0.5; A = -2: -min(-3, -2.4) = 3 and -min(-1, -1.6) = 1.6
    assert out.loss.item() == pytest.approx((-1.2 - 0.5 + 3.0 + 1.6) / 4, abs=1e-6)
    assert out.clip_fraction == pytest.approx(1.0)  # every ratio lies outside [0.8, 1.2]
    assert out.kl == 0.0
    # ratio 1 everywhere: nothing clipped, loss -mean(A) over tokens = -(1 + 1 - 2 - 2) / 4
    same = policy_loss(old, old, torch.tensor([1.0, -2.0]), mask)
    assert same.loss.item() == pytest.approx(0.5) and same.clip_fraction == 0.0


def test_kl_penalty_is_k3_by_hand():
    logp = torch.tensor([[math.log(0.25), math.log(0.5)]])
    ref = torch.tensor([[math.log(0.5), math.log(0.5)]])  # ref - logp = ln 2, then 0
    out = policy_loss(logp, logp.detach(), torch.tensor([0.0]), torch.tensor([[True, True]]), ref_logp=ref,
                      kl_beta=0.5)
    k3 = 2.0 - math.log(2.0) - 1.0  # exp(d) - d - 1 at d = ln 2; 0 at d = 0
    assert out.kl == pytest.approx(k3 / 2, abs=1e-6)
    assert out.loss.item() == pytest.approx(0.5 * k3 / 2, abs=1e-6)


def test_dynamic_sampling_keeps_the_groups_with_mixed_rewards():
    rewards = torch.tensor([[1.0, 1.0, 1.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.5]])
    assert select_groups(rewards, 2) == [1, 3]  # the first two mixed groups, in the order drawn
    assert select_groups(rewards, 8) == [1, 3, 4]  # fewer mixed groups than asked: those there are
    assert select_groups(rewards[[0, 2]], 2) == [0]  # none: one group, whose advantages are all 0
    assert group_advantages(rewards[[0, 2]]).abs().max() == 0


def test_rows_train_the_completion_only():
    x, y, mask = rows_of([[1, 2, 3], [7]], [[4, 5], [8, 9, 6]], pad_id=0)
    assert x.tolist() == [[1, 2, 3, 4], [7, 8, 9, 6]]
    assert y.tolist() == [[2, 3, 4, 5], [8, 9, 6, 0]]
    assert mask.tolist() == [[False, False, True, True], [True, True, True, False]]


def tiny_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model(ModelConfig(n_layer=1, n_head=2, n_embd=16, block_size=16, dropout=0.0), 11).double()


def rollout(reference=None, kl_beta=0.0, temperature=1.0) -> Rollout:
    x, y, mask = rows_of([[1, 2, 3], [1, 2, 3], [4, 5], [4, 5]], [[6, 7], [8], [9, 10, 6], [7, 7]], pad_id=0)
    rewards = torch.tensor([[1.0, 0.0], [0.0, 3.0]], dtype=torch.float64)
    return Rollout(x, y, mask, rewards, group_advantages(rewards).reshape(-1), temperature, 0.2, kl_beta, reference,
                   [("p", "c")] * 4)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_one_update_gradient_is_reinforce(temperature):
    """kl_beta 0, old policy = current one detached: the loss's gradient is minus REINFORCE's estimate of the
    reward's gradient, the mean over completion tokens of A_i * grad log pi(token) (each token's gradient taken on
    its own here): descending the loss ascends the reward."""
    model = tiny_model()
    batch = rollout(temperature=temperature)
    batch.loss(model).backward()
    got = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    logp = (model(batch.x) / temperature).log_softmax(-1).gather(-1, batch.y[..., None])[..., 0]
    expected = [torch.zeros_like(p) for p in model.parameters()]
    count = int(batch.mask.sum())
    for i, t in batch.mask.nonzero().tolist():
        grads = torch.autograd.grad(logp[i, t], list(model.parameters()), retain_graph=True, allow_unused=True)
        for e, g in zip(expected, grads):
            if g is not None:
                e -= batch.advantages[i] * g / count
    for g, e in zip(got, expected):
        assert torch.allclose(g, e, atol=1e-12, rtol=1e-9)
    assert any(e.abs().max() > 1e-6 for e in expected)  # the check has something to compare


def test_no_gradient_reaches_the_reference_or_the_prompt():
    model, reference = tiny_model(0), tiny_model(1)  # the reference left trainable: a leak would show in its grads
    batch = rollout(reference, kl_beta=0.3)
    logits = model(batch.x).detach().requires_grad_(True)
    logp = logits.log_softmax(-1).gather(-1, batch.y[..., None])[..., 0]
    ref_logp = reference(batch.x).log_softmax(-1).gather(-1, batch.y[..., None])[..., 0]
    out = policy_loss(logp, logp.detach(), batch.advantages, batch.mask, 0.2, ref_logp, 0.3)
    out.loss.backward()
    assert logits.grad[~batch.mask].abs().max() == 0  # no gradient at the targets that are prompt tokens or padding
    assert logits.grad[batch.mask].abs().max() > 0
    assert all(p.grad is None for p in reference.parameters()) and out.kl > 0
    batch.loss(model).backward()  # the loss of a batch: the reference's forward is not even recorded
    assert all(p.grad is None for p in reference.parameters())
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_patterns_verifier():
    assert tasks.patterns_reward("12 plus 30 is ", "42. And more") == 1.0
    assert tasks.patterns_reward("12 plus 30 is ", "42") == 0.0  # the full stop is part of the answer
    assert tasks.patterns_reward("12 plus 30 is ", "420.") == 0.0
    assert tasks.patterns_reward("12 plus 30 is ", " 42.") == 0.0
    with pytest.raises(LmlabError):
        tasks.patterns_reward("what is 12 + 30?", "42.")
    task = tasks.load_task("patterns")
    assert len(task.train) + len(task.held_out) == 48 * 47 // 2
    assert not {p.text for p in task.train} & {p.text for p in task.held_out}
    assert all(task.reward(p, p.answer) == 1.0 for p in task.held_out)


def test_chat_verifier_and_splits():
    task = tasks.load_task("synthetic:chat", held_out=10)
    assert len(task.held_out) == 10 and len({p.group for p in task.held_out}) == 5  # spread over the skills
    asked = lambda prompts: {json.dumps([m for m in p.messages if m["role"] != "system"]) for p in prompts}  # noqa
    assert not asked(task.train) & asked(task.held_out)  # a question is in one split only
    prompt = task.held_out[0]
    assert task.reward(prompt, prompt.answer) == 1.0
    assert task.reward(prompt, prompt.answer + " ") == 1.0  # verify's normalisation
    assert task.reward(prompt, prompt.answer + "x") == 0.0


@pytest.mark.slow  # a subprocess of its own
def test_bad_task_is_one_line(tmp_path):
    proc = run_cli(["train", "--stage", "rl", "--init-from", str(tmp_path), "--task", "nope"], tmp_path)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "unknown --task 'nope'" in lines[0] and "Traceback" not in proc.stderr
    with pytest.raises(LmlabError):
        RlConfig(clip_eps=1.5)


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A base run (byte tokenizer, which encodes the statements) trained for a few steps."""
    from lmlab.train import train

    root = tmp_path_factory.mktemp("rl-base")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LMLAB_CACHE", str(root / "cache"))
        corpus = write_corpus(root / "corpus.txt", n_lines=100)
        train(tiny_config(corpus, root / "base", data_tokenizer="byte", model_block_size=32, max_steps=3,
                          eval_interval=3, inside=False, probe=False, trajectory_snapshots=0))
    return root / "base"


def rl_run(base: Path, out: Path, reward=None, **overrides) -> list[dict]:
    from lmlab.train import train

    cfg = tiny_config("builtin", out, stage="rl", init_from=str(base), max_steps=3, eval_interval=2, batch_size=2,
                      inside=False, probe=False, trajectory_snapshots=0, telemetry_interval=0,
                      rl=RlConfig(task="patterns", group_size=4, rl_max_new_tokens=6, **overrides),
                      data_tokenizer="byte", model_block_size=None, optim_lr=0.05)
    train(cfg, reward=reward)
    return read_jsonl(out / "metrics.jsonl")


def test_same_seed_same_completions_and_a_python_reward(base, tmp_path, monkeypatch):
    monkeypatch.setenv("LMLAB_CACHE", str(tmp_path / "cache"))
    seen = []

    def reward(prompt: str, completion: str) -> float:  # varies within a group: the weights move
        seen.append((prompt, completion))
        return float(len(completion) % 3)

    first = rl_run(base, tmp_path / "a", reward, kl_beta=0.1)
    second = rl_run(base, tmp_path / "b", reward, kl_beta=0.1)
    steps = [r for r in first if "train_loss" in r]
    assert len(steps) == 3 and all(r["kl"] >= 0 for r in steps)
    assert any(r["train_loss"] != 0 for r in steps) and steps[-1]["kl"] > 0  # it learnt, away from the reference
    logs = [read_jsonl(tmp_path / name / "completions.jsonl") for name in ("a", "b")]
    assert logs[0] == logs[1] and len(logs[0]) == 3  # steps 0, 2 and 3
    assert [r.get("reward") for r in first] == [r.get("reward") for r in second]
    assert all(c["reward"] == len(c["completion"]) % 3 for log in logs[0] for c in log["train"] + log["held_out"])
    assert seen and all(p.endswith(" is ") for p, _ in seen)
    # dynamic sampling (rl_oversample 4 by default): 2 x 4 groups drawn a step, the first 2 mixed ones trained; the
    # rewards are logged over all 8, and the logged training group is a mixed one
    assert all(r["kept_fraction"] == max(min(r["mixed_fraction"], 0.25), 0.125) for r in steps)
    assert any(len({c["reward"] for c in log["train"]}) > 1 for log in logs[0][1:])
    # the best checkpoint is the one of the highest held-out reward (the later of equals), not the lowest loss
    evals = [r for r in first if "heldout_reward" in r]
    assert [r["best"] for r in evals] == [r["heldout_reward"] >= max(e["heldout_reward"] for e in evals[:i + 1])
                                          for i, r in enumerate(evals)]
    saved = {p.name: json.loads((p / "state.json").read_text()) for p in (tmp_path / "a" / "checkpoints").iterdir()}
    rewarded = [s for s in saved.values() if "heldout_reward" in s]
    assert rewarded and all(s["heldout_reward"] == next(r["heldout_reward"] for r in evals if r["step"] == s["step"])
                            for s in rewarded)
    best = max(reversed(rewarded), key=lambda s: (s["heldout_reward"], s["step"]))
    assert load_run(tmp_path / "a").checkpoint.step == best["step"]
    assert Run.open(tmp_path / "a").metrics().best_eval().step == max(
        reversed(evals), key=lambda r: (r["heldout_reward"], r["step"]))["step"]


def test_resume_goes_on_exactly(base, tmp_path, monkeypatch):
    """Stopped after 2 steps and resumed, an rl run logs what an uninterrupted one does (sampler and reference)."""
    from lmlab.train import train

    monkeypatch.setenv("LMLAB_CACHE", str(tmp_path / "cache"))
    whole = rl_run(base, tmp_path / "whole", kl_beta=0.1, rl_temperature=2.0)
    cfg = tiny_config("builtin", tmp_path / "cut", stage="rl", init_from=str(base), max_steps=2, eval_interval=2,
                      batch_size=2, inside=False, probe=False, trajectory_snapshots=0, telemetry_interval=0,
                      checkpoint_interval=2, data_tokenizer="byte", model_block_size=None, optim_lr=0.05,
                      rl=RlConfig(task="patterns", group_size=4, rl_max_new_tokens=6, kl_beta=0.1, rl_temperature=2.0))
    train(cfg)
    saved = Run.open(tmp_path / "cut").config
    train(dataclasses.replace(saved, resume=str(tmp_path / "cut"), max_steps=3))
    cut = read_jsonl(tmp_path / "cut" / "metrics.jsonl")
    strip = [{k: v for k, v in r.items() if not k.endswith("_s") and k != "tokens_per_s"} for r in whole]
    assert strip == [{k: v for k, v in r.items() if not k.endswith("_s") and k != "tokens_per_s"} for r in cut]


def test_plain_text_completions_never_draw_special_tokens():
    """A plain-text prompt's completions (the patterns task) are text: the chat's special tokens are never drawn,
    and the policy trained gives them no probability; unbanned, the same draws of a random model hold some."""
    from lmlab import sft
    from lmlab.config import TrainConfig
    from lmlab.generate import generate_batch
    from lmlab.rl import RolloutSampler, load
    from lmlab.tokenizer import ByteTokenizer

    tokenizer = ByteTokenizer()  # the 256 bytes, then lmlab's special tokens
    cfg = TrainConfig(batch_size=4, rl=RlConfig(task="patterns", group_size=8, rl_max_new_tokens=12, rl_oversample=1))
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, block_size=64), stage="rl")
    torch.manual_seed(0)
    model = build_model(ModelConfig(n_layer=1, n_head=2, n_embd=16, block_size=64, dropout=0.0), tokenizer.vocab_size)
    sampler = RolloutSampler(load(cfg, tokenizer, lambda m: None), tokenizer, cfg, torch.device("cpu"))
    sampler.bind(model, None, lambda m: None)
    batch = sampler.next()
    drawn = batch.y[batch.mask]
    assert drawn.numel() > 100 and drawn.max() < 256
    assert batch.token_logprobs(model)[0][..., 256:].max() == float("-inf")
    assert (batch.y[~batch.mask] == sft.pad_id(tokenizer)).any() and sft.pad_id(tokenizer) >= 256  # banned padding
    batch.loss(model).backward()  # its -inf log-probabilities, not trained, must not make the gradient NaN
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    prompts = [tokenizer.encode(p.text) for p in sampler.task.train[:32]]
    unbanned = generate_batch(model, prompts, 12, 1.0, seeds=list(range(32)))
    assert any(t >= 256 for c in unbanned for t in c.tokens)  # the check has something to catch


@pytest.mark.slow  # 100 held-out prompts answered
def test_eval_of_an_rl_run_measures_its_task():
    """`lmlab eval RUN` of an rl run on synthetic:chat, without --data: the task's held-out conversations and their
    answers (not the text of the base's corpus); of an rl run on plain-text prompts, text."""
    from types import SimpleNamespace

    from lmlab import sft
    from lmlab.config import TrainConfig
    from lmlab.tokenizer import ByteTokenizer

    config = TrainConfig(stage="rl", rl=RlConfig(task="synthetic:chat"))
    assert sft.evaluates_conversations(config, None)
    assert not sft.evaluates_conversations(dataclasses.replace(config, rl=RlConfig(task="patterns")), None)
    torch.manual_seed(0)
    tokenizer = ByteTokenizer()
    model = build_model(ModelConfig(n_layer=1, n_head=2, n_embd=16, block_size=128, dropout=0.0),
                        tokenizer.vocab_size).eval()
    result = sft.evaluate_run(SimpleNamespace(tokenizer=tokenizer, model=model, config=config, run=None), None)
    assert result["source"] == "synthetic:chat" and result["conversations"] > 0 and result["answers"] > 0
    assert set(result["exact_match"]) == {"arithmetic", "copy", "count", "lookup", "reverse"}
