"""What training wrote into a run folder, read once for the pages (through run.Run): its config and its records, by
kind."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from ..config import TrainConfig
from ..run import EvalRecord, Metrics, Run, RollbackRecord, TrainRecord


@dataclass
class RunLogs:
    """Everything training wrote into one run folder: typed metric records, the other logs as training wrote them."""

    name: str
    run: Run
    train: list[TrainRecord] = field(default_factory=list)
    evals: list[EvalRecord] = field(default_factory=list)
    rollbacks: list[RollbackRecord] = field(default_factory=list)
    probes: list[dict] = field(default_factory=list)
    telemetry: list[dict] = field(default_factory=list)
    samples: list[dict] = field(default_factory=list)
    samples_text: str = ""
    landscape_pngs: list[Path] = field(default_factory=list)
    inside: list[dict] = field(default_factory=list)
    completions: list[dict] = field(default_factory=list)
    """--stage rl: completions and their rewards at each evaluation."""

    @property
    def path(self) -> Path:
        return self.run.path

    @property
    def config(self) -> TrainConfig:
        return self.run.config


def load_run_logs(path: str | Path, name: Optional[str] = None) -> RunLogs:
    """Read a run folder; raises LmlabError when it does not exist or is not an lmlab run."""
    run = Run.open(path)
    metrics = run.metrics()
    logs = RunLogs(name or run.path.resolve().name, run, metrics.train, metrics.evals, metrics.rollbacks,
                   run.probes(), run.telemetry(), run.samples(), inside=run.inside(), completions=run.completions(),
                   landscape_pngs=run.landscape_images())
    if not logs.samples:
        logs.samples_text = run.samples_text()
    return logs


def best_eval(run: RunLogs) -> Optional[EvalRecord]:
    """The best evaluation (the lowest validation loss; an rl run's highest held-out reward), or None:
    Metrics.best_eval."""
    return Metrics(run.train, run.evals, run.rollbacks).best_eval()
