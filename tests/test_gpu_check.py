"""scripts/gpu_check.sh on a machine without a GPU: its dry run checks that every step is in place."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import HANG_S

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.sh"


def _run(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHON=sys.executable)
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=HANG_S)


@pytest.mark.slow
def test_the_dry_run_checks_every_step():
    proc = _run("--dry-run", "--out", "somewhere")
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    assert "would run:" in out and "tests/test_gpu.py" in out
    assert "bench --device cuda --only peak throughput --steps 20 --out somewhere" in out
    assert "--nproc-per-node 1 -m lmlab train --parallel fsdp --device cuda" in out
    assert out.strip().endswith("dry run: every step is in place")


def test_an_unknown_option_is_one_line_and_exit_2():
    proc = _run("--gpu-please")
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "gpu_check.sh: unknown option --gpu-please (use --dry-run, --wheels DIR, --out DIR)"]
