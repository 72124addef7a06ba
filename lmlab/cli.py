"""The `lmlab` command: one subcommand per stage, options generated from the config dataclasses by tyro.

COMMANDS is the one table of commands: it drives dispatch and `lmlab --help`, which lists them by stage. The core's
commands (train, sample, data, next, export) are handled here; an application's commands next to it
(chat_cli.py, eval_cli.py, serve/cli.py, report/cli.py, experiments/cli.py, bench/cli.py), each loaded only when it
runs, and parsing its options with parse() from here. Importing this module imports no torch: every handler imports what it needs.

One vocabulary across commands: the run is the positional argument, --device defaults to auto, --json is a bool
that prints JSON on stdout, and --out is where the command writes."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import json
import os
import sys
from dataclasses import dataclass, field, replace
from typing import Callable, Literal, Optional

import tyro
from typing_extensions import Annotated

STAGES = ("data and training", "use a model", "look inside", "share", "measure")


@dataclass(frozen=True)
class Command:
    """One `lmlab` command: its stage (one of STAGES) and line in `lmlab --help`, and its handler, a function of the
    command's arguments that returns the exit code. The handler is named, not imported ("serve.cli:cmd_serve" is
    lmlab/serve/cli.py's cmd_serve): a command loads its application only when it runs."""

    stage: str
    help: str
    handler: str

    def load(self) -> Callable[[list[str]], int]:
        module, _, name = self.handler.partition(":")
        return getattr(importlib.import_module(f"{__package__}.{module}"), name)


