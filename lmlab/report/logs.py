"""What training wrote into a run folder, read once for the pages: its config and its records, by kind."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from .. import rundir
from ..inside import read_records


@dataclass
class RunLogs:
    """Everything training wrote into one run folder, as plain records."""

    name: str
    path: Path
    config: dict
    train: list[dict] = field(default_factory=list)
    evals: list[dict] = field(default_factory=list)
    rollbacks: list[dict] = field(default_factory=list)
    probes: list[dict] = field(default_factory=list)
    telemetry: list[dict] = field(default_factory=list)
    samples: list[dict] = field(default_factory=list)
    samples_text: str = ""
    landscape_pngs: list[Path] = field(default_factory=list)
    inside: list[dict] = field(default_factory=list)


def load_run_logs(path: str | Path, name: Optional[str] = None) -> RunLogs:
    """Read a run folder; raises LmlabError when it does not exist or is not an lmlab run."""
    path = Path(path)
    config = rundir.read_config(path)
    run = RunLogs(name or path.resolve().name, path, config)
    for record in rundir.read_jsonl(path, rundir.METRICS):
        if "rollback" in record:
            run.rollbacks.append(record)
        elif "val_loss" in record:
            run.evals.append(record)
        elif "train_loss" in record:
            run.train.append(record)
    run.probes = rundir.read_jsonl(path, rundir.PROBES)
    run.telemetry = rundir.read_jsonl(path, rundir.TELEMETRY)
    run.inside = read_records(path)
    run.samples = rundir.read_jsonl(path, rundir.SAMPLES_JSONL)
    if not run.samples and rundir.exists(path, rundir.SAMPLES_TXT):
        run.samples_text = rundir.read_text(path, rundir.SAMPLES_TXT)
    run.landscape_pngs = [Path(e.path) for e in rundir.list_dir(path, rundir.LANDSCAPE) if e.name.endswith(".png")]
    return run


def best_eval(run: RunLogs) -> Optional[dict]:
    """The evaluation with the lowest finite validation loss (the later of equals), or None."""
    finite = [r for r in run.evals if isinstance(r.get("val_loss"), (int, float)) and math.isfinite(r["val_loss"])]
    return min(reversed(finite), key=lambda r: r["val_loss"]) if finite else None
