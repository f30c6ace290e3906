"""vllm_zeda.train.losses: the pure loss functions of the trainer."""
import torch

from vllm_zeda.train.report import throughput
from vllm_zeda.train.losses import balance_loss, kl_teacher_student, kl_topk, teacher_topk, zero_fractions
from vllm_zeda.routing import balance_weight, group_balance_loss, route_softmax


def test_kl():
    g = torch.Generator().manual_seed(0)
    t, s = torch.randn(4, 7, 50, generator=g), torch.randn(4, 7, 50, generator=g)
    assert kl_teacher_student(t, t).abs() < 1e-6
    kl = kl_teacher_student(t, s)
    ref = torch.nn.functional.kl_div(s.log_softmax(-1).view(-1, 50), t.log_softmax(-1).view(-1, 50), log_target=True, reduction="batchmean")
    assert torch.allclose(kl, ref, atol=1e-6)
    assert kl_teacher_student(t, s, temperature=2.0) > 0
    # a top-k cache holding the whole vocabulary is the full KL; fewer tokens approximate it
    lp, ids = teacher_topk(t, 50, temperature=2.0)
    assert torch.allclose(kl_topk(lp, ids, s, 2.0), kl_teacher_student(t, s, 2.0), atol=1e-5)
    lp, ids = teacher_topk(t * 5, 10)
    assert torch.allclose(kl_topk(lp, ids, s), kl_teacher_student(t * 5, s), rtol=0.2)


def test_balance_loss_is_the_routing_formula_summed():
    e, z, k = 8, 4, 2
    w = balance_weight(0.5, e, z)
    g = torch.Generator().manual_seed(1)
    logits = [torch.randn(32, e + z, generator=g, requires_grad=True) for _ in range(3)]
    ids = [route_softmax(x.detach(), e, k, True).ids for x in logits]
    total = balance_loss(logits, ids, num_real=e, num_zero=z, top_k=k, w=w, alpha=0.1)
    ref = sum(group_balance_loss(x.softmax(-1), i, e, z, k, w, 0.1) for x, i in zip(logits, ids))
    assert torch.allclose(total, ref)
    # passing the local zero fractions explicitly changes nothing
    f = zero_fractions(ids, e)
    assert torch.allclose(balance_loss(logits, ids, num_real=e, num_zero=z, top_k=k, w=w, alpha=0.1, layer_zero_fractions=f), total)
    total.backward()
    assert all(x.grad is not None and x.grad.abs().sum() > 0 for x in logits)


def test_sigmoid_balance_loss_sums_the_normalised_sigmoid():
    """The sigmoid family's balancing loss takes the ZEDA authors' probabilities: sigmoid scores
    normalised per token over E+Z (routing.balance_scores), not a softmax."""
    e, z, k = 8, 4, 2
    w = balance_weight(0.5, e, z)
    g = torch.Generator().manual_seed(2)
    logits = [torch.randn(32, e + z, generator=g, requires_grad=True) for _ in range(2)]
    ids = [x.detach().topk(k).indices for x in logits]
    total = balance_loss(logits, ids, num_real=e, num_zero=z, top_k=k, w=w, alpha=0.1, scoring="sigmoid")
    probs = [x.sigmoid() / x.sigmoid().sum(-1, keepdim=True) for x in logits]
    assert torch.allclose(total, sum(group_balance_loss(p, i, e, z, k, w, 0.1) for p, i in zip(probs, ids)))
    assert not torch.allclose(total, balance_loss(logits, ids, num_real=e, num_zero=z, top_k=k, w=w, alpha=0.1))


def test_balance_gradient_points_at_the_target():
    """Above the target zero fraction the loss pushes zero probability down, below it up."""
    e, z, k = 8, 8, 2
    w = balance_weight(0.5, e, z)
    logits = torch.zeros(64, e + z, requires_grad=True)
    for f_z, sign in ((0.8, 1.0), (0.2, -1.0)):
        logits.grad = None
        ids = torch.zeros(64, k, dtype=torch.long)
        loss = group_balance_loss(logits.softmax(-1), ids, e, z, k, w, zero_fraction=torch.tensor(f_z))
        loss.backward()
        assert sign * logits.grad[:, e:].sum() > 0  # gradient descent lowers (raises) zero logits


