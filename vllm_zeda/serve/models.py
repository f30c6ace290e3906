"""ZEDA model classes for vLLM: the in-tree models, built with an E+Z-row gate and our router.

While the in-tree `__init__` runs, the model module's MoE factory is wrapped: every MoE layer is
built with a ZedaRouter (and, on GPU, routed experts that map zero experts to -1). Expert
weights keep E experts and load unchanged. The gate gets E+Z rows (the router weights on disk):
- softmax family: the module's gate class is wrapped, a gate asked for E outputs gets E+Z rows,
  unquantized whatever the engine's quantization (on a GPU with dynamic routing also the gate's
  small-batch GEMM);
- sigmoid family (GLM-4-MoE, GLM-4.7-Flash, DeepSeek-V3): the config's n_routed_experts reads E+Z
  while the model is built, so the gate (a GateLinear, or 0.26 GLM's plain nn.Linear) and its
  e_score_correction_bias get E+Z entries whatever class builds them; the factory is handed E
  experts and the bias goes to the router. Derived expert counts of the MoE blocks (EPLB's) read
  E+Z: expert-load balancing is refused with these models.
"""
from __future__ import annotations

import contextlib
import functools
import logging

from . import compat
from ..archs import sigmoid_routing
from ..spec import ZedaSpec, arch_of, read_spec
from .checks import check_parallel_layout, check_quantization, zero_slot_mode
from .router import ZedaRouter

logger = logging.getLogger("vllm.zeda")  # a child of vLLM's logger: its format and level
_LOGGED: set[str] = set()


def zeda_settings(vllm_config) -> dict:
    return dict((getattr(vllm_config, "additional_config", None) or {}).get("zeda") or {})


def gather_min_tokens(settings: dict) -> int:
    from .cpu_experts import DEFAULT_MIN_TOKENS

    return int(settings.get("gather_min_tokens", DEFAULT_MIN_TOKENS))


def _log_once(msg: str, *args) -> None:
    key = msg % args
    if key not in _LOGGED:
        _LOGGED.add(key)
        logger.info("[zeda] " + msg, *args)


@contextlib.contextmanager
def _patched(module, name, wrapper):
    original = getattr(module, name)
    setattr(module, name, wrapper(original))
    try:
        yield
    finally:
        setattr(module, name, original)


@contextlib.contextmanager
def _config_value(configs, name, value):
    """Set `name` on each (distinct) config object for the duration, then restore it."""
    configs = list({id(c): c for c in configs}.values())
    originals = [getattr(c, name) for c in configs]
    for c in configs:
        setattr(c, name, value)
    try:
        yield
    finally:
        for c, v in zip(configs, originals):
            setattr(c, name, v)


