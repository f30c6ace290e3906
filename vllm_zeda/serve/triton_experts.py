"""vLLM's Triton experts, changed so that zero slots cost no expert GEMM work at any batch size.

Zero slots reach the experts with ids E..E+Z-1 and an expert map that sends them to -1. Stock
`TritonExperts.apply` then still pays for them in three places; this subclass removes each:

1. Alignment. 0.26 counts mapped-out slots into `moe_align_block_size` (`ignore_invalid_experts`
   False), so Z experts' worth of blocks launch, write zero rows to both GEMM outputs, and are
   summed. Here mapped-out slots are dropped before alignment (as 0.32+ does for an expert map).
   For tiny batches (M*K*4 <= E+Z) upstream uses a sort-free "naive" assignment, but only without
   an expert map; here it is kept, with the live ids as block experts, so a decode step of one
   token runs exactly the live slots' blocks plus early-exiting blocks for the zero ones. A zero
   slot's block would still write a row of zeros into the gated activation's input (vLLM's
   silu_and_mul took 3.0 instead of 2.1 µs over 8 rows once any row was zeros on the H200; its
   SiLU is an IEEE division, whose slow path a zero dividend is thought to take). So the router hands over how to stop them: up to
   kernels.ops.LIVE_END_MAX_TOKENS tokens the live slots' blocks first and where they end
   (`num_tokens_post_padded`: the zero slots' blocks return at the kernel's first check;
   benchmarks/RESULTS.md §7 item 8: batch-1 decode's share of the ideal's gain 69% -> 89%), for a single token by routing its live slots first, for
   2-4 by writing the blocks' sorted_token_ids and experts in that order; at 5-6 tokens the
   blocks' sorted_token_ids with only padding rows in a zero slot's block (every store of its
   expert -1 branch masked). From LIVE_ALIGN_MIN_SLOTS slots (inside CUDA graphs) the live slots
   are aligned by `kernels.align.align_live_slots` across the whole GPU instead of by vLLM's
   one-thread-block kernel, which reads every slot id, zero ones too (H200, 16,384 tokens at skip
   0.5: 28 instead of 70 µs, the ideal top-4's own alignment 36); past the sort-free sizes up to
   align.SMALL_SLOTS slots (inside CUDA graphs) by one program, `align_live_slots_small`, where vLLM
   takes two launches and the ideal's smaller top-K is still sort-free (8 tokens at top-8).
2. Activation. The gated SiLU ran over all M*K rows; here only over live rows
   (`kernels.ops.live_silu_and_mul_`) once there are enough rows for that to pay
   (`live_activation_pays`); below, vLLM's CUDA kernel runs over every row, dead ones too (their
   garbage is never read: neither the second GEMM nor the live-slot sum touches a dead row).
   Where the second GEMM's input gets one dynamic FP8/int8 scale over all rows (per-tensor
   activations), dead rows would enter that scale (`one_scale_over_every_row`). For FP8 the
   activation takes the live rows' amax as it goes and upstream's quantisation of its output
   (`moe_kernel_quantize_input`, rebound: `live_quantize_input`) runs over live rows only
   from it (`kernels.ops.live_quant_per_tensor`: vLLM's scale and roundings); for int8 the
   activation writes dead rows as zeros for vLLM's op. Block-FP8 experts (128 x 128, Qwen's FP8 releases) skip
   `activation` altogether: upstream's `apply` (0.26+) calls vLLM's fused SiLU + per-group FP8
   quantisation (`ops.silu_and_mul_per_block_quant`, a thread block per row and group, dead rows
   too) instead; here that op runs over live rows only (`kernels.ops.live_silu_and_mul_group_quant`,
   vLLM's formula with its roundings; tests/test_gpu_kernels.py compares the two bit for bit on a
   GPU) once there are enough rows for that to pay (`live_group_quant_pays`).
3. Sum over slots: only live rows are read: `kernels.ops.live_moe_sum_` inside CUDA graphs, vLLM's
   map-aware CUDA `moe_sum` in eager forwards, where host launch time counts (`live_sum_pays`).
4. Tile configs: vllm_zeda's own tables, tuned at the ZEDA operating point, come before vLLM's
   defaults (`kernels.tiles.zeda_moe_config`; 0.26 has no H100 table for Qwen3-30B-A3B's shape).
   Where the assignment is sort-free the tile runs with GROUP_SIZE_M 1, whichever table or
   override chose it (`slot_block_config`).
1-3 read "live ids" ([M, K], -1 where the map says -1; vLLM's eager sum reads the ids and the
map instead). The router's kernel writes them while routing (handover.py); only
with expert parallelism, or when vLLM hands the experts a copy or chunk of the ids, are they
gathered through the map (one small kernel).

1, 2's FP8 quantisations and 4 are applied by running upstream's own `apply` with its module-level
`_prepare_expert_assignment`, `try_get_optimal_moe_config`, `ops` and `moe_kernel_quantize_input`
rebound (compat.rebind_globals, one copy per experts object; the last two only where this vLLM
calls them so), so the rest of upstream's logic, LoRA and quantised paths included,
stays upstream's. What this class does not cover (LoRA, other activations) takes the stock path;
a vLLM without those hooks never selects it (experts._use_live_slot_triton_experts logs why).
"""
from __future__ import annotations

