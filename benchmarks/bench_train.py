"""The trainer at Qwen3-30B-A3B's shape on one GPU (device machine). Two measurements:

  in-memory    both stages of the full shape (48 layers by default), random weights built in GPU
               memory (no disk holds a 61 GB source and its output), through the trainer's own
               code: cli.build_parser / resolve_auto, loop.load_student and loop.run_stage. Per
               stage and batch size: training tokens/s, peak GPU memory, model-FLOPs utilisation.
  kill-resume  the real CLI (`python -m vllm_zeda.train`) on an L-layer slice written to disk:
               one uninterrupted run, and one killed with SIGKILL mid-stage 1 and again mid-stage
               2 and resumed each time; their routers and experts compared.

    python3 benchmarks/bench_train.py in-memory --out $OUT/train_48.json [--layers 48]
    python3 benchmarks/bench_train.py kill-resume --out $OUT/train_kill.json [--layers 16]
    python3 benchmarks/bench_train.py in-memory --tiny --out /tmp/t.json      # CPU smoke test

MFU = 6 x active parameters x tokens/s / the GPU's dense bf16 peak (989 TFLOP/s on an H200): the
usual training-FLOPs convention, whatever the stage trains, over the static top-8 (mfu_6n) and
over the slots the student really runs, zero slots left out (mfu_6n_live, from the steps' zero
fraction). Stage 1's real work differs: no weight
gradients but the routers', plus the masked teacher's forward and activation checkpointing's
recomputation (about 8N a token against the convention's 6N). Every run's flags are in the JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
H200_BF16_PEAK = 989e12

QWEN3_30B_A3B = dict(hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768, num_experts=128,
                     num_experts_per_tok=8, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                     vocab_size=151936, max_position_embeddings=40960, rms_norm_eps=1e-6, norm_topk_prob=True,
                     tie_word_embeddings=False, decoder_sparse_step=1, mlp_only_layers=[])
TINY = dict(QWEN3_30B_A3B, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_experts=16,
            num_experts_per_tok=4, num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=512)
# the memory plan the full shape needs in stage 2 (fp32 experts alone are 116 GB)
STAGE2_FLAGS = ["--expert-master", "bfloat16", "--expert-optimizer", "adafactor"]


def active_params(cfg: dict, layers: int) -> int:
    """Parameters one token runs through: attention, router, top-k experts, norms, embeddings out."""
    h, hd = cfg["hidden_size"], cfg["head_dim"]
    attn = h * hd * (cfg["num_attention_heads"] * 2 + cfg["num_key_value_heads"] * 2)
    experts = cfg["num_experts_per_tok"] * 3 * h * cfg["moe_intermediate_size"]
    router = h * cfg["num_experts"]
    return layers * (attn + experts + router) + 2 * h * cfg["vocab_size"]


def write_config(path: Path, shape: dict, layers: int):
    from transformers import Qwen3MoeConfig

    from vllm_zeda.testing.tiny import byte_tokenizer

    config = Qwen3MoeConfig(**shape, num_hidden_layers=layers, initializer_range=0.02)
    config.architectures = ["Qwen3MoeForCausalLM"]
    config.dtype = "bfloat16"
    path.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return config


def build_slice(path: Path, layers: int, device: str) -> float:
    """A random bf16 L-layer slice of the shape, saved as a checkpoint (seeded: the same weights each call)."""
    import torch
    from transformers import Qwen3MoeForCausalLM

    t0 = time.time()
    config = write_config(path, QWEN3_30B_A3B, layers)
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen3MoeForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(path, max_shard_size="5GB")
    del model
    torch.cuda.empty_cache()
    return time.time() - t0


def mfu(speed: dict, active: int) -> float | None:
    return round(6 * active * speed["tokens_per_s"] / H200_BF16_PEAK, 4) if speed.get("tokens_per_s") else None


def live_active_params(cfg: dict, layers: int, zero_fraction: float) -> int:
    """Active parameters of the student with a share `zero_fraction` of its slots on zero experts
    (which run nothing): the static count less those slots' expert weights."""
    per_slot = 3 * cfg["hidden_size"] * cfg["moe_intermediate_size"]
    return int(active_params(cfg, layers) - layers * cfg["num_experts_per_tok"] * zero_fraction * per_slot)


