"""`lmlab experiment NAME`: its options, and the command that runs the experiment and prints what it found."""

from __future__ import annotations

import json
import os
import shlex
import sys
from dataclasses import dataclass, field
from typing import Literal

import tyro
from typing_extensions import Annotated

from ..cli import parse
from .base import ExperimentConfig
from .registry import run_experiment, summary


@dataclass
class ExperimentArgs:
    """Run a measured experiment on how language models learn, in under 3 minutes on a 2-core CPU: loss (the same
    model trained on cross-entropy, squared error and accuracy), descent (a learning-rate sweep, gradient noise per
    batch size, four optimizers on one landscape), patterns (statements whose false answer is the frequent one) or
    truth (what more next-token training, SFT, DPO and RL change about those statements).
    Prints a table and the conclusion computed from the measurements; writes DIR/index.html and DIR/result.json."""

    name: Annotated[Literal["loss", "descent", "patterns", "truth"], tyro.conf.Positional]
    """The experiment: loss, descent, patterns or truth."""
    settings: ExperimentConfig = field(default_factory=ExperimentConfig)


def cmd_experiment(argv: list[str]) -> int:
    args = parse(ExperimentArgs, argv, "lmlab experiment")
    command = "lmlab experiment " + " ".join(shlex.quote(a) for a in argv)
    result = run_experiment(args.name, args.settings, say=lambda m: print(m, file=sys.stderr, flush=True),
                            command=command)
    print(summary(result), file=sys.stderr if args.settings.json else sys.stdout)
    out = args.settings.out or os.path.join("experiments", args.name)
    print(f"{result['wall_time_s']:.0f} s; page and result written to {out}/index.html and {out}/result.json",
          file=sys.stderr)
    if args.settings.json:
        print(json.dumps(result))
    return 0
