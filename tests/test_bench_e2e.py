"""benchmarks/bench_e2e.py's zero-bias calibration: `bisect_bias` over a measured zero fraction
(here a known monotone function of the bias, standing in for a probe run of the engine)."""
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.bench_e2e import OWN_PROBES, WORKLOADS, bias_kind, bisect_bias  # noqa: E402


def logistic(scale: float, center: float):
    """Zero fraction rising from 0 to 1 around `center` over a bias range of ~`scale` (dummy
    routers: ~1e-6), with a counter of how many probe runs were asked for."""
    calls = []

    def measure(bias: float) -> float:
        calls.append(bias)
        return 1.0 / (1.0 + math.exp(-(bias - center) / scale))

    return measure, calls


@pytest.mark.parametrize("target", [0.25, 0.5, 0.75])
@pytest.mark.parametrize("scale, center", [(1e-6, 0.0), (2e-6, 3e-6), (5e-7, -4e-5)])
def test_the_bias_it_returns_gives_the_fraction_it_reports_within_tol(target, scale, center):
    measure, calls = logistic(scale, center)
    bias, z = bisect_bias(measure, target, tol=0.005)
    assert abs(z - target) <= 0.005
    assert z == measure(bias)  # the fraction reported is the returned bias's own
    assert calls[-2] == bias   # ... the last one it measured, not a midpoint it never ran
    assert len(calls) - 1 <= 8 + 14  # bracket growth (a few 4x steps) + bisection


def test_it_stops_as_soon_as_a_probe_lands_within_tol():
    measure, calls = logistic(1e-6, 0.0)
    bias, z = bisect_bias(measure, 0.5, tol=0.005)
    assert (bias, z) == (0.0, 0.5) and len(calls) == 3  # +1e-6, -1e-6, then the midpoint 0


def test_a_fraction_that_jumps_past_tol_bisects_to_the_step():
    """A step function (every token routes alike, as one greedy sequence does under dummy
    weights): no bias lands within tol, so it bisects all its steps and reports what it measured."""
    calls = []

    def measure(bias: float) -> float:
        calls.append(bias)
        return 0.26 if bias < 1.7e-6 else 0.74

    bias, z = bisect_bias(measure, 0.5, tol=0.005, steps=14)
    assert z in (0.26, 0.74) and z == measure(bias)
    assert abs(bias - 1.7e-6) <= 5e-6 / 2**14  # the bracket [-1e-6, 4e-6] halved 14 times
    assert len(calls) - 1 == 3 + 14


def test_workloads_calibrated_on_their_own_prompts_run_at_their_own_bias():
    assert set(OWN_PROBES) <= set(WORKLOADS)
    assert {bias_kind(w) for w in WORKLOADS} == {"prefill", "decode", *OWN_PROBES}
    assert bias_kind("decode_b16") == "decode" and bias_kind("decode_b256") == "decode_b256"
