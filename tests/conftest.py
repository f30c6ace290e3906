from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ARCHS = ["qwen3_moe", "qwen2_moe", "olmoe", "mixtral", "glm4_moe", "glm4_moe_lite", "deepseek_v3"]
SIGMOID_ARCHS = ["glm4_moe", "glm4_moe_lite", "deepseek_v3"]


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """One random tiny checkpoint (fp32) per architecture, built once per session."""
    from vllm_zeda.testing.tiny import make_tiny_moe

    root = tmp_path_factory.mktemp("tiny")
    return {arch: make_tiny_moe(root / arch, arch, seed=1) for arch in ARCHS}


@pytest.fixture(scope="session")
def converted(tiny_models, tmp_path_factory) -> dict[str, Path]:
    from vllm_zeda.convert.inject import convert_checkpoint

    root = tmp_path_factory.mktemp("zeda")
    out = {}
    for arch, src in tiny_models.items():
        convert_checkpoint(src, root / arch, num_zero_experts=4, seed=3, progress=False)
        out[arch] = root / arch
    return out


def load(path, **kw):
    import vllm_zeda  # noqa: F401  (registers the Zeda classes)
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kw).eval()
