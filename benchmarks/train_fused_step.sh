#!/usr/bin/env bash
# Stage 2's fused Adafactor step (optim.bf16_adafactor_step, compiled) side by side with torch's
# Adafactor through the fp32 scratch copy, on one machine, and where the compiled trainer's time
# goes. LAYERS=24 (default) fits an H100; LAYERS=48 (the full Qwen3-30B-A3B shape) needs an H200.
#   bash benchmarks/train_fused_step.sh PART...
#     compare   this tree (stage 1 batch 6 and 8, stage 2 batch 8), then stage 2 of commit BASE's tree
#     profile   this tree under torch.profiler (3 steps, stage 1 batch 6): kernel tables in $OUT/profiles
#     no-ckpt   stage 1 without activation checkpointing at batch 2 and 3
# `compare` needs BASE's vllm_zeda/train files in old_tree/, made on the CPU machine:
#   mkdir old_tree; for f in optim.py fused.py loop.py; do git show BASE:vllm_zeda/train/$f > old_tree/$f; done
set -uo pipefail
OUT=${OUT:-/tmp/out}
L=${LAYERS:-24}
B=(timeout "${LIMIT:-280}" python3 benchmarks/bench_train.py in-memory --layers "$L")
show() { grep -E '^\{"stage|Error|error'; }
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
for part in "$@"; do
  case "$part" in
  compare)
    "${B[@]}" --steps 4 --stage1-batches 6 8 --stage2-batches 8 --out "$OUT/train_${L}_fused_step.json" 2>&1 | show
    rm -rf /tmp/base && mkdir /tmp/base && cp -r benchmarks vllm_zeda /tmp/base/ && cp old_tree/*.py /tmp/base/vllm_zeda/train/
    (cd /tmp/base && "${B[@]}" --steps 4 --stage1-batches --stage2-batches 8 --out "$OUT/train_${L}_base.json" 2>&1 | show) ;;
  profile)
    "${B[@]}" --steps 3 --stage1-batches 6 --stage2-batches --out "$OUT/train_${L}_profile.json" --profile "$OUT/profiles" 2>&1 | show ;;
  no-ckpt)
    "${B[@]}" --steps 4 --stage1-batches 2 3 --stage2-batches --out "$OUT/train_${L}_stage1_no_ckpt.json" --extra --no-grad-checkpointing 2>&1 | show ;;
  *) echo "usage: $0 compare|profile|no-ckpt ..." >&2; exit 2 ;;
  esac
done
