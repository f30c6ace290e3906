"""ZEDA routing, the single source of truth: the transformers classes and the trainer call it,
the vLLM router and its Triton kernel are tested against it. Pure torch, no Python loop over tokens.

A layer has E real experts, Z zero experts (router rows E..E+Z-1) and K slots per token.
Softmax family (Qwen3-MoE, Qwen2-MoE, OLMoE, Mixtral):
    p = softmax(logits over E+Z) ; top-K ; if renormalise: w = p_topK / sum(p_topK)
The sum includes zero slots (they dilute, they do not hand their weight to real experts); a
zero slot then contributes nothing: its weight is reported as 0.
Masked mode is the original static top-K over the E real experts (zero logits = -inf).
Sigmoid family (GLM-4-MoE, GLM-4.7-Flash, DeepSeek-V3), `route_sigmoid`:
    s = sigmoid(logits over E+Z) ; choose top-K by s + correction bias (E+Z entries), within the
    top `topk_group` of `n_group` groups ; w = s_topK (/ sum(s_topK) if renormalised) x scaling
Zero slots dilute the sum the same way and contribute nothing.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Routing:
    weights: torch.Tensor  # [T, K] float32; exactly 0 on zero slots
    ids: torch.Tensor  # [T, K] int64 in [0, E+Z); >= num_real marks a zero slot
    num_real: int

    @property
    def is_zero(self) -> torch.Tensor:
        return self.ids >= self.num_real


def route_softmax(
    logits: torch.Tensor,
    num_real: int,
    top_k: int,
    renormalize: bool,
    *,
    masked: bool = False,
    zero_bias: float = 0.0,
) -> Routing:
    """Top-K routing over E+Z router logits ([T, E+Z], any float dtype).

    `zero_bias` is added to the zero experts' logits before the softmax: the runtime dial,
    bias > 0 sends more slots to zero experts. Masked mode ignores the zero rows entirely;
    it is computed on the real logits alone, which is what the original model computes.
    """
    real_only = masked or logits.shape[-1] == num_real
    scores = logits[..., :num_real] if real_only else _bias_zero(logits, num_real, zero_bias)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32)
    top_p, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        top_p = top_p / top_p.sum(dim=-1, keepdim=True)
    weights = top_p if real_only else top_p.masked_fill(ids >= num_real, 0.0)
    return Routing(weights=weights, ids=ids, num_real=num_real)


def route_sigmoid(
    logits: torch.Tensor,
    correction_bias: torch.Tensor,
    num_real: int,
    top_k: int,
    renormalize: bool,
    *,
    scaling: float = 1.0,
    n_group: int = 1,
    topk_group: int = 1,
    masked: bool = False,
    zero_bias: float = 0.0,
) -> Routing:
    """Top-K sigmoid routing over E+Z router logits ([T, E+Z]) with a selection-only correction
    bias ([E+Z]), the DeepSeek-V3 / GLM-4-MoE rule.

    Grouped selection (n_group > 1): the E+Z experts split into n_group contiguous groups (so the
    zero experts fill the last ones, as the ZEDA authors' code splits them), a group scores the sum
    of its two best biased scores, and only the top `topk_group` groups compete. `zero_bias` is
    added to the zero experts' logits before the sigmoid. Masked mode computes on the E real
    logits and bias entries alone, grouped as the original model groups them.
    """
    real_only = masked or logits.shape[-1] == num_real
    if real_only:
        logits, correction_bias = logits[..., :num_real], correction_bias[:num_real]
    else:
        logits = _bias_zero(logits, num_real, zero_bias)
    scores = torch.sigmoid(logits.float())
    choice = scores + correction_bias.float()
    if n_group > 1:
        tokens, n = choice.shape
        group_scores = choice.view(tokens, n_group, n // n_group).topk(2, dim=-1).values.sum(-1)
        keep = torch.zeros_like(group_scores).scatter_(1, group_scores.topk(topk_group, dim=-1).indices, 1.0)
        choice = choice.masked_fill(keep.repeat_interleave(n // n_group, dim=1) == 0, float("-inf"))
    ids = torch.topk(choice, top_k, dim=-1).indices
    weights = scores.gather(-1, ids)
    if renormalize:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    weights = weights * scaling
    if not real_only:
        weights = weights.masked_fill(ids >= num_real, 0.0)
    return Routing(weights=weights, ids=ids, num_real=num_real)


def _bias_zero(logits: torch.Tensor, num_real: int, zero_bias: float) -> torch.Tensor:
    if zero_bias == 0.0:
        return logits
    bias = torch.zeros(logits.shape[-1], dtype=logits.dtype, device=logits.device)
    bias[num_real:] = zero_bias
    return logits + bias


def zero_slot_counts(routing: Routing, valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(zero slots, total slots) as 0-d int64 tensors, no host sync; `valid` [T] excludes padding."""
    zero = routing.is_zero
    if valid is not None:
        zero = zero & valid.reshape(-1, 1)
        total = valid.sum() * routing.ids.shape[-1]
    else:
        total = torch.tensor(routing.ids.numel(), device=routing.ids.device)
    return zero.sum(), total.to(torch.int64)


def skip_fraction(zero_slots: int, total_slots: int) -> float:
    return zero_slots / total_slots if total_slots else 0.0


def routed_expert_flops(live_slots: int, hidden_size: int, intermediate_size: int, gated: bool = True) -> int:
    """Multiply-add FLOPs of the routed experts: 2 per MAC, three (gated) or two projections."""
    projections = 3 if gated else 2
    return 2 * projections * hidden_size * intermediate_size * live_slots


def balance_weight(target_zero_fraction: float, num_real: int, num_zero: int) -> float:
    """w of the group balancing loss whose equilibrium zero fraction w*Z/(w*Z+E) is the target."""
    t = target_zero_fraction
    return t * num_real / ((1.0 - t) * num_zero)


def balance_scores(logits: torch.Tensor, scoring: str = "softmax") -> torch.Tensor:
    """The router probabilities [T, E+Z] (float32) the group balancing loss sums: softmax for the
    softmax family; for the sigmoid family the ZEDA authors' per-token normalised sigmoid,
    s / (sum(s) + 1e-20) (their Megatron `compute_routing_scores_for_aux_loss`)."""
    if scoring == "softmax":
        return torch.softmax(logits.float(), dim=-1)
    s = torch.sigmoid(logits.float())
    return s / (s.sum(dim=-1, keepdim=True) + 1e-20)


def group_balance_loss(
    probs: torch.Tensor,
    ids: torch.Tensor,
    num_real: int,
    num_zero: int,
    top_k: int,
    w: float,
    alpha: float = 0.1,
    zero_fraction: torch.Tensor | None = None,
) -> torch.Tensor:
    """ZEDA's group-level balancing loss for one layer; its equilibrium zero fraction is
    w*Z/(w*Z+E) (balance_weight).

    L = alpha * (E + w*Z)/K * (f_E * P_E / E + f_Z * P_Z / (w*Z)), with f_* the fractions of
    routed slots in each group (no gradient) and P_* the summed router probabilities of each
    group, averaged over tokens. `probs` [T, E+Z] are `balance_scores`, `ids` [T, K] the routing's.
    """
    # `zero_fraction` overrides f_Z (e.g. the value over all data-parallel ranks, so that the
    # averaged gradient equals the single-process one); it carries no gradient either way.
    e, z = num_real, num_zero
    with torch.no_grad():
        f_z = (ids >= e).float().mean() if zero_fraction is None else zero_fraction.detach().float()
        f_e = 1.0 - f_z
    p_e = probs[:, :e].sum(-1).mean()
    p_z = probs[:, e:].sum(-1).mean()
    return alpha * (e + w * z) / top_k * (f_e * p_e / e + f_z * p_z / (w * z))
