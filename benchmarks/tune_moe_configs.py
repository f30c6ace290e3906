"""Fused-MoE Triton tile configs for an expert shape on this GPU (bf16, or FP8 with --quant): a candidate search
(device machine, vLLM bundle). Shapes (--shape, bench_moe_layer.SHAPES): Qwen3-30B-A3B (E=128,
N=768, top-8; the default) and GLM-4.7-Flash (E=64, N=1536, top-4).

vLLM 0.26 ships no `E=128,N=768,device_name=NVIDIA_H100_80GB_HBM3.json`, so on an H100 every MoE
layer of Qwen3's shape runs `get_default_config`; for GLM's it ships the H100's and not the H200's.
Candidates: every distinct config of vLLM's own tables for the shape on the SM90 GPUs (H200, H100:
same chip), vLLM's default for each batch size, and a few neighbours. Each candidate is timed per
batch size through vLLM's modular kernel (`bench_moe_layer.make_kernel`) for

  static   stock TritonExperts, top-K routing
  ours     ZedaTritonExperts, half the slots on zero experts (the ZEDA operating point; exactly
           half of each routing's, bench_moe_layer.zero_slots), given
           what the plugin's router hands over (bench_moe_layer.router_handover)

median µs over CUDA-graph replays of 8 rotating routings. "Stock" is the config vLLM itself runs
at that batch size on this GPU: its own table's entry where it ships one (vLLM 0.26: for the H200,
not the H100), else `get_default_config`; the grid records that table (meta.vllm_table). Writes the
full grid to --out and, into --table-dir, vLLM-format tables (batch size -> config) per variant:
the fastest candidate where it beats stock by more than --min-gain (a best-of-25 pick carries
noise), else stock's config; the ours table takes only tiles at most --static-within slower than
stock's in the static run (ours at skip 0: a tile tuned at half the slots must not lose with
none), and among those the fastest one no slower than stock's at skip 0 unless that one is more
than --skip0-trade (3%) slower at skip 0.5; where the slot assignment is sort-free only
BLOCK_SIZE_M 16, GROUP_SIZE_M 1 tiles (`slot_block_tiles`).
Both comparisons use stock's own timing in the candidate sweep. Above 512 tokens a config
that start-up compiles anyway (CUDA-graph capture, the profile run) is kept where it is within 1%
of that pick (each other config is a first-use compile while serving).
The shipped table (vllm_zeda/moe_configs/) is the "ours" table; rebuild it from a grid without a
GPU (tests/test_tuned_configs.py checks that this reproduces it):

    python3 benchmarks/tune_moe_configs.py --out $OUT/tune.json --table-dir $OUT/tables [--shape glm47_flash]
    python3 benchmarks/tune_moe_configs.py --table-from benchmarks/results/tune_moe_h100_2026-11-23.json \
        --table-dir vllm_zeda/moe_configs --variants ours      # and tune_moe_{,glm_}h200_2026-11-30.json
--quant fp8 | fp8-block tunes the FP8 layer (bench_moe_layer.quantize_experts; vLLM's FP8 tables
and defaults seed the candidates; block FP8 only takes N tiles dividing 128); its tables carry
vLLM's dtype / block_shape name, which the plugin's lookup (kernels.tiles.shipped_table) uses.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from vllm_zeda.kernels.tiles import nearest  # noqa: E402 (vLLM's nearest-batch-size rule)

SM90_GPUS = ("NVIDIA_H200", "NVIDIA_H100_80GB_HBM3")  # whose vLLM tables seed the candidates
BATCHES = [1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 256, 512, 1024, 1536, 2048, 3072, 4096, 8192, 16384]
EXTRA = [  # (BLOCK_SIZE_M, N, K, GROUP_SIZE_M, num_warps, num_stages)
    (16, 64, 128, 1, 4, 4), (16, 128, 128, 1, 4, 3), (32, 64, 128, 1, 4, 4), (32, 128, 64, 1, 4, 4),
    (64, 64, 64, 1, 4, 4), (64, 128, 64, 1, 4, 3), (64, 128, 64, 16, 4, 4), (64, 256, 64, 1, 8, 3),
    (128, 128, 64, 1, 8, 3), (128, 128, 64, 16, 8, 4), (128, 256, 64, 16, 8, 3),
]
KEYS = ("BLOCK_SIZE_M", "BLOCK_SIZE_N", "BLOCK_SIZE_K", "GROUP_SIZE_M", "num_warps", "num_stages")
CAPTURED_UP_TO = 512  # vLLM's largest CUDA-graph size by default: its tile config compiles at start-up


QUANT_TABLES = {"none": (None, None), "fp8": ("fp8_w8a8", None), "fp8-block": ("fp8_w8a8", [128, 128])}


def table_name(device: str, e: int, n: int, dtype: str | None = None, block_shape: list[int] | None = None) -> str:
    """vLLM's file name for the table of E experts of intermediate size N on a GPU named `device`
    (as torch names it), for the weights' `dtype` and quantization blocks (0.26's
    fused_moe.get_config_file_name)."""
    tail = (f",dtype={dtype}" if dtype else "") + (f",block_shape={block_shape}".replace(" ", "") if block_shape else "")
    return f"E={e},N={n},device_name={device.replace(' ', '_')}{tail}.json"


def valid_for_blocks(cfg: dict, block_shape: list[int] | None) -> bool:
    """Whether a tile suits block-quantised weights: its N tile must divide the quantization
    block (the kernel reads one scale per N element's block; vLLM clips BLOCK_SIZE_K itself)."""
    return block_shape is None or block_shape[0] % cfg["BLOCK_SIZE_N"] == 0


def _key(cfg: dict) -> tuple:
    return tuple(cfg[k] for k in KEYS)


def stock_config(row: dict, stock_table: dict | None) -> dict:
    """The tile config stock vLLM runs at this row's batch size: the nearest entry of its own table
    for this shape and GPU where it ships one (vLLM 0.26 does for the H200, not for the H100),
    else `get_default_config` (the row's "default")."""
    if not stock_table:
        return row["default"]
    return nearest({int(k): cfg for k, cfg in stock_table.items()}, row["tokens"])


def _stock_times(row: dict, variant: str, keys: list[tuple] | None, stock: dict) -> tuple[float, float]:
    """(static µs, variant µs) of the stock config: its own timing in the candidate sweep where it
    is a candidate (same conditions as its rivals: from 1,024 tokens on, the H200 grid's sweeps ran
    up to 10% slower than the row's first timing), else the row's first ("default") timing."""
    if keys is not None and _key(stock) in keys:
        i = keys.index(_key(stock))
        s, t = row.get("static_all", [None] * len(keys))[i], row[f"{variant}_all"][i]
        if t is not None:
            return (s if s is not None else row.get("static_default")), t
    return row.get("static_default"), row[f"{variant}_default"]


def eligible(row: dict, variant: str, static_within: float | None, static_ref: float | None) -> list[bool]:
    """Which of the grid's candidates this row may pick. For "ours" (timed at skip 0.5) with
    static_within: only tiles whose static top-K time (the same kernel with no zero slot, i.e.
    ours at skip 0) is within static_within of stock's (static_ref). A tile that wins at half the
    slots but loses with none makes ZEDA layers slower than stock ones at low skip (the H200 grid's
    4-token pick: 4.5% faster at skip 0.5, 11% slower at skip 0)."""
    times = row[f"{variant}_all"]
    if variant != "ours" or static_within is None or "static_all" not in row or static_ref is None:
        return [t is not None for t in times]
    limit = (1 + static_within) * static_ref
    return [t is not None and s is not None and s <= limit for t, s in zip(times, row["static_all"])]


def slot_block_tiles(candidates: list[dict], tokens: int, shape: list[int] | None, zero_experts: int | None) -> list[bool]:
    """Which candidates keep the router's hand-over at this batch size. Where vLLM's Triton experts
    assign slots sort-free (kernels.ops.sort_free: 1-6 tokens for Qwen3's E+Z=192 and top-8), the
    router stops the zero slots' blocks (live slots first at 1 token, slot blocks from 2) only for
    BLOCK_SIZE_M == SLOT_BLOCK_M; with any other tile every zero slot's block writes a row of
    zeros. The grid times ours at skip 0.5 alone, where that costs little: the H200 GLM grid's
    4-token pick, BLOCK_SIZE_M 64, was 0.8% faster there than the default's 16, and 16% slower
    at skip 0.75 in the layer benchmark. So there only such tiles, and
    only ungrouped ones (GROUP_SIZE_M 1): the plugin runs every sort-free call ungrouped
    (serve/triton_experts.slot_block_config), so a grouped tile's time is not what would run."""
    from vllm_zeda.kernels.ops import SLOT_BLOCK_M

    if not sort_free_here(tokens, shape, zero_experts):
        return [True] * len(candidates)
    return [c["BLOCK_SIZE_M"] == SLOT_BLOCK_M and c.get("GROUP_SIZE_M", 1) == 1 for c in candidates]


def sort_free_here(tokens: int, shape: list[int] | None, zero_experts: int | None) -> bool:
    """Whether a ZEDA layer of this expert shape (E, H, I, K; Z = E/2 unless given) gets the
    sort-free assignment at this batch size (kernels.ops.sort_free); False without a shape."""
    if not shape:
        return False
    from vllm_zeda.kernels.ops import sort_free

    e, k = shape[0], shape[3]
    return sort_free(tokens, k, e + (zero_experts if zero_experts is not None else e // 2))


def table_from_rows(rows: list[dict], variant: str, min_gain: float = 0.01, candidates: list[dict] | None = None,
                    reuse_within: float = 0.01, captured_up_to: int = CAPTURED_UP_TO,
                    static_within: float | None = 0.02, stock_table: dict | None = None,
                    shape: list[int] | None = None, zero_experts: int | None = None,
                    skip0_trade: float = 0.03) -> dict[str, dict]:
    """vLLM-format table: per batch size the variant's fastest `eligible` config (for ours, in
    the sort-free range, a `slot_block_tiles` one; and for ours the fastest one no slower than
    stock's at skip 0 instead, unless that one is more than skip0_trade slower) if it beats the
    config stock vLLM runs there (`stock_config`) by more than min_gain, else that config (without
    the grid's candidates: the row's recorded best, unguarded; for ours in the sort-free range with
    GROUP_SIZE_M 1, as the plugin runs it). Given the candidates, a batch size
    above captured_up_to takes instead an eligible config that start-up compiles anyway (the pick at
    the largest captured size: CUDA-graph capture; at the largest batch size: vLLM's profile run)
    when that one is within reuse_within of the pick: any other config is a first-use Triton compile
    in the middle of serving (benchmarks/RESULTS.md §5.1)."""
    keys = [_key(c) for c in candidates] if candidates is not None else None
    picks, ok = {}, {}
    for r in rows:
        stock = stock_config(r, stock_table)
        static_ref, ref = _stock_times(r, variant, keys, stock)
        cfg, t = r[f"{variant}_best_config"], r[f"{variant}_best"]
        if candidates is not None:
            keep = (slot_block_tiles(candidates, r["tokens"], shape, zero_experts) if variant == "ours"
                    else [True] * len(candidates))
            ok[r["tokens"]] = [a and b for a, b in zip(eligible(r, variant, static_within, static_ref), keep)]
            t, i = _fastest(r[f"{variant}_all"], ok[r["tokens"]])
            if static_within is not None:  # a tile that holds at skip 0 where it costs little at skip 0.5
                strict = [a and b for a, b in zip(eligible(r, variant, 0.0, static_ref), keep)]
                ts, j = _fastest(r[f"{variant}_all"], strict)
                if j is not None and t is not None and ts <= (1 + skip0_trade) * t:
                    (t, i), ok[r["tokens"]] = (ts, j), strict  # reuse below stays in this tier
            cfg = candidates[i] if i is not None else None
        better = t is not None and t < (1 - min_gain) * ref
        picks[r["tokens"]] = (cfg, t) if better else (stock, ref)
    if candidates is not None:
        sizes = sorted(picks)
        captured = [m for m in sizes if m <= captured_up_to]
        warm = {_key(picks[m][0]) for m in captured[-1:] + sizes[-1:]}
        for r in rows:
            m, (cfg, t) = r["tokens"], picks[r["tokens"]]
            if m <= captured_up_to or _key(cfg) in warm:
                continue
            timed = [(r[f"{variant}_all"][keys.index(w)], w) for w in warm if w in keys and ok[m][keys.index(w)]]
            fastest = min(timed, default=None)
            if fastest is not None and fastest[0] <= (1 + reuse_within) * t:
                picks[m] = (dict(zip(KEYS, fastest[1])), fastest[0])
    table = {str(r["tokens"]): {k: picks[r["tokens"]][0][k] for k in KEYS} for r in rows}
    if variant == "ours":
        for m, cfg in table.items():  # stock's grouped tile where nothing beat it: written as it runs
            if cfg["GROUP_SIZE_M"] > 1 and sort_free_here(int(m), shape, zero_experts):
                cfg["GROUP_SIZE_M"] = 1
    return table


def _fastest(times: list[float | None], allowed: list[bool]) -> tuple[float | None, int | None]:
    """(µs, index) of the fastest allowed candidate, or (None, None)."""
    return min(((t, i) for i, t in enumerate(times) if allowed[i]), default=(None, None))


def table_from_grid(grid: dict, variant: str, **kw) -> dict[str, dict]:
    """table_from_rows over a grid written by --out (its candidates, stock vLLM's own table and
    the expert shape)."""
    meta = grid.get("meta", {})
    return table_from_rows(grid["rows"], variant, candidates=grid.get("candidates"), stock_table=meta.get("vllm_table"),
                           shape=meta.get("shape"), zero_experts=meta.get("zero_experts"), **kw)


def write_tables(grid: dict, table_dir: str, variants, min_gain: float, name: str, static_within: float,
                 skip0_trade: float) -> None:
    for v in variants:
        d = Path(table_dir) if len(variants) == 1 else Path(table_dir) / v
        d.mkdir(parents=True, exist_ok=True)
        table = table_from_grid(grid, v, min_gain=min_gain, static_within=static_within, skip0_trade=skip0_trade)
        (d / name).write_text(json.dumps(table, indent=1) + "\n")


def candidates(e: int, h: int, i: int, k: int, dtype: str | None = None, block_shape: list[int] | None = None) -> list[dict]:
    import vllm.model_executor.layers.fused_moe.fused_moe as fm

    found = []
    for gpu in SM90_GPUS:
        table = Path(fm.__file__).parent / "configs" / table_name(gpu, e, i, dtype, block_shape)
        entries = json.loads(table.read_text()).values() if table.exists() else []
        found += [c for c in entries if isinstance(c, dict)]  # tables may carry "triton_version": "..."
    found += [fm.get_default_config(m, e, i, h, k, dtype, block_shape) for m in BATCHES]
    found += [dict(zip(KEYS, c)) for c in EXTRA]
    out, seen = [], set()
    for c in found:
        key = tuple(c.get(name, 1) for name in KEYS)
        if key not in seen and valid_for_blocks(dict(zip(KEYS, key)), block_shape):
            seen.add(key)
            out.append(dict(zip(KEYS, key)))
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out")
    p.add_argument("--table-dir", required=True)
    p.add_argument("--table-from", help="a grid JSON written by --out: only (re)write the tables")
    p.add_argument("--variants", nargs="+", default=["static", "ours"], choices=["static", "ours"])
    p.add_argument("--min-gain", type=float, default=0.01)
    p.add_argument("--static-within", type=float, default=0.02,
                   help="the ours table only takes tiles at most this much slower than stock vLLM's config at skip 0")
    p.add_argument("--skip0-trade", type=float, default=0.03,
                   help="...and one no slower than stock's at skip 0 unless that is more than this slower at skip 0.5")
    p.add_argument("--batches", nargs="+", type=int, default=BATCHES)
    p.add_argument("--budget-s", type=float, default=400, help="stop timing new batch sizes after this")
    p.add_argument("--shape", default="qwen3_30b_a3b", choices=["qwen3_30b_a3b", "glm47_flash"],
                   help="the expert shape to tune (bench_moe_layer.SHAPES)")
    p.add_argument("--quant", choices=list(QUANT_TABLES), default="none",
                   help="experts in FP8 (bench_moe_layer.quantize_experts): a scale per expert or per 128 x 128 tile")
    a = p.parse_args()
    if a.skip0_trade < 0:
        p.error(f"--skip0-trade must be at least 0, got {a.skip0_trade}")
    if a.table_from:
        try:
            grid = json.loads(Path(a.table_from).read_text())
        except (OSError, ValueError) as exc:
            p.error(f"cannot read the grid {a.table_from}: {exc}")
        device, shape = grid.get("meta", {}).get("device"), grid.get("meta", {}).get("shape")
        if not device or not shape:
            p.error(f"{a.table_from} has no meta.device and meta.shape (the GPU and experts the table is for): "
                    "not a grid written by --out")
        name = table_name(device, shape[0], shape[2], *QUANT_TABLES[grid["meta"].get("quant", "none")])
        return write_tables(grid, a.table_dir, a.variants, a.min_gain, name, a.static_within, a.skip0_trade)
    if not a.out:
        p.error("--out is required unless --table-from is given")
    os.environ.pop("VLLM_TUNED_CONFIG_FOLDER", None)  # "default" is stock vLLM's own lookup
    import torch
    import vllm
    import vllm.model_executor.layers.fused_moe.fused_moe as fm
    from bench_moe_layer import SHAPES, make_kernel, make_routings, quantize_experts, time_graph
    from vllm.model_executor.layers.fused_moe import override_config
    from vllm.model_executor.layers.fused_moe.activation import MoEActivation
    from vllm.model_executor.layers.fused_moe.experts.triton_moe import TritonExperts
    from vllm.v1.worker.workspace import init_workspace_manager

    from vllm_zeda.serve import handover
    from vllm_zeda.serve.experts import zero_expert_map
    from vllm_zeda.serve.handover import Handover
    from vllm_zeda.serve.triton_experts import ZedaTritonExperts

    E, H, I, K = SHAPES[a.shape]  # noqa: N806 (the shape's usual names)
    init_workspace_manager(torch.device("cuda"))
    t0 = time.time()
    gen = torch.Generator(device="cuda").manual_seed(0)
    z = E // 2
    dtype, block = QUANT_TABLES[a.quant]
    w1, w1_scale = quantize_experts(torch.randn(E, 2 * I, H, device="cuda", dtype=torch.bfloat16, generator=gen) * 0.02, a.quant)
    w2, w2_scale = quantize_experts(torch.randn(E, H, I, device="cuda", dtype=torch.bfloat16, generator=gen) * 0.02, a.quant)
    zmap = zero_expert_map(None, E, z, "cuda")
    scales = dict(quant=a.quant, w1_scale=w1_scale, w2_scale=w2_scale)
    stock = make_kernel(TritonExperts, E, H, I, K, torch.bfloat16, **scales)
    ours_k = make_kernel(ZedaTritonExperts, E, H, I, K, torch.bfloat16, **scales)

    def call(kernel, x, w, ids, emap=None):
        return kernel.apply(hidden_states=x, w1=w1, w2=w2, topk_weights=w, topk_ids=ids, activation=MoEActivation.SILU,
                            global_num_experts=E + z if emap is not None else E, expert_map=emap,
                            apply_router_weight_on_input=False)

    def ours(x, r):  # the plugin's layer path, the router's hand-over included (bench_moe_layer)
        ids, w, *blocks = r["plugin"]
        handover.publish(Handover(ids, *blocks))
        return call(ours_k, x, w, ids, zmap)

    cands = candidates(E, H, I, K, dtype, block)
    own = fm.get_moe_configs(E, I, dtype, *(block or (None, None)))  # stock vLLM's own table (VLLM_TUNED_CONFIG_FOLDER unset)
    meta = {"device": torch.cuda.get_device_name(), "vllm": vllm.__version__, "date": time.strftime("%Y-%m-%d"),
            "unit": "us per fused-MoE call", "shape": [E, H, I, K], "zero_experts": z, "quant": a.quant, "triton": __import__("triton").__version__,
            "vllm_table": {str(k): v for k, v in own.items()} if own else None}
    print(f"{len(cands)} candidate configs; vLLM's own table: {'yes' if own else 'none'}", flush=True)
    rows = []
    for m in a.batches:
        if time.time() - t0 > a.budget_s:
            print(f"budget spent: stopping before M={m}", flush=True)
            break
        x = torch.randn(m, H, device="cuda", dtype=torch.bfloat16, generator=gen)
        rs = make_routings(m, E, K, 0.5, 8, gen)
        fns = {"static": [lambda r=r: call(stock, x, r["w"], r["ids"]) for r in rs],
               "ours": [lambda r=r: ours(x, r) for r in rs]}
        fallback = {"tokens": m, "default": fm.get_default_config(m, E, I, H, K, dtype, block)}
        row = {"tokens": m, "default": {**stock_config(fallback, meta["vllm_table"]), "SPLIT_K": 1}}  # stock's tiles
        for v, fl in fns.items():
            with override_config(row["default"]):  # ours would otherwise look up vllm_zeda's shipped table
                row[f"{v}_default"] = round(time_graph(fl), 2)
            times = []
            for c in cands:
                try:
                    with override_config(dict(c, SPLIT_K=1)):
                        times.append(round(time_graph(fl), 2))
                except Exception as exc:  # a tile that does not fit (shared memory): skip it
                    times.append(None)
                    print(f"M={m} {v} {c}: {type(exc).__name__}", flush=True)
            best = min((t, i) for i, t in enumerate(times) if t is not None)
            row[f"{v}_best"], row[f"{v}_best_config"], row[f"{v}_all"] = best[0], cands[best[1]], times
        rows.append(row)
        print(f"M={m:6d} static default {row['static_default']:8.1f} best {row['static_best']:8.1f} | "
              f"ours(s=0.5) default {row['ours_default']:8.1f} best {row['ours_best']:8.1f}", flush=True)
        Path(a.out).write_text(json.dumps({"meta": meta, "candidates": cands, "rows": rows}, indent=1))
    meta["seconds"] = round(time.time() - t0, 1)
    grid = {"meta": meta, "candidates": cands, "rows": rows}
    Path(a.out).write_text(json.dumps(grid, indent=1))
    name = fm.get_config_file_name(E, I, dtype, block)
    write_tables(grid, a.table_dir, a.variants, a.min_gain, name, a.static_within, a.skip0_trade)
    print(json.dumps(meta), "tables:", name)


if __name__ == "__main__":
    main()
