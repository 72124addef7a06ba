"""CPU records (`lmlab bench --record TARGET --budget SECONDS --seeds N`, docs/records.md): N seeds of the same
`lmlab train` command, each its own process, and whether the mean of their final validation losses is below the
target with a one-sided t-test. The t-distribution is computed here (the regularized incomplete beta function), so
the record needs nothing beyond lmlab's own dependencies."""

from __future__ import annotations

import datetime
import math
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable, Optional

from ..common import LmlabError

# the flags of every seed besides data, budget and seed: as docs/performance.md's figures, with no evaluation until
# the end (the final evaluation is of the whole validation split, non-overlapping windows, float32 on the CPU)
TRAIN_FLAGS = ["--eval-interval", "1000000", "--eval-tokens", "0", "--sample-tokens", "0", "--no-progress",
               "--no-tensorboard", "--no-inside", "--trajectory-snapshots", "0", "--checkpoint-interval", "1000000"]


def _beta_fraction(a: float, b: float, x: float) -> float:
    """The continued fraction of the incomplete beta function (modified Lentz's method, Numerical Recipes 6.4)."""
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 1000):
        for num in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                    -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def regularized_beta(a: float, b: float, x: float) -> float:
    """I_x(a, b), the regularized incomplete beta function, for a, b > 0 and 0 <= x <= 1."""
    if not (a > 0 and b > 0 and 0.0 <= x <= 1.0):
        raise ValueError(f"regularized_beta needs a, b > 0 and 0 <= x <= 1, got {a}, {b}, {x}")
    if x in (0.0, 1.0):
        return x
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1) / (a + b + 2):  # the fraction converges fast here; otherwise use the symmetry I_x(a,b)=1-I_1-x(b,a)
        return math.exp(log_front) * _beta_fraction(a, b, x) / a
    return 1.0 - math.exp(log_front) * _beta_fraction(b, a, 1.0 - x) / b


def t_sf(t: float, df: float) -> float:
    """P(T > t) for Student's t with df degrees of freedom."""
    tail = 0.5 * regularized_beta(df / 2, 0.5, df / (df + t * t))  # P(T > |t|)
    return tail if t >= 0 else 1.0 - tail


def below_target_p(losses: list[float], target: float) -> float:
    """One-sided one-sample t-test of H0 "the mean loss is at or above target": the p-value of the seeds' mean
    being this far below it by chance (small: the mean is below the target)."""
    n = len(losses)
    if n < 2:
        raise ValueError("a t-test needs at least 2 losses")
    mean = sum(losses) / n
    sd = math.sqrt(sum((x - mean) ** 2 for x in losses) / (n - 1))
    if sd == 0:
        return 0.0 if mean < target else 1.0
    return t_sf((target - mean) / (sd / math.sqrt(n)), n - 1)


def check_record(target: Optional[float], budget: Optional[float], seeds: int) -> None:
    """Refuse a record attempt that cannot make a row, before any training."""
    if target is None or budget is None:
        raise LmlabError("--record TARGET and --budget SECONDS go together")
    if not (math.isfinite(target) and target > 0):
        raise LmlabError(f"--record {target}: give a positive validation loss")
    if not (math.isfinite(budget) and budget > 0):
        raise LmlabError(f"--budget {budget}: give a positive number of seconds")
    if seeds < 2:
        raise LmlabError(f"--seeds {seeds}: a t-test needs at least 2 seeds (records count 5 or more)")


def train_command(data: str, budget: float, seed, device: str = "auto") -> list[str]:
    """`lmlab train` for one seed of a record (seed may be the placeholder "S")."""
    cmd = ["lmlab", "train", "--data", data, "--max-time", f"{budget:g}", "--seed", str(seed)] + TRAIN_FLAGS
    return cmd + (["--device", device] if device != "auto" else [])


def commit() -> str:
    """The git commit of the code that ran (with "+changes" if the tree has uncommitted ones), else lmlab's
    version."""
    from .. import __version__

    root = Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return f"lmlab {__version__}"
    if head.returncode or not head.stdout.strip():
        return f"lmlab {__version__}"
    return head.stdout.strip() + ("+changes" if dirty.stdout.strip() else "")


def cpu_name() -> str:
    """lscpu's model name (else the platform's processor string)."""
    import platform

    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        out = ""
    for line in out.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "unknown"


def seed_loss(data: str, budget: float, seed: int, device: str, folder: Path) -> float:
    """Train one seed as its own process and return its final validation loss (from the run's status)."""
    from ..run import Run
    from .measure import child_env

    run_dir = folder / f"seed{seed}"
    cmd = [sys.executable, "-m"] + train_command(data, budget, seed, device) + ["--out", str(run_dir)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=child_env(), stdin=subprocess.DEVNULL)
    if proc.returncode:
        raise LmlabError(f"seed {seed} failed: {(proc.stderr.strip().splitlines() or ['?'])[-1]}")
    loss = Run(run_dir).status().get("val_loss")
    if not isinstance(loss, (int, float)) or not math.isfinite(loss):
        raise LmlabError(f"seed {seed} ended without a finite validation loss ({loss})")
    return float(loss)


def record_row(target: float, budget: float, seeds: int, data: str, device: str = "auto",
               say: Callable[[str], None] = print) -> dict:
    """Seeds 1..N one after another; the row of docs/records.md's table."""
    losses = []
    with tempfile.TemporaryDirectory() as d:
        for seed in range(1, seeds + 1):
            losses.append(seed_loss(data, budget, seed, device, Path(d)))
            say(f"record {target} in {budget:g} s: seed {seed} of {seeds} ended at val loss {losses[-1]:.4f}")
    return {"target": target, "budget_s": budget, "date": datetime.date.today().isoformat(), "commit": commit(),
            "command": shlex.join(train_command(data, budget, "S", device)), "cpu": cpu_name(),
            "seeds": list(range(1, seeds + 1)), "val_losses": losses, "mean": sum(losses) / len(losses),
            "p": below_target_p(losses, target)}


RECORD_HEADER = ["| target | budget | date | commit | command | CPU | val loss per seed | mean | p |",
                 "|---|---|---|---|---|---|---|---|---|"]


def record_markdown(r: dict) -> str:
    """The row as docs/records.md's table has it."""
    losses = " / ".join(f"{x:.4f}" for x in r["val_losses"])
    return (f"| {r['target']:g} | {r['budget_s']:g} s | {r['date']} | {r['commit']} | `{r['command']}` | {r['cpu']} "
            f"| {losses} | {r['mean']:.4f} | {r['p']:.2g} |")
