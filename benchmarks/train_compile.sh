#!/usr/bin/env bash
# The trainer at the full Qwen3-30B-A3B shape on one GPU, eager and with --compile side by side
# (RESULTS §8). Device machine: bash benchmarks/train_compile.sh [extra bench_train flags]
set -euo pipefail
OUT=${OUT:-/tmp/out}
python3 benchmarks/bench_train.py in-memory --out "$OUT/train_48_eager.json" --steps 6 --stage1-batches 6 --stage2-batches 8 "$@" --extra --no-compile
python3 benchmarks/bench_train.py in-memory --out "$OUT/train_48_compile.json" --steps 6 --stage1-batches 6 8 --stage2-batches 8 "$@" --extra --compile
