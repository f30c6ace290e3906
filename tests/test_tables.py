"""benchmarks/tables.py renders the device scripts' JSON as RESULTS.md tables."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import tables  # noqa: E402


def test_route_table_leaves_variants_a_row_lacks_blank():
    """bench_route times the gate only for small batches: larger rows have no such columns."""
    data = {"rows": [{"tokens": 1, "stock": 4.3, "zeda_route b1/w1": 4.2, "zeda_route b2/w2": 4.1, "gate cuBLAS 192": 5.5},
                     {"tokens": 4096, "stock": 6.6, "zeda_route b1/w1": 11.5, "zeda_route b2/w2": 9.9}]}
    lines = tables.route(data).splitlines()
    assert lines[0] == "| tokens | stock | b1/w1 | b2/w2 | gate cuBLAS 192 |"
    assert lines[2] == "| 1 | 4.3 | 4.2 | **4.1** | 5.5 |"
    assert lines[3] == "| 4096 | 6.6 | 11.5 | **9.9** |  |"


def test_layer_kernels_table_adds_each_variants_idle_time_by_the_kernel_before_it():
    row = {"shape": "qwen3", "tokens": 16384, "skip": 0.5,
           "kernels": {"ours": {"fused_moe_kernel": 1335.1, "_count_live": 4.3}, "ideal": {"fused_moe_kernel": 1310.7}},
           "idle_after": {"ours": {"fused_moe_kernel": 3.0, "_place_live": 1.5}, "ideal": {"fused_moe_kernel": 2.0}}}
    lines = tables.layer_kernels({"rows": [row]}).splitlines()
    assert "| idle after: fused-MoE GEMMs (fused_moe_kernel) | 3.00 | 2.00 |" in lines
    assert "| idle after: alignment: gpu_align _count_live + _place_live | 1.50 | 0.00 |" in lines
    assert "| **idle in all** | **4.50** | **2.00** |" in lines


def test_layer_kernels_table_refuses_a_run_without_profiles():
    import pytest

    with pytest.raises(KeyError):
        tables.layer_kernels({"rows": [{"shape": "qwen3", "tokens": 4, "skip": 0.5, "ours": 50.0}]})


def test_run_profile_table_puts_each_run_in_a_column_per_step():
    run = {"steps": 4, "wall_us": 4000.0, "scopes_us": {"forward": [4, 2000.0], "sample": [4, 400.0]},
           "outside_runner_us": 800.0, "gpu_busy_us": 3000.0, "gpu_idle_us": 1000.0,
           "gpu_idle_gaps": {"min_us": 50.0, "count": 2, "total_us": 700.0, "longest_us": [400.0, 300.0]}}
    data = {"configs": {"static8": {"run_profile": {"decode_b256": run}}, "zeda_s0": {"workloads": {}}}}
    lines = tables.run_profile(data).splitlines()
    assert lines[0] == "| µs per step | static8, decode_b256 |"
    assert "| runner: forward | 500.0 |" in lines and "| runner: preprocess | 0.0 |" in lines
    assert "| between runner scopes | 200.0 |" in lines and "| GPU idle | 250.0 |" in lines
    assert "| GPU idle in long gaps (count, total µs) | 2, 700 |" in lines


def test_e2e_table_holds_each_target_to_static_k_times_the_live_share():
    """GLM's static top-4 at skip 0.5 is held to top-2; Qwen's static top-8 to top-4."""
    def run(tps):
        return {"workloads": {"prefill": {"tok_per_s": tps}}}

    data = {"configs": {"static4": run(100.0), "ideal2": run(120.0), "zeda_s0": run(99.0), "zeda_s50": run(118.0)}}
    lines = tables.e2e(data).splitlines()
    assert lines[2] == "| static4 | 100.0 (1.000x) |"
    assert lines[-1] == "| zeda_s50 | ideal2 | 90% |"
    assert tables.ideal_for("static8", "zeda_s75") == "ideal2"
