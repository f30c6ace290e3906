"""Transformers classes for ZEDA checkpoints: the in-library MoE models with an E+Z-row router.

Only the router changes. Each Zeda router subclasses the architecture's own TopKRouter (so
weight init and `output_router_logits` recording keep working) and routes with
`routing.route_softmax` (Qwen-MoE, OLMoE, Mixtral) or `routing.route_sigmoid` (GLM-4-MoE,
GLM-4.7-Flash, DeepSeek-V3: its correction bias grows to E+Z entries too). Zero slots reach
transformers' experts as expert 0 with weight 0 and the experts run only the live slots
(live_slots_forward; see ZedaRouterMixin.forward for why not transformers' skip sentinel).
Modes: dynamic (zero experts live; `zero_bias` is the runtime dial) or masked (the original
static top-K).
"""
from __future__ import annotations

import functools
import types

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.conversion_mapping import get_checkpoint_conversion_mapping, register_checkpoint_conversion_mapping
from transformers.models.deepseek_v3.configuration_deepseek_v3 import DeepseekV3Config
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3ForCausalLM, DeepseekV3TopkRouter
from transformers.models.glm4_moe.configuration_glm4_moe import Glm4MoeConfig
from transformers.models.glm4_moe.modeling_glm4_moe import Glm4MoeForCausalLM, Glm4MoeTopkRouter
from transformers.models.glm4_moe_lite.configuration_glm4_moe_lite import Glm4MoeLiteConfig
from transformers.models.glm4_moe_lite.modeling_glm4_moe_lite import Glm4MoeLiteForCausalLM, Glm4MoeLiteTopkRouter
from transformers.models.mixtral.configuration_mixtral import MixtralConfig
from transformers.models.mixtral.modeling_mixtral import MixtralForCausalLM, MixtralTopKRouter
from transformers.models.olmoe.configuration_olmoe import OlmoeConfig
from transformers.models.olmoe.modeling_olmoe import OlmoeForCausalLM, OlmoeTopKRouter
from transformers.models.qwen2_moe.configuration_qwen2_moe import Qwen2MoeConfig
from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeForCausalLM, Qwen2MoeTopKRouter
from transformers.models.qwen3_moe.configuration_qwen3_moe import Qwen3MoeConfig
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeForCausalLM, Qwen3MoeTopKRouter

from ..archs import sigmoid_routing
from ..errors import ZedaError
from ..routing import Routing, route_sigmoid, route_softmax, skip_fraction
from ..spec import ZedaSpec, arch_of, read_spec
from .experts import live_experts_forward, runs_grouped


class ZedaRouterMixin:
    """forward() of a ZEDA router; mixed into a subclass of the architecture's TopKRouter."""

    cast_scores = True  # Qwen/OLMoE hand weights to experts in the logits' dtype; Mixtral in fp32

    def _zeda_setup(self, config, spec: ZedaSpec, layer_idx: int) -> None:
        self.num_real = spec.num_real_experts
        self.num_zero = spec.num_zero_experts
        self.top_k = spec.top_k
        self.layer_idx = layer_idx
        self.renormalize = arch_of(spec).always_renormalize or bool(getattr(config, "norm_topk_prob", False))
        self.weight = nn.Parameter(torch.empty(spec.num_router_rows, config.hidden_size))
        nn.init.normal_(self.weight, std=getattr(config, "initializer_range", 0.02))
        self.masked = spec.masked_by_default
        self.masked_rows: torch.Tensor | None = None  # masked mode's [E, H] rows, if not weight[:E]
        self.zero_bias = 0.0
        self._counts: torch.Tensor | None = None  # [zero slots, total slots], made on first use
        self.last_routing: Routing | None = None

    def route(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, Routing]:
        # Masked mode never looks at the zero rows: computing only the real logits keeps it
        # bit-identical to the original model (a GEMM over E+Z rows may round differently).
        # masked_rows: the trainer's stage-1 teacher routes with the original rows while the live
        # ones train (a plain attribute: no weight swap, so it works on sharded weights too).
        logits = F.linear(hidden_states.reshape(-1, self.weight.shape[1]), self.routing_rows())
        routing = route_softmax(
            logits, self.num_real, self.top_k, self.renormalize, masked=self.masked, zero_bias=self.zero_bias
        )
        return logits, routing

    def routing_rows(self) -> torch.Tensor:
        """The router rows of the current mode: all E+Z, or masked mode's E real ones."""
        if self.masked:
            return self.weight[: self.num_real] if self.masked_rows is None else self.masked_rows
        return self.weight

    def forward(self, hidden_states):
        logits, routing = self.route(hidden_states)
        with torch.no_grad():
            zero = routing.is_zero
            if self._counts is None or self._counts.device != zero.device:
                self._counts = torch.zeros(2, dtype=torch.int64, device=zero.device)
            self._counts[0] += zero.sum()
            self._counts[1] += zero.numel()
        self.last_routing = routing
        scores = routing.weights.to(logits.dtype) if self.cast_scores else routing.weights
        # Zero slots go to expert 0 with weight 0, and the experts skip weight-0 slots
        # (live_slots_forward). transformers' own skip sentinel (id E) gave nondeterministic
        # garbage gradients/NaN in 5.19 (uninitialised memory, reproduced with both the eager and
        # grouped_mm experts), so it is not used.
        ids = routing.ids.masked_fill(routing.is_zero, 0)
        return logits, scores, ids


