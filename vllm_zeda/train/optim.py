"""The trainer's optimizer for one stage: AdamW over the routers, AdamW or (--expert-optimizer
adafactor) torch's Adafactor over the MoE blocks in stage 2, stepped after the whole backward or,
with --optimizer-in-backward, inside it: one optimizer per trained tensor, stepped from that
tensor's post-accumulate-grad hook, so no full set of gradients is ever held (each is freed
right after its step).

Memory per trained parameter besides its fp32 value: AdamW 8 bytes (two moments), Adafactor about
nothing (a row and a column second moment per matrix, no first moment). In backward, gradient
clipping is per tensor (no global norm exists before the last gradient): --grad-clip bounds each
tensor's gradient norm. One process only (DDP reduces gradients after the hooks run).
"""
from __future__ import annotations

import torch

EXPERT_OPTIMIZERS = ("adamw", "adafactor")


def _make(group: dict, kind: str) -> torch.optim.Optimizer:
    if kind == "adafactor":
        return torch.optim.Adafactor([group], lr=group["lr"])
    return torch.optim.AdamW([group], betas=(0.9, 0.95), weight_decay=0.0)


class StageOptimizer:
    """`groups`: dicts with "params", "lr", "base_lr" and "optimizer" (one of EXPERT_OPTIMIZERS)."""

    def __init__(self, groups: list[dict], *, in_backward: bool = False, grad_clip: float = 0.0):
        self.in_backward, self.grad_clip = in_backward, grad_clip
        if in_backward:  # one optimizer per tensor, in a fixed order (the state dict's)
            parts = [({**g, "params": [p]}, g["optimizer"]) for g in groups for p in g["params"]]
        else:
            parts = [(g, g["optimizer"]) for g in groups if g["params"]]
        self.optimizers = [_make({k: v for k, v in g.items() if k != "optimizer"}, kind) for g, kind in parts]
        self._armed = False
        self._hooks = []
        if in_backward:
            by_param = {o.param_groups[0]["params"][0]: o for o in self.optimizers}
            self._hooks = [p.register_post_accumulate_grad_hook(self._hook(o)) for p, o in by_param.items()]

    def _hook(self, optimizer: torch.optim.Optimizer):
        def step_now(param: torch.Tensor) -> None:
            if not self._armed:  # an earlier micro-batch of this step: keep accumulating
                return
            if self.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_([param], self.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        return step_now

    def arm(self, last_micro_batch: bool) -> None:
        """In backward: whether this backward pass ends the step (the hooks step then)."""
        self._armed = last_micro_batch

    @property
    def param_groups(self) -> list[dict]:
        return [g for o in self.optimizers for g in o.param_groups]

    def clip_and_step(self, params: list[torch.Tensor]) -> None:
        """After the backward passes of a step (in backward: done already)."""
        if self.in_backward:
            return
        if self.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, self.grad_clip)
        for o in self.optimizers:
            o.step()
            o.zero_grad(set_to_none=True)

    def state_dict(self) -> dict:
        return {"optimizers": [o.state_dict() for o in self.optimizers]}

    def load_state_dict(self, state: dict) -> None:
        for o, s in zip(self.optimizers, state["optimizers"], strict=True):
            o.load_state_dict(s)

    def close(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []
