"""The surprisal of every token of a text (predict.surprisal), coloured from white (expected) through yellow to red
(surprising): in the terminal, or as a heatmap page whose tokens show the model's top-5 predictions on hover."""

from __future__ import annotations

import html

from ..loss import Metrics
from ..predict import TokenSurprisal
from ..tokenizer import visible
from .page import page

CSS = """
.text { font-family: ui-monospace, monospace; white-space: pre-wrap; line-height: 1.7; }
.t { border-radius: 2px; } .t:hover { outline: 2px solid #333; } .first { color: #888; }
.legend span { display: inline-block; padding: 0 .5em; }
"""


def _heat(bits: float, max_bits: float = 8.0) -> tuple[int, int, int]:
    """White for an expected token, through yellow to red for a surprising one."""
    t = max(0.0, min(1.0, bits / max_bits))
    return 255, int(255 - 120 * t), int(255 - 255 * min(1.0, 2 * t))


def terminal_colored(first: str, tokens: list[TokenSurprisal]) -> str:
    """The text with each token's background coloured by its surprisal (24-bit ANSI colours)."""
    parts = [first]
    for t in tokens:
        r, g, b = _heat(t.bits)
        parts.append(f"\x1b[48;2;{r};{g};{b}m\x1b[38;2;0;0;0m{t.text}\x1b[0m")
    return "".join(parts)


def surprisal_html(first: str, tokens: list[TokenSurprisal], metrics: Metrics, title: str) -> str:
    """A self-contained heatmap page: hover a token to see its surprisal and the model's top-5 predictions."""
    spans = [f'<span class="t first" title="first token: no prediction">{html.escape(first)}</span>']
    for t in tokens:
        r, g, b = _heat(t.bits)
        tip = f"{visible(t.text)}: {t.nats:.3f} nats = {t.bits:.3f} bits\n" + "\n".join(
            f"{visible(s)}  {p:.1%}" for s, p in t.top)
        body = html.escape(t.text).replace("\n", "↵<br>")
        spans.append(f'<span class="t" style="background:rgb({r},{g},{b})" title="{html.escape(tip)}">{body}</span>')
    summary = (f"{metrics.tokens:,} tokens predicted · loss {metrics.loss:.4f} nats/token · "
               f"{metrics.bits_per_token:.4f} bits/token · {metrics.bits_per_byte:.4f} bits/byte · "
               f"perplexity {metrics.perplexity:.3f} · accuracy {metrics.accuracy:.1%}")
    legend = "".join(f'<span style="background:rgb{_heat(bits)}">{label}</span>'
                     for bits, label in ((0, "0 bits"), (2, "2"), (4, "4"), (6, "6"), (8, "8+ bits")))
    return page(title, f"""<h1>{html.escape(title)}</h1>
<p>{summary}</p>
<p class="legend">surprisal: {legend} · hover a token for the model's top-5 predictions</p>
<div class="text">{''.join(spans)}</div>""", CSS)
