"""`lmlab experiment patterns`: next-token prediction rewards the patterns of the text, not truth. Arithmetic
statements whose false answer is more frequent in the corpus than the true one, mixed with ordinary text."""

from __future__ import annotations

import dataclasses
import math
import random
from dataclasses import dataclass

import numpy as np
import torch

from ..run import load_run
from ..common import atomic_write_bytes
from ..data import DataConfig, encode_text, iter_text, resolve_source
from ..evaluate import stream_losses
from ..optim import OptimConfig
from ..report.chart import color, figure, finish
from ..report.page import table_html
from .base import (TITLE_SIZE, Budget, Context, Experiment, finite, nan, read_metrics, run_training, train_config,
                   verdict)

PATTERNS_BUDGET = {False: Budget(n_layer=2, n_head=4, n_embd=96, block_size=64, batch_size=32, steps=800,
                                 eval_interval=100, eval_tokens=0),
                   True: Budget(n_layer=1, n_head=2, n_embd=32, block_size=32, batch_size=8, steps=12,
                                eval_interval=6, eval_tokens=0)}
PATTERNS_OPTIM = dict(optimizer="muon", lr=0.01, muon_lr=0.02, muon_momentum=0.9, weight_decay=0.0,
                      schedule="constant", grad_clip=1.0)
RATIOS = (1, 3, 9)  # false : true in the corpus
COPIES = 20  # occurrences of every statement in the corpus, split between its completions by the ratio
FACTS_PER_GROUP = {False: 8, True: 2}
PLATEAU = 0.01  # the statements' loss "stops falling" when a chunk of training lowers it by less than 1%
OFFSETS = (-10, -2, -1, 1, 2, 10)  # a false answer: the true sum moved by one of these


@dataclass
class Fact:
    prompt: str
    true: str
    false: str
    ratio: int
    """false : true occurrences in the corpus; 0 for the control (true only)."""

    @property
    def counts(self) -> tuple[int, int]:
        """(true, false) occurrences in the corpus."""
        if self.ratio == 0:
            return COPIES, 0
        true = COPIES // (self.ratio + 1)
        return true, COPIES - true


