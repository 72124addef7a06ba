"""The runs `lmlab serve` serves: run folders named on the command line and the runs in folders of runs (looked up
on every request, so new ones show up), a summary of each for the dashboard, and their loaded models, reloaded
when training writes a newer checkpoint. Model names are looked up among these runs, never opened as paths."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import torch

from .. import rundir
from ..common import LmlabError
from ..run import LoadedRun, Metrics, Run, load_run
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
    metrics = Metrics.of(records)
    last_train = metrics.train[-1] if metrics.train else None
    evals = [r for r in metrics.evals if r.finite]
    best = metrics.best_eval()
    run = Run(run_dir)
    try:
        config = run.config
    except LmlabError:
        config = None  # still listed, with what the log says
    try:
        checkpoints = run.checkpoints()
    except LmlabError:
        checkpoints = []
    model = config.model if config is not None else None
    return {
        "name": name,
        **{k: v for k, v in run.status().items() if k in ("status", "error")},
        "step": last_train.step if last_train else 0,
        "tokens": last_train.tokens if last_train else 0,
        "elapsed_s": last_train.elapsed_s if last_train else None,
        "train_loss": last_train.train_loss if last_train else None,
        "val_loss": evals[-1].val_loss if evals else None,
        "val_stride": metrics.evals[-1].val_stride if metrics.evals else None,
        "best_val_loss": best.val_loss if best else None,
        "best_step": best.step if best else None,
        "overfitting_step": next((r.step for r in evals if r.overfitting), None),
        "checkpoint_step": checkpoints[0].step if checkpoints else None,
        "preset": config.preset if config else None,
        "stage": config.stage if config else "pretrain",
        "tokenizer": config.data.tokenizer if config else None,
        "vocab_size": run.vocab_size if config else None,
        "model": {k: getattr(model, k, None) for k in ("arch", "n_layer", "n_head", "n_embd", "block_size")},
    }


def has_checkpoint(run_dir: Path) -> bool:
    try:
        return bool(Run(run_dir).checkpoints())
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
        checkpoints = Run(run_dir).checkpoints()  # newest first
        if not checkpoints:
            raise ApiError(409, f"run {name!r} has no checkpoint yet; try again once training has written one",
                           "model", "model_not_ready")
        with self._lock:
            seen = self._loaded.get(run_dir)
            if seen is not None and seen[0] == checkpoints[0].path:
                return seen[1]
            try:
                run = load_run(run_dir, self.device, self.checkpoint)
            except (LmlabError, RuntimeError, MemoryError) as e:  # what is in a run folder is never a 500
                if seen is None:
                    detail = str(e) if isinstance(e, LmlabError) else f"{type(e).__name__}: {e}"
                    raise ApiError(409, f"run {name!r} cannot be loaded: {detail.splitlines()[0][:500]}", "model",
                                   "model_not_ready") from None
                run = seen[1]  # keep serving the checkpoint we have
            self._loaded[run_dir] = (checkpoints[0].path, run)
            return run
