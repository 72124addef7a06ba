"""Inside the model, as training recorded it (inside.jsonl): head scores over steps, the loss on a repeated random
sequence, the loss by position in the window, every head's attention and the logit lens; a section of the report,
and a page of its own (`lmlab inside RUN --out OUT`)."""

from __future__ import annotations

import html
import math
from pathlib import Path
from typing import Optional

from matplotlib import colormaps
from matplotlib.figure import Figure

from ..common import LmlabError
from ..inside import SCORES, head_rows
from ..tokenizer import visible
from .chart import canvas, color, figure, finish, finite_points, plain_text
from .logs import RunLogs, load_run_logs
from .page import Images, fmt, none, page, section, slug, top_cell, write_shared

SCORE_TITLES = {"previous_token": "previous-token score (t -> t-1)", "induction": "induction score (L+i -> i+1)",
                "duplicate_token": "duplicate-token score (L+i -> i)"}
HEAD_STYLES = ["-", "--", ":", "-."]
MAX_DRAWN = 256  # positions of a heatmap drawn at most (training records 32; a run from elsewhere may hold anything)
MAX_GRID = 8  # layers, and heads, of attention heatmaps drawn at most: 64 panels, a figure of at most 21 x 21 inches
MAX_LINES = 64  # heads drawn at most in the head-score chart (the table lists every one)


def head_score_figure(run: RunLogs) -> Figure:
    """Each head's three scores against steps: a panel per score, a line per head (colour: layer, dash: head)."""
    fig = canvas(12.8, 3.6)
    axes = fig.subplots(1, len(SCORES), sharey=True)
    by_head: dict[tuple[int, int], list[dict]] = {}
    for r in head_rows(run.inside):
        by_head.setdefault((r["layer"], r["head"]), []).append(r)
    heads = sorted(by_head)[:MAX_LINES]
    left_out = f" ({len(heads)} of {len(by_head)} heads drawn)" if len(by_head) > len(heads) else ""
    for ax, name in zip(axes, SCORES):
        ax.set_title(f"{run.name}: {SCORE_TITLES[name]}{left_out}", fontsize=10)
        ax.set_xlabel("step")
        ax.grid(True, alpha=0.3)
        for layer, head in heads:
            mine = by_head[(layer, head)]
            xs, ys = finite_points([r["step"] for r in mine], [r[name] for r in mine])
            ax.plot(xs, ys, color=color(layer), linestyle=HEAD_STYLES[head % len(HEAD_STYLES)],
                    linewidth=1.3, label=f"layer {layer} head {head}")
    axes[0].set_ylabel("mean attention")
    axes[0].set_ylim(-0.02, 1.02)
    if heads and len(heads) <= 24:
        axes[-1].legend(fontsize=7, loc="best", ncol=2)
    return fig


def repeat_loss_figure(run: RunLogs) -> Figure:
    fig, ax = figure(f"{run.name}: loss on a random sequence and on its repeat", "step", "loss (nats/token)")
    records = [r for r in run.inside if "repeat_loss" in r]
    for key, line_color, label in (("first", color(0), "first copy (unpredictable)"),
                                   ("second", color(1), "second copy (predictable by looking back)")):
        xs, ys = finite_points([r["step"] for r in records], [r["repeat_loss"].get(key) for r in records])
        ax.plot(xs, ys, color=line_color, marker="o", markersize=3, label=label)
    vocab = run.run.vocab_size
    if isinstance(vocab, int) and vocab > 1:
        ax.axhline(math.log(vocab), color="#888", linestyle=":", linewidth=1, label=f"uniform guess, ln {vocab}")
    return finish(fig)


def spread_steps(records: list[dict], count: int = 5, must: Optional[int] = None) -> list[dict]:
    """Up to `count` records spread evenly from the first to the last (and the one at step `must`)."""
    if len(records) <= count:
        chosen = list(records)
    else:
        chosen = [records[round(i * (len(records) - 1) / (count - 1))] for i in range(count)]
    chosen += [r for r in records if r["step"] == must and r not in chosen]
    return sorted(chosen, key=lambda r: r["step"])


