#!/usr/bin/env bash
# The trainer as it runs by default on one GPU (compiled) under torch.profiler: a kernel table per
# stage in $OUT/profiles, to see what keeps model-FLOPs utilisation under the targets (RESULTS §8).
# Needs only the device image's torch and transformers (no .gpu bundle). LAYERS=24 (default) fits
# an H100; LAYERS=48 needs an H200. Device machine: bash benchmarks/train_profile.sh [bench flags]
set -euo pipefail
OUT=${OUT:-/tmp/out}
LAYERS=${LAYERS:-24}
python3 benchmarks/bench_train.py in-memory --out "$OUT/train_${LAYERS}_compile_profile.json" --layers "$LAYERS" \
  --steps 3 --stage1-batches 6 --stage2-batches 8 --profile "$OUT/profiles" "$@"
