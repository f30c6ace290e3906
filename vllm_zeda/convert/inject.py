"""Zero-expert injection: an HF MoE checkpoint in, the same checkpoint with E+Z router rows out.

Streams shard by shard (peak memory ~ one shard), writes into a temporary directory and renames
it at the end, so an interrupted or failed run leaves nothing behind.
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from ..archs import EXPERT_COUNT_KEYS, TOP_K_KEYS, MoeArch, arch_for_base, bias_layer, router_layer, sigmoid_routing
from .checkpoint import CONFIG, INDEX, atomic_output_dir, load_config, shard_files
from ..errors import ZedaError
from ..spec import ZedaSpec, first_key, read_spec, validate


def zero_expert_rows(router: torch.Tensor, num_zero: int, generator: torch.Generator) -> torch.Tensor:
    """Z new router rows ~ N(mean, std) of the existing rows, per hidden dimension (float32 math)."""
    real = router.float()
    mean, std = real.mean(dim=0), real.std(dim=0)
    noise = torch.randn(num_zero, real.shape[1], generator=generator, dtype=torch.float32)
    return (mean + std * noise).to(router.dtype)


def extend_router(router: torch.Tensor, num_zero: int, seed: int, layer: int) -> torch.Tensor:
    """[E, H] -> [E+Z, H]; rows 0..E-1 are the original tensor, bit for bit."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + layer)
    return torch.cat([router, zero_expert_rows(router, num_zero, gen)], dim=0)


def extend_bias(bias: torch.Tensor, num_zero: int, seed: int, layer: int) -> torch.Tensor:
    """A sigmoid router's correction bias [E] -> [E+Z]: entries 0..E-1 bit for bit, the new ones
    ~ N(mean, std) of the existing entries (the ZEDA authors' rule for a 1-D tensor), seeded
    apart from the router rows."""
    gen = torch.Generator().manual_seed((seed * 1_000_003 + layer) ^ 0x5EED_B1A5)
    real = bias.float()
    new = real.mean() + real.std() * torch.randn(num_zero, generator=gen, dtype=torch.float32)
    return torch.cat([bias, new.to(bias.dtype)])


def extend_router_tensor(name: str, t: torch.Tensor, spec: ZedaSpec, seed: int) -> torch.Tensor | None:
    """The converted form of a router weight or correction bias, or None for any other tensor."""
    e, z = spec.num_real_experts, spec.num_zero_experts
    layer = router_layer(name)
    if layer is not None and t.is_floating_point() and t.element_size() == 1:
        raise ZedaError(f"router {name} is quantized ({t.dtype}): conversion grows the router's rows, so the source "
                        "must keep its routers unquantized (Qwen's and DeepSeek's FP8 releases do)")
    if layer is not None:
        if t.dim() != 2 or t.shape[0] != e:
            raise ZedaError(f"router {name} has shape {tuple(t.shape)}, expected ({e}, hidden)")
        return extend_router(t, z, seed, layer)
    layer = bias_layer(name)
    if layer is not None:
        if t.shape != (e,):
            raise ZedaError(f"router bias {name} has shape {tuple(t.shape)}, expected ({e},)")
        return extend_bias(t, z, seed, layer)
    return None


SUPPORTED_NAMES = "Qwen3-MoE, Qwen2-MoE, OLMoE, Mixtral, GLM-4-MoE (GLM-4.5/4.6), GLM-4.7-Flash (glm4_moe_lite), DeepSeek-V3"


def describe_source(cfg: dict, num_zero_experts: int | None, target_zero_fraction: float | None) -> tuple[MoeArch, ZedaSpec]:
    """Check the source config is a supported, unconverted MoE and build the spec to write."""
    if read_spec(cfg) is not None:
        raise ZedaError("the model already has zero experts (it is a ZEDA checkpoint); convert the original instead")
    archs = cfg.get("architectures") or []
    name = archs[0] if archs else cfg.get("model_type", "?")
    arch = arch_for_base(name) if archs else None
    if arch is None:
        has_experts = any(isinstance(cfg.get(k), int) and cfg[k] > 0 for k in EXPERT_COUNT_KEYS)
        if not has_experts:
            raise ZedaError(f"{name} is not a mixture-of-experts model (no expert count in config.json)")
        raise ZedaError(f"unsupported architecture {name!r}; supported: {SUPPORTED_NAMES}")
    e = first_key(cfg, EXPERT_COUNT_KEYS, "expert count")
    if e < 1:
        raise ZedaError(f"{name} is not a mixture-of-experts model (expert count {e})")
    z = e // 2 if num_zero_experts is None else num_zero_experts
    spec = ZedaSpec(
        base_architecture=arch.base_architecture,
        num_real_experts=e,
        num_zero_experts=z,
        top_k=first_key(cfg, TOP_K_KEYS, "top-k (num_experts_per_tok)"),
        target_zero_fraction=target_zero_fraction,
    )
    if arch.scoring == "sigmoid":
        groups = sigmoid_routing(cfg)["n_group"]
        if spec.num_router_rows % groups:
            raise ZedaError(f"{e} + {z} experts do not split into the model's n_group={groups} groups; "
                            f"choose --num-zero-experts so that E + Z is a multiple of {groups}")
    return arch, validate(spec)