import threading

import torch
from vllm import _custom_ops as ops
from vllm.model_executor.layers.fused_moe.activation import MoEActivation
from vllm.model_executor.layers.fused_moe.experts import triton_moe
from vllm.model_executor.layers.fused_moe.experts.triton_moe import TritonExperts

from ..kernels.align import SMALL_SLOTS, align_live_slots, align_live_slots_small
from ..kernels.ops import (SLOT_BLOCK_M, live_moe_sum_, live_quant_per_tensor, live_silu_and_mul_,
                           live_silu_and_mul_group_quant, sort_free)
from ..kernels.tiles import zeda_moe_config
from . import compat, handover
from .handover import Handover

_UPSTREAM_ASSIGN = getattr(triton_moe, "_prepare_expert_assignment", None)  # checked before use: compat.missing_triton_experts_hooks


def assign_live_slots(slots: Handover | None, topk_ids, config, num_tokens, top_k_num, global_num_experts, expert_map,
                      **kwargs):
    """`_prepare_expert_assignment` that never gives a mapped-out (zero) slot a block. `slots`:
    the apply() in progress's hand-over for exactly `topk_ids` (the router's, or live ids
    gathered through the map), else None."""
    if expert_map is None:
        return _UPSTREAM_ASSIGN(topk_ids, config, num_tokens, top_k_num, global_num_experts, expert_map, **kwargs)
    if sort_free(num_tokens, top_k_num, global_num_experts) and not _grouped_int_weights(kwargs):
        # one block per slot, in slot order, a zero slot's with expert -1 (no GEMM; its rows are
        # never read)
        expert_ids = (slots.live if slots is not None else _gather_live_ids(topk_ids, expert_map)).reshape(-1)
        blocks = None
        if slots is not None and config["BLOCK_SIZE_M"] == SLOT_BLOCK_M:  # the router's way to stop zero slots' blocks
            end, blocks = slots.live_end, slots.slot_blocks
            if end is not None:  # live slots' blocks first, zero slots' past the end
                return (None, expert_ids, end) if blocks is None else (blocks, slots.block_experts, end)
            # 5-6 tokens: zero slots' blocks only padding
        # else (no hand-over, another block size) every zero slot's block writes a row of zeros
        return blocks, expert_ids, slot_blocks_end(topk_ids.numel() * config["BLOCK_SIZE_M"], topk_ids.device)
    if slots is not None and not _grouped_int_weights(kwargs):
        n, device = slots.live.numel(), slots.live.device
        if small_align_pays(n, device):
            return align_live_slots_small(slots.live, config["BLOCK_SIZE_M"], global_num_experts)
        if live_align_pays(n, device):
            return align_live_slots(slots.live, config["BLOCK_SIZE_M"], global_num_experts)
    kwargs["ignore_invalid_experts"] = True
    return _UPSTREAM_ASSIGN(topk_ids, config, num_tokens, top_k_num, global_num_experts, expert_map, **kwargs)


