"""One MoE block's routed experts in training, forward + backward, at Qwen3-30B-A3B's shape
(128 experts, hidden 2048, expert width 768, top-8), through `hf.experts.live_experts_forward`
with its pieces compiled as the trainer's `--compile` does (`train.fused`), for one or more versions of
`vllm_zeda/hf/experts.py` side by side in one process:

    python3 benchmarks/bench_train_experts.py --out $OUT/experts.json \
        --impl this=vllm_zeda/hf/experts.py --impl base=old_tree/experts.py

`old_tree/experts.py`: `git show REV:vllm_zeda/hf/experts.py > old_tree/experts.py` on the CPU
machine. Per version, zero fraction and case (stage 1: routers only, so the experts are frozen and
only the input and the routing weights need gradients; stage 2: the experts train too): the median
of --repeats timed iterations (CUDA events) after --warmup, and whether its output and gradients
match the first version's.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def load_impl(spec: str):
    """NAME=path/to/experts.py -> (NAME, the module); argparse reports a bad one in one line."""
    name, _, path = spec.partition("=")
    if not name or not Path(path).is_file():
        raise argparse.ArgumentTypeError(f"expected NAME=path/to/experts.py (an existing file), got {spec!r}")
    module_spec = importlib.util.spec_from_file_location(f"experts_{name}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return name, module


def main() -> None:
    import torch
    from torch import nn

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--impl", action="append", required=True, type=load_impl,
                   help="NAME=path/to/experts.py (first = reference)")
    p.add_argument("--tokens", type=int, default=12288)
    p.add_argument("--zero-fractions", type=float, nargs="+", default=[0.0, 0.5, 0.9])
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--device", default="cuda")
    args = p.parse_args()

    device = torch.device(args.device)
    e, h, i, k, t = 128, 2048, 768, 8, args.tokens
    if device.type == "cpu":  # smoke-test size
        e, h, i, t = 8, 64, 32, 64
    gen = torch.Generator(device="cpu").manual_seed(0)
    experts = nn.Module()
    experts.gate_up_proj = nn.Parameter((torch.randn(e, 2 * i, h, generator=gen) * 0.02).to(device, torch.bfloat16))
    experts.down_proj = nn.Parameter((torch.randn(e, h, i, generator=gen) * 0.02).to(device, torch.bfloat16))
    experts.act_fn = nn.SiLU()
    x0 = torch.randn(t, h, generator=gen).to(device, torch.bfloat16)
    ids = torch.randint(0, e, (t, k), generator=gen).to(device)
    w0 = torch.rand(t, k, generator=gen).to(device)
    grad_y = torch.randn(t, h, generator=gen).to(device, torch.bfloat16)
    impls = args.impl
    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "torch": torch.__version__,
              "shape": dict(experts=e, hidden=h, width=i, top_k=k, tokens=t), "points": []}

    for f in args.zero_fractions:
        dead = torch.rand(t, k, generator=gen).to(device) < f
        for stage in (1, 2):
            experts.requires_grad_(stage == 2)
            ref = None
            for name, module in impls:
                experts.zeda_pieces = type("Compiled", (), {n: staticmethod(torch.compile(getattr(module.Pieces, n)))
                                                            for n in ("gather_live", "swiglu", "combine")})
                x = x0.clone().requires_grad_(True)
                w = w0.masked_fill(dead, 0).requires_grad_(True)

                def once():
                    experts.gate_up_proj.grad = experts.down_proj.grad = x.grad = w.grad = None
                    y = module.live_experts_forward(experts, x, ids, w)
                    y.backward(grad_y)
                    return y

                for _ in range(args.warmup):
                    y = once()
                times = []
                for _ in range(args.repeats):
                    if device.type == "cuda":
                        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                        start.record()
                        once()
                        end.record()
                        end.synchronize()
                        times.append(start.elapsed_time(end))
                    else:
                        import time

                        t0 = time.perf_counter()
                        once()
                        times.append((time.perf_counter() - t0) * 1e3)
                outs = [y.detach().float(), x.grad.float(), w.grad.float()]
                if stage == 2:
                    outs += [experts.gate_up_proj.grad.float(), experts.down_proj.grad.float()]
                point = {"impl": name, "zero_fraction": f, "stage": stage, "ms": round(statistics.median(times), 3)}
                if ref is None:
                    ref = outs
                else:
                    point["max_rel_diff"] = max(float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))
                                                for a, b in zip(outs, ref))
                result["points"].append(point)
                print(json.dumps(point), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
