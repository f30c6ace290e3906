"""End-to-end vLLM throughput on a Qwen3-30B-A3B-shaped model with dummy weights (device machine);
`--shape glm-4.7-flash`: GLM-4.7-Flash's shape instead (47 layers, MLA, 64 experts top-4 with
sigmoid routing and one shared expert; Z = 32), whose configs are static4 / ideal2 / zeda.

Configs, each in its own engine process, measured in one run:
  static8   stock vLLM, Qwen3MoeForCausalLM, top-8 (no plugin involved)
  ideal4    stock vLLM, top-4: the ideal for skip 0.5 (ideal2: top-2, for skip 0.75)
  zeda      the plugin, Z = 64 zero experts, --enable-zeda; one engine serves every --targets
            skip fraction: the zero bias is set through the `zeda_set_zero_bias` worker RPC and
            calibrated by bisection on the measured fraction, separately for prefill and decode
            (dummy routers give near-equal logits, so the useful bias range is tiny, and route
            the two differently), and for the batch-1 and batch-256 workloads on their own
            prompts (OWN_PROBES).
            Reported as zeda_s0, zeda_s50, ... in --targets order.
            Target 0 uses bias -1e4: no zero slot at all, so it measures the plugin's overhead.
Workloads: prefill (64 x 2048 prompt tokens, 1 output: input tok/s), decode at batch 1, 8, 16,
256 (output tok/s). Each workload runs a short warm-up, then three timed runs (--quick: two; batch
256 four either way, MIN_RUNS); the fastest is reported and all times are kept. Every engine uses
the same CUDA-graph capture sizes (CAPTURE_SIZES) to keep start-up short.
--profile-decode adds, per config and target, the GPU kernels of one batch-1 decode step (device
µs by kernel name, torch.profiler in the worker: kernel_profile.py; --profile-batch N: of N); --profile-prefill those of one
prefill step of 16,384 prompt tokens (8 x 2,048). --workloads times only the ones named.
--profile-run W... adds one more run of each named workload with CPU ops and GPU kernels
profiled in the worker: vLLM's model-runner scopes per step, the engine core's time between them,
the GPU's busy and idle time (kernel_profile.run_timeline).

    python3 benchmarks/bench_e2e.py --out $OUT/e2e.json [--configs static8 ideal4 zeda] [--targets 0 0.5]
                                    [--profile-decode] [--profile-prefill] [--workloads prefill ...]
                                    [--profile-run decode_b256] [--tp 2 [--ep]]
--tp N runs every engine tensor-parallel over N GPUs, --ep adds --enable-expert-parallel (each rank
holds E/N real experts). The zero fraction is read from rank 0: every rank routes every token.
--quantization fp8 | fp8-block: every engine's experts in FP8 (QUANTIZATIONS, below).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.workers import run_worker  # noqa: E402

E, Z = 128, 64  # the Qwen3 shape's; a shape's own in SHAPES
SHAPE = dict(
    architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe", vocab_size=151936, hidden_size=2048,
    num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4, head_dim=128, intermediate_size=6144,
    moe_intermediate_size=768, num_experts=E, num_experts_per_tok=8, norm_topk_prob=True, decoder_sparse_step=1,
    mlp_only_layers=[], max_position_embeddings=8192, rms_norm_eps=1e-6, rope_theta=1e6, tie_word_embeddings=False,
    torch_dtype="bfloat16", hidden_act="silu", attention_bias=False,
)

# GLM-4.7-Flash (zai-org/GLM-4.7-Flash config.json, as vLLM's tests and the ZEDA authors' scripts
# give it): layer 0 dense, layers 1-46 MoE; the MTP layer is not built.
GLM47_FLASH = dict(
    architectures=["Glm4MoeLiteForCausalLM"], model_type="glm4_moe_lite", vocab_size=154880, hidden_size=2048,
    num_hidden_layers=47, num_attention_heads=20, num_key_value_heads=20, intermediate_size=10240,
    moe_intermediate_size=1536, n_routed_experts=64, num_experts_per_tok=4, n_shared_experts=1, n_group=1,
    topk_group=1, topk_method="noaux_tc", routed_scaling_factor=1.8, norm_topk_prob=True, first_k_dense_replace=1,
    mlp_layer_types=["dense"] + ["sparse"] * 46, q_lora_rank=768, kv_lora_rank=512, qk_nope_head_dim=192,
    qk_rope_head_dim=64, v_head_dim=256, max_position_embeddings=202752, rms_norm_eps=1e-5, rope_theta=1e6,
    tie_word_embeddings=False, torch_dtype="bfloat16", hidden_act="silu", attention_bias=False,
)
SHAPES = {  # name: (config, E, Z, static top-K, description)
    "qwen3-30b-a3b": (SHAPE, 128, 64, 8, "Qwen3-30B-A3B (48 layers, E=128, top-8, H=2048, I=768), dummy weights, bf16"),
    "glm-4.7-flash": (GLM47_FLASH, 64, 32, 4, "GLM-4.7-Flash (47 layers, MLA, E=64 + 1 shared, top-4 sigmoid, H=2048, "
                                                "I=1536), dummy weights, bf16"),
}


CONFIGS = {
    "static8": dict(top_k=8),
    "static4": dict(top_k=4),
    "ideal4": dict(top_k=4),
    "ideal2": dict(top_k=2),
    "zeda": dict(zeda=True),
}
CAPTURE_SIZES = [1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256]
SHORT_CAPTURE_SIZES = [1, 8, 16, 32, 256]  # --quick: the batch sizes the workloads and probes run at
WORKLOADS = {  # name: (num prompts, prompt len, output len)
    "prefill": (64, 2048, 1),
    "decode_b1": (1, 16, 256),
    "decode_b8": (8, 16, 256),
    "decode_b16": (16, 16, 256),
    "decode_b256": (256, 16, 128),
}
MAX_BATCHED = 16384  # max_num_batched_tokens: a prefill step holds up to this many prompt tokens
# Timed runs at least, whatever --quick says: on the H200 every engine's batch-256 runs took
# either ~2.75 s or 3.3-4.6 s (runs G, H, I, the skip-0.75 run: one of two slow, sometimes both;
# cause unknown, the warm-up of 8 tokens took 2.1 s too), so two runs often held no clean one
MIN_RUNS = {"decode_b256": 4}
# --quantization: "fp8" is vLLM's online per-tensor FP8 (`LLM(quantization="fp8")`: bf16 weights
# quantised at load, dynamic per-tensor activation scales); "fp8-block" writes the checkpoint
# config of Qwen3-30B-A3B-FP8 (128 x 128 weight blocks, dynamic per-token-group activations),
# whose dummy weights vLLM makes in that layout. Routers stay unquantised in the block format, as
# in Qwen's release (bf16 router weights): testing.tiny.fp8_block_config.
QUANTIZATIONS = ("none", "fp8", "fp8-block")
# --temperature (set in each worker process). 0, greedy, is how every table before 2026-12-07 ran.
# With dummy weights greedy decoding collapses: the sequences of a batch soon generate the same
# tokens, a decode step then routes to a handful of experts, and how few depends on each engine's
# own dummy router. On an H100 (FP8, batch 8, 2026-12-07) the ZEDA engine at skip 0 spent 90 µs a
# layer in fused_moe_kernel, what random routing costs in the layer bench (91), while stock top-4
# spent 34: engines then differ in routing, not in kernels. At 1 every token is sampled from the
# near-uniform dummy distribution and routing spreads as in real traffic, alike in every engine.
TEMPERATURE = 0.0


def write_model(root: Path, name: str, shape: str = "qwen3-30b-a3b", quantization: str = "none") -> Path:
    from vllm_zeda.testing.tiny import byte_tokenizer, fp8_block_config

    base, e, z, k, _ = SHAPES[shape]
    c = CONFIGS[name]
    cfg = dict(base, num_experts_per_tok=c.get("top_k", k))
    if quantization == "fp8-block":
        cfg["quantization_config"] = fp8_block_config(128, [f"model.layers.{i}.mlp.gate"
                                                             for i in range(cfg["num_hidden_layers"])])
    if c.get("zeda"):
        arch = base["architectures"][0]
        cfg.update(architectures=["Zeda" + arch], model_type="zeda_" + base["model_type"],
                   zeda={"format_version": 1, "base_architecture": arch, "num_real_experts": e,
                         "num_zero_experts": z, "zero_expert_type": "zero", "target_zero_fraction": 0.5})
    d = root / name
    d.mkdir(parents=True)
    (d / "config.json").write_text(json.dumps(cfg))
    byte_tokenizer().save_pretrained(d)
    return d


def probe(llm, bias, prompts, sp) -> float:
    llm.collective_rpc("zeda_set_zero_bias", args=(bias,))
    llm.collective_rpc("zeda_reset_stats")
    llm.generate(prompts, sp, use_tqdm=False)
    return llm.collective_rpc("zeda_stats")[0]["zero_fraction"]


# kind: (prompts, prompt len, output len). A probe's zero fraction counts its prompt tokens too, and
# dummy routers send fewer prompt tokens than decode tokens to zero experts: the decode probe keeps
# its prompt tokens' share near the decode workloads' (6% at batch 1 and 16, 11% at 256); with
# (16, 16, 32), 33% prompt tokens, the batch-1 and -16 workloads measured z 0.56-0.57 at target
# 0.5 (0.80-0.81 at 0.75).
PROBES = {"prefill": (32, 64, 4), "decode": (16, 4, 64)}
# Workloads calibrated on their own prompts instead. A single sequence's zero fraction is its own:
# with dummy weights greedy decoding settles into a few tokens whose routing every step repeats, so
# a bias that gives 0.50 over the decode probe's 16 sequences gave 0.26 on the batch-1 workload's
# one (2026-12-01, H200). Batch 256 strays less but still strays: at the decode probe's bias for
# 0.5 it read 0.49-0.56, for 0.75 it read 0.80 (2026-12-01, H200). Calibrating on the workload
# itself costs up to ~20 of its runs (bisect_bias stops within 0.005 of the target): up to ~20 s at
# batch 1, ~60 s at batch 256 per target.
OWN_PROBES = ("decode_b1", "decode_b256")


def bias_kind(workload: str) -> str:
    """Which calibrated zero bias a workload runs at."""
    return workload if workload in OWN_PROBES else ("prefill" if workload == "prefill" else "decode")


def make_prompts(g, n: int, plen: int) -> list[dict]:
    import torch

    return [{"prompt_token_ids": torch.randint(0, 250, (plen,), generator=g).tolist()} for _ in range(n)]


def bisect_bias(measure, target: float, tol: float = 0.005, steps: int = 14) -> tuple[float, float]:
    """(bias, its zero fraction) with the fraction within `tol` of `target`, or the last of `steps`
    bisections. `measure(bias)` returns the zero fraction at that bias, non-decreasing in it. Dummy
    weights make router logits nearly equal, so the useful bias range is tiny and unknown in
    advance: grow a bracket from ±1e-6 by 4x, then bisect. Every measured bias is one probe run,
    so stopping at `tol` saves runs (a batch-256 probe takes ~3 s)."""
    lo, hi = -1e-6, 1e-6
    while (z := measure(hi)) < target and hi < 1e3:
        hi *= 4
    if abs(z - target) <= tol:
        return hi, z
    while (z := measure(lo)) > target and lo > -1e3:
        lo *= 4
    if abs(z - target) <= tol:
        return lo, z
    for _ in range(steps):
        mid = (lo + hi) / 2
        z = measure(mid)
        if abs(z - target) <= tol:
            break
        lo, hi = (mid, hi) if z < target else (lo, mid)
    return mid, z


def calibrate(llm, target, prompts: list[dict], olen: int, kind: str) -> float:
    """Zero bias giving `target` zero fraction over `prompts` (a prefill-like or a decode-like
    probe, or a workload's own: dummy routers route prompt and decode tokens differently, one bias
    gave 0.49 on prefill and 0.79 on decode), by `bisect_bias` over probe runs."""
    from vllm import SamplingParams

    if target <= 0.0 or target >= 1.0:
        return -1e4 if target <= 0.0 else 1e4
    sp = SamplingParams(max_tokens=olen, temperature=TEMPERATURE, ignore_eos=True)
    bias, z = bisect_bias(lambda b: probe(llm, b, prompts, sp), target)
    print(f"calibrated {kind} bias {bias:.3e} -> {z:.3f} (target {target})", flush=True)
    return bias


def run_workloads(llm, label: str, prompts: dict, biases: dict | None, runs: int = 3) -> dict:
    """Every workload in `prompts` ({name: its prompts}): one short warm-up (at most 8 output
    tokens: the same batch shapes), then `runs` timed runs (MIN_RUNS at least), the fastest
    reported (a one-off ~1-1.4 s stall hit single runs of every config on 2026-11-23; two timed
    runs outvote one). With `biases` (a ZEDA engine) each workload runs at its `bias_kind`'s."""
    from vllm import SamplingParams

    out = {}
    for wname, wprompts in prompts.items():
        n, plen, olen = WORKLOADS[wname]
        sp = SamplingParams(max_tokens=olen, temperature=TEMPERATURE, ignore_eos=True)
        if biases:
            llm.collective_rpc("zeda_set_zero_bias", args=(biases[bias_kind(wname)],))
        t = time.perf_counter()
        llm.generate(wprompts, SamplingParams(max_tokens=min(olen, 8), temperature=TEMPERATURE, ignore_eos=True), use_tqdm=False)
        warmup = time.perf_counter() - t
        times = []
        for attempt in range(max(runs, MIN_RUNS.get(wname, 0))):
            if biases:
                llm.collective_rpc("zeda_reset_stats")
            llm.collective_rpc("bench_gc_collect")
            gc.collect()
            t = time.perf_counter()
            llm.generate(wprompts, sp, use_tqdm=False)
            times.append(time.perf_counter() - t)
        dt = min(times)
        tok = n * plen if wname == "prefill" else n * olen
        entry = {"seconds": round(dt, 3), "tok_per_s": round(tok / dt, 1), "all_seconds": [round(x, 3) for x in times],
                 "warmup_seconds": round(warmup, 3),
                 "unit": "input tok/s" if wname == "prefill" else "output tok/s"}
        if biases:
            stats = llm.collective_rpc("zeda_stats")[0]
            entry["zero_fraction"] = round(stats["zero_fraction"], 4)
            # by layer too (the last timed run): at batch 1 the zero slots' cost depends on how
            # the live slots spread over layers, not only on their mean
            entry["zero_fraction_by_layer"] = [round(x["zero_slots"] / max(x["total_slots"], 1), 3)
                                               for x in stats.get("layers", [])]
        out[wname] = entry
        print(label, wname, entry, flush=True)
    return out