def position_figure(run: RunLogs, step: Optional[int] = None) -> Figure:
    """The loss at each position of the window at a few steps: where it falls along the window, the model uses
    what came before (in-context learning)."""
    fig, ax = figure(f"{run.name}: loss by position in the window", "position in the window (tokens seen - 1)",
                     "loss (nats/token)")
    records = spread_steps([r for r in run.inside if (r.get("loss_by_position") or {}).get("loss")], must=step)
    palette = colormaps["viridis"]
    for j, r in enumerate(records):
        losses = r["loss_by_position"]["loss"]
        xs, ys = finite_points(list(range(len(losses))), losses)
        ax.plot(xs, ys, color=palette(j / max(len(records) - 1, 1)), linewidth=1.3, label=f"step {r['step']}")
    return finish(fig)


def attention_figure(run: RunLogs, record: dict, prompt_index: int = 0) -> Optional[tuple[Figure, str]]:
    """Every head's attention on one probe prompt at one step: a grid of heatmaps, layers down, heads across (at
    most MAX_GRID of each); and what was left out ("" when nothing was)."""
    entries = record.get("attention") or []
    if not 0 <= prompt_index < len(entries):
        return None
    entry = entries[prompt_index]
    grids, tokens = entry.get("percent") or [], [visible(t) for t in (entry.get("tokens") or [])[:MAX_DRAWN]]
    all_layers, all_heads = len(grids), max((len(g) for g in grids), default=0)
    n_layer, n_head, T = min(all_layers, MAX_GRID), min(all_heads, MAX_GRID), len(tokens)
    if not n_layer or not n_head or not T:
        return None
    left_out = (f"layers 0-{n_layer - 1} of {all_layers} and heads 0-{n_head - 1} of {all_heads} drawn (lmlab "
                f"inside RUN --json has them all)" if (n_layer, n_head) != (all_layers, all_heads) else "")
    fig = canvas(2.6 * n_head + 0.6, 2.6 * n_layer + 0.5, dpi=100)
    axes = fig.subplots(n_layer, n_head, squeeze=False)
    fig.suptitle(f"{run.name}, step {record['step']}: attention on {visible(str(entry.get('prompt', '')))[:60]!s} "
                 f"(row: the position attending, column: attended to)", fontsize=10)
    for layer in range(n_layer):
        for head in range(n_head):
            ax = axes[layer][head]
            image = [[math.nan] * T for _ in range(T)]
            rows = grids[layer][head] if head < len(grids[layer]) else []
            for q, row in enumerate(rows[:T]):
                for k, value in enumerate(row[: q + 1]):
                    image[q][k] = value
            ax.imshow(image, cmap="Blues", vmin=0, vmax=100, interpolation="nearest")
            ax.set_title(f"layer {layer} head {head}", fontsize=9)
            # every panel reads the same tokens: only the bottom row and the left column label them (each label is
            # text that the layout measures and the canvas draws, the most of this figure's time)
            ticks = list(range(T)) if T <= 32 else []
            xticks, yticks = (ticks if layer == n_layer - 1 else []), (ticks if head == 0 else [])
            ax.set_xticks(xticks, [tokens[i] for i in xticks], fontsize=5, rotation=90)
            ax.set_yticks(yticks, [tokens[i] for i in yticks], fontsize=5)
    return fig, left_out


def _score_cell(value) -> str:
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        return "<td class=num>–</td>"
    shade = max(0.0, min(1.0, value))
    return f'<td class=num style="background:rgba(31,119,180,{0.6 * shade:.2f})">{value:.3f}</td>'


def head_table_html(record: dict) -> str:
    rows = head_rows([record])
    if not rows:
        return none("no attention heads (the bigram has none)")
    body = "".join(f"<tr><td class=num>{r['layer']}</td><td class=num>{r['head']}</td>"
                   + "".join(_score_cell(r[name]) for name in SCORES) + "</tr>" for r in rows)
    return ('<table class="heads"><thead><tr><th>layer</th><th>head</th><th>previous-token</th><th>induction</th>'
            f'<th>duplicate-token</th></tr></thead><tbody>{body}</tbody></table>')