# The fused-MoE kernel reads `num_tokens_post_padded` only to let blocks past it exit at once
# (`pid_m * BLOCK_SIZE_M >= num_tokens_post_padded`, fused_moe.py in 0.26 and 0.32); with the
# sort-free assignment its value is fixed by the batch size alone. Upstream makes it per call
# (`torch.full`: a fill kernel per MoE layer and step, about 1 µs each on an H100, RESULTS.md §7
# item 4); here one tensor per value lives on.
_SLOT_BLOCKS_END: dict[tuple[torch.device, int], torch.Tensor] = {}


def slot_blocks_end(value: int, device: torch.device) -> torch.Tensor:
    """A [1] int32 tensor holding `value`, made once per (device, value). A tensor made while a
    CUDA graph is being captured belongs to that graph's memory pool: it is used, not kept."""
    end = _SLOT_BLOCKS_END.get((device, value))
    if end is None:
        end = torch.full((1,), value, dtype=torch.int32, device=device)
        if not _capturing(device):
            _SLOT_BLOCKS_END[(device, value)] = end
    return end


# Slots from which kernels.align.align_live_slots (two launches over the whole GPU) replaces vLLM's
# moe_align_block_size (one thread block reading every slot id, zero slots too): H200,
# Qwen3-30B-A3B, 16,384 tokens at skip 0.5, 27.9 instead of 70.0 µs (RESULTS.md §7 item 14); at
# 1,024 tokens vLLM's was the faster (10.0 against 11.5 µs). Outside CUDA graphs each Triton launch also costs ~12 µs more host time than
# vLLM's op (RESULTS.md §5.3), so there only from the size where the plugin's largest graph ends
# (cuda_graphs.LARGEST tokens at top-8): such steps are GPU-bound.
LIVE_ALIGN_MIN_SLOTS = 16384
LIVE_ALIGN_MIN_SLOTS_EAGER = 131072


def small_align_pays(slots: int, device: torch.device) -> bool:
    """Whether up to align.SMALL_SLOTS live slots (past the sort-free sizes) are aligned in one
    program (align_live_slots_small) rather than by vLLM's two launches: inside CUDA graphs, where
    only device time counts."""
    return slots <= SMALL_SLOTS and _capturing(device)


def live_align_pays(slots: int, device: torch.device) -> bool:
    """Whether the live slots are aligned by gpu_align (else by vLLM's moe_align_block_size)."""
    return slots >= (LIVE_ALIGN_MIN_SLOTS if _capturing(device) else LIVE_ALIGN_MIN_SLOTS_EAGER)


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _gather_live_ids(topk_ids: torch.Tensor, expert_map: torch.Tensor) -> torch.Tensor:
    """[M, K] int32 local expert ids, -1 for slots not computed here, through the map: where the
    router handed none over for these ids (expert parallelism, a chunk or copy of its ids)."""
    return expert_map[topk_ids.long()].to(torch.int32)


# Slot rows from which the live-slot SiLU beats vLLM's silu_and_mul over every row. H100,
# Qwen3-30B-A3B's 2 x 768 columns, a third of the slots dead: on the device vLLM's kernel was
# 0.6-0.8 µs faster up to 2,048 rows
# (launch-bound), level at 8,192, 30% slower at 32,768 (it moves the dead rows too). Batches this
# large run outside CUDA graphs, where a Triton launch also costs ~12 µs more host time than
# vLLM's op (H200, benchmarks/RESULTS.md §5.3) and steps of 1-2k tokens are host-bound while
# serving: so not before 16,384 rows.
LIVE_SILU_MIN_ROWS = 16384


