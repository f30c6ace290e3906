"""`python -m vllm_zeda.train` end to end on tiny random Qwen3-MoE checkpoints (CPU, ~2-3 min).

The main run uses Z = E = 8: random router rows drawn like the real ones give a held-out zero
fraction near 0.5 right after injection, so the KL checks compare at equal skip rates.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import load
from vllm_zeda.train import loop, main

ROOT = Path(__file__).resolve().parents[1]
BASE = ["--seq-len", "64", "--batch-size", "8", "--quiet", "--no-plot"]
MAIN_RUN = ["--num-zero-experts", "8", "--stage1-steps", "60", "--stage2-steps", "30", "--eval-every", "30"]


def train(src, out, *extra, plot=False):
    args = ["--model", str(src), "--output", str(out), *BASE, *extra]
    if plot:
        args.remove("--no-plot")
    rc = main(args)
    assert rc == 0
    return json.loads((Path(out) / "zeda_report.json").read_text())


def train_subprocess(src, out, *extra, env=None, launcher=None):
    cmd = [*(launcher or [sys.executable, "-m"]), "vllm_zeda.train", "--model", str(src), "--output", str(out), *BASE, *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT, env={**os.environ, **(env or {})})


def weights(path):
    return load_file(Path(path) / "model.safetensors")


@pytest.fixture(scope="module")
def trained(tiny_models, tmp_path_factory):
    out = tmp_path_factory.mktemp("train") / "zeda"
    report = train(tiny_models["qwen3_moe"], out, *MAIN_RUN, plot=True)
    return out, report


@pytest.mark.slow
def test_stage1_and_stage2_on_demo_corpus(trained):
    _, r = trained
    inj, s1, s2 = r["after_injection"], r["after_stage1"], r["after_stage2"]
    print(f"\nzero fraction {inj['zero_fraction']:.3f} -> {s1['zero_fraction']:.3f} -> {s2['zero_fraction']:.3f}; "
          f"KL {inj['teacher_kl']:.5f} -> {s1['teacher_kl']:.5f} -> {s2['teacher_kl']:.5f}")
    assert abs(s1["zero_fraction"] - 0.5) < 0.05
    assert s1["teacher_kl"] < inj["teacher_kl"]
    assert s2["teacher_kl"] < s1["teacher_kl"]
    assert abs(s2["zero_fraction"] - 0.5) < 0.05 and abs(s2["zero_fraction"] - s1["zero_fraction"]) < 0.05
    assert r["zero_fraction"] == s2["zero_fraction"] and r["teacher_kl"] == s2["teacher_kl"]
    assert r["stage1_steps"] == 60 and r["stage2_steps"] == 30 and r["target_zero_fraction"] == 0.5
    assert [d["layer"] for d in r["layers"]] == [0, 1]
    for stage, steps in (("stage1", 60), ("stage2", 30)):  # speed over every step but the first
        sp = r["throughput"][stage]
        assert sp["steps_timed"] == steps - 1 and sp["tokens_per_step"] == 8 * 64
        # the report's arithmetic, not a speed: how fast it ran is for benchmarks/
        assert sp["tokens_per_s"] == pytest.approx(sp["steps_timed"] * sp["tokens_per_step"] / sp["seconds"], rel=1e-2)
        assert sp["tokens_per_s_per_process"] == sp["tokens_per_s"]


@pytest.mark.slow
def test_output_is_a_zeda_checkpoint_that_reproduces_the_report(trained, tiny_models, converted, tmp_path):
    out, r = trained
    src = tiny_models["qwen3_moe"]
    # same tensor names and shapes as the converter writes (per-expert names, E+Z router rows)
    from vllm_zeda.convert.inject import convert_checkpoint

    convert_checkpoint(src, tmp_path / "conv", 8, progress=False)
    got, ref, orig = weights(out), weights(tmp_path / "conv"), weights(src)
    assert {k: v.shape for k, v in got.items()} == {k: v.shape for k, v in ref.items()}
    assert got["model.layers.0.mlp.gate.weight"].shape == (16, 64)
    assert "model.layers.0.mlp.experts.7.down_proj.weight" in got
    # attention, embeddings, norms, lm_head: bit-identical to the source; routers and experts moved
    for k, v in orig.items():
        if ".mlp." not in k:
            assert torch.equal(got[k], v), k
    assert not torch.equal(got["model.layers.1.mlp.experts.3.up_proj.weight"], orig["model.layers.1.mlp.experts.3.up_proj.weight"])
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["ZedaQwen3MoeForCausalLM"] and cfg["zeda"]["num_zero_experts"] == 8
    assert (out / "tokenizer.json").is_file() and (out / "zeda_report.png").stat().st_size > 10_000
    assert len((out / "metrics.jsonl").read_text().splitlines()) >= 90
    assert not (out.parent / f".{out.name}.zeda-work").exists()  # cleaned up after success

    # load with the HF classes, run the held-out blocks: the logged zero fraction comes back
    from transformers import AutoTokenizer

    from vllm_zeda.train.data import load_blocks

    model = load(out)
    heldout = load_blocks(None, AutoTokenizer.from_pretrained(out), 64, seed=0).heldout
    model.zeda_stats(reset=True)
    with torch.no_grad():
        for chunk in heldout.split(8):
            model(input_ids=chunk)
    stats = model.zeda_stats()
    assert stats["zero_fraction"] == pytest.approx(r["zero_fraction"], abs=1e-6)
    for mine, logged in zip(stats["layers"], r["layers"]):
        assert mine["zero_fraction"] == pytest.approx(logged["zero_fraction"], abs=1e-6)


@pytest.mark.slow
def test_stage1_drives_zero_fraction_up_to_target(tiny_models, tmp_path):
    """Z = E/2 (the default) starts near 1/3 skipped; stage 1 brings it to the 0.5 target."""
    r = train(tiny_models["qwen3_moe"], tmp_path / "o", "--num-zero-experts", "4", "--stage1-steps", "60", "--stage2-steps", "0")
    assert r["after_injection"]["zero_fraction"] < 0.4
    assert abs(r["after_stage1"]["zero_fraction"] - 0.5) < 0.05
    assert r["after_stage2"] == r["after_stage1"]


@pytest.mark.parametrize("arch", ["glm4_moe_lite", "deepseek_v3"])
def test_sigmoid_family_trains_to_the_target_with_the_bias_frozen(arch, tiny_models, tmp_path):
    """GLM-4.7-Flash / DeepSeek-V3 routing: both stages train, the zero fraction reaches the
    target, and the correction bias stays what the injection drew (the ZEDA authors train with
    `--moe-router-bias-update-rate 0`: a frozen buffer) while router rows and experts move."""
    from vllm_zeda.convert.inject import convert_checkpoint

    r = train(tiny_models[arch], tmp_path / "o", "--num-zero-experts", "4", "--stage1-steps", "40", "--stage2-steps", "4")
    assert abs(r["after_stage2"]["zero_fraction"] - 0.5) < 0.1 and r["after_injection"]["zero_fraction"] < 0.4
    convert_checkpoint(tiny_models[arch], tmp_path / "ref", 4, progress=False)
    got, injected = weights(tmp_path / "o"), weights(tmp_path / "ref")
    assert got.keys() == injected.keys()
    biases = [k for k in got if k.endswith("e_score_correction_bias")]
    assert len(biases) == 2 and all(got[k].shape == (12,) and torch.equal(got[k], injected[k]) for k in biases)
    moved = [k for k in got if not torch.equal(got[k], injected[k])]
    assert any(k.endswith("mlp.gate.weight") for k in moved) and any(".experts." in k for k in moved)
    assert all(k.endswith("mlp.gate.weight") or ".experts." in k or ".shared_experts." in k for k in moved)  # MoE blocks only


def test_trained_output_keeps_the_layers_transformers_does_not_build(tiny_models, tmp_path):
    """A multi-token-prediction layer past num_hidden_layers (GLM-4.7-Flash's layer 47,
    DeepSeek-V3's 61): transformers never builds it, the trainer's output still carries it, its
    router and bias grown as conversion grows them, listed in the weight index."""
    from safetensors.torch import save_file

    from vllm_zeda.convert.inject import convert_checkpoint

    src = tmp_path / "src"
    shutil.copytree(tiny_models["deepseek_v3"], src)
    tensors = weights(src)
    g = torch.Generator().manual_seed(5)
    mtp = {"model.layers.3.eh_proj.weight": torch.randn(64, 128, generator=g),
           "model.layers.3.mlp.gate.weight": torch.randn(8, 64, generator=g),
           "model.layers.3.mlp.gate.e_score_correction_bias": torch.randn(8, generator=g)}
    save_file({**tensors, **mtp}, src / "model.safetensors", metadata={"format": "pt"})
    train(src, tmp_path / "o", "--num-zero-experts", "4", "--stage1-steps", "2", "--stage2-steps", "1")
    convert_checkpoint(src, tmp_path / "ref", 4, progress=False)
    out, ref = tmp_path / "o", weights(tmp_path / "ref")
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    extra = load_file(out / index["model.layers.3.eh_proj.weight"])
    assert sorted(extra) == sorted(mtp) and set(index.values()) == {"model.safetensors", "model-unbuilt-layers.safetensors"}
    assert all(torch.equal(extra[k], ref[k]) for k in mtp)  # grown exactly as the converter grows them
    assert extra["model.layers.3.mlp.gate.weight"].shape == (12, 64)
    assert set(index) == set(weights(out)) | set(mtp)


def test_convert_only(tiny_models, tmp_path):
    from vllm_zeda.convert.inject import convert_checkpoint

    assert main(["--model", str(tiny_models["olmoe"]), "--output", str(tmp_path / "o"), "--stage1-steps", "0",
                 "--stage2-steps", "0", "--num-zero-experts", "2", "--quiet"]) == 0
    convert_checkpoint(tiny_models["olmoe"], tmp_path / "ref", 2, progress=False)
    a, b = weights(tmp_path / "o"), weights(tmp_path / "ref")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


SHORT = ["--num-zero-experts", "8", "--stage1-steps", "8", "--stage2-steps", "6", "--eval-every", "4"]


@pytest.mark.slow
def test_kill_and_resume_gives_identical_weights(tiny_models, tmp_path):
    src = tiny_models["qwen3_moe"]
    full = train_subprocess(src, tmp_path / "full", *SHORT)
    assert full.returncode == 0, full.stderr
    out = tmp_path / "resumed"
    # killed (os._exit, like kill -9) mid stage 1, between checkpoints; again mid stage 2
    killed = train_subprocess(src, out, *SHORT, "--save-every", "3", env={"ZEDA_TRAIN_KILL_AT": "1:5"})
    assert killed.returncode == 137 and not out.exists()
    again = train_subprocess(src, out, *SHORT, "--save-every", "3")
    assert again.returncode != 0 and "--resume" in again.stderr  # refuses to silently start over
    killed = train_subprocess(src, out, *SHORT, "--save-every", "3", "--resume", env={"ZEDA_TRAIN_KILL_AT": "2:4"})
    assert killed.returncode == 137 and "resuming at stage 1, step 3" in killed.stdout
    done = train_subprocess(src, out, *SHORT, "--save-every", "3", "--resume")
    assert done.returncode == 0 and "resuming at stage 2, step 3" in done.stdout, done.stderr
    a, b = weights(tmp_path / "full"), weights(out)
    assert all(torch.equal(a[k], b[k]) for k in a)
    ra, rb = (json.loads((p / "zeda_report.json").read_text()) for p in (tmp_path / "full", out))
    assert ra["after_stage2"] == rb["after_stage2"] and ra["after_injection"] == rb["after_injection"]
    steps = [(m["stage"], m["step"]) for m in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if m["event"] == "train"]
    assert steps == [(1, i) for i in range(1, 9)] + [(2, i) for i in range(1, 7)]  # no duplicates after resume


TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m"]  # a free port


@pytest.mark.slow
def test_torchrun_fsdp2_matches_one_process_and_resumes_exactly(tiny_models, tmp_path):
    """Two gloo processes, the model sharded with FSDP2 (4 blocks each a step) train the weights
    one process trains on 8 blocks a step; killed mid-stage 2 they resume from their
    torch.distributed.checkpoint shards to the uninterrupted run's weights, bit for bit."""
    src = tiny_models["qwen3_moe"]
    run = [*SHORT, "--teacher-cache", "--teacher-topk", "400", "--save-every", "2"]  # top-400: the whole vocabulary
    one = train(src, tmp_path / "one", *run)
    proc = train_subprocess(src, tmp_path / "two", *run, "--batch-size", "4", launcher=TORCHRUN)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = json.loads((tmp_path / "two" / "zeda_report.json").read_text())
    assert two["world_size"] == 2
    sp = two["throughput"]["stage1"]  # 2 x 4 blocks of 64 tokens a step, shared by two processes
    assert sp["tokens_per_step"] == 512 and sp["tokens_per_s_per_process"] == pytest.approx(sp["tokens_per_s"] / 2, abs=0.1)
    a, b = weights(tmp_path / "one"), weights(tmp_path / "two")
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-4, rtol=1e-4), k
    assert not torch.equal(b["model.layers.0.mlp.gate.weight"][:8], weights(src)["model.layers.0.mlp.gate.weight"])
    assert two["zero_fraction"] == pytest.approx(one["zero_fraction"], abs=0.01)
    assert two["teacher_kl"] == pytest.approx(one["teacher_kl"], rel=1e-3)

    killed = train_subprocess(src, tmp_path / "killed", *run, "--batch-size", "4", launcher=TORCHRUN,
                              env={"ZEDA_TRAIN_KILL_AT": "2:3"})
    work = tmp_path / ".killed.zeda-work"
    dirs = [d.name for d in work.glob("*.dcp")]
    assert killed.returncode != 0 and dirs == ["trainer_state.s2-2.dcp"], (dirs, killed.stderr[-3000:])
    resumed = train_subprocess(src, tmp_path / "killed", *run, "--batch-size", "4", "--resume", launcher=TORCHRUN)
    assert resumed.returncode == 0 and "resuming at stage 2, step 2" in resumed.stdout, resumed.stderr[-3000:]
    c = weights(tmp_path / "killed")
    assert all(torch.equal(b[k], c[k]) for k in b), max((b[k] - c[k]).abs().max().item() for k in b)