def profile_run(llm, prompts: list[dict], olen: int) -> dict:
    """One more run of a workload with CPU ops and GPU kernels profiled in the worker
    (kernel_profile.run_timeline: the model runner's scopes, the time outside them, the GPU's busy
    and idle time), plus the run's wall seconds as generate() saw them. The profiler's own cost
    per CPU op slows the host side of this run: compare engines' profiled runs with each other,
    not with timed runs."""
    from vllm import SamplingParams

    llm.collective_rpc("bench_gc_collect")
    llm.collective_rpc("bench_timeline_start")
    t = time.perf_counter()
    llm.generate(prompts, SamplingParams(max_tokens=olen, temperature=TEMPERATURE, ignore_eos=True), use_tqdm=False)
    wall = time.perf_counter() - t
    return dict(llm.collective_rpc("bench_timeline_stop")[0], generate_s=round(wall, 3))


def worker(model_dir: str, name: str, a) -> None:
    global TEMPERATURE
    TEMPERATURE = a.temperature
    if a.profile_run:  # vLLM's model-runner scopes, read when the engine starts (the engine core inherits it)
        os.environ["VLLM_CUSTOM_SCOPES_FOR_PROFILING"] = "1"
    import torch
    from vllm import LLM

    from benchmarks.kernel_profile import decode_step_kernels, prefill_step_kernels

    targets, quick, tp, ep = a.targets, a.quick, a.tp, a.ep
    needs_bias = {bias_kind(w) for w in a.workloads}  # zero biases to calibrate
    needs_bias |= {"decode"} if a.profile_decode else set()
    needs_bias |= {"prefill"} if a.profile_prefill else set()
    zeda = CONFIGS[name].get("zeda", False)
    # benchmark-only worker RPCs (kernel_profile.py); for zeda also the plugin's zero-bias dial:
    # a device tensor read by the captured graphs, set per target through the RPC
    kw = dict(worker_extension_cls="benchmarks.kernel_profile." + ("ZedaProfileExtension" if zeda else "KernelProfileExtension"))
    if a.quantization == "fp8":
        kw["quantization"] = "fp8"
    if zeda:
        kw["additional_config"] = {"zeda": {"enabled": True, "zero_bias": 1e-9}}
    t0 = time.time()
    llm = LLM(model_dir, load_format="dummy", dtype="bfloat16", max_model_len=4096, gpu_memory_utilization=0.88,
              max_num_seqs=256, max_num_batched_tokens=MAX_BATCHED, tensor_parallel_size=tp, enable_expert_parallel=ep,
              # every run repeats the warm-up's prompts: with prefix caching on, timed runs would skip
              # the prefill (2 x H200 at TP=2 have room to cache all 131k prefill tokens) and take
              # other batch shapes than the warm-up did
              enable_prefix_caching=False,
              compilation_config={"cudagraph_capture_sizes": SHORT_CAPTURE_SIZES if quick else CAPTURE_SIZES}, **kw)
    init_s = round(time.time() - t0, 1)
    g = torch.Generator().manual_seed(0)  # the same prompts in every engine and at every target
    prompts = {w: make_prompts(g, *WORKLOADS[w][:2]) for w in WORKLOADS if w in a.workloads}
    probes = {kind: (make_prompts(g, n, plen), olen) for kind, (n, plen, olen) in PROBES.items() if kind in needs_bias}
    probes.update({w: (prompts[w], WORKLOADS[w][2]) for w in OWN_PROBES if w in needs_bias})
    for target in (targets if zeda else [None]):
        label = name if target is None else f"zeda_s{round(target * 100)}"
        res = {"config": label, "init_s": init_s}
        biases = {kind: calibrate(llm, target, *probe_set, kind) for kind, probe_set in probes.items()} if zeda else None
        if biases:
            res["zero_bias"] = biases
        res["workloads"] = run_workloads(llm, label, prompts, biases, runs=2 if quick else 3)
        profiles = {"decode_profile": a.profile_decode, "prefill_profile": a.profile_prefill}
        for key in (k for k, on in profiles.items() if on):
            try:  # each at its workload's bias
                if biases:
                    llm.collective_rpc("zeda_set_zero_bias", args=(biases["decode" if key == "decode_profile" else "prefill"],))
                if key == "decode_profile":
                    res[key] = decode_step_kernels(llm, list(range(1, 17)), zeda=zeda, batch=a.profile_batch,
                                                   temperature=TEMPERATURE)
                else:  # one step of max_num_batched_tokens prompt tokens
                    plen = WORKLOADS["prefill"][1]
                    res[key] = prefill_step_kernels(
                        llm, [torch.randint(0, 250, (plen,), generator=g).tolist() for _ in range(MAX_BATCHED // plen)],
                        zeda=zeda)
            except Exception as exc:  # the throughput numbers above still count
                res[key] = {"error": f"{type(exc).__name__}: {exc}"}
            print(label, key, {k: v for k, v in res[key].items() if k not in ("kernels", "call_spread")}, flush=True)
        for w in a.profile_run:
            if biases:
                llm.collective_rpc("zeda_set_zero_bias", args=(biases[bias_kind(w)],))
            try:
                res.setdefault("run_profile", {})[w] = profile_run(llm, prompts[w], WORKLOADS[w][2])
            except Exception as exc:  # the throughput numbers above still count
                res["run_profile"][w] = {"error": f"{type(exc).__name__}: {exc}"}
            print(label, "run_profile", w, {k: v for k, v in res["run_profile"][w].items() if k != "cpu_ops"}, flush=True)
        print("RESULT " + json.dumps(res), flush=True)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--shape", choices=list(SHAPES), default="qwen3-30b-a3b")
    p.add_argument("--configs", nargs="+", default=None,
                   help="default: static8 ideal4 zeda (Qwen3 shape), static4 ideal2 zeda (GLM-4.7-Flash); the first is the baseline")
    p.add_argument("--targets", nargs="+", type=float, default=[0.0, 0.5])
    p.add_argument("--worker", nargs=2)
    p.add_argument("--profile-decode", action="store_true")
    p.add_argument("--profile-batch", type=int, default=1, help="sequences in the --profile-decode step")
    p.add_argument("--profile-prefill", action="store_true",
                   help="device µs by kernel of one prefill step of max_num_batched_tokens prompt tokens")
    p.add_argument("--workloads", nargs="+", choices=list(WORKLOADS), default=list(WORKLOADS),
                   help="the workloads to time (default: all)")
    p.add_argument("--profile-run", nargs="+", choices=list(WORKLOADS), default=[], metavar="WORKLOAD",
                   help="after the timed runs, one more run of each with CPU ops and GPU kernels profiled in the "
                        "worker: where its wall time goes (vLLM's model-runner scopes, the GPU's idle time)")
    p.add_argument("--quick", action="store_true", help="4 CUDA-graph sizes and 2 timed runs per workload")
    p.add_argument("--timeout", type=float, default=240, help="seconds per engine, plus 90 per zeda target")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size of every engine")
    p.add_argument("--ep", action="store_true", help="with --tp N: expert parallelism over the N GPUs")
    p.add_argument("--temperature", type=float, default=0.0,
                   help="sampling temperature of every run (default 0, greedy; 1: routing spreads as in real traffic, TEMPERATURE)")
    p.add_argument("--quantization", choices=QUANTIZATIONS, default="none",
                   help="fp8: vLLM's online per-tensor FP8; fp8-block: Qwen3-30B-A3B-FP8's 128x128 block format")
    a = p.parse_args()
    if a.profile_batch < 1:
        p.error(f"--profile-batch must be at least 1, got {a.profile_batch}")
    if set(a.profile_run) - set(a.workloads):
        p.error(f"--profile-run {' '.join(sorted(set(a.profile_run) - set(a.workloads)))}: not among --workloads")
    if a.configs is None:
        a.configs = ["static8", "ideal4", "zeda"] if a.shape == "qwen3-30b-a3b" else ["static4", "ideal2", "zeda"]
    if a.worker:
        return worker(*a.worker, a)
    import torch
    import vllm

    root = Path(tempfile.mkdtemp())
    results = {"meta": {"device": torch.cuda.get_device_name(), "vllm": vllm.__version__, "date": time.strftime("%Y-%m-%d"),
                        "shape": SHAPES[a.shape][4], "zero_experts": SHAPES[a.shape][2], "tensor_parallel_size": a.tp, "expert_parallel": a.ep,
                        "gpus": torch.cuda.device_count(), "quantization": a.quantization,
                        "temperature": a.temperature}, "configs": {}}
    for name in a.configs:
        d = write_model(root, name, a.shape, a.quantization)
        log = Path(a.out).with_name(f"e2e_{name}.log")
        timeout = a.timeout + (90 * len(a.targets) if CONFIGS[name].get("zeda") else 0)
        proc = run_worker([sys.executable, __file__, "--out", a.out, "--worker", str(d), name,
                           "--targets", *map(str, a.targets), "--tp", str(a.tp)] + ["--ep"] * a.ep
                          + ["--profile-decode"] * a.profile_decode + ["--profile-prefill"] * a.profile_prefill
                          + ["--profile-batch", str(a.profile_batch)]
                          + (["--profile-run", *a.profile_run] if a.profile_run else [])
                          + ["--quick"] * a.quick + ["--workloads", *a.workloads]
                          + ["--quantization", a.quantization, "--temperature", str(a.temperature)], timeout)
        out, err = proc.stdout, proc.stderr
        log.write_text(out + "\n----- stderr\n" + err[-20000:])
        lines = [json.loads(l[7:]) for l in out.splitlines() if l.startswith("RESULT ")]
        for r in lines:
            results["configs"][r["config"]] = r
        if not lines:
            results["configs"][name] = {"error": err[-2000:]}
        print(name, "done" if lines else "FAILED", flush=True)
        Path(a.out).write_text(json.dumps(results, indent=1))
    key = "vs_" + a.configs[0]  # the baseline: the base model's static top-K
    base = results["configs"].get(a.configs[0], {}).get("workloads", {})
    for name, r in results["configs"].items():
        for w, e in r.get("workloads", {}).items():
            if w in base:
                e[key] = round(e["tok_per_s"] / base[w]["tok_per_s"], 3)
    Path(a.out).write_text(json.dumps(results, indent=1))
    print(json.dumps({n: {w: (e["tok_per_s"], e.get(key), e.get("zero_fraction")) for w, e in r.get("workloads", {}).items()}
                      for n, r in results["configs"].items()}, indent=1))


if __name__ == "__main__":
    main()
