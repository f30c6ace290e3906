"""The in-memory description of a ZEDA checkpoint, read from either on-disk format.

Ours (config.json):   "zeda": {"format_version": 1, "base_architecture": ..., "num_real_experts": E,
                               "num_zero_experts": Z, "zero_expert_type": "zero", ...}
ZEDA's release:       "architectures": ["Qwen3MoePlusPlusForCausalLM"], "zce_nums": [Z],
                      "zce_types": ["zero"], "use_zce_mask": false
In both, the config's own expert count stays E (expert tensors are unchanged) and every router
has E + Z rows.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Mapping

from .archs import EXPERT_COUNT_KEYS, TOP_K_KEYS, MoeArch, arch_for_base, arch_for_zeda
from .errors import ZedaError

FORMAT_VERSION = 1


@dataclass(frozen=True)
class ZedaSpec:
    base_architecture: str
    num_real_experts: int
    num_zero_experts: int
    top_k: int
    zero_expert_type: str = "zero"
    target_zero_fraction: float | None = None
    masked_by_default: bool = False  # the release format's use_zce_mask

    @property
    def num_router_rows(self) -> int:
        return self.num_real_experts + self.num_zero_experts

    def to_config_block(self) -> dict[str, Any]:
        block = {"format_version": FORMAT_VERSION, **asdict(self)}
        block.pop("top_k")  # the base config already holds it
        block.pop("masked_by_default")
        return block


def first_key(cfg: Mapping[str, Any], keys: tuple[str, ...], what: str) -> int:
    for k in keys:
        v = cfg.get(k)
        if isinstance(v, int) and not isinstance(v, bool):
            return v
    raise ZedaError(f"config.json has no {what} (looked for {', '.join(keys)})")


def as_dict(config: Any) -> dict[str, Any]:
    """A plain dict of config fields from a dict or a transformers PretrainedConfig."""
    if isinstance(config, Mapping):
        return dict(config)
    d = dict(vars(config))
    # attribute_map aliases (num_experts <-> num_local_experts) are not in vars()
    for alias in (*EXPERT_COUNT_KEYS, *TOP_K_KEYS):
        if alias not in d:
            try:
                d[alias] = getattr(config, alias)
            except AttributeError:
                pass
    return d


def read_spec(config: Any) -> ZedaSpec | None:
    """The ZEDA description of a config, or None if it has no zero experts at all."""
    cfg = as_dict(config)
    block = cfg.get("zeda")
    archs = cfg.get("architectures") or []
    if block is not None:
        return _from_block(cfg, block)
    if "zce_nums" in cfg:
        return _from_release(cfg, archs)
    return None


def _from_block(cfg: dict, block: Any) -> ZedaSpec:
    if not isinstance(block, Mapping):
        raise ZedaError("config.json 'zeda' block is not an object")
    version = block.get("format_version")
    if version != FORMAT_VERSION:
        raise ZedaError(f"config.json 'zeda' block has format_version {version!r}; this vllm-zeda reads {FORMAT_VERSION}")
    try:
        base = str(block["base_architecture"])
        e = int(block["num_real_experts"])
        z = int(block["num_zero_experts"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ZedaError(f"config.json 'zeda' block is incomplete or malformed ({exc!s})") from None
    cfg_e = first_key(cfg, EXPERT_COUNT_KEYS, "expert count")
    if cfg_e != e:
        raise ZedaError(f"config.json 'zeda' block says {e} real experts but the model config says {cfg_e}")
    target = block.get("target_zero_fraction")
    spec = ZedaSpec(
        base_architecture=base,
        num_real_experts=e,
        num_zero_experts=z,
        top_k=first_key(cfg, TOP_K_KEYS, "top-k (num_experts_per_tok)"),
        zero_expert_type=str(block.get("zero_expert_type", "zero")),
        target_zero_fraction=None if target is None else float(target),
    )
    return validate(spec)


def _from_release(cfg: dict, archs: list) -> ZedaSpec:
    nums, types = cfg.get("zce_nums") or [], cfg.get("zce_types") or []
    if not isinstance(nums, list) or not all(isinstance(n, int) for n in nums):
        raise ZedaError("config.json 'zce_nums' must be a list of integers")
    if len(types) != len(nums):
        raise ZedaError("config.json 'zce_types' and 'zce_nums' differ in length")
    if set(types) - {"zero"}:
        raise ZedaError(f"zero-compute expert types {sorted(set(types) - {'zero'})} are not supported (only 'zero')")
    arch = arch_for_zeda(archs[0]) if archs else None
    if arch is None:
        raise ZedaError(f"unsupported architecture {archs[0] if archs else None!r} for a ZEDA release checkpoint")
    return validate(
        ZedaSpec(
            base_architecture=arch.base_architecture,
            num_real_experts=first_key(cfg, EXPERT_COUNT_KEYS, "expert count"),
            num_zero_experts=sum(nums),
            top_k=first_key(cfg, TOP_K_KEYS, "top-k (num_experts_per_tok)"),
            masked_by_default=bool(cfg.get("use_zce_mask", False)),
        )
    )


def validate(spec: ZedaSpec) -> ZedaSpec:
    if arch_for_base(spec.base_architecture) is None:
        raise ZedaError(f"unsupported base architecture {spec.base_architecture!r}")
    if spec.num_real_experts < 1:
        raise ZedaError(f"num_real_experts must be >= 1, got {spec.num_real_experts}")
    if spec.num_zero_experts < 1:
        raise ZedaError(f"num_zero_experts must be >= 1, got {spec.num_zero_experts}")
    if not 1 <= spec.top_k <= spec.num_real_experts:
        raise ZedaError(f"top-k {spec.top_k} must be between 1 and the {spec.num_real_experts} real experts")
    if spec.zero_expert_type != "zero":
        raise ZedaError(f"zero_expert_type {spec.zero_expert_type!r} is not supported (only 'zero')")
    t = spec.target_zero_fraction
    if t is not None and not (0.0 < t < 1.0 and math.isfinite(t)):
        raise ZedaError(f"target_zero_fraction must be in (0, 1), got {t}")
    return spec


def arch_of(spec: ZedaSpec) -> MoeArch:
    arch = arch_for_base(spec.base_architecture)
    assert arch is not None  # validate() checked
    return arch