# ------------------------------------------------------------------------------ in-memory ----


def in_memory(args, result: dict, save) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    from vllm_zeda.convert.inject import converted_config, describe_source
    from vllm_zeda.hf.modeling import register
    from vllm_zeda.train import loop, state, teacher
    from vllm_zeda.train.cli import build_parser, check_args, resolve_auto
    from vllm_zeda.train.data import load_blocks
    from vllm_zeda.train.distributed import Dist

    shape = TINY if args.tiny else QWEN3_30B_A3B
    device = "cpu" if args.tiny else "cuda"
    work = Path(args.work)
    src = work / "config-only"
    write_config(src, shape, args.layers)
    cfg = json.loads((src / "config.json").read_text())
    flags = ["--model", str(src), "--output", str(work / "unused"), "--work-dir", str(work / "w"), "--device", device,
             "--dtype", "bfloat16", "--seq-len", str(args.seq_len), "--stage1-steps", str(args.steps),
             "--stage2-steps", str(args.steps), "--eval-every", "1000", "--save-every", "1000",
             "--max-heldout-blocks", "2", "--quiet", "--no-plot", *STAGE2_FLAGS, *args.extra]
    train_args = build_parser().parse_args(flags)
    check_args(train_args)
    dist = Dist(device)
    resolve_auto(train_args, dist)
    arch, spec = describe_source(cfg, train_args.num_zero_experts, train_args.target_zero_fraction)
    data = load_blocks(None, AutoTokenizer.from_pretrained(src), args.seq_len, seed=0, heldout_fraction=0.05,
                       max_heldout=2)

    def build(dtype):
        register()
        zeda_cfg = converted_config(cfg, arch, spec)
        config = CONFIG_MAPPING[zeda_cfg["model_type"]].from_dict(zeda_cfg)
        torch.manual_seed(0)
        t0 = time.time()
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        result["build_seconds"] = round(time.time() - t0, 1)
        return model

    (work / "w").mkdir(parents=True, exist_ok=True)
    run = loop.Run(args=train_args, dist=dist, src=src, output=work / "unused", work=work / "w", cfg=cfg, arch=arch,
                   spec=spec, data=data, config=state.run_config(train_args, 1), use_bf16=True, plot=False,
                   build_model=build)
    loop.load_student(run)
    n_params = sum(p.numel() for p in run.model.parameters())
    active = active_params(shape, args.layers)
    result["meta"].update(layers=args.layers, params=n_params, active_params=active, seq_len=args.seq_len,
                          steps_per_point=args.steps, flags=flags, compile=train_args.compile)
    result["points"] = []
    for stage, sizes in ((1, args.stage1_batches), (2, args.stage2_batches), (1, args.then_stage1_batches)):
        for batch in sizes:
            train_args.batch_size = batch
            run.speed.clear()
            for part in run.work.glob(teacher.CACHE + "*"):  # each batch size reads other blocks
                part.unlink()
            point = {"stage": stage, "batch_size": batch, "tokens_per_step": batch * args.seq_len}
            seen = len(run.metrics_path.read_text().splitlines()) if run.metrics_path.is_file() else 0
            t0 = time.time()
            profiler = _profiler(args.profile, args.steps, f"stage{stage}_batch{batch}", point)
            log = run.log
            if args.profile:  # the profiler's window: the timed steps (each train record ends a step)
                run.log = lambda record: (log(record), record.get("event") == "train" and profiler.step())
            try:
                with profiler:
                    loop.run_stage(run, stage, 0, None)
                speed = run.speed[f"stage{stage}"]
                steps = [json.loads(l) for l in run.metrics_path.read_text().splitlines()[seen:]]
                zero = [r["zero_fraction"] for r in steps if r.get("event") == "train"][1:]  # the timed steps
                f = sum(zero) / len(zero)
                point.update(speed, mfu_6n=mfu(speed, active), zero_fraction=round(f, 4),
                             mfu_6n_live=mfu(speed, live_active_params(shape, args.layers, f)))
            except torch.cuda.OutOfMemoryError:
                point["error"] = "out of GPU memory"
                for p in run.model.parameters():
                    p.grad = None
                    p.requires_grad_(False)
                torch.cuda.empty_cache()
            run.log = log
            point["wall_seconds"] = round(time.time() - t0, 1)
            result["points"].append(point)
            print(json.dumps(point), flush=True)
            save()


