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
