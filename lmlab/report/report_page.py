"""`lmlab report`: one self-contained HTML page (plus its PNGs) that shows what training wrote: loss, schedule,
gradients, throughput, probes, inside the model, samples, loss landscape and config, for one run or several side by
side. It reads run folders; nothing imports it."""

from __future__ import annotations

import hashlib
import html
import json
import os
import shlex
import stat
import time
from pathlib import Path

from .. import __version__, rundir
from ..common import LmlabError, atomic_write_bytes, atomic_write_json, fmt_count, sha256_file
from ..rundir import run_names
from ..tokenizer import visible
from .chart import PNG_SIGNATURE, plain_text
from .curves import (accuracy_figure, answers_figure, grad_norm_figure, layer_figure, loss_figure, lr_figure,
                     rewards_figure, throughput_figure)
from .inside_page import inside_section
from .logs import RunLogs, best_eval, load_run_logs
from .page import Images, fmt, none, page, section, shared_file_mode, slug, top_cell


def overfitting_note(run: RunLogs) -> str:
    """One sentence when the run overfitted: from which step, after how many passes, and which model is kept."""
    first = next((r for r in run.evals if r.overfitting), None)
    best = best_eval(run)
    if first is None or best is None:
        return ""
    passes = f" ({first.passes:.1f} passes over the training text)" if first.passes is not None else ""
    return (f"<p class=warn><b>{html.escape(run.name)} overfitted</b>: from step {first.step}{passes} its "
            f"validation loss rose while its training loss fell, so it was memorising its training text. The best "
            f"evaluation, at step {best.step} (val loss {best.val_loss:.4f}), has the checkpoint that sample, "
            f"eval, export and serve load by default.</p>")


def _missing(runs: list[RunLogs], has, what: str) -> str:
    """A line that names the runs a chart has no data for (an empty string when all have some)."""
    lacking = [r.name for r in runs if not has(r)]
    if not lacking:
        return ""
    return none(f"no {what} yet for {', '.join(lacking)}")


def _loss_section(runs: list[RunLogs], images: Images, log: bool) -> str:
    if not any(r.train or r.evals for r in runs):
        return section("loss", "Loss", none("no training or validation loss logged yet: train the run first")
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
        parts.append('<div id="accuracy">' + none("no evaluation yet, so no accuracy") + "</div>")
    parts.append(images.chart("loss_tokens.png", loss_figure(runs, "tokens", log), f"loss against tokens{scale}"))
    for run in runs:  # fine-tuning on conversations with a verifier: its held-out answers
        if any(r.exact_match for r in run.evals):
            parts.append(images.chart(f"{slug(run.name)}_answers.png", answers_figure(run),
                                      f"{run.name}: exact match of held-out answers by skill, and ended turns"))
        if any(r.reward is not None for r in run.train):  # reinforcement learning: its rewards
            parts.append(images.chart(f"{slug(run.name)}_rewards.png", rewards_figure(run),
                                      f"{run.name}: training and held-out rewards against steps"))
    parts.append("</div>")
    parts.append(_missing(runs, lambda r: r.train, "training steps logged"))
    parts.append(_missing(runs, lambda r: r.evals, "evaluations logged"))
    return section("loss", "Loss", "\n".join(parts))


def _simple_section(section_id: str, title: str, runs: list[RunLogs], images: Images, filename: str, fig_fn,
                    alt: str, intro: str) -> str:
    if not any(r.train for r in runs):
        return section(section_id, title, none("no training steps logged yet"))
    body = (f"<p>{intro}</p><div class=charts>{images.chart(filename, fig_fn(runs), alt)}</div>"
            + _missing(runs, lambda r: r.train, "training steps logged"))
    return section(section_id, title, body)


def _gradients_section(runs: list[RunLogs], images: Images) -> str:
    parts = []
    if any(r.train for r in runs):
        parts.append("<p>The global gradient norm of every step, before clipping (log scale; x: a clipped step, "
                     "dashed: the clip threshold).</p><div class=charts>")
        parts.append(images.chart("grad_norm.png", grad_norm_figure(runs), "global gradient norm against steps"))
        parts.append("</div>")
    else:
        parts.append(none("no training steps logged yet"))
    parts.append(f"<h3>Per layer</h3><p>From {rundir.TELEMETRY}: each layer's gradient norm, and how far one optimizer "
                 "step moves its weights relative to their size (||update|| / ||weights||; log scale).</p>")
    for run in runs:
        if not run.telemetry:
            why = " (telemetry is off: --telemetry-interval 0)" if run.config.telemetry_interval == 0 else ""
            parts.append(none(f"{run.name}: no per-layer telemetry yet{why}"))
            continue
        stem = slug(run.name)
        parts.append('<div class="charts">')
        parts.append(images.chart(f"{stem}_layer_grad_norm.png", layer_figure(run, "grad_norm"),
                                  f"{run.name}: per-layer gradient norm"))
        parts.append(images.chart(f"{stem}_update_ratio.png", layer_figure(run, "update_ratio"),
                                  f"{run.name}: per-layer update-to-weight ratio"))
        parts.append("</div>")
    return section("gradients", "Gradients", "\n".join(parts))


def _probes_section(runs: list[RunLogs]) -> str:
    parts = ["<p>At every evaluation, training asks the model for its 5 most likely next tokens after fixed prompts "
             "(whitespace made visible: ␣ is a space, \\n a newline) and a greedy continuation. Read down a table to "
             "watch predictions go from noise to text.</p>"]
    for run in runs:
        if not run.probes:
            parts.append(none(f"{run.name}: no probes yet (they are recorded at each evaluation)"))
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
                                    f'<td>{top_cell(p.get("top") or [])}</td>'
                                    f'<td class="text"><span class="prompt">{html.escape(str(prompt))}</span>'
                                    f'{html.escape(str(p.get("continuation", "")))}</td></tr>')
            parts.append(f'<h3>{html.escape(run.name)}, prompt {k + 1}: <code>{html.escape(visible(str(prompt)))}'
                         f'</code></h3>')
            parts.append('<table class="probe"><thead><tr><th>step</th><th>top-5 next tokens</th>'
                         '<th>greedy continuation (prompt greyed)</th></tr></thead><tbody>'
                         + "\n".join(rows) + "</tbody></table>")
    return section("probes", "Probes: predictions over training", "\n".join(parts))


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
            parts.append(none(f"{run.name}: no samples yet (training writes one at the end when "
                              f"--sample-tokens is above 0)"))
    return section("samples", "Samples", "\n".join(parts))


