"""What the experiments share (`lmlab experiment loss|descent|patterns|truth`, one file each): their settings, a budget of
model and steps, training runs in DIR/runs read back from their metrics, and the interface each experiment fills
in (Experiment): its measurements, the claims they back, its conclusion in words, its table and its charts.

Each experiment trains with `train()` and measures with the library's own functions (stream_losses, the landscape's
scans, training_loss). Its budget is counted in steps, so a seed gives the same numbers. Its conclusion is computed
from its measurements.
"""

from __future__ import annotations

import contextlib
import math
import platform
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from ..common import LmlabError, atomic_write_bytes
from ..config import TrainConfig
from ..data import BUILTIN, DataConfig
from ..loss import LossConfig
from ..model import ModelConfig, unique_parameters
from ..optim import OptimConfig
from ..run import EvalRecord, Run, TrainRecord
from ..report.landscape import readable_snapshots
from ..train import train

MARKER = ".lmlab-experiment"  # marks a folder an experiment wrote, so running it again may replace its runs
RUNS = "runs"  # DIR/runs/NAME: the training runs of an experiment (lmlab report and landscape read them)
TITLE_SIZE = 10.5  # of the experiments' chart titles, which are longer than the report's


@dataclass
class ExperimentConfig:
    """Where an experiment reads and writes, and its seed; each experiment's model and steps are its own (Budget)."""

    data: str = BUILTIN
    """Text to train on: a file, folder, glob, 'builtin' or a corpus name (as for `lmlab train --data`)."""
    out: str = ""
    """Folder for index.html, result.json, the charts and the training runs (default: experiments/NAME)."""
    json: bool = False
    """Print result.json on stdout (the table goes to stderr)."""
    seed: int = 1337
    """Seed of every run: initial weights, batches, generated statements."""
    quick: bool = False
    """A micro budget of a few seconds (for tests): a tiny model and a few steps, whose numbers show little."""
    device: str = "auto"
    """auto, cpu, cuda or mps."""


@dataclass(frozen=True)
class Budget:
    """The model and the steps of an experiment, fixed so that the same seed gives the same numbers."""

    n_layer: int
    n_head: int
    n_embd: int
    block_size: int
    batch_size: int
    steps: int
    eval_interval: int
    eval_tokens: int

    def model(self) -> ModelConfig:
        return ModelConfig(block_size=self.block_size, n_layer=self.n_layer, n_head=self.n_head, n_embd=self.n_embd)


# ---------------------------------------------------------------------------------------------------------------
# Plumbing shared by the experiments: runs in DIR/runs, quiet training, the logs it wrote


@dataclass
class Context:
    """One experiment's settings, its output folder and its log."""

    name: str
    cfg: ExperimentConfig
    out: Path
    say: Callable[[str], None]

    @property
    def log(self) -> Path:
        return self.out / "log.txt"

    def run_dir(self, name: str) -> Path:
        return self.out / RUNS / name


def prepare_out(out: Path) -> None:
    """Create the output folder, or reuse one an experiment wrote before (its old runs are removed)."""
    if out.exists() and not out.is_dir():
        raise LmlabError(f"--out {out} is a file; give a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / MARKER).is_file():
        raise LmlabError(f"--out {out} holds files that no experiment wrote; give a new or empty folder")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / MARKER, b"written by lmlab experiment\n")
    runs = out / RUNS
    if runs.is_symlink():
        runs.unlink()  # a link is removed itself, never what it points to
    elif runs.exists():
        shutil.rmtree(runs)
    runs.mkdir()
    if (out / "log.txt").is_file():
        (out / "log.txt").unlink()


