"""One self-contained HTML page (plus its PNGs) that shows what training wrote: loss, schedule, gradients, throughput,
probes, samples, loss landscape and config, for one run or several side by side. It reads run folders; nothing imports it."""

from __future__ import annotations

import base64
import functools
import hashlib
import html
import io
import json
import math
import os
import re
import shlex
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import matplotlib
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter

from . import __version__
from . import rundir
from .inside import SCORES, head_rows, read_records
from .rundir import run_names
from .common import LmlabError, atomic_write_bytes, atomic_write_json, fmt_count, sha256_file
from .tokenizer import visible

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"]


# ---------------------------------------------------------------------------------------------------------------
# Reading a run


@dataclass
class RunLogs:
    """Everything training wrote into one run folder, as plain records."""

    name: str
    path: Path
    config: dict
    train: list[dict] = field(default_factory=list)
    evals: list[dict] = field(default_factory=list)
    rollbacks: list[dict] = field(default_factory=list)
    probes: list[dict] = field(default_factory=list)
    telemetry: list[dict] = field(default_factory=list)
    samples: list[dict] = field(default_factory=list)
    samples_text: str = ""
    landscape_pngs: list[Path] = field(default_factory=list)
    inside: list[dict] = field(default_factory=list)


def load_run_logs(path: str | Path, name: Optional[str] = None) -> RunLogs:
    """Read a run folder; raises LmlabError when it does not exist or is not an lmlab run."""
    path = Path(path)
    config = rundir.read_config(path)
    run = RunLogs(name or path.resolve().name, path, config)
    for record in rundir.read_jsonl(path, rundir.METRICS):
        if "rollback" in record:
            run.rollbacks.append(record)
        elif "val_loss" in record:
            run.evals.append(record)
        elif "train_loss" in record:
            run.train.append(record)
    run.probes = rundir.read_jsonl(path, rundir.PROBES)
    run.telemetry = rundir.read_jsonl(path, rundir.TELEMETRY)
    run.inside = read_records(path)
    run.samples = rundir.read_jsonl(path, rundir.SAMPLES_JSONL)
    if not run.samples and rundir.exists(path, rundir.SAMPLES_TXT):
        run.samples_text = rundir.read_text(path, rundir.SAMPLES_TXT)
    run.landscape_pngs = [Path(e.path) for e in rundir.list_dir(path, rundir.LANDSCAPE) if e.name.endswith(".png")]
    return run


# ---------------------------------------------------------------------------------------------------------------
# Charts (matplotlib figures on the Agg canvas; no pyplot, so no global state is touched)


def _finite(xs: list, ys: list, positive_x: bool = False, positive_y: bool = False) -> tuple[list, list]:
    keep = [(x, y) for x, y in zip(xs, ys)
            if isinstance(y, (int, float)) and math.isfinite(y) and (not positive_y or y > 0)
            and isinstance(x, (int, float)) and (not positive_x or x > 0)]
    return [k[0] for k in keep], [k[1] for k in keep]


def smooth(values: list[float]) -> list[float]:
    """A light, bias-corrected exponential moving average; the weight grows with the length (none under 20 points)."""
    weight = min(0.9, max(0.0, 1.0 - 20.0 / max(len(values), 1)))
    out, avg, norm = [], 0.0, 0.0
    for v in values:
        avg = weight * avg + (1 - weight) * v
        norm = weight * norm + (1 - weight)
        out.append(avg / norm)
    return out


def figure(title: str, xlabel: str, ylabel: str, title_size: float = 11):
    """One chart's figure and axes, in the style of every lmlab chart (the report's and the experiments')."""
    fig = Figure(figsize=(6.4, 3.8), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.set_title(title, fontsize=title_size)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    return fig, ax


def _plain_log_axis(axis, limits) -> None:
    """Log-axis labels as plain numbers (0.3, 2, 1e-05 rather than 3x10^-1); minor ones only on a short range."""
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))

    def minor(v, _):
        lo, hi = limits()
        if v <= 0 or lo <= 0 or hi / lo > 30:
            return ""
        mantissa = round(v / 10 ** math.floor(math.log10(v)))
        return f"{v:g}" if hi / lo < 4 or mantissa in (2, 5) else ""

    axis.set_minor_formatter(FuncFormatter(minor))


def _finish(fig: Figure, ax, log_x: bool = False, log_y: bool = False) -> Figure:
    if log_x:
        ax.set_xscale("log")
        _plain_log_axis(ax.xaxis, ax.get_xlim)
    if log_y:
        ax.set_yscale("log")
        _plain_log_axis(ax.yaxis, ax.get_ylim)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, loc="best")
    return fig


