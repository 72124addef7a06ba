"""The experiments by name, and running one: its result.json (measurements, claims, conclusion, the machine and
the command) and its page in DIR, and the table and conclusion for the terminal."""

from __future__ import annotations

import dataclasses
import os
import shlex
import time
from pathlib import Path
from typing import Callable, Optional

import torch

from .. import __version__
from ..common import LmlabError, atomic_write_json, resolve_device
from ..report.experiment_page import write_experiment_page
from . import descent, loss, patterns, truth
from .base import RUNS, Context, ExperimentConfig, cpu_name, prepare_out

EXPERIMENTS = ("loss", "descent", "patterns", "truth")
REGISTRY = {"loss": loss.EXPERIMENT, "descent": descent.EXPERIMENT, "patterns": patterns.EXPERIMENT,
            "truth": truth.EXPERIMENT}


def run_experiment(name: str, cfg: ExperimentConfig, say: Callable[[str], None] = lambda m: None,
                   command: str = "") -> dict:
    """Run experiment `name`; write result.json, index.html and the charts to cfg.out; return the result."""
    if name not in REGISTRY:
        raise LmlabError(f"unknown experiment {name!r}; choose from {', '.join(EXPERIMENTS)}")
    experiment = REGISTRY[name]
    cfg = dataclasses.replace(cfg, device=str(resolve_device(cfg.device)))  # auto: the device it picks, recorded
    out = Path(cfg.out or os.path.join("experiments", name))
    prepare_out(out)
    ctx = Context(name, cfg, out, say)
    load_at_start = _load_average()  # the machine is shared? then wall times say little
    started = time.perf_counter()
    result = {"experiment": name, "seed": cfg.seed, "data": cfg.data, "quick": cfg.quick, "device": cfg.device,
              **experiment.run(ctx)}
    result["claims"] = experiment.claims(result)
    result["conclusion"] = experiment.conclusion(result)
    result["wall_time_s"] = round(time.perf_counter() - started, 1)
    result["machine"] = {"cpu": cpu_name(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                         "torch": torch.__version__, "lmlab": __version__, "load_average_at_start": load_at_start,
                         "load_average_at_end": _load_average()}
    result["command"] = command or f"lmlab experiment {name} --out {shlex.quote(str(out))}"
    atomic_write_json(out / "result.json", result)
    write_experiment_page(out, result, experiment.title, experiment.idea, experiment.table(result),
                          experiment.charts(result), experiment.examples(result) if experiment.examples else "", RUNS)
    return result


def _load_average() -> Optional[list[float]]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def format_table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(headers, *rows)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([line(headers), line(["-" * w for w in widths]), *map(line, rows)])


def summary(result: dict) -> str:
    """The table and the conclusion, for the terminal."""
    experiment = REGISTRY[result["experiment"]]
    return f"{format_table(*experiment.table(result))}\n\n{result['conclusion']}"
