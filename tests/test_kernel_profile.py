"""benchmarks/kernel_profile.py's bookkeeping, on CPU ops (on the device it reads CUDA kernels the
same way): how a kernel's calls spread, its alternating calls apart, and the profiled steps' own
zero fraction."""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.kernel_profile import _fraction, call_spread, idle_after, spread  # noqa: E402


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
