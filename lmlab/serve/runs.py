"""The runs `lmlab serve` serves: run folders named on the command line and the runs in folders of runs (looked up
on every request, so new ones show up), a summary of each for the dashboard, and their loaded models, reloaded
when training writes a newer checkpoint. Model names are looked up among these runs, never opened as paths."""

from __future__ import annotations

import math
import threading
from pathlib import Path
from typing import Any

import torch

from .. import rundir
from ..checkpoint import LoadedRun, checkpoint_dirs, load_run
from ..common import LmlabError
from ..rundir import JsonlTail, run_names
from .request import ApiError


class RunSet:
    """The runs served: run folders named on the command line, and the run subfolders of folders of runs (looked up
    again on every call, so a training started after the server shows up)."""

    def __init__(self, sources: list[str | Path]):
        self.runs: list[Path] = []
        self.folders: list[Path] = []
        for source in sources:
            path = Path(source)
            if rundir.is_run(path):
                self.runs.append(path)
            elif path.is_dir():
                self.folders.append(path)
            elif path.exists():
                raise LmlabError(f"{source} is neither a run (a folder with {rundir.CONFIG}) nor a folder of runs")
            else:
                raise LmlabError(f"no such run or folder of runs: {source}")

    def current(self) -> dict[str, Path]:
        """Run name -> folder. Names are folder names, with parent folders added where two would clash."""
        paths = list(self.runs)
        for folder in self.folders:
            try:
                paths += sorted(p for p in folder.iterdir() if rundir.is_run(p))
            except OSError:
                continue  # the folder went away; its runs are no longer served
        unique = list({p.resolve(): p for p in paths}.values())
        return dict(zip(run_names(unique), unique))

    def find(self, name: Any) -> Path:
        runs = self.current()
        if not isinstance(name, str) or name not in runs:
            raise ApiError(404, f"the model {name!r} does not exist; GET /v1/models lists the runs served",
                           "model", "model_not_found")
        return runs[name]


class Tails:
    """One JsonlTail per file, made on first use."""

    def __init__(self):
        self._tails: dict[Path, JsonlTail] = {}
        self._lock = threading.Lock()

    def __call__(self, path: Path) -> JsonlTail:
        with self._lock:
            return self._tails.setdefault(path, JsonlTail(path.parent, path.name))


def run_summary(name: str, run_dir: Path, tails: Tails) -> dict:
    """One line of the dashboard's run list: status, latest step and losses, checkpoint, model shape."""
    _, records = tails(run_dir / rundir.METRICS).read()
    last_train = next((r for r in reversed(records) if "train_loss" in r), {})
    evals = [r for r in records if isinstance(r.get("val_loss"), (int, float)) and math.isfinite(r["val_loss"])]
    val_losses = [r["val_loss"] for r in evals]
    best = min(reversed(evals), key=lambda r: r["val_loss"]) if evals else {}
    try:
        config = rundir.read_config(run_dir)
    except LmlabError:
        config = {}  # still listed, with what the log says
    model = config.get("model") or {}
    try:
        checkpoints = checkpoint_dirs(run_dir)
    except LmlabError:
        checkpoints = []
    return {
        "name": name,
        **{k: v for k, v in rundir.run_status(run_dir).items() if k in ("status", "error")},
        "step": last_train.get("step", 0),
        "tokens": last_train.get("tokens", 0),
        "elapsed_s": last_train.get("elapsed_s"),
        "train_loss": last_train.get("train_loss"),
        "val_loss": val_losses[-1] if val_losses else None,
        "val_stride": next((r.get("val_stride") for r in reversed(records) if "val_loss" in r), None),
        "best_val_loss": min(val_losses) if val_losses else None,
        "best_step": best.get("step"),
        "overfitting_step": next((r.get("step") for r in evals if r.get("overfitting")), None),
        "checkpoint_step": int(checkpoints[-1].name.split("_")[-1]) if checkpoints else None,
        "preset": config.get("preset"),
        "tokenizer": (config.get("data") or {}).get("tokenizer"),
        "vocab_size": config.get("vocab_size"),
        "model": {k: model.get(k) for k in ("arch", "n_layer", "n_head", "n_embd", "block_size")},
    }


def has_checkpoint(run_dir: Path) -> bool:
    try:
        return bool(checkpoint_dirs(run_dir))
    except LmlabError:  # a link where the checkpoints folder should be
        return False


class Models:
    """Loaded runs (each from its best checkpoint, or the last), reloaded when a newer checkpoint appears (checked on
    each request: one directory listing).
    A generation keeps the model it started with; the next request gets the new one."""

    def __init__(self, device: str | torch.device = "cpu", checkpoint: str = "best"):
        self.device, self.checkpoint = device, checkpoint
        self._loaded: dict[Path, tuple[Path, LoadedRun]] = {}  # run -> (newest checkpoint seen, what loaded)
        self._lock = threading.Lock()

    def get(self, name: str, run_dir: Path) -> LoadedRun:
        checkpoints = checkpoint_dirs(run_dir)
        if not checkpoints:
            raise ApiError(409, f"run {name!r} has no checkpoint yet; try again once training has written one",
                           "model", "model_not_ready")
        with self._lock:
            seen = self._loaded.get(run_dir)
            if seen is not None and seen[0] == checkpoints[-1]:
                return seen[1]
            try:
                run = load_run(run_dir, self.device, self.checkpoint)
            except (LmlabError, RuntimeError, MemoryError) as e:  # what is in a run folder is never a 500
                if seen is None:
                    detail = str(e) if isinstance(e, LmlabError) else f"{type(e).__name__}: {e}"
                    raise ApiError(409, f"run {name!r} cannot be loaded: {detail.splitlines()[0][:500]}", "model",
                                   "model_not_ready") from None
                run = seen[1]  # keep serving the checkpoint we have
            self._loaded[run_dir] = (checkpoints[-1], run)
            return run
