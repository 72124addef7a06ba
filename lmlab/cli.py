"""The `lmlab` command: one subcommand per stage, options generated from the config dataclasses by tyro."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal, Optional

import tyro
from typing_extensions import Annotated

from .common import LmlabError
from .sample import SampleConfig

SUBCOMMANDS = {
    "train": "train a model (default: the tiny preset on the built-in corpus, about 5 minutes on a CPU)",
    "sample": "generate text from a trained run, streamed to the terminal",
    "eval": "loss, bits/byte, perplexity and accuracy of a run on its validation split or any text",
    "data": "list the built-in and named corpora, or prepare (tokenize and cache) a corpus",
    "next": "the next-token distribution after a prompt, and which tokens sampling settings keep",
    "surprisal": "per-token loss of a text, coloured in the terminal or as an HTML heatmap",
    "landscape": "the loss around the trained weights along random directions, and the training trajectory",
    "report": "one self-contained HTML page (and PNGs) with the curves, probes, samples and config of runs",
    "export": "copy a run with its newest checkpoint as single files (e.g. from sharded FSDP checkpoints)",
    "bench": "measure hardware peak, training throughput and MFU, time to quality, generation and data speed",
    "serve": "a local web app (live training charts, next-token playground) and an OpenAI-compatible API",
}


def _one_line(text: str) -> str:
    """Fold tyro's boxed error message into one line."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    body, seps = [], 0
    for ln in lines:
        if set(ln) <= set("-─━╌│|╭╮╰╯ "):
            seps += 1
            if seps >= 2:
                break
            continue
        if seps == 1:
            body.append(ln.strip("│ "))
    return " ".join(body) or (lines[0] if lines else "invalid arguments")


def parse(cls, args: list[str], prog: str, default=None, description: Optional[str] = None):
    """tyro.cli with flat option names; bad options become one clear line and exit code 2."""
    err, out = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            return tyro.cli(cls, args=args, prog=prog, default=default, description=description,
                            config=(tyro.conf.OmitArgPrefixes,))
    except SystemExit as e:
        if e.code in (0, None):
            sys.stdout.write(out.getvalue())
            raise
        raise LmlabError(f"{_one_line(err.getvalue() or out.getvalue())} (see {prog} --help)") from None


# ---------------------------------------------------------------------------------------------------------------
# train


def cmd_train(argv: list[str]) -> int:
    from .config import PRESETS, TrainConfig, get_preset
    from .train import train

    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--preset", default="tiny")
    pre.add_argument("--resume", default=None)
    known, _ = pre.parse_known_args(argv)
    if known.resume:
        from .rundir import read_config

        base = TrainConfig.from_json(read_config(Path(known.resume)))
        base.resume = known.resume
        base.parallel = "none"  # how to launch is chosen anew each time: a run may resume on another world size
    else:
        base = get_preset(known.preset)
    desc = ("Train a language model. Presets: " + ", ".join(PRESETS) + ". Every option below overrides the preset; "
            "with --resume, the run's own settings are the defaults. A setting shown as None is picked for the time "
            "budget (--max-time).")
    cfg = parse(TrainConfig, argv, "lmlab train", default=base, description=desc)
    summary = train(cfg)  # which applies the budget rules
    if summary["rank"] == 0:
        print(f"run saved in {summary['run_dir']}", file=sys.stderr)
    return 0


# ---------------------------------------------------------------------------------------------------------------
# sample


@dataclass
class SampleArgs:
    """Generate text from a trained run."""

    run: Annotated[str, tyro.conf.Positional]
    """The run directory."""
    settings: SampleConfig = field(default_factory=SampleConfig)


