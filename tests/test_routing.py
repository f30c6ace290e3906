import pytest
import torch

from tests.kernel_oracles import live_blocks_first, live_first, slot_blocks
from vllm_zeda.routing import (
    balance_weight,
    group_balance_loss,
    route_softmax,
    routed_expert_flops,
    zero_slot_counts,
)

E, Z, K = 8, 4, 3


def logits(t=64, seed=0, dtype=torch.float32):
    return torch.randn(t, E + Z, generator=torch.Generator().manual_seed(seed)).to(dtype)


@pytest.mark.parametrize("renorm", [True, False])
def test_masked_equals_static_topk_over_real_experts(renorm):
    x = logits()
    r = route_softmax(x, E, K, renorm, masked=True)
    p = torch.softmax(x[:, :E].float(), -1)
    w, ids = torch.topk(p, K)
    if renorm:
        w = w / w.sum(-1, keepdim=True)
    assert torch.equal(r.ids, ids) and torch.equal(r.weights, w)
    assert not r.is_zero.any()


def test_zero_slots_dilute_and_contribute_nothing():
    x = logits(256)
    r = route_softmax(x, E, K, True)
    full = torch.softmax(x, -1)
    top, _ = torch.topk(full, K)
    expected = top / top.sum(-1, keepdim=True)
    assert r.is_zero.any() and (~r.is_zero).any()
    assert torch.all(r.weights[r.is_zero] == 0)
    torch.testing.assert_close(r.weights[~r.is_zero], expected[~r.is_zero])
    # the real weights of a token with a zero slot sum to less than 1: zero slots dilute
    has_zero = r.is_zero.any(-1)
    assert torch.all(r.weights[has_zero].sum(-1) < 1)


def test_live_first_is_a_stable_partition_of_each_token():
    r = route_softmax(logits(128), E, K, True, zero_bias=0.5)
    lf = live_first(r)
    assert r.is_zero.any(-1).any() and (~r.is_zero).any(-1).any()
    for t in range(r.ids.shape[0]):
        live, zero = r.ids[t][~r.is_zero[t]], r.ids[t][r.is_zero[t]]
        assert lf.ids[t].tolist() == live.tolist() + zero.tolist()  # live first, each part in order
        assert lf.weights[t].tolist() == r.weights[t][~r.is_zero[t]].tolist() + r.weights[t][r.is_zero[t]].tolist()
    n_live = (~r.is_zero).sum(-1, keepdim=True)
    assert torch.equal(lf.is_zero, torch.arange(K) >= n_live)


def test_slot_blocks_give_a_zero_slot_only_padding_rows():
    is_zero = torch.tensor([[False, True], [True, True], [False, False]])  # 3 tokens x 2 slots
    blocks = slot_blocks(is_zero, 4).reshape(6, 4)
    assert blocks[:, 0].tolist() == [0, 6, 6, 6, 4, 5]  # live slots their own row, zero ones padding (6)
    assert torch.all(blocks[:, 1:] == 6) and blocks.dtype == torch.int32


def test_live_blocks_first_puts_every_live_slots_block_before_the_zero_ones():
    live = torch.tensor([[5, -1], [-1, -1], [2, 7]], dtype=torch.int32)  # 3 tokens x 2 slots, 3 live
    blocks, experts, end = live_blocks_first(live, 4)
    assert blocks.reshape(6, 4)[:, 0].tolist() == [0, 4, 5, 6, 6, 6]  # live slots 0, 4, 5 in slot order
    assert torch.equal(blocks.reshape(6, 4)[:, 1:], torch.full((6, 3), 6, dtype=torch.int32))
    assert experts.tolist() == [5, 2, 7, -1, -1, -1] and end == 3 * 4
    assert live_blocks_first(torch.full((2, 3), -1, dtype=torch.int32), 4)[2] == 0  # every slot zero


def test_zero_bias_moves_skip_fraction_monotonically():
    x = logits(2048)
    fracs = [route_softmax(x, E, K, True, zero_bias=b).is_zero.float().mean().item() for b in (-4, -1, 0, 1, 4)]
    assert fracs == sorted(fracs) and fracs[0] < 0.05 and fracs[-1] > 0.9


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dtype_safe(dtype):
    r = route_softmax(logits(dtype=dtype), E, K, True, zero_bias=0.5)
    assert r.weights.dtype == torch.float32 and torch.isfinite(r.weights).all()


def test_counts_exclude_padding():
    r = route_softmax(logits(10), E, K, True, zero_bias=2.0)
    valid = torch.tensor([True] * 7 + [False] * 3)
    z, t = zero_slot_counts(r, valid)
    assert t.item() == 7 * K and z.item() == r.is_zero[:7].sum().item()