def _profiler(folder: str | None, steps: int, name: str, point: dict):
    """torch.profiler over the timed steps of a (stage, batch size) point (the first step, which
    compiles, and the stage's evaluations and frozen-weight fingerprints left out), or nothing.
    Writes the kernel tables to `folder` and the GPU time per step into `point`."""
    import contextlib

    if not folder:
        return contextlib.nullcontext()
    from torch.profiler import ProfilerActivity, profile, schedule

    Path(folder).mkdir(parents=True, exist_ok=True)

    def save(prof):
        averages = prof.key_averages()
        Path(folder, f"{name}.txt").write_text(averages.table(sort_by="self_cuda_time_total", row_limit=40,
                                                              max_name_column_width=110))
        shapes = prof.key_averages(group_by_input_shape=True).table(
            sort_by="self_cuda_time_total", row_limit=60, max_name_column_width=40, max_shapes_column_width=90)
        Path(folder, f"{name}_shapes.txt").write_text(shapes)
        kernels = sum(e.self_device_time_total for e in averages  # the tables' "Self CUDA time total"
                      if e.device_type.name == "CUDA" and not e.is_user_annotation)
        point["profiled_steps"] = steps - 1
        point["gpu_ms_per_step"] = round(kernels / 1e3 / (steps - 1), 1)

    return profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True,
                   schedule=schedule(wait=0, warmup=1, active=steps - 1, repeat=1), on_trace_ready=save)


# ---------------------------------------------------------------------------- kill-resume ----


def cli_cmd(src: Path, out: Path, args) -> list[str]:
    return [sys.executable, "-m", "vllm_zeda.train", "--model", str(src), "--output", str(out), "--device", "cuda",
            "--stage1-steps", str(args.stage1_steps), "--stage2-steps", str(args.stage2_steps),
            "--save-every", str(args.save_every), "--eval-every", "1000", "--seq-len", str(args.seq_len),
            "--batch-size", str(args.batch_size), "--max-heldout-blocks", "2", "--quiet", "--no-plot", *STAGE2_FLAGS,
            *(["--deterministic"] if args.deterministic else [])]


def launch(cmd: list[str], work: Path, kill_at: tuple[int, int] | None, timeout: float) -> dict:
    """Run the CLI; with kill_at = (stage, step), SIGKILL it once metrics show that step done."""
    t0 = time.time()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    seen = None
    while proc.poll() is None and time.time() - t0 < timeout:
        time.sleep(0.2)
        if kill_at is None:
            continue
        metrics = work / "metrics.jsonl"
        for line in metrics.read_text().splitlines() if metrics.is_file() else []:
            rec = json.loads(line)
            if rec.get("event") == "train" and (rec["stage"], rec["step"]) >= kill_at:
                seen = (rec["stage"], rec["step"])
        if seen:
            os.killpg(proc.pid, signal.SIGKILL)
            break
    if proc.poll() is None and not seen:
        os.killpg(proc.pid, signal.SIGKILL)
    out = proc.communicate()[0]
    return {"returncode": proc.returncode, "seconds": round(time.time() - t0, 1), "killed_after": seen,
            "tail": [l for l in out.strip().splitlines() if "it/s]" not in l][-6:]}


def trained_tensors(out: Path) -> dict:
    from safetensors import safe_open

    tensors = {}
    for f in sorted(out.glob("*.safetensors")):
        with safe_open(f, framework="pt") as st:
            for name in st.keys():
                if ".mlp.gate." in name or ".mlp.experts.0." in name or "experts.gate_up_proj" in name:
                    tensors[name] = st.get_tensor(name)
    return tensors


