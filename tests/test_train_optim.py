"""The trainer's optimizer pieces: stochastic rounding to bf16 and bf16 master weights."""
import torch

from vllm_zeda.train.optim import StageOptimizer, stochastic_round


def test_stochastic_round_keeps_bf16_values_and_is_unbiased():
    g = torch.Generator().manual_seed(0)
    exact = torch.randn(10_000).to(torch.bfloat16).float()
    assert torch.equal(stochastic_round(exact, g).float(), exact)  # already representable: unchanged
    below = torch.tensor(1.0).to(torch.bfloat16).float()
    step = 2.0 ** -7  # bf16's spacing on [1, 2)
    for frac in (0.1, 0.5, 0.9):
        for sign in (1.0, -1.0):
            x = torch.full((200_000,), sign * (below + frac * step))
            r = stochastic_round(x, g).float()
            assert set(r.abs().unique().tolist()) == {1.0, 1.0 + step}  # only the two neighbours
            assert abs((r.abs() == 1.0 + step).float().mean().item() - frac) < 0.005  # up with probability frac
            assert abs(r.mean().item() - x[0].item()) < step * 0.005


def test_stochastic_round_is_reproducible_from_its_generator():
    x = torch.randn(4096)
    a = stochastic_round(x, torch.Generator().manual_seed(7))
    b = stochastic_round(x, torch.Generator().manual_seed(7))
    c = stochastic_round(x, torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_bf16_master_follows_the_fp32_trajectory_where_nearest_rounding_stalls():
    """Updates 100x below bf16's resolution: nearest rounding never moves the weight, stochastic
    rounding tracks the fp32 master's path on average."""
    torch.manual_seed(0)
    start = torch.ones(20_000)
    ref = torch.nn.Parameter(start.clone())
    bf16 = torch.nn.Parameter(start.to(torch.bfloat16))
    group = {"lr": 1e-4, "base_lr": 1e-4, "optimizer": "adamw"}
    fp32_opt = StageOptimizer([{**group, "params": [ref]}])
    bf16_opt = StageOptimizer([{**group, "params": [bf16], "master": "bfloat16"}], seed=3)
    for _ in range(100):
        for p, opt in ((ref, fp32_opt), (bf16, bf16_opt)):
            p.grad = torch.ones_like(p)  # AdamW moves each weight by -lr a step
            opt.clip_and_step([p])
    assert bf16.dtype == torch.bfloat16 and bf16.grad is None
    moved_fp32 = (start - ref.detach()).mean().item()  # 100 steps x 1e-4
    moved_bf16 = (start - bf16.detach().float()).mean().item()
    assert abs(moved_fp32 - 0.01) < 1e-4 and abs(moved_bf16 - moved_fp32) < 0.001
    nearest = start.to(torch.bfloat16).float() - 1e-4  # one step, rounded to nearest: no move at all
    assert torch.equal(nearest.to(torch.bfloat16).float(), start)


def test_bf16_master_state_dict_resumes_the_same_rounding():
    def run(first, last, saved=None):
        torch.manual_seed(1)
        p = torch.nn.Parameter(torch.randn(64, 32).to(torch.bfloat16))
        opt = StageOptimizer([{"params": [p], "lr": 1e-2, "base_lr": 1e-2, "optimizer": "adafactor", "master": "bfloat16"}],
                             in_backward=True, seed=5)
        if saved is not None:
            p.data, state = saved[0].clone(), saved[1]
            opt.load_state_dict(state)
        g = torch.Generator().manual_seed(2)
        grads = [torch.randn(64, 32, generator=g) for _ in range(6)]
        for grad in grads[first:last]:
            opt.arm(True)
            (p.float() * grad).sum().backward()  # the in-backward hook steps
        return p.detach().clone(), opt.state_dict()

    whole, _ = run(0, 6)
    half, state = run(0, 3)  # stop after 3 of the 6 gradients ...
    resumed, _ = run(3, 6, saved=(half, state))  # ... and take the last 3 from the saved state
    assert not torch.equal(half, whole)
    assert torch.equal(whole, resumed)


def _torch_adafactor_trajectory(start, grads, lr):
    p = torch.nn.Parameter(start.clone())
    opt = torch.optim.Adafactor([p], lr=lr)
    for g in grads:
        p.grad = g.clone()
        opt.step()
    return p.detach(), opt.state[p]


def test_adafactor_update_is_torchs_adafactor_step():
    """The pure update, chained over steps on an fp32 tensor, follows torch.optim.Adafactor's."""
    from vllm_zeda.train.optim import adafactor_update

    gen = torch.Generator().manual_seed(0)
    start = torch.randn(3, 40, 24, generator=gen)
    grads = [torch.randn(3, 40, 24, generator=gen) * (0.1 + i) for i in range(5)]
    ref, ref_state = _torch_adafactor_trajectory(start, grads, lr=1e-2)
    p, rows, cols = start.clone(), torch.zeros(3, 40, 1), torch.zeros(3, 1, 24)
    eps1 = torch.finfo(torch.float32).eps
    for step, g in enumerate(grads, 1):
        p, rows, cols = adafactor_update(p, g, rows, cols, torch.tensor(step ** -0.8), torch.tensor(min(1e-2, step ** -0.5)),
                                         d=1.0, eps1=eps1, eps2=1e-3)
    assert not torch.allclose(p, start, atol=1e-3)  # it moved
    torch.testing.assert_close(p, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(rows, ref_state["row_var"], rtol=1e-5, atol=0)
    torch.testing.assert_close(cols, ref_state["col_var"], rtol=1e-5, atol=0)


def _bf16_adafactor_run(adafactor_step, clip=0.0):
    """Four in-backward steps of a bf16 tensor under Adafactor: the value and the state dict."""
    torch.manual_seed(3)
    p = torch.nn.Parameter(torch.randn(4, 64, 32).to(torch.bfloat16))
    opt = StageOptimizer([{"params": [p], "lr": 1e-2, "base_lr": 1e-2, "optimizer": "adafactor", "master": "bfloat16"}],
                         in_backward=True, grad_clip=clip, seed=1, adafactor_step=adafactor_step)
    g = torch.Generator().manual_seed(4)
    for _ in range(4):
        opt.arm(True)
        (p.float() * torch.randn(4, 64, 32, generator=g) * 3).sum().backward()
    return p.detach().clone(), opt.state_dict()


def _assert_bf16_neighbours(got: torch.Tensor, expected: torch.Tensor, equal_share: float) -> None:
    """At most a bf16 step apart anywhere (a step at x is <= 2^-7 |x|; 1e-3 for values near 0
    whose sign-magnitude neighbours differ by more), and equal at `equal_share` of the values."""
    torch.testing.assert_close(got.float(), expected.float(), rtol=2.0 ** -7, atol=1e-3)
    assert torch.eq(got, expected).float().mean() > equal_share


def test_bf16_adafactor_step_is_torchs_adafactor_and_compiles_alike():
    """The fused bf16 step (eager and compiled) against torch's Adafactor stepping the fp32 scratch
    copy (adafactor_step=None): the same state dict, the same rounding noise, so the same bf16
    values but where fp32 rounding differences cross a rounding boundary (one bf16 step)."""
    from vllm_zeda.train.fused import Fused
    from vllm_zeda.train.optim import bf16_adafactor_step

    reference, ref_state = _bf16_adafactor_run(None)
    for step_fn in (bf16_adafactor_step, Fused().bf16_adafactor_step):
        got, state = _bf16_adafactor_run(step_fn)
        _assert_bf16_neighbours(got, reference, 0.99)
        ours, torchs = state["optimizers"][0]["state"][0], ref_state["optimizers"][0]["state"][0]
        assert set(ours) == set(torchs) == {"step", "row_var", "col_var"} and float(ours["step"]) == 4
        torch.testing.assert_close(ours["row_var"], torchs["row_var"], rtol=1e-5, atol=0)
        torch.testing.assert_close(ours["col_var"], torchs["col_var"], rtol=1e-5, atol=0)


def test_bf16_adafactor_step_clips_each_gradient_like_clip_grad_norm():
    from vllm_zeda.train.optim import bf16_adafactor_step

    clipped, _ = _bf16_adafactor_run(bf16_adafactor_step, clip=1e-3)
    torchs, _ = _bf16_adafactor_run(None, clip=1e-3)
    free, _ = _bf16_adafactor_run(bf16_adafactor_step, clip=0.0)
    assert not torch.equal(clipped, free)  # gradients of norm ~100 scaled to 1e-3 move the weights otherwise
    _assert_bf16_neighbours(clipped, torchs, 0.95)  # torch's path also rounds the clipped gradient to bf16
