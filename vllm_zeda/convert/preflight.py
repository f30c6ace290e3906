"""Fast start-up checks of a ZEDA checkpoint: fail in a second with one line, not in the engine."""
from __future__ import annotations

from pathlib import Path

import torch

from ..archs import arch_for_zeda, bias_layer, router_layer
from .checkpoint import load_config, shard_files
from ..errors import ZedaError
from ..spec import ZedaSpec, read_spec


def check_checkpoint(model: str, require_zero_experts: bool = True, check_weights: bool = True) -> ZedaSpec | None:
    """Validate config, shards and every router tensor (rows == E+Z, finite). Hub ids are skipped.
    check_weights=False (vLLM's `--load-format dummy`: random weights, none on disk) checks the
    config and its zeda block only."""
    path = Path(model)
    if not path.exists():
        if require_zero_experts and (model.startswith((".", "/")) or model.count("/") != 1):
            raise ZedaError(f"model path {model} does not exist")
        return None  # a hub id: vLLM resolves it; the model class checks it at load
    if not require_zero_experts and not (path / "config.json").is_file():
        return None  # GGUF file, Mistral-format dir...: not ours to judge
    try:
        cfg = load_config(path)
    except ZedaError:
        if require_zero_experts:
            raise
        return None  # vLLM reports its own config errors for models that are not ZEDA
    spec = read_spec(cfg)
    if spec is None:
        arch = (cfg.get("architectures") or ["?"])[0]
        if arch_for_zeda(arch) is not None:
            raise ZedaError(f"{model}: config.json names {arch} but has no 'zeda' block (nor zce_nums)")
        if require_zero_experts:
            raise ZedaError(f"--enable-zeda: {model} ({arch}) has no zero experts; convert it first with "
                            "python -m vllm_zeda.train (or vllm_zeda.convert)")
        return None
    if spec.base_architecture == "DeepseekV3ForCausalLM" and cfg.get("topk_method") != "noaux_tc":
        raise ZedaError(f'{model}: config.json needs "topk_method": "noaux_tc" (DeepSeek-V3\'s own config has it): '
                        "without it vLLM builds no e_score_correction_bias and routes by softmax")
    if not check_weights:
        return spec
    from safetensors import SafetensorError, safe_open

    shards, _ = shard_files(path)
    routers = 0
    layers_seen: set[int] = set()
    for shard in shards:
        try:
            with safe_open(path / shard, framework="pt") as f:
                for name in f.keys():
                    if bias_layer(name) is not None:
                        t = f.get_tensor(name)
                        if t.shape != (spec.num_router_rows,) or not torch.isfinite(t).all():
                            raise ZedaError(f"router bias {name} has shape {tuple(t.shape)} (or NaN/inf values) but "
                                            f"the zeda block says {spec.num_real_experts} real + "
                                            f"{spec.num_zero_experts} zero experts")
                        continue
                    if router_layer(name) is None:
                        continue
                    t = f.get_tensor(name)
                    routers += 1
                    layers_seen.add(router_layer(name))
                    if t.dim() != 2 or t.shape[0] != spec.num_router_rows:
                        raise ZedaError(f"router {name} has {t.shape[0]} rows but the zeda block says "
                                        f"{spec.num_real_experts} real + {spec.num_zero_experts} zero experts")
                    if not torch.isfinite(t).all():
                        raise ZedaError(f"router {name} holds NaN or inf values")
        except SafetensorError as exc:
            raise ZedaError(f"checkpoint shard {path / shard} is corrupt ({exc})") from None
    if routers == 0:
        raise ZedaError(f"no router weights found in {model}")
    missing = sorted(moe_layers(cfg) - layers_seen)
    if missing:
        raise ZedaError(f"{model} has no router weight for MoE layer(s) {', '.join(map(str, missing))} "
                        "(a tensor or shard is missing)")
    return spec


def moe_layers(cfg: dict) -> set[int]:
    """Layers the config says are MoE: Qwen's mlp_only_layers / decoder_sparse_step, GLM-4.7-Flash's
    mlp_layer_types ("dense" / "sparse"), GLM-4-MoE's and DeepSeek's first_k_dense_replace; else all."""
    n = cfg.get("num_hidden_layers")
    if not isinstance(n, int):
        return set()
    types = cfg.get("mlp_layer_types")
    if isinstance(types, list) and len(types) == n:
        return {i for i, t in enumerate(types) if t != "dense"}
    dense = cfg.get("mlp_only_layers") or []
    step = cfg.get("decoder_sparse_step") or 1
    first_sparse = cfg.get("first_k_dense_replace") or 0
    if not isinstance(dense, list) or not isinstance(step, int) or step < 1 or not isinstance(first_sparse, int):
        return set()
    return {i for i in range(first_sparse, n) if i not in dense and (i + 1) % step == 0}
