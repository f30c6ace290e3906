"""Markdown tables for benchmarks/RESULTS.md from the JSON the device scripts write.

    python3 benchmarks/tables.py layer benchmarks/results/moe_layer_h200_2026-12-01b.json
    python3 benchmarks/tables.py e2e benchmarks/results/e2e_h200_2026-12-01b.json
    python3 benchmarks/tables.py route benchmarks/results/route_h200_2026-11-30e.json
    python3 benchmarks/tables.py tune benchmarks/results/tune_moe_h200_2026-11-30.json
    python3 benchmarks/tables.py profile | prefill-profile | spread <bench_e2e.py --profile-decode / -prefill JSON>
    python3 benchmarks/tables.py live | layer-kernels <bench_moe_layer.py JSON (--profile for layer-kernels)>
    python3 benchmarks/tables.py run-profile benchmarks/results/b256_run_h200_2026-12-01.json
"""
from __future__ import annotations

import json
import sys



def ideal_for(static: str, zeda: str) -> str:
    """The config a zeda target is held to: static top-K run at K x (1 - skip), e.g. static8 and
    zeda_s50 -> ideal4, static4 and zeda_s50 -> ideal2."""
    k, skip = int(static.removeprefix("static")), int(zeda.removeprefix("zeda_s")) / 100
    return f"ideal{round(k * (1 - skip))}"


def layer(data: dict) -> str:
    rows = data["rows"]
    has_map = "stock_map" in rows[0]
    out = []
    for shape in dict.fromkeys(r["shape"] for r in rows):
        shape_rows = [r for r in rows if r["shape"] == shape]
        tiles = shape_rows[0].get("tiles") == "shipped table"  # static_t / ideal_t timed apart
        head = ["tokens", "skip", "static", "ours"] + (["stock map"] if has_map else []) + \
               ["remap→0", "ideal"] + (["static_t", "ideal_t"] if tiles else []) + \
               ["ours/static", "ours/ideal"] + (["ours/ideal_t"] if tiles else []) + ["ours/remap", "max diff vs remap"]
        out += [f"**{shape}** (µs per call)", "", "| " + " | ".join(head) + " |", "|" + "---:|" * len(head)]
        for r in shape_rows:
            cells = [r["tokens"], f"{r['skip']:.2f}", r["static"], r["ours"]] + ([r["stock_map"]] if has_map else []) + \
                    [r["remap"], r["ideal"]] + ([r["static_t"], r["ideal_t"]] if tiles else []) + \
                    [f"{r['ours/static']:.3f}", f"**{r['ours/ideal']:.3f}**"] + \
                    ([f"**{r['ours/ideal_t']:.3f}**"] if tiles else []) + \
                    [f"{r['ours/remap']:.3f}", f"{r['ours_vs_remap_maxdiff']:.0e}"]
            out.append("| " + " | ".join(str(c) for c in cells) + " |")
        out.append("")
    return "\n".join(out)


def e2e(data: dict) -> str:
    configs = data["configs"]
    static = next((n for n in configs if n.startswith("static")), None)
    if static is None:
        raise KeyError("static<K>")
    base = configs[static]["workloads"]
    names = list(base)
    out = ["| config | " + " | ".join(names) + " |", "| --- |" + " ---: |" * len(names)]
    for name, r in configs.items():
        cells = []
        for w in names:
            e = r["workloads"][w]
            cell = f"{e['tok_per_s']:,.1f} ({e['tok_per_s'] / base[w]['tok_per_s']:.3f}x)"
            if "zero_fraction" in e:
                cell += f" z={e['zero_fraction']:.2f}"
            cells.append(cell)
        out.append(f"| {name} | " + " | ".join(cells) + " |")
    out += ["", "Share of the ideal's gain reached, (ours - static) / (ideal - static):", "",
            "| config | ideal | " + " | ".join(names) + " |", "| --- | --- |" + " ---: |" * len(names)]
    for name in configs:
        ideal = ideal_for(static, name) if name.startswith("zeda_s") and name != "zeda_s0" else None
        if ideal in configs:
            cells = []
            for w in names:
                gain = configs[name]["workloads"][w]["tok_per_s"] / base[w]["tok_per_s"] - 1
                ideal_gain = configs[ideal]["workloads"][w]["tok_per_s"] / base[w]["tok_per_s"] - 1
                cells.append(f"{gain / ideal_gain:.0%}" if abs(ideal_gain) > 0.02 else f"n/a (ideal {ideal_gain:+.1%})")
            out.append(f"| {name} | {ideal} | " + " | ".join(cells) + " |")
    return "\n".join(out)