def train_config(ctx: Context, budget: Budget, run: str, optim: OptimConfig, loss: Optional[LossConfig] = None,
                 data: Optional[DataConfig] = None, steps: int = 0, snapshots: int = 0,
                 resume: bool = False) -> TrainConfig:
    """A run of `budget` on the experiment's data, recording only what the experiment reads: metrics, one checkpoint
    at the end, and `snapshots` weight snapshots (first and last kept). A non-finite step never stops it: a
    divergent learning rate is part of what the descent experiment shows."""
    steps = steps or budget.steps
    run_dir = ctx.run_dir(run)
    return TrainConfig(
        data=data or DataConfig(data=ctx.cfg.data, tokenizer="char"), model=budget.model(), optim=optim,
        loss=loss or LossConfig(), preset=f"experiment-{ctx.name}", out=str(run_dir),
        resume=str(run_dir) if resume else None, max_steps=steps, max_time=0.0, batch_size=budget.batch_size,
        eval_interval=budget.eval_interval, eval_tokens=budget.eval_tokens, checkpoint_interval=steps,
        keep_checkpoints=1, seed=ctx.cfg.seed, device=ctx.cfg.device, sample_tokens=0, progress=False, probe=False,
        inside=False, telemetry_interval=0, trajectory_snapshots=snapshots, tensorboard=False,
        max_bad_steps=steps + 1)


def run_training(ctx: Context, cfg: TrainConfig, **extra) -> dict:
    """train(cfg, **extra), its progress lines appended to DIR/log.txt instead of the terminal."""
    with open(ctx.log, "a", encoding="utf-8") as log, contextlib.redirect_stderr(log), contextlib.redirect_stdout(log):
        return train(cfg, **extra)


def read_metrics(run_dir: Path) -> tuple[list[TrainRecord], list[EvalRecord]]:
    """The records of the run's training steps, and of its evaluations."""
    metrics = Run(run_dir).metrics()
    return metrics.train, metrics.evals


def finite(x) -> Optional[float]:
    """A float for result.json: None where it is not finite (JSON has no NaN or infinity)."""
    return float(x) if isinstance(x, (int, float)) and math.isfinite(x) else None


def cpu_name() -> str:
    """The CPU's model name, as lscpu shows it."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def weight_change(run_dir: Path, model: torch.nn.Module) -> Optional[float]:
    """||w_last - w_first|| / ||w_first|| over the run's first and last weight snapshots."""
    snaps = readable_snapshots(run_dir, model)
    if len(snaps) < 2:
        return None
    first, last = snaps[0][1], snaps[-1][1]
    names = [n for n, _ in unique_parameters(model)]
    diff = math.sqrt(sum(float((last[n].double() - first[n].double()).square().sum()) for n in names))
    size = math.sqrt(sum(float(first[n].double().square().sum()) for n in names))
    return diff / max(size, 1e-30)


# ---------------------------------------------------------------------------------------------------------------
# What an experiment provides, and what its parts share


@dataclass(frozen=True)
class Experiment:
    run: Callable[[Context], dict]
    """Train and measure; the measurements as a JSON object."""
    claims: Callable[[dict], dict]
    """Each claim of the experiment, and whether the measurements back it."""
    conclusion: Callable[[dict], str]
    table: Callable[[dict], tuple[list[str], list[list[str]]]]
    charts: Callable[[dict], list]
    """(file name, figure, caption) of each chart."""
    title: str
    idea: str
    examples: Optional[Callable[[dict], str]] = None
    """HTML for the page below the table (examples of what was measured)."""


def verdict(claims: dict[str, bool], conclusion: str) -> str:
    """The experiment's conclusion when the measurements back every claim; otherwise the claims they do not back."""
    if all(claims.values()):
        return conclusion
    failed = ", ".join(k.replace("_", " ") for k, v in claims.items() if not v)
    return f"On this budget the measurements do not back every claim (not: {failed})."


def nan(values: list) -> list[float]:
    """Values for a chart: None (not measured, or not finite) as NaN, which matplotlib leaves out."""
    return [v if v is not None else math.nan for v in values]


def pct(value) -> str:
    return f"{100 * value:.1f}%" if isinstance(value, (int, float)) and math.isfinite(value) else "–"
