"""`lmlab bench`: its options are BenchConfig; the command measures, prints the table (or, with --json, the figures
as JSON on stdout and everything else on stderr) and writes the files asked for."""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path

from ..cli import parse
from ..common import LmlabError, atomic_write_bytes, atomic_write_json
from .suite import BenchConfig, run_bench
from .tables import print_table, to_markdown

FIGURES, TABLES = "bench.json", "bench.md"  # what --out DIR holds


def cmd_bench(argv: list[str]) -> int:
    cfg = parse(BenchConfig, argv, "lmlab bench")
    folder = Path(cfg.out) if cfg.out else None
    if folder is not None and folder.exists() and not folder.is_dir():  # refused before minutes of measuring
        raise LmlabError(f"--out {folder} is a file; give a folder")
    with contextlib.redirect_stdout(sys.stderr) if cfg.json else contextlib.nullcontext():
        out = run_bench(cfg)
        print_table(out)
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_json(folder / FIGURES, out)
        atomic_write_bytes(folder / TABLES, to_markdown(out).encode())
        print(f"figures written to {folder / FIGURES}, Markdown tables to {folder / TABLES}", file=sys.stderr)
    if cfg.json:
        print(json.dumps(out))
    return 0
