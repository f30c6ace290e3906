"""benchmarks/bench_moe_layer.py: how variants' CUDA-graph replays are ordered, and which slots a
routing sends to zero experts."""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from bench_moe_layer import replay_rounds, zero_slots  # noqa: E402


def test_replay_rounds_time_every_variant_once_a_round_after_changing_neighbours():
    names = ["static", "ours", "remap", "ideal", "static_t", "ideal_t"]
    rounds = replay_rounds(names, 20)
    assert len(rounds) == 20 and all(sorted(r) == sorted(names) for r in rounds)
    before_ideal_t = {r[r.index("ideal_t") - 1] for r in rounds if r[0] != "ideal_t"}
    assert len(before_ideal_t) >= 3  # a cyclic order would always put static_t there
    assert replay_rounds(names, 20) == rounds  # seeded: the same order every run


@pytest.mark.parametrize("m,k,skip", [(1, 8, 0.5), (4, 4, 0.5), (4, 8, 0.75), (16, 4, 0.25), (3, 8, 0.0)])
def test_batch_zeros_draw_exactly_the_ideals_share_and_token_zeros_every_token(m, k, skip):
    """"batch": exactly round(M*K*skip) zero slots a routing, so ours runs the ideal's live slots in
    all, spread unevenly over tokens; "token": exactly round(K*skip) in every token."""
    gen = torch.Generator().manual_seed(m * 10 + k)
    per_token = set()
    for _ in range(20):
        zero = zero_slots(m, k, skip, "batch", gen, device="cpu")
        assert zero.shape == (m, k) and int(zero.sum()) == round(m * k * skip) == m * k - m * round(k * (1 - skip))
        per_token |= set(zero.sum(1).tolist())
        assert zero_slots(m, k, skip, "token", gen, device="cpu").sum(1).tolist() == [round(k * skip)] * m
    if m > 1 and 0 < skip < 1:
        assert len(per_token) > 1  # tokens' live counts differ, as with a trained router


def test_slot_zeros_draw_each_slot_on_its_own():
    gen = torch.Generator().manual_seed(0)
    counts = {int(zero_slots(4, 4, 0.5, "slot", gen, device="cpu").sum()) for _ in range(50)}
    assert len(counts) > 3  # the share strays from the skip fraction at small batches
