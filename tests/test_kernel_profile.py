"""benchmarks/kernel_profile.py's bookkeeping, on CPU ops (on the device it reads CUDA kernels the
same way): how a kernel's calls spread, its alternating calls apart, and the profiled steps' own
zero fraction."""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.kernel_profile import (  # noqa: E402
    _fraction,
    call_spread,
    gaps,
    idle_after,
    run_timeline,
    spread,
    timeline_summary,
    union_length,
)


def test_spread_takes_quantiles_of_the_sorted_durations():
    s = spread([float(x) for x in range(100, 0, -1)])  # 100 calls of 1..100 µs, in any order
    assert s == {"calls": 100, "quantiles_us": [6.0, 26.0, 51.0, 76.0, 96.0], "max_us": 100.0}
    assert spread([3.0]) == {"calls": 1, "quantiles_us": [3.0] * 5, "max_us": 3.0}


def test_call_spread_splits_alternating_calls():
    """Two ops called in turn (as a layer's two fused-MoE GEMMs are): each op's calls, and for an
    even count its even and odd calls apart; ops not named are left out."""
    x, y = torch.ones(8), torch.ones(64)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(6):
            x.mul(2.0)
            y.add(1.0)
    out = call_spread(prof, ("aten::mul", "aten::add"), on_gpu=False)
    assert set(out) == {f"{op}{part}" for op in ("aten::mul", "aten::add") for part in ("", " [0::2]", " [1::2]")}
    assert out["aten::add"]["calls"] == 6 and out["aten::add [0::2]"]["calls"] == 3
    for sp in out.values():  # quantiles in order, the largest call last
        assert sp["quantiles_us"] == sorted(sp["quantiles_us"]) and sp["max_us"] >= sp["quantiles_us"][-1]
    assert call_spread(prof, ("no_such_op",), on_gpu=False) == {}


def test_zero_fraction_of_the_steps_between_two_counter_readings():
    assert _fraction((10, 100), (30, 140)) == 0.5  # 20 of the 40 slots routed in between
    assert _fraction(None, None) is None and _fraction((5, 50), (5, 50)) is None  # no engine / no slot


def test_idle_after_charges_each_gap_to_the_kernel_that_ended_last_before_it():
    """Intervals (start, end, name) in any order: gaps between busy stretches, overlaps busy."""
    intervals = [(10.0, 12.0, "b"), (0.0, 5.0, "a"), (4.0, 6.0, "c"), (15.0, 16.0, "a"), (12.0, 13.0, "a")]
    assert idle_after(intervals) == {"c": 4.0, "a": 2.0}  # 6 -> 10 after c, 13 -> 15 after a
    assert idle_after([(0.0, 9.0, "long"), (1.0, 2.0, "inside"), (11.0, 12.0, "x")]) == {"long": 2.0}
    assert idle_after([]) == {}


def test_union_and_gaps_count_overlaps_once():
    spans = [(0.0, 10.0), (5.0, 12.0), (20.0, 25.0), (21.0, 22.0), (30.0, 31.0)]
    assert union_length(spans) == 12.0 + 5.0 + 1.0
    assert gaps(spans) == [8.0, 5.0]
    assert union_length([]) == 0.0 and gaps([(1.0, 2.0)]) == []


def test_timeline_summary_splits_a_run_into_scopes_host_gaps_and_gpu_idle():
    """Two steps: scopes back to back inside a step, 100 µs of engine-core time between the steps;
    kernels with a 10 µs launch gap (not counted as a long gap) and a 300 µs one."""
    scopes = [(0.0, 50.0, "gpu_model_runner: preprocess"), (50.0, 400.0, "gpu_model_runner: forward"),
              (400.0, 450.0, "gpu_model_runner: sample"),
              (550.0, 600.0, "gpu_model_runner: preprocess"), (600.0, 900.0, "gpu_model_runner: forward")]
    kernels = [(60.0, 300.0), (310.0, 390.0), (690.0, 950.0)]
    out = timeline_summary(scopes, kernels)
    assert out["steps"] == 2 and out["wall_us"] == 950.0
    assert out["scopes_us"] == {"forward": [2, 650.0], "preprocess": [2, 100.0], "sample": [1, 50.0]}
    assert out["outside_runner_us"] == 100.0
    assert out["gpu_busy_us"] == 580.0 and out["gpu_idle_us"] == 310.0
    assert out["gpu_idle_gaps"] == {"min_us": 50.0, "count": 1, "total_us": 300.0, "longest_us": [300.0]}
    assert timeline_summary([], []) == {"steps": 0}


def test_run_timeline_reads_the_runners_scopes_from_a_real_profile():
    """A CPU-only profile (no kernels) of three 'steps' recorded the way vLLM's model runner
    records its scopes: three forward scopes, their time inside the wall time, the ops listed."""
    x = torch.ones(256, 256)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(3):
            with torch.profiler.record_function("gpu_model_runner: forward"):
                x = (x @ x).clamp(max=1.0)
            with torch.profiler.record_function("gpu_model_runner: sample"):
                x.argmax()
    out = run_timeline(prof)
    assert out["steps"] == 3 and out["scopes_us"]["sample"][0] == 3
    assert 0 < out["scopes_us"]["forward"][1] <= out["wall_us"]
    assert out["gpu_busy_us"] == 0.0 and "aten::mm" in out["cpu_ops"]
