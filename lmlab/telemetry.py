"""What training records about itself, so learning can be watched (the probe is sample.probe): gradient telemetry (per-layer gradient norms, update-to-weight ratios), loss-spike flags, weight snapshots for the
loss-landscape trajectory, and optional TensorBoard output. All cheap enough to stay on by default."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
from safetensors.torch import save_model

from . import rundir
from .model import layer_of, unique_parameters
from .run import Run
from .rundir import TENSORBOARD, TRAJECTORY


# ---------------------------------------------------------------------------------------------------------------
# Gradient telemetry


class GradientTelemetry:
    """Per-layer gradient norms and update-to-weight ratios (||new - old|| / ||old||), every `interval` steps."""

    def __init__(self, model: nn.Module, interval: int):
        self.interval = interval
        groups: dict[str, list[torch.Tensor]] = {}
        for name, p in unique_parameters(model):
            if p.requires_grad:
                groups.setdefault(layer_of(name), []).append(p)
        self.groups = groups
        self._before: Optional[dict[str, list[torch.Tensor]]] = None
        self.record: dict = {}

    def active(self, step: int) -> bool:
        return self.interval > 0 and step % self.interval == 0

    @torch.no_grad()
    def before_update(self) -> None:
        """Call after backward (and clipping), before optimizer.step()."""
        self.record = {"grad_norm": {}, "update_ratio": {}}
        for name, params in self.groups.items():
            grads = [p.grad for p in params if p.grad is not None]
            if grads:
                self.record["grad_norm"][name] = float(torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))))
        self._before = {name: [p.detach().clone() for p in params] for name, params in self.groups.items()}

    @torch.no_grad()
    def after_update(self, step: int) -> dict:
        assert self._before is not None
        for name, params in self.groups.items():
            old = self._before[name]
            diff = torch._foreach_sub([p.detach() for p in params], old)
            update = float(torch.linalg.vector_norm(torch.stack(torch._foreach_norm(diff))))
            weight = float(torch.linalg.vector_norm(torch.stack(torch._foreach_norm(old))))
            self.record["update_ratio"][name] = update / weight if weight > 0 else 0.0
        self._before = None
        return {"step": step, **self.record}


class SpikeDetector:
    """Flags a training loss far above its recent average: z = (loss - mean) / std over an exponential window."""

    def __init__(self, threshold: float = 4.0, alpha: float = 0.05, warmup: int = 20):
        self.threshold, self.alpha, self.warmup = threshold, alpha, warmup
        self.mean, self.var, self.count = 0.0, 0.0, 0

    def update(self, loss: float) -> Optional[float]:
        """Returns the z-score when this loss is a spike, else None."""
        if not math.isfinite(loss):
            return None
        self.count += 1
        z = None
        if self.count > self.warmup and self.var > 0:
            score = (loss - self.mean) / math.sqrt(self.var)
            if score > self.threshold:
                z = score
        if self.count == 1:
            self.mean = loss
        else:
            delta = loss - self.mean
            self.mean += self.alpha * delta
            self.var = (1 - self.alpha) * (self.var + self.alpha * delta * delta)
        return z

    def state_dict(self) -> dict:
        return {"mean": self.mean, "var": self.var, "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.mean, self.var, self.count = state["mean"], state["var"], state["count"]


OVERFIT_EVALS = 2  # evaluations in a row with validation loss up and training loss down: the run says it overfits


class EvalHistory:
    """Watches for overfitting: each evaluation's validation loss beside the mean training loss of the steps since
    the evaluation before it. `evaluation` returns how many evaluations in a row (up to this one) saw validation loss
    rise while training loss fell."""

    def __init__(self, keep: int = 32):
        self.keep = keep
        self.train_sum, self.train_n = 0.0, 0
        self.evals: list[list] = []  # [val_loss, mean train loss since the evaluation before (None at step 0)]
        self.said = False  # the console line is said once a run

    def train(self, loss: float) -> None:
        self.train_sum, self.train_n = self.train_sum + loss, self.train_n + 1

    def evaluation(self, val_loss: float) -> int:
        if not math.isfinite(val_loss):
            return 0
        self.evals = (self.evals + [[val_loss, self.train_sum / self.train_n if self.train_n else None]])[-self.keep:]
        self.train_sum, self.train_n = 0.0, 0
        return self.rising()

    def rising(self) -> int:
        count = 0
        for (val0, train0), (val1, train1) in zip(self.evals[-2::-1], self.evals[::-1]):  # newest pair first
            if train0 is None or train1 is None or not (val1 > val0 and train1 < train0):
                break
            count += 1
        return count

    def state_dict(self) -> dict:
        return {"train_sum": self.train_sum, "train_n": self.train_n, "evals": self.evals, "said": self.said}

    def load_state_dict(self, state: dict) -> None:
        self.train_sum, self.train_n = state["train_sum"], state["train_n"]
        self.evals, self.said = [list(e) for e in state["evals"]][-self.keep:], state["said"]


# ---------------------------------------------------------------------------------------------------------------
# Weight snapshots for the landscape trajectory

def save_snapshot(run_dir: Path, model: nn.Module, step: int, keep: int) -> None:
    """Save the weights at this step; keep at most `keep` snapshots spread over the run (drop every other one)."""
    folder = rundir.make_dir(run_dir, TRAJECTORY)
    path = folder / rundir.snapshot_name(step)
    tmp = folder / f".{path.name}.tmp"
    save_model(model, str(tmp))
    tmp.replace(path)
    snaps = [s.path for s in Run(run_dir).snapshots()]
    while len(snaps) > keep:
        # drop every other snapshot except the newest, keeping them spread over the run
        for old in snaps[1:-1:2]:
            old.unlink(missing_ok=True)  # a link is removed itself, never what it points to
        snaps = [s.path for s in Run(run_dir).snapshots()]


def prune_snapshots_after(run_dir: Path, step: int) -> None:
    """On resume, snapshots newer than the checkpoint belong to a timeline that no longer exists."""
    for snapshot in Run(run_dir).snapshots():
        if snapshot.step > step:
            snapshot.path.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------------------------
# TensorBoard (optional)


class TensorBoard:
    """Scalars and text into RUN/tensorboard when the optional `tensorboard` package is installed; else nothing."""

    def __init__(self, run_dir: Path, enabled: bool = True):
        self.writer = None
        if not enabled:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except Exception:  # tensorboard not installed: an optional extra
            return
        self.writer = SummaryWriter(str(rundir.check_path(run_dir, TENSORBOARD)))

    def scalars(self, step: int, values: dict) -> None:
        if self.writer is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)) and math.isfinite(v):
                    self.writer.add_scalar(k, v, step)

    def text(self, step: int, tag: str, text: str) -> None:
        if self.writer is not None:
            self.writer.add_text(tag, text, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