def converted_config(cfg: dict, arch: MoeArch, spec: ZedaSpec) -> dict:
    out = dict(cfg)
    out["architectures"] = [arch.zeda_architecture]
    out["model_type"] = arch.zeda_model_type
    out["zeda"] = spec.to_config_block()
    return out


def convert_checkpoint(
    src: str | Path,
    dst: str | Path,
    num_zero_experts: int | None = None,
    *,
    seed: int = 0,
    target_zero_fraction: float | None = 0.5,
    progress: bool = True,
) -> ZedaSpec:
    src, dst = Path(src), Path(dst)
    cfg = load_config(src)
    arch, spec = describe_source(cfg, num_zero_experts, target_zero_fraction)
    shards, index = shard_files(src)
    routers_seen: set[int | None] = set()
    total_size = 0
    with atomic_output_dir(dst) as tmp:
        for shard in tqdm(shards, desc="injecting zero experts", unit="shard", disable=not progress):
            try:
                tensors = load_file(src / shard)
            except (SafetensorError, OSError, ValueError) as exc:
                raise ZedaError(f"checkpoint shard {src / shard} is corrupt ({exc})") from None
            for name, t in tensors.items():
                grown = extend_router_tensor(name, t, spec, seed)
                if grown is not None:
                    tensors[name] = grown
                    routers_seen.add(router_layer(name))
            total_size += sum(t.numel() * t.element_size() for t in tensors.values())
            save_file(tensors, tmp / shard, metadata={"format": "pt"})
            del tensors
        routers_seen.discard(None)  # biases
        if not routers_seen:
            raise ZedaError(f"no router weights (layers.<i>.mlp.gate.weight) found in {src}")
        if index is not None:
            index = {**index, "metadata": {**index.get("metadata", {}), "total_size": total_size}}
            (tmp / INDEX).write_text(json.dumps(index, indent=2))
        (tmp / CONFIG).write_text(json.dumps(converted_config(cfg, arch, spec), indent=2) + "\n")
        copy_side_files(src, tmp, skip=set(shards) | {CONFIG, INDEX})
    return spec


EXTRA_SHARD = "model-unbuilt-layers.safetensors"
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def carry_unbuilt_layers(src: Path, dst: Path, cfg: dict, spec: ZedaSpec, seed: int) -> list[str]:
    """Copy into `dst` (a checkpoint transformers just wrote) the source's tensors of layers past
    num_hidden_layers, which transformers does not build and so never writes: GLM-4.7-Flash's and
    DeepSeek-V3's multi-token-prediction layer. Their routers grow as conversion grows them. They
    go to one more shard, listed in the weight index (made if dst had none). Returns their names."""
    n_layers = cfg.get("num_hidden_layers")
    if not isinstance(n_layers, int):
        return []
    extra: dict[str, torch.Tensor] = {}
    shards, _ = shard_files(src)
    for shard in shards:
        with safe_open(src / shard, framework="pt") as f:
            for name in f.keys():
                m = _LAYER.search(name)
                if m and int(m.group(1)) >= n_layers:
                    t = f.get_tensor(name)
                    grown = extend_router_tensor(name, t, spec, seed)
                    extra[name] = t if grown is None else grown
    if not extra:
        return []
    save_file(extra, dst / EXTRA_SHARD, metadata={"format": "pt"})
    written, index = shard_files(dst)
    if index is None:  # one shard: an index over it and the new one
        with safe_open(dst / written[0], framework="pt") as f:
            index = {"metadata": {}, "weight_map": {name: written[0] for name in f.keys()}}
    index["weight_map"].update({name: EXTRA_SHARD for name in extra})
    size = sum(t.numel() * t.element_size() for t in extra.values())
    index["metadata"]["total_size"] = index["metadata"].get("total_size", 0) + size
    (dst / INDEX).write_text(json.dumps(index, indent=2))
    return sorted(extra)


def copy_side_files(src: Path, dst: Path, skip: set[str]) -> None:
    """Tokenizer, generation config, chat template, README...: everything but weights, config,
    weight index and the names in `skip`."""
    for p in src.iterdir():
        if (p.name in skip | {CONFIG, INDEX} or p.name.startswith(".")
                or p.suffix in (".safetensors", ".bin", ".pt")):
            continue
        if p.is_file():
            shutil.copy2(p, dst / p.name)
