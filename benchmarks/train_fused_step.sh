#!/usr/bin/env bash
# Stage 2's fused Adafactor step (optim.bf16_adafactor_step, compiled) side by side with torch's
# Adafactor through the fp32 scratch copy, on one machine: the compiled trainer at a 24-layer slice
# of Qwen3-30B-A3B (fits an H100), this tree, then the tree of commit BASE (its vllm_zeda/train
# files in old_tree/, made on the CPU machine: mkdir old_tree; for f in optim.py fused.py loop.py;
# do git show BASE:vllm_zeda/train/$f > old_tree/$f; done), then this tree under torch.profiler.
# Device machine: bash benchmarks/train_fused_step.sh
set -uo pipefail
OUT=${OUT:-/tmp/out}
B=(python3 benchmarks/bench_train.py in-memory --layers 24 --steps 4 --stage1-batches 6 --stage2-batches 8)
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
"${B[@]}" --out "$OUT/train_24_fused_step.json" 2>&1 | grep -E '^\{"stage|Error'
if [ -d old_tree ]; then
  rm -rf /tmp/base && mkdir /tmp/base && cp -r benchmarks vllm_zeda /tmp/base/ && cp old_tree/*.py /tmp/base/vllm_zeda/train/
  (cd /tmp/base && "${B[@]}" --out "$OUT/train_24_base.json" 2>&1 | grep -E '^\{"stage|Error')
fi
"${B[@]}" --out "$OUT/train_24_fused_step_profile.json" --profile "$OUT/profiles" 2>&1 | grep -E '^\{"stage|Error'
