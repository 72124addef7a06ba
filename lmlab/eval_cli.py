"""`lmlab eval`: a run measured on text (loss, bits/byte, perplexity and accuracy from sliding windows, evaluate.py),
on conversations for a fine-tuned run (sft.py), or on lm-evaluation-harness tasks with --tasks (harness.py).

Which options combine: --checkpoint, --device, --batch-size and --json apply to all three. --stride, --data and
--trust-data-path measure text, so they do not combine with --tasks; --include-path, --num-fewshot, --limit and
--apply-chat-template are lm-eval's, so they need --tasks."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Optional

import tyro
from typing_extensions import Annotated

from .cli import parse


@dataclass
class EvalArgs:
    """Evaluate a run: every token of the text after the first is predicted once, from sliding block_size windows; or,
    with --tasks, on tasks of EleutherAI's lm-evaluation-harness (pip install "lmlab[eval]")."""

    run: Annotated[str, tyro.conf.Positional]
    """The run directory."""
    checkpoint: str = "best"
    """Which checkpoint to load: best (the lowest validation loss; an rl run's highest held-out reward), last (the newest) or a step number."""
    stride: Optional[int] = None
    """Windows of block_size tokens start every this many tokens and score only what earlier windows did not reach,
    so every scored token has at least block_size - stride tokens of context (default: block_size / 2, as published
    perplexities are measured; block_size: non-overlapping windows, as training logs val_loss)."""
    data: Optional[str] = None
    """Text to evaluate (a file, folder, glob or corpus name); default: the run's validation split. A fine-tuned run
    (--stage sft) is measured on conversations: its held-out ones, or --data's (.jsonl, .parquet, synthetic:chat); a
    preference-tuned run (--stage dpo), without --data, on its held-out pairs against its reference."""
    trust_data_path: bool = False
    """Read the corpus path that the run's config names although the run was not made here, in this folder (it was
    copied, moved or shared); without it such a run needs --data."""
    tasks: Optional[str] = None
    """lm-evaluation-harness tasks, comma-separated (hellaswag,arc_easy or those of --include-path's YAML files); their
    datasets download on first use. Not with --stride, --data or --trust-data-path."""
    include_path: Optional[str] = None
    """With --tasks: a folder of task YAML files (lm-eval's --include_path)."""
    num_fewshot: Optional[int] = None
    """With --tasks: examples in each prompt (default: each task's own)."""
    limit: Optional[float] = None
    """With --tasks: at most this many documents per task (below 1: that fraction of them); for trying things out."""
    apply_chat_template: bool = False
    """With --tasks: render each prompt with the run's chat template (for a chat model, a run fine-tuned with --stage
    sft)."""
    json: bool = False
    """Print one JSON object on stdout (loss, bits_per_byte, perplexity, accuracy, tokens, stride; with --tasks, each
    task's metrics and their standard errors)."""
    batch_size: int = 32
    """Windows (with --tasks: requests) per forward pass."""
    device: str = "auto"
    """auto, cpu, cuda or mps."""


def check_options(args: EvalArgs) -> None:
    """Refuse, in one line, options that do not combine (the module docstring says which do)."""
    from .common import LmlabError

    if args.tasks is not None:
        given = [name for name, value in (("--stride", args.stride), ("--data", args.data),
                                          ("--trust-data-path", args.trust_data_path)) if value]
        if given:
            raise LmlabError(f"{', '.join(given)} measure text; they do not combine with --tasks (a local text goes in "
                             f"a task YAML with output_type loglikelihood_rolling)")
        if args.num_fewshot is not None and args.num_fewshot < 0:
            raise LmlabError(f"--num-fewshot must be 0 or more, got {args.num_fewshot}")
        if args.limit is not None and args.limit <= 0:
            raise LmlabError(f"--limit must be positive, got {args.limit:g}")
    else:
        given = [name for name, value in (("--include-path", args.include_path), ("--num-fewshot", args.num_fewshot),
                                          ("--limit", args.limit), ("--apply-chat-template", args.apply_chat_template))
                 if value is not None and value is not False]
        if given:
            raise LmlabError(f"{', '.join(given)} apply to lm-evaluation-harness tasks; give them with --tasks")


def cmd_tasks(args: EvalArgs) -> int:
    """`lmlab eval RUN --tasks ...`: lm-eval's tasks on the run (harness.py)."""
    from .run import load_run
    from .common import resolve_device

    from . import harness  # one line on how to install lm-eval when it is missing

    run = load_run(args.run, resolve_device(args.device), args.checkpoint)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    limit = None if args.limit is None else (int(args.limit) if args.limit >= 1 else args.limit)
    results = harness.run_tasks(run, tasks, args.include_path, args.num_fewshot, limit, args.apply_chat_template,
                                args.batch_size)
    if args.json:
        print(json.dumps({"run": str(run.run_dir), "checkpoint": run.checkpoint.path.name, "tasks": tasks,
                          "num_fewshot": args.num_fewshot, "limit": limit, "results": results}))
    else:
        print(f"lm-evaluation-harness on {run.run_dir} ({run.checkpoint.path.name})")
        print(harness.describe(results))
    return 0


def cmd_eval(argv: list[str]) -> int:
    from . import dpo, sft
    from .run import load_run
    from .common import resolve_device
    from .evaluate import evaluate_run

    args = parse(EvalArgs, argv, "lmlab eval")
    check_options(args)
    if args.tasks is not None:
        return cmd_tasks(args)
    run = load_run(args.run, resolve_device(args.device), args.checkpoint)
    if dpo.evaluates_pairs(run.config, args.data):  # a preference-tuned run: its held-out pairs (dpo.py)
        print(dpo.describe_eval(dpo.evaluate_run(run, args.batch_size, args.trust_data_path), args.json))
        return 0
    if sft.evaluates_conversations(run.config, args.data):  # a fine-tuned run: masked loss, answers (sft.py)
        print(sft.describe_eval(sft.evaluate_run(run, args.data, args.batch_size, args.trust_data_path), args.json))
        return 0
    m, result = evaluate_run(run, args.data, args.stride, args.batch_size, args.trust_data_path, "lmlab eval")
    source, stride = args.data or "validation split", result["stride"]
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{source} of {run.run_dir} ({run.checkpoint.path.name}): {m.tokens:,} tokens predicted, windows of "
              f"{run.model.cfg.block_size} every {stride} (each token sees at least "
              f"{run.model.cfg.block_size - stride} tokens of context)")
        print(f"  loss        {m.loss:.4f} nats/token ({m.bits_per_token:.4f} bits/token)\n  bits/byte   "
              f"{m.bits_per_byte:.4f}\n  perplexity  {m.perplexity:.3f}\n  accuracy    {m.accuracy:.2%} (top-1)")
        if "entropy_rate" in result:
            print(f"  the source's entropy rate is {result['entropy_rate']:.4f} nats/token: the model is "
                  f"{result['excess']:.4f} above it (some of that because it sees a window, not the whole past)")
    return 0
