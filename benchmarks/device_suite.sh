#!/usr/bin/env bash
# benchmarks/device_suite.sh STAGE... -- the GPU measurements of benchmarks/RESULTS.md, cut into
# stages that each fit one device call (< 600 s). Run from the repo root on the device machine,
# with the ../shared/gpu bundle carried as .gpu; JSON and logs land in $OUT.
#
#   kernels   bench_route.py (routing kernel vs fused_topk), profile_moe_pieces.py (SiLU/sum
#             variants), bench_moe_layer.py (both shapes)                                      ~3 min
#   layer     bench_moe_layer.py alone (both shapes)                                           ~2 min
#   pieces    profile_moe_pieces.py alone: decode sizes, then the live SiLU / sum launch shapes at
#             2k-16k tokens against vLLM's kernels over every row and over the live rows   ~3 min
#   grid      probe_gemm_grid.py: what the empty programs of the fused-MoE grid cost at 1k-16k tokens
#             (ours over the whole slot buffer, cut at its end, on gpu_align, the ideal; the alignments) <1 min
#   route     bench_route.py alone (the routing kernel's launch shapes and the plugin's call vs
#             vLLM's fused_topk over 128 and over 192 logits)                                  <1 min
#   kernel-tests  tests/test_gpu_kernels.py on the GPU (compiled, not the interpreter)         <1 min
#   layer-live  bench_moe_layer.py --exact-zeros, Qwen3 shape, 1/4/16 tokens, 0-7 of 8 slots zero:
#             ours vs the ideal at the same live slots per token (the zero slots' own cost), and
#             ours_topk_order (the slots in top-K order, as before the router put live ones first);
#             at 1 and 4 tokens also the device µs by kernel of static, ours, ours_topk_order and
#             ideal (torch.profiler)                                                           ~2 min
#   layer-live-glm  layer-live for GLM-4.7-Flash's shape (top-4: 0-3 of 4 slots zero), 1/4/16 tokens,
#             profiles at 1 and 4 tokens (its 4-token cell sat 3-4% over the ideal)          ~1 min
#   layer-small  bench_moe_layer.py, both shapes, 1/2/4/8/16 tokens at every skip, profiles at 1, 2, 4
#             and 8 tokens (up to 6 tokens the slot assignment is sort-free), ideal_t in them  ~1 min
#   layer-profile  bench_moe_layer.py, Qwen3 shape, 4k and 16k tokens at skip 0.5 / 0.75, with the device
#             µs by kernel and the GPU's idle time between kernels of static, ours, ours_topk_order and
#             ideal (torch.profiler over graph replays; `tables.py layer-kernels`)            <1 min
#   host      bench_host.py: host µs per MoE layer call in eager mode, stock vs the plugin; the
#             Triton kernel tests on the GPU (tests/test_gpu_kernels.py); bench_route.py       ~3 min
#   e2e50     bench_e2e.py --configs static8 ideal4 zeda --targets 0 0.5 --quick                ~8 min
#   e2e50p    e2e50 plus --profile-decode: device µs by kernel of a batch-1 decode step, per engine ~9 min
#   e2e-b1    e2e50's batch-1 decode alone (its bias calibrated on its own prompt)            ~4 min
#   b256-run  batch-256 decode, static8 and zeda (skip 0.5 first, then 0: is skip 0's cost the engine's
#             first workload?), then one run of each profiled whole, CPU and GPU (--profile-run):
#             the model runner's scopes, the time between steps, the GPU's idle time
#             (`tables.py run-profile`)                                                        ~6 min
#   e2e75     bench_e2e.py --configs static8 ideal2 zeda --targets 0.75 --quick                 ~6 min
#   b256-profile  bench_e2e.py --configs static8 zeda --targets 0 0.5 --workloads decode_b256
#             --profile-decode --profile-batch 256: batch-256 decode (4 runs: the alternation) and one
#             batch-256 step by kernel, with the MoE kernels' per-call spread                ~5 min
#   prefill-profile  bench_e2e.py --workloads prefill --profile-prefill: prefill throughput and the
#             device µs by kernel of one 16,384-token prefill step, static8 / ideal4 / ideal2 and
#             zeda at skip 0, 0.5, 0.75 (where skip 0's ~2% and skip 0.75's ~12% of the gap go) ~7 min
#   prefill   bench_e2e.py --workloads prefill: prefill throughput of static8, ideal4 and zeda at
#             skip 0 and 0.5 (prefill-profile without the profiles and skip 0.75)           ~5 min
#   e2e50t    e2e50 with VLLM_TUNED_CONFIG_FOLDER=vllm_zeda/moe_configs: stock engines on the tile
#             table ZEDA layers use (same E=128, N=768 lookup), so the shares measure skipping alone ~8 min
#   serve     bench_serve.py --zero-bias 2.6e-6: stock static vs the plugin through the OpenAI
#             server, two runs of 192 each after a 128-request warm-up; every server with the
#             plugin's CUDA-graph sizes (bench_serve --graphs zeda, its default)               ~5 min
#   serve-ideal  the same, the plugin vs a stock top-4 server (the ideal): with `serve`, the pair
#             that gives the share of the ideal's gain (the plugin's runs join the two calls)  ~5 min
#   serve-ideal-tiles  serve-ideal with VLLM_TUNED_CONFIG_FOLDER=vllm_zeda/moe_configs: the ideal
#             on the plugin's tile table too (tuning set apart from skipping)               ~5 min
#   serve3    all three servers in one call, but only one run each after a 64-request warm-up
#             (three servers with `serve`'s warm-up and runs do not fit a call; a first run
#             after 64 warm-up requests was ~30% slower than the second)                     ~8 min
#   serve-graphs  static8 and zeda, every server given one explicit list of CUDA-graph sizes up to
#             8,192 tokens (vLLM's to 512, then 17 more; how the plugin's default was found, RESULTS
#             §5); two runs of 192 each after a 128-request warm-up                          ~5 min
#   serve-graphs-ideal  the same, zeda and ideal4                                               ~5 min
#   serve-profile  ideal4 and zeda servers, each with one more run under torch.profiler (device time
#             by kernel under the mixed load) and the zero fraction by phase                   ~7 min
#   parity    gpu_parity.py --modes skip remap masked (fp32, CUDA graphs)                        ~5 min
#   tune      tune_moe_configs.py (tile search, E=128 N=768)                                     ~4 min
#   tune-glm  the same for GLM-4.7-Flash's experts (E=64 N=1536, top-4): vLLM 0.26 ships no H200
#             table for them; the grid and tables land in $OUT/tune_glm.json, $OUT/tables_glm  ~4 min
# Two GPUs (nvidia-h200-x2):
#   env       GPUs and their links (nvidia-smi topo), torch's device count                      <1 min
#   tp-parity gpu_parity.py: skip and masked on one GPU, at TP=2; skip at TP=2 + EP           ~6 min
#   tp-train  gpu_train_ddp.py: torchrun 2 processes vs 1 (fp32 parity, bf16 tokens/s per GPU) ~3 min
#   tp-e2e    bench_e2e.py --tp 2: static8 and zeda at skip 0 and 0.5                          ~8 min
#   ep-e2e    bench_e2e.py --tp 2 --ep: the same with expert parallelism                        ~8 min
#   tp-serve  bench_serve.py --tp 2: stock static vs the plugin through `vllm serve` at TP=2
#             (two runs each after a warm-up, the faster reported)                           ~7 min
#   ep-serve  the same, the plugin with --enable-expert-parallel (one run each)              ~7 min
#
# Each stage's commands get their own timeout, so one slow stage leaves the others' files. The
# logs are packed into $OUT/logs.tgz at the end (the device tool returns at most 8 files).
set -uo pipefail
[ $# -gt 0 ] || { awk 'NR > 1 && /^#/ { print; next } NR > 1 { exit }' "$0"; exit 2; }
STAGES="kernels layer pieces grid route kernel-tests layer-live layer-live-glm layer-small layer-profile host e2e50 e2e50p e2e-b1 b256-run prefill e2e50t e2e75 b256-profile prefill-profile serve serve3 serve-ideal serve-ideal-tiles serve-graphs serve-graphs-ideal serve-profile parity tune tune-glm env tp-parity tp-train tp-e2e ep-e2e tp-serve ep-serve"
for stage in "$@"; do  # before staging the bundle: a typo costs nothing
  [[ " $STAGES " == *" $stage "* ]] || { echo "device_suite: unknown stage '$stage' ($STAGES)" >&2; exit 2; }
done
: "${OUT:?OUT must name the folder results go to (the device tool sets it)}"
# A warm machine may still hold an engine of an earlier call that outlived its worker: free the GPUs
stale=$(nvidia-smi --query-compute-apps=pid --format=csv,noheader 2>/dev/null | tr -d ' ' | grep -E '^[0-9]+$')
[ -z "$stale" ] || { echo "device_suite: killing GPU processes left by an earlier call: $stale" | tr '\n' ' '; echo
                     kill -9 $stale 2>/dev/null; sleep 3; }
bash .gpu/stage.sh .gpu/p1 >/dev/null || { echo "device_suite: staging the vLLM bundle failed" >&2; exit 1; }
python3 benchmarks/device_env.py /tmp/zeda_meta >/dev/null
export PYTHONPATH=/tmp/site:/tmp/zeda_meta:$PWD VLLM_USE_FLASHINFER_SAMPLER=0 HF_HUB_OFFLINE=1
# NVLink multicast stays off on the shared multi-GPU hosts (device README), in every child too
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1

run() {  # run SECONDS NAME CMD...: output to $OUT/NAME.log, last lines echoed
  local limit=$1 name=$2; shift 2
  echo "== $name ($(date -u +%H:%M:%S), limit ${limit}s): $*"
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  echo "== $name exit $?"; grep -v -i "warn" "$OUT/$name.log" | tail -n 12
}

pack_logs() { (cd "$OUT" && ls *.log >/dev/null 2>&1 && tar czf logs.tgz *.log && rm -f *.log); }
trap pack_logs EXIT
export PYTHONUNBUFFERED=1

for stage in "$@"; do
  case "$stage" in
    kernels) run 120 route python3 benchmarks/bench_route.py --out "$OUT/route.json"
             run 240 pieces python3 benchmarks/profile_moe_pieces.py --out "$OUT/pieces.json"
             run 360 layer python3 benchmarks/bench_moe_layer.py --out "$OUT/layer.json" ;;
    host) run 120 host python3 benchmarks/bench_host.py --out "$OUT/host.json"
          run 120 kernel_tests env TRITON_INTERPRET=0 python3 -m pytest -q -p no:cacheprovider tests/test_gpu_kernels.py
          run 120 route python3 benchmarks/bench_route.py --out "$OUT/route.json" ;;
    layer) run 300 layer python3 benchmarks/bench_moe_layer.py --out "$OUT/layer.json" ;;
    route) run 120 route python3 benchmarks/bench_route.py --out "$OUT/route.json" ;;
    pieces) run 240 pieces python3 benchmarks/profile_moe_pieces.py --out "$OUT/pieces.json" ;;
    grid) run 240 grid python3 benchmarks/probe_gemm_grid.py --out "$OUT/grid.json" ;;
    kernel-tests) run 120 kernel_tests env TRITON_INTERPRET=0 python3 -m pytest -q -p no:cacheprovider tests/test_gpu_kernels.py ;;
    layer-live) run 200 layer_live python3 benchmarks/bench_moe_layer.py --out "$OUT/layer_live.json" \
             --shapes qwen3_30b_a3b --tokens 1 4 16 --skips 0 0.125 0.25 0.375 0.5 0.625 0.75 0.875 --exact-zeros \
             --profile 1 4 ;;
    layer-live-glm) run 200 layer_live_glm python3 benchmarks/bench_moe_layer.py --out "$OUT/layer_live_glm.json" \
             --shapes glm47_flash --tokens 1 4 16 --skips 0 0.25 0.5 0.75 --exact-zeros --profile 1 4 ;;
    layer-small) run 200 layer_small python3 benchmarks/bench_moe_layer.py --out "$OUT/layer_small.json" \
             --tokens 1 2 4 8 16 --profile 1 2 4 8 ;;
    layer-profile) run 200 layer_profile python3 benchmarks/bench_moe_layer.py --out "$OUT/layer_profile.json" \
             --shapes qwen3_30b_a3b --tokens 4096 16384 --skips 0.5 0.75 --profile 4096 16384 ;;
    e2e50) run 585 e2e50 python3 benchmarks/bench_e2e.py --out "$OUT/e2e50.json" --configs static8 ideal4 zeda \
             --targets 0 0.5 --quick --timeout 220 ;;
    e2e50p) run 585 e2e50p python3 benchmarks/bench_e2e.py --out "$OUT/e2e50p.json" --configs static8 ideal4 zeda \
             --targets 0 0.5 --quick --profile-decode --timeout 220 ;;
    e2e50t) run 585 e2e50t env VLLM_TUNED_CONFIG_FOLDER="$PWD/vllm_zeda/moe_configs" python3 benchmarks/bench_e2e.py \
             --out "$OUT/e2e50t.json" --configs static8 ideal4 zeda --targets 0 0.5 --quick --timeout 220 ;;
    e2e75) run 585 e2e75 python3 benchmarks/bench_e2e.py --out "$OUT/e2e75.json" --configs static8 ideal2 zeda \
             --targets 0.75 --quick --timeout 220 ;;
    b256-profile) run 585 b256_profile python3 benchmarks/bench_e2e.py --out "$OUT/b256_profile.json" \
             --configs static8 zeda --targets 0 0.5 --quick --workloads decode_b256 --profile-decode \
             --profile-batch 256 --timeout 150 ;;
    e2e-b1) run 400 e2e_b1 python3 benchmarks/bench_e2e.py --out "$OUT/e2e_b1.json" --configs static8 ideal4 zeda \
             --targets 0 0.5 --quick --workloads decode_b1 --timeout 150 ;;
    b256-run) run 585 b256_run python3 benchmarks/bench_e2e.py --out "$OUT/b256_run.json" --configs static8 zeda \
             --targets 0.5 0 --quick --workloads decode_b256 --profile-run decode_b256 --timeout 200 ;;
    prefill) run 360 prefill python3 benchmarks/bench_e2e.py --out "$OUT/prefill.json" --configs static8 ideal4 zeda \
             --targets 0 0.5 --quick --workloads prefill --timeout 150 ;;
    prefill-profile) run 585 prefill_profile python3 benchmarks/bench_e2e.py --out "$OUT/prefill_profile.json" \
             --configs static8 ideal4 ideal2 zeda --targets 0 0.5 0.75 --quick --workloads prefill --profile-prefill \
             --timeout 150 ;;
    serve) run 570 serve python3 benchmarks/bench_serve.py --out "$OUT/serve.json" --zero-bias 2.6e-6 \
             --configs static8 zeda --requests 192 --warmup 128 --repeats 2 ;;
    serve3) run 585 serve3 python3 benchmarks/bench_serve.py --out "$OUT/serve3.json" --zero-bias 2.6e-6 \
             --configs static8 zeda ideal4 --requests 192 --warmup 64 --repeats 1 ;;
    serve-ideal) run 570 serve_ideal python3 benchmarks/bench_serve.py --out "$OUT/serve_ideal.json" --zero-bias 2.6e-6 \
             --configs zeda ideal4 --requests 192 --warmup 128 --repeats 2 ;;
    serve-ideal-tiles) run 570 serve_ideal_tiles env VLLM_TUNED_CONFIG_FOLDER="$PWD/vllm_zeda/moe_configs" \
             python3 benchmarks/bench_serve.py --out "$OUT/serve_ideal_tiles.json" --zero-bias 2.6e-6 \
             --configs zeda ideal4 --requests 192 --warmup 128 --repeats 2 ;;
    serve-graphs|serve-graphs-ideal)
             configs="static8 zeda"; [ "$stage" = serve-graphs ] || configs="zeda ideal4"
             sizes=$(python3 -c 'print(",".join(map(str, [1, 2, 4, *range(8, 256, 8), *range(256, 513, 16),
                        576, 640, 768, 896, 1024, 1280, 1536, 1792, 2048, 2560, 3072, 3584, 4096, 5120, 6144, 7168, 8192])))')
             run 570 "${stage//-/_}" python3 benchmarks/bench_serve.py --out "$OUT/${stage//-/_}.json" --zero-bias 2.6e-6 \
             --configs $configs --requests 192 --warmup 128 --repeats 2 \
             --server-args "--compilation-config '{\"cudagraph_capture_sizes\": [$sizes]}'" ;;
    serve-profile) run 585 serve_profile python3 benchmarks/bench_serve.py --out "$OUT/serve_profile.json" \
             --zero-bias 2.6e-6 --configs ideal4 zeda --requests 192 --warmup 128 --repeats 1 --profile ;;
    parity) run 420 parity python3 benchmarks/gpu_parity.py --out "$OUT/parity.json" --modes skip remap masked \
             --worker-timeout 120 ;;
    tune) run 450 tune python3 benchmarks/tune_moe_configs.py --out "$OUT/tune.json" --table-dir "$OUT/tables" ;;
    tune-glm) run 450 tune_glm python3 benchmarks/tune_moe_configs.py --shape glm47_flash --out "$OUT/tune_glm.json" \
             --table-dir "$OUT/tables_glm" ;;
    env) run 30 env bash -c 'nvidia-smi -L; nvidia-smi topo -m; python3 -c "import torch; print(torch.__version__, torch.cuda.device_count())"' ;;
    tp-parity) run 480 tp_parity python3 benchmarks/gpu_parity.py --out "$OUT/tp_parity.json" \
             --modes skip skip@tp2 skip@tp2ep masked masked@tp2 --worker-timeout 110 ;;
    tp-train) run 180 tp_train python3 benchmarks/gpu_train_ddp.py --out "$OUT/tp_train.json" --gpus 2 ;;
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