def test_topk_kl_is_a_lower_bound_of_the_full_kl():
    g = torch.Generator().manual_seed(3)
    t, s = torch.randn(6, 40, generator=g) * 3, torch.randn(6, 40, generator=g)
    full = kl_teacher_student(t, s)
    for k in (1, 4, 16, 39):
        lp, ids = teacher_topk(t, k)
        assert 0 <= kl_topk(lp, ids, s) <= full + 1e-6


def test_throughput_leaves_out_the_warm_up_step():
    t = throughput([5.0, 1.0, 1.0, 2.0], tokens_per_step=1000, processes=2)
    assert t == {"steps_timed": 3, "seconds": 4.0, "tokens_per_step": 1000, "tokens_per_s": 750.0,
                 "tokens_per_s_per_process": 375.0}
    assert throughput([2.0], 100, 1)["tokens_per_s"] == 50.0  # one step: nothing to leave out
    assert throughput([], 100, 1)["tokens_per_s"] is None


def test_chunked_kl_equals_the_whole_batch_at_once_with_its_gradient():
    """The KLs go a chunk of positions at a time (activation checkpointing): same value and
    gradient as computing every position at once."""
    import torch.nn.functional as F

    from vllm_zeda.train import losses

    g = torch.Generator().manual_seed(0)
    t, s = torch.randn(3, 50, 40, generator=g), torch.randn(3, 50, 40, generator=g).requires_grad_()
    whole = (F.softmax(t / 2, -1) * (F.log_softmax(t / 2, -1) - F.log_softmax(s / 2, -1))).sum(-1).mean() * 4
    (g_whole,) = torch.autograd.grad(whole, s)
    lp, ids = losses.teacher_topk(t, 7)
    top_whole = losses.kl_topk(lp, ids, s)
    (gt_whole,) = torch.autograd.grad(top_whole, s)
    for rows in (7, 64, 1000):
        losses.ROWS_PER_CHUNK = rows
        try:
            chunked = losses.kl_teacher_student(t, s, temperature=2.0)
            (g_chunked,) = torch.autograd.grad(chunked, s)
            top = losses.kl_topk(lp, ids, s)
            (gt,) = torch.autograd.grad(top, s)
        finally:
            losses.ROWS_PER_CHUNK = 1024
        assert torch.allclose(chunked, whole, atol=1e-6) and torch.allclose(g_chunked, g_whole, atol=1e-7)
        assert torch.allclose(top, top_whole, atol=1e-6) and torch.allclose(gt, gt_whole, atol=1e-7)


def test_chunked_kl_backward_builds_one_logits_sized_gradient():
    """The chunks' gradients are concatenated once, not each zero-padded to the whole [positions,
    vocabulary] tensor and summed (a fill and an addition of the whole logits per chunk)."""
    from torch.profiler import ProfilerActivity, profile

    from vllm_zeda.train import losses

    g = torch.Generator().manual_seed(0)
    t, s = torch.randn(2, 48, 40, generator=g), torch.randn(2, 48, 40, generator=g).requires_grad_()
    loss = losses.mean_over_positions(lambda a, b: losses.kl_rows(a, b, 1.0), t, s, rows=8)  # 12 chunks
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        loss.backward()
    whole = [96, 40]
    full_size = [e.name for e in prof.events() if e.input_shapes and whole in e.input_shapes
                 and e.name in ("aten::add_", "aten::add", "aten::fill_", "aten::zero_", "aten::cat")]
    assert full_size.count("aten::cat") <= 1 and not {"aten::add_", "aten::add", "aten::fill_", "aten::zero_"} & set(full_size), full_size