def kill_resume(args, result: dict, save) -> None:
    work = Path(args.work)
    shm = Path("/dev/shm")
    need = 2.1e9 * args.layers  # bytes of a bf16 slice, about
    src_root = shm if shm.is_dir() and shutil.disk_usage(shm).free > 1.2 * need else work
    src = src_root / "zeda_bench_src"
    shutil.rmtree(src, ignore_errors=True)
    result["meta"].update(layers=args.layers, source_on=str(src_root), disk_free_gb=round(shutil.disk_usage(work).free / 2**30, 1))
    result["build_seconds"] = round(build_slice(src, args.layers, "cuda"), 1)
    result["source_gb"] = round(sum(f.stat().st_size for f in src.iterdir()) / 2**30, 2)
    save()
    try:
        a_out, b_out = work / "uninterrupted", work / "killed"
        result["uninterrupted"] = launch(cli_cmd(src, a_out, args), work / ".uninterrupted.zeda-work", None, args.timeout)
        save()
        reference = trained_tensors(a_out)
        report = json.loads((a_out / "zeda_report.json").read_text())
        result["report"] = {k: report[k] for k in ("throughput", "zero_fraction", "teacher_kl", "expert_master",
                                                    "expert_optimizer", "teacher", "optimizer_in_backward")}
        shutil.rmtree(a_out)
        b_work = work / ".killed.zeda-work"
        cmd = cli_cmd(src, b_out, args)
        result["killed"] = [launch(cmd, b_work, (1, args.save_every + 1), args.timeout)]
        save()
        result["killed"].append(launch(cmd + ["--resume"], b_work, (2, 1), args.timeout))
        save()
        result["killed"].append(launch(cmd + ["--resume"], b_work, None, args.timeout))
        got = trained_tensors(b_out)
        diffs = {n: float((reference[n].float() - got[n].float()).abs().max()) for n in reference}
        result["compare"] = {"tensors": len(diffs), "bitwise_equal": sum(d == 0 for d in diffs.values()),
                             "max_abs_diff_routers": max(d for n, d in diffs.items() if ".mlp.gate." in n),
                             "max_abs_diff_experts": max((d for n, d in diffs.items() if ".mlp.gate." not in n), default=None)}
    finally:
        shutil.rmtree(src, ignore_errors=True)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=("in-memory", "kill-resume"))
    p.add_argument("--out", required=True)
    p.add_argument("--work", default="/tmp/bench_train")
    p.add_argument("--layers", type=int, default=None, help="default: 48 in-memory, 16 kill-resume")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--tiny", action="store_true", help="in-memory: a tiny shape on CPU (smoke test)")
    p.add_argument("--steps", type=int, default=6, help="in-memory: steps per (stage, batch size) point")
    p.add_argument("--stage1-batches", type=int, nargs="*", default=[2, 4], help="none: skip the stage")
    p.add_argument("--stage2-batches", type=int, nargs="*", default=[2, 4], help="none: skip the stage")
    p.add_argument("--then-stage1-batches", type=int, nargs="*", default=[],
                   help="in-memory: stage 1 again after the stage-2 points, whose steps have pulled the random "
                        "routers' zero fraction towards the target")
    p.add_argument("--profile", default=None, metavar="DIR", help="in-memory: kernel tables of each point's timed steps in DIR")
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="in-memory: more trainer flags")
    p.add_argument("--batch-size", type=int, default=2, help="kill-resume")
    p.add_argument("--stage1-steps", type=int, default=8, help="kill-resume")
    p.add_argument("--stage2-steps", type=int, default=3, help="kill-resume")
    p.add_argument("--save-every", type=int, default=4, help="kill-resume (>= stage 2's steps: no mid-stage-2 state)")
    p.add_argument("--deterministic", action="store_true", help="kill-resume: pass --deterministic to the CLI")
    p.add_argument("--timeout", type=float, default=300)
    args = p.parse_args()
    args.layers = args.layers or (48 if args.mode == "in-memory" else 16)
    import torch
    import transformers

    shutil.rmtree(args.work, ignore_errors=True)
    Path(args.work).mkdir(parents=True)
    on_gpu = torch.cuda.is_available() and not args.tiny
    result = {"meta": {"mode": args.mode, "device": torch.cuda.get_device_name() if on_gpu else "cpu",
                       "torch": torch.__version__, "transformers": transformers.__version__,
                       "date": time.strftime("%Y-%m-%d"), "shape": "tiny" if args.tiny else "Qwen3-30B-A3B"}}

    def save():
        Path(args.out).write_text(json.dumps(result, indent=1))

    (in_memory if args.mode == "in-memory" else kill_resume)(args, result, save)
    save()
    print(json.dumps(result, indent=1), flush=True)


if __name__ == "__main__":
    main()
