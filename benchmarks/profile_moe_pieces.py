"""Where the fixed cost of the zero-expert path goes at decode sizes (device machine).

Times, in CUDA-graph replays (median µs), each piece that the ZEDA experts path adds to or swaps
in stock vLLM's Triton experts path, at decode-sized batches, Qwen3-30B-A3B expert shapes:
the expert-map gather of the ids, the live-slot SiLU vs vLLM's silu_and_mul, the live-slot sum vs
the plain and the map-aware moe_sum. Ids uniform over E+Z: a third are zero slots. vLLM's
silu_and_mul also runs with the dead rows' inputs all zero (what the fused-MoE kernel writes
there for a zero slot's block that loads its expert id -1) and with a single such row. (Variants
that loaded rows before their live ids, "speculative", were never faster on the H100 and are gone:
RESULTS.md §2.)

Then, at prefill sizes (2,048 to 16,384 tokens, 16k-131k slot rows) with no slot, half and three
quarters of them dead, the live-slot SiLU and sum in every launch shape of SILU_LAUNCHES /
SUM_LAUNCHES against vLLM's kernels over every row and over the live rows alone (what the ideal
top-K/2 runs), interleaved (bench_moe_layer.time_graphs). A 16,384-token prefill step had put our
SiLU 42% (skip 0) and 63% (skip 0.5) over vLLM's at the same live rows (RESULTS.md §3,
prefill-profile); these sweeps set the plugin's defaults (session 14: the SiLU 1.46x -> 1.21x
vLLM's over the live rows at 16k tokens, skip 0.5).

    python3 benchmarks/profile_moe_pieces.py --out $OUT/pieces.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_moe_layer import time_graph, time_graphs  # noqa: E402

# SiLU: (rows a program, block columns, warps), each row behind its own live-id branch; sum: (block
# columns, warps) over a token a program. The first of each is the plugin's default (the SiLU's
# below gpu_kernels.LIVE_SILU_WIDE_ROWS rows; from there the third). Session 14's sweeps (RESULTS.md
# §3): 2-D row tiles with masked dead rows, and 2-8 tokens a sum program, lost.
SILU_LAUNCHES = [(4, 256, 2), (1, 1024, 4), (8, 256, 2), (16, 256, 2), (4, 256, 1), (8, 256, 1), (8, 128, 1), (16, 128, 1),
                 (8, 512, 2), (4, 512, 4)]
SUM_LAUNCHES = [(2048, 8), (1024, 4)]
PREFILL_TOKENS = (2048, 8192, 16384)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    a = p.parse_args()
    from vllm import _custom_ops as ops

    from vllm_zeda.gpu_kernels import live_moe_sum_, live_silu_and_mul_
    from vllm_zeda.vllm_experts import zero_expert_map

    e, z, h, i, k = 128, 64, 2048, 768, 8
    zmap = zero_expert_map(None, e, z, "cuda")
    rows = []
    for m in (1, 4, 16, 64, 256, 1024, 4096):
        ids = torch.randint(0, e + z, (m, k), device="cuda", dtype=torch.int32)
        live = torch.where(ids >= e, -1, ids)
        x1 = torch.randn(m * k, 2 * i, device="cuda", dtype=torch.bfloat16)
        x1_dead0 = x1.masked_fill((live.reshape(-1) < 0)[:, None], 0.0)
        x1_one0 = x1.clone()
        x1_one0[-1] = 0.0
        act = torch.empty(m * k, i, device="cuda", dtype=torch.bfloat16)
        c3 = torch.randn(m, k, h, device="cuda", dtype=torch.bfloat16)
        out = torch.empty(m, h, device="cuda", dtype=torch.bfloat16)
        pieces = {
            "empty_graph_call (torch.empty)": lambda: torch.empty(m, h, device="cuda"),
            "map_gather zmap[ids]": lambda: zmap[ids.reshape(-1)],
            "silu_and_mul (vLLM CUDA)": lambda: torch.ops._C.silu_and_mul(act, x1),
            "silu_and_mul, dead rows 0": lambda: torch.ops._C.silu_and_mul(act, x1_dead0),
            "silu_and_mul, last row 0": lambda: torch.ops._C.silu_and_mul(act, x1_one0),
            "live_silu_and_mul_ (ours)": lambda: live_silu_and_mul_(act, x1, live),
            "live_moe_sum_ (ours)": lambda: live_moe_sum_(out, c3, live),
            "moe_sum plain": lambda: ops.moe_sum(c3, out),
            "moe_sum ids+map": lambda: ops.moe_sum(c3, out, ids, zmap),
        }
        for name, fn in pieces.items():
            us = time_graph([fn] * 8)
            rows.append({"tokens": m, "piece": name, "us": round(us, 2)})
            print(f"M={m:3d} {name:34s} {us:7.2f} us", flush=True)
    for m in PREFILL_TOKENS:
        for skip in (0.0, 0.5, 0.75):
            rows += prefill_pieces(m, skip, e, z, h, i, k, ops, live_silu_and_mul_, live_moe_sum_)
            Path(a.out).write_text(json.dumps({"device": torch.cuda.get_device_name(), "rows": rows}, indent=1))
    Path(a.out).write_text(json.dumps({"device": torch.cuda.get_device_name(), "rows": rows}, indent=1))


def prefill_pieces(m, skip, e, z, h, i, k, ops, live_silu_and_mul_, live_moe_sum_) -> list[dict]:
    """The SiLU and the sum over slots at m tokens with a `skip` share of the slots dead: ours in
    each launch shape against vLLM's over all rows and over the live rows only (µs, interleaved),
    and vLLM's map-aware sum (what eager forwards run, `live_sum_pays`)."""
    from vllm_zeda.vllm_experts import zero_expert_map

    gen = torch.Generator(device="cuda").manual_seed(m)
    ids = torch.randint(0, e, (m, k), device="cuda", dtype=torch.int32, generator=gen)
    dead = torch.rand(m, k, device="cuda", generator=gen) < skip
    live = torch.where(dead, -1, ids)
    zmap = zero_expert_map(None, e, z, "cuda")
    zero_ids = torch.where(dead, e, ids)  # a dead slot on the first zero expert
    n_live = m * k - int(dead.sum())
    x1 = torch.randn(m * k, 2 * i, device="cuda", dtype=torch.bfloat16, generator=gen)
    act = torch.empty(m * k, i, device="cuda", dtype=torch.bfloat16)
    c3 = torch.randn(m, k, h, device="cuda", dtype=torch.bfloat16, generator=gen)
    out = torch.empty(m, h, device="cuda", dtype=torch.bfloat16)
    k_live = max(1, round(k * (1 - skip)))
    c3_ideal = torch.randn(m, k_live, h, device="cuda", dtype=torch.bfloat16, generator=gen)
    pieces = {
        "silu_and_mul (vLLM CUDA), every row": lambda: torch.ops._C.silu_and_mul(act, x1),
        "silu_and_mul (vLLM CUDA), live rows only": lambda: torch.ops._C.silu_and_mul(act[:n_live], x1[:n_live]),
        "moe_sum (vLLM CUDA), K slots": lambda: ops.moe_sum(c3, out),
        f"moe_sum (vLLM CUDA), {k_live} slots": lambda: ops.moe_sum(c3_ideal, out),
        "moe_sum ids+map (vLLM CUDA, eager forwards)": lambda: ops.moe_sum(c3, out, zero_ids, zmap),
    }
    for r, b, w in SILU_LAUNCHES:
        pieces[f"live_silu_and_mul_ rows={r} block={b} warps={w}"] = (
            lambda r=r, b=b, w=w: live_silu_and_mul_(act, x1, live, rows_per_program=r, block=b, num_warps=w))
    for b, w in SUM_LAUNCHES:
        pieces[f"live_moe_sum_ block={b} warps={w}"] = lambda b=b, w=w: live_moe_sum_(out, c3, live, block=b, num_warps=w)
    times = time_graphs({name: [fn] * 4 for name, fn in pieces.items()})
    for name, us in times.items():
        print(f"M={m:5d} skip={skip:.1f} {name:44s} {us:8.2f} us", flush=True)
    return [{"tokens": m, "skip": skip, "piece": name, "us": round(us, 2)} for name, us in times.items()]


if __name__ == "__main__":
    main()
