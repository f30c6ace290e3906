"""Fused-MoE Triton tile tables shipped with vllm_zeda, for ZEDA layers only.

vLLM looks its tables up by `get_config_file_name(E, N, dtype, block_shape)` (E experts, N the
expert intermediate size, the GPU's name) in VLLM_TUNED_CONFIG_FOLDER, then in its own configs
folder, else it uses `get_default_config`. vLLM 0.26 ships a table for Qwen3-30B-A3B's expert
shape (E=128, N=768) on H200, none on H100, and GLM-4.7-Flash's (E=64, N=1536) on H100, not
H200. `moe_configs/` holds tables in vLLM's format (Qwen3's shape: H100, H200, and its 128 x 128
block FP8 form on H100; GLM's: H200), tuned with half of the slots on zero experts (the ZEDA
operating point; benchmarks/tune_moe_configs.py) among tiles at most 2% slower than stock's own at skip 0 (and
no slower, wherever such a tile costs at most 3% at the operating point), with
BLOCK_SIZE_M 16 and GROUP_SIZE_M 1 where the slot assignment is sort-free (the router's hand-over
needs the one, and triton_experts.slot_block_config runs every tile there ungrouped); above
512 tokens they reuse the configs that start-up compiles where those are within 1% (fewer
first-use Triton compiles while serving).

`zeda_moe_config` replaces `try_get_optimal_moe_config` inside ZedaTritonExperts.apply only, so
static layers and other models keep vLLM's choice. Precedence: an active `override_config`, then a
table in VLLM_TUNED_CONFIG_FOLDER (the user's), then ours, then vLLM's own search.
"""
from __future__ import annotations

import functools
import json
import os
from pathlib import Path

TABLE_DIR = Path(__file__).with_name("moe_configs")
CONFIG_KEYS = ("BLOCK_SIZE_M", "BLOCK_SIZE_N", "BLOCK_SIZE_K", "GROUP_SIZE_M", "num_warps", "num_stages")


@functools.lru_cache
def load_table(file_name: str) -> dict[int, dict] | None:
    """{batch size: config} from moe_configs/<file_name>, or None if we ship no such table."""
    path = TABLE_DIR / file_name
    if not path.is_file():
        return None
    raw = json.loads(path.read_text())
    raw.pop("triton_version", None)
    return {int(m): dict(cfg) for m, cfg in raw.items()}


def nearest(table: dict[int, dict], m: int) -> dict:
    """vLLM's rule: the entry whose batch size is closest to m (the smaller one on a tie)."""
    return table[min(table, key=lambda key: (abs(key - m), key))]


@functools.lru_cache
def shipped_table(e: int, n: int, dtype: str | None, block_shape: tuple[int, ...] | None) -> dict[int, dict] | None:
    """Our table for this expert shape on this GPU, or None: none shipped, or the user's folder
    holds one (then vLLM's own lookup finds it). Cached like vLLM's `get_moe_configs`, so the
    GPU name and the file checks run once per shape, not on every forward."""
    from vllm.model_executor.layers.fused_moe import fused_moe as fm

    name = fm.get_config_file_name(e, n, dtype, list(block_shape) if block_shape else None)
    user = os.environ.get("VLLM_TUNED_CONFIG_FOLDER")
    if user and os.path.isfile(os.path.join(user, name)):
        return None
    return load_table(name)


@functools.lru_cache(maxsize=1)
def _vllm_config_functions():
    """(get_config, fused_moe module): imported once, not in every layer of every eager forward."""
    from vllm.model_executor.layers.fused_moe import fused_moe as fm
    from vllm.model_executor.layers.fused_moe import get_config

    return get_config, fm


def zeda_moe_config(w1_shape, w2_shape, top_k, dtype, M, block_shape=None):
    """`try_get_optimal_moe_config` with vllm_zeda's tables between the user's and vLLM's."""
    get_config, fm = _vllm_config_functions()
    if get_config() is None:
        e, _, n = w2_shape
        table = shipped_table(e, n, dtype, tuple(block_shape) if block_shape else None)
        if table is not None:
            return dict(nearest(table, M), SPLIT_K=1)
    return fm.try_get_optimal_moe_config(w1_shape, w2_shape, top_k, dtype, M, block_shape=block_shape)