def lens_table_html(record: dict) -> str:
    parts = []
    for entry in record.get("lens") or []:
        layers = entry.get("top") or []
        rows = "".join(f"<tr><td>{'embeddings' if i == 0 else f'after block {i - 1}'}"
                       f"{' (the output)' if i == len(layers) - 1 else ''}</td><td>{top_cell(top)}</td></tr>"
                       for i, top in enumerate(layers))
        parts.append(f"<h4>after <code>{html.escape(visible(str(entry.get('prompt', ''))))}</code></h4>"
                     f'<table class="lens"><thead><tr><th>read from</th><th>top-5 next tokens</th></tr></thead>'
                     f"<tbody>{rows}</tbody></table>")
    return "".join(parts) or none("no logit lens recorded at this step")


INSIDE_INTRO = (
    "<p>At every evaluation training looks inside the model (<code>lmlab inside RUN</code> prints the same). "
    "<b>Head scores</b> are measured on random token sequences of length L repeated twice: how much each head "
    "attends to the previous token, to the token after the earlier occurrence of the current one (an "
    "<i>induction head</i>, which lets the model copy what followed last time), and to that earlier occurrence itself. "
    "The <b>repeat loss</b> compares the unpredictable first copy with the second; the <b>loss by position</b> falls "
    "along the window when the model uses its context; the <b>logit lens</b> applies the final norm and the head to "
    "each layer's residual stream: what the model would predict if it stopped there.</p>")


def inside_run_html(run: RunLogs, images: Images, step: Optional[int] = None) -> str:
    """One run's part of the inside section; the table, heatmaps and lens at `step` (default: the last step)."""
    if not run.inside:
        why = " (trained with --no-inside)" if run.config.inside is False else ""
        return none(f"{run.name}: nothing recorded inside the model yet{why}")
    record = next((r for r in run.inside if r["step"] == step), None) if step is not None else run.inside[-1]
    if record is None:
        raise LmlabError(f"{run.name} has no inside record at step {step}")
    stem = slug(run.name)
    parts = ['<div class="charts wide">',
             images.chart(f"{stem}_head_scores.png", head_score_figure(run), f"{run.name}: head scores against steps"),
             "</div><div class=charts>",
             images.chart(f"{stem}_repeat_loss.png", repeat_loss_figure(run),
                          f"{run.name}: loss on the first and the second copy of random sequences"),
             images.chart(f"{stem}_loss_by_position.png", position_figure(run, step),
                          f"{run.name}: loss by position in the window"), "</div>",
             f"<h3>{html.escape(run.name)}, step {record['step']}: head scores</h3>", head_table_html(record)]
    repeat = record.get("repeat_loss") or {}
    if repeat:
        parts.append(f"<p>loss on the first copy {fmt(repeat.get('first'), '.3f')}, on the second "
                     f"{fmt(repeat.get('second'), '.3f')} nats/token (sequences of {repeat.get('length')} "
                     f"tokens).</p>")
    drawn = attention_figure(run, record)
    if drawn is not None:
        heatmaps, left_out = drawn
        parts.append(f"<h3>{html.escape(run.name)}, step {record['step']}: attention on the first probe prompt</h3>")
        parts.append(images.chart(f"{stem}_attention_{record['step']}.png", heatmaps,
                                  f"{run.name}: every head's attention at step {record['step']}"
                                  + (f"; {left_out}" if left_out else "")))
    parts.append(f"<h3>{html.escape(run.name)}, step {record['step']}: the logit lens</h3>")
    parts.append(lens_table_html(record))
    return "\n".join(parts)


def inside_section(runs: list[RunLogs], images: Images) -> str:
    body = INSIDE_INTRO + "\n".join(inside_run_html(run, images) for run in runs)
    return section("inside", "Inside the model: attention, induction heads, in-context learning", body)


@plain_text
def write_inside_page(run_dir: str | Path, out: str | Path, step: Optional[int] = None) -> Path:
    """A self-contained page with one run's inside section (`lmlab inside RUN --out OUT`)."""
    run = load_run_logs(run_dir)
    body = f"<h1>Inside {html.escape(run.name)}</h1>\n{INSIDE_INTRO}{inside_run_html(run, Images(), step)}"
    return write_shared(Path(out), page(f"lmlab inside: {run.name}", body))
