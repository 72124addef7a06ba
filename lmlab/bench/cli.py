"""`lmlab bench`: its options are BenchConfig; the command measures, prints the table and writes the files asked
for."""

from __future__ import annotations

import sys

from ..cli import parse
from ..common import atomic_write_bytes, atomic_write_json
from .suite import BenchConfig, run_bench
from .tables import print_table, to_markdown


def cmd_bench(argv: list[str]) -> int:
    cfg = parse(BenchConfig, argv, "lmlab bench")
    out = run_bench(cfg)
    print_table(out)
    if cfg.json:
        atomic_write_json(cfg.json, out)
        print(f"figures written to {cfg.json}", file=sys.stderr)
    if cfg.markdown:
        atomic_write_bytes(cfg.markdown, to_markdown(out).encode())
        print(f"Markdown tables written to {cfg.markdown}", file=sys.stderr)
    return 0