class ZedaSigmoidRouterMixin(ZedaRouterMixin):
    """The sigmoid family's router (GLM-4-MoE, GLM-4.7-Flash, DeepSeek-V3): logits in float32 as
    the base router computes them, a selection-only correction bias of E+Z entries (a buffer, as
    in the base model: it is not trained), groups and routed scaling from the config."""

    cast_scores = False  # the base routers hand float32 weights to the experts

    def _zeda_setup(self, config, spec: ZedaSpec, layer_idx: int) -> None:
        super()._zeda_setup(config, spec, layer_idx)
        self.e_score_correction_bias = nn.Buffer(torch.zeros(spec.num_router_rows, dtype=torch.float32))
        self.sigmoid_routing = sigmoid_routing(config)

    def route(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, Routing]:
        logits = F.linear(hidden_states.reshape(-1, self.weight.shape[1]).float(), self.routing_rows().float())
        routing = route_sigmoid(logits, self.e_score_correction_bias, self.num_real, self.top_k, self.renormalize,
                                masked=self.masked, zero_bias=self.zero_bias, **self.sigmoid_routing)
        return logits, routing


class ZedaQwen3MoeRouter(ZedaRouterMixin, Qwen3MoeTopKRouter):
    pass


class ZedaQwen2MoeRouter(ZedaRouterMixin, Qwen2MoeTopKRouter):
    pass


class ZedaOlmoeRouter(ZedaRouterMixin, OlmoeTopKRouter):
    pass


class ZedaMixtralRouter(ZedaRouterMixin, MixtralTopKRouter):
    cast_scores = False


class ZedaGlm4MoeRouter(ZedaSigmoidRouterMixin, Glm4MoeTopkRouter):
    pass


class ZedaGlm4MoeLiteRouter(ZedaSigmoidRouterMixin, Glm4MoeLiteTopkRouter):
    pass


class ZedaDeepseekV3Router(ZedaSigmoidRouterMixin, DeepseekV3TopkRouter):
    pass


def live_slots_forward(experts: nn.Module, hidden_states, top_k_index, top_k_weights, *, router):
    """The experts over the slots with a nonzero weight only: a zero slot (weight 0) costs nothing,
    and the output is the same sum over each token's K slots (`experts.live_experts_forward`).
    Masked mode (`router` routes to real experts only) calls the module's own forward unchanged,
    so the original model stays bit for bit the original; except where the trainer's `--compile`
    has given the experts compiled pieces (`zeda_pieces`, train.fused): there the teacher's
    masked forward takes the same compiled live-slot path, every slot live (the same sums, in
    another order), instead of transformers' eager one."""
    if router.masked and not hasattr(experts, "zeda_pieces"):
        return type(experts).forward(experts, hidden_states, top_k_index, top_k_weights)
    return live_experts_forward(experts, hidden_states, top_k_index, top_k_weights)