DATA, USE, INSIDE, SHARE, MEASURE = STAGES
COMMANDS = {
    "data": Command(DATA, "list the built-in and named corpora, or prepare (tokenize and cache) a corpus",
                    "cli:cmd_data"),
    "train": Command(DATA, "train a model (default: the tiny preset on the built-in corpus, about 5 minutes on a CPU)",
                     "cli:cmd_train"),
    "sample": Command(USE, "generate text from a trained run, streamed to the terminal", "cli:cmd_sample"),
    "chat": Command(USE, "talk with a chat model (a run fine-tuned on conversations) in the terminal",
                    "chat_cli:cmd_chat"),
    "next": Command(USE, "the next-token distribution after a prompt, and which tokens sampling settings keep",
                    "cli:cmd_next"),
    "serve": Command(USE, "a local web app (live training charts, next-token playground) and an OpenAI-compatible API",
                     "serve.cli:cmd_serve"),
    "inside": Command(INSIDE, "what the model learnt inside it over training: head scores, induction, loss by "
                      "position, logit lens", "report.cli:cmd_inside"),
    "surprisal": Command(INSIDE, "per-token loss of a text, coloured in the terminal or as an HTML heatmap",
                         "report.cli:cmd_surprisal"),
    "landscape": Command(INSIDE, "the loss around the trained weights along random directions, and the training "
                         "trajectory", "report.cli:cmd_landscape"),
    "report": Command(SHARE, "one self-contained HTML page (and PNGs) with the curves, probes, samples and config of "
                      "runs", "report.cli:cmd_report"),
    "export": Command(SHARE, "copy a run as single files (e.g. from sharded FSDP checkpoints), or as a transformers "
                      "model (--format hf)", "cli:cmd_export"),
    "eval": Command(MEASURE, "loss, bits/byte, perplexity and accuracy of a run on its validation split or any text (a "
                    "fine-tuned run: on conversations, with exact match); lm-evaluation-harness tasks (--tasks)",
                    "eval_cli:cmd_eval"),
    "bench": Command(MEASURE, "measure hardware peak, training throughput and MFU, time to quality, generation and "
                     "data speed", "bench.cli:cmd_bench"),
    "experiment": Command(MEASURE, "how language models learn, measured: loss (why not accuracy), descent (step "
                          "size, batch noise, optimizers), patterns (frequency, not truth)",
                          "experiments.cli:cmd_experiment"),
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
        from .common import LmlabError

        raise LmlabError(f"{_one_line(err.getvalue() or out.getvalue())} (see {prog} --help)") from None


# ---------------------------------------------------------------------------------------------------------------
# train


def _bool_flag(argv: list[str], option: str) -> list[str]:
    """An Optional[bool] option (None: decided later) as a flag too: `--compile` alone means `--compile True`, and
    `--no-compile` means `--compile False`."""
    out = []
    for i, arg in enumerate(argv):
        if arg == option and (i + 1 == len(argv) or argv[i + 1] not in ("True", "False", "None")):
            out += [option, "True"]
        elif arg == "--no-" + option[2:]:
            out += [option, "False"]
        else:
            out.append(arg)
    return out


def _given(argv: list[str], option: str) -> bool:
    """Whether the command line sets `option` (--val-data X, --val-data=X or --val_data X)."""
    names = {option, "--" + option[2:].replace("-", "_")}
    return any(arg.split("=", 1)[0] in names for arg in argv)


def cmd_train(argv: list[str]) -> int:
    from .config import PRESETS, TrainConfig, get_preset
    from .train import train

    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--preset", default="tiny")
    pre.add_argument("--resume", default=None)
    pre.add_argument("--stage", default="pretrain")  # whose defaults to start from (config.for_stage)
    known, _ = pre.parse_known_args(argv)
    if known.resume:
        from .run import Run
        run = Run.open(known.resume)
        # how to launch is chosen anew each time: a run may resume on another world size
        base = replace(run.config, resume=known.resume, parallel="none")
    else:
        base = get_preset(known.preset, known.stage)
    desc = ("Train a language model. Presets: " + ", ".join(PRESETS) + ". Every option below overrides the preset; "
            "with --resume, the run's own settings are the defaults. A setting shown as None is picked for the time "
            "budget (--max-time).")
    cfg = parse(TrainConfig, _bool_flag(argv, "--compile"), "lmlab train", default=base, description=desc)
    if known.resume:  # the corpus paths that come from the run's config, not from this command line
        sources = (("--data", cfg.data.data), ("--val-data", cfg.data.val_data))
        from_run = [(option, value) for option, value in sources if not _given(argv, option)]
        run.check_data_paths(from_run, "lmlab train --resume", cfg.trust_data_path)
    summary = train(cfg)  # which applies the budget rules
    if summary["rank"] == 0:
        print(f"run saved in {summary['run_dir']}", file=sys.stderr)
    return 0


# ---------------------------------------------------------------------------------------------------------------
# sample


def cmd_sample(argv: list[str]) -> int:
    import torch

    from .run import load_run
    from .common import resolve_device
    from .converse import sample_answer
    from .sample import SampleArgs, generate, prompt_ids, stream_text, text_banned

    args = parse(SampleArgs, argv, "lmlab sample")
    settings = args.settings
    run = load_run(args.run, resolve_device(settings.device), args.checkpoint)
    if settings.chat is not None:  # the answer of a chat model
        return sample_answer(run, settings, sys.stdout)
    ids = prompt_ids(run.tokenizer, settings.prompt)
    generator = torch.Generator().manual_seed(settings.seed)
    tokens = generate(run.model, ids, settings.max_new_tokens, settings.temperature, settings.top_k, settings.top_p,
                      generator, use_cache=not settings.no_cache, compile=settings.compile,
                      banned=text_banned(run.tokenizer))
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
    """Copy a run with its best checkpoint (or --checkpoint) as single files (e.g. a sharded FSDP run), resumable by one process; or
    write it as a Hugging Face transformers model folder (--format hf), checked by transformers when installed."""

    run: Annotated[str, tyro.conf.Positional]
    """The run directory."""
    out: str
    """Where to write the copy (a new or empty directory)."""
    checkpoint: str = "best"
    """Which checkpoint to load: best (the lowest validation loss; an rl run's highest held-out reward), last (the newest) or a step number."""
    format: Literal["lmlab", "hf"] = "lmlab"
    """lmlab: a run folder with one checkpoint; hf: config.json, model.safetensors, tokenizer.json,
    tokenizer_config.json and generation_config.json for stock transformers classes (docs/interop.md)."""
    verify: bool = True
    """With --format hf: load the export with transformers and compare its logits and tokenizer with lmlab's."""
    trust_pickle: bool = False
    """Also convert a checkpoint in the torch.distributed.checkpoint format of older lmlab versions. Loading one
    unpickles its metadata, which can run code from it: only for runs from a source you trust."""


def cmd_export(argv: list[str]) -> int:
    from .run import export_run
    from .common import LmlabError

    args = parse(ExportArgs, argv, "lmlab export")
    if args.format == "hf":
        from .hf import export_run_hf

        if args.trust_pickle:
            raise LmlabError("--trust-pickle converts old checkpoints with --format lmlab; export the run that way "
                             "first, then export the copy with --format hf")
        export_run_hf(args.run, args.out, check=args.verify, say=lambda m: print(m, file=sys.stderr),
                      which=args.checkpoint)
        return 0
    path = export_run(args.run, args.out, trust_pickle=args.trust_pickle, which=args.checkpoint)
    print(f"exported {args.run} to {args.out} (checkpoint {path.name}, single files)", file=sys.stderr)
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
    from .common import LmlabError, cache_dir
    from .data import BUILTIN, NAMED_CORPORA, builtin_text, prepare, resolve_source

    args = parse(DataArgs, argv, "lmlab data")
    if args.action == "list":
        text = builtin_text()
        print(f"{BUILTIN:16s} Python's documentation topics (pydoc_data), {len(text):,} characters, no download (default)")
        for name, spec in NAMED_CORPORA.items():
            cached = (cache_dir() / "corpora" / f"{name}.txt").exists()
            print(f"{name:16s} {spec.description}; {'cached' if cached else 'downloaded on first use'} from {spec.url}")
        from .synthetic import PREFIX, SKILLS, SYNTHETIC
        print("synthetic corpora, generated on first use from a seed (synthetic:NAME:SEED for another seed than 0):")
        for name, spec in SYNTHETIC.items():
            print(f"  {PREFIX + name:20s} {spec.description}; entropy rate {spec.entropy_rate(0):.4f} nats/character")
        print(f"  {PREFIX + 'chat':20s} conversations whose answers a verifier checks ({', '.join(SKILLS)}): --stage sft")
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
    checkpoint: str = "best"
    """Which checkpoint to load: best (the lowest validation loss; an rl run's highest held-out reward), last (the newest) or a step number."""
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
    device: str = "auto"
    """auto, cpu, cuda or mps."""


def cmd_next(argv: list[str]) -> int:
    import dataclasses as dc

    from .run import load_run
    from .common import LmlabError, resolve_device
    from .predict import next_token_distribution
    from .sample import SampleConfig, text_banned

    args = parse(NextArgs, argv, "lmlab next")
    SampleConfig(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)  # validates the settings
    if args.top <= 0:
        raise LmlabError(f"--top must be positive, got {args.top}")
    run = load_run(args.run, resolve_device(args.device), args.checkpoint)
    rows = next_token_distribution(run.model, run.tokenizer, args.prompt, args.top, args.temperature, args.top_k,
                                   args.top_p, text_banned(run.tokenizer))
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


def usage() -> str:
    """`lmlab --help`: the commands of COMMANDS by stage, in its order."""
    lines = ["usage: lmlab COMMAND [OPTIONS]   (lmlab COMMAND --help for its options)"]
    width = max(map(len, COMMANDS)) + 1
    for stage in STAGES:
        lines += ["", f"{stage}:"]
        lines += [f"  {name:{width}s} {command.help}" for name, command in COMMANDS.items() if command.stage == stage]
    return "\n".join(lines)


def _interrupted(e: BaseException) -> bool:
    """Whether `e` is the training loop's Interrupted (Ctrl-C or SIGTERM, a checkpoint written), without importing
    the loop: a command that never loaded it cannot have raised it."""
    train = sys.modules.get(f"{__package__}.train")
    return train is not None and isinstance(e, train.Interrupted)


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from . import __version__

        print(f"lmlab {__version__}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"lmlab: error: unknown command {name!r}; choose from {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    from .common import LmlabError  # the handlers' refusals (common imports torch, as every handler does)

    try:
        return COMMANDS[name].load()(rest)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 0
    except LmlabError as e:
        print(f"lmlab {name}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except MemoryError:
        print(f"lmlab {name}: error: out of memory; use a smaller model, --batch-size or --block-size", file=sys.stderr)
        return 1
    except Exception as e:  # last resort: still one line, never a traceback unless asked for
        if _interrupted(e):
            return 130
        if os.environ.get("LMLAB_DEBUG"):
            raise
        msg = str(e).splitlines()[0] if str(e) else ""
        print(f"lmlab {name}: internal error: {type(e).__name__}: {msg} (LMLAB_DEBUG=1 shows the traceback)",
              file=sys.stderr)
        return 1