# ours_lf / ours_lf_end: the first runs (2026-11-30), before the router put live slots first
LIVE_VARIANTS = ("ours", "ours_topk_order", "ours_lf", "ours_lf_end")


def live(data: dict) -> str:
    """bench_moe_layer.py --exact-zeros: each variant minus the ideal (µs a layer call), by token
    count and zero slots per token (K x skip)."""
    rows = data["rows"]
    k = rows[0].get("top_k", 8)  # the first run (2026-11-30) did not record it: the Qwen3 shape's 8
    out = ["| tokens, variant | " + " | ".join(str(z) for z in range(k)) + " |", "| --- |" + " ---: |" * k]
    for m in dict.fromkeys(r["tokens"] for r in rows):
        by_zero = {round(r["skip"] * k): r for r in rows if r["tokens"] == m}
        for v in LIVE_VARIANTS:
            if not any(v in r for r in by_zero.values()):
                continue
            cells = [f"{by_zero[z][v] - by_zero[z]['ideal']:+.1f}" if z in by_zero and v in by_zero[z] else ""
                     for z in range(k)]
            out.append(f"| {m}, {v} − ideal | " + " | ".join(cells) + " |")
    return "\n".join(out)


def layer_kernels(data: dict) -> str:
    """bench_moe_layer.py --profile: device µs a layer call by kernel group, per variant."""
    profiled = [r for r in data["rows"] if "kernels" in r]
    if not profiled:  # a layer run without --profile (or another bench's JSON): say so, not an empty table
        raise KeyError("kernels")
    out = []
    for r in profiled:
        names = list(r["kernels"])
        groups: dict[str, list[float]] = {}
        for i, n in enumerate(names):
            for kernel, us in r["kernels"][n].items():
                groups.setdefault(kernel_group(kernel, kernel[:40]), [0.0] * len(names))[i] += us
        out += [f"**{r['shape']}, {r['tokens']} tokens, skip {r['skip']:.3f}** (µs a call)", "",
                "| kernel | " + " | ".join(names) + " |", "| --- |" + " ---: |" * len(names)]
        out += [f"| {label} | " + " | ".join(f"{v:.2f}" for v in vals) + " |" for label, vals in groups.items()]
        if "idle_after" in r:  # where each variant's graph leaves the GPU idle, by the kernel before
            idle: dict[str, list[float]] = {}
            for i, n in enumerate(names):
                for kernel, us in r["idle_after"].get(n, {}).items():
                    idle.setdefault(kernel_group(kernel, kernel[:40]), [0.0] * len(names))[i] += us
            out += [f"| idle after: {label} | " + " | ".join(f"{v:.2f}" for v in vals) + " |" for label, vals in idle.items()]
            out.append("| **idle in all** | " + " | ".join(f"**{sum(v[i] for v in idle.values()):.2f}**"
                                                          for i in range(len(names))) + " |")
        out.append("")
    return "\n".join(out)


def route(data: dict) -> str:
    """Columns: every variant any row has (the gate's only up to 256 / 16 tokens: blank above);
    the fastest routing launch shape of each row in bold."""
    rows = data["rows"]
    names = list(dict.fromkeys(k for r in rows for k in r if k != "tokens"))
    out = ["| tokens | " + " | ".join(n.replace("zeda_route ", "") for n in names) + " |", "|---:|" + "---:|" * len(names)]
    for r in rows:
        best = min(r[n] for n in names if n.startswith("zeda_route b") and n in r)
        out.append(f"| {r['tokens']} | " + " | ".join(
            "" if n not in r else f"**{r[n]}**" if r[n] == best and n.startswith("zeda_route b") else str(r[n])
            for n in names) + " |")
    return "\n".join(out)


