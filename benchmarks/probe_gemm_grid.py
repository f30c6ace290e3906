"""What the zero slots' share of the fused-MoE grid costs at prefill sizes (device machine).

vLLM's fused-MoE kernel launches a program for every block of `sorted_token_ids`, a buffer sized
for every slot live: M*K + E*(BLOCK_M-1) rows. The blocks past `num_tokens_post_padded` return at
the kernel's first check, but each still takes an SM's slot for its launch and one load; with
Qwen3-30B-A3B's 16,384-token tiles (128 x 256, 4 stages: one program an SM) half the slots dead
leaves about half the programs empty. This times, interleaved in CUDA graphs, Qwen3's shape:

  align        vLLM's moe_align_block_size over the M x K ids with the zero map (ours before
               gpu_align) / vllm_zeda.gpu_align.align_live_slots over the live ids (ours now) /
               moe_align_block_size over the ideal's M x K(1-s) ids
  gemm1/gemm2  the first / second fused-MoE GEMM on vLLM's alignment of ours over the whole buffer,
               on the same alignment cut at its end (`num_tokens_post_padded`, read on the host:
               no empty program; a bound no CUDA graph can know), on gpu_align's, and on the
               ideal's; the first GEMM's live rows on vLLM's and gpu_align's alignment must agree
               bit for bit (row order within an expert differs; each row is computed alone)

    python3 benchmarks/probe_gemm_grid.py --out $OUT/grid.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_moe_layer import time_graphs  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--tokens", type=int, nargs="+", default=[1024, 2048, 4096, 16384])
    p.add_argument("--skips", type=float, nargs="+", default=[0.0, 0.5, 0.75])
    a = p.parse_args()
    import triton.language as tl
    from vllm.model_executor.layers.fused_moe.fused_moe import invoke_fused_moe_triton_kernel
    from vllm.model_executor.layers.fused_moe.moe_align_block_size import moe_align_block_size

    from vllm_zeda.gpu_align import align_live_slots
    from vllm_zeda.tuned_configs import zeda_moe_config
    from vllm_zeda.vllm_experts import zero_expert_map

    e, z, h, i, k = 128, 64, 2048, 768, 8
    dt = torch.bfloat16
    w1 = torch.randn(e, 2 * i, h, device="cuda", dtype=dt) * 0.02
    w2 = torch.randn(e, h, i, device="cuda", dtype=dt) * 0.02
    zmap = zero_expert_map(None, e, z, "cuda")
    rows = []
    for m in a.tokens:
        cfg = zeda_moe_config(w1.shape, w2.shape, k, None, m)
        cfg = {key: v for key, v in cfg.items() if key != "SPLIT_K"}
        bm = cfg["BLOCK_SIZE_M"]
        x = torch.randn(m, h, device="cuda", dtype=dt)
        gen = torch.Generator(device="cuda").manual_seed(m)
        for skip in a.skips:
            ids = torch.argsort(torch.rand(m, e, device="cuda", generator=gen), -1)[:, :k].to(torch.int32)
            dead = torch.rand(m, k, device="cuda", generator=gen) < skip
            zids = torch.where(dead, e + (ids % z), ids)
            live = torch.where(dead, -1, ids)
            w = torch.softmax(torch.randn(m, k, device="cuda", generator=gen), -1)
            kk = max(1, round(k * (1 - skip)))
            cids, cw = ids[:, :kk].contiguous(), w[:, :kk].contiguous()

            def gemms(sorted_ids, expert_ids, ntpp, topk, weights, tag):
                c1 = torch.empty(m, topk, 2 * i, device="cuda", dtype=dt)
                c2 = torch.randn(m * topk, i, device="cuda", dtype=dt)
                c3 = torch.empty(m, topk, h, device="cuda", dtype=dt)
                common = dict(A_scale=None, B_scale=None, config=cfg, compute_type=tl.bfloat16, use_fp8_w8a8=False,
                              use_int8_w8a8=False, use_int8_w8a16=False, use_int4_w4a16=False,
                              per_channel_quant=False)
                g1 = lambda: invoke_fused_moe_triton_kernel(  # noqa: E731
                    x, w1, c1, topk_weights=weights, sorted_token_ids=sorted_ids, expert_ids=expert_ids,
                    num_tokens_post_padded=ntpp, mul_routed_weight=False, top_k=topk, **common)
                g2 = lambda: invoke_fused_moe_triton_kernel(  # noqa: E731
                    c2, w2, c3, topk_weights=weights, sorted_token_ids=sorted_ids, expert_ids=expert_ids,
                    num_tokens_post_padded=ntpp, mul_routed_weight=True, top_k=1, **common)
                return {f"gemm1 {tag}": [g1] * 4, f"gemm2 {tag}": [g2] * 4}, (g1, c1)

            s_ids, s_exp, s_end = moe_align_block_size(zids, bm, e + z, zmap, ignore_invalid_experts=True)
            c_ids, c_exp, c_end = moe_align_block_size(cids, bm, e)
            end = int(s_end.item())
            a_ids, a_exp, a_end = align_live_slots(live, bm, e + z)
            variants = {
                "align vLLM (M x K, zero map)": [lambda: moe_align_block_size(zids, bm, e + z, zmap,
                                                                              ignore_invalid_experts=True)] * 4,
                "align gpu_align (live ids)": [lambda: align_live_slots(live, bm, e + z)] * 4,
                "align ideal (M x K(1-s))": [lambda: moe_align_block_size(cids, bm, e)] * 4,
            }
            whole, (g1_vllm, c1_vllm) = gemms(s_ids, s_exp, s_end, k, w, "ours, whole buffer")
            ours_now, (g1_ours, c1_ours) = gemms(a_ids, a_exp, a_end, k, w, "ours, gpu_align")
            variants.update(whole)
            variants.update(gemms(s_ids[:end], s_exp, s_end, k, w, "ours, cut at its end")[0])
            variants.update(ours_now)
            variants.update(gemms(c_ids, c_exp, c_end, kk, cw, "ideal")[0])
            times = time_graphs(variants, reps=30)
            g1_vllm(), g1_ours()
            rows_live = ~dead.reshape(-1)
            same = torch.equal(c1_vllm.reshape(m * k, -1)[rows_live], c1_ours.reshape(m * k, -1)[rows_live])
            meta = dict(tokens=m, skip=skip, block_m=bm, buffer_rows=s_ids.numel(), live_end=end,
                        gpu_align_end=int(a_end.item()), gemm1_equal=same,
                        ideal_buffer_rows=c_ids.numel(), ideal_end=int(c_end.item()))
            print(json.dumps(meta), flush=True)
            for name, us in times.items():
                print(f"M={m:5d} skip={skip:.2f} {name:34s} {us:8.2f} us", flush=True)
                rows.append(dict(meta, piece=name, us=round(us, 2)))
            Path(a.out).write_text(json.dumps({"device": torch.cuda.get_device_name(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
