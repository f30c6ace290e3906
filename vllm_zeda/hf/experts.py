"""A transformers MoE block's routed experts run over its live slots only, without a host sync.

transformers' experts take (token, slot) pairs whose ids are all real experts; a ZEDA router's
zero slots reach them as expert 0 with weight 0. Here a slot is live when its weight is nonzero:
the live pairs are sorted by expert and run through two grouped GEMMs (`grouped_mm`, which
autograd differentiates), and the dead ones sort last, past the GEMMs' last group, so they cost
no GEMM work. Shapes never depend on how many slots are live, so nothing waits for the device to
count them (a `nonzero` would stop the host once per layer, forward and recompute alike).

Rows past the last group are left unwritten by grouped_mm, in its outputs and in its input
gradients: the dead rows are zeroed before the first GEMM (and their gradient in its backward)
and after the last, before the routing weights multiply them (NaN * 0 is NaN, and the weights'
gradient is the GEMM's output times the incoming gradient). The gather before the GEMMs and the
weighted sum after them gather in both directions (autograd Functions with hand-written
backwards), so no backward scatter-adds T x K rows.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

try:  # transformers' dispatcher (5.17, 5.19): the grouped GEMM its own experts use on this device and
    # dtype (torch's grouped_mm, or its fallback where torch's kernel cannot run), input cast to the
    # weight's dtype (grouped_mm is not autocast-enabled)
    from transformers.integrations.moe import _grouped_mm
except ImportError:  # pragma: no cover - a transformers without it
    def _grouped_mm(input, weight, offs):
        return (getattr(F, "grouped_mm", None) or torch._grouped_mm)(input.to(weight.dtype), weight, offs=offs)


def runs_grouped(experts: nn.Module) -> bool:
    """Whether `live_experts_forward` can run this experts module: transformers' fused layout of
    a gated MLP without biases (gate_up_proj [E, 2I, H], down_proj [E, H, I])."""
    gate_up, down = getattr(experts, "gate_up_proj", None), getattr(experts, "down_proj", None)
    if not isinstance(gate_up, torch.Tensor) or not isinstance(down, torch.Tensor) or gate_up.dim() != 3:
        return False
    if getattr(experts, "has_bias", False) or getattr(experts, "is_transposed", False):
        return False
    e, two_i, h = gate_up.shape
    return down.shape == (e, h, two_i // 2) and hasattr(experts, "act_fn")


def _sum_slots(rows: torch.Tensor, inverse: torch.Tensor, k: int) -> torch.Tensor:
    """[T, H]: token t's K sorted rows rows[inverse[t*K + j]] summed over j in slot order, as K
    gathers added in turn (one pointwise pass once compiled; no reduction kernel, no atomics)."""
    picked = rows[inverse.view(-1, k)]  # [T, K, H]
    total = picked[:, 0]
    for j in range(1, k):
        total = total + picked[:, j]
    return total


class _GatherLive(torch.autograd.Function):
    """x [T, H] -> [T*K, H]: sorted pair i's token row, zeroed where dead. The backward sums each
    token's K row gradients by gathering them (`_sum_slots`) instead of autograd's scatter-add
    of T*K rows (atomics, or a sort under deterministic algorithms)."""

    @staticmethod
    def forward(ctx, x, order, inverse, live, k):
        ctx.save_for_backward(inverse, live)
        ctx.k = k
        return x[order // k].masked_fill(~live, 0)

    @staticmethod
    def backward(ctx, grad):
        inverse, live = ctx.saved_tensors
        return _sum_slots(grad.masked_fill(~live, 0), inverse, ctx.k), None, None, None, None


class _Combine(torch.autograd.Function):
    """[T*K, H] expert rows -> [T, H]: each token's live rows times their routing weights,
    summed (dead rows are zero whatever grouped_mm left there: NaN * 0 would be NaN). Both
    directions gather: the rows' and the weights' gradients read the token's incoming gradient
    at order // K, no scatter."""

    @staticmethod
    def forward(ctx, out, live, weights, order, inverse, k, dtype):
        out = torch.where(live, out, 0)
        ctx.save_for_backward(out, live, weights, order)
        ctx.k = k
        return _sum_slots(out * weights.unsqueeze(1), inverse, k).to(dtype)

    @staticmethod
    def backward(ctx, grad):
        out, live, weights, order = ctx.saved_tensors
        g = grad[order // ctx.k]  # [T*K, H]: each sorted row's token's gradient
        grad_out = torch.where(live, g * weights.unsqueeze(1), 0).to(out.dtype)
        grad_weights = (g.to(torch.float32) * out.to(torch.float32)).sum(-1).to(weights.dtype)
        return grad_out, None, grad_weights, None, None, None, None


def gather_live(hidden_states: torch.Tensor, order: torch.Tensor, inverse: torch.Tensor, live: torch.Tensor,
                k: int) -> torch.Tensor:
    """Each sorted (token, slot) pair's input row [T*K, H]; dead rows zeroed (their gradient too)."""
    return _GatherLive.apply(hidden_states, order, inverse, live, k)


def swiglu(gate_up: torch.Tensor, act_fn) -> torch.Tensor:
    """act(gate) * up from the first GEMM's fused [rows, 2I] output."""
    gate, up = gate_up.chunk(2, dim=-1)
    return act_fn(gate) * up


def combine(out: torch.Tensor, live: torch.Tensor, sorted_weights: torch.Tensor, order: torch.Tensor,
            inverse: torch.Tensor, k: int, dtype: torch.dtype) -> torch.Tensor:
    """[T, H]: each token's K sorted rows weighted and summed in slot order; dead rows zeroed
    before the weights multiply them (grouped_mm leaves them unwritten)."""
    return _Combine.apply(out, live, sorted_weights, order, inverse, k, dtype)


class Pieces:
    """The elementwise steps around the two grouped GEMMs, eager; `python -m vllm_zeda.train
    --compile` gives each experts module compiled ones (`zeda_pieces`, train.fused)."""

    gather_live = staticmethod(gather_live)
    swiglu = staticmethod(swiglu)
    combine = staticmethod(combine)


def live_experts_forward(experts: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                         top_k_weights: torch.Tensor) -> torch.Tensor:
    """sum over each token's live slots of weight * expert(x): [T, H] from x [T, H], ids and
    weights [T, K]; equal to transformers' grouped_mm experts over the same slots."""
    pieces = getattr(experts, "zeda_pieces", Pieces)
    tokens, k = top_k_index.shape
    num_experts = experts.gate_up_proj.shape[0]
    weights = top_k_weights.reshape(-1)
    key = top_k_index.reshape(-1).masked_fill(weights == 0, num_experts)  # dead slots sort last
    key_sorted, order = torch.sort(key, stable=True)
    # offs[e] = live pairs of experts 0..e: the groups' ends (searchsorted: no sync, any device)
    offs = torch.searchsorted(key_sorted, torch.arange(1, num_experts + 1, device=key.device, dtype=key.dtype))
    offs = offs.to(torch.int32)
    live = (key_sorted < num_experts).unsqueeze(1)

    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    x = pieces.gather_live(hidden_states, order, inverse, live, k)
    gate_up = _grouped_mm(x, experts.gate_up_proj.transpose(-2, -1), offs=offs)
    out = _grouped_mm(pieces.swiglu(gate_up, experts.act_fn), experts.down_proj.transpose(-2, -1), offs=offs)
    return pieces.combine(out, live, weights[order], order, inverse, k, hidden_states.dtype)
