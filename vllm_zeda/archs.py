"""The MoE architectures ZEDA knows, described by what conversion and serving need of them."""
from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class MoeArch:
    base_architecture: str  # the HF/vLLM class name of the unconverted model
    base_model_type: str
    always_renormalize: bool  # Mixtral renormalises unconditionally; others read norm_topk_prob
    # "softmax" (routing.route_softmax) or "sigmoid" (routing.route_sigmoid: a selection-only
    # e_score_correction_bias next to the router weight, groups and routed scaling from the config)
    scoring: str = "softmax"

    @property
    def zeda_architecture(self) -> str:
        return "Zeda" + self.base_architecture

    @property
    def zeda_model_type(self) -> str:
        return "zeda_" + self.base_model_type


ARCHS: dict[str, MoeArch] = {
    a.base_architecture: a
    for a in (
        MoeArch("Qwen3MoeForCausalLM", "qwen3_moe", always_renormalize=False),
        MoeArch("Qwen2MoeForCausalLM", "qwen2_moe", always_renormalize=False),
        MoeArch("OlmoeForCausalLM", "olmoe", always_renormalize=False),
        MoeArch("MixtralForCausalLM", "mixtral", always_renormalize=True),
        MoeArch("Glm4MoeForCausalLM", "glm4_moe", always_renormalize=False, scoring="sigmoid"),
        MoeArch("Glm4MoeLiteForCausalLM", "glm4_moe_lite", always_renormalize=False, scoring="sigmoid"),
        MoeArch("DeepseekV3ForCausalLM", "deepseek_v3", always_renormalize=False, scoring="sigmoid"),
    )
}

# The ZEDA authors' released names (their transformers/SGLang forks) for the same models.
RELEASE_ARCHITECTURES = {"Qwen3MoePlusPlusForCausalLM": "Qwen3MoeForCausalLM",
                         "Glm4MoeLitePlusPlusForCausalLM": "Glm4MoeLiteForCausalLM"}
RELEASE_MODEL_TYPES = {"qwen3_moe_plus_plus": "qwen3_moe", "glm4_moe_lite_plus_plus": "glm4_moe_lite"}

# Expert-count spellings, by meaning (transformers 5.17+ writes num_local_experts for Qwen3-MoE).
EXPERT_COUNT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts")
TOP_K_KEYS = ("num_experts_per_tok", "moe_top_k", "top_k")

# Router weights on disk: `...layers.<i>.mlp.gate.weight` (Qwen, OLMoE, transformers-5 Mixtral)
# or `...layers.<i>.block_sparse_moe.gate.weight` (Mixtral as published). `shared_expert_gate`
# and dense `gate_proj` never match.
ROUTER_KEY = re.compile(r"^(?:.*\.)?layers\.(\d+)\.(?:mlp|block_sparse_moe)\.gate\.weight$")
# The sigmoid family's selection bias, one entry per router row: `...layers.<i>.mlp.gate.e_score_correction_bias`
BIAS_KEY = re.compile(r"^(?:.*\.)?layers\.(\d+)\.mlp\.gate\.e_score_correction_bias$")


def router_layer(tensor_name: str) -> int | None:
    """Layer index if `tensor_name` is a router weight, else None."""
    m = ROUTER_KEY.match(tensor_name)
    return int(m.group(1)) if m else None


def bias_layer(tensor_name: str) -> int | None:
    """Layer index if `tensor_name` is a router's correction bias, else None."""
    m = BIAS_KEY.match(tensor_name)
    return int(m.group(1)) if m else None


def sigmoid_routing(config) -> dict:
    """The sigmoid family's routing settings from a base config (dict or transformers config):
    routing.route_sigmoid's keyword arguments. DeepSeek-V3's n_group/topk_group default to 1."""
    get = config.get if isinstance(config, dict) else lambda k, d=None: getattr(config, k, d)
    return {"scaling": float(get("routed_scaling_factor", 1.0) or 1.0), "n_group": int(get("n_group", 1) or 1),
            "topk_group": int(get("topk_group", 1) or 1)}


def arch_for_base(name: str) -> MoeArch | None:
    return ARCHS.get(RELEASE_ARCHITECTURES.get(name, name))


def arch_for_zeda(name: str) -> MoeArch | None:
    for arch in ARCHS.values():
        if name == arch.zeda_architecture:
            return arch
    return arch_for_base(name) if name in RELEASE_ARCHITECTURES else None