def live_activation_pays(rows: int) -> bool:
    """Whether the gated SiLU should run over live slot rows only (else over every row)."""
    return rows >= LIVE_SILU_MIN_ROWS


# Slot rows from which block-FP8 experts' fused SiLU + quantisation runs over live rows only
# inside CUDA graphs (device time alone counts there); outside them, as the bf16 SiLU, from
# LIVE_SILU_MIN_ROWS (host launch time). On an H100 ours over every row already beats vLLM's op
# from 2,048 rows (256 tokens at top-8: 249.5 vs 263.4 µs a layer at skip 0; 16,384 tokens: 234 vs
# 623 µs for the op alone, RESULTS.md §2.5); fewer rows were not timed.
LIVE_GROUP_QUANT_MIN_ROWS = 2048


def live_group_quant_pays(rows: int, device: torch.device) -> bool:
    """Whether block-FP8 experts' fused SiLU + per-group quantisation should run over live slot
    rows only (else vLLM's op over every row)."""
    return rows >= (LIVE_GROUP_QUANT_MIN_ROWS if _capturing(device) else LIVE_SILU_MIN_ROWS)


def live_sum_pays(device: torch.device) -> bool:
    """Whether the sum over slots should be our Triton kernel (else vLLM's CUDA `moe_sum` given
    the ids and the map, which reads no mapped-out slot either). Inside a CUDA graph only device
    time counts, and ours is the faster there (H200: 2.1 vs 4.2 µs at 1 token, 4.4 vs 6.2 at
    1,024). Eager forwards (steps above the largest graph: mixed prefill + decode steps while
    serving) pay every launch on the host, each step: 20-32 µs for the Triton launch against 8-13
    µs for vLLM's op (benchmarks/RESULTS.md §5.3), and such steps are host-bound."""
    return _capturing(device)


def one_scale_over_every_row(quant_dtype, block_shape, per_act_token_quant: bool, a2_scale) -> bool:
    """Whether the second GEMM's input is quantised with one scale computed over all its rows
    (dynamic per-tensor activations: `--quantization fp8` online). Its dead slot rows were never
    written by the first GEMM, so they hold whatever the workspace held and would enter that scale
    (too coarse a scale for the live rows, or inf): the activation then either takes the live
    rows' amax for a live-row quantisation (FP8) or writes dead rows as zeros (int8). Block and
    per-token scales read a row's own values only; a static a2 scale reads none."""
    return quant_dtype is not None and block_shape is None and not per_act_token_quant and a2_scale is None


def _grouped_int_weights(kwargs) -> bool:
    """Upstream's condition for refusing the naive assignment (group-quantised int weights)."""
    block_shape = kwargs.get("block_shape")
    return bool((kwargs.get("use_int8_w8a16") or kwargs.get("use_int4_w4a16")) and block_shape and block_shape[1] > 0)


def slot_block_config(*args, **kwargs) -> dict:
    """`zeda_moe_config` for calls with the sort-free assignment: the same tile, GROUP_SIZE_M 1.

    vLLM's fused_moe_kernel walks its programs GROUP_SIZE_M M-blocks at a time, pid_m changing
    fastest (pid_m = first_pid_m + (pid % num_pid_in_group) % group_size_m, 0.26). With a block per
    slot and the live slots' blocks first, a group therefore interleaves live programs with the
    zero slots' early-exiting ones in launch order; with 1 the live programs are launched first.
    (Why the interleaving costs, e.g. live programs packed onto fewer SMs, is inferred; the times
    below are measured.) A block per slot means a different expert per block, so grouping buys no
    weight reuse here. H200, bf16, ours / the ideal, grouped (the tables' 16) against 1
    (benchmarks/RESULTS.md §7 item 17): GLM-4.7-Flash 1 token at skip 0.5 1.020 against 0.914;
    Qwen3-30B-A3B 4 tokens at skip 0.75 1.062 against 1.017. vLLM's own tables hold such tiles (its H100 GLM-4.7-Flash table up to 4 tokens,
    its H200 Qwen3-30B-A3B one at 4), so the rule is applied here, not only in our tables."""
    config = zeda_moe_config(*args, **kwargs)
    return config if config.get("GROUP_SIZE_M", 1) == 1 else dict(config, GROUP_SIZE_M=1)


