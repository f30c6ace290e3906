"""Distillation losses, pure functions: KL(teacher || student) on next-token distributions (and
the reverse, KL(student || teacher), on the student's own text: --on-policy) and the per-layer
group balancing loss (routing.group_balance_loss), summed over layers.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..routing import balance_scores, group_balance_loss


ROWS_PER_CHUNK = 1024  # positions whose float32 [positions, vocabulary] intermediates exist at once


def mean_over_positions(per_position, *tensors: torch.Tensor, rows: int | None = None) -> torch.Tensor:
    """Mean over positions of per_position(*chunks) ([rows] values), computed a chunk of positions
    at a time under activation checkpointing: the float32 vocabulary-wide intermediates of one
    chunk exist at once, in the backward too (they are recomputed there), whatever the batch.

    The chunks come from one `split`, whose backward concatenates their gradients once; a slice's
    backward would build a zero-filled gradient of the whole [positions, vocabulary] tensor per
    chunk for autograd to sum (at Qwen3's vocabulary and 16,384 positions: 16 fills and 15
    additions of 5 GB a step, RESULTS.md §8)."""
    rows = rows or ROWS_PER_CHUNK
    flat = [t.reshape(-1, t.shape[-1]) for t in tensors]
    n = flat[0].shape[0]

    def chunk_sum(*chunk):
        return per_position(*chunk).sum()

    total = sum(checkpoint(chunk_sum, *chunk, use_reentrant=False) for chunk in zip(*(t.split(rows) for t in flat)))
    return total / n


def kl_rows(teacher_logits, student_logits, temperature):
    """[rows] KL(softmax(t/T) || softmax(s/T)) in float32."""
    t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    return (t.exp() * (t - s)).sum(-1)


def kl_topk_rows(teacher_logp, teacher_ids, student_logits, temperature):
    """[rows] KL over the teacher's k cached tokens plus an "everything else" bucket (kl_topk)."""
    t = teacher_logp.float()
    s = F.log_softmax(student_logits.float() / temperature, dim=-1).gather(-1, teacher_ids.long())
    t_rest = torch.log1p(-t.exp().sum(-1).clamp(max=1 - 1e-7))
    s_rest = torch.log1p(-s.exp().sum(-1).clamp(max=1 - 1e-7))
    return (t.exp() * (t - s)).sum(-1) + t_rest.exp() * (t_rest - s_rest)


def kl_teacher_student(teacher_logits: torch.Tensor, student_logits: torch.Tensor, temperature: float = 1.0,
                       rows=kl_rows) -> torch.Tensor:
    """Mean over tokens of KL(softmax(t/T) || softmax(s/T)), times T^2.

    The T^2 keeps gradient magnitudes comparable across temperatures (Hinton et al.). Math in
    float32 whatever the logits' dtype: bf16 log-softmax differences are too coarse for a KL.
    `rows`: kl_rows or a compiled kl_rows (train.fused).
    """
    return mean_over_positions(lambda t, s: rows(t, s, temperature), teacher_logits, student_logits) * temperature**2


def reverse_kl_rows(teacher_logits, student_logits, temperature):
    """[rows] KL(softmax(s/T) || softmax(t/T)) in float32: mode-seeking, the on-policy loss."""
    t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    return (s.exp() * (s - t)).sum(-1)


def reverse_kl_generated(teacher_logits: torch.Tensor, student_logits: torch.Tensor, prompt_len: int,
                         temperature: float = 1.0) -> torch.Tensor:
    """Mean of KL(student || teacher) over the positions that predict generated tokens (the
    logits [B, L, V] at prompt_len - 1 .. L - 2 predict tokens prompt_len .. L - 1), times T^2.

    The full-vocabulary form of on-policy distillation's per-token reverse KL (the ZEDA authors'
    stage 2 estimates it from the sampled token's log-ratio): an exact expectation under the
    student instead of a one-sample estimate, so no sampling noise in the gradient.
    """
    end = student_logits.shape[1] - 1
    return mean_over_positions(lambda t, s: reverse_kl_rows(t, s, temperature), teacher_logits[:, prompt_len - 1 : end],
                               student_logits[:, prompt_len - 1 : end]) * temperature**2


def teacher_topk(teacher_logits: torch.Tensor, k: int, temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's k most likely tokens per position and their log-probs (what a cache keeps)."""
    logp = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    values, ids = logp.topk(min(k, logp.shape[-1]), dim=-1)
    return values, ids


def kl_topk(teacher_logp: torch.Tensor, teacher_ids: torch.Tensor, student_logits: torch.Tensor, temperature: float = 1.0,
            rows=kl_topk_rows) -> torch.Tensor:
    """KL from a top-k cached teacher over k + 1 outcomes: its k tokens and "everything else".

    Keeping the teacher's true top-k probabilities plus the rest bucket (instead of
    renormalising over k tokens) never pushes the student's mass onto the k tokens beyond what
    the teacher puts there; it is a lower bound of the full KL and equals it when k = vocabulary.
    `rows`: kl_topk_rows or a compiled one (train.fused).
    """
    return mean_over_positions(lambda t, ids, s: rows(t, ids, s, temperature), teacher_logp, teacher_ids,
                               student_logits) * temperature**2


def zero_fractions(layer_ids: Sequence[torch.Tensor], num_real: int) -> torch.Tensor:
    """[layers] fraction of routed slots that went to zero experts (no gradient)."""
    return torch.stack([(ids >= num_real).float().mean() for ids in layer_ids]).detach()


def balance_loss(
    layer_logits: Sequence[torch.Tensor],
    layer_ids: Sequence[torch.Tensor],
    *,
    num_real: int,
    num_zero: int,
    top_k: int,
    w: float,
    alpha: float,
    layer_zero_fractions: torch.Tensor | None = None,
    scoring: str = "softmax",
) -> torch.Tensor:
    """Sum over MoE layers of the group balancing loss, from each router's logits [T, E+Z]
    (`scoring`: the routing family, which sets the probabilities: routing.balance_scores).

    `layer_zero_fractions` ([layers], optional) replaces each layer's local f_Z, e.g. by its mean
    over data-parallel ranks.
    """
    total = layer_logits[0].new_zeros((), dtype=torch.float32)
    for i, (logits, ids) in enumerate(zip(layer_logits, layer_ids)):
        probs = balance_scores(logits, scoring)
        f_z = None if layer_zero_fractions is None else layer_zero_fractions[i]
        total = total + group_balance_loss(probs, ids, num_real, num_zero, top_k, w, alpha, zero_fraction=f_z)
    return total
