"""Reinforcement learning with a verifiable reward (`lmlab train --stage rl --init-from RUN --task NAME`), GRPO's
way. The loop, the run folder, checkpoints, resume and records are train.py's; this module holds what differs:

- `load`: the task's prompts (tasks.py) for the base's tokenizer and context, and the run's token streams (each
  prompt with its reference answer: the held-out ones give the validation loss).
- `RolloutSampler`: each micro-batch of a step. It draws batch_size x rl_oversample training prompts and a seed for
  each of their group_size completions from one seeded generator (its state is the sampler's whole state, saved in
  checkpoints), samples every completion of every group in one batch with the KV cache (generate.generate_batch;
  a plain-text prompt's completion never draws a special token), scores them (the task's verifier, or a Python
  reward function), keeps the first batch_size groups whose rewards are mixed (DAPO's dynamic sampling,
  `select_groups`: the others have zero advantages) and normalises the rewards within each group.
- `Rollout.loss`: the clipped policy-gradient loss of loss.policy_loss over the completion tokens, with one update
  per batch (the old policy is the current one, detached: ratio 1, REINFORCE's gradient), and the k3 KL to the
  frozen reference (the initial model, built only when --kl-beta > 0).
- `RolloutSampler.evaluate`: greedy completions (temperature 0) of the held-out prompts, batched: their mean reward
  and pass@1, exact match by skill for synthetic:chat, and a sample of completions with rewards (completions.jsonl).
"""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from . import chat, rundir, sft, tasks
from . import tokenizer as tok
from .common import LmlabError
from .config import TrainConfig
from .data import ConversationSplits, Splits
from .generate import ban, banned_mask, generate_batch
from .hf import init_from
from .loss import group_advantages, policy_loss
from .model import build_model
from .run import init_from_run, is_lmlab_run
from .sample import text_banned

Reward = Callable[[str, str], float]
"""A reward of one's own: (the prompt's text, the completion's text) -> a number."""

EVAL_PROMPTS = 100  # held-out prompts answered at each evaluation, spread over the task's kinds of prompt
EVAL_ROWS = 64  # held-out prompts answered in one batch
LOGGED = 8  # held-out completions written to completions.jsonl at each evaluation
STREAM_CONVERSATIONS = 1000  # training conversations rendered for the run's token stream (passes, inside records)


def check_config(cfg: TrainConfig) -> None:
    """Refuse what --stage rl cannot train, before anything is read."""
    if not cfg.init_from and not cfg.resume:
        raise LmlabError("--stage rl trains a model with rewards: give --init-from RUN (a fine-tuned run for "
                         "synthetic:chat, a pretrained one for patterns)")
    tasks.check_name(cfg.rl.task)
    if cfg.parallel != "none":
        raise LmlabError("--stage rl runs in one process; --parallel ddp|fsdp is not supported for it")


@dataclass
class RlData:
    """What an rl run trains and validates on."""

    task: tasks.Task
    splits: Splits
    chat: Optional[sft.ChatData]
    """synthetic:chat: its conversations (the validation loss is the masked loss of the held-out answers)."""
    val_blocks: Optional[tuple]


def load(cfg: TrainConfig, tokenizer: tok.Tokenizer, say: Callable[[str], None],
         task: Optional[tasks.Task] = None) -> RlData:
    """The task (--task's, or one given from Python) for the base's tokenizer and context, and the run's token
    streams."""
    task = task or tasks.load_task(cfg.rl.task, EVAL_PROMPTS)
    block = cfg.model.block_size
    meta = [{"corpus": task.name, "prompts": len(prompts)} for prompts in (task.train, task.held_out)]
    if task.chat:
        if tokenizer.chat_template is None:
            raise LmlabError(f"--task {task.name} answers conversations, and the base's tokenizer has no chat template: "
                             f"fine-tune it with --stage sft --data synthetic:chat first")
        conversations = ConversationSplits(*([chat.Conversation([*p.messages, {"role": "assistant", "content":
                                                                                 p.answer}], p.group)
                                              for p in prompts] for prompts in (task.train[:STREAM_CONVERSATIONS],
                                                                                task.held_out)), task.name)
        chat_data = sft.load_chat_data(conversations, None, tokenizer, block, say)
        chat_data.tasks = []  # the held-out prompts are answered here, batched (evaluate)
        splits = Splits(chat_data.stream("train"), chat_data.stream("val"), tokenizer, *meta)
        val_blocks = sft.validation_blocks(chat_data.val, block, cfg.eval_tokens, sft.pad_id(tokenizer))
        return RlData(task, splits, chat_data, val_blocks)
    streams = [np.asarray(encode_text(tokenizer, "".join(p.text + p.answer + "\n" for p in prompts)), dtype=np.int64)
               for prompts in (task.train, task.held_out)]
    if len(streams[1]) < 2:
        raise LmlabError(f"--task {task.name} has no held-out prompts to validate on")
    return RlData(task, Splits(*streams, tokenizer, *meta), None, None)


