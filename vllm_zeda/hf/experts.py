"""A transformers MoE block's routed experts run over its live slots only, without a host sync.

transformers' experts take (token, slot) pairs whose ids are all real experts; a ZEDA router's
zero slots reach them as expert 0 with weight 0. Here a slot is live when its weight is nonzero:
the live pairs are sorted by expert and run through two grouped GEMMs (`grouped_mm`, which
autograd differentiates), and the dead ones sort last, past the GEMMs' last group, so they cost
no GEMM work. Shapes never depend on how many slots are live, so nothing waits for the device to
count them (a `nonzero` would stop the host once per layer, forward and recompute alike).

Rows past the last group are left unwritten by grouped_mm, in its outputs and in its input
gradients: the dead rows are zeroed before the first GEMM (whose backward then zeroes their
gradient) and after the last, before the routing weights multiply them (NaN * 0 is NaN, and
the weights' gradient is the GEMM's output times the incoming gradient).
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


def gather_live(hidden_states: torch.Tensor, order: torch.Tensor, live: torch.Tensor, k: int) -> torch.Tensor:
    """Each sorted (token, slot) pair's input row [T*K, H]; dead rows zeroed (their gradient too)."""
    return hidden_states[order // k].masked_fill(~live, 0)


def swiglu(gate_up: torch.Tensor, act_fn) -> torch.Tensor:
    """act(gate) * up from the first GEMM's fused [rows, 2I] output."""
    gate, up = gate_up.chunk(2, dim=-1)
    return act_fn(gate) * up


def combine(out: torch.Tensor, live: torch.Tensor, sorted_weights: torch.Tensor, inverse: torch.Tensor,
            tokens: int, dtype: torch.dtype) -> torch.Tensor:
    """[T, H]: each token's K sorted rows weighted and summed; dead rows zeroed before the weights
    multiply them (grouped_mm leaves them unwritten: NaN * 0 is NaN, and the weights' gradient
    reads these rows)."""
    out = torch.where(live, out, 0) * sorted_weights.unsqueeze(1)
    return out[inverse].view(tokens, inverse.numel() // tokens, -1).sum(dim=1).to(dtype)


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

    x = pieces.gather_live(hidden_states, order, live, k)
    gate_up = _grouped_mm(x, experts.gate_up_proj.transpose(-2, -1), offs=offs)
    out = _grouped_mm(pieces.swiglu(gate_up, experts.act_fn), experts.down_proj.transpose(-2, -1), offs=offs)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    return pieces.combine(out, live, weights[order], inverse, tokens, hidden_states.dtype)
