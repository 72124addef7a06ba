"""`lmlab experiment truth`: what a reward changes. The `patterns` setup (statements whose false answer is 1, 3 or 9
times as frequent in the text as the true one) pretrained once, then the same number of optimizer steps given to
four treatments of that model: more next-token training on the text, SFT on answers drawn from the text's own
frequencies, DPO preferring the true answer, and RL with the verifier as the reward."""

from __future__ import annotations

import dataclasses
import json
import math
import random
import time
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from ..common import LmlabError, atomic_write_bytes
from .. import tasks
from ..config import RlConfig, TrainConfig
from ..data import DataConfig, encode_text
from ..optim import OptimConfig
from ..report.chart import color, figure, finish
from ..report.page import table_html
from ..run import load_run
from .base import TITLE_SIZE, Budget, Context, Experiment, run_training, train_config, verdict
from .patterns import (COPIES, PATTERNS_BUDGET, PATTERNS_OPTIM, RATIOS, Fact, completion_probability, make_facts,
                       ordinary_text, patterns_corpus)

TREATMENTS = ("next_token", "sft", "dpo", "rl")
PRETRAIN_STEPS = {False: 400, True: 12}  # where the patterns experiment's statements' loss stops falling
TREATMENT_STEPS = {False: 100, True: 4}  # every treatment's optimizer steps
FACTS_PER_GROUP = {False: 8, True: 2}  # statements per ratio (and controls); half trained, half held out
KL_CHARS = {False: 20_000, True: 2_000}  # ordinary text after the corpus's: where the KL from the pretrained is measured
# every treatment's optimizer: the pretraining one (Muon for the hidden matrices, AdamW for the rest, constant after
# a short warmup) at DPO's measured learning rates (config.DPO_DEFAULTS), so that the treatments differ only in what
# they train on and how it is scored
TREATMENT_LRS = {"lr": 1e-3, "muon_lr": 0.002}
GROUP_SIZE = {False: 8, True: 2}  # RL: completions sampled per prompt
RL_TOKENS = 6  # RL: at most this many tokens a completion (an answer and its full stop are at most 3)
TRUE_ENOUGH, STILL_FALSE = 0.9, 0.2  # the claims' thresholds on p_true at the largest ratio


