"""Pure-torch oracles of the GPU hand-over's block layouts (kernels.ops.zeda_route_'s
live_first / slot_blocks / block_experts outputs and kernels.align.align_live_slots): what the
kernel tests compare against and what benchmarks/bench_moe_layer.py feeds the experts with."""
from __future__ import annotations

import torch

from vllm_zeda.routing import Routing


def live_first(routing: Routing) -> Routing:
    """The same slots with each token's live (real-expert) ones first, in their top-K order, then
    its zero slots in theirs: a stable partition. Outputs are unchanged (the sum over a token's
    live slots keeps its order); at small batches the fused-MoE grid runs one block per slot in
    slot order, so the zero slots' early-exiting blocks come after every live one."""
    order = torch.sort(routing.is_zero.to(torch.int8), dim=-1, stable=True).indices
    return Routing(weights=routing.weights.gather(-1, order), ids=routing.ids.gather(-1, order),
                   num_real=routing.num_real)


def slot_blocks(is_zero: torch.Tensor, block: int) -> torch.Tensor:
    """[T*K*block] int32: the fused-MoE `sorted_token_ids` of one block of `block` rows per slot,
    in slot order. A live slot's block holds its flat index, then padding (T*K, past every valid
    row); a zero slot's block only padding, so the kernel's token mask leaves it no row to write."""
    slots = is_zero.numel()
    out = torch.full((slots, block), slots, dtype=torch.int32, device=is_zero.device)
    index = torch.arange(slots, dtype=torch.int32, device=is_zero.device)
    out[:, 0] = index.masked_fill(is_zero.reshape(-1), slots)
    return out.reshape(-1)


def live_blocks_first(live_ids: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The slot blocks of `slot_blocks` with every live slot's block first, over all tokens, slot
    order kept within each kind: (sorted_token_ids [T*K*block], each block's expert [T*K] from
    live_ids [T, K] (-1: a zero slot), end = block x live slots). A fused-MoE grid told to stop at
    `end` (its num_tokens_post_padded) then returns from every zero slot's block at its first check."""
    is_zero = live_ids.reshape(-1) < 0
    order = torch.sort(is_zero.to(torch.int8), stable=True).indices
    blocks = slot_blocks(is_zero, block).reshape(-1, block)[order].reshape(-1)
    return blocks, live_ids.reshape(-1)[order], block * int((~is_zero).sum())


def align_by_expert(live_ids: torch.Tensor, block: int, num_experts: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The part of a fused-MoE alignment the kernel reads, for live_ids [T, K] (-1: a slot no
    expert here computes): (sorted_token_ids up to `end`: each expert's slots (flat indices,
    ascending), then padding (T*K) up to a multiple of `block`, experts in order; each block's
    expert; end, vLLM's num_tokens_post_padded). What moe_align_block_size makes of the same ids
    with the zero slots left out (`ignore_invalid_experts`), up to the order within an expert."""
    flat = live_ids.reshape(-1).long()
    live = flat >= 0
    counts = torch.bincount(flat[live], minlength=num_experts)
    padded = (counts + block - 1) // block * block
    start = torch.cumsum(padded, 0) - padded
    order = torch.argsort(torch.where(live, flat, num_experts), stable=True)[: int(live.sum())]
    experts = flat[order]
    rank = torch.arange(order.numel(), device=flat.device) - (torch.cumsum(counts, 0) - counts)[experts]
    end = int(padded.sum())
    rows = torch.full((end,), flat.numel(), dtype=torch.int32, device=flat.device)
    rows[start[experts] + rank] = order.to(torch.int32)
    block_experts = torch.repeat_interleave(torch.arange(num_experts, dtype=torch.int32, device=flat.device),
                                            padded // block)
    return rows, block_experts, end


def silu_mul_group_quant(x: torch.Tensor, group: int, quant_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """vLLM's silu_and_mul_per_block_quant in torch: a = silu(gate) * up in fp32 (gate, up = x's
    halves), per `group` columns scale = max(amax / q_max, 1 / (q_max * 512)), q = clamp(a /
    scale, +-q_max). Returns (q [R, N] quant_dtype, scales [R, N / group] fp32)."""
    rows, n = x.shape[0], x.shape[1] // 2
    gate, up = x[:, :n].float(), x[:, n:].float()
    act = (gate * (1.0 / (1.0 + torch.exp(-gate))) * up).view(rows, n // group, group)
    q_max = torch.finfo(quant_dtype).max
    scale = (act.abs().amax(dim=-1) / q_max).clamp(min=1.0 / (q_max * 512.0))
    q = (act / scale[..., None]).clamp(-q_max, q_max).to(quant_dtype)
    return q.view(rows, n), scale


def quant_per_tensor(x: torch.Tensor, quant_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """vLLM's dynamic per-tensor FP8 quantisation (scaled_fp8_quant without a scale) in torch:
    scale = max |x| / q_max over every row, q = clamp(x * (1 / scale), +-q_max). Returns (q
    quant_dtype, scale [1] fp32)."""
    q_max = torch.finfo(quant_dtype).max
    scale = (x.float().abs().amax() / q_max).reshape(1)
    q = (x.float() * (1.0 / scale)).clamp(-q_max, q_max).to(quant_dtype)
    return q, scale