def encode_text(tokenizer: tok.Tokenizer, text: str) -> list[int]:
    try:
        return tokenizer.encode(text)
    except (KeyError, ValueError, LmlabError):
        raise LmlabError(f"the base's {tokenizer.kind} tokenizer cannot encode the task's text (e.g. {text[:40]!r}); "
                         f"use a base trained on text with these characters, or a byte or bpe tokenizer") from None


def weights_digest(weights: dict[str, torch.Tensor]) -> str:
    """The sha256 of a model's weights, names and dtypes: the reference's identity in the checkpoints."""
    digest = hashlib.sha256()
    for name in sorted(weights):
        t = weights[name].detach().cpu().contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------------------------
# A batch of completions and its loss


@dataclass
class Rollout:
    """Completions of a micro-batch: prompt and completion tokens in rows, right-padded, and what scored them."""

    x: torch.Tensor
    """(N, T) input ids: each row its prompt then its completion (N = prompts x group size)."""
    y: torch.Tensor
    """(N, T) x shifted by one."""
    mask: torch.Tensor
    """(N, T) bool: the targets that are completion tokens (the prompt's and the padding are not trained)."""
    rewards: torch.Tensor
    """(P, G) each trained completion's reward, by prompt (row p * G + g of x)."""
    advantages: torch.Tensor
    """(N,) the rewards normalised within their group (loss.group_advantages)."""
    temperature: float
    clip_eps: float
    kl_beta: float
    reference: Optional[torch.nn.Module]
    texts: list[tuple[str, str]]
    """(prompt, completion) of each row, for the logs."""
    tokens: int = 0
    """Prompt and completion tokens of the rows (padding left out)."""
    generation_s: float = 0.0
    scoring_s: float = 0.0
    stats: Optional[dict] = None
    """What the loss measured: kl, entropy, clip_fraction (set by loss)."""
    drawn: Optional[torch.Tensor] = None
    """(P', G) the rewards of every group sampled, kept or not (dynamic sampling, select_groups); None: rewards."""
    drawn_completion_tokens: float = 0.0
    """The mean completion length of every row sampled."""
    banned: Optional[torch.Tensor] = None
    """(V,) bool: the ids never sampled (a plain-text prompt's special tokens): the policy gives them no mass."""

    def token_logprobs(self, model: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """(log-probabilities of every token under the sampling distribution (N, T, V), those of the targets (N, T))."""
        logits = model(self.x)
        if logits.dtype in (torch.float16, torch.bfloat16):  # (float64 stays float64)
            logits = logits.float()
        logp_all = (ban(logits, self.banned) / self.temperature).log_softmax(-1)
        # the targets that are not trained (a prompt's, the padding) may be banned ids, at -inf: 0 there keeps the
        # loss's gradient finite (a NaN in the branch torch.where leaves out still reaches the weights)
        return logp_all, logp_all.gather(-1, self.y[..., None])[..., 0].masked_fill(~self.mask, 0.0)

    def loss(self, model: torch.nn.Module) -> torch.Tensor:
        """The policy loss of the completions under `model` (which may be compiled or wrapped)."""
        logp_all, logp = self.token_logprobs(model)
        ref_logp = None
        if self.reference is not None:
            with torch.no_grad():
                ref_logp = self.token_logprobs(self.reference)[1]
        out = policy_loss(logp, logp.detach(), self.advantages, self.mask, self.clip_eps, ref_logp, self.kl_beta)
        with torch.no_grad():
            entropy = -(logp_all.exp() * logp_all.clamp(min=-1e30)).sum(-1)[self.mask].mean()
        self.stats = {"kl": out.kl, "entropy": float(entropy), "clip_fraction": out.clip_fraction}
        return out.loss


def mixed_groups(rewards: torch.Tensor) -> torch.Tensor:
    """(P,) bool: the groups (rows of rewards (P, G)) whose rewards are not all equal: the ones a step learns from."""
    return (rewards != rewards[:, :1]).any(-1)


def select_groups(rewards: torch.Tensor, count: int) -> list[int]:
    """DAPO's dynamic sampling: the first `count` groups (rows of rewards (P, G)) whose rewards are not all equal,
    in the order drawn; the first group alone when none is (its advantages are 0: the step learns nothing)."""
    mixed = mixed_groups(rewards).nonzero()[:, 0].tolist()
    return mixed[:count] or [0]


def rows_of(prompts: list[list[int]], completions: list[list[int]], pad_id: int) -> tuple[torch.Tensor, ...]:
    """(x, y, mask) of prompt + completion rows, right-padded with pad_id (never attended to: it comes last)."""
    width = max(len(p) + len(c) for p, c in zip(prompts, completions))
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width - 1), dtype=torch.bool)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        ids[i, :len(p) + len(c)] = torch.tensor(p + c, dtype=torch.long)
        mask[i, len(p) - 1:len(p) + len(c) - 1] = True  # target t is token t + 1: the completion's tokens
    return ids[:, :-1], ids[:, 1:], mask


