"""Fused elementwise work for the trainer (`--compile`).

At Qwen3-30B-A3B's shape most of a training step's GPU time is elementwise work between the GEMMs
(benchmarks/RESULTS.md §8): RMSNorm's float32 round trips, attention's q/k norms and rotary
embedding, SwiGLU, the gather / weight / scatter around the grouped expert GEMMs, the
vocabulary-wide KL and, in stage 2, the bf16 experts' Adafactor steps. torch.compile (inductor) fuses each chain, forward and backward, into a few
kernels. What it compiles is the code as written, unchanged: the forward of every attention and
RMSNorm class of the model (one compile per class, shared by all its layers: the modules are
graph inputs), the experts' `Pieces`, the losses' KL rows and `optim.bf16_adafactor_step` (one
graph per tensor shape). With the pieces installed the teacher's masked forward runs them too
(`hf.modeling.live_slots_forward`: every slot live) instead of transformers' eager experts. The
GEMMs, the routing and the sort stay eager.
"""
from __future__ import annotations

import types

import torch
from torch import nn

from ..hf.experts import Pieces
from .losses import kl_rows, kl_topk_rows
from .optim import bf16_adafactor_step

FUSED_CLASS_SUFFIXES = ("Attention", "RMSNorm")


def why_not_compilable(device: torch.device) -> str | None:
    """Why inductor cannot build kernels for `device` on this machine (checked before a run
    starts), or None: Triton on GPUs, a C++ compiler on CPUs."""
    if device.type == "cuda":
        from torch.utils._triton import has_triton

        return None if has_triton() else "Triton is not installed (inductor builds GPU kernels with it)"
    from torch._inductor.cpp_builder import get_cpp_compiler

    try:
        get_cpp_compiler()
    except Exception:  # noqa: BLE001 - InvalidCxxCompiler, whose module moves between torch versions
        return "no C++ compiler found (inductor builds CPU kernels with one; set CXX)"
    return None


def _compile(fn):
    return torch.compile(fn, dynamic=None)


class Fused:
    """Compiled versions of the trainer's elementwise pieces, installed on one model."""

    def __init__(self):
        self.kl_rows = _compile(kl_rows)
        self.kl_topk_rows = _compile(kl_topk_rows)
        self.pieces = type("CompiledPieces", (), {name: staticmethod(_compile(getattr(Pieces, name)))
                                                  for name in ("gather_live", "swiglu", "combine")})
        self.bf16_adafactor_step = torch.compile(bf16_adafactor_step, dynamic=False)
        self._forwards: dict[type, object] = {}

    def install(self, model: nn.Module) -> int:
        """Point `model`'s attention and RMSNorm modules at their class's compiled forward and its
        experts at the compiled pieces; the number of modules changed."""
        changed = 0
        for module in model.modules():
            cls = type(module)
            if cls.__name__.endswith(FUSED_CLASS_SUFFIXES) and "forward" in vars(cls):
                compiled = self._forwards.setdefault(cls, _compile(cls.forward))
                module.forward = types.MethodType(compiled, module)
                changed += 1
            elif hasattr(module, "gate_up_proj") and hasattr(module, "act_fn"):
                module.zeda_pieces = self.pieces
                changed += 1
        # one graph per class and shape: every batch size, chunk length and layer kind may need one
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        return changed
