"""Conversion of an HF MoE checkpoint to ZEDA: checkpoint I/O (`checkpoint`), router injection
(`inject`), checks of a converted checkpoint (`preflight`) and the CLI
(`python -m vllm_zeda.convert`, `zeda-convert`)."""
from .cli import main

__all__ = ["main"]
