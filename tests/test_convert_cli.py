"""`python -m vllm_zeda.convert`: bad input fails with one clear line and writes nothing."""
import json
import shutil
import subprocess
import sys

import pytest


def run_convert(src, dst, *extra):
    cmd = [sys.executable, "-m", "vllm_zeda.convert", "--model", str(src), "--output", str(dst), "--quiet", *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def assert_clean_failure(proc, dst, needle):
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert needle in lines[0], lines[0]
    assert "Traceback" not in proc.stderr + proc.stdout
    assert not dst.exists()
    assert not [p for p in dst.parent.iterdir() if p.name.startswith(f".{dst.name}.partial")]


def test_converts(tiny_models, tmp_path):
    proc = run_convert(tiny_models["olmoe"], tmp_path / "out", "--num-zero-experts", "2")
    assert proc.returncode == 0, proc.stderr
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["architectures"] == ["ZedaOlmoeForCausalLM"]
    assert cfg["zeda"]["num_real_experts"] == 8 and cfg["zeda"]["num_zero_experts"] == 2
    assert (tmp_path / "out" / "tokenizer.json").is_file()
    assert (tmp_path / "out" / "generation_config.json").is_file()


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _edit_config(d, **changes):
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(changes)
    (d / "config.json").write_text(json.dumps(cfg))


def test_dense_model(tmp_path):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    src = tmp_path / "dense"
    Qwen3ForCausalLM(Qwen3Config(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                 num_key_value_heads=1, intermediate_size=32)).save_pretrained(src)
    assert_clean_failure(run_convert(src, tmp_path / "o"), tmp_path / "o", "not a mixture-of-experts")


def test_missing_config(tiny_models, tmp_path):
    src = _copy(tiny_models["qwen3_moe"], tmp_path / "m")
    (src / "config.json").unlink()
    assert_clean_failure(run_convert(src, tmp_path / "o"), tmp_path / "o", "config.json is missing")


def test_corrupt_config(tiny_models, tmp_path):
    src = _copy(tiny_models["qwen3_moe"], tmp_path / "m")
    (src / "config.json").write_text("{not json")
    assert_clean_failure(run_convert(src, tmp_path / "o"), tmp_path / "o", "not valid JSON")


def test_missing_model_dir(tmp_path):
    assert_clean_failure(run_convert(tmp_path / "nope", tmp_path / "o"), tmp_path / "o", "does not exist")


def test_missing_shard(tiny_models, tmp_path):
    src = _copy(tiny_models["qwen3_moe"], tmp_path / "m")
    (src / "model.safetensors").rename(src / "model-00001-of-00002.safetensors")
    index = {"metadata": {}, "weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    assert_clean_failure(run_convert(src, tmp_path / "o"), tmp_path / "o", "model-00002-of-00002.safetensors is missing")


def test_corrupt_shard(tiny_models, tmp_path):
    src = _copy(tiny_models["qwen3_moe"], tmp_path / "m")
    data = (src / "model.safetensors").read_bytes()
    (src / "model.safetensors").write_bytes(data[: len(data) // 2])
    assert_clean_failure(run_convert(src, tmp_path / "o"), tmp_path / "o", "is corrupt")


@pytest.mark.parametrize("z", ["0", "-3"])
def test_bad_num_zero_experts(tiny_models, tmp_path, z):
    assert_clean_failure(run_convert(tiny_models["qwen3_moe"], tmp_path / "o", "--num-zero-experts", z), tmp_path / "o", ">= 1")


def test_unsupported_architecture(tiny_models, tmp_path):
    src = _copy(tiny_models["mixtral"], tmp_path / "m")
    _edit_config(src, architectures=["GptOssForCausalLM"], model_type="gpt_oss")
    assert_clean_failure(run_convert(src, tmp_path / "o"), tmp_path / "o", "unsupported architecture")


def test_already_converted(converted, tmp_path):
    assert_clean_failure(run_convert(converted["qwen3_moe"], tmp_path / "o"), tmp_path / "o", "already has zero experts")


def test_output_exists(tiny_models, tmp_path):
    dst = tmp_path / "exists"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    proc = run_convert(tiny_models["qwen3_moe"], dst)
    assert proc.returncode != 0 and "already exists" in proc.stderr and "Traceback" not in proc.stderr
    assert [p.name for p in dst.iterdir()] == ["keep.txt"]


@pytest.mark.parametrize("arch,release,model_type", [
    ("qwen3_moe", "Qwen3MoePlusPlusForCausalLM", "qwen3_moe_plus_plus"),
    ("glm4_moe_lite", "Glm4MoeLitePlusPlusForCausalLM", "glm4_moe_lite_plus_plus"),
])
def test_release_format_is_read(converted, tmp_path, arch, release, model_type):
    """The ZEDA authors' formats (zce_nums/zce_types/use_zce_mask) load in the same classes."""
    import torch

    from conftest import load
    from vllm_zeda.spec import read_spec

    src = _copy(converted[arch], tmp_path / "rel")
    cfg = json.loads((src / "config.json").read_text())
    base = cfg["zeda"]["base_architecture"]
    del cfg["zeda"]
    cfg.update(architectures=[release], model_type=model_type, zce_nums=[4], zce_types=["zero"], use_zce_mask=False)
    (src / "config.json").write_text(json.dumps(cfg))
    spec = read_spec(cfg)
    assert (spec.num_real_experts, spec.num_zero_experts, spec.masked_by_default) == (8, 4, False)
    assert spec.base_architecture == base
    ours, theirs = load(converted[arch]), load(src)
    assert type(theirs).__name__ == release
    ids = torch.randint(0, 256, (2, 9))
    with torch.no_grad():
        assert torch.equal(ours(ids).logits, theirs(ids).logits)


def test_grouped_routing_refuses_zero_experts_that_do_not_fill_its_groups(tiny_models, tmp_path):
    """DeepSeek-V3 routes within n_group groups of the E+Z experts: 8 + 3 do not split into 4."""
    proc = run_convert(tiny_models["deepseek_v3"], tmp_path / "o", "--num-zero-experts", "3")
    assert_clean_failure(proc, tmp_path / "o", "n_group=4")
    assert "multiple of 4" in proc.stderr
