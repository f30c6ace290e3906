"""GPU parity (device machine, vLLM 0.26 bundle): a tiny converted Qwen3-MoE generates the same
greedy tokens in skip mode (expert map, CUDA graphs on) as in the remap-to-expert-0 path and as
the HF reference; masked mode equals the original model.

    python3 benchmarks/gpu_parity.py --out $OUT/parity.json [--dtype float32] [--modes skip skip@tp2 skip@tp2ep]
Each vLLM mode runs in its own process (one engine per process). A mode may carry a parallel
layout: MODE@tpN (tensor parallel over N GPUs) or MODE@tpNep (plus --enable-expert-parallel, so
each rank holds E/N real experts and zero experts are -1 on every rank); each such mode is also
compared with the same mode on one GPU.

--quantization fp8 (vLLM's online per-tensor FP8) or fp8-block (the checkpoints block-quantized as
Qwen3-30B-A3B-FP8, 32 x 32 tiles at this size, routers unquantised): no HF reference (transformers
does not run these); instead skip mode without a zero slot (`skip0`, zero bias -1e4) must equal
masked mode, and in the block format both must equal the original checkpoint served by stock vLLM
(`original`); skip mode at zero bias +1 (`skip_bias`) must have a zero fraction above skip's.
Online per-tensor FP8 quantizes stock's router gate too (one weight scale over its E rows), a ZEDA
gate never (serve/models.py): there `original` routes on other logits and is reported, not matched.
Online per-tensor FP8 also scales each dense layer's activations by one maximum over the whole
batch, so one sequence's divergence reaches every other: its token parity is all-or-little.
In bf16 a random model's greedy tokens sit on near-ties that one rounding difference flips (H100,
2026-12-07: stock vLLM's own original matched masked mode on 6 of 8 prompts with CUDA graphs, 8 of 8
eager); `--model examples/tiny_moe` converts the pretrained quickstart model instead, whose
distributions are peaked. `--parallel N` runs N one-GPU engines side by side (each a fixed 1 GiB
KV cache):

    python3 benchmarks/gpu_parity.py --out $OUT/parity_fp8.json --quantization fp8-block --dtype bfloat16 \
        --modes original masked skip0 skip skip_bias remap --parallel 6 --model examples/tiny_moe
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.workers import run_worker  # noqa: E402

MODES = {  # name -> additional_config["zeda"]
    "skip": {"enabled": True, "zero_slots": "skip"},
    "remap": {"enabled": True, "zero_slots": "remap"},
    "masked": {"enabled": False},
    "skip0": {"enabled": True, "zero_slots": "skip", "zero_bias": -1e4},  # no zero slot at all
    "skip_bias": {"enabled": True, "zero_slots": "skip", "zero_bias": 1.0},
    "original": None,  # the original checkpoint, stock vLLM (no plugin involved)
}
QUANTIZATIONS = ("none", "fp8", "fp8-block")
PROMPTS = ["The quick brown fox jumps over", "def fibonacci(n):", "Mixture-of-experts models route each token",
           "In 1905, Einstein published", "import torch\nimport numpy as np\n", "Once upon a time, in a small village",
           "SELECT name, price FROM products WHERE", "The capital of France is"]
# teacher-forced texts: every mode scores the same tokens, so per-position log-probs compare even
# where greedy decoding diverges on a near-tie
SCORED = ['def mean(values):\n    """Return the arithmetic mean of a non-empty list."""\n    total = 0\n'
          '    for v in values:\n        total += v\n    return total / len(values)\n',
          "The library keeps its books on open shelves, sorted by subject. Readers may borrow up to "
          "five books at a time for three weeks, and may renew them once if nobody else has asked.",
          "Question: What is 12 plus 30? Answer: 42. Question: What is 7 times 6? Answer: 42."]


def parse_mode(mode: str) -> tuple[str, int, bool]:
    """'skip' -> ('skip', 1, False); 'skip@tp2' -> ('skip', 2, False); 'skip@tp2ep' -> ('skip', 2, True)."""
    base, _, layout = mode.partition("@")
    m = re.fullmatch(r"tp(\d+)(ep)?", layout) if layout else None
    if base not in MODES or (layout and m is None):
        raise SystemExit(f"gpu_parity: bad mode {mode!r} (MODE or MODE@tpN or MODE@tpNep, MODE in {list(MODES)})")
    return (base, int(m[1]), m[2] is not None) if m else (base, 1, False)


def worker(ckpt: str, mode: str, dtype: str, max_tokens: int, eager: bool = False, quantization: str = "none",
           kv_cache_bytes: int | None = None) -> None:
    from vllm import LLM, SamplingParams
    from transformers import AutoTokenizer

    base, tp, ep = parse_mode(mode)
    tok = AutoTokenizer.from_pretrained(ckpt)
    prompts = [{"prompt_token_ids": tok(p, add_special_tokens=False)["input_ids"]} for p in PROMPTS]
    t0 = time.time()
    kw = {} if MODES[base] is None else dict(additional_config={"zeda": MODES[base]},
                                             worker_extension_cls="vllm_zeda.serve.stats.ZedaWorkerExtension")
    if quantization == "fp8":
        kw["quantization"] = "fp8"
    if kv_cache_bytes:  # engines side by side: a fixed KV cache, no memory profile (the others' allocations would enter it)
        kw.update(kv_cache_memory_bytes=kv_cache_bytes, gpu_memory_utilization=0.05)
    else:
        kw.update(gpu_memory_utilization=0.3)
    llm = LLM(ckpt, dtype=dtype, max_model_len=256, enforce_eager=eager, tensor_parallel_size=tp,
              enable_expert_parallel=ep, **kw)
    init_s = time.time() - t0
    if MODES[base] is not None:
        llm.collective_rpc("zeda_reset_stats")
    outs = llm.generate(prompts, SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True))
    stats = llm.collective_rpc("zeda_stats")[0] if MODES[base] is not None else {}
    # slots a layer routes for exactly these tokens (prompts + one decode forward per further output
    # token); stats above it count rows vLLM did not mark as padding (CUDA-graph padding on 0.26's
    # V1 runner) or extra scheduled steps
    top_k = json.loads((Path(ckpt) / "config.json").read_text())["num_experts_per_tok"]
    expected = (sum(len(p["prompt_token_ids"]) for p in prompts) + len(prompts) * (max_tokens - 1)) * top_k
    texts = [{"prompt_token_ids": tok(t, add_special_tokens=False)["input_ids"]} for t in SCORED]
    scored = llm.generate(texts, SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=1))
    print("RESULT " + json.dumps({"mode": mode, "tensor_parallel_size": tp, "expert_parallel": ep, "init_s": init_s, "tokens": [list(o.outputs[0].token_ids) for o in outs],
                                  "scored": [position_logprobs(t["prompt_token_ids"], o.prompt_logprobs)
                                             for t, o in zip(texts, scored)],
                                  "stats": stats, "expected_slots_per_layer": expected,
                                  "cudagraph_mode": str(llm.llm_engine.vllm_config.compilation_config.cudagraph_mode)}))


def position_logprobs(ids: list[int], prompt_logprobs) -> list[list]:
    """[log-prob of the text's token, the most likely token] at each position after the first."""
    rows = []
    for tok_id, entry in zip(ids[1:], prompt_logprobs[1:]):
        top = min(entry.items(), key=lambda kv: kv[1].rank)[0]
        rows.append([entry[tok_id].logprob, top])
    return rows


def compare_scored(a: list | None, b: list | None) -> dict | None:
    """Two modes' teacher-forced log-probs of the same texts: how often their most likely token
    agrees, and the largest and mean gap between the log-probs they give the text's tokens."""
    if not a or not b:
        return None
    pairs = [(x, y) for ta, tb in zip(a, b) for x, y in zip(ta, tb)]
    gaps = [abs(x[0] - y[0]) for x, y in pairs]
    return {"positions": len(pairs), "top1_agree": sum(x[1] == y[1] for x, y in pairs) / len(pairs),
            "max_abs_logprob_gap": max(gaps), "mean_abs_logprob_gap": sum(gaps) / len(gaps)}


def hf_reference(ckpt: str, original: str, dtype: str, max_tokens: int) -> dict:
    import torch
    import vllm_zeda  # noqa: F401
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ckpt)
    td = getattr(torch, dtype)
    res = {}
    for name, path, masked in (("dynamic", ckpt, False), ("original", original, None)):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=td).cuda().eval()
        if masked is not None:
            model.zeda_set_mode(masked=masked)
            model.zeda_reset_stats()
        toks = []
        with torch.no_grad():
            for p in PROMPTS:
                ids = torch.tensor([tok(p, add_special_tokens=False)["input_ids"]], device="cuda")
                n = ids.shape[1]
                for _ in range(max_tokens):
                    ids = torch.cat([ids, model(ids).logits[0, -1].argmax().view(1, 1)], 1)
                toks.append(ids[0, n:].tolist())
        res[name] = toks
    return res


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--worker-timeout", type=float, default=150)
    p.add_argument("--modes", nargs="+", default=["skip", "remap", "masked"])
    p.add_argument("--worker", nargs=2, metavar=("CKPT", "MODE"))
    p.add_argument("--eager", action="store_true", help="no CUDA graphs, no torch.compile (debugging)")
    p.add_argument("--quantization", choices=QUANTIZATIONS, default="none")
    p.add_argument("--model", default=None,
                   help="a Qwen3-MoE checkpoint to convert (default: a random tiny one); in bf16 a random model's "
                        "greedy tokens sit on near-ties that rounding flips, a pretrained one's (examples/tiny_moe) do not")
    p.add_argument("--parallel", type=int, default=1,
                   help="engines at once on the GPU (one-GPU modes; each with a fixed 1 GiB KV cache)")
    p.add_argument("--kv-cache-bytes", type=int, default=None, help=argparse.SUPPRESS)  # set by --parallel
    a = p.parse_args()
    for m in a.modes:
        parse_mode(m)
    if a.worker:
        return worker(a.worker[0], a.worker[1], a.dtype, a.max_tokens, a.eager, a.quantization, a.kv_cache_bytes)
    from vllm_zeda.convert.inject import convert_checkpoint
    from vllm_zeda.testing.tiny import make_tiny_fp8_moe, make_tiny_moe

    work = Path(tempfile.mkdtemp())
    from vllm_zeda.errors import ZedaError

    original = Path(a.model) if a.model else make_tiny_moe(work / "orig", "qwen3_moe", seed=1)
    ckpt = work / "zeda"
    try:
        convert_checkpoint(original, ckpt, num_zero_experts=4, seed=3, progress=False)
    except ZedaError as e:  # --model: not a convertible checkpoint
        raise SystemExit(f"gpu_parity: {e}") from None
    if a.quantization == "fp8-block":  # the same quantizer on the same expert tensors: the same FP8 bits
        original, ckpt = (make_tiny_fp8_moe(d, work / f"{d.name}_fp8", block=32) for d in (original, ckpt))
    quantized = a.quantization != "none"
    result = {"quantization": a.quantization, "vllm": {},
              "hf": None if quantized else hf_reference(str(ckpt), str(original), a.dtype, a.max_tokens)}
    print("hf reference done" if not quantized else "checkpoints written", flush=True)
    if a.parallel > 1 and any(parse_mode(m)[1] > 1 for m in a.modes):
        raise SystemExit("gpu_parity: --parallel runs one-GPU modes only")

    def run_mode(mode: str) -> tuple[str, dict]:
        log = Path(a.out).with_name(f"{Path(a.out).stem}_{mode.replace('@', '_')}.log")
        served = original if parse_mode(mode)[0] == "original" else ckpt
        proc = run_worker([sys.executable, __file__, "--out", a.out, "--dtype", a.dtype, "--max-tokens",
                           str(a.max_tokens), "--worker", str(served), mode, "--quantization", a.quantization]
                          + ["--eager"] * a.eager + (["--kv-cache-bytes", str(1 << 30)] if a.parallel > 1 else []),
                          a.worker_timeout)
        out, err = proc.stdout, proc.stderr
        log.write_text(out + "\n----- stderr\n" + err)
        print(f"[{mode}] done, log {log}", flush=True)
        lines = [l for l in out.splitlines() if l.startswith("RESULT ")]
        return mode, (json.loads(lines[-1][7:]) if lines else {"error": err[-3000:]})

    with ThreadPoolExecutor(max_workers=max(1, a.parallel)) as pool:
        result["vllm"] = dict(pool.map(run_mode, a.modes))
    v, hf = result["vllm"], result["hf"]

    def same(a, b):
        return sum(x == y for x, y in zip(a, b)) if a and b else 0

    tokens = lambda mode: v.get(mode, {}).get("tokens")  # noqa: E731
    summary = {
        "skip_eq_remap": same(tokens("skip"), tokens("remap")),
        "prompts": len(PROMPTS),
        "skip_zero_fraction": v.get("skip", {}).get("stats", {}).get("zero_fraction"),
        "remap_zero_fraction": v.get("remap", {}).get("stats", {}).get("zero_fraction"),
    }
    if hf is not None:
        summary.update(skip_eq_hf_dynamic=same(tokens("skip"), hf["dynamic"]),
                       masked_eq_hf_original=same(tokens("masked"), hf["original"]))
    if "original" in v:  # stock vLLM on the original checkpoint
        summary.update(masked_eq_original=same(tokens("masked"), tokens("original")),
                       skip0_eq_original=same(tokens("skip0"), tokens("original")))
    if "masked" in v and "skip0" in v:
        summary["skip0_eq_masked"] = same(tokens("skip0"), tokens("masked"))
    scored = lambda mode: v.get(mode, {}).get("scored")  # noqa: E731
    for x, y in (("skip0", "masked"), ("masked", "original"), ("skip0", "original"), ("skip", "remap")):
        if scored(x) and scored(y):
            summary[f"scored_{x}_vs_{y}"] = compare_scored(scored(x), scored(y))
    for mode in ("skip0", "skip_bias"):
        if mode in v:
            summary[f"{mode}_zero_fraction"] = v[mode].get("stats", {}).get("zero_fraction")
    for mode in a.modes:  # parallel layouts: against HF and against the same mode on one GPU
        base, tp, ep = parse_mode(mode)
        if (tp > 1 or ep) and hf is not None:
            ref = hf["original"] if base == "masked" else hf["dynamic"]
            summary[f"{mode}_eq_{base}_tp1"] = same(v.get(mode, {}).get("tokens"), v.get(base, {}).get("tokens"))
            summary[f"{mode}_eq_hf"] = same(v.get(mode, {}).get("tokens"), ref)
            summary[f"{mode}_zero_fraction"] = v.get(mode, {}).get("stats", {}).get("zero_fraction")
    result["summary"] = summary
    Path(a.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
