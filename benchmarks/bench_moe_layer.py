"""Fused-MoE layer time at controlled skip fractions (device machine, vLLM bundle), side by side:

  static  top-K over E real experts, no expert map (stock vLLM)
  ours    the plugin's path: zero slots keep ids E..E+Z-1, global_num_experts E+Z and the
          expert map [0..E-1, -1 x Z] built by vllm_zeda.vllm_experts.zero_expert_map
  remap   upstream's ZeroExpertRouter way: zero slots -> expert 0 with weight 0
  ideal   compact top-round(K*(1-s)) over real experts (what skipping can at best reach)
Median microseconds per call over CUDA-graph replays of 8 rotating routings.

    python3 benchmarks/bench_moe_layer.py --out $OUT/moe_layer.json [--shapes qwen3 glm47] [--tokens ...]
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
SHAPES = {  # name: (E, H, I, K)
    "qwen3_30b_a3b": (128, 2048, 768, 8),
    "glm47_flash": (64, 2048, 1536, 4),
}
TOKENS = [1, 4, 16, 64, 256, 1024, 4096, 16384]
SKIPS = [0.0, 0.25, 0.5, 0.75]


def make_routings(m, e, k, skip, n, gen):
    """n routings: K distinct real experts per token, then a random `skip` share of slots -> zero."""
    out = []
    for _ in range(n):
        ids = torch.argsort(torch.rand(m, e, device="cuda", generator=gen), dim=-1)[:, :k].to(torch.int32)
        w = torch.softmax(torch.randn(m, k, device="cuda", generator=gen), -1)
        zero = torch.rand(m, k, device="cuda", generator=gen) < skip
        zw = w.masked_fill(zero, 0.0)
        zids = torch.where(zero, e + torch.randint(0, e // 2, (m, k), device="cuda", generator=gen, dtype=torch.int32), ids)
        rids = torch.where(zero, torch.zeros_like(ids), ids)
        keep = max(1, round(k * (1 - skip)))
        out.append(dict(ids=ids, w=w, zids=zids, zw=zw, rids=rids, cids=ids[:, :keep].contiguous(),
                        cw=w[:, :keep].contiguous()))
    return out


def time_graph(fn_list, reps=20):
    """Capture all calls in one CUDA graph; median time per call over replays (µs)."""
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
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        g.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000 / len(fn_list))
    return statistics.median(times)


def bench_shape(name, e, h, i, k, tokens, skips, dtype=torch.bfloat16):
    from vllm.model_executor.layers.fused_moe.fused_moe import fused_experts

    from vllm_zeda.vllm_experts import zero_expert_map

    gen = torch.Generator(device="cuda").manual_seed(0)
    w1 = torch.randn(e, 2 * i, h, device="cuda", dtype=dtype, generator=gen) * 0.02
    w2 = torch.randn(e, h, i, device="cuda", dtype=dtype, generator=gen) * 0.02
    zmap = zero_expert_map(None, e, e // 2, "cuda")
    rows = []
    for m in tokens:
        x = torch.randn(m, h, device="cuda", dtype=dtype, generator=gen)
        for s in skips:
            rs = make_routings(m, e, k, s, 8, gen)
            variants = {
                "static": [lambda r=r: fused_experts(x, w1, w2, r["w"], r["ids"]) for r in rs],
                "ours": [lambda r=r: fused_experts(x, w1, w2, r["zw"], r["zids"], global_num_experts=e + e // 2,
                                                   expert_map=zmap) for r in rs],
                "remap": [lambda r=r: fused_experts(x, w1, w2, r["zw"], r["rids"]) for r in rs],
                "ideal": [lambda r=r: fused_experts(x, w1, w2, r["cw"], r["cids"]) for r in rs],
            }
            row = {"shape": name, "tokens": m, "skip": s}
            for v, fns in variants.items():
                row[v] = round(time_graph(fns), 2)
            # ours must equal remap numerically (both skip the same slots' contributions)
            r0 = rs[0]
            a = fused_experts(x, w1, w2, r0["zw"], r0["zids"], global_num_experts=e + e // 2, expert_map=zmap)
            b = fused_experts(x, w1, w2, r0["zw"], r0["rids"])
            row["ours_vs_remap_maxdiff"] = float((a.float() - b.float()).abs().max())
            row["ours/static"] = round(row["ours"] / row["static"], 3)
            row["ours/ideal"] = round(row["ours"] / row["ideal"], 3)
            row["ours/remap"] = round(row["ours"] / row["remap"], 3)
            rows.append(row)
            print(f"{name:14s} M={m:6d} skip={s:.2f}  static {row['static']:9.1f}  ours {row['ours']:9.1f}  "
                  f"remap {row['remap']:9.1f}  ideal {row['ideal']:9.1f}  ours/static {row['ours/static']:.3f}  "
                  f"ours/ideal {row['ours/ideal']:.3f}", flush=True)
    return rows


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--shapes", nargs="+", default=list(SHAPES))
    p.add_argument("--tokens", nargs="+", type=int, default=TOKENS)
    p.add_argument("--skips", nargs="+", type=float, default=SKIPS)
    a = p.parse_args()
    import vllm

    t0 = time.time()
    rows = []
    for s in a.shapes:
        rows += bench_shape(s, *SHAPES[s], a.tokens, a.skips)
    meta = {"device": torch.cuda.get_device_name(), "vllm": vllm.__version__, "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d"), "seconds": round(time.time() - t0, 1), "unit": "us per fused-MoE call"}
    Path(a.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(json.dumps(meta))


if __name__ == "__main__":
    main()