class ZedaModelMixin:
    """Mixed in before an in-tree vLLM MoE model class."""

    zeda_routers: list[ZedaRouter]

    def __init__(self, *, vllm_config, prefix: str = ""):
        hf_config = vllm_config.model_config.hf_text_config
        spec = read_spec(hf_config)
        if spec is None:
            raise ValueError(f"{type(self).__name__}: config has no zero experts (no 'zeda' block)")
        check_parallel_layout(compat.is_cpu_platform(), bool(getattr(vllm_config.parallel_config, "enable_expert_parallel", False)))
        check_quantization(compat.is_cpu_platform(), getattr(vllm_config.model_config, "quantization", None))
        settings = zeda_settings(vllm_config)
        masked = not settings.get("enabled", False)
        mode = zero_slot_mode(settings.get("zero_slots", "auto"), compat.is_cpu_platform())
        if masked:
            _log_once("zero experts are masked (static top-%d over %d real experts); pass --enable-zeda for dynamic routing",
                      spec.top_k, spec.num_real_experts)
        else:
            how = {"skip": "skipped in the fused kernel (expert map)",
                   "gather": f"skipped by gathering live slots in batches of >= {gather_min_tokens(settings)} "
                             "tokens, remapped to expert 0 (weight 0) below",
                   "remap": "remapped to expert 0 with weight 0 (exact, no saving)"}[mode]
            _log_once("dynamic routing: %d real + %d zero experts, top-%d, zero bias %.3g; zero slots %s",
                      spec.num_real_experts, spec.num_zero_experts, spec.top_k, float(settings.get("zero_bias", 0.0)), how)
        routers: list[ZedaRouter] = []
        module = compat.model_module(spec.base_architecture)
        arch = arch_of(spec)
        sigmoid = arch.scoring == "sigmoid"
        if sigmoid and getattr(vllm_config.parallel_config, "enable_eplb", False):
            raise ValueError("ZEDA checkpoints of the sigmoid family do not support expert-load balancing (--enable-eplb)")
        renormalize = arch.always_renormalize or bool(getattr(hf_config, "norm_topk_prob", False))
        groups = sigmoid_routing(hf_config) if sigmoid else {}
        groups.pop("scaling", None)  # vLLM scales the routed output itself

        def factory_wrapper(original):
            @functools.wraps(original)
            def make_moe(*args, **kwargs):
                prefix_ = kwargs.get("prefix", "")
                router = ZedaRouter(
                    layer_idx=_layer_index(prefix_),
                    top_k=spec.top_k,
                    num_real=spec.num_real_experts,
                    num_zero=spec.num_zero_experts,
                    renormalize=renormalize,
                    masked=masked,
                    zero_bias=float(settings.get("zero_bias", 0.0)),
                    zero_slots=mode,
                    scoring=arch.scoring,
                    **groups,
                )
                routers.append(router)
                kwargs["router"] = router
                if sigmoid:  # built while the config said E+Z experts: the experts are E
                    kwargs["num_experts"] = spec.num_real_experts
                    router.correction_bias = kwargs.pop("e_score_correction_bias", None)
                    if router.correction_bias is None:
                        raise ValueError(f"{prefix_}: a sigmoid-routed ZEDA layer needs e_score_correction_bias "
                                         "(DeepSeek-V3 configs: topk_method 'noaux_tc')")
                if mode == "skip" and not masked:
                    from .experts import zero_skipping_experts_kwargs

                    kwargs.update(zero_skipping_experts_kwargs(spec, router))
                elif mode == "gather" and not masked:
                    from .cpu_experts import gather_experts_kwargs

                    kwargs.update(gather_experts_kwargs(spec, gather_min_tokens(settings)))
                return original(*args, **kwargs)

            return make_moe

        with contextlib.ExitStack() as stack:
            factory_module = compat.factory_module(module)
            stack.enter_context(_patched(factory_module, compat.module_global(factory_module, compat.FACTORY_NAMES),
                                         factory_wrapper))
            if sigmoid:
                configs = (hf_config, vllm_config.model_config.hf_config)
                stack.enter_context(_config_value(configs, "n_routed_experts", spec.num_router_rows))
            else:
                gate_wrapper = functools.partial(router_gate_factory, spec=spec, small_batch=mode == "skip" and not masked)
                stack.enter_context(_patched(module, compat.module_global(module, compat.GATE_NAMES), gate_wrapper))
            super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.zeda_spec: ZedaSpec = spec
        self.zeda_routers = sorted(routers, key=lambda r: r.layer_idx)

    def zeda_stats(self) -> dict:
        layers = []
        for r in self.zeda_routers:
            zero, total = r.stats()
            layers.append({"layer": r.layer_idx, "zero_slots": zero, "total_slots": total})
        zero = sum(l["zero_slots"] for l in layers)
        total = sum(l["total_slots"] for l in layers)
        return {"zero_fraction": zero / total if total else 0.0, "layers": layers}

    def zeda_reset_stats(self) -> None:
        for r in self.zeda_routers:
            r.reset()

    def zeda_set_zero_bias(self, bias: float) -> None:
        for r in self.zeda_routers:
            r.set_zero_bias(bias)


def router_gate_factory(original, *, spec: ZedaSpec, small_batch: bool):
    """Wrap a module's gate class (softmax family): the gate asked for E outputs is built with
    E+Z rows and never quantized, whatever the engine's quantization. ZEDA routers stay in the
    checkpoint's dtype (as in Qwen's and DeepSeek's FP8 releases): online per-tensor FP8 would
    give the E+Z rows one weight scale, which the zero rows move, and with it the real rows'
    logits. `small_batch`: also the gate's small-batch GEMM (GPU, dynamic routing). Any other
    linear layer built through the class is left as asked."""

    @functools.wraps(original)
    def make_gate(input_size, output_size, *args, **kwargs):
        if output_size != spec.num_real_experts:  # another linear layer of the module
            return original(input_size, output_size, *args, **kwargs)
        if "quant_config" in kwargs:  # vLLM's gate classes take it by keyword (0.26-0.33)
            kwargs = dict(kwargs, quant_config=None)
        gate = original(input_size, spec.num_router_rows, *args, **kwargs)
        if small_batch:
            from .gate import use_small_batch_gate

            use_small_batch_gate(gate)
        return gate

    return make_gate


def _layer_index(prefix: str) -> int:
    parts = prefix.split(".")
    return int(parts[parts.index("layers") + 1]) if "layers" in parts else -1


def make_model_class(base_architecture: str) -> type:
    base = compat.base_model_class(base_architecture)
    return type("Zeda" + base.__name__, (ZedaModelMixin, base), {"__module__": __name__})


def __getattr__(name: str):
    """`vllm_zeda.serve.models:ZedaQwen3MoeForCausalLM` etc., built on first use (lazy registration)."""
    from ..archs import RELEASE_ARCHITECTURES, arch_for_zeda

    arch = arch_for_zeda(name)
    if arch is None:
        raise AttributeError(name)
    cls = make_model_class(arch.base_architecture)
    if name in RELEASE_ARCHITECTURES:
        cls = type(name, (cls,), {"__module__": __name__})
    globals()[name] = cls
    return cls
