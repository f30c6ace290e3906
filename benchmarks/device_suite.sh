#!/usr/bin/env bash
# benchmarks/device_suite.sh STAGE... -- the GPU measurements of benchmarks/RESULTS.md, cut into
# stages that each fit one device call (< 600 s); each line names the RESULTS.md section it feeds.
# Run from the repo root on the device machine, with the ../shared/gpu bundle carried as .gpu
# (or in parts: BUNDLE names the part folders this call carries, the others staged by an earlier
# call on the same warm machine); JSON and logs land in $OUT.
#
#   kernel-tests  tests/test_gpu_kernels.py on the GPU (compiled, no interpreter)      §1    <1 min
#   parity    gpu_parity.py --modes skip remap masked (fp32, CUDA graphs)              §1    ~5 min
#   layer     bench_moe_layer.py, both shapes, 1-16,384 tokens, skip 0-0.75            §2.1  ~2 min
#   layer-small  bench_moe_layer.py, both shapes, 1/2/4/8/16 tokens at every skip, profiles at 1, 2,
#             4 and 8 tokens (device µs by kernel; `tables.py layer-kernels`)          §2.2  ~1 min
#   tune      tune_moe_configs.py: the tile grid and tables, E=128 N=768               §2.3  ~4 min
#   tune-glm  the same for GLM-4.7-Flash's experts (E=64 N=1536, top-4); the grid and tables land
#             in $OUT/tune_glm.json, $OUT/tables_glm                                   §2.3  ~4 min
#   tune-fp8  the same for FP8 experts (--quant fp8: a scale per expert, as --quantization fp8
#             makes online); then fp8-block (Qwen's FP8 release) as tune-fp8-block      §2.5  ~4 min
#   route     bench_route.py: the routing kernel and the router's gate vs vLLM's       §2.4  <1 min
#   e2e50     bench_e2e.py --configs static8 ideal4 zeda --targets 0 0.5 --quick       §3.1  ~8 min
#   e2e75     bench_e2e.py --configs static8 ideal2 zeda --targets 0.75 --quick        §3.2  ~6 min
#   e2e-glm   bench_e2e.py --shape glm-4.7-flash: static4 ideal2 zeda at skip 0 and 0.5, prefill
#             and decode at batch 1 and 16, --quick                                    §3.4  ~8 min
#   fp8-layer bench_moe_layer.py --quant fp8 and fp8-block, Qwen3-30B-A3B's experts, 1-16,384 tokens,
#             skip 0-0.75                                                              §2.5  ~3 min
#   fp8-tensor-ab  the per-tensor FP8 layer (--quant fp8, 1-16,384 tokens, skip 0 and 0.5, profiles
#             at 8 and 16,384) in this tree, then in $BASE (an earlier commit's files:
#             `git archive COMMIT vllm_zeda benchmarks/*.py tests/kernel_oracles.py | tar -x -C .base`,
#             carried as .base), after the kernel tests of per-tensor quantisation  §2.5  ~4 min
#   fp8-parity  gpu_parity.py on FP8 forms of the quickstart model, block and online per-tensor, every
#             engine side by side: skip without zero slots = masked (= stock vLLM on the original, block);
#             the zero fraction rises with the bias                                   §1  ~4 min
#   fp8-e2e   bench_e2e.py --quantization fp8 (online per-tensor): static8 ideal4 zeda at skip 0 and
#             0.5, prefill and decode at batch 1, 8, 16, one batch-8 decode step profiled    §3.5  ~8 min
#   fp8-block-e2e  the same in Qwen3-30B-A3B-FP8's 128x128 block format                §3.5  ~8 min
#   b256-run  batch-256 decode, static8 and zeda (skip 0.5 first, then 0), then one run of each
#             profiled whole, CPU and GPU (--profile-run; `tables.py run-profile`)     §3.3  ~6 min
#   serve3    bench_serve.py: static8, zeda and ideal4 servers in one call, one run each after a
#             64-request warm-up (three servers with two runs each do not fit a call)  §5.1  ~8 min
#   serve-graphs  static8 and zeda, every server given one explicit list of CUDA-graph sizes up to
#             8,192 tokens (vLLM's to 512, then 17 more); two runs each, 128 warm-up   §5.2  ~5 min
#   serve-vllm-graphs  static8 and zeda on vLLM's default graph sizes (up to 512 tokens;
#             bench_serve --graphs vllm); two runs each after a 128-request warm-up    §5.2  ~5 min
#   serve-profile  ideal4 and zeda on vLLM's default graph sizes, each with one more run under
#             torch.profiler (device time by kernel) and the zero fraction by phase    §5.2  ~7 min
#   host      bench_host.py: host µs per MoE layer call in eager mode, stock vs the plugin; then
#             tests/test_gpu_kernels.py on the GPU and bench_route.py                  §5.3  ~3 min
#   train48   bench_train.py in-memory: both stages of the full Qwen3-30B-A3B shape (48 layers),
#             stage 1 again at the zero fraction stage 2 leaves (0.33-0.5); needs no vLLM bundle,
#             an H200's memory (kind nvidia-h200, needs_h200)                          §8    ~4 min
# Two GPUs (nvidia-h200-x2):
#   env       GPUs and their links (nvidia-smi topo), torch's device count             §6    <1 min
#   tp-parity gpu_parity.py: skip and masked on one GPU, at TP=2; skip at TP=2 + EP    §6.1  ~6 min
#   tp-e2e    bench_e2e.py --tp 2: static8 and zeda at skip 0 and 0.5                  §6.2  ~8 min
#   ep-e2e    bench_e2e.py --tp 2 --ep: the same with expert parallelism               §6.3  ~8 min
#   tp-serve  bench_serve.py --tp 2: stock static vs the plugin through `vllm serve` at TP=2
#             (two runs each after a warm-up, the faster reported)                     §6.4  ~7 min
#   ep-serve  the same, the plugin with --enable-expert-parallel (one run each)        §6.4  ~7 min
#   tp-train  gpu_train_torchrun.py: torchrun (FSDP2) 2 processes vs 1 (fp32 and bf16 tokens/s)     §6.5  ~3 min
#
# Each stage's commands get their own timeout, so one slow stage leaves the others' files. The
# logs are packed into $OUT/logs.tgz at the end (the device tool returns at most 8 files).
set -uo pipefail
[ $# -gt 0 ] || { awk 'NR > 1 && /^#/ { print; next } NR > 1 { exit }' "$0"; exit 2; }
STAGES="kernel-tests parity layer layer-small tune tune-glm tune-fp8 tune-fp8-block route e2e50 e2e75 e2e-glm fp8-layer fp8-tensor-ab fp8-parity fp8-e2e fp8-block-e2e b256-run serve3 serve-graphs serve-vllm-graphs serve-profile host train48 env tp-parity tp-train tp-e2e ep-e2e tp-serve ep-serve"
NO_BUNDLE="train48 env"  # stages that import no vLLM: a call of only these stages carries no bundle
for stage in "$@"; do  # before staging the bundle: a typo costs nothing
  [[ " $STAGES " == *" $stage "* ]] || { echo "device_suite: unknown stage '$stage' ($STAGES)" >&2; exit 2; }
done
: "${OUT:?OUT must name the folder results go to (the device tool sets it)}"
# A warm machine may still hold an engine of an earlier call that outlived its worker: free the GPUs
stale=$(nvidia-smi --query-compute-apps=pid --format=csv,noheader 2>/dev/null | tr -d ' ' | grep -E '^[0-9]+$')
[ -z "$stale" ] || { echo "device_suite: killing GPU processes left by an earlier call: $stale" | tr '\n' ' '; echo
                     kill -9 $stale 2>/dev/null; sleep 3; }
needs_bundle=0
for stage in "$@"; do [[ " $NO_BUNDLE " == *" $stage "* ]] || needs_bundle=1; done
if [ "$needs_bundle" = 1 ]; then
  for part in ${BUNDLE:-.gpu/p1}; do  # BUNDLE: the part folders this call carries (device_testbed.sh's header)
    stager=$part/stage.sh; [ -f "$stager" ] || stager=.gpu/stage.sh
    bash "$stager" --partial-ok "$part" >/dev/null || { echo "device_suite: staging $part failed" >&2; exit 1; }
  done
  [ -f /tmp/site/.zeda_bundle ] || { echo "device_suite: the vLLM bundle is incomplete (stage its other parts first)" >&2; exit 1; }
fi
python3 benchmarks/device_env.py /tmp/zeda_meta >/dev/null
export PYTHONPATH=/tmp/site:/tmp/zeda_meta:$PWD VLLM_USE_FLASHINFER_SAMPLER=0 HF_HUB_OFFLINE=1
# NVLink multicast stays off on the shared multi-GPU hosts (device README), in every child too
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1

source "$(dirname "$0")/device_common.sh"  # run()

pack_logs() { (cd "$OUT" && ls *.log >/dev/null 2>&1 && tar czf logs.tgz *.log && rm -f *.log); }
trap pack_logs EXIT
export PYTHONUNBUFFERED=1

for stage in "$@"; do
  case "$stage" in
    kernel-tests) run 120 kernel_tests env TRITON_INTERPRET=0 python3 -m pytest -q -p no:cacheprovider tests/test_gpu_kernels.py ;;
    parity) run 420 parity python3 benchmarks/gpu_parity.py --out "$OUT/parity.json" --modes skip remap masked \
             --worker-timeout 120 ;;
    layer) run 300 layer python3 benchmarks/bench_moe_layer.py --out "$OUT/layer.json" ;;
    layer-small) run 200 layer_small python3 benchmarks/bench_moe_layer.py --out "$OUT/layer_small.json" \
             --tokens 1 2 4 8 16 --profile 1 2 4 8 ;;
    tune) run 450 tune python3 benchmarks/tune_moe_configs.py --out "$OUT/tune.json" --table-dir "$OUT/tables" ;;
    tune-glm) run 450 tune_glm python3 benchmarks/tune_moe_configs.py --shape glm47_flash --out "$OUT/tune_glm.json" \
             --table-dir "$OUT/tables_glm" ;;
    tune-fp8|tune-fp8-block)
             q=${stage#tune-}; t=${stage//-/_}
             run 450 "$t" python3 benchmarks/tune_moe_configs.py --quant "$q" --out "$OUT/$t.json" --table-dir "$OUT/tables_$t" ;;
    route) run 120 route python3 benchmarks/bench_route.py --out "$OUT/route.json" ;;
    e2e50) run 585 e2e50 python3 benchmarks/bench_e2e.py --out "$OUT/e2e50.json" --configs static8 ideal4 zeda \
             --targets 0 0.5 --quick --timeout 220 ;;
    e2e75) run 585 e2e75 python3 benchmarks/bench_e2e.py --out "$OUT/e2e75.json" --configs static8 ideal2 zeda \
             --targets 0.75 --quick --timeout 220 ;;
    e2e-glm) run 585 e2e_glm python3 benchmarks/bench_e2e.py --out "$OUT/e2e_glm.json" --shape glm-4.7-flash \
               --targets 0 0.5 --workloads prefill decode_b1 decode_b16 --quick ;;
    fp8-layer) for q in fp8 fp8-block; do
             run 200 "layer_${q//-/_}" python3 benchmarks/bench_moe_layer.py --out "$OUT/layer_${q//-/_}.json" \
               --shapes qwen3_30b_a3b --quant "$q" --tokens 1 4 8 16 64 256 1024 4096 16384 --profile 1 8
           done ;;
    fp8-tensor-ab)
             base=${BASE:-.base}
             [ -f "$base/vllm_zeda/__init__.py" ] || { echo "== fp8-tensor-ab: no tree at $base (see the header)"; continue; }
             run 120 kernel_tests_fp8 env TRITON_INTERPRET=0 python3 -m pytest -q -p no:cacheprovider tests/test_gpu_kernels.py \
               -k "per_tensor or group_quant or live_activation"
             for tree in "$PWD" "$(cd "$base" && pwd)"; do
               tag=this; [ "$tree" = "$PWD" ] || tag=base
               run 200 "layer_fp8_$tag" env PYTHONPATH="$tree:/tmp/site:/tmp/zeda_meta" python3 "$tree/benchmarks/bench_moe_layer.py" \
                 --out "$OUT/layer_fp8_$tag.json" --shapes qwen3_30b_a3b --quant fp8 --tokens 1 8 16 256 1024 4096 16384 \
                 --skips 0 0.5 --profile 8 16384
             done ;;
    fp8-parity)  # both formats at once, every mode's engine side by side (one after another: ~9 min)
             run 330 parity_fp8_block python3 benchmarks/gpu_parity.py --out "$OUT/parity_fp8_block.json" \
               --quantization fp8-block --dtype bfloat16 --modes original masked skip0 skip skip_bias remap \
               --parallel 6 --worker-timeout 300 --model examples/tiny_moe > "$OUT/parity_fp8_block.run" &
             run 330 parity_fp8 python3 benchmarks/gpu_parity.py --out "$OUT/parity_fp8.json" \
               --quantization fp8 --dtype bfloat16 --modes original masked skip0 skip skip_bias \
               --parallel 5 --worker-timeout 300 --model examples/tiny_moe > "$OUT/parity_fp8.run" &
             wait; cat "$OUT/parity_fp8_block.run" "$OUT/parity_fp8.run"; rm -f "$OUT"/parity_fp8*.run ;;
    fp8-e2e|fp8-block-e2e)
             q=fp8; [ "$stage" = fp8-block-e2e ] && q=fp8-block
             run 585 "${stage//-/_}" python3 benchmarks/bench_e2e.py --out "$OUT/${stage//-/_}.json" --quantization "$q" \
             --configs static8 ideal4 zeda --targets 0 0.5 --workloads prefill decode_b1 decode_b8 decode_b16 --quick \
             --profile-decode --profile-batch 8 --temperature 1 --timeout 200 ;;
    b256-run) run 585 b256_run python3 benchmarks/bench_e2e.py --out "$OUT/b256_run.json" --configs static8 zeda \
             --targets 0.5 0 --quick --workloads decode_b256 --profile-run decode_b256 --timeout 200 ;;
    serve3) run 585 serve3 python3 benchmarks/bench_serve.py --out "$OUT/serve3.json" --zero-bias 2.6e-6 \
             --configs static8 zeda ideal4 --requests 192 --warmup 64 --repeats 1 ;;
    serve-graphs)
             sizes=$(python3 -c 'print(",".join(map(str, [1, 2, 4, *range(8, 256, 8), *range(256, 513, 16),
                        576, 640, 768, 896, 1024, 1280, 1536, 1792, 2048, 2560, 3072, 3584, 4096, 5120, 6144, 7168, 8192])))')
             run 570 serve_graphs python3 benchmarks/bench_serve.py --out "$OUT/serve_graphs.json" --zero-bias 2.6e-6 \
             --configs static8 zeda --requests 192 --warmup 128 --repeats 2 \
             --server-args "--compilation-config '{\"cudagraph_capture_sizes\": [$sizes]}'" ;;
    serve-vllm-graphs) run 570 serve_vllm_graphs python3 benchmarks/bench_serve.py --out "$OUT/serve_vllm_graphs.json" \
             --zero-bias 2.6e-6 --configs static8 zeda --requests 192 --warmup 128 --repeats 2 --graphs vllm ;;
    serve-profile) run 585 serve_profile python3 benchmarks/bench_serve.py --out "$OUT/serve_profile.json" \
             --zero-bias 2.6e-6 --configs ideal4 zeda --requests 192 --warmup 128 --repeats 1 --profile --graphs vllm ;;
    host) run 120 host python3 benchmarks/bench_host.py --out "$OUT/host.json"
          run 120 kernel_tests env TRITON_INTERPRET=0 python3 -m pytest -q -p no:cacheprovider tests/test_gpu_kernels.py
          run 120 route python3 benchmarks/bench_route.py --out "$OUT/route.json" ;;
    train48) run 420 train48 python3 benchmarks/bench_train.py in-memory --layers 48 --steps 8 --stage1-batches 10 \
             --stage2-batches 8 10 --then-stage1-batches 10 8 --out "$OUT/train48.json" ;;
    env) run 30 env bash -c 'nvidia-smi -L; nvidia-smi topo -m; python3 -c "import torch; print(torch.__version__, torch.cuda.device_count())"' ;;
    tp-parity) run 480 tp_parity python3 benchmarks/gpu_parity.py --out "$OUT/tp_parity.json" \
             --modes skip skip@tp2 skip@tp2ep masked masked@tp2 --worker-timeout 110 ;;
    tp-train) run 180 tp_train python3 benchmarks/gpu_train_torchrun.py --out "$OUT/tp_train.json" --gpus 2 ;;
    tp-e2e) run 585 tp_e2e python3 benchmarks/bench_e2e.py --out "$OUT/tp_e2e.json" --configs static8 zeda \
             --targets 0 0.5 --quick --timeout 160 --tp 2 ;;
    ep-e2e) run 585 ep_e2e python3 benchmarks/bench_e2e.py --out "$OUT/ep_e2e.json" --configs static8 zeda \
             --targets 0 0.5 --quick --timeout 200 --tp 2 --ep ;;
    tp-serve) run 585 tp_serve python3 benchmarks/bench_serve.py --out "$OUT/tp_serve.json" --zero-bias 2.7e-6 --tp 2 \
             --configs static8 zeda --requests 256 ;;
    ep-serve) run 585 ep_serve python3 benchmarks/bench_serve.py --out "$OUT/ep_serve.json" --zero-bias 2.7e-6 --tp 2 \
             --configs static8 zeda_ep --requests 256 --warmup 128 --repeats 1 ;;
  esac
done