class LiveSlotOps:
    """vLLM's `_custom_ops` as ZedaTritonExperts' `apply` sees them: every op upstream's, save the
    fused SiLU + per-group quantisation of block-FP8 experts, which runs over the live slot rows of
    the `apply` in progress where that pays (else, and for what it does not cover, vLLM's own)."""

    def __init__(self, experts: "ZedaTritonExperts"):
        self._experts = experts

    def __getattr__(self, name):  # any other op: upstream's, looked up once
        if name.startswith("_"):  # this object's own (copy/pickle protocols, _experts before __init__)
            raise AttributeError(name)
        value = getattr(ops, name)
        setattr(self, name, value)
        return value

    def silu_and_mul_per_block_quant(self, input, group_size, quant_dtype, scale_ub=None, is_scale_transposed=False):
        slots = self._experts._slots
        if (slots is None or scale_ub is not None or is_scale_transposed or quant_dtype != torch.float8_e4m3fn
                or not live_group_quant_pays(input.shape[0], input.device)):
            return ops.silu_and_mul_per_block_quant(input, group_size=group_size, quant_dtype=quant_dtype,
                                                    scale_ub=scale_ub, is_scale_transposed=is_scale_transposed)
        return live_silu_and_mul_group_quant(input, slots.live, group_size, quant_dtype)


def live_quantize_input(experts: "ZedaTritonExperts"):
    """vLLM's `moe_kernel_quantize_input` as ZedaTritonExperts' `apply` sees it: for the second
    GEMM's input under dynamic per-tensor FP8 (`--quantization fp8`), whose amax the live-slot
    activation of the same apply has just taken over live rows, the live rows alone are quantised
    (live_quant_per_tensor); every other call is upstream's."""
    upstream = triton_moe.moe_kernel_quantize_input

    def quantize(A, A_scale, quant_dtype, per_act_token_quant, block_shape=None, **kwargs):
        dynamic_per_tensor = (A_scale is None and quant_dtype == torch.float8_e4m3fn and not per_act_token_quant
                              and block_shape is None and not kwargs.get("quantization_emulation"))
        pending = experts._pending_amax(A) if dynamic_per_tensor else None
        if pending is None:
            return upstream(A, A_scale, quant_dtype, per_act_token_quant, block_shape, **kwargs)
        return live_quant_per_tensor(A, experts._slots.live, pending, quant_dtype)

    return quantize


def _upstream_apply(assign, config, live_ops: LiveSlotOps | None, quantize=None) -> object:
    """TritonExperts.apply with the given assignment and config functions in place of its
    module's `_prepare_expert_assignment` and `try_get_optimal_moe_config`, and `live_ops` in place
    of its `ops` and `quantize` of its `moe_kernel_quantize_input` where given."""
    extra = {} if live_ops is None else {"ops": live_ops}
    if quantize is not None:
        extra["moe_kernel_quantize_input"] = quantize
    return compat.rebind_globals(TritonExperts.apply, _prepare_expert_assignment=assign,
                                 try_get_optimal_moe_config=config, **extra)


