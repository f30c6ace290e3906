"""Host (CPU) time of one MoE layer call in eager mode, stock vLLM vs the plugin (device machine).

Why: under a mixed serving load the plugin's GPU kernels summed to the ideal top-4 server's (H200,
benchmarks/RESULTS.md §5.2, serve-profile) while its wall time was longer; both GPUs sat idle a third
of the time. Steps larger than the biggest CUDA graph (mixed prefill + decode) run every layer's
Python and kernel launches each step, so host time per layer is what such steps pay.

Host µs per call = wall time of `--calls` back-to-back calls with no sync inside, divided by the
count; median (and fewest) over `--reps` rounds that time every variant in turn. The GPU work is
queued, not waited for, as long as the launch queue does not fill. Variants, each what the layer runs after its gate GEMM:

  route_static   vLLM's fused_topk over E=128 logits, top-8 (what a stock layer's router runs)
  route_ours     vllm_zeda's ZedaRouter._compute_routing over E+Z=192 logits (one Triton kernel)
  experts_*      vLLM's modular kernel apply: stock top-8 (static), stock top-4 (ideal), ours, and
                 stock top-8 given the zero ids and the map (upstream's own cost of an expert map)
  layer_*        routing + experts, as one layer runs them
  sum_*          the sum over slots alone: ours (Triton, live slots), vLLM's moe_sum, and vLLM's
                 moe_sum with the zero-expert map (a CUDA op that skips mapped-out slots)
  triton_*       launch cost alone: a Triton launch through `kernel[grid](...)` vs the compiled
                 kernel's runner (the JIT's binding and specialization skipped)

Device µs of the sum variants (CUDA-graph replay, median) come with it, and a check that vLLM's
moe_sum with the map reads no dead slot (dead rows filled with NaN).

    python3 benchmarks/bench_host.py --out $OUT/host.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_moe_layer import make_kernel, make_routings, time_graph  # noqa: E402

E, H, I, K, Z = 128, 2048, 768, 8, 64


def host_us(variants: dict, calls: int, reps: int) -> tuple[dict, dict]:
    """({name: median µs per call}, {name: fewest µs per call}) over `reps` rounds; each round
    times every variant once, in turn, so a slow spell of the machine falls on all of them alike
    (one variant after another, min of 15, read the same static layer at 268 and 524 µs in two
    calls). A variant that fails (an op this vLLM lacks) reports its error instead."""
    live, out = {}, {}
    for name, fn in variants.items():
        try:
            fn()
            torch.cuda.synchronize()
            live[name] = []
        except Exception as exc:
            out[name] = f"{type(exc).__name__}: {exc}"[:300]
    for _ in range(reps):
        for name, times in live.items():
            fn = variants[name]
            torch.cuda.synchronize()
            t = time.perf_counter()
            for _ in range(calls):
                fn()
            times.append((time.perf_counter() - t) / calls)
            torch.cuda.synchronize()
    median = {n: round(statistics.median(t) * 1e6, 2) for n, t in live.items()}
    fewest = {n: round(min(t) * 1e6, 2) for n, t in live.items()}
    return {**median, **out}, fewest


def python_profile(fn, calls: int, top: int = 35) -> str:
    """Where the host time of `calls` calls goes: cProfile, sorted by own time (µs totals)."""
    import cProfile
    import io
    import pstats

    fn()
    torch.cuda.synchronize()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(calls):
        fn()
    prof.disable()
    torch.cuda.synchronize()
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(top)
    return buf.getvalue()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--tokens", nargs="+", type=int, default=[1, 256, 1024, 4096])
    p.add_argument("--calls", type=int, default=40)
    p.add_argument("--reps", type=int, default=21)
    p.add_argument("--cprofile", type=int, default=1024, help="cProfile the layer variants at this many tokens (0: off)")
    a = p.parse_args()
    if not torch.cuda.is_available():
        p.error("needs a CUDA GPU and the vLLM GPU bundle (benchmarks/device_suite.sh host)")
    import vllm
    from vllm import _custom_ops as ops
    from vllm.model_executor.layers.fused_moe.activation import MoEActivation
    from vllm.model_executor.layers.fused_moe.experts.triton_moe import TritonExperts
    from vllm.model_executor.layers.fused_moe.router.fused_topk_router import fused_topk
    from vllm.v1.worker.workspace import init_workspace_manager

    from vllm_zeda.kernels import ops as gpu_kernels
    from vllm_zeda.serve import handover
    from vllm_zeda.serve.experts import zero_expert_map
    from vllm_zeda.serve.handover import Handover
    from vllm_zeda.serve.router import ZedaRouter
    from vllm_zeda.serve.triton_experts import ZedaTritonExperts

    init_workspace_manager(torch.device("cuda"))
    dtype, gen = torch.bfloat16, torch.Generator(device="cuda").manual_seed(0)
    w1 = torch.randn(E, 2 * I, H, device="cuda", dtype=dtype, generator=gen) * 0.02
    w2 = torch.randn(E, H, I, device="cuda", dtype=dtype, generator=gen) * 0.02
    zmap = zero_expert_map(None, E, Z, "cuda")
    stock8, stock4 = make_kernel(TritonExperts, E, H, I, 8, dtype), make_kernel(TritonExperts, E, H, I, 4, dtype)
    ours_kernel = make_kernel(ZedaTritonExperts, E, H, I, K, dtype)
    router = ZedaRouter(layer_idx=0, top_k=K, num_real=E, num_zero=Z, renormalize=True, masked=False,
                        zero_bias=0.0, zero_slots="skip")

    def apply(kernel, x, w, ids, expert_map=None):
        return kernel.apply(hidden_states=x, w1=w1, w2=w2, topk_weights=w, topk_ids=ids,
                            activation=MoEActivation.SILU, global_num_experts=E + Z if expert_map is not None else E,
                            expert_map=expert_map, apply_router_weight_on_input=False)

    rows = []
    for m in a.tokens:
        x = torch.randn(m, H, device="cuda", dtype=dtype, generator=gen)
        logits = torch.randn(m, E + Z, device="cuda", dtype=dtype, generator=gen)
        real = logits[:, :E].contiguous()
        r = make_routings(m, E, K, 0.5, 1, gen)[0]

        def route_static():
            return fused_topk(x, real, 8, True, torch.int32)

        def route_ideal():
            return fused_topk(x, real, 4, True, torch.int32)

        def route_ours():
            return router._compute_routing(x, logits, torch.int32)

        def experts_ours(w=r["zw"], ids=r["zids"], live=r["zlive"]):
            handover.publish(Handover(ids, live))  # as the router does
            return apply(ours_kernel, x, w, ids, zmap)

        def layer_static():
            w, ids, _ = route_static()
            return apply(stock8, x, w, ids)

        def layer_ideal():
            w, ids, _ = route_ideal()
            return apply(stock4, x, w, ids)

        def layer_ours():
            w, ids = route_ours()  # publishes its hand-over, which the experts take
            return apply(ours_kernel, x, w, ids, zmap)

        slots = torch.randn(m, K, H, device="cuda", dtype=dtype, generator=gen)
        dead = r["zlive"] < 0
        slots[dead] = float("nan")  # what a dead slot's row may hold: never to be read
        out = torch.empty(m, H, device="cuda", dtype=dtype)

        def sum_live():
            gpu_kernels.live_moe_sum_(out, slots, r["zlive"])

        def sum_vllm():
            ops.moe_sum(slots, out)

        def sum_vllm_map():
            ops.moe_sum(slots, out, r["zids"], zmap)

        variants = {"route_static": route_static, "route_ours": route_ours,
                    "experts_static": lambda: apply(stock8, x, r["w"], r["ids"]),
                    "experts_ideal": lambda: apply(stock4, x, r["cw"], r["cids"]), "experts_ours": experts_ours,
                    "experts_stock_map": lambda: apply(stock8, x, r["zw"], r["zids"], zmap),
                    "layer_static": layer_static, "layer_ideal": layer_ideal, "layer_ours": layer_ours,
                    "sum_live": sum_live, "sum_vllm": sum_vllm, "sum_vllm_map": sum_vllm_map}
        # the launch alone: Triton's JIT path vs the compiled kernel's runner, same kernel and args
        block = min(1024, 1 << (H - 1).bit_length())
        grid = (m, -(-H // block), 1)
        args = (slots, out, r["zlive"].reshape(-1), H, out.stride(0))
        runner = gpu_kernels._live_moe_sum[grid](*args, K=K, BLOCK=block)[grid]
        variants["triton_jit_launch"] = lambda: gpu_kernels._live_moe_sum[grid](*args, K=K, BLOCK=block)
        variants["triton_compiled_launch"] = lambda: runner(*args, K, block)
        median, fewest = host_us(variants, a.calls, a.reps)
        row = {"tokens": m, "host_us": median, "host_us_min": fewest}
        row["device_us"] = {}
        for n, f in (("sum_live", sum_live), ("sum_vllm", sum_vllm), ("sum_vllm_map", sum_vllm_map)):
            try:
                row["device_us"][n] = round(time_graph([f] * 8), 2)
            except Exception as exc:
                row["device_us"][n] = f"{type(exc).__name__}: {exc}"[:300]
        try:
            sum_live()
            ref = out.clone()
            sum_vllm_map()
            row["sum_vllm_map_vs_live_maxdiff"] = float((out.float() - ref.float()).abs().max())
            row["sum_vllm_map_finite"] = bool(torch.isfinite(out).all())
        except Exception as exc:
            row["sum_vllm_map_check"] = f"{type(exc).__name__}: {exc}"[:300]
        # the plugin's eager path against upstream's remap on the same routing (bf16: the sums add
        # the same live rows in the same order, so equal to the bit), with the router's live ids
        # and with ids gathered through the map (the expert-parallel path)
        remap_out = apply(stock8, x, r["zw"], r["rids"]).float()
        row["ours_eager_vs_remap_maxdiff"] = float((experts_ours().float() - remap_out).abs().max())
        row["ours_gather_vs_remap_maxdiff"] = float((apply(ours_kernel, x, r["zw"], r["zids"], zmap).float()
                                                     - remap_out).abs().max())
        if m == a.cprofile:
            row["cprofile"] = {n: python_profile(variants[n], 200)
                               for n in ("layer_static", "layer_ours", "experts_stock_map")}
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "cprofile"}), flush=True)
        for n, text in row.get("cprofile", {}).items():
            print(f"--- cProfile {n}, {m} tokens ---\n{text}", flush=True)
    meta = {"device": torch.cuda.get_device_name(), "vllm": vllm.__version__, "torch": torch.__version__,
            "triton": __import__("triton").__version__, "date": time.strftime("%Y-%m-%d"),
            "shape": f"E={E} (+Z={Z}) H={H} I={I} top-{K}, skip 0.5", "calls": a.calls, "reps": a.reps,
            "unit": "host µs per call (eager, no sync inside; median over rounds, host_us_min the fewest); device µs: CUDA-graph replay, median"}
    tmp = Path(a.out).with_suffix(".partial")  # a killed run leaves no half-written JSON
    tmp.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    tmp.replace(a.out)
    print(json.dumps(meta))


if __name__ == "__main__":
    main()
