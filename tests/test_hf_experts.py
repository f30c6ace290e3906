"""hf.experts.live_experts_forward against a per-slot float64 loop: values and gradients, with
dead slots anywhere (none, some, all), and grouped_mm's unwritten rows never leaking."""
import pytest
import torch
from transformers.models.qwen3_moe.configuration_qwen3_moe import Qwen3MoeConfig
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

from vllm_zeda.hf.experts import live_experts_forward, runs_grouped

E, H, I, K, T = 6, 32, 16, 3, 23


def _experts(seed=0):
    torch.manual_seed(seed)
    cfg = Qwen3MoeConfig(hidden_size=H, moe_intermediate_size=I, num_experts=E, num_experts_per_tok=K)
    experts = Qwen3MoeExperts(cfg)
    with torch.no_grad():
        experts.gate_up_proj.normal_(std=0.2)
        experts.down_proj.normal_(std=0.2)
    return experts


def _reference(experts, x, ids, w):
    """sum over slots with nonzero weight of w * down(silu(gate(x)) * up(x)), in float64."""
    gate_up, down = experts.gate_up_proj.double(), experts.down_proj.double()
    out = x.double() * 0 + w.double().sum() * 0  # a graph even with every slot dead
    for t in range(ids.shape[0]):
        for s in range(ids.shape[1]):
            if w[t, s] != 0:
                g, u = (gate_up[ids[t, s]] @ x[t].double()).chunk(2)
                out[t] += w[t, s].double() * (down[ids[t, s]] @ (torch.nn.functional.silu(g) * u))
    return out


def _poisoned(original):
    """grouped_mm with the rows past the last group NaN, in its output and in its input's
    gradient: what the kernel may leave there (unwritten memory), made certain."""
    def grouped_mm(x, w, offs):
        end = int(offs[-1])
        if x.requires_grad and end < x.shape[0]:
            x.register_hook(lambda g: g.index_fill(0, torch.arange(end, x.shape[0]), float("nan")))
        out = original(x, w, offs).clone()
        out[end:] = float("nan")
        return out

    return grouped_mm


@pytest.mark.parametrize("dead", [0.0, 0.5, 1.0])
def test_live_experts_equal_the_per_slot_loop_in_value_and_gradient(dead, monkeypatch):
    from vllm_zeda.hf import experts as grouped

    monkeypatch.setattr(grouped, "_grouped_mm", _poisoned(grouped._grouped_mm))
    experts = _experts()
    assert runs_grouped(experts)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(T, H, generator=g, requires_grad=True)
    ids = torch.randint(0, E, (T, K), generator=g)
    w = torch.rand(T, K, generator=g)
    w = w.masked_fill(torch.rand(T, K, generator=g) < dead, 0.0).requires_grad_(True)

    out = live_experts_forward(experts, x, ids, w)
    grad_out = torch.randn(T, H, generator=g)
    out.backward(grad_out)
    got = (x.grad, w.grad, experts.gate_up_proj.grad, experts.down_proj.grad)

    for t in (x, w, experts.gate_up_proj, experts.down_proj):
        t.grad = None
    ref = _reference(experts, x, ids, w)
    ref.backward(grad_out.double())
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    for t, a in zip((x, w, experts.gate_up_proj, experts.down_proj), got):
        b = torch.zeros_like(t) if t.grad is None else t.grad  # no live slot: no expert gradient
        assert a is not None and torch.isfinite(a).all()
        torch.testing.assert_close(a, b.to(a.dtype), rtol=1e-4, atol=1e-5)
    if dead == 1.0:
        assert not out.any() and not x.grad.any()


def test_runs_grouped_refuses_other_layouts():
    experts = _experts()
    experts.has_bias = True
    assert not runs_grouped(experts)
    assert not runs_grouped(torch.nn.Linear(4, 4))
