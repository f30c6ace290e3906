"""vLLM's Triton experts, changed so that a zero slot costs no GPU work at any batch size (GPU).

Zero slots reach the experts with ids E..E+Z-1 and an expert map that sends them to -1. Stock
`TritonExperts.apply` then still pays for them in three places; this subclass removes each:

1. Alignment. 0.26 counts mapped-out slots into `moe_align_block_size` (`ignore_invalid_experts`
   False), so Z experts' worth of blocks launch, write zero rows to both GEMM outputs, and are
   summed. Here mapped-out slots are dropped before alignment (as 0.32+ does for an expert map).
   For tiny batches (M*K*4 <= E+Z) upstream uses a sort-free "naive" assignment, but only without
   an expert map; here it is kept with the map applied to the ids, so a decode step of one token
   runs exactly the live slots' blocks plus early-exiting blocks for the zero ones.
2. Activation. The gated SiLU ran over all M*K rows; here only over live rows
   (`gpu_kernels.live_silu_and_mul_`).
3. Sum over slots. `moe_sum` skips mapped-out slots (the op takes ids and map since 0.26).

The alignment change is applied by running upstream's own `apply` with its module-level
`_prepare_expert_assignment` rebound (compat.rebind_globals), so the rest of upstream's logic,
LoRA and quantised paths included, stays upstream's. Anything this class does not cover (LoRA,
other activations, a vLLM whose apply has no such hook) falls back to the stock behaviour.
"""
from __future__ import annotations

import torch
from vllm import _custom_ops as ops
from vllm.model_executor.layers.fused_moe.activation import MoEActivation
from vllm.model_executor.layers.fused_moe.experts import triton_moe
from vllm.model_executor.layers.fused_moe.experts.triton_moe import TritonExperts

from . import compat
from .gpu_kernels import live_silu_and_mul_

_UPSTREAM_ASSIGN = getattr(triton_moe, "_prepare_expert_assignment", None)


def assign_live_slots(topk_ids, config, num_tokens, top_k_num, global_num_experts, expert_map, **kwargs):
    """`_prepare_expert_assignment` that never gives a mapped-out (zero) slot a block."""
    if expert_map is None:
        return _UPSTREAM_ASSIGN(topk_ids, config, num_tokens, top_k_num, global_num_experts, expert_map, **kwargs)
    if num_tokens * top_k_num * 4 <= global_num_experts and not _grouped_int_weights(kwargs):
        # one block per slot, in slot order; a -1 block exits at once (its rows are never read)
        expert_ids = expert_map[topk_ids.reshape(-1)]
        padded = torch.full((1,), topk_ids.numel() * config["BLOCK_SIZE_M"], dtype=torch.int32, device=topk_ids.device)
        return None, expert_ids, padded
    kwargs["ignore_invalid_experts"] = True
    return _UPSTREAM_ASSIGN(topk_ids, config, num_tokens, top_k_num, global_num_experts, expert_map, **kwargs)


def _grouped_int_weights(kwargs) -> bool:
    """Upstream's condition for refusing the naive assignment (group-quantised int weights)."""
    block_shape = kwargs.get("block_shape")
    return bool((kwargs.get("use_int8_w8a16") or kwargs.get("use_int4_w4a16")) and block_shape and block_shape[1] > 0)


_LIVE_APPLY = (
    compat.rebind_globals(TritonExperts.apply, _prepare_expert_assignment=assign_live_slots)
    if _UPSTREAM_ASSIGN is not None
    else None
)


class ZedaTritonExperts(TritonExperts):
    """TritonExperts for layers with zero experts; selected by vllm_experts.ZedaRoutedExperts."""

    _live: tuple[torch.Tensor, torch.Tensor] | None = None

    def apply(self, output, hidden_states, w1, w2, topk_weights, topk_ids, activation, global_num_experts,
              expert_map, *args, **kwargs):
        if expert_map is None or _LIVE_APPLY is None or self._lora_context is not None:
            return super().apply(output, hidden_states, w1, w2, topk_weights, topk_ids, activation,
                                 global_num_experts, expert_map, *args, **kwargs)
        self._live = (topk_ids, expert_map)
        try:
            return _LIVE_APPLY(self, output, hidden_states, w1, w2, topk_weights, topk_ids, activation,
                               global_num_experts, expert_map, *args, **kwargs)
        finally:
            self._live = None

    def activation(self, activation, output, input, **kwargs) -> None:
        if (self._live is not None and activation == MoEActivation.SILU
                and self.quant_config.gemm1_clamp_limit is None and output.dtype == input.dtype):
            live_silu_and_mul_(output, input, *self._live)
            return
        super().activation(activation, output, input, **kwargs)

    def moe_sum(self, input, output, topk_ids=None, expert_map=None) -> None:
        if self._live is not None:
            topk_ids, expert_map = self._live
        if expert_map is None:
            return super().moe_sum(input, output)
        ops.moe_sum(input, output, topk_ids, expert_map)  # skips the slots mapped to -1