def _completions_section(runs: list[RunLogs]) -> str:
    """--stage rl: the completions logged at each evaluation with their rewards, one fold per step."""
    parts = ["<p>At every evaluation of a reinforcement-learning run: greedy completions of the first held-out "
             "prompts, and the last training step's first group of sampled completions, each with its reward. Open "
             "a step to read them.</p>"]
    for run in runs:
        for record in run.completions:
            rows = [f'<tr><td>{kind}</td><td class="text">{html.escape(str(c["prompt"]))}</td>'
                    f'<td class="text">{html.escape(str(c["completion"]))}</td><td class="num">{fmt(c["reward"])}'
                    f'</td></tr>' for kind in ("held_out", "train") for c in record.get(kind, [])]
            parts.append(f"<details><summary>{html.escape(run.name)}, step {record['step']}</summary>"
                         '<table class="probe"><thead><tr><th></th><th>prompt</th><th>completion</th><th>reward</th>'
                         "</tr></thead><tbody>" + "\n".join(rows) + "</tbody></table></details>")
    return section("completions", "Completions and rewards", "\n".join(parts))


def _landscape_section(runs: list[RunLogs], images: Images) -> str:
    parts = []
    for run in runs:
        pngs = []
        for path in run.landscape_pngs:
            try:
                data = run.run.landscape_image(path)
            except (LmlabError, OSError):
                continue  # not a regular file of the run (a link, a folder): never read through
            if data.startswith(PNG_SIGNATURE):
                pngs.append(images.add(f"{slug(run.name)}_landscape_{slug(path.stem)}.png", data,
                                       f"{run.name}: {path.name}"))
        if pngs:
            parts.append(f"<h3>{html.escape(run.name)}</h3><div class=charts>{''.join(pngs)}</div>")
        else:
            command = html.escape(f"lmlab landscape {shlex.quote(str(run.path))} --2d")
            parts.append(f'<p class="none">{html.escape(run.name)}: no loss landscape was computed. Compute one '
                         f'with <code>{command}</code>, then build this report again.</p>')
    return section("landscape", "Loss landscape", "\n".join(parts))


