"""An experiment's page (`lmlab experiment NAME` writes DIR/index.html): how it was run, its conclusion and the
claims behind it, its measurements and its charts, each chart also saved as a PNG beside the page."""

from __future__ import annotations

import html
from pathlib import Path

from ..common import atomic_write_bytes
from .page import Images, page, table_html

CSS = ".conclusion { background: #f4f8fc; border-left: 4px solid #1f77b4; padding: 10px 14px; }\n"


def write_experiment_page(out: Path, result: dict, title: str, idea: str, table: tuple[list[str], list[list[str]]],
                          charts: list, examples: str = "", runs_folder: str = "runs") -> Path:
    """DIR/index.html, self-contained (charts as data URIs), and every chart, (file name, figure, caption), as a
    PNG in DIR. `result` is the experiment's result.json; its training runs are in DIR/`runs_folder`."""
    images = Images()
    figures = "".join(images.chart(filename, fig, alt) for filename, fig, alt in charts)
    for filename, data in images.files.items():
        atomic_write_bytes(out / filename, data)
    claims = "".join(f"<li>{html.escape(k.replace('_', ' '))}: <b>{'yes' if v else 'no'}</b></li>"
                     for k, v in result["claims"].items())
    machine = result["machine"]
    body = f"""<h1>lmlab experiment {html.escape(result['experiment'])}: {html.escape(title)}</h1>
<p class="meta"><code>{html.escape(result['command'])}</code> · seed {result['seed']} · data
{html.escape(str(result['data']))}{' · quick (micro budget)' if result['quick'] else ''} ·
{result['wall_time_s']:.0f} s on {html.escape(machine['cpu'])} ({machine['torch_threads']} threads) · lmlab
{html.escape(machine['lmlab'])}, torch {html.escape(machine['torch'])}</p>
<p>{html.escape(idea)}</p>
<h2>Conclusion (computed from the measurements)</h2>
<p class="conclusion">{html.escape(result['conclusion'])}</p>
<ul>{claims}</ul>
<h2>Measurements</h2>
{table_html(*table)}
{examples}
<div class="charts">{figures}</div>
<p class="meta">Every number on this page is in result.json; the training runs are in {runs_folder}/ (open one with
<code>lmlab report</code>), and their progress lines in log.txt.</p>"""
    atomic_write_bytes(out / "index.html", page(f"lmlab experiment {result['experiment']}", body, CSS).encode("utf-8"))
    return out / "index.html"