class ZedaTritonExperts(TritonExperts):
    """TritonExperts for layers with zero experts; selected by experts.ZedaRoutedExperts where
    this vLLM has every hook it needs (compat.missing_triton_experts_hooks)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._state = threading.local()  # one experts object serves every micro-batch thread
        assign = self._assign
        live_ops = LiveSlotOps(self) if compat.fused_block_quant_in_triton_experts() else None
        self._live_quant = compat.quantize_input_in_triton_experts()
        quantize = live_quantize_input(self) if self._live_quant else None
        self._live_apply = _upstream_apply(assign, zeda_moe_config, live_ops, quantize)
        self._slot_apply = _upstream_apply(assign, slot_block_config, live_ops, quantize)  # sort-free calls

    @property
    def _slots(self) -> Handover | None:
        """The hand-over of this thread's apply() in progress, else None."""
        return getattr(self._state, "slots", None)

    def _assign(self, topk_ids, *args, **kwargs):
        return assign_live_slots(self._slots, topk_ids, *args, **kwargs)

    def apply(self, output, hidden_states, w1, w2, topk_weights, topk_ids, activation, global_num_experts,
              expert_map, *args, **kwargs):
        slots = handover.take(topk_ids)  # the router's, made for these very ids; the slot is cleared
        if expert_map is None or getattr(self, "_lora_context", None) is not None:
            return super().apply(output, hidden_states, w1, w2, topk_weights, topk_ids, activation,
                                 global_num_experts, expert_map, *args, **kwargs)
        if slots is None:
            slots = Handover(topk_ids, _gather_live_ids(topk_ids, expert_map))
        self._state.slots = slots
        self._state.map = expert_map  # upstream calls moe_sum without ids or map
        try:
            upstream = self._slot_apply if sort_free(*topk_ids.shape, global_num_experts) else self._live_apply
            return upstream(self, output, hidden_states, w1, w2, topk_weights, topk_ids, activation,
                            global_num_experts, expert_map, *args, **kwargs)
        finally:
            self._state.slots = self._state.map = self._state.amax = None

    def _pending_amax(self, a: torch.Tensor) -> torch.Tensor | None:
        """The live rows' amax that this apply's activation took for `a` (its output), once."""
        pending = getattr(self._state, "amax", None)
        if pending is None or pending[0] is not a:
            return None
        self._state.amax = None
        return pending[1]

    def activation(self, activation, output, input, **kwargs) -> None:
        slots = self._slots
        one_scale = slots is not None and self._dead_rows_enter_a_scale()
        if (slots is not None and activation == MoEActivation.SILU and (one_scale or live_activation_pays(output.shape[0]))
                and self.quant_config.gemm1_clamp_limit is None and output.dtype == input.dtype):
            if one_scale and self._live_quant and self.quant_dtype == torch.float8_e4m3fn:
                amax = torch.zeros(1, dtype=torch.float32, device=output.device)  # the live rows' own, no zero rows
                live_silu_and_mul_(output, input, slots.live, amax=amax)
                self._state.amax = (output, amax)
                return
            live_silu_and_mul_(output, input, slots.live, zero_dead=one_scale)
            return
        super().activation(activation, output, input, **kwargs)
        if one_scale:
            output.masked_fill_(slots.live.reshape(-1, 1) < 0, 0)

    def _dead_rows_enter_a_scale(self) -> bool:
        """one_scale_over_every_row for this object's quantisation, fixed once it runs: worked
        out on the first activation, not in every layer's every forward."""
        known = getattr(self, "_zero_dead", None)
        if known is None:
            known = self._zero_dead = one_scale_over_every_row(self.quant_dtype, self.block_shape,
                                                               self.per_act_token_quant, self.a2_scale)
        return known

    def moe_sum(self, input, output, topk_ids=None, expert_map=None) -> None:
        slots = self._slots
        if slots is not None:  # our apply() in progress: its ids and map (both sums skip -1 slots)
            if live_sum_pays(output.device):
                live_moe_sum_(output, input, slots.live)
                return
            topk_ids, expert_map = slots.topk_ids, self._state.map
        if expert_map is not None:
            ops.moe_sum(input, output, topk_ids, expert_map)
        else:
            super().moe_sum(input, output)
