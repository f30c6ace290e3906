"""The HF classes: masked = original, dynamic = routing reference, bias = dial."""
import pytest
import torch
from safetensors.torch import load_file

from conftest import ARCHS, load
from vllm_zeda.routing import route_sigmoid, route_softmax


def _ids(seed=0):
    return torch.randint(0, 256, (3, 19), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch", ARCHS)
def test_masked_mode_reproduces_original(arch, tiny_models, converted):
    base, zeda = load(tiny_models[arch]), load(converted[arch])
    assert type(zeda).__name__.startswith("Zeda")
    zeda.zeda_set_mode(masked=True)
    with torch.no_grad():
        for seed in range(3):
            diff = (base(_ids(seed)).logits - zeda(_ids(seed)).logits).abs().max().item()
            assert diff <= 1e-6, diff
    assert zeda.zeda_stats()["zero_fraction"] == 0.0


@pytest.mark.parametrize("arch", ARCHS)
def test_injection_leaves_everything_else_bit_identical(arch, tiny_models, converted):
    a = load_file(tiny_models[arch] / "model.safetensors")
    b = load_file(converted[arch] / "model.safetensors")
    assert a.keys() == b.keys()
    routers = 0
    for name, t in a.items():
        if name.endswith(".gate.weight") and "shared_expert" not in name:
            routers += 1
            assert b[name].shape == (t.shape[0] + 4, t.shape[1])
            assert torch.equal(b[name][: t.shape[0]], t)
            assert torch.isfinite(b[name]).all()
        elif name.endswith(".gate.e_score_correction_bias"):  # the sigmoid family's, E -> E+Z entries
            assert b[name].shape == (t.shape[0] + 4,) and torch.equal(b[name][: t.shape[0]], t)
            assert b[name].dtype == torch.float32 and b[name][t.shape[0]:].std() > 0
        else:
            assert torch.equal(a[name], b[name]), name
    assert routers == 2


def _reference_moe(block, hidden, masked, zero_bias, config):
    """One MoE block computed from its raw weights with the routing reference."""
    router = block.gate
    h = hidden.reshape(-1, hidden.shape[-1])
    if hasattr(router, "e_score_correction_bias"):
        r = route_sigmoid(h @ router.weight.T, router.e_score_correction_bias, router.num_real, router.top_k,
                          router.renormalize, masked=masked, zero_bias=zero_bias,
                          scaling=config.routed_scaling_factor, n_group=config.n_group, topk_group=config.topk_group)
    else:
        r = route_softmax(h @ router.weight.T, router.num_real, router.top_k, router.renormalize, masked=masked,
                          zero_bias=zero_bias)
    ex = block.experts
    out = torch.zeros_like(h)
    for slot in range(r.ids.shape[1]):
        for e in range(router.num_real):
            rows = r.ids[:, slot] == e
            if rows.any():
                gate, up = (h[rows] @ ex.gate_up_proj[e].T).chunk(2, -1)
                y = (ex.act_fn(gate) * up) @ ex.down_proj[e].T
                out[rows] += r.weights[rows, slot, None] * y
    if hasattr(block, "shared_expert"):
        out = out + torch.sigmoid(block.shared_expert_gate(h)) * block.shared_expert(h)
    if hasattr(block, "shared_experts"):  # the sigmoid family's: always run, ungated
        out = out + block.shared_experts(h)
    return out.reshape(hidden.shape), r


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("zero_bias", [0.0, 1.5])
def test_dynamic_mode_equals_routing_reference(arch, converted, zero_bias):
    model = load(converted[arch])
    model.zeda_set_mode(masked=False, zero_bias=zero_bias)
    seen = []

    def check(block, args, output):
        ref, r = _reference_moe(block, args[0], False, zero_bias, model.config)
        torch.testing.assert_close(output, ref, rtol=1e-5, atol=1e-5)
        seen.append(r.is_zero.float().mean().item())

    for layer in model.model.layers:
        if hasattr(layer.mlp, "gate"):  # the sigmoid family's first layer is dense
            layer.mlp.register_forward_hook(check)
    with torch.no_grad():
        logits = model(_ids()).logits
    assert torch.isfinite(logits).all() and len(seen) == 2
    assert 0 < sum(seen) / len(seen) < 1
    stats = model.zeda_stats()
    assert stats["zero_fraction"] == pytest.approx(sum(seen) / len(seen))


@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral", "glm4_moe_lite", "deepseek_v3"])
def test_zero_bias_moves_measured_skip_monotonically(arch, converted):
    model = load(converted[arch])
    fractions = []
    for bias in (-3.0, -1.0, 0.0, 1.0, 3.0):
        model.zeda_set_mode(masked=False, zero_bias=bias)
        model.zeda_reset_stats()
        with torch.no_grad():
            model(_ids(5))
        fractions.append(model.zeda_stats()["zero_fraction"])
    assert fractions == sorted(fractions) and fractions[0] < fractions[-1]


def test_generate_runs_in_dynamic_mode(converted):
    model = load(converted["qwen3_moe"])
    out = model.generate(_ids()[:1, :5], max_new_tokens=6, do_sample=False)
    assert out.shape == (1, 11)


def test_router_gradients_are_deterministic_and_finite(tiny_models, converted):
    """Regression: with transformers' skip sentinel the router gradients came out garbage/NaN
    in some runs once another model had run in the process (uninitialised memory)."""
    grads = []
    for _ in range(4):
        load(tiny_models["qwen3_moe"])(torch.zeros(1, 4, dtype=torch.long))  # another model runs first
        model = load(converted["qwen3_moe"])
        for p in model.parameters():
            p.requires_grad_(False)
        for r in model.zeda_routers:
            r.weight.requires_grad_(True)
        model(_ids(7)).logits.square().mean().backward()
        grads.append(torch.cat([r.weight.grad.flatten() for r in model.zeda_routers]))
    assert all(torch.isfinite(g).all() for g in grads)
    for g in grads[1:]:
        torch.testing.assert_close(g, grads[0], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("arch", ARCHS)
def test_experts_run_only_the_live_slots_and_give_what_running_all_slots_gives(arch, converted, monkeypatch):
    """Dynamic mode: the grouped GEMMs compute only the nonzero-weight slots' rows (zero slots
    cost nothing), and logits and gradients equal those of transformers' own experts forward run
    over every slot with zero slots at expert 0 (weight 0)."""
    from vllm_zeda.hf import experts as grouped

    zeda = load(converted[arch])
    zeda.zeda_set_mode(masked=False, zero_bias=0.0)
    blocks = [r for r in zeda.modules() if hasattr(r, "gate") and hasattr(r, "experts")]
    rows = []  # rows each grouped GEMM computes (the last group's end)
    original = grouped._grouped_mm

    def counting(x, w, offs):
        rows.append(int(offs[-1]))
        return original(x, w, offs=offs)

    monkeypatch.setattr(grouped, "_grouped_mm", counting)
    x = _ids(5)

    def run():
        zeda.zero_grad()
        zeda.zeda_stats(reset=True)
        logits = zeda(x).logits
        logits.square().mean().backward()
        grads = {n: p.grad.clone() for n, p in zeda.named_parameters() if p.grad is not None}
        return logits.detach(), grads, zeda.zeda_stats()

    live_logits, live_grads, stats = run()
    live = sum(layer["total_slots"] - layer["zero_slots"] for layer in stats["layers"])
    assert 0.2 < stats["zero_fraction"] < 0.8
    assert len(rows) == 2 * len(blocks) and sum(rows) == 2 * live  # two GEMMs a layer, live rows only
    for block in blocks:
        del block.experts.forward  # back to transformers' forward: every slot, zero ones at expert 0
    all_logits, all_grads, _ = run()
    assert (live_logits - all_logits).abs().max().item() <= 1e-5
    assert live_grads.keys() == all_grads.keys()
    for n in all_grads:
        assert torch.allclose(live_grads[n], all_grads[n], atol=1e-6, rtol=1e-4), n
