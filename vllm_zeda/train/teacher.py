"""What each stage distils from: a function (input ids, batch key) -> the teacher's logits, or
its cached top-k (log-probs, ids).

Stage 1 trains only routers, so the teacher is the student's own network in masked mode with
the original router rows (no second copy). Stage 2 also trains experts: a frozen bf16/fp32 copy
of the converted model, or (`--teacher-cache`) the top-k log-probs of every block it will
see, computed once before the stage by the still-original network and kept on disk.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from .data import to_device
from .losses import kl_rows, kl_teacher_student, kl_topk, kl_topk_rows, teacher_topk
from .state import save_state

CACHE = "teacher_cache.pt"


@contextlib.contextmanager
def original_model(model, original_rows: list[torch.Tensor]):
    """The model as it was before conversion: masked mode with the original router rows.

    Stage 1 trains the real rows too, so masked mode alone would drift from the original; the
    saved rows are tiny ([E, H] per layer), the rest of the network is unchanged in stage 1.
    """
    routers = model.zeda_routers
    model.zeda_set_mode(masked=True)
    for r, rows in zip(routers, original_rows):
        r.masked_rows = rows[: r.num_real]
    try:
        yield model
    finally:
        for r in routers:
            r.masked_rows = None
        model.zeda_set_mode(masked=False)


def distill_kl(teacher, student_logits, temperature, fused=None):
    """KL(teacher || student) from full teacher logits or a cached (top-k log-probs, ids) pair;
    `fused`: train.fused.Fused, whose compiled rows replace the eager ones."""
    if isinstance(teacher, tuple):
        return kl_topk(teacher[0], teacher[1], student_logits, temperature, rows=fused.kl_topk_rows if fused else kl_topk_rows)
    return kl_teacher_student(teacher, student_logits, temperature, rows=fused.kl_rows if fused else kl_rows)


def masked_teacher(model, original_rows):
    """Stage 1's teacher: the student's network as the original model, under no_grad."""

    def teacher(x, key):
        with torch.no_grad(), original_model(model, original_rows):
            return model(input_ids=x, use_cache=False).logits

    return teacher


def frozen_copy_teacher(copy: torch.nn.Module):
    """Stage 2's teacher without a cache: `copy`, a second load of the converted model, masked."""
    copy.eval()
    copy.zeda_set_mode(masked=True)
    copy.requires_grad_(False)

    def teacher(x, key):
        with torch.no_grad():
            return copy(input_ids=x, use_cache=False).logits

    return teacher, copy


def cached_teacher(path: Path, world: int, num_train_blocks: int):
    """Stage 2's teacher from the cache: a batch key ("train" | "heldout", block ids) -> rows."""
    row, cache_lp, cache_ids = load_teacher_cache(path, world)

    def teacher(x, key):
        ks = key[1] + num_train_blocks if key[0] == "heldout" else key[1]
        rows = torch.tensor([row[int(k)] for k in ks])
        return to_device(cache_lp[rows], x.device), to_device(cache_ids[rows], x.device)

    return teacher


def cache_complete(path: Path, world: int) -> bool:
    return all(part(path, r).is_file() for r in range(world))


def part(path: Path, rank: int) -> Path:
    return path.with_name(f"{path.name}.rank{rank}")


def build_teacher_cache(path: Path, model, original_rows, blocks, keys: torch.Tensor, k: int, args, dist, autocast) -> None:
    """Each rank writes the top-k log-probs of its share of `keys` (block ids) to its own file."""
    mine, logps, ids = [], [], []
    model.eval()
    with torch.no_grad(), original_model(model, original_rows):
        for chunk, real in dist.share(keys, args.batch_size):
            with autocast():
                logits = model(input_ids=blocks(chunk).to(dist.device), use_cache=False).logits
            lp, ix = teacher_topk(logits, k, args.temperature)
            keep = chunk.numel() if real else 0  # a batch past this process's share: kept for the shapes only
            mine.append(chunk[:keep])
            logps.append(lp[:keep].cpu())
            ids.append(ix[:keep].to(torch.int32).cpu())
    save_state(part(path, dist.rank), {"keys": torch.cat(mine), "logp": torch.cat(logps), "ids": torch.cat(ids)})


def load_teacher_cache(path: Path, world: int) -> tuple[dict[int, int], torch.Tensor, torch.Tensor]:
    parts = [torch.load(part(path, r), mmap=True) for r in range(world)]
    keys = torch.cat([p["keys"] for p in parts])
    row = {int(k): i for i, k in enumerate(keys)}
    return row, torch.cat([p["logp"] for p in parts]), torch.cat([p["ids"] for p in parts])