def test_flops():
    assert routed_expert_flops(1, 2048, 768) == 2 * 3 * 2048 * 768


@pytest.mark.parametrize("target", [0.25, 0.5, 0.75])
def test_balance_loss_equilibrium(target):
    w = balance_weight(target, E, Z)
    assert w * Z / (w * Z + E) == pytest.approx(target)
    # the loss pushes toward the target: at f_Z above target, raising zero probability costs more
    probs = torch.softmax(logits(512), -1).requires_grad_(True)
    ids = torch.topk(probs, K).indices
    loss = group_balance_loss(probs, ids, E, Z, K, w)
    loss.backward()
    assert torch.isfinite(loss) and probs.grad is not None


# --------------------------------------------------------------- sigmoid family ----


def _deepseek_router(n_experts, n_group, topk_group, k, scaling, weight, bias):
    """transformers' own DeepSeek-V3 router (sigmoid, correction bias, grouped top-k)."""
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

    cfg = DeepseekV3Config(hidden_size=weight.shape[1], n_routed_experts=n_experts, num_experts_per_tok=k,
                           n_group=n_group, topk_group=topk_group, routed_scaling_factor=scaling, norm_topk_prob=True)
    router = DeepseekV3TopkRouter(cfg)
    with torch.no_grad():
        router.weight.copy_(weight)
        router.e_score_correction_bias.copy_(bias)
    return router


@pytest.mark.parametrize("n_group,topk_group", [(1, 1), (4, 2)])
def test_sigmoid_masked_is_transformers_deepseek_v3_router(n_group, topk_group):
    """Masked mode over E+Z logits and bias routes exactly as transformers' DeepSeek-V3 router
    does over the E real ones (its grouping included)."""
    from vllm_zeda.routing import route_sigmoid

    g = torch.Generator().manual_seed(3)
    e, z, k, h = 16, 8, 4, 32
    weight, bias, x = torch.randn(e + z, h, generator=g), torch.randn(e + z, generator=g) * 0.1, torch.randn(50, h, generator=g)
    hf_logits, hf_w, hf_ids = _deepseek_router(e, n_group, topk_group, k, 1.8, weight[:e], bias[:e])(x)
    r = route_sigmoid(x @ weight.T, bias, e, k, True, scaling=1.8, n_group=n_group, topk_group=topk_group, masked=True)
    order = hf_ids.sort(-1)
    mine = r.ids.sort(-1)
    assert torch.equal(mine.values, order.values)
    torch.testing.assert_close(r.weights.gather(-1, mine.indices), hf_w.gather(-1, order.indices))
    assert not r.is_zero.any()


def test_sigmoid_zero_slots_dilute_scale_and_follow_the_dial():
    from vllm_zeda.routing import route_sigmoid

    g = torch.Generator().manual_seed(4)
    x, bias = torch.randn(512, E + Z, generator=g), torch.randn(E + Z, generator=g) * 0.1
    r = route_sigmoid(x, bias, E, K, True, scaling=2.5)
    s = torch.sigmoid(x)
    ids = torch.topk(s + bias, K).indices  # the bias picks, the unbiased scores weigh
    assert torch.equal(r.ids, ids) and r.is_zero.any() and (~r.is_zero).any()
    top = s.gather(-1, ids)
    expected = top / (top.sum(-1, keepdim=True) + 1e-20) * 2.5
    assert torch.all(r.weights[r.is_zero] == 0)
    torch.testing.assert_close(r.weights[~r.is_zero], expected[~r.is_zero])
    has_zero = r.is_zero.any(-1)
    assert torch.all(r.weights[has_zero].sum(-1) < 2.5 - 1e-6)  # zero slots dilute
    fractions = [route_sigmoid(x, bias, E, K, True, zero_bias=b).is_zero.float().mean().item() for b in (-2, 0, 2)]
    assert fractions[0] < fractions[1] < fractions[2]


def test_sigmoid_groups_put_the_zero_experts_in_the_last_groups():
    """n_group = 2 over E+Z = 12: experts 0-5 and 6-11, so the second group holds 2 real and the 4
    zero experts; a token whose best two scores sit in it routes only there."""
    from vllm_zeda.routing import route_sigmoid

    x = torch.full((1, E + Z), -5.0)
    x[0, 9:11] = 5.0  # two zero experts score highest: group 2 wins
    x[0, 0] = 4.0  # the best real expert is in the losing group
    r = route_sigmoid(x, torch.zeros(E + Z), E, K, True, n_group=2, topk_group=1)
    assert set(r.ids[0].tolist()) <= set(range(6, 12)) and 0 not in r.ids[0].tolist()
