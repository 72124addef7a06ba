"""The one page shell of lmlab: every HTML page (the report, the inside page, the experiments' pages, the surprisal
heatmap) is page(title, body): self-contained, one style sheet, its charts embedded as data URIs (Images), which
the report and the experiments also save as PNG files beside it."""

from __future__ import annotations

import base64
import html
import math
import os
import re
from pathlib import Path

from matplotlib.figure import Figure

from ..common import LmlabError, atomic_write_bytes
from ..tokenizer import visible
from .chart import png_bytes

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


def page(title: str, body: str, css: str = "") -> str:
    """A self-contained HTML page: `title` in the browser's tab, the style sheet (plus the page's own `css`), `body`
    (which opens with the page's heading)."""
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">\n'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            f"<title>{html.escape(title)}</title>\n<style>{CSS}{css}</style></head>\n<body>\n{body}\n</body></html>\n")


class Images:
    """Collects the PNGs of a page: each is embedded as a data URI, and kept (file name -> bytes) to be saved."""

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


def slug(name: str) -> str:
    """A name (a run's) as a piece of a file name."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-.") or "run"


def none(text: str) -> str:
    """A line that says what is not there (yet)."""
    return f'<p class="none">{html.escape(text)}</p>'


def fmt(value, spec: str = ".4f") -> str:
    """A number for a table cell; "–" where there is none, or it is not finite."""
    if isinstance(value, (int, float)) and math.isfinite(value):
        return format(value, spec)
    return "–"


def section(section_id: str, title: str, body: str) -> str:
    return f'<section id="{section_id}">\n<h2>{html.escape(title)}</h2>\n{body}\n</section>'


def table_html(headers: list[str], rows: list[list[str]]) -> str:
    """A plain table of text cells."""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def top_cell(top: list) -> str:
    """A model's top predictions ([token, probability] pairs) as chips, each shaded by its probability."""
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


def shared_file_mode() -> int:
    """The mode of a file made to be shared: what the umask lets a new file have (atomic writes make private ones)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def write_shared(out: Path, text: str) -> Path:
    """Write a page to `out` atomically, readable as the umask allows; an LmlabError says why it cannot be."""
    try:
        atomic_write_bytes(out, text.encode("utf-8"))
        os.chmod(out, shared_file_mode())
    except OSError as e:
        raise LmlabError(f"cannot write {out}: {e.strerror or e}") from None
    return out