def cmd_sample(argv: list[str]) -> int:
    import torch

    from .checkpoint import load_run
    from .common import resolve_device
    from .sample import generate, prompt_ids, stream_text

    args = parse(SampleArgs, argv, "lmlab sample")
    settings = args.settings
    run = load_run(args.run, resolve_device(settings.device))
    ids = prompt_ids(run.tokenizer, settings.prompt)
    generator = torch.Generator().manual_seed(settings.seed)
    tokens = generate(run.model, ids, settings.max_new_tokens, settings.temperature, settings.top_k, settings.top_p,
                      generator, use_cache=not settings.no_cache, compile=settings.compile)
    sys.stdout.write(settings.prompt)
    sys.stdout.flush()
    for piece in stream_text(run.tokenizer, tokens, settings.stop):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


# ---------------------------------------------------------------------------------------------------------------
# export


@dataclass
class ExportArgs:
    """Copy a run with its newest checkpoint as single files (e.g. a sharded FSDP run), resumable by one process."""

    run: Annotated[str, tyro.conf.Positional]
    """The run directory."""
    out: Annotated[str, tyro.conf.Positional]
    """Where to write the single-file copy (a new or empty directory)."""
    trust_pickle: bool = False
    """Also convert a checkpoint in the torch.distributed.checkpoint format of older lmlab versions. Loading one
    unpickles its metadata, which can run code from it: only for runs from a source you trust."""


def cmd_export(argv: list[str]) -> int:
    from .checkpoint import export_run

    args = parse(ExportArgs, argv, "lmlab export")
    path = export_run(args.run, args.out, trust_pickle=args.trust_pickle)
    print(f"exported {args.run} to {args.out} (checkpoint {path.name}, single files)", file=sys.stderr)
    return 0


# ---------------------------------------------------------------------------------------------------------------
# eval


@dataclass
class EvalArgs:
    """Evaluate a run: every token of the text after the first is predicted once, in block_size windows."""

    run: Annotated[str, tyro.conf.Positional]
    """The run directory."""
    data: Optional[str] = None
    """Text to evaluate (a file, folder, glob or corpus name); default: the run's validation split."""
    json: bool = False
    """Print one JSON object (loss, bits_per_byte, perplexity, accuracy, tokens)."""
    batch_size: int = 32
    """Windows per forward pass."""
    device: str = "cpu"
    """auto, cpu, cuda or mps."""


def cmd_eval(argv: list[str]) -> int:
    import torch

    from .checkpoint import load_run
    from .common import resolve_device
    from .data import load_splits, prepare, resolve_source
    from .config import TrainConfig
    from .evaluate import evaluate

    args = parse(EvalArgs, argv, "lmlab eval")
    run = load_run(args.run, resolve_device(args.device))
    if args.data:
        tokens = prepare(resolve_source(args.data), run.tokenizer.kind, tokenizer=run.tokenizer).tokens
        source = args.data
    else:
        cfg = TrainConfig.from_json(run.config)
        tokens = load_splits(cfg.data, tokenizer=run.tokenizer).val
        source = "validation split"
    if len(tokens) < 2:
        raise LmlabError(f"{source} has fewer than 2 tokens; nothing to evaluate")
    token_bytes = torch.from_numpy(run.tokenizer.byte_lengths())
    m = evaluate(run.model, tokens, token_bytes, run.model.cfg.block_size, args.batch_size)
    result = {"loss": m.loss, "bits_per_byte": m.bits_per_byte, "perplexity": m.perplexity,
              "accuracy": m.accuracy, "tokens": m.tokens}
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{source} of {run.run_dir} ({run.checkpoint.path.name}): {m.tokens:,} tokens predicted")
        print(f"  loss        {m.loss:.4f} nats/token ({m.bits_per_token:.4f} bits/token)")
        print(f"  bits/byte   {m.bits_per_byte:.4f}")
        print(f"  perplexity  {m.perplexity:.3f}")
        print(f"  accuracy    {m.accuracy:.2%} (top-1)")
    return 0


# ---------------------------------------------------------------------------------------------------------------
# data