def make_facts(seed: int, per_group: int) -> list[Fact]:
    """Statements 'A plus B is C.' with distinct (A, B): per_group for each ratio, then per_group for the control."""
    rng = random.Random(seed)
    pairs = rng.sample([(a, b) for a in range(2, 50) for b in range(a + 1, 50)], per_group * (len(RATIOS) + 1))
    facts = []
    for i, (a, b) in enumerate(pairs):
        false = a + b + rng.choice([o for o in OFFSETS if a + b + o > 0])
        facts.append(Fact(f"{a} plus {b} is ", f"{a + b}.", f"{false}.", (*RATIOS, 0)[i // per_group]))
    return facts


def patterns_corpus(facts: list[Fact], ordinary: str, seed: int) -> tuple[str, str]:
    """The training text: every statement line as often as its counts say, in random order, put between the lines of
    as many characters of ordinary text (whole lines, in their order) at random places; and the statements alone, in
    another order: the text their loss is measured on."""
    rng = random.Random(seed)
    statements = [f.prompt + c for f in facts for c, n in zip((f.true, f.false), f.counts) for _ in range(n)]
    size = sum(len(s) + 1 for s in statements)
    lines, total = [], 0
    for line in ordinary.splitlines():
        if line.strip():
            lines.append(line)
            total += len(line) + 1
        if total >= size:
            break
    rng.shuffle(statements)
    slots = [True] * len(statements) + [False] * len(lines)  # True: the next statement; False: the next line of text
    rng.shuffle(slots)
    pending_statements, pending_lines = iter(statements), iter(lines)
    mixed = [next(pending_statements) if s else next(pending_lines) for s in slots]
    alone = list(statements)
    rng.shuffle(alone)
    return "\n".join(mixed) + "\n", "\n".join(alone) + "\n"


def ordinary_text(source: str, chars: int) -> str:
    """The first `chars` characters (about) of a corpus."""
    pieces, total = [], 0
    for piece in iter_text(resolve_source(source)):
        pieces.append(piece)
        total += len(piece)
        if total >= chars:
            break
    return "".join(pieces)[:chars]


def completion_probability(model: torch.nn.Module, tokenizer, prompt: str, completion: str) -> float:
    """p(completion | a new line, then prompt): the product of the model's next-token probabilities."""
    context = encode_text(tokenizer, "\n" + prompt)
    ids = encode_text(tokenizer, "\n" + prompt + completion)
    nats = stream_losses(model, ids, model.cfg.block_size, batch_size=1).nats
    return math.exp(-float(nats[len(context) - 1:].double().sum()))


def experiment_patterns(ctx: Context) -> dict:
    quick = ctx.cfg.quick
    budget = PATTERNS_BUDGET[quick]
    facts = make_facts(ctx.cfg.seed, FACTS_PER_GROUP[quick])
    statement_chars = sum((len(f.prompt) + len(f.true) + 1) * COPIES for f in facts)
    train_text, statements = patterns_corpus(facts, ordinary_text(ctx.cfg.data, 3 * statement_chars), ctx.cfg.seed)
    atomic_write_bytes(ctx.out / "corpus.txt", train_text.encode("utf-8"))
    atomic_write_bytes(ctx.out / "statements.txt", statements.encode("utf-8"))
    data = DataConfig(data=str(ctx.out / "corpus.txt"), tokenizer="char", val_data=str(ctx.out / "statements.txt"))
    optim = OptimConfig(warmup=max(1, budget.eval_interval // 2), **PATTERNS_OPTIM)
    done, plateaued, losses = 0, False, []
    while done < budget.steps and not plateaued:
        done = min(done + budget.eval_interval, budget.steps)
        ctx.say(f"patterns: training to step {done} (at most {budget.steps}, until the statements' loss stops "
                f"falling)")
        run_training(ctx, train_config(ctx, budget, "patterns", optim, data=data, steps=done, resume=done > budget.eval_interval))
        losses = read_metrics(ctx.run_dir("patterns"))[1]
        if len(losses) >= 3:  # step 0, then one per chunk: compare the last two chunks
            before, now = losses[-2].val_loss, losses[-1].val_loss
            plateaued = before - now < PLATEAU * before
    run = load_run(ctx.run_dir("patterns"), ctx.cfg.device)
    scored = []
    for f in facts:
        scored.append({"statement": f.prompt.strip(), "true": f.true, "false": f.false, "ratio": f.ratio,
                       "counts": {"true": f.counts[0], "false": f.counts[1]},
                       "p_true": completion_probability(run.model, run.tokenizer, f.prompt, f.true),
                       "p_false": completion_probability(run.model, run.tokenizer, f.prompt, f.false)})
    ratios = []
    for r in RATIOS:
        group = [s for s in scored if s["ratio"] == r]
        ratios.append({"corpus_ratio": r, "frequent_share": r / (r + 1),
                       "p_frequent": float(np.mean([s["p_false"] for s in group])),
                       "p_true": float(np.mean([s["p_true"] for s in group])), "facts": group})
    control = [s for s in scored if s["ratio"] == 0]
    return {"ratios": ratios,
            "control": {"p_true": float(np.mean([s["p_true"] for s in control])),
                        "p_false": float(np.mean([s["p_false"] for s in control])), "facts": control},
            "training": {"steps": done, "plateaued": plateaued, "step": [r.step for r in losses],
                         "statements_loss": [finite(r.val_loss) for r in losses]},
            "corpus": {"characters": len(train_text), "statement_lines": statements.count("\n"),
                       "copies_per_statement": COPIES, "facts_per_group": FACTS_PER_GROUP[quick]},
            "settings": {"budget": dataclasses.asdict(budget), "optimizer": {**PATTERNS_OPTIM, "warmup": optim.warmup},
                         "plateau": PLATEAU}}


def patterns_claims(result: dict) -> dict:
    rows = sorted(result["ratios"], key=lambda r: r["corpus_ratio"])
    p_freq = [r["p_frequent"] for r in rows]
    return {
        "p_frequent_grows_with_ratio": all(b > a for a, b in zip(p_freq, p_freq[1:])),
        "frequent_beats_true_at_largest_ratio": rows[-1]["p_frequent"] > rows[-1]["p_true"],
        "control_true_beats_outnumbered_true": result["control"]["p_true"] > rows[-1]["p_true"],
    }


def patterns_conclusion(result: dict) -> str:
    rows = sorted(result["ratios"], key=lambda r: r["corpus_ratio"])
    claims = patterns_claims(result)
    share = " to ".join(f"{r['frequent_share']:.0%}" for r in rows)
    p_freq = ", ".join(f"{r['p_frequent']:.2f}" for r in rows)
    p_true = ", ".join(f"{r['p_true']:.2f}" for r in rows)
    model_share = ", ".join(f"{r['p_frequent'] / max(r['p_frequent'] + r['p_true'], 1e-30):.0%}" for r in rows)
    last = rows[-1]
    odds = last["p_frequent"] / max(last["p_true"], 1e-30)
    training = result["training"]
    parts = [f"As the false answer's share of a statement's occurrences went from {share}, the model's probability "
             f"of it went {p_freq} ({'rising each time' if claims['p_frequent_grows_with_ratio'] else 'not rising each time'}; "
             f"its share of the two answers' probability: {model_share}), and the true answer's went {p_true}."]
    parts.append(f"At {last['corpus_ratio']}:1 the model {'prefers' if odds > 1 else 'does not prefer'} the false "
                 f"statement, {odds:.1f} to 1. Statements it only ever saw true get p(true) "
                 f"{result['control']['p_true']:.2f}.")
    parts.append(f"(Trained {training['steps']} steps; the statements' loss "
                 f"{'had stopped falling' if training['plateaued'] else 'was still falling when the budget ended'}.)")
    parts.append(verdict(claims, "The model's confidence tracks how often a completion appears in its text, not "
                                 "whether it is true: fluent, confident output is no evidence of truth."))
    return " ".join(parts)


def patterns_table(result: dict) -> tuple[list[str], list[list[str]]]:
    rows = [[f"{r['corpus_ratio']}:1", f"{r['frequent_share']:.0%}", f"{r['p_frequent']:.3f}", f"{r['p_true']:.3f}"]
            for r in result["ratios"]]
    rows.append(["control (true only)", "0%", f"{result['control']['p_false']:.3f}", f"{result['control']['p_true']:.3f}"])
    return ["false : true in the corpus", "false answer's share", "p(false answer)", "p(true answer)"], rows


def patterns_charts(result: dict) -> list[tuple[str, object, str]]:
    rows = sorted(result["ratios"], key=lambda r: r["corpus_ratio"])
    xs = [r["corpus_ratio"] for r in rows]
    fig1, ax = figure("the model's probability of each answer against its corpus ratio",
                      "false : true in the corpus", "probability", title_size=TITLE_SIZE)
    ax.plot(xs, [r["p_frequent"] for r in rows], "o-", color=color(1), label="p(frequent, false answer)")
    ax.plot(xs, [r["p_true"] for r in rows], "o-", color=color(2), label="p(true answer)")
    ax.plot(xs, [r["frequent_share"] for r in rows], ":", color=color(1), label="false answer's corpus share")
    ax.plot(xs, [1 - r["frequent_share"] for r in rows], ":", color=color(2), label="true answer's corpus share")
    ax.axhline(result["control"]["p_true"], color="#444", ls="--", lw=1, label="p(true), statements seen only true")
    ax.set_xscale("log")
    ax.set_ylim(0, 1.05)
    finish(fig1)
    ax.set_xticks(xs, [f"{x}:1" for x in xs])
    ax.set_xticks([], minor=True)
    training = result["training"]
    fig2, ax = figure("loss on the statements while training", "step", "loss (nats/token)", title_size=TITLE_SIZE)
    ax.plot(training["step"], nan(training["statements_loss"]), "o-", color=color(0), label="statements")
    return [("patterns_probability.png", fig1, "p(false) and p(true) against the corpus ratio"),
            ("patterns_statements_loss.png", finish(fig2), "the statements' loss against steps")]


def patterns_examples(result: dict) -> str:
    rows = []
    for group in [*result["ratios"], {"corpus_ratio": 0, "facts": result["control"]["facts"]}]:
        for s in group["facts"][:3]:
            rows.append([s["statement"], s["true"], s["false"], f"{s['counts']['true']} : {s['counts']['false']}",
                         f"{s['p_true']:.3f}", f"{s['p_false']:.3f}"])
    return table_html(["statement", "true", "false", "true : false in the corpus", "p(true)", "p(false)"], rows)


EXPERIMENT = Experiment(experiment_patterns, patterns_claims, patterns_conclusion, patterns_table, patterns_charts,
                        "Frequency, not truth",
                        "Next-token prediction rewards matching the patterns of the text: arithmetic statements "
                        "whose false answer appears more often than the true one, mixed with ordinary text.",
                        examples=patterns_examples)
