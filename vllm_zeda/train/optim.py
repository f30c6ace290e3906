"""The trainer's optimizer for one stage: AdamW over the routers, AdamW or (--expert-optimizer
adafactor) torch's Adafactor over the MoE blocks in stage 2, stepped after the whole backward or,
with --optimizer-in-backward, inside it: one optimizer per trained tensor, stepped from that
tensor's post-accumulate-grad hook, so no full set of gradients is ever held (each is freed
right after its step).

Master weights: a trained tensor is fp32, or (--expert-master bfloat16, the MoE blocks) bf16. A
bf16 one is stepped by an fp32 optimizer on an fp32 copy of its value and gradient, made for the
step and dropped after it, and the result is rounded back to bf16 stochastically (`stochastic_round`:
unbiased, so updates far below bf16's resolution still move the weights on average). Its noise is
a pure function of (seed, tensor, the optimizer's step count), so a resumed run rounds alike.

Memory per trained parameter besides its value: AdamW 8 bytes (two fp32 moments), Adafactor about
nothing (a row and a column second moment per matrix, no first moment). In backward, gradient
clipping is per tensor (no global norm exists before the last gradient): --grad-clip bounds each
tensor's gradient norm. One process only (DDP reduces gradients after the hooks run).

A bf16 tensor under Adafactor is stepped by `bf16_adafactor_step`: torch.optim.Adafactor's update
(`adafactor_update`, checked against torch's in tests; torch's optimizer still holds the state, so
its state dict is torch's) fused with the upcast, the per-tensor clip and the stochastic rounding,
with no host syncs. Eager it is a chain of elementwise passes over the tensor; under --compile
(`fused.Fused`) inductor makes it a few kernels: at Qwen3-30B-A3B's shape that step is a large
share of stage 2's time (benchmarks/RESULTS.md section 8).
"""
from __future__ import annotations

import math
from typing import Callable

import torch

