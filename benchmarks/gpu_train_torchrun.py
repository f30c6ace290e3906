"""The trainer on several GPUs (device machine): `torchrun --nproc-per-node N -m vllm_zeda.train`
against one process, on a small random Qwen3-MoE (byte tokenizer, demo corpus).

  parity  fp32: one process with batch N*B against N processes with batch B each (the same
          global batch, the model sharded with FSDP2): largest weight difference, held-out zero
          fraction and KL. Every run uses the teacher cache and steps after backward (the
          torchrun defaults), so one process and N follow the same rule.
  speed   bf16 autocast (the GPU default): one process against N, batch B per process;
          training tokens/s of the whole job and per GPU, per stage (the trainer's report).

    python3 benchmarks/gpu_train_torchrun.py --out $OUT/train_torchrun.json [--gpus 2] [--size small]
    python3 benchmarks/gpu_train_torchrun.py --out /tmp/t.json --device cpu --size tiny   # CPU smoke run (gloo)
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.workers import run_worker  # noqa: E402

SIZES = {  # tiny_config overrides (qwen3_moe)
    "tiny": dict(num_experts=8, top_k=2),
    "small": dict(num_experts=64, top_k=8, hidden_size=768, num_hidden_layers=6, num_attention_heads=12,
                  num_key_value_heads=4, head_dim=64, moe_intermediate_size=384, intermediate_size=1536,
                  max_position_embeddings=1024, initializer_range=0.02),
}
NCCL_SAFE = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def train(src: Path, out: Path, procs: int, batch: int, dtype: str, a, port: int) -> dict:
    launcher = [sys.executable, "-m"] if procs == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(procs), "--master-port", str(port), "-m"]
    cmd = [*launcher, "vllm_zeda.train", "--model", str(src), "--output", str(out), "--device", a.device, "--dtype", dtype,
           "--seq-len", str(a.seq_len), "--batch-size", str(batch), "--stage1-steps", str(a.steps), "--stage2-steps",
           str(a.steps), "--eval-every", str(a.steps), "--save-every", str(a.steps), "--max-heldout-blocks", "32",
           "--teacher-cache", "--no-optimizer-in-backward", "--quiet", "--no-plot"]
    t = time.time()
    proc = run_worker(cmd, a.timeout, cwd=ROOT, env={**os.environ, **NCCL_SAFE})
    wall = round(time.time() - t, 1)
    print(f"[{procs} x batch {batch}, {dtype}] exit {proc.returncode} in {wall} s", flush=True)
    if proc.returncode != 0:
        return {"error": (proc.stdout + proc.stderr)[-3000:], "wall_s": wall}
    report = json.loads((out / "zeda_report.json").read_text())
    return {"wall_s": wall, "processes": procs, "batch_per_process": batch, "dtype": dtype,
            "zero_fraction": report["zero_fraction"], "teacher_kl": report["teacher_kl"],
            "after_injection": {k: report["after_injection"][k] for k in ("zero_fraction", "teacher_kl")},
            "throughput": report["throughput"], "world_size": report["world_size"]}


def max_weight_diff(a: Path, b: Path) -> dict:
    from safetensors.torch import load_file

    from vllm_zeda.convert.checkpoint import shard_files

    def tensors(p):
        out = {}
        for f in shard_files(p)[0]:
            out.update(load_file(p / f))
        return out

    ta, tb = tensors(a), tensors(b)
    diffs = {k: (ta[k].float() - tb[k].float()).abs().max().item() for k in ta}
    worst = max(diffs, key=diffs.get)
    router = max(v for k, v in diffs.items() if k.endswith("mlp.gate.weight"))
    return {"max_abs": diffs[worst], "worst_tensor": worst, "max_abs_router": router, "tensors": len(diffs)}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--gpus", type=int, default=2, help="processes of the distributed runs")
    p.add_argument("--size", choices=list(SIZES), default="small")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--batch", type=int, default=8, help="blocks per process per step")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--steps", type=int, default=12, help="optimizer steps per stage")
    p.add_argument("--timeout", type=float, default=240, help="seconds per training run")
    p.add_argument("--parts", nargs="+", default=["parity", "speed"], choices=("parity", "speed"))
    a = p.parse_args()
    import torch
    from vllm_zeda.testing.tiny import make_tiny_moe

    work = Path(tempfile.mkdtemp())
    src = make_tiny_moe(work / "src", "qwen3_moe", seed=1, **SIZES[a.size])
    n = a.gpus
    res = {"meta": {"device": torch.cuda.get_device_name() if a.device == "cuda" else "cpu",
                    "gpus_visible": torch.cuda.device_count() if a.device == "cuda" else 0, "torch": torch.__version__,
                    "date": time.strftime("%Y-%m-%d"), "size": a.size, "model": SIZES[a.size], "seq_len": a.seq_len,
                    "steps_per_stage": a.steps, "processes": n}}
    out = Path(a.out)
    if "parity" in a.parts:
        one = train(src, work / "p1", 1, n * a.batch, "float32", a, 29600)
        many = train(src, work / "pn", n, a.batch, "float32", a, 29601)
        res["parity"] = {"one": one, "many": many}
        if "error" not in one and "error" not in many:
            res["parity"]["weights"] = max_weight_diff(work / "p1", work / "pn")
        out.write_text(json.dumps(res, indent=1))
    if "speed" in a.parts:
        one = train(src, work / "s1", 1, a.batch, "bfloat16" if a.device == "cuda" else "float32", a, 29602)
        many = train(src, work / "sn", n, a.batch, "bfloat16" if a.device == "cuda" else "float32", a, 29603)
        res["speed"] = {"one": one, "many": many}
        if "error" not in one and "error" not in many:
            res["speed"]["scaling"] = {st: round(many["throughput"][st]["tokens_per_s"] / one["throughput"][st]["tokens_per_s"], 3)
                                       for st in one["throughput"]}
        out.write_text(json.dumps(res, indent=1))
    print(json.dumps({k: v for k, v in res.items() if k != "meta"}, indent=1))


if __name__ == "__main__":
    main()
