#!/usr/bin/env bash
# benchmarks/quality/device_testbed.sh STAGE... -- the testbed rows of benchmarks/QUALITY.md on the
# device machine, cut into stages that each fit one device call (< 600 s). The models live in
# $Q (default /tmp/quality), which a warm machine keeps between calls; JSON and logs land in $OUT.
# Carry .quality/corpus (python benchmarks/quality/corpus.py --out .quality/corpus), or its
# archive .quality/corpus.tar.xz (7 MB, unpacked here; `tar -C .quality -cJf .quality/corpus.tar.xz
# corpus`), on the first call; `serve` also needs the vLLM bundle (../shared/gpu/README.md): $BUNDLE
# names its part folders (default .gpu/p1). The tree (17 MiB with examples/) and the 52 MiB
# one-part bundle exceed a call's 64 MiB: split the part in two (.gpu2/p1, .gpu2/p2, each with
# MANIFEST parts=2 and stage.sh), stage p1 on the call before (`bash .gpu2/p1/stage.sh --partial-ok
# .gpu2/p1`) and carry p2 with BUNDLE=.gpu2/p2 on the `serve` call, within the machine's warm window.
#
#   pretrain      pretrain.py --preset testbed --minutes $MINUTES (default 4)              ~5 min
#   convert-T     python -m vllm_zeda.train at target zero fraction T (e.g. convert-0.5)    ~2 min
#   evaluate      evaluate.py: teacher, baselines at kept 0.75/0.5/0.25, every converted
#                 checkpoint at its trained point and its zero_bias dial (transformers, fp32)  ~2 min
#   serve         evaluate.py --serve: math exact match through `vllm serve` (bf16, eager), the
#                 teacher (stock) and zeda-0.5 with --enable-zeda at its trained point and at
#                 zero_bias $SERVE_BIASES (default -1 1)                                   ~5 min
set -uo pipefail
[ $# -gt 0 ] || { awk 'NR > 1 && /^#/ { print; next } NR > 1 { exit }' "$0"; exit 2; }
for stage in "$@"; do  # before anything runs: a typo costs nothing
  [[ $stage =~ ^(pretrain|convert-0?\.[0-9]+|evaluate|serve)$ ]] || { echo "device_testbed: unknown stage '$stage'" >&2; exit 2; }
done
: "${OUT:?OUT must name the folder results go to (the device tool sets it)}"
Q=${Q:-/tmp/quality}
CORPUS=${CORPUS:-.quality/corpus}
STEPS1=${STEPS1:-200}
STEPS2=${STEPS2:-300}
BIASES=${BIASES:-"-1 -0.5 0.5 1"}
mkdir -p "$Q"
if [ ! -f "$CORPUS/MANIFEST.json" ] && [ -f .quality/corpus.tar.xz ] && [ "$CORPUS" = .quality/corpus ]; then
  tar -C .quality -xJf .quality/corpus.tar.xz
fi
[ -f "$CORPUS/MANIFEST.json" ] || { echo "device_testbed: no corpus at $CORPUS (carry .quality/corpus or .quality/corpus.tar.xz)" >&2; exit 2; }
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1

source "$(dirname "$0")/../device_common.sh"  # run()

zedas() { ls -d "$Q"/zeda-* 2>/dev/null | sort; }

for stage in "$@"; do
  case "$stage" in
    pretrain)
      run 560 pretrain python3 benchmarks/quality/pretrain.py --corpus "$CORPUS" --preset testbed \
        --minutes "${MINUTES:-4}" --out "$Q/testbed"
      cp "$Q/testbed/pretrain_report.json" "$OUT/pretrain_testbed.json" 2>/dev/null ;;
    convert-*)
      t=${stage#convert-}
      [ -d "$Q/zeda-$t" ] && { echo "== convert_$t: $Q/zeda-$t is there already"; continue; }
      resume=(); [ -d "$Q/work-$t" ] && resume=(--resume)  # a call cut short goes on where it stopped
      run 560 "convert_$t" python3 -m vllm_zeda.train --model "$Q/testbed" --output "$Q/zeda-$t" --work-dir "$Q/work-$t" \
        --data "$CORPUS/train" --target-zero-fraction "$t" --stage1-steps "$STEPS1" --stage2-steps "$STEPS2" \
        --seq-len 512 --batch-size 16 --device cuda --quiet --no-plot "${resume[@]}"
      cp "$Q/zeda-$t/zeda_report.json" "$OUT/convert_$t.json" 2>/dev/null ;;
    evaluate)
      # shellcheck disable=SC2046,SC2086
      run 580 evaluate python3 benchmarks/quality/evaluate.py --teacher "$Q/testbed" --zeda $(zedas) \
        --corpus "$CORPUS" --out "$OUT/quality_testbed.json" --zero-biases $BIASES \
        --max-blocks 64 --math-questions 500 --device cuda ;;
    serve)
      for part in ${BUNDLE:-.gpu/p1}; do
        stage=$part/stage.sh; [ -f "$stage" ] || stage=.gpu/stage.sh
        bash "$stage" --partial-ok "$part" >/dev/null || { echo "device_testbed: staging $part failed" >&2; exit 1; }
      done
      [ -f /tmp/site/.zeda_bundle ] || { echo "device_testbed: the vLLM bundle is incomplete (stage its other parts first)" >&2; exit 1; }
      python3 benchmarks/device_env.py /tmp/zeda_meta >/dev/null
      # shellcheck disable=SC2086
      run 580 serve env PYTHONPATH=/tmp/site:/tmp/zeda_meta:$PYTHONPATH VLLM_USE_FLASHINFER_SAMPLER=0 \
        python3 benchmarks/quality/evaluate.py --teacher "$Q/testbed" --zeda "$Q/zeda-0.5" \
        --corpus "$CORPUS" --out "$OUT/quality_testbed_serve.json" --zero-biases ${SERVE_BIASES:-"-1 1"} --kept \
        --max-blocks 1 --math-questions 500 --device cuda --serve \
        --serve-args --dtype bfloat16 --enforce-eager --max-model-len 512 --max-num-seqs 64 \
        --gpu-memory-utilization 0.3 ;;
    *) echo "device_testbed: unknown stage '$stage'" >&2; exit 2 ;;
  esac
done
