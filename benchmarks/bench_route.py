"""GPU routing cost per MoE layer call, Qwen3-30B-A3B router shape (E=128 real + Z=64 zero
logits, top-8, bf16 logits), median µs over CUDA-graph replays (device machine):

  stock            vLLM's fused_topk over the 128 real logits (what a static model pays)
  bias+fused_topk  the plugin's earlier routing minus its counting kernel: bias add, then
                   fused_topk over 192 logits
  fused_topk 192   vLLM's fused_topk over all 192 logits, no bias: vLLM's own price of a
                   top-8 over E+Z (the floor our one kernel is measured against)
  zeda_route bM/wN vllm_zeda.kernels.ops.zeda_route_ (one kernel: bias, softmax, top-K,
                   renormalisation, counters, live ids) at launch shape BLOCK_M=M rows per
                   program, N warps, slots in top-K order; "default" = the shipped launch
  zeda_route live_first  the default launch with each token's live slots first, and at one token
                   where their fused-MoE blocks end (live_end)
  zeda_route plugin  the call the plugin's router makes: where the experts take the sort-free
                   assignment (kernels.ops.sort_free: up to 6 tokens here) at one token live_first
                   and live_end, at 2-4 the slot blocks with the live slots' first, their experts
                   and end (one program), at 5-6 the slot blocks; else default

and, up to 256 tokens, the router's gate GEMM before it (hidden 2048, bf16):
  gate cuBLAS 128 / 192   F.linear over the 128 real / 128 + 64 gate rows (what vLLM's gate runs)
  gate triton 192 bnN     kernels.ops.gate_logits_: N gate rows per program, 512 columns a step
                   (cuBLAS takes 5.2-5.4 µs a layer at batch 1, RESULTS.md §2.4)
  gate triton 192 bnN bkB wW  up to 64 tokens: B columns a step (2,048: a gate row in one load, one
                   memory round trip instead of four), W warps (ZEDA's gate runs bn2 bk2048 w4 for
                   1-16 tokens in CUDA graphs, serve.gate.LAUNCH)

Purpose: pick zeda_route_'s launch shape per batch size (decode at batch 1 paid ~12 µs per layer
more than stock end to end, RESULTS.md §7 item 2).

    python3 benchmarks/bench_route.py --out $OUT/route.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_moe_layer import time_graph  # noqa: E402

SHAPES = [(1, 1), (1, 2), (2, 2), (4, 4), (8, 4), (16, 4), (16, 8), (32, 8)]
# the gate's (gate rows a program, columns a step, warps) beside bn2/bk512/w4, vllm_gate's launch
GATE_SHAPES = [(1, 2048, 4), (2, 2048, 4), (2, 2048, 8), (4, 2048, 8), (2, 1024, 4)]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--tokens", nargs="+", type=int, default=[1, 4, 16, 64, 256, 1024, 4096, 16384])
    a = p.parse_args()
    from vllm.model_executor.layers.fused_moe.router.fused_topk_router import fused_topk

    from vllm_zeda.kernels.ops import gate_logits_, route_handover, zeda_route_

    e, z, k = 128, 64, 8
    bias = torch.full((1,), 0.1, device="cuda")
    bias_row = torch.zeros(e + z, device="cuda", dtype=torch.bfloat16)
    bias_row[e:] = 0.1
    counts = torch.zeros(2, dtype=torch.int64, device="cuda")
    gate = torch.randn(e + z, 2048, device="cuda", dtype=torch.bfloat16) * 0.02
    gate_real = gate[:e].contiguous()
    rows = []
    for m in a.tokens:
        logits = torch.randn(m, e + z, device="cuda", dtype=torch.bfloat16)
        real = logits[:, :e].contiguous()
        x = torch.empty(m, 2048, device="cuda", dtype=torch.bfloat16)
        end = torch.zeros(1, dtype=torch.int32, device="cuda")
        handover = route_handover(m, k, e + z, "cuda")  # the plugin's router's hand-over for this size
        variants = {
            "stock": lambda: fused_topk(x, real, k, True, torch.int32),
            "bias+fused_topk": lambda: fused_topk(x, logits + bias_row, k, True, torch.int32),
            "fused_topk 192": lambda: fused_topk(x, logits, k, True, torch.int32),
            "zeda_route default": lambda: zeda_route_(logits, e, k, True, bias, counts, None),
            "zeda_route live_first": lambda: zeda_route_(logits, e, k, True, bias, counts, None, live_first=True,
                                                         live_end=end if m == 1 else None),
            "zeda_route plugin": lambda: zeda_route_(logits, e, k, True, bias, counts, None, **handover),
        }
        for bm, nw in SHAPES:
            variants[f"zeda_route b{bm}/w{nw}"] = lambda bm=bm, nw=nw: zeda_route_(
                logits, e, k, True, bias, counts, None, block_m=bm, num_warps=nw)
        if m <= 256:
            hidden = torch.randn(m, 2048, device="cuda", dtype=torch.bfloat16)
            variants["gate cuBLAS 128"] = lambda: torch.nn.functional.linear(hidden, gate_real)
            variants["gate cuBLAS 192"] = lambda: torch.nn.functional.linear(hidden, gate)
            want = torch.nn.functional.linear(hidden, gate).float()
            shapes = [(bn, 512, None) for bn in (2, 4, 8, 16)] + (GATE_SHAPES if m <= 64 else [])
            for bn, bk, nw in shapes:
                name = f"gate triton 192 bn{bn}" + ("" if nw is None else f" bk{bk} w{nw}")
                variants[name] = lambda bn=bn, bk=bk, nw=nw: gate_logits_(hidden, gate, block_n=bn, block_k=bk, num_warps=nw)
                got = variants[name]().float()
                assert torch.allclose(got, want, rtol=2 ** -7, atol=1e-3), (m, name)  # a bf16 rounding apart
        ref = zeda_route_(logits, e, k, True, bias, counts, None)
        row = {"tokens": m}
        for name, fn in variants.items():
            if name.startswith("zeda_route b"):
                out = fn()
                assert torch.equal(out[1], ref[1]) and torch.equal(out[2], ref[2]), name  # same routing
            row[name] = round(time_graph([fn] * 8), 2)
        rows.append(row)
        print(json.dumps(row), flush=True)
    Path(a.out).write_text(json.dumps({"device": torch.cuda.get_device_name(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
