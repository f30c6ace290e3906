"""Routed experts that never compute a zero slot (GPU, Triton fused MoE).

Zero slots keep their ids E..E+Z-1; these experts report global_num_experts = E+Z and an expert
map that sends those ids to -1 (composed with expert parallelism's own map, where zero experts
are -1 on every rank). The Triton kernel does no GEMM for a block whose expert is -1.
"""
from __future__ import annotations

import torch
from vllm.model_executor.layers.fused_moe.routed_experts import RoutedExperts

from .spec import ZedaSpec


def zero_expert_map(base_map: torch.Tensor | None, num_real: int, num_zero: int, device) -> torch.Tensor:
    """[E+Z] int32: the base map (identity without EP) for real experts, -1 for zero experts."""
    if base_map is None:
        base_map = torch.arange(num_real, dtype=torch.int32, device=device)
    tail = torch.full((num_zero,), -1, dtype=base_map.dtype, device=base_map.device)
    return torch.cat([base_map[:num_real], tail])


class ZedaRoutedExperts(RoutedExperts):
    def __init__(self, *args, zeda_num_zero: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.zeda_num_zero = zeda_num_zero
        self.global_num_experts = self.moe_config.num_experts + zeda_num_zero
        self._zeda_map_source: torch.Tensor | None = None
        self._rebuild_zeda_map()

    def _rebuild_zeda_map(self) -> None:
        base = RoutedExperts.expert_map.fget(self)
        device = base.device if base is not None else torch.get_default_device()
        self._zeda_map = zero_expert_map(base, self.moe_config.num_experts, self.zeda_num_zero, device)
        self._zeda_map_source = base

    @property
    def expert_map(self) -> torch.Tensor:
        base = RoutedExperts.expert_map.fget(self)
        if base is not self._zeda_map_source or (base is None and self._zeda_map.device != self._device_hint()):
            self._rebuild_zeda_map()
        return self._zeda_map

    def _device_hint(self):
        for p in self.parameters():
            return p.device
        return self._zeda_map.device

    def update_expert_map(self):  # EP rebalancing rebuilt the base map
        super().update_expert_map()
        self._rebuild_zeda_map()

    def _set_moe_config(self, new_moe_config):
        super()._set_moe_config(new_moe_config)
        self.global_num_experts = new_moe_config.num_experts + self.zeda_num_zero


def zero_skipping_experts_kwargs(spec: ZedaSpec) -> dict:
    return {"routed_experts_cls": ZedaRoutedExperts, "routed_experts_args": {"zeda_num_zero": spec.num_zero_experts}}