@dataclass
class DataArgs:
    """`lmlab data list` shows the corpora; `lmlab data prepare SRC ...` tokenizes them into the cache."""

    action: Annotated[Literal["list", "prepare"], tyro.conf.Positional]
    """list or prepare."""
    sources: Annotated[list[str], tyro.conf.Positional] = field(default_factory=list)
    """Corpora to prepare: files, folders, globs, 'builtin' or names from `lmlab data list`."""
    tokenizer: Literal["char", "byte", "bpe"] = "char"
    """char, byte or bpe."""
    vocab_size: int = 2048
    """Vocabulary size for bpe."""


def cmd_data(argv: list[str]) -> int:
    from .common import cache_dir
    from .data import BUILTIN, NAMED_CORPORA, builtin_text, prepare, resolve_source

    args = parse(DataArgs, argv, "lmlab data")
    if args.action == "list":
        text = builtin_text()
        print(f"{BUILTIN:16s} Python's documentation topics (pydoc_data), {len(text):,} characters, no download (default)")
        for name, spec in NAMED_CORPORA.items():
            cached = (cache_dir() / "corpora" / f"{name}.txt").exists()
            print(f"{name:16s} {spec.description}; {'cached' if cached else 'downloaded on first use'} from {spec.url}")
        print(f"cache: {cache_dir()}")
        return 0
    if not args.sources:
        raise LmlabError("lmlab data prepare needs at least one source")
    for src in args.sources:
        prepared = prepare(resolve_source(src), args.tokenizer, args.vocab_size)
        meta = prepared.meta
        print(f"{src}: {meta['n_tokens']:,} tokens ({meta['tokenizer']}, vocab {meta['vocab_size']}, "
              f"{meta['dtype']}) from {meta['corpus_bytes']:,} bytes -> {prepared.path}")
    return 0


@dataclass
class NextArgs:
    """Show the model's distribution over the next token after a prompt."""

    run: Annotated[str, tyro.conf.Positional]
    """The run directory."""
    prompt: Annotated[str, tyro.conf.Positional]
    """The text before the token to predict."""
    top: int = 10
    """How many of the most likely tokens to list."""
    temperature: float = 1.0
    """Sampling temperature whose effect is shown (0: greedy)."""
    top_k: int = 0
    """Top-k filter whose effect is shown (0: off)."""
    top_p: float = 1.0
    """Top-p filter whose effect is shown (1: off)."""
    json: bool = False
    """Print JSON instead of a table."""
    device: str = "cpu"
    """auto, cpu, cuda or mps."""


def cmd_next(argv: list[str]) -> int:
    import dataclasses as dc

    from .checkpoint import load_run
    from .common import resolve_device
    from .inspect import next_token_distribution
    from .sample import SampleConfig

    args = parse(NextArgs, argv, "lmlab next")
    SampleConfig(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)  # validates the settings
    if args.top <= 0:
        raise LmlabError(f"--top must be positive, got {args.top}")
    run = load_run(args.run, resolve_device(args.device))
    rows = next_token_distribution(run.model, run.tokenizer, args.prompt, args.top, args.temperature, args.top_k,
                                   args.top_p)
    if args.json:
        print(json.dumps({"prompt": args.prompt, "temperature": args.temperature, "top_k": args.top_k,
                          "top_p": args.top_p, "tokens": [dc.asdict(r) for r in rows]}))
        return 0
    print(f"next token after {args.prompt!r} (temperature {args.temperature:g}, top-k {args.top_k or 'off'}, "
          f"top-p {args.top_p:g}); * = kept by these settings")
    print(f"{'rank':>4}  {'token':<12} {'prob':>8} {'cum':>8} {'logit':>8}  {'kept':<4} {'sampled':>8}")
    for r in rows:
        print(f"{r.rank:>4}  {r.token:<12} {r.probability:8.2%} {r.cumulative:8.2%} {r.logit:8.3f}  "
              f"{'*' if r.kept else ' ':<4} {r.renormalized:8.2%}")
    return 0


