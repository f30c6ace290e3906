"""The converted model, built while loading the source: what convert_checkpoint would write (router
rows E..E+Z-1 and correction-bias entries drawn by the same seeded inject.extend_router_tensor,
every other tensor the source's), without a converted copy on disk. The trainer's student and stage 2's frozen teacher both load this way."""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from ..archs import bias_layer, router_layer
from ..convert.checkpoint import shard_files
from ..convert.inject import converted_config, extend_router_tensor
from ..errors import ZedaError


def converted_model_config(cfg: dict, arch, spec):
    """The transformers config of the converted model (a Zeda class's)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    from ..hf.modeling import register

    register()
    zeda_cfg = converted_config(cfg, arch, spec)
    return CONFIG_MAPPING[zeda_cfg["model_type"]].from_dict(zeda_cfg)


def empty_converted(cfg: dict, arch, spec, *, dtype: torch.dtype) -> torch.nn.Module:
    """The converted model's structure on the meta device (no memory, no weights): what FSDP2
    shards before the weights arrive."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(converted_model_config(cfg, arch, spec), dtype=dtype)


def load_converted(src: Path, cfg: dict, arch, spec, *, seed: int, dtype: torch.dtype) -> torch.nn.Module:
    from safetensors import SafetensorError, safe_open
    from transformers import AutoModelForCausalLM

    config = converted_model_config(cfg, arch, spec)
    with _quiet_transformers():  # the E+Z-row routers are "newly initialised": set right below
        model = AutoModelForCausalLM.from_pretrained(src, config=config, dtype=dtype, ignore_mismatched_sizes=True)
    routers = {r.layer_idx: r for r in model.zeda_routers}
    seen = set()
    shards, _ = shard_files(src)
    for shard in shards:
        try:
            with safe_open(src / shard, framework="pt") as f:
                for name in f.keys():
                    layer = router_layer(name)
                    bias = bias_layer(name)
                    if (layer if bias is None else bias) not in routers:
                        continue
                    grown = extend_router_tensor(name, f.get_tensor(name), spec, seed)
                    with torch.no_grad():
                        if bias is None:
                            routers[layer].weight.copy_(grown.to(dtype))
                            seen.add(layer)
                        else:  # float32, as the base model keeps it
                            routers[bias].e_score_correction_bias.copy_(grown)
        except (SafetensorError, OSError) as exc:
            raise ZedaError(f"checkpoint shard {src / shard} is corrupt ({exc})") from None
    if seen != set(routers):
        raise ZedaError(f"no router weights found in {src} for layers {sorted(set(routers) - seen)[:5]}")
    return model


@contextlib.contextmanager
def _quiet_transformers():
    from transformers.utils import logging

    level = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(level)
