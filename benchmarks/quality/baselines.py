"""Training-free ways to run fewer expert slots, the baselines ZEDA is held to: pure functions of a
softmax router's probabilities.

Each takes probs [T, E] (softmax over the real experts) and the model's K, and returns (weights,
ids), both [T, K]: ids the top-K experts, weights the kept slots' renormalised probabilities and 0
for a dropped slot (an experts module then skips it, or multiplies it by 0). Every rule keeps at
least one slot a token. `kept_fraction(weights)` is the share of the K slots still run: the
routed-expert FLOPs against static top-K.
"""
from __future__ import annotations

import torch


def _renormalise(top: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    kept = torch.where(keep, top, torch.zeros_like(top))
    return kept / kept.sum(dim=-1, keepdim=True)


def _topk(probs: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.topk(probs, k, dim=-1)  # sorted: slot 0 is each token's best expert


def static_k(probs: torch.Tensor, k: int, keep_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The model run at top-`keep_k` instead of top-K (renormalised over the kept slots)."""
    top, ids = _topk(probs, k)
    keep = torch.arange(k, device=probs.device) < max(1, keep_k)
    return _renormalise(top, keep.expand_as(top)), ids


def top_p(probs: torch.Tensor, k: int, p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-p routing (Huang et al. 2024): a token's best experts until their probability reaches p,
    at most K of them."""
    top, ids = _topk(probs, k)
    before = top.cumsum(dim=-1) - top  # mass of the better slots
    keep = before < p
    keep[:, 0] = True
    return _renormalise(top, keep), ids


def threshold(probs: torch.Tensor, k: int, tau: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Static top-K, then the slots whose renormalised weight is under tau dropped."""
    top, ids = _topk(probs, k)
    keep = top / top.sum(dim=-1, keepdim=True) >= tau
    keep[:, 0] = True
    return _renormalise(top, keep), ids


def random_drop(probs: torch.Tensor, k: int, rate: float, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Static top-K, then each slot dropped with probability `rate` (seeded), a token's best slot
    kept where all would go."""
    top, ids = _topk(probs, k)
    keep = torch.rand(top.shape, generator=generator, device="cpu").to(probs.device) >= rate
    keep[:, 0] |= ~keep.any(dim=-1)
    return _renormalise(top, keep), ids


def kept_fraction(weights: torch.Tensor) -> float:
    return float((weights > 0).float().mean())