class ZedaCausalLMMixin:
    """Swaps every router of the freshly built in-library model for the Zeda router."""

    zeda_router_cls: type[ZedaRouterMixin]
    # transformers decides whether a model may pick its experts implementation by grepping the
    # model's module source for the decorator; ours subclasses a module that has it, so say so.
    # Without this the Zeda classes fall back to "eager" while the base models use "grouped_mm".
    _can_set_experts_implementation_cached_value = True

    def __init__(self, config):
        super().__init__(config)
        self._install_zeda_routers(config)

    def _install_zeda_routers(self, config) -> None:
        spec = read_spec(config)
        if spec is None:
            raise ZedaError(f"{type(self).__name__} needs a config with zero experts (a 'zeda' block)")
        self.zeda_spec = spec
        base = self.zeda_router_cls.__bases__[1]  # (Zeda...RouterMixin, <arch TopKRouter>)
        for name, module in list(self.named_modules()):
            gate = getattr(module, "gate", None)
            if isinstance(gate, base) and not isinstance(gate, ZedaRouterMixin):
                layer_idx = int(name.split("layers.")[1].split(".")[0])
                router = self.zeda_router_cls(config)
                router._zeda_setup(config, spec, layer_idx)
                if not runs_grouped(module.experts):
                    raise ZedaError(f"{name}.experts ({type(module.experts).__name__}) is not transformers' fused gated "
                                    "experts layout (gate_up_proj [E, 2I, H], down_proj [E, H, I]); ZEDA cannot skip its zero slots")
                module.gate = router
                module.experts.forward = types.MethodType(functools.partial(live_slots_forward, router=router),
                                                          module.experts)

    @property
    def zeda_routers(self) -> list[ZedaRouterMixin]:
        return sorted((m for m in self.modules() if isinstance(m, ZedaRouterMixin)), key=lambda r: r.layer_idx)

    def zeda_set_mode(self, *, masked: bool | None = None, zero_bias: float | None = None) -> None:
        for r in self.zeda_routers:
            if masked is not None:
                r.masked = masked
            if zero_bias is not None:
                r.zero_bias = float(zero_bias)

    def zeda_stats(self, reset: bool = False) -> dict:
        """{"zero_fraction": x, "layers": [{"layer", "zero_slots", "total_slots", "zero_fraction"}]}"""
        layers, zero_sum, total_sum = [], 0, 0
        for r in self.zeda_routers:
            z, t = (0, 0) if r._counts is None else map(int, r._counts.tolist())
            layers.append({"layer": r.layer_idx, "zero_slots": z, "total_slots": t, "zero_fraction": skip_fraction(z, t)})
            zero_sum, total_sum = zero_sum + z, total_sum + t
            if reset:
                r._counts = None
        return {"zero_fraction": skip_fraction(zero_sum, total_sum), "layers": layers}

    def zeda_reset_stats(self) -> None:
        self.zeda_stats(reset=True)



class ZedaQwen3MoeConfig(Qwen3MoeConfig):
    model_type = "zeda_qwen3_moe"


class ZedaQwen2MoeConfig(Qwen2MoeConfig):
    model_type = "zeda_qwen2_moe"


class ZedaOlmoeConfig(OlmoeConfig):
    model_type = "zeda_olmoe"


class ZedaMixtralConfig(MixtralConfig):
    model_type = "zeda_mixtral"


class ZedaGlm4MoeConfig(Glm4MoeConfig):
    model_type = "zeda_glm4_moe"


class ZedaGlm4MoeLiteConfig(Glm4MoeLiteConfig):
    model_type = "zeda_glm4_moe_lite"


class ZedaDeepseekV3Config(DeepseekV3Config):
    model_type = "zeda_deepseek_v3"


class Qwen3MoePlusPlusConfig(Qwen3MoeConfig):
    """The ZEDA authors' released format (zce_nums / zce_types / use_zce_mask)."""

    model_type = "qwen3_moe_plus_plus"