def tune(data: dict) -> str:
    out = ["| tokens | static, stock tiles | static, best | ours s=0.5, stock tiles | ours s=0.5, best | "
           "ours gain | best config for ours (M/N/K/group/warps/stages) |", "|---:|---:|---:|---:|---:|---:|---|"]
    for r in data["rows"]:
        c = r["ours_best_config"]
        cfg = "/".join(str(c[k]) for k in ("BLOCK_SIZE_M", "BLOCK_SIZE_N", "BLOCK_SIZE_K", "GROUP_SIZE_M", "num_warps", "num_stages"))
        out.append(f"| {r['tokens']} | {r['static_default']} | {r['static_best']} | {r['ours_default']} | {r['ours_best']} | "
                   f"{1 - r['ours_best'] / r['ours_default']:.1%} | {cfg} |")
    return "\n".join(out)


KERNEL_GROUPS = [  # (label, substring of the kernel name), first match wins
    ("fused-MoE GEMMs (fused_moe_kernel)", "fused_moe_kernel"), ("routing: vLLM topkGating", "topkGating"),
    ("routing: _zeda_route", "_zeda_route"), ("router gate GEMM (cuBLAS nvjet, E or E+Z outputs)", "nvjet_sm90_tst_64x8_64x16_2x1_v_bz_TNT"),
    ("router gate GEMM (cuBLAS nvjet, E or E+Z outputs)", "nvjet_sm90_tst_8x64_64x16_4x1_v_bz_TNN"),
    ("router gate GEMM: _gate_logits (E+Z outputs)", "_gate_logits"),
    ("gated SiLU: vLLM act_and_mul", "act_and_mul"), ("gated SiLU: _live_silu_and_mul", "_live_silu_and_mul"),
    ("sum over slots: vLLM moe_sum", "moe_sum_vec"), ("sum over slots: _live_moe_sum", "_live_moe_sum"),
    ("alignment: vLLM moe_align_block_size + count_and_sort", "moe_align_block_size"),
    ("alignment: vLLM moe_align_block_size + count_and_sort", "count_and_sort_expert_tokens"),
    ("alignment: gpu_align _count_live + _place_live", "_count_live"),
    ("alignment: gpu_align _count_live + _place_live", "_place_live"),
]


def kernel_group(kernel: str, other: str) -> str:
    """The KERNEL_GROUPS label of a kernel name, else `other`."""
    return next((label for label, key in KERNEL_GROUPS if key in kernel), other)


def profile(data: dict, key: str = "decode_profile") -> str:
    """Device µs by kernel group of bench_e2e's --profile-decode (a batch-1 decode step) or
    --profile-prefill (key "prefill_profile": one prefill step), a column per config."""
    configs = {n: r[key] for n, r in data["configs"].items() if "kernels" in r.get(key, {})}
    names = list(configs)
    groups: dict[str, list[float]] = {}
    for i, n in enumerate(names):
        for kernel, (_, us) in configs[n]["kernels"].items():
            groups.setdefault(kernel_group(kernel, "everything else"), [0.0] * len(names))[i] += us
    decode = key == "decode_profile"
    batch = next(iter(configs.values()), {}).get("batch", 1)
    title = f"µs per decode step (batch {batch}, 48 layers)" if decode else "µs of one prefill step (48 layers)"
    out = [f"| {title} | " + " | ".join(names) + " |", "| --- |" + " ---: |" * len(names)]
    order = [lab for lab, _ in KERNEL_GROUPS] + ["everything else"]
    for label, vals in sorted(groups.items(), key=lambda kv: order.index(kv[0])):
        out.append(f"| {label} | " + " | ".join(f"{v:,.1f}" for v in vals) + " |")
    total, wall = ("kernel_us_per_step", "wall_us_per_step") if decode else ("kernel_us", "wall_us")
    out.append("| **all GPU kernels** | " + " | ".join(f"**{configs[n][total]:,.1f}**" for n in names) + " |")
    if any(configs[n].get("zero_fraction") is not None for n in names):
        out.append("| zero fraction of the profiled steps | " + " | ".join(
            "" if configs[n].get("zero_fraction") is None else f"{configs[n]['zero_fraction']:.3f}" for n in names) + " |")
    wall_label = "wall time per step, profiler on" if decode else "wall time of the step's generate call, profiler on"
    out.append(f"| {wall_label} | " + " | ".join(f"{configs[n][wall]:,.1f}" for n in names) + " |")
    return "\n".join(out)


