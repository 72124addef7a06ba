#!/usr/bin/env bash
# The GPU check: on a machine with one CUDA GPU, in under 8 minutes,
#   1. the GPU tests (tests/test_gpu.py; they skip without CUDA),
#   2. `lmlab bench --device cuda`: the GPT-2 small shape (gpt2-124m) in bf16, tokens/s and MFU against the
#      measured bf16 matmul peak, eager and compiled,
#   3. one FSDP training run under torchrun (nccl) with one process, resumed once.
#
# Usage: scripts/gpu_check.sh [--dry-run] [--wheels DIR] [--out DIR]
#   --dry-run    check the steps (that each command exists and parses its options) without a GPU, and print them
#   --wheels DIR install lmlab's dependencies from a folder of wheels, for a GPU machine without a package index:
#                on a machine with one, `pip download -d DIR "tyro>=0.9" tokenizers safetensors ...` (or
#                `pip download -d DIR -e .` minus torch), copy DIR over, then run this with --wheels DIR
#   --out DIR    where the figures and the run go (default: gpu-check)
set -euo pipefail
cd "$(dirname "$0")/.."

DRY=0
WHEELS=""
OUT="gpu-check"
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) DRY=1 ;;
        --wheels) WHEELS="$2"; shift ;;
        --out) OUT="$2"; shift ;;
        *) echo "gpu_check.sh: unknown option $1 (use --dry-run, --wheels DIR, --out DIR)" >&2; exit 2 ;;
    esac
    shift
done
PY="${PYTHON:-python3}"

step() { echo "== $*"; }

step "install (lmlab on this machine's torch)"
if ! "$PY" -c "import lmlab" 2>/dev/null; then
    if [ -n "$WHEELS" ]; then
        run=("$PY" -m pip install --no-index --find-links "$WHEELS" -e ".[test]")
    else
        run=("$PY" -m pip install -e ".[test]")
    fi
    if [ "$DRY" = 1 ]; then echo "would run: ${run[*]}"; else "${run[@]}"; fi
fi

TRAIN=(-m lmlab train --parallel fsdp --device cuda --preset gpt2-124m --tokenizer char --block-size 256
       --batch-size 16 --max-steps 40 --max-time 0 --eval-interval 20 --eval-tokens 20000 --checkpoint-interval 20
       --sample-tokens 0 --no-progress --trajectory-snapshots 0)
BENCH=(-m lmlab bench --device cuda --only peak throughput --steps 20 --out "$OUT")  # bench.json, bench.md

if [ "$DRY" = 1 ]; then
    step "dry run: checking the steps"
    test -f tests/test_gpu.py
    "$PY" -m pytest --collect-only -q tests/test_gpu.py >/dev/null
    "$PY" -m lmlab bench --help | grep -q -- "--device"
    "$PY" -m lmlab train --help | grep -q -- "--parallel"
    "$PY" -c "import torch.distributed.run"
    echo "would run: $PY -m pytest -q tests/test_gpu.py"
    echo "would run: $PY ${BENCH[*]}"
    echo "would run: $PY -m torch.distributed.run --standalone --nproc-per-node 1 ${TRAIN[*]} --out $OUT/fsdp"
    echo "dry run: every step is in place"
    exit 0
fi

"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA GPU here: run with --dry-run')"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
mkdir -p "$OUT"
rm -rf "$OUT/fsdp"

step "GPU tests"
"$PY" -m pytest -q tests/test_gpu.py

step "bench: gpt2-124m shape, bf16"
"$PY" "${BENCH[@]}"

step "FSDP under torchrun (nccl, 1 process), then a resume"
"$PY" -m torch.distributed.run --standalone --nproc-per-node 1 "${TRAIN[@]}" --out "$OUT/fsdp"
"$PY" -m torch.distributed.run --standalone --nproc-per-node 1 -m lmlab train --parallel fsdp --device cuda \
    --resume "$OUT/fsdp" --max-steps 60 --no-progress
"$PY" -m lmlab eval "$OUT/fsdp" --device cuda --json

echo "gpu check done: figures in $OUT/bench.md"
