"""The trainer: `python -m vllm_zeda.train` converts an HF MoE checkpoint to ZEDA and adapts it by
two-stage self-distillation from the frozen original.

`cli` (flags, entry point) -> `loop` (the run, stage by stage) over `teacher` (what each stage
distils from), `state` (resumable checkpoints), `losses` (pure loss functions), `data` (text ->
blocks), `report` (zeda_report.json / .png) and `distributed` (torchrun's ranks).
"""
from .cli import main

__all__ = ["main"]