def summary_row(run: RunLogs) -> dict:
    """The headline numbers of a run, from its last records."""
    last_eval = run.evals[-1] if run.evals else None
    best = best_eval(run)
    last = max((r for r in (run.train[-1] if run.train else None, last_eval) if r is not None),
               key=lambda r: r.step, default=None)
    return {"run": run.name, "steps": last.step if last else None, "tokens": last.tokens if last else None,
            "best_val_loss": best.val_loss if best else None,
            "last_val_loss": last_eval.val_loss if last_eval else None,
            "val_bits_per_byte": last_eval.val_bits_per_byte if last_eval else None,
            "val_accuracy": last_eval.val_accuracy if last_eval else None,
            "train_time_s": last.elapsed_s if last else None, "val_stride": last_eval.val_stride if last_eval else None,
            "block_size": run.config.model.block_size}


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
        rows.append(f"<tr><td>{html.escape(s['run'])}</td><td class=num>{fmt(s['steps'], 'd')}</td>"
                    f"<td class=num>{fmt_count(s['tokens']) if isinstance(s['tokens'], int) else '–'}</td>"
                    f"<td class=num>{fmt(s['best_val_loss'])}</td><td class=num>{fmt(s['last_val_loss'])}</td>"
                    f"<td class=num>{fmt(s['val_bits_per_byte'])}</td><td class=num>{acc}</td>"
                    f"<td class=num>{_stride_cell(s)}</td><td class=num>{fmt(s['train_time_s'], '.1f')}</td></tr>")
    parts = ['<table class="summary"><thead><tr><th>run</th><th>steps</th><th>tokens</th><th>best val loss</th>'
             '<th>last val loss</th><th>bits/byte</th><th>val accuracy</th><th>measured with</th>'
             '<th>training time (s)</th></tr></thead><tbody>' + "\n".join(rows) + "</tbody></table>"]
    for run in runs:
        parts.append(f"<h3>{html.escape(run.name)}: {rundir.CONFIG} <span class=file>({html.escape(str(run.path))})"
                     f"</span></h3><pre class=config>{html.escape(json.dumps(run.run.config_json, indent=2))}</pre>")
    return section("config", "Runs and config", "\n".join(parts))


SECTIONS = [("loss", "loss"), ("schedule", "schedule"), ("gradients", "gradients"), ("throughput", "throughput"),
            ("probes", "probes"), ("inside", "inside"), ("samples", "samples"),
            ("completions", "completions"),  # --stage rl runs only
            ("landscape", "landscape"), ("config", "config")]


@plain_text
def build_page(runs: list[RunLogs], log: bool = False) -> tuple[str, dict[str, bytes]]:
    """The HTML page and its PNGs (file name -> bytes) for these runs."""
    images = Images()
    sections = [
        _loss_section(runs, images, log),
        _simple_section("schedule", "Learning-rate schedule", runs, images, "lr.png", lr_figure,
                        "learning rate against steps", "The learning rate of each optimizer step."),
        _gradients_section(runs, images),
        _simple_section("throughput", "Throughput", runs, images, "throughput.png", throughput_figure,
                        "tokens per second against steps",
                        "Training tokens per second of each step (evaluation excluded; faint: raw, solid: smoothed)."),
        _probes_section(runs),
        inside_section(runs, images),
        _samples_section(runs),
        *([_completions_section(runs)] if any(r.completions for r in runs) else []),
        _landscape_section(runs, images),
        _config_section(runs),
    ]
    names = ", ".join(r.name for r in runs)
    shown = [(sid, label) for sid, label in SECTIONS if sid != "completions" or any(r.completions for r in runs)]
    nav = " ".join(f'<a href="#{sid}">{label}</a>' for sid, label in shown)
    body = f"""<h1>lmlab report: {html.escape(names)}</h1>
<p class="meta">{len(runs)} run{'s' if len(runs) != 1 else ''}, built {time.strftime('%Y-%m-%d %H:%M:%S')} by lmlab
{__version__}{'; loss on log scales' if log else ''}. Every chart is also saved as a PNG in the files folder next to
this page.</p>
<nav>{nav}</nav>
{chr(10).join(sections)}"""
    return page(f"lmlab report: {names}", body), images.files


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
        mode = shared_file_mode()  # atomic writes create private (0600) files; a report is made to be shared
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
