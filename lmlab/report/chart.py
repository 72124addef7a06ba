"""The one chart style of lmlab: every chart (the report's, the inside page's, the experiments', the landscape's) is a
matplotlib Figure on the Agg canvas made by figure() or canvas(), coloured from COLORS, finished by finish() and
written by png_bytes(). No pyplot and no matplotlib.use: drawing a chart touches no global state."""

from __future__ import annotations

import functools
import io
import math

import matplotlib
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"]


def color(i: int) -> str:
    """The i-th line's colour (run, objective, optimizer...), cycling through COLORS."""
    return COLORS[i % len(COLORS)]


def canvas(width: float, height: float, dpi: int = 110) -> Figure:
    """An empty figure of width x height inches on the Agg canvas, laid out by matplotlib's constrained layout."""
    fig = Figure(figsize=(width, height), dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def figure(title: str, xlabel: str, ylabel: str, title_size: float = 11, size: tuple[float, float] = (6.4, 3.8)):
    """One chart's figure and axes: titled, labelled, with a light grid."""
    fig = canvas(*size)
    ax = fig.add_subplot()
    ax.set_title(title, fontsize=title_size)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    return fig, ax


def _plain_log_axis(axis) -> None:
    """Log-axis labels as plain numbers (0.3, 2, 1e-05 rather than 3x10^-1); minor ones only on a short range."""
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))

    def minor(v, _):
        lo, hi = sorted(axis.get_view_interval())
        if v <= 0 or lo <= 0 or hi / lo > 30:
            return ""
        mantissa = round(v / 10 ** math.floor(math.log10(v)))
        return f"{v:g}" if hi / lo < 4 or mantissa in (2, 5) else ""

    axis.set_minor_formatter(FuncFormatter(minor))


def finish(fig: Figure, legend: str = "best") -> Figure:
    """Every axes of the figure: plain numbers on its log axes, and a legend where lines are labelled (unless it
    has one already)."""
    for ax in fig.axes:
        for axis in (ax.xaxis, ax.yaxis):
            if axis.get_scale() == "log":
                _plain_log_axis(axis)
        if ax.get_legend() is None and ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8, loc=legend)
    return fig


def png_bytes(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def plain_text(draw):
    """`draw` with every text drawn as it is: run names, prompts, tokens and layer names come from runs, and
    matplotlib would parse $...$ in them as math (failing on a word such as \\foo)."""

    @functools.wraps(draw)
    def drawn(*args, **kwargs):
        with matplotlib.rc_context({"text.parse_math": False}):
            return draw(*args, **kwargs)

    return drawn


def finite_points(xs: list, ys: list, positive_x: bool = False, positive_y: bool = False) -> tuple[list, list]:
    """The points whose x and y are finite numbers (and positive where a log axis needs it)."""
    keep = [(x, y) for x, y in zip(xs, ys)
            if isinstance(y, (int, float)) and math.isfinite(y) and (not positive_y or y > 0)
            and isinstance(x, (int, float)) and (not positive_x or x > 0)]
    return [k[0] for k in keep], [k[1] for k in keep]


def smooth(values: list[float]) -> list[float]:
    """A light, bias-corrected exponential moving average of the finite values; the weight grows with their number
    (none under 20 points). A value that is not finite stays out of the average, and NaN in the result."""
    kept = sum(1 for v in values if math.isfinite(v))
    weight = min(0.9, max(0.0, 1.0 - 20.0 / max(kept, 1)))
    out, avg, norm = [], 0.0, 0.0
    for v in values:
        if not math.isfinite(v):
            out.append(math.nan)
            continue
        avg = weight * avg + (1 - weight) * v
        norm = weight * norm + (1 - weight)
        out.append(avg / norm)
    return out