@dataclass
class SurprisalArgs:
    """Per-token surprisal (loss) of a text under a trained run; the totals equal `lmlab eval` on that text."""

    run: Annotated[str, tyro.conf.Positional]
    """The run directory."""
    file: Annotated[Optional[str], tyro.conf.Positional] = None
    """A text file to score (or use --text)."""
    text: Optional[str] = None
    """The text to score."""
    html: Optional[str] = None
    """Write an HTML heatmap here (hover a token for the model's top-5 predictions)."""
    json: bool = False
    """Print JSON (every token with nats and bits, and the totals)."""
    device: str = "cpu"
    """auto, cpu, cuda or mps."""


def cmd_surprisal(argv: list[str]) -> int:
    from .checkpoint import load_run
    from .common import atomic_write_bytes, resolve_device
    from .data import Corpus, iter_text
    from .inspect import surprisal, surprisal_html, terminal_colored

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
    run = load_run(args.run, resolve_device(args.device))
    tokens, metrics, first = surprisal(run.model, run.tokenizer, text)
    if args.html:
        page = surprisal_html(first, tokens, metrics, f"surprisal under {run.run_dir}")
        atomic_write_bytes(args.html, page.encode("utf-8"))
        print(f"heatmap written to {args.html}", file=sys.stderr)
    if args.json:
        print(json.dumps({**metrics.as_dict(), "first": first,
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
    two_d: Annotated[bool, tyro.conf.arg(name="2d")] = False
    """Also scan a 2-D plane (contour plot) and draw the training trajectory."""
    points: int = 21
    """Grid points per direction."""
    span: float = 1.0
    """Scan from -span to +span along each direction (1 = the size of the weights, filter by filter)."""
    batch_size: int = 8
    """Validation windows in the fixed batch."""
    seed: int = 0
    """Seed of the random directions."""
    out: Optional[str] = None
    """Folder for landscape.json and the PNGs (default: RUN/landscape)."""
    device: str = "cpu"
    """auto, cpu, cuda or mps."""


def cmd_landscape(argv: list[str]) -> int:
    from .checkpoint import load_run
    from .common import resolve_device
    from .data import load_splits
    from . import rundir
    from .config import TrainConfig
    from .landscape import landscape

    args = parse(LandscapeArgs, argv, "lmlab landscape")
    if args.points < 3 or args.span <= 0 or args.batch_size <= 0:
        raise LmlabError("--points must be >= 3, --span and --batch-size positive")
    run = load_run(args.run, resolve_device(args.device))
    val = load_splits(TrainConfig.from_json(run.config).data, tokenizer=run.tokenizer).val
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
class ReportArgs:
    """One self-contained HTML page (and its PNGs) with the curves, probes, samples and config of one or more runs."""

    runs: Annotated[list[str], tyro.conf.Positional, tyro.conf.arg(metavar="RUN [RUN ...]")]
    """Run directories (at least one); several go on shared charts, one line per run."""
    out: str = "report.html"
    """Where to write the page; its PNGs go to a folder beside it named <out-stem>_files."""
    log: bool = False
    """Loss on a log y-axis (and tokens on a log x-axis)."""


def cmd_report(argv: list[str]) -> int:
    from .report import write_report

    args = parse(ReportArgs, argv, "lmlab report")
    out = write_report(args.runs, args.out, args.log)
    print(f"report written to {out} (PNGs in {out.with_name(out.stem + '_files')})", file=sys.stderr)
    return 0


def cmd_bench(argv: list[str]) -> int:
    from .bench import BenchConfig, print_table, run_bench

    cfg = parse(BenchConfig, argv, "lmlab bench")
    out = run_bench(cfg)
    print_table(out)
    if cfg.json:
        from .common import atomic_write_json

        atomic_write_json(cfg.json, out)
        print(f"figures written to {cfg.json}", file=sys.stderr)
    if cfg.markdown:
        from .bench import to_markdown
        from .common import atomic_write_bytes

        atomic_write_bytes(cfg.markdown, to_markdown(out).encode())
        print(f"Markdown tables written to {cfg.markdown}", file=sys.stderr)
    return 0


@dataclass
class ServeArgs:
    """Serve runs in a local web app (dashboard and playground) and as an OpenAI-compatible completions API."""

    runs: Annotated[list[str], tyro.conf.Positional, tyro.conf.arg(metavar="[RUNS_DIR | RUN ...]")] = field(
        default_factory=lambda: ["runs"])
    """Run directories, or folders whose subfolders are runs (new runs in them show up as they start)."""
    host: str = "127.0.0.1"
    """Address to listen on; the default is reachable from this machine only (any other needs --api-key)."""
    port: int = 8000
    """Port to listen on (0: any free port)."""
    api_key: Annotated[Optional[str], tyro.conf.arg(metavar="KEY")] = None
    """A key every API request must send (Authorization: Bearer KEY); default: $LMLAB_API_KEY, else none."""
    allowed_host: Annotated[list[str], tyro.conf.UseAppendAction, tyro.conf.arg(metavar="NAME")] = field(
        default_factory=list)
    """A host name clients reach the server by, answered besides the address listened on."""
    max_tokens: int = 512
    """The most tokens one completion may generate."""
    max_prompt_chars: int = 20_000
    """The most characters of prompt (or of text to score) one request may send."""
    max_concurrent: int = 4
    """Requests running a model at the same time; one more is refused with HTTP 429."""
    device: str = "cpu"
    """auto, cpu, cuda or mps."""


def cmd_serve(argv: list[str]) -> int:
    from .common import resolve_device
    from .serve import Limits, serve

    args = parse(ServeArgs, argv, "lmlab serve")
    if not 0 <= args.port <= 65535:
        raise LmlabError(f"--port must be in 0..65535, got {args.port}")
    if min(args.max_tokens, args.max_prompt_chars, args.max_concurrent) <= 0:
        raise LmlabError("--max-tokens, --max-prompt-chars and --max-concurrent must be positive")
    api_key = args.api_key if args.api_key is not None else os.environ.get("LMLAB_API_KEY") or None
    serve(args.runs, args.host, args.port, Limits(args.max_tokens, args.max_prompt_chars, args.max_concurrent),
          resolve_device(args.device), api_key, args.allowed_host)
    return 0


COMMANDS: dict[str, Callable[[list[str]], int]] = {
    "train": cmd_train, "sample": cmd_sample, "eval": cmd_eval, "data": cmd_data, "next": cmd_next,
    "surprisal": cmd_surprisal, "landscape": cmd_landscape, "bench": cmd_bench,
    "report": cmd_report, "export": cmd_export, "serve": cmd_serve,
}


def usage() -> str:
    lines = ["usage: lmlab COMMAND [OPTIONS]   (lmlab COMMAND --help for its options)", "", "commands:"]
    lines += [f"  {name:8s} {text}" for name, text in SUBCOMMANDS.items() if name in COMMANDS]
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    from .train import Interrupted

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 0
    if argv[0] in ("-V", "--version"):
        from . import __version__

        print(f"lmlab {__version__}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"lmlab: error: unknown command {name!r}; choose from {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    try:
        return COMMANDS[name](rest)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 0
    except LmlabError as e:
        print(f"lmlab {name}: error: {e}", file=sys.stderr)
        return 2
    except Interrupted:
        return 130
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except MemoryError:
        print(f"lmlab {name}: error: out of memory; use a smaller model, --batch-size or --block-size", file=sys.stderr)
        return 1
    except Exception as e:  # last resort: still one line, never a traceback unless asked for
        if os.environ.get("LMLAB_DEBUG"):
            raise
        msg = str(e).splitlines()[0] if str(e) else ""
        print(f"lmlab {name}: internal error: {type(e).__name__}: {msg} (LMLAB_DEBUG=1 shows the traceback)",
              file=sys.stderr)
        return 1