def png_bytes(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def loss_figure(runs: list[RunLogs], x: str = "step", log: bool = False) -> Figure:
    """Train loss (raw faint, smoothed solid) and val loss (dots) of every run against steps or tokens."""
    by_tokens = x == "tokens"
    fig, ax = figure(f"loss against {'tokens' if by_tokens else 'steps'}", "tokens" if by_tokens else "step",
                      "loss (nats/token)")
    for i, run in enumerate(runs):
        color = COLORS[i % len(COLORS)]
        xs, ys = _finite([r.get(x) for r in run.train], [r["train_loss"] for r in run.train],
                         positive_x=log and by_tokens, positive_y=log)
        if xs:
            ax.plot(xs, ys, color=color, alpha=0.25, linewidth=0.8)
            ax.plot(xs, smooth(ys), color=color, linewidth=1.6, label=f"{run.name} train")
        spikes = [r for r in run.train if r.get("spike_z") is not None]
        sx, sy = _finite([r.get(x) for r in spikes], [r["train_loss"] for r in spikes], log and by_tokens, log)
        if sx:
            ax.scatter(sx, sy, marker="^", color=color, s=30, zorder=3, label=f"{run.name} loss spike")
        xs, ys = _finite([r.get(x) for r in run.evals], [r["val_loss"] for r in run.evals],
                         positive_x=log and by_tokens, positive_y=log)
        if xs:
            ax.plot(xs, ys, color=color, linestyle="--", marker="o", markersize=4, linewidth=1.2,
                    label=f"{run.name} val")
        over = [r for r in run.evals if r.get("overfitting")]
        ox, oy = _finite([r.get(x) for r in over], [r["val_loss"] for r in over], log and by_tokens, log)
        if ox:
            ax.scatter(ox, oy, marker="x", color="#c00", s=40, zorder=4,
                       label=f"{run.name} val rising, train falling: overfitting")
        best = best_eval(run)
        bx, by = _finite([best.get(x)] if best else [], [best["val_loss"]] if best else [], log and by_tokens, log)
        if bx:
            ax.scatter(bx, by, marker="*", color=color, s=120, zorder=4, edgecolors="black", linewidths=0.5,
                       label=f"{run.name} best (the checkpoint used)")
        if not by_tokens:
            for rb in run.rollbacks:
                ax.axvline(rb["step"], color=color, linestyle=":", alpha=0.7)
    return _finish(fig, ax, log_x=log and by_tokens, log_y=log)


def best_eval(run: RunLogs) -> Optional[dict]:
    """The evaluation with the lowest finite validation loss (the later of equals), or None."""
    finite = [r for r in run.evals if isinstance(r.get("val_loss"), (int, float)) and math.isfinite(r["val_loss"])]
    return min(reversed(finite), key=lambda r: r["val_loss"]) if finite else None


def overfitting_note(run: RunLogs) -> str:
    """One sentence when the run overfitted: from which step, after how many passes, and which model is kept."""
    first = next((r for r in run.evals if r.get("overfitting")), None)
    best = best_eval(run)
    if first is None or best is None:
        return ""
    passes = f" ({first['passes']:.1f} passes over the training text)" if isinstance(first.get("passes"),
                                                                                    (int, float)) else ""
    return (f"<p class=warn><b>{html.escape(run.name)} overfitted</b>: from step {first['step']}{passes} its "
            f"validation loss rose while its training loss fell, so it was memorising its training text. The best "
            f"evaluation, at step {best['step']} (val loss {best['val_loss']:.4f}), has the checkpoint that sample, "
            f"eval, export and serve load by default.</p>")


def accuracy_figure(runs: list[RunLogs]) -> Figure:
    fig, ax = figure("validation accuracy (top-1)", "step", "accuracy")
    for i, run in enumerate(runs):
        xs, ys = _finite([r["step"] for r in run.evals], [r.get("val_accuracy") for r in run.evals])
        if xs:
            ax.plot(xs, [100 * y for y in ys], color=COLORS[i % len(COLORS)], marker="o", markersize=4,
                    label=run.name)
    ax.set_ylabel("accuracy (%)")
    return _finish(fig, ax)


def lr_figure(runs: list[RunLogs]) -> Figure:
    fig, ax = figure("learning rate", "step", "learning rate")
    for i, run in enumerate(runs):
        xs, ys = _finite([r["step"] for r in run.train], [r.get("lr") for r in run.train])
        if xs:
            ax.plot(xs, ys, color=COLORS[i % len(COLORS)], label=run.name)
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    return _finish(fig, ax)


def grad_norm_figure(runs: list[RunLogs]) -> Figure:
    """The global gradient norm before clipping; x marks a clipped step, the dashed line is the clip threshold."""
    fig, ax = figure("global gradient norm (before clipping)", "step", "grad norm")
    for i, run in enumerate(runs):
        color = COLORS[i % len(COLORS)]
        xs, ys = _finite([r["step"] for r in run.train], [r.get("grad_norm") for r in run.train], positive_y=True)
        if xs:
            ax.plot(xs, ys, color=color, linewidth=0.9, label=run.name)
        clipped = [r for r in run.train if r.get("clipped")]
        cx, cy = _finite([r["step"] for r in clipped], [r.get("grad_norm") for r in clipped], positive_y=True)
        if cx:
            ax.scatter(cx, cy, marker="x", color=color, s=14, linewidths=0.8, zorder=3,
                       label=f"{run.name} clipped ({len(cx)} steps)")
        clip = run.config.get("optim", {}).get("grad_clip")
        if xs and isinstance(clip, (int, float)) and clip > 0:
            ax.axhline(clip, color=color, linestyle="--", linewidth=0.8, alpha=0.6)
    return _finish(fig, ax, log_y=True)


def _layer_key(name: str) -> tuple:
    if name == "embed":
        return (0, 0)
    m = re.fullmatch(r"block\.([0-9]+)", name)
    return (1, int(m.group(1))) if m else (2, 0)


def layer_figure(run: RunLogs, kind: str) -> Figure:
    """Per-layer gradient norms (kind='grad_norm') or update-to-weight ratios (kind='update_ratio') of one run."""
    title = {"grad_norm": "per-layer gradient norm", "update_ratio": "per-layer update / weight ratio"}[kind]
    fig, ax = figure(f"{run.name}: {title}", "step", "update ratio" if kind == "update_ratio" else "grad norm")
    layers = sorted({name for r in run.telemetry for name in (r.get(kind) or {})}, key=_layer_key)
    palette = colormaps["viridis"]  # embed -> head, dark to light
    for j, layer in enumerate(layers):
        rows = [r for r in run.telemetry if layer in (r.get(kind) or {})]
        xs, ys = _finite([r["step"] for r in rows], [r[kind][layer] for r in rows], positive_y=True)
        if xs:
            ax.plot(xs, ys, color=palette(j / max(len(layers) - 1, 1)), linewidth=1.1, label=layer)
    if kind == "update_ratio" and layers:
        ax.axhline(1e-3, color="#888", linestyle=":", linewidth=1, label="1e-3 (rule of thumb)")
    return _finish(fig, ax, log_y=True)


def throughput_figure(runs: list[RunLogs]) -> Figure:
    fig, ax = figure("training throughput", "step", "tokens / s")
    for i, run in enumerate(runs):
        color = COLORS[i % len(COLORS)]
        xs, ys = _finite([r["step"] for r in run.train], [r.get("tokens_per_s") for r in run.train])
        if xs:
            ax.plot(xs, ys, color=color, alpha=0.25, linewidth=0.8)
            ax.plot(xs, smooth(ys), color=color, linewidth=1.5, label=run.name)
    ax.set_ylim(bottom=0)
    return _finish(fig, ax)


# ---------------------------------------------------------------------------------------------------------------
# The page


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-.") or "run"


class _Images:
    """Collects the PNGs of the page: each is embedded as a data URI and saved in the files folder."""

    def __init__(self):
        self.files: dict[str, bytes] = {}

    def add(self, filename: str, data: bytes, alt: str, fig_id: str = "") -> str:
        stem, n = filename[:-4], 2
        while filename in self.files:
            filename, n = f"{stem}-{n}.png", n + 1
        self.files[filename] = data
        uri = "data:image/png;base64," + base64.b64encode(data).decode("ascii")
        id_attr = f' id="{fig_id}"' if fig_id else ""
        return (f'<figure{id_attr}><img src="{uri}" alt="{html.escape(alt)}">'
                f"<figcaption>{html.escape(alt)} <span class=file>({html.escape(filename)})</span></figcaption></figure>")

    def chart(self, filename: str, fig: Figure, alt: str, fig_id: str = "") -> str:
        return self.add(filename, png_bytes(fig), alt, fig_id)


def _none(text: str) -> str:
    return f'<p class="none">{html.escape(text)}</p>'


def _missing(runs: list[RunLogs], has, what: str) -> str:
    """A line that names the runs a chart has no data for (an empty string when all have some)."""
    lacking = [r.name for r in runs if not has(r)]
    if not lacking:
        return ""
    return _none(f"no {what} yet for {', '.join(lacking)}")


def _fmt(value, spec: str = ".4f") -> str:
    if isinstance(value, (int, float)) and math.isfinite(value):
        return format(value, spec)
    return "–"


def _section(section_id: str, title: str, body: str) -> str:
    return f'<section id="{section_id}">\n<h2>{html.escape(title)}</h2>\n{body}\n</section>'


def _loss_section(runs: list[RunLogs], images: _Images, log: bool) -> str:
    if not any(r.train or r.evals for r in runs):
        return _section("loss", "Loss", _none("no training or validation loss logged yet: train the run first")
                        + '<div id="accuracy"></div>')
    scale = " (log scale)" if log else ""
    parts = ['<p>Train loss per step (faint: raw, solid: smoothed) and validation loss at each eval (dashed, dots). '
             'A star marks the best evaluation (its checkpoint is the one used), red crosses evaluations where '
             'validation loss rose while training loss fell (overfitting), triangles loss spikes, dotted vertical '
             'lines rollbacks.</p>', *filter(None, map(overfitting_note, runs)), '<div class="charts">',
             images.chart("loss_steps.png", loss_figure(runs, "step", log), f"loss against steps{scale}")]
    if any(r.evals for r in runs):
        parts.append(images.chart("accuracy.png", accuracy_figure(runs), "validation accuracy against steps",
                                  fig_id="accuracy"))
    else:
        parts.append('<div id="accuracy">' + _none("no evaluation yet, so no accuracy") + "</div>")
    parts.append(images.chart("loss_tokens.png", loss_figure(runs, "tokens", log), f"loss against tokens{scale}"))
    parts.append("</div>")
    parts.append(_missing(runs, lambda r: r.train, "training steps logged"))
    parts.append(_missing(runs, lambda r: r.evals, "evaluations logged"))
    return _section("loss", "Loss", "\n".join(parts))


def _simple_section(section_id: str, title: str, runs: list[RunLogs], images: _Images, filename: str, fig_fn,
                    alt: str, intro: str) -> str:
    if not any(r.train for r in runs):
        return _section(section_id, title, _none("no training steps logged yet"))
    body = (f"<p>{intro}</p><div class=charts>{images.chart(filename, fig_fn(runs), alt)}</div>"
            + _missing(runs, lambda r: r.train, "training steps logged"))
    return _section(section_id, title, body)


def _gradients_section(runs: list[RunLogs], images: _Images) -> str:
    parts = []
    if any(r.train for r in runs):
        parts.append("<p>The global gradient norm of every step, before clipping (log scale; x: a clipped step, "
                     "dashed: the clip threshold).</p><div class=charts>")
        parts.append(images.chart("grad_norm.png", grad_norm_figure(runs), "global gradient norm against steps"))
        parts.append("</div>")
    else:
        parts.append(_none("no training steps logged yet"))
    parts.append(f"<h3>Per layer</h3><p>From {rundir.TELEMETRY}: each layer's gradient norm, and how far one optimizer "
                 "step moves its weights relative to their size (||update|| / ||weights||; log scale).</p>")
    for run in runs:
        if not run.telemetry:
            interval = run.config.get("telemetry_interval")
            why = " (telemetry is off: --telemetry-interval 0)" if interval == 0 else ""
            parts.append(_none(f"{run.name}: no per-layer telemetry yet{why}"))
            continue
        slug = _slug(run.name)
        parts.append('<div class="charts">')
        parts.append(images.chart(f"{slug}_layer_grad_norm.png", layer_figure(run, "grad_norm"),
                                  f"{run.name}: per-layer gradient norm"))
        parts.append(images.chart(f"{slug}_update_ratio.png", layer_figure(run, "update_ratio"),
                                  f"{run.name}: per-layer update-to-weight ratio"))
        parts.append("</div>")
    return _section("gradients", "Gradients", "\n".join(parts))


def _top_cell(top: list) -> str:
    chips = []
    for entry in top:
        try:
            token, prob = str(entry[0]), float(entry[1])
        except (TypeError, ValueError, IndexError):
            continue
        width = max(0.0, min(100.0, 100 * prob))
        chips.append(f'<span class="chip" style="background:linear-gradient(90deg,#cfe3f7 {width:.1f}%,#f4f4f4 '
                     f'{width:.1f}%)"><code>{html.escape(visible(token))}</code> {100 * prob:.1f}%</span>')
    return " ".join(chips)


def _probes_section(runs: list[RunLogs]) -> str:
    parts = ["<p>At every evaluation, training asks the model for its 5 most likely next tokens after fixed prompts "
             "(whitespace made visible: ␣ is a space, \\n a newline) and a greedy continuation. Read down a table to "
             "watch predictions go from noise to text.</p>"]
    for run in runs:
        if not run.probes:
            parts.append(_none(f"{run.name}: no probes yet (they are recorded at each evaluation)"))
            continue
        prompts: list[str] = []
        for record in run.probes:
            for p in record["probes"]:
                if p.get("prompt") not in prompts:
                    prompts.append(p.get("prompt"))
        for k, prompt in enumerate(prompts):
            rows = []
            for record in run.probes:
                for p in record["probes"]:
                    if p.get("prompt") == prompt:
                        rows.append(f'<tr><td class="num">{html.escape(str(record.get("step")))}</td>'
                                    f'<td>{_top_cell(p.get("top") or [])}</td>'
                                    f'<td class="text"><span class="prompt">{html.escape(str(prompt))}</span>'
                                    f'{html.escape(str(p.get("continuation", "")))}</td></tr>')
            parts.append(f'<h3>{html.escape(run.name)}, prompt {k + 1}: <code>{html.escape(visible(str(prompt)))}'
                         f'</code></h3>')
            parts.append('<table class="probe"><thead><tr><th>step</th><th>top-5 next tokens</th>'
                         '<th>greedy continuation (prompt greyed)</th></tr></thead><tbody>'
                         + "\n".join(rows) + "</tbody></table>")
    return _section("probes", "Probes: predictions over training", "\n".join(parts))


def _samples_section(runs: list[RunLogs]) -> str:
    parts = []
    for run in runs:
        if run.samples:
            for s in run.samples:
                prompt = s.get("prompt") or ""
                head = (f"{run.name}, step {s.get('step')}, temperature {s.get('temperature')}, "
                        f"prompt {prompt!r}" if prompt else f"{run.name}, step {s.get('step')}, "
                        f"temperature {s.get('temperature')}, no prompt")
                parts.append(f"<h3>{html.escape(head)}</h3><pre class=sample>{html.escape(str(s['text']))}</pre>")
        elif run.samples_text.strip():
            parts.append(f"<h3>{html.escape(run.name)} ({rundir.SAMPLES_TXT})</h3>"
                         f"<pre class=sample>{html.escape(run.samples_text)}</pre>")
        else:
            parts.append(_none(f"{run.name}: no samples yet (training writes one at the end when "
                               f"--sample-tokens is above 0)"))
    return _section("samples", "Samples", "\n".join(parts))


def _landscape_section(runs: list[RunLogs], images: _Images) -> str:
    parts = []
    for run in runs:
        pngs = []
        for path in run.landscape_pngs:
            try:
                data = rundir.read_bytes(run.path, Path(rundir.LANDSCAPE, path.name))
            except (LmlabError, OSError):
                continue  # not a regular file of the run (a link, a folder): never read through
            if data.startswith(PNG_SIGNATURE):
                pngs.append(images.add(f"{_slug(run.name)}_landscape_{_slug(path.stem)}.png", data,
                                       f"{run.name}: {path.name}"))
        if pngs:
            parts.append(f"<h3>{html.escape(run.name)}</h3><div class=charts>{''.join(pngs)}</div>")
        else:
            command = html.escape(f"lmlab landscape {shlex.quote(str(run.path))} --2d")
            parts.append(f'<p class="none">{html.escape(run.name)}: no loss landscape was computed. Compute one '
                         f'with <code>{command}</code>, then build this report again.</p>')
    return _section("landscape", "Loss landscape", "\n".join(parts))


# ---------------------------------------------------------------------------------------------------------------
# Inside the model (inside.jsonl): head scores, the repeated-sequence loss, loss by position, attention, logit lens


SCORE_TITLES = {"previous_token": "previous-token score (t -> t-1)", "induction": "induction score (L+i -> i+1)",
                "duplicate_token": "duplicate-token score (L+i -> i)"}
HEAD_STYLES = ["-", "--", ":", "-."]
MAX_DRAWN = 256  # positions of a heatmap drawn at most (training records 32; a run from elsewhere may hold anything)
MAX_GRID = 8  # layers, and heads, of attention heatmaps drawn at most: 64 panels, a figure of at most 21 x 21 inches
MAX_LINES = 64  # heads drawn at most in the head-score chart (the table lists every one)


def head_score_figure(run: RunLogs) -> Figure:
    """Each head's three scores against steps: a panel per score, a line per head (colour: layer, dash: head)."""
    fig = Figure(figsize=(12.8, 3.6), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
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
            xs, ys = _finite([r["step"] for r in mine], [r[name] for r in mine])
            ax.plot(xs, ys, color=COLORS[layer % len(COLORS)], linestyle=HEAD_STYLES[head % len(HEAD_STYLES)],
                    linewidth=1.3, label=f"layer {layer} head {head}")
    axes[0].set_ylabel("mean attention")
    axes[0].set_ylim(-0.02, 1.02)
    if heads and len(heads) <= 24:
        axes[-1].legend(fontsize=7, loc="best", ncol=2)
    return fig


def repeat_loss_figure(run: RunLogs) -> Figure:
    fig, ax = figure(f"{run.name}: loss on a random sequence and on its repeat", "step", "loss (nats/token)")
    records = [r for r in run.inside if "repeat_loss" in r]
    for key, color, label in (("first", COLORS[0], "first copy (unpredictable)"),
                              ("second", COLORS[1], "second copy (predictable by looking back)")):
        xs, ys = _finite([r["step"] for r in records], [r["repeat_loss"].get(key) for r in records])
        ax.plot(xs, ys, color=color, marker="o", markersize=3, label=label)
    vocab = run.config.get("vocab_size")
    if isinstance(vocab, int) and vocab > 1:
        ax.axhline(math.log(vocab), color="#888", linestyle=":", linewidth=1, label=f"uniform guess, ln {vocab}")
    return _finish(fig, ax)


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
        xs, ys = _finite(list(range(len(losses))), losses)
        ax.plot(xs, ys, color=palette(j / max(len(records) - 1, 1)), linewidth=1.3, label=f"step {r['step']}")
    return _finish(fig, ax)


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
    fig = Figure(figsize=(2.6 * n_head + 0.6, 2.6 * n_layer + 0.5), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
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
            ticks = list(range(T)) if T <= 32 else []
            ax.set_xticks(ticks, [tokens[i] for i in ticks], fontsize=5, rotation=90)
            ax.set_yticks(ticks, [tokens[i] for i in ticks], fontsize=5)
    return fig, left_out


def _score_cell(value) -> str:
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        return "<td class=num>–</td>"
    shade = max(0.0, min(1.0, value))
    return f'<td class=num style="background:rgba(31,119,180,{0.6 * shade:.2f})">{value:.3f}</td>'


def head_table_html(record: dict) -> str:
    rows = head_rows([record])
    if not rows:
        return _none("no attention heads (the bigram has none)")
    body = "".join(f"<tr><td class=num>{r['layer']}</td><td class=num>{r['head']}</td>"
                   + "".join(_score_cell(r[name]) for name in SCORES) + "</tr>" for r in rows)
    return ('<table class="heads"><thead><tr><th>layer</th><th>head</th><th>previous-token</th><th>induction</th>'
            f'<th>duplicate-token</th></tr></thead><tbody>{body}</tbody></table>')


def lens_table_html(record: dict) -> str:
    parts = []
    for entry in record.get("lens") or []:
        layers = entry.get("top") or []
        rows = "".join(f"<tr><td>{'embeddings' if i == 0 else f'after block {i - 1}'}"
                       f"{' (the output)' if i == len(layers) - 1 else ''}</td><td>{_top_cell(top)}</td></tr>"
                       for i, top in enumerate(layers))
        parts.append(f"<h4>after <code>{html.escape(visible(str(entry.get('prompt', ''))))}</code></h4>"
                     f'<table class="lens"><thead><tr><th>read from</th><th>top-5 next tokens</th></tr></thead>'
                     f"<tbody>{rows}</tbody></table>")
    return "".join(parts) or _none("no logit lens recorded at this step")


INSIDE_INTRO = (
    "<p>At every evaluation training looks inside the model (<code>lmlab inside RUN</code> prints the same). "
    "<b>Head scores</b> are measured on random token sequences of length L repeated twice: how much each head "
    "attends to the previous token, to the token after the earlier occurrence of the current one (an "
    "<i>induction head</i>, which lets the model copy what followed last time), and to that earlier occurrence itself. "
    "The <b>repeat loss</b> compares the unpredictable first copy with the second; the <b>loss by position</b> falls "
    "along the window when the model uses its context; the <b>logit lens</b> applies the final norm and the head to "
    "each layer's residual stream: what the model would predict if it stopped there.</p>")


def inside_run_html(run: RunLogs, images: _Images, step: Optional[int] = None) -> str:
    """One run's part of the inside section; the table, heatmaps and lens at `step` (default: the last step)."""
    if not run.inside:
        why = " (trained with --no-inside)" if run.config.get("inside") is False else ""
        return _none(f"{run.name}: nothing recorded inside the model yet{why}")
    record = next((r for r in run.inside if r["step"] == step), None) if step is not None else run.inside[-1]
    if record is None:
        raise LmlabError(f"{run.name} has no inside record at step {step}")
    slug = _slug(run.name)
    parts = ['<div class="charts wide">',
             images.chart(f"{slug}_head_scores.png", head_score_figure(run), f"{run.name}: head scores against steps"),
             "</div><div class=charts>",
             images.chart(f"{slug}_repeat_loss.png", repeat_loss_figure(run),
                          f"{run.name}: loss on the first and the second copy of random sequences"),
             images.chart(f"{slug}_loss_by_position.png", position_figure(run, step),
                          f"{run.name}: loss by position in the window"), "</div>",
             f"<h3>{html.escape(run.name)}, step {record['step']}: head scores</h3>", head_table_html(record)]
    repeat = record.get("repeat_loss") or {}
    if repeat:
        parts.append(f"<p>loss on the first copy {_fmt(repeat.get('first'), '.3f')}, on the second "
                     f"{_fmt(repeat.get('second'), '.3f')} nats/token (sequences of {repeat.get('length')} "
                     f"tokens).</p>")
    drawn = attention_figure(run, record)
    if drawn is not None:
        figure, left_out = drawn
        parts.append(f"<h3>{html.escape(run.name)}, step {record['step']}: attention on the first probe prompt</h3>")
        parts.append(images.chart(f"{slug}_attention_{record['step']}.png", figure,
                                  f"{run.name}: every head's attention at step {record['step']}"
                                  + (f"; {left_out}" if left_out else "")))
    parts.append(f"<h3>{html.escape(run.name)}, step {record['step']}: the logit lens</h3>")
    parts.append(lens_table_html(record))
    return "\n".join(parts)


def _inside_section(runs: list[RunLogs], images: _Images) -> str:
    body = INSIDE_INTRO + "\n".join(inside_run_html(run, images) for run in runs)
    return _section("inside", "Inside the model: attention, induction heads, in-context learning", body)


def plain_text(draw):
    """`draw` with every text drawn as it is: run names, prompts, tokens and layer names come from runs, and
    matplotlib would parse $...$ in them as math (failing on a word such as \\foo)."""

    @functools.wraps(draw)
    def drawn(*args, **kwargs):
        with matplotlib.rc_context({"text.parse_math": False}):
            return draw(*args, **kwargs)

    return drawn


@plain_text
def write_inside_page(run_dir: str | Path, out: str | Path, step: Optional[int] = None) -> Path:
    """A self-contained page with one run's inside section (`lmlab inside RUN --html OUT`)."""
    run = load_run_logs(run_dir)
    body = INSIDE_INTRO + inside_run_html(run, _Images(), step)
    page = (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>lmlab inside: '
            f'{html.escape(run.name)}</title><style>{CSS}</style></head><body>\n<h1>Inside {html.escape(run.name)}'
            f'</h1>\n{body}\n</body></html>\n')
    out = Path(out)
    try:
        atomic_write_bytes(out, page.encode("utf-8"))
        os.chmod(out, _file_mode())
    except OSError as e:
        raise LmlabError(f"cannot write {out}: {e.strerror or e}") from None
    return out


def summary_row(run: RunLogs) -> dict:
    """The headline numbers of a run, from its last records."""
    last_train = run.train[-1] if run.train else {}
    last_eval = run.evals[-1] if run.evals else {}
    losses = [r["val_loss"] for r in run.evals if isinstance(r.get("val_loss"), (int, float))
              and math.isfinite(r["val_loss"])]
    last = max((last_train, last_eval), key=lambda r: r.get("step", -1))
    return {"run": run.name, "steps": last.get("step"), "tokens": last.get("tokens"),
            "best_val_loss": min(losses) if losses else None, "last_val_loss": last_eval.get("val_loss"),
            "val_bits_per_byte": last_eval.get("val_bits_per_byte"), "val_accuracy": last_eval.get("val_accuracy"),
            "train_time_s": last.get("elapsed_s"), "val_stride": last_eval.get("val_stride"),
            "block_size": (run.config.get("model") or {}).get("block_size")}


def _stride_cell(s: dict) -> str:
    """How the val loss was measured: windows of block_size tokens every val_stride tokens."""
    stride, block = s.get("val_stride") or s.get("block_size"), s.get("block_size")
    if not isinstance(stride, int) or not isinstance(block, int):
        return "–"
    return (f"windows of {block}, no overlap" if stride >= block else
            f"windows of {block} every {stride} tokens")


def _config_section(runs: list[RunLogs]) -> str:
    rows = []
    for run in runs:
        s = summary_row(run)
        acc = f"{100 * s['val_accuracy']:.1f}%" if isinstance(s["val_accuracy"], (int, float)) else "–"
        rows.append(f"<tr><td>{html.escape(s['run'])}</td><td class=num>{_fmt(s['steps'], 'd')}</td>"
                    f"<td class=num>{fmt_count(s['tokens']) if isinstance(s['tokens'], int) else '–'}</td>"
                    f"<td class=num>{_fmt(s['best_val_loss'])}</td><td class=num>{_fmt(s['last_val_loss'])}</td>"
                    f"<td class=num>{_fmt(s['val_bits_per_byte'])}</td><td class=num>{acc}</td>"
                    f"<td class=num>{_stride_cell(s)}</td><td class=num>{_fmt(s['train_time_s'], '.1f')}</td></tr>")
    parts = ['<table class="summary"><thead><tr><th>run</th><th>steps</th><th>tokens</th><th>best val loss</th>'
             '<th>last val loss</th><th>bits/byte</th><th>val accuracy</th><th>measured with</th>'
             '<th>training time (s)</th></tr></thead><tbody>' + "\n".join(rows) + "</tbody></table>"]
    for run in runs:
        parts.append(f"<h3>{html.escape(run.name)}: {rundir.CONFIG} <span class=file>({html.escape(str(run.path))})"
                     f"</span></h3><pre class=config>{html.escape(json.dumps(run.config, indent=2))}</pre>")
    return _section("config", "Runs and config", "\n".join(parts))


CSS = """
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #222; margin: 0 auto;
       max-width: 1320px; padding: 0 24px 48px; }
h1 { font-size: 24px; margin: 20px 0 4px; } h2 { border-bottom: 1px solid #ddd; padding-bottom: 4px; margin-top: 36px; }
h3 { font-size: 16px; margin: 20px 0 8px; }
nav a { margin-right: 14px; } .meta, .file, .none { color: #666; } .file { font-size: 12px; }
.none { font-style: italic; }
.charts { display: grid; grid-template-columns: repeat(auto-fit, minmax(540px, 1fr)); gap: 12px; }
figure { margin: 0; } img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { font-size: 13px; color: #444; }
table { border-collapse: collapse; margin: 6px 0 14px; }
th, td { border: 1px solid #ddd; padding: 4px 8px; text-align: left; vertical-align: top; }
th { background: #f3f3f3; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
table.probe td.text { white-space: pre-wrap; font-family: ui-monospace, Menlo, Consolas, monospace; font-size: 13px;
                      max-width: 560px; }
.prompt { color: #999; }
.chip { display: inline-block; border: 1px solid #ddd; border-radius: 4px; padding: 0 5px; margin: 1px 2px;
        font-size: 13px; min-width: 88px; white-space: nowrap; }
pre { background: #f7f7f7; border: 1px solid #e5e5e5; padding: 10px; overflow-x: auto; white-space: pre-wrap; }
pre.config { font-size: 12px; }
.charts.wide { grid-template-columns: 1fr; }
table.lens td:first-child { white-space: nowrap; color: #444; }
h4 { font-size: 14px; margin: 12px 0 4px; font-weight: 600; }
p.warn { background: #fff4e5; border-left: 4px solid #e8a33d; padding: 6px 10px; }
"""

SECTIONS = [("loss", "loss"), ("schedule", "schedule"), ("gradients", "gradients"), ("throughput", "throughput"),
            ("probes", "probes"), ("inside", "inside"), ("samples", "samples"), ("landscape", "landscape"),
            ("config", "config")]


@plain_text
def build_page(runs: list[RunLogs], log: bool = False) -> tuple[str, dict[str, bytes]]:
    """The HTML page and its PNGs (file name -> bytes) for these runs."""
    images = _Images()
    sections = [
        _loss_section(runs, images, log),
        _simple_section("schedule", "Learning-rate schedule", runs, images, "lr.png", lr_figure,
                        "learning rate against steps", "The learning rate of each optimizer step."),
        _gradients_section(runs, images),
        _simple_section("throughput", "Throughput", runs, images, "throughput.png", throughput_figure,
                        "tokens per second against steps",
                        "Training tokens per second of each step (evaluation excluded; faint: raw, solid: smoothed)."),
        _probes_section(runs),
        _inside_section(runs, images),
        _samples_section(runs),
        _landscape_section(runs, images),
        _config_section(runs),
    ]
    names = ", ".join(r.name for r in runs)
    nav = " ".join(f'<a href="#{sid}">{label}</a>' for sid, label in SECTIONS)
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>lmlab report: {html.escape(names)}</title>
<style>{CSS}</style></head>
<body>
<h1>lmlab report: {html.escape(names)}</h1>
<p class="meta">{len(runs)} run{'s' if len(runs) != 1 else ''}, built {time.strftime('%Y-%m-%d %H:%M:%S')} by lmlab
{__version__}{'; loss on log scales' if log else ''}. Every chart is also saved as a PNG in the files folder next to
this page.</p>
<nav>{nav}</nav>
{chr(10).join(sections)}
</body></html>
"""
    return page, images.files


def _file_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def write_report(runs: list[str | Path], out: str | Path = "report.html", log: bool = False) -> Path:
    """Read the runs, write the page to `out` and its PNGs to `<out-stem>_files/`; returns the page's path."""
    if not runs:
        raise LmlabError("give at least one run directory: lmlab report RUN [RUN ...]")
    paths: list[Path] = []
    for r in runs:
        if Path(r).resolve() not in [p.resolve() for p in paths]:
            paths.append(Path(r))
    logs = [load_run_logs(p, name) for p, name in zip(paths, run_names(paths))]
    page, files = build_page(logs, log)
    out = Path(out)
    if out.is_dir():
        raise LmlabError(f"--out {out} is a directory; give a file name such as {out / 'report.html'}")
    folder = out.with_name(f"{out.stem}_files")
    written = _written_before(folder)
    clash = sorted(name for name in files if os.path.lexists(folder / name) and name not in written)
    if clash:  # a browser's "Save page as" folder, say: never overwrite or delete what lmlab did not write
        raise LmlabError(f"{folder / clash[0]} is not a chart lmlab wrote there ({folder / WRITTEN} does not list it); "
                         f"choose another --out, or move that file")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        for name in written.keys() - files.keys():  # charts of an earlier report that this one no longer has
            _remove_if_unchanged(folder / name, written[name])
        # the record first: a chart whose writing fails half-way is still lmlab's to overwrite next time
        atomic_write_json(folder / WRITTEN, {"files": {name: hashlib.sha256(data).hexdigest()
                                                       for name, data in files.items()}})
        for name, data in files.items():
            atomic_write_bytes(folder / name, data)
        atomic_write_bytes(out, page.encode("utf-8"))
        mode = _file_mode()  # atomic writes create private (0600) files; a report is made to be shared
        for path in [out, *(folder / name for name in files)]:
            os.chmod(path, mode)
    except OSError as e:
        raise LmlabError(f"cannot write the report to {out}: {e.strerror or e}") from None
    return out


WRITTEN = ".lmlab-report.json"  # in a report's files folder: the charts lmlab wrote there, with their SHA-256


def _written_before(folder: Path) -> dict[str, str]:
    """The charts an earlier report wrote into `folder` (name -> SHA-256), as its record says; {} without one."""
    try:
        record = rundir.parse_json((folder / WRITTEN).read_bytes(), str(folder / WRITTEN))
    except (OSError, LmlabError):
        return {}
    files = record.get("files") if isinstance(record, dict) else None
    if not isinstance(files, dict):
        return {}
    return {name: digest for name, digest in files.items()
            if isinstance(digest, str) and Path(name).name == name and name.endswith(".png")}


def _remove_if_unchanged(path: Path, digest: str) -> None:
    """Delete a chart lmlab wrote, if it is still the regular file with the bytes it wrote."""
    try:
        if stat.S_ISREG(os.lstat(path).st_mode) and sha256_file(path) == digest:
            path.unlink()
    except OSError:
        pass
