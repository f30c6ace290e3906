"""vllm_zeda's shipped fused-MoE tile tables and where they sit in vLLM's lookup order (the
installed vLLM's own lookup functions; the GPU name is pinned to the table's, since this
machine has no GPU)."""
import importlib.util
import json
from pathlib import Path

import pytest

from vllm_zeda.kernels import tiles as tc

ROOT = Path(__file__).resolve().parents[1]

QWEN3_H100 = "E=128,N=768,device_name=NVIDIA_H100_80GB_HBM3.json"
W1, W2 = (128, 1536, 2048), (128, 2048, 768)  # Qwen3-30B-A3B experts: [E, 2N, H], [E, H, N]


@pytest.fixture(scope="module")
def tune():
    """benchmarks/tune_moe_configs.py (not a package module), loaded from its file."""
    spec = importlib.util.spec_from_file_location("tune_moe_configs", ROOT / "benchmarks" / "tune_moe_configs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_shipped_tables_are_complete_vllm_tables():
    names = sorted(p.name for p in tc.TABLE_DIR.glob("*.json"))
    assert QWEN3_H100 in names
    for name in names:
        table = tc.load_table(name)
        assert table and all(m > 0 for m in table)
        for cfg in table.values():
            assert set(cfg) == set(tc.CONFIG_KEYS)
            assert all(isinstance(v, int) and v > 0 for v in cfg.values())
            assert cfg["BLOCK_SIZE_M"] in (16, 32, 64, 128, 256)  # moe_align_block_size's blocks


def test_nearest_batch_size_rule():
    table = {1: "a", 4: "b", 16: "c"}
    assert [tc.nearest(table, m) for m in (1, 2, 3, 5, 10, 11, 1000)] == ["a", "a", "b", "b", "b", "c", "c"]
    assert tc.load_table("E=1,N=1,device_name=none.json") is None


@pytest.fixture
def h100_names(monkeypatch):
    from vllm.model_executor.layers.fused_moe import fused_moe as fm

    monkeypatch.setattr(fm, "get_config_file_name", lambda *a, **k: QWEN3_H100)
    monkeypatch.delenv("VLLM_TUNED_CONFIG_FOLDER", raising=False)
    fm.get_moe_configs.cache_clear()
    tc.shipped_table.cache_clear()
    yield fm
    fm.get_moe_configs.cache_clear()
    tc.shipped_table.cache_clear()


def test_ours_come_before_vllms_defaults(h100_names):
    table = tc.load_table(QWEN3_H100)
    for m in (1, 3, 100, 16384, 50000):
        assert tc.zeda_moe_config(W1, W2, 8, None, m) == dict(tc.nearest(table, m), SPLIT_K=1)
    # vLLM alone (no table at the pinned name in its own folder) would pick its defaults
    assert h100_names.try_get_optimal_moe_config(W1, W2, 8, None, 1) == h100_names.get_default_config(1, 128, 768, 2048, 8, None)


def test_users_table_and_override_come_first(h100_names, tmp_path, monkeypatch):
    from vllm.model_executor.layers.fused_moe import override_config

    users = {"1": {"BLOCK_SIZE_M": 32, "BLOCK_SIZE_N": 32, "BLOCK_SIZE_K": 32, "GROUP_SIZE_M": 1,
                   "num_warps": 2, "num_stages": 2}}
    (tmp_path / QWEN3_H100).write_text(json.dumps(users))
    monkeypatch.setenv("VLLM_TUNED_CONFIG_FOLDER", str(tmp_path))
    assert tc.zeda_moe_config(W1, W2, 8, None, 1) == users["1"]
    forced = {"BLOCK_SIZE_M": 64, "BLOCK_SIZE_N": 64, "BLOCK_SIZE_K": 64, "GROUP_SIZE_M": 1, "SPLIT_K": 1}
    with override_config(forced):
        assert tc.zeda_moe_config(W1, W2, 8, None, 1) == forced


@pytest.mark.parametrize("grid_file,device,name", [
    ("tune_moe_h100_2026-11-23.json", "NVIDIA H100 80GB HBM3", QWEN3_H100),
    ("tune_moe_h200_2026-11-30.json", "NVIDIA H200", "E=128,N=768,device_name=NVIDIA_H200.json"),
    ("tune_moe_glm_h200_2026-11-30.json", "NVIDIA H200", "E=64,N=1536,device_name=NVIDIA_H200.json"),
    ("tune_moe_fp8_block_h100_2026-12-07.json", "NVIDIA H100 80GB HBM3",
     "E=128,N=768,device_name=NVIDIA_H100_80GB_HBM3,dtype=fp8_w8a8,block_shape=[128,128].json")])
def test_shipped_table_is_the_recorded_search_result(tune, grid_file, device, name):
    """Each shipped table is exactly what benchmarks/tune_moe_configs.py derives from the
    measured grid in benchmarks/results (the provenance RESULTS.md §2.3 states), under the name
    vLLM looks up on that GPU."""
    grid = json.loads((ROOT / "benchmarks" / "results" / grid_file).read_text())
    quant = tune.QUANT_TABLES[grid["meta"].get("quant", "none")]
    assert grid["meta"]["device"] == device and tune.table_name(device, *grid["meta"]["shape"][::2], *quant) == name
    table = tune.table_from_grid(grid, "ours")
    assert table == json.loads((tc.TABLE_DIR / name).read_text())
    above_capture = {json.dumps(cfg, sort_keys=True) for m, cfg in table.items() if int(m) > tune.CAPTURED_UP_TO}
    at_start_up = {json.dumps(table[m], sort_keys=True) for m in ("512", "16384")}
    # On the H100 no tile config is first met while serving, even with vLLM's own CUDA-graph sizes
    # (up to 512). On the H200 some picks above 512 tokens are not (Qwen3: from 3,072 to 8,192
    # tokens a config of vLLM's own table, its 1,536-3,072 entry, 1-3% faster there than the
    # start-up ones at skip 0.5; GLM: 8,192): with the
    # plugin's default sizes (vllm_zeda.serve.cuda_graphs, up to max_num_batched_tokens) it compiles at
    # capture; with vLLM's, at first use, as it does for stock vLLM.
    assert (above_capture <= at_start_up) == device.startswith("NVIDIA H100")
    # no pick is more than 2% slower than stock vLLM's own config in the grid's static (skip 0) sweep
    # (stock's own tile where nothing beat it is written ungrouped in the sort-free range, as the
    # plugin runs it: that one the grid did not time)
    keys = [tune._key(c) for c in grid["candidates"]]
    for r in grid["rows"]:
        stock_cfg = tune.stock_config(r, grid["meta"].get("vllm_table"))
        stock, pick = keys.index(tune._key(stock_cfg)), tune._key(table[str(r["tokens"])])
        if pick not in keys:
            assert pick == tune._key(dict(stock_cfg, GROUP_SIZE_M=1)) and r["tokens"] <= 6, r
            continue
        assert r["static_all"][keys.index(pick)] <= 1.02 * r["static_all"][stock], r


@pytest.mark.parametrize("grid_file", ["tune_moe_h100_2026-11-23.json", "tune_moe_h200_2026-11-30.json",
                                       "tune_moe_glm_h200_2026-11-30.json"])
def test_sort_free_batch_sizes_keep_the_routers_hand_over(tune, grid_file):
    """Where the slot assignment is sort-free the ours table only takes BLOCK_SIZE_M ==
    SLOT_BLOCK_M tiles (the router's hand-over that stops zero slots' blocks needs them), with
    GROUP_SIZE_M 1 (as the plugin runs them there); larger batch sizes are not restricted. The GLM grid shows why: unrestricted, its 4-token pick is a
    BLOCK_SIZE_M 64 tile."""
    from vllm_zeda.kernels.ops import SLOT_BLOCK_M, sort_free

    grid = json.loads((ROOT / "benchmarks" / "results" / grid_file).read_text())
    e, _, _, k = grid["meta"]["shape"]
    table = tune.table_from_grid(grid, "ours")
    free = [m for m in table if sort_free(int(m), k, e + e // 2)]
    assert free and all(table[m]["BLOCK_SIZE_M"] == SLOT_BLOCK_M and table[m]["GROUP_SIZE_M"] == 1 for m in free)
    unrestricted = tune.table_from_rows(grid["rows"], "ours", candidates=grid["candidates"],
                                        stock_table=grid["meta"].get("vllm_table"))
    assert {m: c for m, c in unrestricted.items() if m not in free} == {m: c for m, c in table.items() if m not in free}
    if grid_file.startswith("tune_moe_glm"):
        assert unrestricted["4"]["BLOCK_SIZE_M"] == 64 != table["4"]["BLOCK_SIZE_M"]


def test_tile_picks_reuse_start_up_configs_within_one_percent(tune):
    """Above the largest CUDA-graph size a config that start-up compiles (the picks at 512 and at
    the largest size) replaces a pick it is within 1% of, and only then."""
    cands = [dict(zip(tune.KEYS, (bm, 64, 64, 1, 4, 3))) for bm in (16, 32, 64, 128)]
    a, b, c, d = cands

    def row(m, times, default):
        best = min(range(4), key=lambda i: times[i])
        return {"tokens": m, "default": default, "ours_default": times[cands.index(default)],
                "ours_best": times[best], "ours_best_config": cands[best], "ours_all": times}

    rows = [row(512, [9, 5, 9, 9], b), row(1024, [9, 6.05, 6, 9], a),  # c wins, b within 1%: b
            row(2048, [9, 7, 5, 9], a),  # c wins by far: c stays (a compile while serving)
            row(4096, [9, 9, 9, 4], a)]  # the largest size: d, compiled by the profile run
    table = tune.table_from_rows(rows, "ours", candidates=cands)
    assert [table[str(m)]["BLOCK_SIZE_M"] for m in (512, 1024, 2048, 4096)] == [32, 32, 64, 128]
    assert tune.table_from_rows(rows, "ours")["1024"]["BLOCK_SIZE_M"] == 64  # without candidates: the pick


def test_ours_picks_only_tiles_that_hold_at_skip_0(tune):
    """A tile tuned at skip 0.5 that is slower than vLLM's default with no zero slot (the static
    run) is passed over for the fastest one that is not, or for the default."""
    cands = [dict(zip(tune.KEYS, (bm, 64, 64, 1, 4, 3))) for bm in (16, 32, 64)]
    a, b, c = cands

    def row(m, ours, static, default):
        best = min(range(3), key=lambda i: ours[i])
        return {"tokens": m, "default": default, "ours_default": ours[0], "static_default": static[0],
                "ours_best": ours[best], "ours_best_config": cands[best], "ours_all": ours, "static_all": static}

    rows = [row(4, [50, 47, 45], [80, 81, 90], a),  # c 11% slower at skip 0: b (1.3% slower) instead
            row(8, [90, 95, 80], [130, 131, 150], a),  # only c gains, and it loses at skip 0: the default
            row(16, [140, 135, 130], [200, 199, 198], a)]  # c holds at skip 0: c
    table = tune.table_from_rows(rows, "ours", candidates=cands)
    assert [table[str(m)]["BLOCK_SIZE_M"] for m in (4, 8, 16)] == [32, 16, 64]
    loose = tune.table_from_rows(rows, "ours", candidates=cands, static_within=None)
    assert [loose[str(m)]["BLOCK_SIZE_M"] for m in (4, 8, 16)] == [64, 64, 64]


def test_ours_prefers_a_tile_that_holds_at_skip_0_where_it_costs_little(tune):
    """Among tiles within static_within at skip 0, the fastest that is no slower than stock's there
    is taken over a faster one that is, unless it is more than skip0_trade (3%) slower at skip 0.5."""
    cands = [dict(zip(tune.KEYS, (bm, 64, 64, 1, 4, 3))) for bm in (16, 32, 64)]

    def row(m, ours, static):
        return {"tokens": m, "default": cands[0], "ours_default": ours[0], "static_default": static[0],
                "ours_best": min(ours), "ours_best_config": cands[ours.index(min(ours))], "ours_all": ours,
                "static_all": static}

    rows = [row(64, [100, 80, 78], [200, 199, 203]),  # 32 holds at skip 0 and costs 2.6%: 32
            row(128, [100, 80, 76], [200, 199, 203])]  # 32 would cost 5.3%: 64 (1.5% slower at skip 0)
    table = tune.table_from_rows(rows, "ours", candidates=cands)
    assert [table[m]["BLOCK_SIZE_M"] for m in ("64", "128")] == [32, 64]
    fastest = tune.table_from_rows(rows, "ours", candidates=cands, skip0_trade=0.0)
    assert [fastest[m]["BLOCK_SIZE_M"] for m in ("64", "128")] == [64, 64]


def test_stock_config_is_vllms_own_table_where_it_ships_one(tune):
    """On a GPU vLLM ships a table for (the H200), stock runs that table's nearest entry, not
    get_default_config: the fallback pick and the skip-0 reference are that config."""
    own = {"1": {"BLOCK_SIZE_M": 16}, "64": {"BLOCK_SIZE_M": 32}, "512": {"BLOCK_SIZE_M": 64}}
    row = {"tokens": 40, "default": {"BLOCK_SIZE_M": 128}}
    assert tune.stock_config(row, own) == {"BLOCK_SIZE_M": 32}
    assert tune.stock_config(dict(row, tokens=5000), own) == {"BLOCK_SIZE_M": 64}
    assert tune.stock_config(row, None) == {"BLOCK_SIZE_M": 128}


@pytest.mark.parametrize("quant", ["none", "fp8", "fp8-block"])
def test_fp8_tables_take_vllms_names(tune, monkeypatch, quant):
    """--quant tables are named as vLLM's lookup names them (dtype and block shape in the name),
    so the plugin's shipped_table finds them for FP8 layers; `--table-from` names them from the
    grid's meta.quant."""
    from vllm.model_executor.layers.fused_moe import fused_moe as fm

    monkeypatch.setattr(fm, "get_device_name_as_file_name", lambda: "NVIDIA_H100_80GB_HBM3")
    dtype, block = tune.QUANT_TABLES[quant]
    assert tune.table_name("NVIDIA H100 80GB HBM3", 128, 768, dtype, block) == fm.get_config_file_name(128, 768, dtype, block)


def test_block_fp8_tiles_divide_the_quantization_block(tune):
    """Block-FP8 weights carry one scale per 128 output rows: an N tile must divide 128."""
    assert tune.valid_for_blocks({"BLOCK_SIZE_N": 64}, [128, 128])
    assert not tune.valid_for_blocks({"BLOCK_SIZE_N": 256}, [128, 128])
    assert tune.valid_for_blocks({"BLOCK_SIZE_N": 256}, None)  # per-tensor FP8 and bf16: any tile
