"""The ZEDA router's gate GEMM at decode batch sizes on a GPU.

A ZEDA gate has E+Z rows (Qwen3-30B-A3B: 192 x 2048). At a batch-1 decode step cuBLAS takes
5.2-5.5 µs a layer for it, longer than the whole routing kernel after it, with too few output
tiles to spread the weight reads over the GPU. `ops.gate_logits_` gives each program two
gate rows (96 programs) and reads a whole 2,048-column row in one step: 2.56 against cuBLAS's 5.41
µs at 1 token, 2.78 against 5.36 at 4 and 3.83 against 5.41 at 16 (H200, bench_route.py,
benchmarks/RESULTS.md §2.4); at 64 tokens every Triton launch shape loses to cuBLAS. So the gate runs it for batches of at most
SMALL_BATCH_MAX_TOKENS tokens inside CUDA graph capture only: in an eager forward a Triton launch
costs more host time than cuBLAS's (bench_host.py), which such a small step cannot hide.
Everything else, and every other platform, is vLLM's own `UnquantizedLinearMethod`. Both
accumulate in fp32 and round once, so the logits differ at most in summation order.
"""
from __future__ import annotations

import torch
from vllm import envs
from vllm.model_executor.layers.linear import UnquantizedLinearMethod

from ..kernels import ops

SMALL_BATCH_MAX_TOKENS = 16
# The launch shape: the fastest at 1, 4 and 16 tokens of bench_route.py's GATE_SHAPES (1-16 gate
# rows a program, 512-2,048 columns a step, 4 or 8 warps)
LAUNCH = {"block_n": 2, "block_k": 2048, "num_warps": 4}


def small_batch_gate_pays(x: torch.Tensor, layer: torch.nn.Module) -> bool:
    """Whether this gate call should run ops.gate_logits_ (else vLLM's GEMM; always
    under VLLM_BATCH_INVARIANT, whose logits may not depend on the batch size). The layer's weight
    is looked at only for a GPU input (vLLM's CPU GEMM may have replaced it)."""
    if not (x.dim() == 2 and x.shape[0] <= SMALL_BATCH_MAX_TOKENS and x.is_cuda):
        return False
    weight = layer.weight
    return (x.dtype == weight.dtype and x.stride(1) == 1 and weight.stride(1) == 1
            and torch.cuda.is_current_stream_capturing() and not getattr(envs, "VLLM_BATCH_INVARIANT", False))


class SmallBatchGateMethod(UnquantizedLinearMethod):
    """vLLM's unquantized linear method, with `gate_logits_` for small batches under CUDA graphs."""

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if bias is None and small_batch_gate_pays(x, layer):
            return ops.gate_logits_(x, layer.weight, **LAUNCH)
        return super().apply(layer, x, bias)


def use_small_batch_gate(gate: torch.nn.Module) -> bool:
    """Give a router gate built by vLLM (an unquantized linear layer) SmallBatchGateMethod where
    the Triton kernels can run; returns whether it did. Quantised gates keep their method."""
    if type(getattr(gate, "quant_method", None)) is not UnquantizedLinearMethod or not ops.available():
        return False
    gate.quant_method = SmallBatchGateMethod()
    return True
