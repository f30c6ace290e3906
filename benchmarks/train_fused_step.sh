#!/usr/bin/env bash
# Stage 2's fused Adafactor step (optim.bf16_adafactor_step, compiled) side by side with torch's
# Adafactor through the fp32 scratch copy, on one machine: the compiled trainer at a 24-layer slice
# of Qwen3-30B-A3B (fits an H100). Two device calls, back to back on one warm machine:
#   bash benchmarks/train_fused_step.sh compare   # this tree, then the tree of commit BASE
#   bash benchmarks/train_fused_step.sh probe     # this tree profiled; stage 1 without checkpointing
# `compare` needs BASE's vllm_zeda/train files in old_tree/, made on the CPU machine:
#   mkdir old_tree; for f in optim.py fused.py loop.py; do git show BASE:vllm_zeda/train/$f > old_tree/$f; done
set -uo pipefail
OUT=${OUT:-/tmp/out}
B=(timeout 280 python3 benchmarks/bench_train.py in-memory --layers 24 --steps 4)
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
case "${1:-}" in
compare)
  "${B[@]}" --stage1-batches 6 --stage2-batches 8 --out "$OUT/train_24_fused_step.json" 2>&1 | grep -E '^\{"stage|Error'
  rm -rf /tmp/base && mkdir /tmp/base && cp -r benchmarks vllm_zeda /tmp/base/ && cp old_tree/*.py /tmp/base/vllm_zeda/train/
  (cd /tmp/base && "${B[@]}" --stage1-batches --stage2-batches 8 --out "$OUT/train_24_base.json" 2>&1 | grep -E '^\{"stage|Error')
  ;;
probe)
  "${B[@]}" --stage1-batches 6 --stage2-batches 8 --out "$OUT/train_24_fused_step_profile.json" --profile "$OUT/profiles" 2>&1 | grep -E '^\{"stage|Error'
  "${B[@]}" --stage1-batches 2 3 --stage2-batches --out "$OUT/train_24_stage1_no_ckpt.json" --extra --no-grad-checkpointing 2>&1 | grep -E '^\{"stage|Error'
  ;;
*) echo "usage: $0 compare|probe" >&2; exit 2 ;;
esac