@pytest.mark.slow
def test_torchrun_fsdp2_trains_the_sigmoid_family_like_one_process(tiny_models, tmp_path):
    """DeepSeek-V3 (MLA attention, grouped sigmoid routing, the correction bias a buffer that
    FSDP2 must carry from rank 0): two gloo processes give the one-process weights."""
    src = tiny_models["deepseek_v3"]
    run = ["--num-zero-experts", "4", "--stage1-steps", "6", "--stage2-steps", "4", "--teacher-cache",
           "--teacher-topk", "400"]
    one = train(src, tmp_path / "one", *run)
    proc = train_subprocess(src, tmp_path / "two", *run, "--batch-size", "4", launcher=TORCHRUN)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = weights(tmp_path / "one"), weights(tmp_path / "two")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-4, rtol=1e-4), k
    assert all(torch.equal(a[k], b[k]) for k in a if k.endswith("e_score_correction_bias"))
    two = json.loads((tmp_path / "two" / "zeda_report.json").read_text())
    assert two["world_size"] == 2 and two["zero_fraction"] == pytest.approx(one["zero_fraction"], abs=0.01)


TEARDOWN_PROBE = """
import gc, sys
from vllm_zeda.train.cli import build_parser, check_args, resolve_auto
from vllm_zeda.train.distributed import Dist
from vllm_zeda.train.loop import train

def main():
    args = build_parser().parse_args(sys.argv[1:])
    check_args(args)
    dist = Dist(args.device)
    resolve_auto(args, dist)
    train(args, dist)
    gc.collect()
    alive = sum(type(o).__name__ == "FSDPParamGroup" for o in gc.get_objects())
    print(f"rank {dist.rank}: FSDP2 groups alive after train() and gc: {alive}", flush=True)
    dist.close()

main()
"""


