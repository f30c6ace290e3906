"""The trainer on a slice of the Qwen3-30B-A3B shape (device machine): the real CLI, as a user runs it.

    python3 benchmarks/bench_train.py --out $OUT/train.json [--layers 12] [--stage1-steps 4] [--stage2-steps 0]

Builds a random L-layer slice of Qwen3-30B-A3B (hidden 2048, 128 experts of 768, top-8, 32 heads,
4 KV heads, head dim 128, vocabulary 151,936) in bf16 with the local byte-level tokenizer, writes
it to --work (safetensors), then runs `python -m vllm_zeda.train` on it with the built-in corpus
and records the report: training tokens/s and peak GPU memory per stage, the disk the run used,
and model-FLOPs utilisation over the active parameters. MFU = 6 x active parameters x tokens/s /
the GPU's dense bf16 peak (989 TFLOP/s on an H200): the usual training-FLOPs convention, whatever
the stage trains (stage 1's real work is less: no weight gradients but the routers', plus the
masked teacher's forward and the recomputation of activation checkpointing).
Also records what the CLI says for a run the device cannot hold (--check-stage2: the disk plan's
one line, before anything is loaded).
"""
from __future__ import annotations

import argparse
import json
import shutil
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


def active_params(cfg: dict, layers: int) -> int:
    """Parameters one token runs through: attention, router, top-k experts, norms, embeddings out."""
    h, hd = cfg["hidden_size"], cfg["head_dim"]
    attn = h * hd * (cfg["num_attention_heads"] * 2 + cfg["num_key_value_heads"] * 2)
    experts = cfg["num_experts_per_tok"] * 3 * h * cfg["moe_intermediate_size"]
    router = h * cfg["num_experts"]
    return layers * (attn + experts + router) + 2 * h * cfg["vocab_size"]


def build_slice(path: Path, layers: int) -> float:
    import torch
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    from vllm_zeda.testing.tiny import byte_tokenizer

    t0 = time.time()
    config = Qwen3MoeConfig(**QWEN3_30B_A3B, num_hidden_layers=layers, initializer_range=0.02)
    config.architectures = ["Qwen3MoeForCausalLM"]
    with torch.device("cuda"):
        model = Qwen3MoeForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(path, max_shard_size="5GB")
    byte_tokenizer().save_pretrained(path)
    del model
    torch.cuda.empty_cache()
    return time.time() - t0


def run_cli(src: Path, out: Path, args, stage1: int, stage2: int) -> tuple[subprocess.CompletedProcess, float]:
    cmd = [sys.executable, "-m", "vllm_zeda.train", "--model", str(src), "--output", str(out), "--device", "cuda",
           "--stage1-steps", str(stage1), "--stage2-steps", str(stage2), "--seq-len", str(args.seq_len),
           "--batch-size", str(args.batch_size), "--eval-every", str(max(stage1, stage2, 1)),
           "--max-heldout-blocks", "4", "--quiet", "--no-plot"]
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=args.timeout)
    return proc, time.time() - t0


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--work", default="/tmp/bench_train")
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--stage1-steps", type=int, default=4)
    p.add_argument("--stage2-steps", type=int, default=0)
    p.add_argument("--check-stage2", action="store_true", help="also ask for stage 2 and record the refusal")
    p.add_argument("--timeout", type=float, default=400)
    args = p.parse_args()
    import torch
    import transformers

    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    src = work / "src"
    result = {"meta": {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                       "transformers": transformers.__version__, "date": time.strftime("%Y-%m-%d"),
                       "layers": args.layers, "seq_len": args.seq_len, "batch_size": args.batch_size,
                       "shape": "Qwen3-30B-A3B", "active_params": active_params(QWEN3_30B_A3B, args.layers)}}
    result["build_seconds"] = round(build_slice(src, args.layers), 1)
    result["source_gb"] = round(sum(f.stat().st_size for f in src.iterdir()) / 2**30, 2)
    print(json.dumps(result), flush=True)
    if args.check_stage2:
        proc, _ = run_cli(src, work / "refused", args, 1, 1)
        result["stage2_check"] = {"returncode": proc.returncode, "stderr_tail": proc.stderr.strip().splitlines()[-1:]}
        print(json.dumps(result["stage2_check"]), flush=True)
    proc, seconds = run_cli(src, work / "out", args, args.stage1_steps, args.stage2_steps)
    result["run"] = {"returncode": proc.returncode, "seconds": round(seconds, 1),
                     "stdout_tail": proc.stdout.strip().splitlines()[-6:], "stderr_tail": proc.stderr.strip().splitlines()[-3:]}
    report_path = work / "out" / "zeda_report.json"
    if report_path.is_file():
        report = json.loads(report_path.read_text())
        result["report"] = {k: report[k] for k in ("throughput", "zero_fraction", "teacher_kl", "frozen_dtype",
                                                   "compute_dtype", "teacher", "grad_checkpointing")}
        result["output_gb"] = round(sum(f.stat().st_size for f in (work / "out").iterdir()) / 2**30, 2)
        for stage, speed in report["throughput"].items():
            if speed.get("tokens_per_s"):
                speed["mfu_6n"] = round(6 * result["meta"]["active_params"] * speed["tokens_per_s"] / H200_BF16_PEAK, 4)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1), flush=True)


if __name__ == "__main__":
    main()
