"""Compile the routing kernel (vllm_zeda.gpu_kernels._zeda_route) for an H100 (sm_90) without a
GPU, and report its code per launch shape: PTX lines (the kernel is fully unrolled: rows x top-K
rounds), warp shuffles (in-warp reduction steps), barriers and shared-memory stores (cross-warp
reductions), shared memory bytes, and how
Triton lays the warps out over [rows, experts]. Static evidence only; bench_route.py times it.

Needs triton (any machine; no vLLM):  python benchmarks/route_kernel_ptx.py
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from vllm_zeda import gpu_kernels  # noqa: E402

SIGNATURE = {"logits_ptr": "*bf16", "stride_lm": "i32", "bias_ptr": "*fp32", "pad_ptr": "*u8", "w_ptr": "*fp32",
             "ids_ptr": "*i32", "live_ptr": "*i32", "counts_ptr": "*i64", "end_ptr": "*i32", "blocks_ptr": "*i32", "bexp_ptr": "*i32", "M": "i32",
             "n_real": "i32", "n_all": "i32", "K": "constexpr", "K_PAD": "constexpr", "RENORM": "constexpr",
             "REMAP": "constexpr", "LIVE_FIRST": "constexpr", "END_BLOCK": "constexpr", "SLOT_ROWS": "constexpr", "HAS_PAD": "constexpr",
             "BLOCK_M": "constexpr", "BLOCK_E": "constexpr"}
# (rows per program, warps, live first, end block, slot block rows): the plugin's calls at 1 token
# (live first + end), at 2 and 3-4 tokens (the live slots' blocks first, and their end), at 5-6
# (slot blocks) and from 7 (neither), and 4 rows on 4 warps
SHAPES = [(1, 1, True, 16, 0), (1, 1, False, 0, 0), (2, 2, False, 16, 16), (4, 4, False, 16, 16), (2, 2, False, 0, 16),
          (2, 2, False, 0, 0), (4, 4, False, 0, 0)]


def main() -> None:
    print("Qwen3-30B-A3B router: 128 + 64 logits (BLOCK_E 256), top-8, renormalised, sm_90\n")
    print("| rows per program | warps | live first | end | slot blocks | PTX lines | shfl.sync | bar.sync | st.shared "
          "| shared bytes | warps over [rows, experts] |")
    print("| ---: | ---: | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | --- |")
    for block_m, warps, live_first, end_block, slot_rows in SHAPES:
        src = ASTSource(gpu_kernels._zeda_route, SIGNATURE, constexprs={
            "K": 8, "K_PAD": 8, "RENORM": True, "REMAP": False, "LIVE_FIRST": live_first, "END_BLOCK": end_block,
            "SLOT_ROWS": slot_rows, "HAS_PAD": True, "BLOCK_M": block_m, "BLOCK_E": 256})
        kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
        ptx, ttgir = kernel.asm["ptx"], kernel.asm["ttgir"]
        layout = re.search(r"warpsPerCTA = (\[[^\]]*\])", ttgir).group(1)
        print(f"| {block_m} | {warps} | {'yes' if live_first else 'no'} | {end_block or '-'} | {slot_rows or '-'} "
              f"| {ptx.count(chr(10))} | {ptx.count('shfl.sync')} "
              f"| {ptx.count('bar.sync')} | {ptx.count('st.shared')} | {kernel.metadata.shared} | {layout} |")

if __name__ == "__main__":
    main()
