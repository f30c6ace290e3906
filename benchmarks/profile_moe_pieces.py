"""Where the fixed cost of the zero-expert path goes at decode sizes (device machine).

Times, in CUDA-graph replays (median µs), each piece that the ZEDA experts path adds to or swaps
in stock vLLM's Triton experts path, at decode-sized batches, Qwen3-30B-A3B expert shapes:
the expert-map gather of the ids, the live-slot SiLU vs vLLM's silu_and_mul, the live-slot sum vs
the plain and the map-aware moe_sum. Ids uniform over E+Z: a third are zero slots. vLLM's
silu_and_mul also runs with the dead rows' inputs all zero (what the fused-MoE kernel writes
there for a zero slot's block that loads its expert id -1) and with a single such row. (Variants
that loaded rows before their live ids, "speculative", were never faster on the H100 and are gone:
RESULTS.md §2.)

    python3 benchmarks/profile_moe_pieces.py --out $OUT/pieces.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_moe_layer import time_graph  # noqa: E402


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
    Path(a.out).write_text(json.dumps({"device": torch.cuda.get_device_name(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