def split_facts(facts: list[Fact]) -> dict[str, list[Fact]]:
    """The statements split once: in each group (ratio or control) the first half is trained, the rest held out."""
    out: dict[str, list[Fact]] = {"trained": [], "held_out": []}
    for ratio in (*RATIOS, 0):
        group = [f for f in facts if f.ratio == ratio]
        out["trained"] += group[: (len(group) + 1) // 2]
        out["held_out"] += group[(len(group) + 1) // 2:]
    return out


def sampled_answers(facts: list[Fact], copies: int, seed: int) -> list[tuple[Fact, str]]:
    """`copies` answers for each statement drawn from the text's own frequencies: at false : true = r : 1 the false
    answer with probability r / (r + 1); a control's answer is always the true one."""
    rng = random.Random(seed)
    return [(f, f.false if rng.random() < f.ratio / (f.ratio + 1) else f.true) for f in facts for _ in range(copies)]


def jsonl(rows: list[dict]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode("utf-8")


def prompt_of(f: Fact) -> str:
    """What every treatment continues: a new line, then "A plus B is " (the context the probabilities are measured
    in, as a statement starts a line of the text)."""
    return "\n" + f.prompt


@torch.no_grad()
def mean_kl(before: torch.nn.Module, after: torch.nn.Module, ids: list[int], block: int) -> float:
    """Mean per-token KL(before || after) of the next-token distributions over consecutive windows of `ids`."""
    total, count = 0.0, 0
    for start in range(0, max(1, len(ids) - 1), block):
        x = torch.tensor([ids[start:start + block]])
        logp, logq = before(x).double().log_softmax(-1), after(x).double().log_softmax(-1)  # (1, T, V)
        total += float((logp.exp() * (logp - logq)).sum())
        count += x.shape[1]
    return total / max(count, 1)


def measure(model: torch.nn.Module, tokenizer, facts: list[Fact]) -> list[dict]:
    """Mean p_true and p_frequent (the false answer at every ratio: as frequent as the true one at 1:1) per ratio."""
    rows = []
    for r in RATIOS:
        group = [f for f in facts if f.ratio == r]
        p_true = [completion_probability(model, tokenizer, f.prompt, f.true) for f in group]
        p_false = [completion_probability(model, tokenizer, f.prompt, f.false) for f in group]
        rows.append({"ratio": r, "p_true": float(np.mean(p_true)), "p_frequent": float(np.mean(p_false))})
    return rows


def held_out_text(ordinary: str, used: int, tokenizer, chars: int) -> str:
    """About `chars` characters of the ordinary text's lines after the first `used` (those patterns_corpus put in the
    corpus: its non-blank lines, in order), in characters the tokenizer knows; the last used ones when nothing follows
    them (a short --data)."""
    lines = [line for line in ordinary.splitlines() if line.strip()]
    rest = [line for line in lines[used:] if encodes(tokenizer, line)] or lines[:used][-8:]
    return "\n".join(rest)[:chars]


def encodes(tokenizer, text: str) -> bool:
    try:
        tokenizer.encode(text)
        return True
    except LmlabError:  # a character a char tokenizer has not seen
        return False


def treatment_config(ctx: Context, budget: Budget, name: str, data: DataConfig, steps: int) -> TrainConfig:
    optim = OptimConfig(**{**PATTERNS_OPTIM, **TREATMENT_LRS, "warmup": max(1, steps // 10)})
    cfg = train_config(ctx, dataclasses.replace(budget, eval_interval=steps), name, optim, data=data, steps=steps)
    cfg = dataclasses.replace(cfg, stage="pretrain" if name == "next_token" else name,
                              init_from=str(ctx.run_dir("pretrained")))
    if name == "rl":  # plain-text completions end at a new line; answers are at most 3 characters; every group is
        # trained (no dynamic sampling), so that each treatment's step is the same batch of prompts
        cfg = dataclasses.replace(cfg, rl=RlConfig(task="patterns", group_size=GROUP_SIZE[ctx.cfg.quick],
                                                   rl_max_new_tokens=RL_TOKENS, kl_beta=0.0, rl_oversample=1))
    return cfg


@dataclass
class Statements(tasks.Task):
    """The RL treatment's task: the trained statements as prompts (the held-out ones to validate on), a completion
    rewarded 1 when it starts with the true answer, else 0: the patterns verifier, on this experiment's prompts."""

    def reward(self, prompt: tasks.Prompt, completion: str) -> float:
        return float(completion.startswith(prompt.answer))


def statements_task(halves: dict[str, list[Fact]]) -> Statements:
    return Statements("truth statements", *([tasks.Prompt(prompt_of(f), f.true, "patterns") for f in halves[split]]
                                            for split in ("trained", "held_out")))


def experiment_truth(ctx: Context) -> dict:
    quick, seed = ctx.cfg.quick, ctx.cfg.seed
    budget = dataclasses.replace(PATTERNS_BUDGET[quick], steps=PRETRAIN_STEPS[quick])
    facts = make_facts(seed, FACTS_PER_GROUP[quick])
    halves = split_facts(facts)
    statement_chars = sum((len(f.prompt) + len(f.true) + 1) * COPIES for f in facts)
    ordinary = ordinary_text(ctx.cfg.data, 3 * statement_chars + KL_CHARS[quick])
    train_text, statements = patterns_corpus(facts, ordinary[:3 * statement_chars], seed)
    files = {"corpus.txt": train_text, "statements.txt": statements}
    for split, group in (("train", halves["trained"]), ("val", halves["held_out"])):
        files[f"sft_{split}.jsonl"] = jsonl([{"prompt": prompt_of(f), "completion": a}
                                             for f, a in sampled_answers(group, COPIES, seed)])
        files[f"dpo_{split}.jsonl"] = jsonl([{"prompt": prompt_of(f), "chosen": f.true, "rejected": f.false}
                                             for f in group])
    for name, text in files.items():
        atomic_write_bytes(ctx.out / name, text if isinstance(text, bytes) else text.encode("utf-8"))
    text_data = DataConfig(data=str(ctx.out / "corpus.txt"), tokenizer="char", val_data=str(ctx.out / "statements.txt"))
    seconds = {}
    started = time.perf_counter()
    ctx.say(f"truth: pretraining {budget.steps} steps on the patterns text")
    optim = OptimConfig(warmup=max(1, budget.eval_interval // 2), **PATTERNS_OPTIM)
    run_training(ctx, train_config(ctx, dataclasses.replace(budget, eval_interval=budget.steps), "pretrained", optim,
                                   data=text_data))  # evaluated at the end only: its best checkpoint is its last
    seconds["pretrain"] = round(time.perf_counter() - started, 1)
    base = load_run(ctx.run_dir("pretrained"), ctx.cfg.device)
    tokenizer = base.tokenizer
    used = train_text.count("\n") - statements.count("\n")  # the corpus's lines of ordinary text
    kl_ids = encode_text(tokenizer, held_out_text(ordinary, used, tokenizer, KL_CHARS[quick])).tolist()
    steps = TREATMENT_STEPS[quick]
    datas = {"next_token": text_data,
             "sft": DataConfig(data=str(ctx.out / "sft_train.jsonl"), val_data=str(ctx.out / "sft_val.jsonl")),
             "dpo": DataConfig(data=str(ctx.out / "dpo_train.jsonl"), val_data=str(ctx.out / "dpo_val.jsonl"))}
    rows, kl = [], []
    for name in TREATMENTS:
        ctx.say(f"truth: {name}, {steps} steps from the pretrained model")
        started = time.perf_counter()
        cfg = treatment_config(ctx, budget, name, datas.get(name, text_data), steps)
        run_training(ctx, cfg, task=statements_task(halves) if name == "rl" else None)
        seconds[name] = round(time.perf_counter() - started, 1)
        treated = load_run(ctx.run_dir(name), ctx.cfg.device, which="last")
        for split, group in halves.items():
            rows += [{"name": name, "split": split, **r} for r in measure(treated.model, tokenizer, group)]
        kl.append({"name": name, "kl": mean_kl(base.model, treated.model, kl_ids, budget.block_size)})
    return {"treatments": rows, "before": measure(base.model, tokenizer, facts),
            "kl": kl, "steps": {"pretrain": budget.steps, "treatment": steps}, "seconds": seconds}


# ---------------------------------------------------------------------------------------------------------------
# What the measurements say


def cell(result: dict, name: str, ratio: int, split: str = "trained") -> Optional[dict]:
    return next((r for r in result["treatments"] if (r["name"], r["ratio"], r["split"]) == (name, ratio, split)), None)


def names(result: dict) -> list[str]:
    """The treatments measured, in TREATMENTS' order."""
    return [n for n in TREATMENTS if any(r["name"] == n for r in result["treatments"])]


def before(result: dict, ratio: int) -> dict:
    return next(r for r in result["before"] if r["ratio"] == ratio)


def truth_claims(result: dict) -> dict:
    top = max(RATIOS)
    p = {n: cell(result, n, top)["p_true"] for n in names(result)}
    start = before(result, top)
    claims = {"pretrained_model_prefers_the_frequent_false_answer": start["p_frequent"] > start["p_true"]}
    imitation = [n for n in ("next_token", "sft") if n in p]
    if imitation:
        claims["imitation_keeps_the_false_answer"] = all(p[n] < STILL_FALSE for n in imitation)
    if "dpo" in p:
        claims["dpo_raises_p_true"] = p["dpo"] > start["p_true"]
    if "rl" in p:
        claims["rl_makes_the_trained_statements_true"] = p["rl"] >= TRUE_ENOUGH
    return claims


def truth_conclusion(result: dict) -> str:
    top, claims = max(RATIOS), truth_claims(result)
    start, done = before(result, top), names(result)
    labels = {"next_token": "more next-token training on the text", "sft": "SFT on answers drawn from the text's "
              "frequencies", "dpo": "DPO preferring the true answer", "rl": "RL with the verifier as the reward"}
    steps = result["steps"]
    parts = [f"Pretrained for {steps['pretrain']} steps on text where a false sum is {top} times as frequent as the "
             f"true one, the model gives the true sum p = {start['p_true']:.2f} and the false one "
             f"{start['p_frequent']:.2f}."]
    parts.append(f"After {steps['treatment']} more optimizer steps each, on the trained statements at {top}:1 p(true) "
                 f"was " + "; ".join(f"{labels[n]} {cell(result, n, top)['p_true']:.2f}" for n in done) + ".")
    gains = {n: (cell(result, n, top)["p_true"] - start["p_true"],
                 cell(result, n, top, "held_out")["p_true"] - start["p_true"]) for n in done}
    parts.append(f"On the held-out statements, in the pretraining text at the same ratios but seen by no treatment, "
                 f"p(true) at {top}:1 moved " + ", ".join(f"{n} {h:+.2f} (trained {g:+.2f})"
                                                           for n, (g, h) in gains.items()) + ".")
    most = max(done, key=lambda n: gains[n][0])
    gain, held = gains[most]
    parts.append(f"What moved p(true) most, {most}, " + ("carried over to the held-out statements" if held >= gain / 2
                 else "stayed with the statements it trained on: it taught those answers, not the sums") + ".")
    lost = [n for n in done if sum(cell(result, n, top, "held_out")[k] for k in ("p_true", "p_frequent")) < 0.5]
    if lost:
        parts.append(f"On the held-out statements at {top}:1, {', '.join(lost)} left less than half the probability "
                     f"on their two answers together (p(true) + p(frequent): " + ", ".join(
                         f"{sum(cell(result, n, top, 'held_out')[k] for k in ('p_true', 'p_frequent')):.2f}"
                         for n in lost) + "), against "
                     f"{start['p_true'] + start['p_frequent']:.2f} before: what it did to the statements it trained "
                     f"on disturbed those it did not.")
    kl = {k["name"]: k["kl"] for k in result["kl"]}
    if kl:
        parts.append("On held-out ordinary text the treated models moved from the pretrained one by a mean KL of "
                     + ", ".join(f"{kl[n]:.4f} ({n})" for n in sorted(kl, key=kl.get)) + " nats per token"
                     + (f"; {most} {'less' if kl[most] < kl['next_token'] else 'more'} than more next-token training "
                        f"on the text itself" if most in kl and "next_token" in kl and most != "next_token" else "")
                     + ".")
    if "rl" not in done:
        parts.append("(RL was not run: this tree has no --stage rl.)")
    parts.append(verdict(claims, "Imitating the text, by more next-token training or by fine-tuning on its answers, "
                                 "keeps the frequent answer; rewarding the true one moves the model to it."))
    return " ".join(parts)


def truth_table(result: dict) -> tuple[list[str], list[list[str]]]:
    kl = {k["name"]: k["kl"] for k in result["kl"]}
    rows = [["pretrained", "all", *(f"{before(result, r)['p_true']:.3f}" for r in RATIOS),
             f"{before(result, max(RATIOS))['p_frequent']:.3f}", "0"]]
    for n in names(result):
        for split in ("trained", "held_out"):
            rows.append([n, split, *(f"{cell(result, n, r, split)['p_true']:.3f}" for r in RATIOS),
                         f"{cell(result, n, max(RATIOS), split)['p_frequent']:.3f}", f"{kl.get(n, math.nan):.4f}"])
    return (["model", "statements", *(f"p(true) {r}:1" for r in RATIOS), f"p(frequent) {max(RATIOS)}:1",
             "KL on ordinary text"], rows)


def truth_charts(result: dict) -> list[tuple[str, object, str]]:
    charts = []
    done = names(result)
    for split, words in (("trained", "the trained statements"), ("held_out", "the held-out statements")):
        fig, ax = figure(f"p(true answer) on {words}", "false : true in the pretraining text", "p(true answer)",
                         title_size=TITLE_SIZE)
        width = 0.8 / (len(done) + 1)
        xs = np.arange(len(RATIOS))
        ax.bar(xs, [before(result, r)["p_true"] for r in RATIOS], width, color="#999", label="pretrained")
        for i, n in enumerate(done, 1):
            ax.bar(xs + i * width, [cell(result, n, r, split)["p_true"] for r in RATIOS], width,
                   color=color(TREATMENTS.index(n)), label=n)
        ax.set_xticks(xs + width * len(done) / 2, [f"{r}:1" for r in RATIOS])
        ax.set_ylim(0, 1.25)
        ax.legend(fontsize=8, loc="upper center", ncol=len(done) + 1)
        charts.append((f"truth_{split}.png", finish(fig), f"p(true) on {words}"))
    fig, ax = figure("how far each treatment moved the model on ordinary text", "treatment",
                     "mean KL(pretrained || treated), nats/token", title_size=TITLE_SIZE)
    ax.bar([k["name"] for k in result["kl"]], [k["kl"] for k in result["kl"]],
           color=[color(TREATMENTS.index(k["name"])) for k in result["kl"]])
    charts.append(("truth_kl.png", finish(fig), "KL from the pretrained model on held-out ordinary text"))
    return charts


def truth_examples(result: dict) -> str:
    rows = [[f"{r}:1", n, *(f"{cell(result, n, r, s)['p_frequent']:.3f}" for s in ("trained", "held_out"))]
            for r in RATIOS for n in names(result)]
    return table_html(["false : true", "treatment", "p(frequent) trained", "p(frequent) held out"], rows)


EXPERIMENT = Experiment(experiment_truth, truth_claims, truth_conclusion, truth_table, truth_charts,
                        "What a reward changes",
                        "The patterns model, whose text makes a false sum more frequent than the true one, given "
                        "the same number of optimizer steps four ways: more next-token training on the text, SFT on "
                        "answers drawn from the text's frequencies, DPO preferring the true answer, and RL with a "
                        "verifier as the reward.", examples=truth_examples)
