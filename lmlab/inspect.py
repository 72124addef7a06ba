"""Looking inside a trained model: the next-token distribution for a prompt, and the surprisal of every token
of a text (the per-token loss that `lmlab eval` averages)."""

from __future__ import annotations

import html
from dataclasses import dataclass

import torch

from .data import encode_text
from .evaluate import stream_losses
from .loss import LN2, Metrics
from .sample import prompt_ids, sampling_probs
from .tokenizer import visible


@dataclass
class NextTokenRow:
    rank: int
    token_id: int
    token: str
    """The token's text, made visible (␣ for a space, \\n for a newline)."""
    probability: float
    cumulative: float
    logit: float
    kept: bool
    """Whether the sampling settings keep this token."""
    renormalized: float
    """Its probability after temperature, top-k and top-p (0 when not kept)."""


@torch.no_grad()
def next_token_distribution(model, tokenizer, prompt: str, top: int = 10, temperature: float = 1.0,
                            top_k: int = 0, top_p: float = 1.0) -> list[NextTokenRow]:
    """The model's distribution over the token after `prompt`: the `top` most likely tokens, most likely first.

    `probability` is the plain softmax of the logits; `renormalized` is what sampling with the given temperature,
    top-k and top-p would draw from (temperature 0 keeps only the most likely token).
    """
    ids = prompt_ids(tokenizer, prompt)[-model.cfg.block_size:]
    device = next(model.parameters()).device
    logits = model(torch.tensor([ids], device=device))[0, -1].float().cpu()
    probs = logits.softmax(-1)
    sampled = sampling_probs(logits, temperature, top_k, top_p)
    order = torch.argsort(probs, descending=True)[: max(1, top)]
    cumulative = probs[order].cumsum(0)
    rows = []
    for rank, (i, cum) in enumerate(zip(order.tolist(), cumulative.tolist()), start=1):
        rows.append(NextTokenRow(rank, i, visible(tokenizer.decode([i])), float(probs[i]), cum, float(logits[i]),
                                 bool(sampled[i] > 0), float(sampled[i])))
    return rows


@dataclass
class TokenSurprisal:
    token_id: int
    text: str
    nats: float
    top: list[tuple[str, float]]
    """The model's top predictions at this position: (token text, probability)."""

    @property
    def bits(self) -> float:
        return self.nats / LN2


@torch.no_grad()
def surprisal(model, tokenizer, text: str, top: int = 5, batch_size: int = 32,
              stride: int = 0) -> tuple[list[TokenSurprisal], Metrics, str]:
    """Per-token loss of `text`, windowed exactly as `lmlab eval` does with the same stride (so the totals are the
    same numbers; 0: non-overlapping windows).

    Returns the tokens after the first (each with its surprisal and the model's top predictions there), the
    metrics over them, and the text of the first token, which has no prediction.
    """
    ids = encode_text(tokenizer, text)
    if len(ids) < 2:
        from .common import LmlabError

        raise LmlabError("the text needs at least 2 tokens: the first one is the context for the second")
    losses = stream_losses(model, ids, model.cfg.block_size, batch_size, top=top, stride=stride)
    metrics = losses.metrics(torch.from_numpy(tokenizer.byte_lengths()))
    out = [TokenSurprisal(target, tokenizer.decode([target]), nats,
                          [(tokenizer.decode([i]), q) for q, i in zip(probs, top_ids)])
           for target, nats, probs, top_ids in zip(losses.targets.tolist(), losses.nats.tolist(),
                                                   losses.top_probs.tolist(), losses.top_ids.tolist())]
    return out, metrics, tokenizer.decode([int(ids[0])])


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
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; max-width: 60em; }}
.text {{ font-family: ui-monospace, monospace; white-space: pre-wrap; line-height: 1.7; }}
.t {{ border-radius: 2px; }} .t:hover {{ outline: 2px solid #333; }} .first {{ color: #888; }}
.legend span {{ display: inline-block; padding: 0 .5em; }}
</style></head><body>
<h1>{html.escape(title)}</h1>
<p>{summary}</p>
<p class="legend">surprisal: <span style="background:rgb{_heat(0)}">0 bits</span><span style="background:rgb{_heat(2)}">2</span><span style="background:rgb{_heat(4)}">4</span><span style="background:rgb{_heat(6)}">6</span><span style="background:rgb{_heat(8)}">8+ bits</span> · hover a token for the model's top-5 predictions</p>
<div class="text">{''.join(spans)}</div>
</body></html>
"""
