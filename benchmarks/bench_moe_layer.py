"""Fused-MoE layer time at controlled skip fractions (device machine, vLLM bundle), side by side.

Every variant runs through vLLM's modular fused-MoE kernel (`FusedMoEKernel`, the object the
unquantized layer calls), built by `make_unquantized_moe_kernel` as vLLM builds it:

  static     stock TritonExperts, top-K over E real experts, no expert map
  ours       vllm_zeda.serve.triton_experts.ZedaTritonExperts, zero ids E..E+Z-1, global E+Z and
             the map [0..E-1, -1 x Z] from ZedaRoutedExperts, plus what the router kernel hands
             over (router_handover): the live ids, and where the experts take the sort-free
             assignment (up to 6 tokens), at one token the slots live ones first and where their
             blocks end, at 2-4 tokens the slot blocks with the live slots' first and their end, at
             5-6 the slot blocks: the plugin's layer path (routing itself is timed in no variant)
  ours_topk_order  ours given only the live ids, slots in top-K order (the plugin before the
             router handed over more): at small batches each zero slot's block then loads its
             expert id and writes a row of zeros before it exits
  stock_map  stock TritonExperts given the same ids and map (the plugin before ZedaTritonExperts)
  remap      upstream's ZeroExpertRouter way: zero slots -> expert 0 with weight 0
  ideal      stock, compact top-round(K*(1-s)) over real experts (what skipping can at best reach)
  static_t, ideal_t   static and ideal on the tile configs ours uses (vllm_zeda's shipped table,
             through vLLM's `override_config`): ours/ideal_t is the cost of the zero slots alone,
             tuning set apart. Shapes without a shipped table run vLLM's configs in every variant,
             so there these columns repeat static and ideal (not timed twice).
Median microseconds per call over CUDA-graph replays of 8 rotating routings, the variants' replays
interleaved round by round (time_graphs). Each routing sends exactly round(M*K*skip) of its slots
to zero experts (`zero_slots`, --zeros: per token, or each slot on its own, instead). Each row
also checks ours against ours_topk_order, stock_map and remap numerically (bf16 max abs diff).

    python3 benchmarks/bench_moe_layer.py --out $OUT/moe_layer.json [--shapes qwen3_30b_a3b glm47_flash]
        [--tokens ...] [--skips ...] [--zeros batch|token|slot] [--profile TOKENS...] [--quant fp8|fp8-block]
--quant: the experts in FP8 through vLLM's FP8 Triton path (`make_fp8_moe_kernel`), every variant
alike; with per-tensor FP8 ours must equal stock_map (both give the activation scale zero rows for
zero slots) and differs from remap (whose expert-0 rows enter that scale).
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from vllm_zeda.kernels.ops import LIVE_END_MAX_TOKENS, SLOT_BLOCK_M, sort_free  # noqa: E402
from tests.kernel_oracles import live_blocks_first, live_first, slot_blocks  # noqa: E402
from vllm_zeda.routing import Routing  # noqa: E402
SHAPES = {  # name: (E, H, I, K)
    "qwen3_30b_a3b": (128, 2048, 768, 8),
    "glm47_flash": (64, 2048, 1536, 4),
}
TOKENS = [1, 4, 16, 64, 256, 1024, 4096, 16384]
SKIPS = [0.0, 0.25, 0.5, 0.75]


ZERO_MODES = ("batch", "token", "slot")


def zero_slots(m, k, skip, zeros, gen, device="cuda"):
    """[M, K] bool: which slots of one routing go to zero experts. zeros: "batch" exactly
    round(M*K*skip) of them, anywhere in the batch (tokens keep different live counts, and ours
    runs as many live slots as the ideal's M*round(K*(1-skip))); "token" exactly round(K*skip) of
    every token's (the ideal's live slots per token: the zero slots' own cost); "slot" each on its
    own with probability skip (at 1-16 tokens the drawn share strays from skip by several %, with a
    fixed seed the same stray in every run, while the ideal's live slots do not; RESULTS.md §7
    item 16)."""
    if zeros == "token":
        rank = torch.argsort(torch.rand(m, k, device=device, generator=gen), dim=-1)
        return rank < round(k * skip)
    if zeros == "batch":
        rank = torch.argsort(torch.argsort(torch.rand(m * k, device=device, generator=gen)))
        return (rank < round(m * k * skip)).view(m, k)
    return torch.rand(m, k, device=device, generator=gen) < skip


def make_routings(m, e, k, skip, n, gen, zeros="batch"):
    """n routings: K distinct real experts per token, then the slots `zero_slots` picks -> zero."""
    out = []
    for _ in range(n):
        ids = torch.argsort(torch.rand(m, e, device="cuda", generator=gen), dim=-1)[:, :k].to(torch.int32)
        w = torch.softmax(torch.randn(m, k, device="cuda", generator=gen), -1)
        zero = zero_slots(m, k, skip, zeros, gen)
        zw = w.masked_fill(zero, 0.0)
        zids = torch.where(zero, e + torch.randint(0, e // 2, (m, k), device="cuda", generator=gen, dtype=torch.int32), ids)
        rids = torch.where(zero, torch.zeros_like(ids), ids)
        zlive = torch.where(zero, torch.full_like(ids, -1), ids)  # what the router kernel hands over
        keep = max(1, round(k * (1 - skip)))
        out.append(dict(ids=ids, w=w, zids=zids, zw=zw, rids=rids, zlive=zlive, cids=ids[:, :keep].contiguous(),
                        cw=w[:, :keep].contiguous(), plugin=router_handover(zw, zids, e, k)))
    return out


def router_handover(zw, zids, e, k):
    """(ids, weights, live ids, end, slot blocks, block experts): what the plugin's router hands
    the experts for these slots (serve.router.ZedaRouter with kernels.ops.zeda_route_): where the
    experts take the sort-free assignment, at one token its live slots first and where their
    blocks end, at 2-4 tokens the slot blocks with the live slots' first, their experts and their
    end, at 5-6 the slot blocks (a zero slot's block only padding); else the slots in top-K order."""
    m = zids.shape[0]
    r = Routing(weights=zw, ids=zids, num_real=e)
    small = sort_free(m, k, e + e // 2)
    if small and m == 1:
        r = live_first(r)
    ids = r.ids.to(torch.int32)
    live = torch.where(r.is_zero, -1, ids)
    end = blocks = experts = None
    if small and m == 1:
        end = torch.tensor([int((~r.is_zero).sum()) * SLOT_BLOCK_M], dtype=torch.int32, device=zids.device)
    elif small and m <= LIVE_END_MAX_TOKENS:
        blocks, experts, n = live_blocks_first(live, SLOT_BLOCK_M)
        end = torch.tensor([n], dtype=torch.int32, device=zids.device)
    elif small:
        blocks = slot_blocks(r.is_zero, SLOT_BLOCK_M)
    return ids, r.weights, live, end, blocks, experts


def capture(fn_list):
    """All calls in one CUDA graph (after one eager warm-up pass on a side stream), replayed once."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for f in fn_list:
            f()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for f in fn_list:
            f()
    g.replay()
    torch.cuda.synchronize()
    return g


def profile_graph(fn_list, reps=10, top=8):
    """({kernel: device µs per call}, {kernel: device idle µs per call right after it}) over
    `reps` replays of the calls' CUDA graph (torch.profiler, CUDA activity): which kernels a
    variant's time is made of, and where its graph leaves the GPU idle between them (the gap
    after a graph's last kernel includes the host's time to the next replay)."""
    g = capture(fn_list)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            g.replay()
        torch.cuda.synchronize()
    from benchmarks.kernel_profile import device_idle_after, kernel_totals

    calls = reps * len(fn_list)
    out = {name[:80]: round(us / calls, 2) for name, (_, us) in kernel_totals(prof).items()}
    idle = {name[:80]: round(us / calls, 2) for name, us in device_idle_after(prof).items()}
    return dict(sorted(out.items(), key=lambda kv: -kv[1])[:top]), dict(sorted(idle.items(), key=lambda kv: -kv[1]))


def _replay_us(g, calls: int) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    g.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1000 / calls


def time_graph(fn_list, reps=20):
    """Capture all calls in one CUDA graph; median time per call over replays (µs)."""
    g = capture(fn_list)
    return statistics.median(_replay_us(g, len(fn_list)) for _ in range(reps))


def time_graphs(variants: dict[str, list], reps=20) -> dict[str, float]:
    """time_graph for every variant, their replays interleaved: each round replays every
    variant's graph once, in an order shuffled for each round (seeded: the same every run). A GPU
    that slows over a row's seconds of back-to-back GEMMs then slows every variant alike (timed one
    after another, variants timed later in a row ran up to 4.6% slower than identical work timed
    first at 16,384 tokens), and no variant always follows the same one: with a fixed cyclic
    order, the ideal and ideal_t, the same tiles at 16,384 tokens, read 0.8-2.7% apart
    (benchmarks/RESULTS.md §7 item 10)."""
    graphs = {v: capture(fns) for v, fns in variants.items()}
    times = {v: [] for v in graphs}
    for round_order in replay_rounds(list(graphs), reps):
        for v in round_order:
            times[v].append(_replay_us(graphs[v], len(variants[v])))
    return {v: statistics.median(t) for v, t in times.items()}


def replay_rounds(names: list[str], reps: int, seed: int = 0) -> list[list[str]]:
    """`reps` rounds, each every name once in a shuffled order (seeded)."""
    rng = random.Random(seed)
    return [rng.sample(names, len(names)) for _ in range(reps)]


QUANTS = ("none", "fp8", "fp8-block")  # --quant: bf16 weights; FP8 with a scale per expert; per 128 x 128 tile
FP8_BLOCK = [128, 128]


def quantize_experts(w: torch.Tensor, quant: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """[E, N, K] weights as the FP8 MoE layer holds them: float8_e4m3fn and a float32 scale per
    expert ([E]: `--quantization fp8` online) or per 128 x 128 tile ([E, N/128, K/128]: Qwen's
    FP8 release); `none`: the weights as they are, no scale."""
    if quant == "none":
        return w, None
    from vllm_zeda.testing.tiny import FP8_MAX, fp8_block_quantize

    if quant == "fp8":
        scale = (w.float().abs().amax(dim=(1, 2)) / FP8_MAX).clamp(min=1e-12)
        return (w.float() / scale[:, None, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), scale
    q, scales = zip(*(fp8_block_quantize(we.float(), FP8_BLOCK[0]) for we in w))
    return torch.stack(q), torch.stack(scales)


def make_kernel(experts_cls, e, h, i, k, dtype, quant="none", w1_scale=None, w2_scale=None):
    """vLLM's modular kernel for one MoE layer, as UnquantizedFusedMoEMethod builds it, or for
    FP8 weights (`quant`, with their scales) as the FP8 methods build it on Hopper (Triton)."""
    from vllm.model_executor.layers.fused_moe.activation import MoEActivation
    from vllm.model_executor.layers.fused_moe.config import (
        FUSED_MOE_UNQUANTIZED_CONFIG,
        FusedMoEConfig,
        FusedMoEParallelConfig,
        RoutingMethodType,
    )
    from vllm.model_executor.layers.fused_moe.oracle.unquantized import (
        UnquantizedMoeBackend,
        make_unquantized_moe_kernel,
    )

    cfg = FusedMoEConfig(num_experts=e, experts_per_token=k, hidden_dim=h, intermediate_size=i, num_local_experts=e,
                         num_logical_experts=e, activation=MoEActivation.SILU, device="cuda",
                         routing_method=RoutingMethodType.Renormalize,
                         moe_parallel_config=FusedMoEParallelConfig.make_no_parallel(), in_dtype=dtype,
                         max_num_tokens=max(TOKENS))
    if quant == "none":
        return make_unquantized_moe_kernel(quant_config=FUSED_MOE_UNQUANTIZED_CONFIG, moe_config=cfg,
                                           backend=UnquantizedMoeBackend.TRITON, experts_cls=experts_cls)
    from vllm.model_executor.layers.fused_moe.config import fp8_w8a8_moe_quant_config
    from vllm.model_executor.layers.fused_moe.oracle.fp8 import Fp8MoeBackend, make_fp8_moe_kernel

    qcfg = fp8_w8a8_moe_quant_config(w1_scale=w1_scale, w2_scale=w2_scale, per_act_token_quant=False,
                                     block_shape=FP8_BLOCK if quant == "fp8-block" else None)
    return make_fp8_moe_kernel(qcfg, cfg, experts_cls, Fp8MoeBackend.TRITON)


def bench_shape(name, e, h, i, k, tokens, skips, zeros="batch", profile=(), dtype=torch.bfloat16, quant="none"):
    from vllm.model_executor.layers.fused_moe import override_config
    from vllm.model_executor.layers.fused_moe.activation import MoEActivation
    from vllm.model_executor.layers.fused_moe.experts.triton_moe import TritonExperts

    from vllm_zeda.kernels.tiles import shipped_table, zeda_moe_config
    from vllm_zeda.serve import handover
    from vllm_zeda.serve.experts import zero_expert_map
    from vllm_zeda.serve.handover import Handover
    from vllm_zeda.serve.triton_experts import ZedaTritonExperts

    gen = torch.Generator(device="cuda").manual_seed(0)
    z = e // 2
    w1, w1_scale = quantize_experts(torch.randn(e, 2 * i, h, device="cuda", dtype=dtype, generator=gen) * 0.02, quant)
    w2, w2_scale = quantize_experts(torch.randn(e, h, i, device="cuda", dtype=dtype, generator=gen) * 0.02, quant)
    zmap = zero_expert_map(None, e, z, "cuda")
    scales = dict(quant=quant, w1_scale=w1_scale, w2_scale=w2_scale)
    stock = {kk: make_kernel(TritonExperts, e, h, i, kk, dtype, **scales) for kk in range(1, k + 1)}
    ours_kernel = make_kernel(ZedaTritonExperts, e, h, i, k, dtype, **scales)
    tile_dtype, tile_block = (None, None) if quant == "none" else ("fp8_w8a8", FP8_BLOCK if quant == "fp8-block" else None)

    def ours(x, r):
        ids, w, *blocks = r["plugin"]
        handover.publish(Handover(ids, *blocks))  # as the plugin's router does
        return call(ours_kernel, x, w, ids, zmap)

    def ours_topk_order(x, r):
        handover.publish(Handover(r["zids"], r["zlive"]))
        return call(ours_kernel, x, r["zw"], r["zids"], zmap)

    def call(kernel, x, w, ids, expert_map=None):
        return kernel.apply(hidden_states=x, w1=w1, w2=w2, topk_weights=w, topk_ids=ids,
                            activation=MoEActivation.SILU, global_num_experts=e + z if expert_map is not None else e,
                            expert_map=expert_map, apply_router_weight_on_input=False)

    tuned = shipped_table(e, i, tile_dtype, tuple(tile_block) if tile_block else None) is not None

    def with_tiles(cfg, fn):
        with override_config(cfg):
            return fn()

    rows = []
    for m in tokens:
        x = torch.randn(m, h, device="cuda", dtype=dtype, generator=gen)
        tiles = zeda_moe_config(tuple(w1.shape), tuple(w2.shape), k, tile_dtype, m, block_shape=tile_block)  # ours at this M
        for s in skips:
            rs = make_routings(m, e, k, s, 8, gen, zeros)
            keep = rs[0]["cids"].shape[1]
            variants = {
                "static": [lambda r=r: call(stock[k], x, r["w"], r["ids"]) for r in rs],
                "ours": [lambda r=r: ours(x, r) for r in rs],
                "ours_topk_order": [lambda r=r: ours_topk_order(x, r) for r in rs],
                "stock_map": [lambda r=r: call(stock[k], x, r["zw"], r["zids"], zmap) for r in rs],
                "remap": [lambda r=r: call(stock[k], x, r["zw"], r["rids"]) for r in rs],
                "ideal": [lambda r=r: call(stock[keep], x, r["cw"], r["cids"]) for r in rs],
            }
            if tuned:
                variants["static_t"] = [lambda r=r: with_tiles(tiles, lambda: call(stock[k], x, r["w"], r["ids"]))
                                        for r in rs]
                variants["ideal_t"] = [lambda r=r: with_tiles(tiles, lambda: call(stock[keep], x, r["cw"], r["cids"]))
                                       for r in rs]
            live = sum(int((r["zlive"] >= 0).sum()) for r in rs) / (len(rs) * m * k)
            row = {"shape": name, "quant": quant, "tokens": m, "skip": s, "top_k": k, "zeros": zeros, "exact_zeros": zeros == "token",
                   "live_fraction": round(live, 4), "ideal_live_fraction": round(keep / k, 4),
                   "tiles": "shipped table" if tuned else "vLLM"}
            row.update({v: round(us, 2) for v, us in time_graphs(variants).items()})
            if m in profile:
                profiled = ("static", "ours", "ours_topk_order", "ideal", "ideal_t")
                profiles = {v: profile_graph(variants[v]) for v in profiled if v in variants}
                row["kernels"] = {v: kernels for v, (kernels, _) in profiles.items()}
                row["idle_after"] = {v: idle for v, (_, idle) in profiles.items()}
            if not tuned:
                row["static_t"], row["ideal_t"] = row["static"], row["ideal"]
            r0 = rs[0]
            ours_out = ours(x, r0).float()
            row["ours_vs_stock_map_maxdiff"] = float((ours_out - call(stock[k], x, r0["zw"], r0["zids"], zmap).float()).abs().max())
            row["ours_vs_remap_maxdiff"] = float((ours_out - call(stock[k], x, r0["zw"], r0["rids"]).float()).abs().max())
            row["out_absmax"] = float(ours_out.abs().max())
            row["ours_vs_topk_order_maxdiff"] = float((ours_topk_order(x, r0).float() - ours_out).abs().max())
            for v in ("static", "ideal", "remap", "stock_map", "static_t", "ideal_t", "ours_topk_order"):
                row[f"ours/{v}"] = round(row["ours"] / row[v], 3)
            row["ours_topk_order/ideal"] = round(row["ours_topk_order"] / row["ideal"], 3)
            rows.append(row)
            print(f"{name:14s} {quant:9s} M={m:6d} skip={s:.2f}  static {row['static']:8.1f}  ours {row['ours']:8.1f}  "
                  f"stock_map {row['stock_map']:8.1f}  remap {row['remap']:8.1f}  ideal {row['ideal']:8.1f}  "
                  f"ours/ideal {row['ours/ideal']:.3f}  topk_order/ideal {row['ours_topk_order/ideal']:.3f}  "
                  f"ideal_t {row['ideal_t']:8.1f}  ours/ideal_t {row['ours/ideal_t']:.3f}  "
                  f"diff {row['ours_vs_remap_maxdiff']:.2e} order {row['ours_vs_topk_order_maxdiff']:.1e}", flush=True)
    return rows


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--shapes", nargs="+", default=list(SHAPES))
    p.add_argument("--tokens", nargs="+", type=int, default=TOKENS)
    p.add_argument("--skips", nargs="+", type=float, default=SKIPS)
    p.add_argument("--zeros", choices=ZERO_MODES, default="batch",
                   help="how the skip share of slots goes to zero experts (make_routings): exactly round(M*K*skip) "
                        "a routing anywhere (batch, default), exactly round(K*skip) per token (token), or each "
                        "slot with probability skip (slot)")
    p.add_argument("--exact-zeros", dest="zeros", action="store_const", const="token",
                   help="--zeros token: ours/ideal isolates the zero slots' own cost from the spread")
    p.add_argument("--profile", nargs="*", type=int, default=[], metavar="TOKENS",
                   help="at these token counts also record device µs per call by kernel (torch.profiler over "
                        "CUDA-graph replays) for static, ours, ours_topk_order, ideal and ideal_t")
    p.add_argument("--quant", choices=QUANTS, default="none",
                   help="expert weights in FP8: a scale per expert (vLLM's online --quantization fp8) or per "
                        "128 x 128 tile (Qwen3-30B-A3B-FP8); activations dynamic, per tensor or per 128 columns")
    a = p.parse_args()
    if a.zeros == "token" and any(not 0 <= s < 1 for s in a.skips):
        p.error("--zeros token needs every skip in [0, 1): the ideal keeps at least one slot")
    import vllm
    from vllm.v1.worker.workspace import init_workspace_manager

    init_workspace_manager(torch.device("cuda"))
    t0 = time.time()
    rows = []
    for s in a.shapes:
        rows += bench_shape(s, *SHAPES[s], a.tokens, a.skips, a.zeros, a.profile, quant=a.quant)
    meta = {"device": torch.cuda.get_device_name(), "vllm": vllm.__version__, "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d"), "seconds": round(time.time() - t0, 1), "unit": "us per fused-MoE call"}
    Path(a.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(json.dumps(meta))


if __name__ == "__main__":
    main()
