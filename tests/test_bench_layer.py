"""benchmarks/bench_moe_layer.py's interleaving: how variants' CUDA-graph replays are ordered."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from bench_moe_layer import replay_rounds  # noqa: E402


def test_replay_rounds_time_every_variant_once_a_round_after_changing_neighbours():
    names = ["static", "ours", "remap", "ideal", "static_t", "ideal_t"]
    rounds = replay_rounds(names, 20)
    assert len(rounds) == 20 and all(sorted(r) == sorted(names) for r in rounds)
    before_ideal_t = {r[r.index("ideal_t") - 1] for r in rounds if r[0] != "ideal_t"}
    assert len(before_ideal_t) >= 3  # a cyclic order would always put static_t there
    assert replay_rounds(names, 20) == rounds  # seeded: the same order every run
