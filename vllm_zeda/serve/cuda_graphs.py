"""CUDA-graph sizes for `vllm serve --enable-zeda`: graphs for mixed prefill + decode steps too.

vLLM captures CUDA graphs up to min(2 x max_num_seqs, 512) tokens by default; a larger step (most
steps of a serving load that carry a prefill chunk: `max_num_batched_tokens` is 8,192 on large
GPUs) runs eagerly, paying every MoE layer's Python and kernel launches on the host each step. A
ZEDA layer does more host work than a stock one (its routing kernel and bookkeeping), and such
steps are host-bound, so under vLLM's default sizes the plugin lost its GPU savings while serving
(H200, Qwen3-30B-A3B shape, skip 0.5: 0.974x of stock top-8, benchmarks/RESULTS.md §5.2). With
graphs up to 8,192 tokens the same load runs at 1.136x stock's speed (stock given the same
graphs), beside the ideal top-4 model at 1.128x (§5.1).

So with --enable-zeda on a GPU, unless the user chose graph sizes (or eager mode), the capture
sizes are vLLM's default ones up to 512 tokens, then four per doubling (a padded step runs at most
25% more tokens than it holds) up to `max_num_batched_tokens`, at most 16,384: a step larger than
that is GPU-bound anyway, and its graph would hold that many tokens' activations.
Measured cost at 8,192 tokens: 1.1-1.2 GiB of graph memory instead of 0.6, capture time level
(~20 s). The Python API (`LLM(...)`) is left to its caller: pass `cudagraph_capture_sizes`.
"""
from __future__ import annotations

import logging

logger = logging.getLogger("vllm.zeda")

VLLM_DEFAULT_MAX = 512  # vLLM's largest default capture size
LARGEST = 16384  # the largest size captured; vLLM's largest default max_num_batched_tokens (LLM class)


def capture_sizes(max_tokens: int = LARGEST) -> list[int]:
    """vLLM's default capture sizes up to 512 tokens (1, 2, 4, multiples of 8 to 248, of 16 to
    512), then 4 sizes per doubling (640, 768, 896, 1024, 1280, ...) up to `max_tokens`, which is
    itself included."""
    sizes = [1, 2, 4, *range(8, 256, 8), *range(256, VLLM_DEFAULT_MAX + 1, 16)]
    octave = VLLM_DEFAULT_MAX
    while octave < max_tokens:
        sizes += [octave + step * octave // 4 for step in range(1, 5)]
        octave *= 2
    return sorted({size for size in sizes if size <= max_tokens} | {max_tokens})


GRAPH_SIZE_FIELDS = ("cudagraph_capture_sizes", "max_cudagraph_capture_size")  # EngineArgs and CompilationConfig


def user_chose_graphs(engine_args) -> bool:
    """Whether the command line already decides which steps get CUDA graphs: sizes or a largest
    size (as flags or in --compilation-config), eager mode, or vLLM's "interactivity" mode (which
    sizes its own graphs, one per batch size up to 32)."""
    compilation = getattr(engine_args, "compilation_config", None)
    sized = any(getattr(holder, field, None) is not None
                for holder in (engine_args, compilation) for field in GRAPH_SIZE_FIELDS)
    return (sized or bool(getattr(engine_args, "enforce_eager", False))
            or getattr(engine_args, "performance_mode", None) == "interactivity")


def extend_for_mixed_steps(engine_args, on_cpu: bool) -> list[int] | None:
    """Give `vllm serve --enable-zeda` the capture sizes above, unless on the CPU (no CUDA graphs)
    or the user chose; returns the sizes set, or None."""
    if on_cpu or user_chose_graphs(engine_args):
        return None
    sizes = capture_sizes(min(getattr(engine_args, "max_num_batched_tokens", None) or LARGEST, LARGEST))
    engine_args.cudagraph_capture_sizes = sizes
    logger.info("[zeda] CUDA graphs up to %d tokens (mixed prefill + decode steps too; vLLM's default stops at %d): "
                "--cudagraph-capture-sizes or --max-cudagraph-capture-size choose otherwise", sizes[-1],
                VLLM_DEFAULT_MAX)
    return sizes