# ---------------------------------------------------------------------------------------------------------------
# Sampling, scoring, evaluating


class RolloutSampler:
    """Each micro-batch of an rl run: batch_size training prompts, group_size completions each, sampled at once."""

    def __init__(self, data: RlData, tokenizer: tok.Tokenizer, cfg: TrainConfig, device: torch.device,
                 reward: Optional[Reward] = None, grad_accum: int = 1):
        self.task, self.tokenizer, self.cfg, self.device = data.task, tokenizer, cfg, device
        self.custom_reward, self.grad_accum = reward, grad_accum
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.stop_ids = tokenizer.stop_ids
        self.stop_strings = () if data.task.chat else ("\n",)
        self.banned = None if data.task.chat else text_banned(tokenizer)  # a text's completion is text
        self.pad_id = sft.pad_id(tokenizer)
        self.encoded: dict[int, list[int]] = {}
        self.policy: Optional[torch.nn.Module] = None
        self.reference: Optional[torch.nn.Module] = None
        self.reference_id: Optional[dict] = None
        self.step_rollouts: list[Rollout] = []
        self._micro = 0

    def bind(self, policy: torch.nn.Module, weights: Optional[dict], say: Callable[[str], None]) -> None:
        """The model to sample from, and the reference: the base's weights (read again from --init-from on resume,
        and only when --kl-beta > 0 needs them), frozen."""
        self.policy = policy
        cfg = self.cfg
        if weights is None and cfg.rl.kl_beta > 0:
            weights = (init_from_run if is_lmlab_run(cfg.init_from) else init_from)(cfg, say)[2]
        if weights is not None:
            self.reference_id = {"init_from": cfg.init_from, "sha256": weights_digest(weights)}
        if cfg.rl.kl_beta > 0:
            reference = build_model(cfg.model, self.tokenizer.vocab_size)
            reference.load_state_dict(weights)
            self.reference = reference.to(self.device).eval().requires_grad_(False)

    def describe(self) -> str:
        rl = self.cfg.rl
        return (f"rewarding --task {self.task.name}{' (a reward function of your own)' if self.custom_reward else ''}"
                f": {len(self.task.train):,} training prompts, {len(self.task.held_out)} held out; "
                f"{self.cfg.batch_size * rl.rl_oversample} prompts x {rl.group_size} completions a micro-step, "
                f"sampled together, at temperature {rl.rl_temperature:g}, up to {rl.rl_max_new_tokens} tokens"
                + (f", the first {self.cfg.batch_size} groups with mixed rewards trained" if rl.rl_oversample > 1
                   else "") + f"; KL weight {rl.kl_beta:g}, clip {rl.clip_eps:g}")

    def check_reference(self, saved: Optional[dict]) -> None:
        """On resume: the reference must be the one the run started from (the checkpoint's identity)."""
        if saved is None:
            return
        if self.reference_id is not None and saved.get("sha256") != self.reference_id["sha256"]:
            raise LmlabError(f"the reference model changed: the weights of --init-from {self.cfg.init_from} are not "
                             f"those this run started from (sha256 {str(saved.get('sha256'))[:12]}...); the KL "
                             f"penalty would be to another model")
        self.reference_id = saved

    def encode(self, index: int, prompts: list[tasks.Prompt]) -> list[int]:
        prompt = prompts[index]
        key = index if prompts is self.task.train else None  # the training prompts come back; keep them
        if key is not None and key in self.encoded:
            return self.encoded[key]
        limit = self.cfg.model.block_size - 1
        if prompt.messages is not None:
            ids = chat.render(self.tokenizer, list(prompt.messages), add_generation_prompt=True,
                              max_tokens=limit).ids.tolist()
        else:
            ids = encode_text(self.tokenizer, prompt.text)[-limit:]
        if key is not None:
            self.encoded[key] = ids
        return ids

    def score(self, prompt: tasks.Prompt, text: str) -> float:
        if self.custom_reward is None:
            return self.task.reward(prompt, text)
        value = self.custom_reward(prompt.text, text)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise LmlabError(f"the reward function returned {value!r} for {prompt.text!r}; it must return a finite "
                             f"number")
        return float(value)

    def complete(self, model: torch.nn.Module, ids: list[list[int]], temperature: float,
                 seeds: Optional[list[int]]) -> tuple[list[list[int]], list[str], list[bool]]:
        """Completions of prompt ids, all rows at once: (tokens, texts without the stop, whether each ended)."""
        budgets = [max(1, min(self.cfg.rl.rl_max_new_tokens, self.cfg.model.block_size - len(p))) for p in ids]
        was_training = model.training
        model.eval()
        with torch.no_grad():
            out = generate_batch(model, ids, budgets, temperature, seeds=seeds, stop_ids=self.stop_ids,
                                 stop_strings=self.stop_strings, tokenizer=self.tokenizer, banned=self.banned)
        model.train(was_training)
        tokens = [c.tokens for c in out]
        texts = []
        for t in tokens:
            text = self.tokenizer.decode(t[:-1] if t and t[-1] in self.stop_ids else t)
            texts.append(text.split("\n", 1)[0] if self.stop_strings else text)
        return tokens, texts, [c.finish_reason == "stop" for c in out]

    def next(self) -> Rollout:
        """The next micro-batch: completions sampled from the current policy and scored, and the groups kept."""
        if self._micro == 0:
            self.step_rollouts = []
        self._micro = (self._micro + 1) % self.grad_accum
        rl = self.cfg.rl
        group, count = rl.group_size, self.cfg.batch_size
        drawn = count * rl.rl_oversample
        chosen = torch.randint(len(self.task.train), (drawn,), generator=self.generator).tolist()
        seeds = torch.randint(2 ** 62, (drawn * group,), generator=self.generator).tolist()
        prompts = [self.task.train[i] for i in chosen for _ in range(group)]
        ids = [self.encode(i, self.task.train) for i in chosen for _ in range(group)]
        t0 = time.perf_counter()
        tokens, texts, _ = self.complete(self.policy, ids, rl.rl_temperature, seeds)
        t1 = time.perf_counter()
        rewards = torch.tensor([self.score(p, text) for p, text in zip(prompts, texts)]).view(drawn, group)
        t2 = time.perf_counter()
        kept = select_groups(rewards, count) if rl.rl_oversample > 1 else list(range(drawn))
        rows = [k * group + g for k in kept for g in range(group)]
        lengths = sum(len(t) for t in tokens) / len(tokens)
        ids, tokens, prompts, texts = ([seq[r] for r in rows] for seq in (ids, tokens, prompts, texts))
        x, y, mask = rows_of(ids, tokens, self.pad_id)
        if self.device.type != "cpu":
            x, y, mask = x.to(self.device), y.to(self.device), mask.to(self.device)
        advantages = group_advantages(rewards[kept]).reshape(-1).to(self.device)
        rollout = Rollout(x, y, mask, rewards[kept], advantages, rl.rl_temperature, rl.clip_eps, rl.kl_beta,
                          self.reference, [(p.text, text) for p, text in zip(prompts, texts)],
                          sum(len(p) + len(t) for p, t in zip(ids, tokens)), t1 - t0, t2 - t1, drawn=rewards,
                          drawn_completion_tokens=lengths, banned=banned_mask(self.policy, self.banned, x.device))
        self.step_rollouts.append(rollout)
        return rollout

    def step_tokens(self) -> int:
        """The tokens the last step trained on: every prompt and completion token of its rows."""
        return sum(r.tokens for r in self.step_rollouts)

    def step_record(self, seconds: float) -> dict:
        """The last step's figures for its metrics.jsonl record."""
        done = self.step_rollouts
        rewards = torch.cat([r.rewards if r.drawn is None else r.drawn for r in done])  # (P, G): every group drawn
        stats = [r.stats or {} for r in done]
        mean = lambda key: sum(s.get(key, 0.0) for s in stats) / max(1, len(stats))  # noqa: E731
        generation, scoring = sum(r.generation_s for r in done), sum(r.scoring_s for r in done)
        mixed = mixed_groups(rewards)
        record = {"reward": float(rewards.mean()), "pass_at_1": float((rewards > 0).float().mean()),
                  "pass_at_g": float((rewards > 0).any(-1).float().mean()),
                  "mixed_fraction": float(mixed.float().mean()),
                  "kept_fraction": sum(len(r.rewards) for r in done) / len(rewards),
                  "completion_tokens": sum(r.drawn_completion_tokens for r in done) / len(done),
                  "entropy": mean("entropy"), "clip_fraction": mean("clip_fraction"),
                  "generation_s": round(generation, 4), "scoring_s": round(scoring, 4),
                  "update_s": round(max(0.0, seconds - generation - scoring), 4)}
        if self.reference is not None:
            record["kl"] = mean("kl")
        return record

    def evaluate(self, model: torch.nn.Module, run_dir: Path, step: int) -> dict:
        """Greedy completions of the held-out prompts: their mean reward and pass@1 (the share rewarded above 0),
        exact match by skill (the verifier's) and the share of ended turns for conversations; the first LOGGED
        with their rewards, and the last step's first group, appended to completions.jsonl."""
        held = self.task.held_out
        rewards, right, ended, logged = [], {}, [], []
        for start in range(0, len(held), EVAL_ROWS):
            prompts = held[start:start + EVAL_ROWS]
            ids = [self.encode(start + i, held) for i in range(len(prompts))]
            _, texts, stopped = self.complete(model, ids, 0.0, None)
            for p, text, stop in zip(prompts, texts, stopped):
                rewards.append(self.score(p, text))
                right.setdefault(p.group, []).append(self.task.reward(p, text) > 0)
                ended.append(stop)
                if len(logged) < LOGGED:
                    logged.append({"prompt": p.text, "completion": text, "reward": rewards[-1]})
        record = {"heldout_reward": sum(rewards) / max(1, len(rewards)),
                  "heldout_pass_at_1": sum(r > 0 for r in rewards) / max(1, len(rewards))}
        if self.task.chat:
            record["exact_match"] = {k: sum(v) / len(v) for k, v in sorted(right.items())}
            record["ended_turn"] = sum(ended) / max(1, len(ended))
        group = self.cfg.rl.group_size
        last = self.step_rollouts[0] if self.step_rollouts else None
        train = [] if last is None else [{"prompt": p, "completion": c, "reward": float(r)} for (p, c), r in
                                         zip(last.texts[:group], last.rewards.reshape(-1)[:group].tolist())]
        rundir.append_jsonl(run_dir, rundir.COMPLETIONS, {"step": step, "held_out": logged, "train": train})
        return record

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.generator.set_state(state["generator"])
        self._micro = 0  # checkpoints are taken between optimizer steps
