"""The commands that draw what a run learnt: `lmlab surprisal`, `landscape`, `inside` and `report`, their options
and handlers."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import tyro
from typing_extensions import Annotated

from ..cli import parse
from ..common import LmlabError
from ..evaluate import eval_stride, text_tokens


@dataclass
class SurprisalArgs:
    """Per-token surprisal (loss) of a text under a trained run; the totals equal `lmlab eval` on that text."""

    run: Annotated[str, tyro.conf.Positional]
    """The run directory."""
    checkpoint: str = "best"
    """Which checkpoint to load: best (the lowest validation loss; an rl run's highest held-out reward), last (the newest) or a step number."""
    stride: Optional[int] = None
    """Windows start every this many tokens, as in `lmlab eval --stride` (default: block_size / 2)."""
    file: Annotated[Optional[str], tyro.conf.Positional] = None
    """A text file to score (or use --text)."""
    text: Optional[str] = None
    """The text to score."""
    out: Optional[str] = None
    """Write an HTML heatmap here (hover a token for the model's top-5 predictions)."""
    json: bool = False
    """Print JSON (every token with nats and bits, and the totals)."""
    device: str = "auto"
    """auto, cpu, cuda or mps."""


def cmd_surprisal(argv: list[str]) -> int:
    from ..run import load_run
    from ..common import atomic_write_bytes, resolve_device
    from ..data import Corpus, iter_text
    from ..predict import surprisal
    from .surprisal import surprisal_html, terminal_colored

    args = parse(SurprisalArgs, argv, "lmlab surprisal")
    if (args.text is None) == (args.file is None):
        raise LmlabError("give either --text TEXT or a FILE")
    if args.file is not None:
        path = Path(args.file)
        if not path.is_file():
            raise LmlabError(f"no such file: {args.file}")
        text = "".join(iter_text(Corpus(args.file, [path])))
    else:
        text = args.text
    run = load_run(args.run, resolve_device(args.device), args.checkpoint)
    stride = eval_stride(args.stride, run.model.cfg.block_size)
    tokens, metrics, first = surprisal(run.model, run.tokenizer, text, stride=stride)
    if args.out:
        page = surprisal_html(first, tokens, metrics, f"surprisal under {run.run_dir}")
        atomic_write_bytes(args.out, page.encode("utf-8"))
        print(f"heatmap written to {args.out}", file=sys.stderr)
    if args.json:
        print(json.dumps({**metrics.as_dict(), "stride": stride, "first": first,
                          "per_token": [{"token": t.text, "nats": t.nats, "bits": t.bits, "top": t.top}
                                        for t in tokens]}))
        return 0
    if sys.stdout.isatty():
        print(terminal_colored(first, tokens))
    else:
        for t in tokens:
            print(f"{t.nats:8.3f} nats {t.bits:8.3f} bits  {t.text!r}")
    print(f"{metrics.tokens:,} tokens: loss {metrics.loss:.4f} nats/token, {metrics.bits_per_token:.4f} bits/token, "
          f"{metrics.bits_per_byte:.4f} bits/byte, perplexity {metrics.perplexity:.3f}, accuracy {metrics.accuracy:.1%}")
    return 0


@dataclass
class LandscapeArgs:
    """Plot the loss around a run's trained weights on a fixed validation batch."""

    run: Annotated[str, tyro.conf.Positional]
    """The run directory."""
    checkpoint: str = "best"
    """Which checkpoint to load: best (the lowest validation loss; an rl run's highest held-out reward), last (the newest) or a step number."""
    two_d: Annotated[bool, tyro.conf.arg(name="2d")] = False
    """Also scan a 2-D plane (contour plot) and draw the training trajectory."""
    points: int = 21
    """Grid points per direction."""
    span: float = 1.0
    """Scan from -span to +span along each direction (1 = the size of the weights, filter by filter)."""
    batch_size: int = 8
    """Validation windows in the fixed batch."""
    seed: int = 1337
    """Seed of the random directions."""
    data: Optional[str] = None
    """Text whose windows make the batch (a file, folder, glob or corpus name); default: the run's validation
    split."""
    trust_data_path: bool = False
    """Read the corpus path that the run's config names although the run was not made here, in this folder (it was
    copied, moved or shared); without it such a run needs --data."""
    out: Optional[str] = None
    """Folder for landscape.json and the PNGs (default: RUN/landscape)."""
    device: str = "auto"
    """auto, cpu, cuda or mps."""


def cmd_landscape(argv: list[str]) -> int:
    from .. import rundir
    from ..run import load_run
    from ..common import resolve_device
    from .landscape import landscape

    args = parse(LandscapeArgs, argv, "lmlab landscape")
    if args.points < 3 or args.span <= 0 or args.batch_size <= 0:
        raise LmlabError("--points must be >= 3, --span and --batch-size positive")
    run = load_run(args.run, resolve_device(args.device), args.checkpoint)
    val = text_tokens(run, args.data, args.trust_data_path, "lmlab landscape")
    out_dir = Path(args.out) if args.out else run.run_dir / rundir.LANDSCAPE
    result = landscape(run.run_dir, run.model, val, args.two_d, args.points, args.span, args.batch_size, args.seed,
                       out_dir)
    one = result["one_d"]
    print(f"loss at the trained weights: {one['center_loss']:.4f}; along a random direction it ranges "
          f"{min(one['losses']):.4f} .. {max(one['losses']):.4f} over [-{args.span:g}, {args.span:g}]")
    if "trajectory" in result:
        t = result["trajectory"]
        print(f"trajectory: {len(t['steps'])} snapshots; its 2 principal directions explain "
              f"{sum(t['explained_variance']):.0%} of its variance")
    print(f"written to {out_dir}: " + ", ".join(sorted(p.name for p in out_dir.glob("*"))))
    return 0


@dataclass
class InsideArgs:
    """What the model learnt inside it, as training recorded it at every evaluation: head scores on a random sequence
    repeated twice (previous-token, induction, duplicate-token), the loss on each copy, the loss by position in the
    window, attention patterns and the logit lens."""

    run: Annotated[str, tyro.conf.Positional]
    """The run directory."""
    step: Optional[int] = None
    """Only this evaluation step (default: the table at the last one; with --json, every step)."""
    json: bool = False
    """Print one JSON object: heads (step, layer, head and the three scores), repeat_loss, loss_by_position."""
    out: Optional[str] = None
    """Also write a self-contained HTML page here: the scores over steps, heatmaps and the logit lens."""


def cmd_inside(argv: list[str]) -> int:
    from ..inside import at_step, head_table, summary
    from ..run import Run

    args = parse(InsideArgs, argv, "lmlab inside")
    run = Run.open(args.run)
    records = run.inside()
    if not records:
        why = "it was trained with --no-inside" if run.config.inside is False else "it has no evaluation yet"
        raise LmlabError(f"nothing was recorded inside the model of {args.run}: {why}")
    chosen = at_step(records, args.step)
    if args.out:
        from .inside_page import write_inside_page

        write_inside_page(args.run, args.out, chosen[-1]["step"])
        print(f"page written to {args.out}", file=sys.stderr)
    if args.json:
        print(json.dumps(summary(chosen)))
    else:
        print(head_table(chosen[-1]))
    return 0


@dataclass
class ReportArgs:
    """One self-contained HTML page (and its PNGs) with the curves, probes, samples and config of one or more runs."""

    runs: Annotated[list[str], tyro.conf.Positional, tyro.conf.arg(metavar="RUN [RUN ...]")]
    """Run directories (at least one); several go on shared charts, one line per run."""
    out: str = "report.html"
    """Where to write the page; its PNGs go to a folder beside it named <out-stem>_files."""
    log: bool = False
    """Loss on a log y-axis (and tokens on a log x-axis)."""


def cmd_report(argv: list[str]) -> int:
    from .report_page import write_report

    args = parse(ReportArgs, argv, "lmlab report")
    out = write_report(args.runs, args.out, args.log)
    print(f"report written to {out} (PNGs in {out.with_name(out.stem + '_files')})", file=sys.stderr)
    return 0
