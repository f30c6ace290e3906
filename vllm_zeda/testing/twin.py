"""The zero-expert twin of a ZEDA checkpoint: a stock checkpoint of the base architecture with
E+Z real experts, the Z extra ones all-zero weights, and the ZEDA router rows and correction-bias
entries as its own. Stock top-K routing over E+Z experts then computes what ZEDA's dynamic
routing computes (a zero expert's slot keeps its share of the renormalisation and adds nothing),
with no code of ours: an independent check of the HF classes and the vLLM plugin.
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..archs import EXPERT_COUNT_KEYS
from ..spec import arch_of, read_spec

_EXPERT_ZERO = re.compile(r"^(.*\.layers\.\d+\.(?:mlp|block_sparse_moe)\.experts\.)0\.(.+)$")


def zero_expert_twin(zeda_dir: str | Path, out_dir: str | Path) -> Path:
    """Write the twin of the (single-shard) ZEDA checkpoint `zeda_dir` to `out_dir`."""
    src, out = Path(zeda_dir), Path(out_dir)
    cfg = json.loads((src / "config.json").read_text())
    spec = read_spec(cfg)
    assert spec is not None, f"{src} is not a ZEDA checkpoint"
    arch = arch_of(spec)
    e, z = spec.num_real_experts, spec.num_zero_experts
    tensors = load_file(src / "model.safetensors")
    for name, t in list(tensors.items()):
        m = _EXPERT_ZERO.match(name)
        if m:
            for i in range(e, e + z):
                tensors[f"{m.group(1)}{i}.{m.group(2)}"] = torch.zeros_like(t)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    cfg.pop("zeda")
    cfg["architectures"], cfg["model_type"] = [arch.base_architecture], arch.base_model_type
    for key in EXPERT_COUNT_KEYS:
        if key in cfg:
            cfg[key] = e + z
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    for p in src.iterdir():
        if p.is_file() and p.name not in ("config.json", "model.safetensors"):
            shutil.copy2(p, out / p.name)
    return out