def spread(data: dict) -> str:
    """How the calls of the MoE kernels spread in device µs (bench_e2e's profiles, call_spread):
    a row per config, profile and kernel."""
    out = ["| config | profile | kernel | calls | 5% | 25% | 50% | 75% | 95% | max |", "| --- | --- | --- |" + " ---: |" * 7]
    for name, r in data["configs"].items():
        for key in ("decode_profile", "prefill_profile"):
            for kernel, sp in r.get(key, {}).get("call_spread", {}).items():
                out.append(f"| {name} | {key.split('_')[0]} | {kernel[:60]} | {sp['calls']} | "
                           + " | ".join(f"{q:.2f}" for q in sp["quantiles_us"]) + f" | {sp['max_us']:.2f} |")
    return "\n".join(out)


RUNNER_SCOPES = ("preprocess", "forward", "postprocess", "sample", "bookkeep")


def run_profile(data: dict) -> str:
    """bench_e2e --profile-run: where a whole profiled run's time goes, µs per step, a column per
    config and workload: vLLM's model-runner scopes, the engine core's time between them, the
    GPU's busy and idle time (kernel_profile.timeline_summary)."""
    runs = {f"{n}, {w}": p for n, r in data["configs"].items() for w, p in r.get("run_profile", {}).items()
            if p.get("steps")}
    if not runs:
        raise KeyError("run_profile")
    names = list(runs)

    def per_step(p: dict, us: float) -> str:
        return f"{us / p['steps']:,.1f}"

    out = ["| µs per step | " + " | ".join(names) + " |", "| --- |" + " ---: |" * len(names)]
    out.append("| steps | " + " | ".join(str(runs[n]["steps"]) for n in names) + " |")
    out.append("| wall | " + " | ".join(per_step(runs[n], runs[n]["wall_us"]) for n in names) + " |")
    for scope in RUNNER_SCOPES:
        out.append(f"| runner: {scope} | " + " | ".join(
            per_step(runs[n], runs[n]["scopes_us"].get(scope, [0, 0.0])[1]) for n in names) + " |")
    out.append("| between runner scopes | " + " | ".join(per_step(runs[n], runs[n]["outside_runner_us"])
                                                        for n in names) + " |")
    out.append("| GPU busy | " + " | ".join(per_step(runs[n], runs[n]["gpu_busy_us"]) for n in names) + " |")
    out.append("| GPU idle | " + " | ".join(per_step(runs[n], runs[n]["gpu_idle_us"]) for n in names) + " |")
    out.append("| GPU idle in long gaps (count, total µs) | " + " | ".join(
        f"{runs[n]['gpu_idle_gaps']['count']}, {runs[n]['gpu_idle_gaps']['total_us']:,.0f}" for n in names) + " |")
    return "\n".join(out)


TABLES = {"layer": layer, "e2e": e2e, "route": route, "tune": tune, "profile": profile,
          "prefill-profile": lambda data: profile(data, "prefill_profile"), "spread": spread, "live": live,
          "layer-kernels": layer_kernels, "run-profile": run_profile}

if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in TABLES:
        sys.exit(f"usage: python3 benchmarks/tables.py {{{'|'.join(TABLES)}}} RESULTS.json")
    name, path = sys.argv[1:]
    try:
        data = json.loads(open(path).read())
        print(TABLES[name](data))
    except (OSError, ValueError) as exc:
        sys.exit(f"tables.py: cannot read {path}: {exc}")
    except (KeyError, TypeError, IndexError) as exc:
        sys.exit(f"tables.py: {path} is not the JSON a '{name}' table is made from (no {exc})")