EXPERT_OPTIMIZERS = ("adamw", "adafactor")
MASTER_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def stochastic_round(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """fp32 -> bf16, rounding each value up (in magnitude) with probability equal to the share of
    the bf16 step it is past the value below: E[result] = x (`round_with_noise`, its noise drawn
    from `generator`)."""
    return round_with_noise(x, rounding_noise(x, generator))


def rounding_noise(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Uniform 16-bit integers, one per value of `x`: stochastic rounding's randomness."""
    return torch.randint(0, 1 << 16, x.shape, dtype=torch.int32, device=x.device, generator=generator)


def round_with_noise(x: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Adds `noise` to the low 16 bits of x's fp32 bit pattern (sign-magnitude, so one rule serves
    both signs) and drops them: with uniform noise, unbiased rounding to bf16."""
    bits = x.float().contiguous().view(torch.int32)
    return ((bits + noise) & -65536).view(torch.float32).to(torch.bfloat16)


def adafactor_update(p: torch.Tensor, g: torch.Tensor, row_var: torch.Tensor, col_var: torch.Tensor,
                     beta2_t: torch.Tensor, rho_t: torch.Tensor, *, d: float, eps1: float, eps2: float):
    """torch.optim.Adafactor's step (no weight decay) for one fp32 tensor of >= 2 dims, factored
    over its last two: (new value, new row_var, new col_var). beta2_t = step ** beta2_decay and
    rho_t = min(lr, step ** -0.5) are the scalars torch computes on the host from the step count;
    its two norms stay on the device here (torch reads them back to the host)."""
    square = g.square()
    row_var = row_var.lerp(square.mean(-1, keepdim=True), beta2_t)
    col_var = col_var.lerp(square.mean(-2, keepdim=True), beta2_t)
    variance = row_var * col_var / row_var.mean(-2, keepdim=True).clamp(min=eps1)  # torch: row_var @ col_var
    update = variance.clamp(min=eps1 * eps1).rsqrt() * g
    alpha = (p.norm() / math.sqrt(p.numel())).clamp(min=eps2) * rho_t
    denom = (update.norm() / (math.sqrt(update.numel()) * d)).clamp(min=1.0)
    return p - update * (alpha / denom), row_var, col_var


def bf16_adafactor_step(param: torch.Tensor, grad: torch.Tensor, row_var: torch.Tensor, col_var: torch.Tensor,
                        noise: torch.Tensor, beta2_t: torch.Tensor, rho_t: torch.Tensor, *, clip: float, d: float,
                        eps1: float, eps2: float) -> None:
    """One Adafactor step of a bf16 tensor, in place: its gradient upcast and (clip > 0) scaled to
    norm <= clip as clip_grad_norm_ does, `adafactor_update` on the fp32 value, the result rounded
    back with `noise` (`round_with_noise`); row_var and col_var updated."""
    g = grad.float()
    if clip > 0:
        g = g * (clip / (g.norm() + 1e-6)).clamp(max=1.0)
    new, rows, cols = adafactor_update(param.float(), g, row_var, col_var, beta2_t, rho_t, d=d, eps1=eps1, eps2=eps2)
    param.copy_(round_with_noise(new, noise))
    row_var.copy_(rows)
    col_var.copy_(cols)


def _make(group: dict, kind: str) -> torch.optim.Optimizer:
    if kind == "adafactor":
        return torch.optim.Adafactor([group], lr=group["lr"])
    return torch.optim.AdamW([group], betas=(0.9, 0.95), weight_decay=0.0)


class _Step:
    """An optimizer over trained tensors that hold their own (fp32) master values."""

    def __init__(self, group: dict, kind: str):
        self.optimizer = _make(group, kind)
        self.params = list(group["params"])

    def step(self, clip: float = 0.0) -> None:
        if clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params, clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


class _Bf16MasterStep:
    """One bf16 tensor stepped by an fp32 optimizer through a scratch parameter (empty between
    steps), or, under Adafactor with a matrix, by `adafactor_step` (`bf16_adafactor_step` or its
    compiled form) on the state torch's Adafactor keeps for the scratch parameter."""

    def __init__(self, param: torch.Tensor, group: dict, kind: str, seed: int, adafactor_step: Callable | None = None):
        self.params = [param]
        self.scratch = torch.nn.Parameter(torch.empty(0, device=param.device))
        self.optimizer = _make({**group, "params": [self.scratch]}, kind)
        self.seed = seed
        self.adafactor_step = adafactor_step if kind == "adafactor" and param.dim() >= 2 else None

    def _noise(self, param: torch.Tensor, steps: int) -> torch.Tensor:
        generator = torch.Generator(device=param.device).manual_seed(self.seed * 1_000_003 + steps)
        return rounding_noise(param, generator)

    @torch.no_grad()
    def step(self, clip: float = 0.0) -> None:
        if self.adafactor_step is not None:
            return self._adafactor(clip)
        param, scratch = self.params[0], self.scratch
        if clip > 0:
            torch.nn.utils.clip_grad_norm_([param], clip)
        scratch.data = param.data.float()
        scratch.grad = param.grad.float()
        self.optimizer.step()
        steps = int(self.optimizer.state[scratch]["step"])
        param.data.copy_(round_with_noise(scratch.data, self._noise(param, steps)))
        scratch.data, scratch.grad, param.grad = torch.empty(0, device=param.device), None, None

    def _adafactor(self, clip: float) -> None:
        param, (group,) = self.params[0], self.optimizer.param_groups
        if group["weight_decay"] or group["maximize"]:
            raise ValueError("the fused Adafactor step takes no weight decay and no maximize")
        state = self.optimizer.state[self.scratch]
        if not state:  # as torch's Adafactor starts one (its state dict stays torch's)
            state["step"] = torch.tensor(0.0)
            state["row_var"] = param.new_zeros(param.shape[:-1] + (1,), dtype=torch.float32)
            state["col_var"] = param.new_zeros(param.shape[:-2] + (1, param.shape[-1]), dtype=torch.float32)
        state["step"] += 1
        steps = float(state["step"])
        scalar = lambda v: torch.full((), v, dtype=torch.float32, device=param.device)  # noqa: E731 - no host sync
        eps1, eps2 = group["eps"]
        self.adafactor_step(param.data, param.grad, state["row_var"], state["col_var"], self._noise(param, int(steps)),
                            scalar(steps ** group["beta2_decay"]), scalar(min(group["lr"], steps ** -0.5)), clip=clip,
                            d=group["d"], eps1=torch.finfo(torch.float32).eps if eps1 is None else eps1, eps2=eps2)
        param.grad = None


class StageOptimizer:
    """`groups`: dicts with "params", "lr", "base_lr", "optimizer" (one of EXPERT_OPTIMIZERS) and
    optionally "master" (a MASTER_DTYPES key; default float32). `seed` keys stochastic rounding;
    `adafactor_step` steps bf16 matrices under Adafactor (`bf16_adafactor_step`, or its compiled form)."""

    def __init__(self, groups: list[dict], *, in_backward: bool = False, grad_clip: float = 0.0, seed: int = 0,
                 adafactor_step: Callable = bf16_adafactor_step):
        self.in_backward, self.grad_clip = in_backward, grad_clip
        self.steps: list[_Step | _Bf16MasterStep] = []  # in a fixed order: the state dict's
        for g in groups:
            kind, master = g["optimizer"], g.get("master", "float32")
            spec = {k: v for k, v in g.items() if k not in ("optimizer", "master")}
            if master == "bfloat16":
                for p in g["params"]:
                    self.steps.append(_Bf16MasterStep(p, spec, kind, seed=seed * 65_537 + len(self.steps),
                                                      adafactor_step=adafactor_step))
            elif in_backward:
                self.steps += [_Step({**spec, "params": [p]}, kind) for p in g["params"]]
            elif g["params"]:
                self.steps.append(_Step(spec, kind))
        self._armed = False
        self._hooks = []
        if in_backward:
            self._hooks = [s.params[0].register_post_accumulate_grad_hook(self._hook(s)) for s in self.steps]

    def _hook(self, step: _Step | _Bf16MasterStep):
        def step_now(param: torch.Tensor) -> None:
            if self._armed:  # else an earlier micro-batch of this step: keep accumulating
                step.step(clip=self.grad_clip)

        return step_now

    def arm(self, last_micro_batch: bool) -> None:
        """In backward: whether this backward pass ends the step (the hooks step then)."""
        self._armed = last_micro_batch

    @property
    def optimizers(self) -> list[torch.optim.Optimizer]:
        return [s.optimizer for s in self.steps]

    @property
    def param_groups(self) -> list[dict]:
        return [g for s in self.steps for g in s.optimizer.param_groups]

    def clip_and_step(self, params: list[torch.Tensor]) -> None:
        """After the backward passes of a step (in backward: done already)."""
        if self.in_backward:
            return
        if self.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, self.grad_clip)
        for s in self.steps:
            s.step()

    def state_dict(self) -> dict:
        return {"optimizers": [s.optimizer.state_dict() for s in self.steps]}

    def load_state_dict(self, state: dict) -> None:
        for s, saved in zip(self.steps, state["optimizers"], strict=True):
            s.optimizer.load_state_dict(saved)

    def close(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []
