"""--compile (train.fused): the compiled attention / RMSNorm forwards, experts' pieces and KL rows
compute what the eager ones do, forward and backward, one graph per class for all layers, and a
trainer run with --compile lands where the eager run does (fp32, CPU inductor)."""
from __future__ import annotations

import copy

import pytest
import torch

from tests.conftest import load
from tests.test_train import train, weights
from vllm_zeda.train.fused import Fused
from vllm_zeda.train.losses import kl_rows, kl_topk_rows, teacher_topk


def _step(model, x):
    model.zero_grad()
    logits = model(input_ids=x).logits
    (logits.square().mean() + logits[..., :7].sum()).backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_compiled_model_matches_eager_forward_and_backward(converted):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    eager = load(converted["qwen3_moe"])
    eager.zeda_set_mode(masked=False, zero_bias=0.5)  # about half the slots on zero experts
    eager.train()
    fused = copy.deepcopy(eager)
    changed = Fused().install(fused)
    layers = len(eager.model.layers)
    assert changed == layers * (1 + 4 + 1) + 1  # attention, 4 norms (input, post, q, k), experts a layer; final norm
    x = torch.randint(0, eager.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    want_logits, want = _step(eager, x)
    got_logits, got = _step(fused, x)
    assert 0 < eager.zeda_stats()["zero_fraction"] < 1
    torch.testing.assert_close(got_logits, want_logits, rtol=1e-5, atol=1e-5)
    assert set(got) == set(want) and any("gate_up_proj" in n for n in got) and any("mlp.gate." in n for n in got)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-5, msg=name)
    # graphs per compiled function, not per layer (per module: 17 here): attention, RMSNorm (once
    # per input rank: hidden states, q/k heads), three expert pieces
    assert layers == 2 and counters["stats"]["unique_graphs"] <= 8


def test_compiled_masked_mode_takes_the_live_slot_path_and_matches_the_original(converted, monkeypatch):
    """Masked mode (the trainer's teacher) with compiled pieces runs every slot through the
    compiled live-slot path instead of transformers' eager experts: the same logits in fp32."""
    from vllm_zeda.hf import modeling

    live = modeling.live_experts_forward
    calls = []
    monkeypatch.setattr(modeling, "live_experts_forward", lambda *a: calls.append(1) or live(*a))
    original = load(converted["qwen3_moe"])
    original.zeda_set_mode(masked=True)
    fused = copy.deepcopy(original)
    Fused().install(fused)
    x = torch.randint(0, original.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = original(input_ids=x).logits
        assert not calls  # transformers' own experts: the original bit for bit
        got = fused(input_ids=x).logits
    assert len(calls) == len(original.model.layers)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert original.zeda_stats()["zero_fraction"] == 0


def test_compiled_kl_rows_match_eager():
    g = torch.Generator().manual_seed(1)
    t, s = torch.randn(2, 9, 50, generator=g), torch.randn(2, 9, 50, generator=g, requires_grad=True)
    fused = Fused()
    for temperature in (1.0, 2.0):
        torch.testing.assert_close(fused.kl_rows(t, s, temperature), kl_rows(t, s, temperature))
        lp, ids = teacher_topk(t, 8, temperature)
        want = kl_topk_rows(lp, ids, s, temperature)
        got = fused.kl_topk_rows(lp, ids, s, temperature)
        torch.testing.assert_close(got, want)
        (g_want,) = torch.autograd.grad(want.sum(), s)
        (g_got,) = torch.autograd.grad(got.sum(), s)
        torch.testing.assert_close(g_got, g_want)


@pytest.mark.slow
def test_trainer_with_compile_lands_where_eager_does(tiny_models, tmp_path):
    run = ["--num-zero-experts", "8", "--stage1-steps", "6", "--stage2-steps", "3", "--eval-every", "3"]
    eager = train(tiny_models["qwen3_moe"], tmp_path / "eager", *run)
    fused = train(tiny_models["qwen3_moe"], tmp_path / "fused", *run, "--compile")
    assert fused["teacher_kl"] == pytest.approx(eager["teacher_kl"], rel=1e-3)
    assert fused["zero_fraction"] == pytest.approx(eager["zero_fraction"], abs=1e-3)
    a, b = weights(tmp_path / "eager"), weights(tmp_path / "fused")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-3
