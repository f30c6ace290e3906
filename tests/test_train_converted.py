"""The trainer injects zero experts while loading (vllm_zeda.train.converted): the model it
trains is, tensor for tensor, the one convert_checkpoint writes, with no converted copy on disk."""
import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import ARCHS, SIGMOID_ARCHS
from vllm_zeda.convert.checkpoint import load_config
from vllm_zeda.convert.inject import convert_checkpoint, describe_source
from vllm_zeda.train.converted import load_converted


@pytest.mark.parametrize("arch", ARCHS)
def test_converted_while_loading_equals_the_written_conversion(tiny_models, tmp_path, arch):
    src = tiny_models[arch]
    cfg = load_config(src)
    base, spec = describe_source(cfg, 4, 0.5)  # 8 + 4 experts: DeepSeek-V3's 4 groups of 3
    convert_checkpoint(src, tmp_path / "z", 4, seed=7, progress=False)
    written = AutoModelForCausalLM.from_pretrained(tmp_path / "z", dtype=torch.float32).state_dict()
    loaded = load_converted(src, cfg, base, spec, seed=7, dtype=torch.float32)
    assert type(loaded).__name__ == base.zeda_architecture and loaded.config.zeda["num_zero_experts"] == 4
    got = loaded.state_dict()
    assert got.keys() == written.keys()
    assert [k for k in got if not torch.equal(got[k], written[k])] == []
    other_seed = load_converted(src, cfg, base, spec, seed=8, dtype=torch.float32).state_dict()
    grown = [k for k in got if k.endswith(("mlp.gate.weight", "mlp.gate.e_score_correction_bias"))]
    assert len(grown) == (4 if arch in SIGMOID_ARCHS else 2)  # two MoE layers: routers (and biases)
    for k in grown:
        assert torch.equal(other_seed[k][:-4], got[k][:-4]) and not torch.equal(other_seed[k], got[k])


def test_disk_plan_counts_the_output_the_trained_state_and_the_cache(tiny_models, tmp_path):
    from vllm_zeda.convert.checkpoint import shard_files
    from vllm_zeda.train import disk

    src = tiny_models["qwen3_moe"]
    sizes = disk.tensor_sizes(src, shard_files(src)[0])
    convert_checkpoint(src, tmp_path / "z", 8, progress=False)
    written = (tmp_path / "z" / "model.safetensors").stat().st_size
    p1 = disk.plan(sizes, 8, 8, stage2=False, cache_entries=0)
    assert written * 0.99 < p1.output <= written  # the file adds only its header
    routers = sum(n for name, (n, _) in sizes.items() if name.endswith("mlp.gate.weight"))
    assert p1.state == 2 * 12 * 2 * routers and p1.teacher_cache == 0  # E+Z = 2E rows, fp32 + 2 moments, twice
    p2 = disk.plan(sizes, 8, 8, stage2=True, cache_entries=1000)
    experts = sum(n for name, (n, _) in sizes.items() if ".mlp.experts." in name)
    moved = 12 * 2 * routers + 12 * experts  # AdamW: fp32 + 2 moments; saved mid-stage-2 -> twice, + stage 1's
    assert p2.state == 2 * moved + 12 * 2 * routers and p2.teacher_cache == 8000


def test_a_run_the_disk_cannot_hold_is_refused_before_anything_is_written(tiny_models, tmp_path, monkeypatch, capsys):
    import shutil
    from collections import namedtuple

    from vllm_zeda.train import main

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 10**5, 10**5))  # 100 kB free
    for extra in ([], ["--stage1-steps", "0", "--stage2-steps", "0"]):
        rc = main(["--model", str(tiny_models["qwen3_moe"]), "--output", str(tmp_path / "o"), "--quiet", *extra])
        err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
        assert rc == 2 and len(err) == 1 and "not enough disk space" in err[0] and "GB are free" in err[0], err
        assert not (tmp_path / "o").exists() and not (tmp_path / ".o.zeda-work").exists()


def test_disk_plan_counts_adafactor_and_bf16_masters(tiny_models):
    from vllm_zeda.convert.checkpoint import shard_files
    from vllm_zeda.train import disk

    sizes = disk.tensor_sizes(tiny_models["qwen3_moe"], shard_files(tiny_models["qwen3_moe"])[0])
    routers = sum(n for name, (n, _) in sizes.items() if name.endswith("mlp.gate.weight"))
    experts = sum(n for name, (n, _) in sizes.items() if ".mlp.experts." in name)
    p = disk.plan(sizes, 8, 8, stage2=True, cache_entries=0, expert_optimizer="adafactor")
    assert p.state == 2 * (12 * 2 * routers + 4 * experts) + 12 * 2 * routers
    # bf16 masters, no save inside stage 2: the end-of-training state once (2 bytes an expert weight)
    p = disk.plan(sizes, 8, 8, stage2=True, cache_entries=0, expert_optimizer="adafactor", expert_master="bfloat16",
                  saves_mid_stage2=False)
    assert p.state == (12 * 2 * routers + 2 * experts) + 12 * 2 * routers
