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
"""
from __future__ import annotations

import torch

EXPERT_OPTIMIZERS = ("adamw", "adafactor")
MASTER_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def stochastic_round(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """fp32 -> bf16, rounding each value up (in magnitude) with probability equal to the share of
    the bf16 step it is past the value below: E[result] = x. Adds uniform 16-bit noise to the
    fp32 bit pattern (sign-magnitude, so one rule serves both signs) and drops the low 16 bits."""
    bits = x.float().contiguous().view(torch.int32)
    noise = torch.randint(0, 1 << 16, x.shape, dtype=torch.int32, device=x.device, generator=generator)
    return ((bits + noise) & -65536).view(torch.float32).to(torch.bfloat16)


def _make(group: dict, kind: str) -> torch.optim.Optimizer:
    if kind == "adafactor":
        return torch.optim.Adafactor([group], lr=group["lr"])
    return torch.optim.AdamW([group], betas=(0.9, 0.95), weight_decay=0.0)


class _Step:
    """An optimizer over trained tensors that hold their own (fp32) master values."""

    def __init__(self, group: dict, kind: str):
        self.optimizer = _make(group, kind)
        self.params = list(group["params"])

    def step(self) -> None:
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


class _Bf16MasterStep:
    """One bf16 tensor stepped by an fp32 optimizer through a scratch parameter (empty between steps)."""

    def __init__(self, param: torch.Tensor, group: dict, kind: str, seed: int):
        self.params = [param]
        self.scratch = torch.nn.Parameter(torch.empty(0, device=param.device))
        self.optimizer = _make({**group, "params": [self.scratch]}, kind)
        self.seed = seed

    @torch.no_grad()
    def step(self) -> None:
        param, scratch = self.params[0], self.scratch
        scratch.data = param.data.float()
        scratch.grad = param.grad.float()
        self.optimizer.step()
        steps = int(self.optimizer.state[scratch]["step"])
        generator = torch.Generator(device=param.device).manual_seed(self.seed * 1_000_003 + steps)
        param.data.copy_(stochastic_round(scratch.data, generator))
        scratch.data, scratch.grad, param.grad = torch.empty(0, device=param.device), None, None


class StageOptimizer:
    """`groups`: dicts with "params", "lr", "base_lr", "optimizer" (one of EXPERT_OPTIMIZERS) and
    optionally "master" (a MASTER_DTYPES key; default float32). `seed` keys stochastic rounding."""

    def __init__(self, groups: list[dict], *, in_backward: bool = False, grad_clip: float = 0.0, seed: int = 0):
        self.in_backward, self.grad_clip = in_backward, grad_clip
        self.steps: list[_Step | _Bf16MasterStep] = []  # in a fixed order: the state dict's
        for g in groups:
            kind, master = g["optimizer"], g.get("master", "float32")
            spec = {k: v for k, v in g.items() if k not in ("optimizer", "master")}
            if master == "bfloat16":
                for p in g["params"]:
                    self.steps.append(_Bf16MasterStep(p, spec, kind, seed=seed * 65_537 + len(self.steps)))
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
            if not self._armed:  # an earlier micro-batch of this step: keep accumulating
                return
            if self.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_([param], self.grad_clip)
            step.step()

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
