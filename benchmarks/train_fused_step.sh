#!/usr/bin/env bash
# The trainer on the device at the Qwen3-30B-A3B shape: stage 2's fused Adafactor step
# (optim.bf16_adafactor_step, compiled) side by side with torch's Adafactor through the fp32 scratch
# copy, where the compiled trainer's time goes, and what stage 1 gains from recomputing fewer layers.
# LAYERS=24 (default) fits an H100; LAYERS=48 (the full shape) needs an H200.
#   bash benchmarks/train_fused_step.sh PART...
#     this      this tree: stage 1 at batch 6 and 8, stage 2 at batch 8
#     base      stage 2 at batch 8 with commit BASE's optimizer (old_tree/, below)
#     compare   this, then base
#     profile   this tree under torch.profiler (3 steps, stage 1 batch 6; the 2 timed steps
#               profiled): kernel tables in $OUT/profiles
#     experts   one MoE block's experts, forward + backward (bench_train_experts.py): this tree's
#               hf/experts.py against old_tree/experts.py
#     partial-N stage 1 at batch $BATCHES (default 6) with --grad-checkpointing-layers N
#     no-ckpt   stage 1 without activation checkpointing at batch 2 and 3
# `base` and `experts` need BASE's files in old_tree/, made on the CPU machine:
#   mkdir old_tree; for f in optim.py fused.py loop.py; do git show BASE:vllm_zeda/train/$f > old_tree/$f; done
#   git show BASE:vllm_zeda/hf/experts.py > old_tree/experts.py
set -uo pipefail
OUT=${OUT:-/tmp/out}
L=${LAYERS:-24}
B=(timeout "${LIMIT:-280}" python3 benchmarks/bench_train.py in-memory --layers "$L")
show() { grep -E '^\{"(stage|impl)|Error|error'; }
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
parts=()
for a in "$@"; do if [ "$a" = compare ]; then parts+=(this base); else parts+=("$a"); fi; done
for part in "${parts[@]}"; do
  case "$part" in
  this)
    "${B[@]}" --steps 4 --stage1-batches 6 8 --stage2-batches 8 --out "$OUT/train_${L}_fused_step.json" 2>&1 | show ;;
  base)
    rm -rf /tmp/base && mkdir /tmp/base && cp -r benchmarks vllm_zeda /tmp/base/ && cp old_tree/{optim,fused,loop}.py /tmp/base/vllm_zeda/train/
    (cd /tmp/base && "${B[@]}" --steps 4 --stage1-batches --stage2-batches 8 --out "$OUT/train_${L}_base.json" 2>&1 | show) ;;
  profile)
    "${B[@]}" --steps 3 --stage1-batches 6 --stage2-batches --out "$OUT/train_${L}_profile.json" --profile "$OUT/profiles" 2>&1 | show ;;
  experts)
    timeout "${LIMIT:-280}" python3 benchmarks/bench_train_experts.py --out "$OUT/train_experts.json" \
      --impl this=vllm_zeda/hf/experts.py --impl base=old_tree/experts.py 2>&1 | show ;;
  partial-*)
    n=${part#partial-}
    "${B[@]}" --steps 4 --stage1-batches ${BATCHES:-6} --stage2-batches --out "$OUT/train_${L}_stage1_ckpt$n.json" \
      --extra --grad-checkpointing-layers "$n" 2>&1 | show ;;
  no-ckpt)
    "${B[@]}" --steps 4 --stage1-batches 2 3 --stage2-batches --out "$OUT/train_${L}_stage1_no_ckpt.json" --extra --no-grad-checkpointing 2>&1 | show ;;
  *) echo "usage: $0 this|base|compare|profile|experts|partial-N|no-ckpt ..." >&2; exit 2 ;;
  esac
done