class Glm4MoeLitePlusPlusConfig(Glm4MoeLiteConfig):
    """The ZEDA authors' released GLM-4.7-Flash format (zce_nums / zce_types / use_zce_mask)."""

    model_type = "glm4_moe_lite_plus_plus"


class ZedaQwen3MoeForCausalLM(ZedaCausalLMMixin, Qwen3MoeForCausalLM):
    config_class = ZedaQwen3MoeConfig
    zeda_router_cls = ZedaQwen3MoeRouter


class ZedaQwen2MoeForCausalLM(ZedaCausalLMMixin, Qwen2MoeForCausalLM):
    config_class = ZedaQwen2MoeConfig
    zeda_router_cls = ZedaQwen2MoeRouter


class ZedaOlmoeForCausalLM(ZedaCausalLMMixin, OlmoeForCausalLM):
    config_class = ZedaOlmoeConfig
    zeda_router_cls = ZedaOlmoeRouter


class ZedaMixtralForCausalLM(ZedaCausalLMMixin, MixtralForCausalLM):
    config_class = ZedaMixtralConfig
    zeda_router_cls = ZedaMixtralRouter


class ZedaGlm4MoeForCausalLM(ZedaCausalLMMixin, Glm4MoeForCausalLM):
    config_class = ZedaGlm4MoeConfig
    zeda_router_cls = ZedaGlm4MoeRouter


class ZedaGlm4MoeLiteForCausalLM(ZedaCausalLMMixin, Glm4MoeLiteForCausalLM):
    config_class = ZedaGlm4MoeLiteConfig
    zeda_router_cls = ZedaGlm4MoeLiteRouter


class ZedaDeepseekV3ForCausalLM(ZedaCausalLMMixin, DeepseekV3ForCausalLM):
    config_class = ZedaDeepseekV3Config
    zeda_router_cls = ZedaDeepseekV3Router


class Qwen3MoePlusPlusForCausalLM(ZedaQwen3MoeForCausalLM):
    config_class = Qwen3MoePlusPlusConfig


class Glm4MoeLitePlusPlusForCausalLM(ZedaGlm4MoeLiteForCausalLM):
    config_class = Glm4MoeLitePlusPlusConfig


# (zeda config, zeda model, base model_type whose checkpoint conversion mapping applies)
_REGISTRY = (
    (ZedaQwen3MoeConfig, ZedaQwen3MoeForCausalLM, "qwen3_moe"),
    (ZedaQwen2MoeConfig, ZedaQwen2MoeForCausalLM, "qwen2_moe"),
    (ZedaOlmoeConfig, ZedaOlmoeForCausalLM, "olmoe"),
    (ZedaMixtralConfig, ZedaMixtralForCausalLM, "mixtral"),
    (ZedaGlm4MoeConfig, ZedaGlm4MoeForCausalLM, "glm4_moe"),
    (ZedaGlm4MoeLiteConfig, ZedaGlm4MoeLiteForCausalLM, "glm4_moe_lite"),
    (ZedaDeepseekV3Config, ZedaDeepseekV3ForCausalLM, "deepseek_v3"),
    (Qwen3MoePlusPlusConfig, Qwen3MoePlusPlusForCausalLM, "qwen3_moe"),
    (Glm4MoeLitePlusPlusConfig, Glm4MoeLitePlusPlusForCausalLM, "glm4_moe_lite"),
)


def register() -> None:
    """Make AutoConfig / AutoModelForCausalLM load ZEDA checkpoints (idempotent)."""
    for cfg_cls, model_cls, base_type in _REGISTRY:
        AutoConfig.register(cfg_cls.model_type, cfg_cls, exist_ok=True)
        AutoModelForCausalLM.register(cfg_cls, model_cls, exist_ok=True)
        mapping = get_checkpoint_conversion_mapping(base_type)
        if mapping is not None:
            register_checkpoint_conversion_mapping(cfg_cls.model_type, mapping, overwrite=True)
