"""How far the golden-loss run (tests/test_golden.py) moves between CPU kernels, and how far a real change moves it.

Runs the golden command, in float64 and in float32, under each kernel setting (ATEN_CPU_CAPABILITY, MKL's and
oneDNN's instruction caps, one thread or two), then in float64 under small deliberate changes (a learning rate one
float32 ulp up, another seed). For each run it prints the largest relative difference from the stored losses and
its ratio to the test's tolerance: every kernel row must stay under 1, every change row must go over it.

    python scripts/golden_spread.py [--runs-dir DIR]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from unittest import mock

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import test_golden as golden  # noqa: E402

KERNELS = {
    "as installed": {},
    "threads 2": {"+": ["--threads", "2"]},
    "aten default": {"ATEN_CPU_CAPABILITY": "default"},
    "aten avx2": {"ATEN_CPU_CAPABILITY": "avx2"},
    "aten avx512": {"ATEN_CPU_CAPABILITY": "avx512"},
    "mkl avx2": {"MKL_ENABLE_INSTRUCTIONS": "AVX2"},
    "mkl sse4.2": {"MKL_ENABLE_INSTRUCTIONS": "SSE4_2"},
    "onednn avx2": {"ONEDNN_MAX_CPU_ISA": "AVX2"},
    "all default": {"ATEN_CPU_CAPABILITY": "default", "MKL_ENABLE_INSTRUCTIONS": "SSE4_2",
                    "ONEDNN_MAX_CPU_ISA": "SSE41"},
}
ULP = 2.0 ** -23  # one float32 ulp, relative
CHANGES = {
    "lr +1 f32 ulp": ["--lr", repr(1e-2 * (1 + ULP))],
    "muon lr +1 f32 ulp": ["--muon-lr", repr(0.02 * (1 + ULP))],
    "seed 6": ["--seed", "6"],
}


def relative(work: Path, name: str, float64: bool, env: dict, extra: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Relative differences from the stored losses (train steps 1-30, then val 0-30) and the test's tolerances."""
    out = f"{name}-{'f64' if float64 else 'f32'}".replace(" ", "_").replace("+", "p").replace(".", "")
    with mock.patch.dict(os.environ, env):  # the child's environment is a copy of this one
        train, val = golden.train_golden(work, out, *(["--dtype", "float64"] if float64 else []), *extra)
    got = np.array([v for _, v in train + val])
    want = np.array((golden.GOLDEN64_TRAIN + golden.GOLDEN64_VAL) if float64 else (golden.GOLDEN_TRAIN + golden.GOLDEN_VAL))
    tol = np.array([golden.TOL64 if float64 else golden.tolerance32(s) for s, _ in train + val])
    return np.abs(got - want) / np.abs(want), tol


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs-dir", default=None, help="where the runs go (default: a new temporary folder)")
    args = parser.parse_args()
    work = Path(args.runs_dir or tempfile.mkdtemp(prefix="golden-spread-"))
    work.mkdir(parents=True, exist_ok=True)
    labels = [f"step {s}" for s in range(1, 31)] + [f"val {s}" for s in (0, 10, 20, 30)]
    print(f"{'':6} {'setting':20} {'dtype':7} {'max rel diff':>12} {'where':>8} {'max diff/tol':>12}")
    rows = [("kernel", name, f64, {k: v for k, v in s.items() if k != "+"}, s.get("+", []))
            for f64 in (True, False) for name, s in KERNELS.items()]
    rows += [("change", name, True, {}, extra) for name, extra in CHANGES.items()]
    for group, name, f64, env, extra in rows:
        rel, tol = relative(work, name, f64, env, extra)
        print(f"{group:6} {name:20} {'float64' if f64 else 'float32':7} {rel.max():12.2e} {labels[int(rel.argmax())]:>8}"
              f" {(rel / tol).max():12.3g}")


if __name__ == "__main__":
    main()