@pytest.mark.slow
def test_torchrun_frees_the_sharded_model_before_the_process_group_goes(tiny_models, tmp_path):
    """After train() nothing holds the FSDP2 model (whose modules hold the process group), so
    destroy_process_group is the group's end and its gloo threads do not live on into
    interpreter shutdown, where they can abort a process after a good run. Router logits kept
    past their step would tie the model into a cycle through the autograd graph that no
    garbage collection frees."""
    probe = tmp_path / "probe.py"
    probe.write_text(TEARDOWN_PROBE)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(probe)]
    cmd = [*launcher, "--model", str(tiny_models["qwen3_moe"]), "--output", str(tmp_path / "out"), *BASE,
           "--stage1-steps", "2", "--stage2-steps", "2", "--teacher-cache", "--teacher-topk", "400", "--batch-size", "4"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = sorted(line for line in proc.stdout.splitlines() if "FSDP2 groups alive" in line)
    assert lines == [f"rank {r}: FSDP2 groups alive after train() and gc: 0" for r in (0, 1)], proc.stdout[-2000:]


def test_torchrun_refuses_what_cannot_step_sharded_tensors():
    from types import SimpleNamespace

    from vllm_zeda.errors import ZedaError
    from vllm_zeda.train.cli import build_parser, resolve_auto

    dist = SimpleNamespace(world=2, device=torch.device("cpu"))
    base = ["--model", "m", "--output", "o"]
    args = build_parser().parse_args(base)
    resolve_auto(args, dist)
    assert args.teacher_cache and not args.optimizer_in_backward  # the defaults under torchrun
    for flags in (["--expert-optimizer", "adafactor"], ["--expert-master", "bfloat16"], ["--no-teacher-cache"],
                  ["--optimizer-in-backward"]):
        with pytest.raises(ZedaError, match=f"{flags[0]}.* runs in one process only"):
            resolve_auto(build_parser().parse_args(base + flags), dist)


def test_compile_is_the_single_gpu_default_where_inductor_can_build(monkeypatch, capsys):
    from types import SimpleNamespace

    from vllm_zeda.errors import ZedaError
    from vllm_zeda.train import fused
    from vllm_zeda.train.cli import build_parser, check_args, resolve_auto

    base = ["--model", "m", "--output", "o"]
    gpu, cpu, two_gpus = (SimpleNamespace(world=w, device=torch.device(d)) for d, w in
                          (("cuda", 1), ("cpu", 1), ("cuda", 2)))

    def resolved(flags, dist):
        args = build_parser().parse_args(base + flags)
        check_args(args)
        resolve_auto(args, dist)
        return args.compile

    monkeypatch.setattr(fused, "why_not_compilable", lambda device: None)
    assert resolved([], gpu) is True
    assert resolved(["--deterministic"], gpu) is False
    assert resolved([], cpu) is False and resolved([], two_gpus) is False
    assert resolved(["--compile"], cpu) is True and resolved(["--no-compile"], gpu) is False
    with pytest.raises(ZedaError, match="--compile is not bit-reproducible"):
        resolved(["--compile", "--deterministic"], gpu)

    monkeypatch.setattr(fused, "why_not_compilable", lambda device: "Triton is not installed")
    assert resolved([], gpu) is False
    assert "running without torch.compile (Triton is not installed)" in capsys.readouterr().out
    with pytest.raises(ZedaError, match="--compile: Triton is not installed; install it, or rerun with --no-compile"):
        resolved(["--compile"], gpu)


def test_a_failed_compile_ends_in_one_line_naming_inductors_error(monkeypatch, tmp_path, capsys):
    from torch._dynamo.exc import BackendCompilerFailed

    from vllm_zeda.train import loop

    def fails(args, dist):
        raise BackendCompilerFailed(lambda: None, RuntimeError("CppCompileError: C++ compile error\nmore"), None)

    monkeypatch.setattr(loop, "train", fails)
    rc = main(["--model", "m", "--output", str(tmp_path / "out"), "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc != 0 and err.count("\n") == 1, err
    assert "torch.compile failed (CppCompileError: C++ compile error): rerun with --no-compile" in err


def test_why_not_compilable_names_what_inductor_lacks():
    import torch._inductor.config as inductor_config
    import torch._inductor.cpp_builder as cpp_builder

    from vllm_zeda.train.fused import why_not_compilable

    has_cxx = why_not_compilable(torch.device("cpu")) is None
    assert has_cxx == any(shutil.which(c) for c in ("g++", "clang++", "c++"))
    cpp_builder.cpp_compiler_search.cache_clear()
    try:
        with inductor_config.patch({"cpp.cxx": ("no-such-compiler-zeda",)}):
            assert "no C++ compiler found" in why_not_compilable(torch.device("cpu"))
    finally:
        cpp_builder.cpp_compiler_search.cache_clear()


@pytest.mark.slow
def test_teacher_cache_matches_frozen_copy(tiny_models, tmp_path):
    src = tiny_models["qwen3_moe"]
    common = ["--num-zero-experts", "8", "--stage1-steps", "0", "--stage2-steps", "5", "--eval-every", "5"]
    copy = train(src, tmp_path / "copy", *common)
    cached = train(src, tmp_path / "cache", *common, "--teacher-cache", "--teacher-topk", "400")  # whole vocabulary
    a, b = weights(tmp_path / "copy"), weights(tmp_path / "cache")
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    assert cached["teacher_kl"] == pytest.approx(copy["teacher_kl"], rel=1e-4)
    small = train(src, tmp_path / "small", *common, "--teacher-cache", "--teacher-topk", "16")
    assert small["teacher_kl"] < small["after_injection"]["teacher_kl"]


# ---------------------------------------------------------------------------- bad input ----


def _bad(capsys, tmp_path, args, needle):
    out = tmp_path / "out"
    rc = main(["--output", str(out), "--quiet", *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc != 0
    assert len(err) == 1 and err[0].startswith("error: ") and needle in err[0], err
    assert not out.exists() and not (tmp_path / ".out.zeda-work").exists()


def test_bad_inputs(tiny_models, tmp_path, capsys):
    src = str(tiny_models["qwen3_moe"])
    m = ["--model", src]
    _bad(capsys, tmp_path, [*m, "--data", str(tmp_path / "nope.txt")], "does not exist")
    (tmp_path / "d").mkdir()
    _bad(capsys, tmp_path, [*m, "--data", str(tmp_path / "d")], "no .txt or .jsonl")
    (tmp_path / "empty.txt").write_text("")
    _bad(capsys, tmp_path, [*m, "--data", str(tmp_path / "empty.txt")], "empty")
    (tmp_path / "bad.jsonl").write_text("{not json\n")
    _bad(capsys, tmp_path, [*m, "--data", str(tmp_path / "bad.jsonl")], "not valid JSON")
    for f in ("0", "1", "1.5", "-0.2"):
        _bad(capsys, tmp_path, [*m, "--target-zero-fraction", f], "strictly between 0 and 1")
    _bad(capsys, tmp_path, [*m, "--seq-len", "4096"], "max_position_embeddings (512)")
    _bad(capsys, tmp_path, ["--model", str(tmp_path / "missing")], "does not exist")
    _bad(capsys, tmp_path, [*m, "--num-zero-experts", "0"], "--num-zero-experts")
    (tmp_path / "out").mkdir()
    rc = main(["--model", src, "--output", str(tmp_path / "out"), "--quiet"])
    assert rc != 0 and "already exists" in capsys.readouterr().err
    (tmp_path / "out").rmdir()


def test_unwritable_output_fails_in_a_subprocess_without_traceback(tiny_models, tmp_path):
    for out, needle in ((Path("/proc/zeda-out"), "not writable"), (tmp_path / "no" / "such" / "dir", "does not exist")):
        proc = train_subprocess(tiny_models["qwen3_moe"], out)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode != 0 and "Traceback" not in proc.stderr + proc.stdout
        assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], proc.stderr


@pytest.mark.slow
def test_bf16_autocast_trains_like_fp32(tiny_models, tmp_path):
    """--dtype bfloat16 (the GPU default) on the CPU: bf16 autocast over fp32 master weights. Both
    stages still lower the KL, the checkpoint keeps the source's fp32, and the result stays close
    to the fp32 run. (The CUDA-specific part of that path is not covered here.)"""
    src = tiny_models["qwen3_moe"]
    run = ["--num-zero-experts", "8", "--stage1-steps", "30", "--stage2-steps", "15", "--eval-every", "15"]
    fp32 = train(src, tmp_path / "fp32", *run, "--dtype", "float32")
    bf16 = train(src, tmp_path / "bf16", *run, "--dtype", "bfloat16")
    assert (fp32["compute_dtype"], bf16["compute_dtype"], bf16["device"]) == ("float32", "bfloat16", "cpu")
    inj, s1, s2 = (bf16[k]["teacher_kl"] for k in ("after_injection", "after_stage1", "after_stage2"))
    assert s2 < s1 < inj
    assert bf16["zero_fraction"] == pytest.approx(fp32["zero_fraction"], abs=0.02)
    assert bf16["teacher_kl"] == pytest.approx(fp32["teacher_kl"], rel=0.05)
    a, b = weights(tmp_path / "fp32"), weights(tmp_path / "bf16")
    assert all(b[k].dtype == torch.float32 for k in b)
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 0.1
    assert not all(torch.equal(a[k], b[k]) for k in a)  # bf16 really ran


def test_without_matplotlib_the_report_is_written_without_its_png(tiny_models, tmp_path, monkeypatch, capsys):
    """matplotlib is optional: a base install must not lose the run in the final export."""
    from vllm_zeda.train import report

    monkeypatch.setattr(report, "plotting_available", lambda: False)
    out = tmp_path / "o"
    r = train(tiny_models["qwen3_moe"], out, "--num-zero-experts", "8", "--stage1-steps", "2", "--stage2-steps", "1",
              plot=True)
    assert r["stage2_steps"] == 1 and (out / "zeda_report.json").is_file() and (out / "model.safetensors").is_file()
    assert not (out / "zeda_report.png").exists()
    warned = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len(warned) == 1 and "matplotlib is not installed" in warned[0]


def _stop_in_stage2_and_resume(monkeypatch, capsys, src, out, run, stage1_steps=8):
    """Run `run` until stage 2's step 3 runs out of GPU memory (its last checkpoint: step 2, with
    --save-every 2), then --resume it; the output's weights."""
    from vllm_zeda.train import teacher

    calls, kl = [0], teacher.distill_kl

    def oom_in_stage2(*a, **k):
        calls[0] += torch.is_grad_enabled()
        if calls[0] == stage1_steps + 3:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return kl(*a, **k)

    monkeypatch.setattr(teacher, "distill_kl", oom_in_stage2)
    args = ["--model", str(src), "--output", str(out), *BASE, *run]
    assert main(args) == 2 and "out of GPU memory" in capsys.readouterr().err
    monkeypatch.setattr(teacher, "distill_kl", kl)
    assert main([*args, "--resume"]) == 0 and "resuming at stage 2, step 2" in capsys.readouterr().out
    return weights(out)


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err[-2000:]
    return lines[0]


def test_out_of_memory_and_full_disk_stop_in_one_line_and_resume(tiny_models, tmp_path, monkeypatch, capsys):
    """Out of GPU memory mid-stage, or a full disk while checkpointing: one line naming the cause
    and the remedy; the last checkpoint stays, and --resume finishes the run. Interrupted while
    checkpointing: the partial file goes too."""
    from vllm_zeda.train import state, teacher

    src, out = tiny_models["qwen3_moe"], tmp_path / "o"
    args = ["--model", str(src), "--output", str(out), *BASE, *SHORT, "--save-every", "2"]
    calls, kl = [0], teacher.distill_kl

    def oom_at_step_5(*a, **k):
        calls[0] += torch.is_grad_enabled()  # training steps, not held-out evaluations
        if calls[0] == 5:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return kl(*a, **k)

    monkeypatch.setattr(teacher, "distill_kl", oom_at_step_5)
    assert main(args) == 2
    line = _one_error_line(capsys)
    assert "out of GPU memory" in line and "--batch-size (now 8)" in line and "--resume (the last checkpoint" in line
    monkeypatch.setattr(teacher, "distill_kl", kl)

    saves, save = [0], torch.save

    def full_disk_on_the_second_save(obj, path, *a, **k):
        saves[0] += 1
        if saves[0] == 2:
            with open(path, "wb") as f:  # a partial file, as a real full disk leaves
                f.write(b"partial")
            raise OSError(28, "No space left on device", str(path))
        return save(obj, path, *a, **k)

    monkeypatch.setattr(state.torch, "save", full_disk_on_the_second_save)
    assert main([*args, "--resume"]) == 2
    line = _one_error_line(capsys)
    assert "the disk is full" in line and "--resume" in line
    assert not list((tmp_path / ".o.zeda-work").glob("*.tmp"))  # the partial write is gone, the checkpoint kept

    def interrupted_mid_save(obj, path, *a, **k):  # Ctrl-C or SIGTERM (cli_entry) while a checkpoint is written
        with open(path, "wb") as f:
            f.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(state.torch, "save", interrupted_mid_save)
    assert main([*args, "--resume"]) == 130
    assert not list((tmp_path / ".o.zeda-work").glob("*.tmp"))  # no partial file left for a later run's disk
    monkeypatch.setattr(state.torch, "save", save)
    assert main([*args, "--resume"]) == 0 and (out / "model.safetensors").is_file()


def test_bf16_checkpoint_keeps_frozen_weights_bf16_and_resumes_exactly(tmp_path, monkeypatch, capsys):
    """bf16 compute over a bf16 checkpoint: frozen weights stay bf16 (bit for bit in the output),
    what a stage trains is fp32 with fp32 optimizer state, and a run stopped mid-stage 2 resumes
    to the same weights as an uninterrupted one."""
    from vllm_zeda.testing.tiny import make_tiny_moe

    src = make_tiny_moe(tmp_path / "src", arch="qwen3_moe", dtype=torch.bfloat16)
    run = ["--dtype", "bfloat16", "--num-zero-experts", "8", "--stage1-steps", "6", "--stage2-steps", "4",
           "--eval-every", "3", "--save-every", "2"]
    full = train(src, tmp_path / "full", *run)
    assert (full["compute_dtype"], full["frozen_dtype"]) == ("bfloat16", "bfloat16")
    orig, got = weights(src), weights(tmp_path / "full")
    assert all(got[k].dtype == torch.bfloat16 for k in got)
    assert all(torch.equal(got[k], v) for k, v in orig.items() if ".mlp." not in k)  # frozen: bit for bit

    resumed = _stop_in_stage2_and_resume(monkeypatch, capsys, src, tmp_path / "resumed", run, stage1_steps=6)
    assert all(torch.equal(got[k], resumed[k]) for k in got)


def test_optimizer_in_backward_steps_exactly_like_after_backward(tiny_models, tmp_path):
    """One AdamW per tensor stepped from its gradient hook (the last micro-batch's backward arms
    them) gives the weights of the usual step after backward, gradient accumulation included
    (no clipping: in backward it is per tensor, which is a different rule)."""
    src = tiny_models["qwen3_moe"]
    run = [*SHORT, "--grad-accum", "2", "--batch-size", "4", "--grad-clip", "0"]
    after = train(src, tmp_path / "after", *run, "--no-optimizer-in-backward")
    inside = train(src, tmp_path / "inside", *run, "--optimizer-in-backward")
    a, b = weights(tmp_path / "after"), weights(tmp_path / "inside")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6
    assert inside["after_stage2"]["teacher_kl"] == pytest.approx(after["after_stage2"]["teacher_kl"], rel=1e-4)


def test_recomputing_some_layers_trains_like_recomputing_all_or_none(tiny_models, tmp_path):
    """--grad-checkpointing-layers N: the first N decoder layers recompute in the backward, the
    others keep their activations; the gradients, so the weights, are those of either extreme."""
    src = tiny_models["qwen3_moe"]
    runs = {"all": ["--grad-checkpointing"], "none": ["--no-grad-checkpointing"], "first": ["--grad-checkpointing-layers", "1"]}
    got = {}
    for name, flags in runs.items():
        report = train(src, tmp_path / name, *SHORT, *flags)
        assert report["grad_checkpointing"] is (name != "none")
        got[name] = weights(tmp_path / name)
    for other in ("none", "first"):
        assert max((got["all"][k] - got[other][k]).abs().max().item() for k in got["all"]) < 1e-6
    model = load(src)  # the 2-layer tiny model: which layers recompute
    assert loop.enable_grad_checkpointing(model, 1) == 1 and [m.gradient_checkpointing for m in model.model.layers] == [True, False]
    assert loop.enable_grad_checkpointing(load(src), None) == 2
    assert main(["--model", str(src), "--output", str(tmp_path / "x"), "--no-grad-checkpointing", "--grad-checkpointing-layers", "1"]) != 0


def test_adafactor_in_backward_trains_and_resumes_exactly(tiny_models, tmp_path, monkeypatch, capsys):
    src = tiny_models["qwen3_moe"]
    run = [*SHORT, "--save-every", "2", "--expert-optimizer", "adafactor", "--optimizer-in-backward"]
    full = train(src, tmp_path / "full", *run)
    assert (full["expert_optimizer"], full["optimizer_in_backward"]) == ("adafactor", True)
    a, b = weights(tmp_path / "full"), _stop_in_stage2_and_resume(monkeypatch, capsys, src, tmp_path / "resumed", run)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_bf16_expert_masters_train_and_resume_exactly(tiny_models, tmp_path, monkeypatch, capsys):
    """--expert-master bfloat16: stage 2 keeps the MoE blocks in bf16 (stochastic rounding), the
    routers in fp32; stage 2 ends where fp32 masters end it, and resumes bit for bit from a
    mid-stage-2 checkpoint (the rounding noise is a pure function of the step)."""
    src = tiny_models["qwen3_moe"]
    args = ["--model", str(src), "--output", str(tmp_path / "refused"), *BASE, *SHORT, "--expert-master", "bfloat16"]
    assert main(args) == 2 and "--dtype bfloat16" in _one_error_line(capsys)  # fp32 compute: refused up front
    run = [*SHORT, "--dtype", "bfloat16", "--save-every", "2", "--expert-optimizer", "adafactor",
           "--optimizer-in-backward"]
    fp32 = train(src, tmp_path / "fp32", *run)
    full = train(src, tmp_path / "full", *run, "--expert-master", "bfloat16")
    assert full["expert_master"] == "bfloat16"
    for key in ("teacher_kl", "zero_fraction"):  # stage 2 lands where fp32 masters do
        assert full["after_stage2"][key] == pytest.approx(fp32["after_stage2"][key], rel=0.05), key
    orig, got = weights(src), weights(tmp_path / "full")
    experts = [k for k in orig if ".mlp.experts." in k]
    assert all(not torch.equal(orig[k].to(torch.bfloat16), got[k].to(torch.bfloat16)) for k in experts)
    b = _stop_in_stage2_and_resume(monkeypatch, capsys, src, tmp_path / "resumed", [*run, "--expert-master", "bfloat16"])
    assert all(torch.equal(got[k], b[k]) for k in got)
