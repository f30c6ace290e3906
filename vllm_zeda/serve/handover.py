"""What the router hands the routed experts beyond (weights, ids): one typed value, one writer,
one reader.

On a GPU the routing kernel also writes the "live" ids (zero slots -1) and, for small batches,
how the fused MoE's blocks should run so zero slots' blocks do no work (kernels.ops.route_handover).
vLLM's MoE runner calls the router, then the routed experts, in the same thread, with no channel
between them but the (weights, ids) tensors; so:

- the router `publish`es a Handover for the ids tensor it returns (per thread: vLLM's dual-batch
  overlap runs micro-batches in threads, each with its own router -> experts sequence);
- the experts' `apply` `take`s it once, which clears the slot whether or not it matches;
- it matches only the very tensor it was made for (`is`): a chunk or a copy of the ids (vLLM
  chunking a large batch, expert parallelism's remapping) gets None, and the experts gather the
  live ids through the expert map instead.
The router publishes only where the live ids are valid local expert ids: not under expert
parallelism (ZedaRoutedExperts tells it), whose ids also need the global -> local map.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass

import torch


@dataclass(frozen=True, slots=True)
class Handover:
    topk_ids: torch.Tensor  # the ids the router returned: the key
    live: torch.Tensor  # [M, K] int32: local expert ids, -1 for a slot no expert here computes
    # Small batches in the sort-free assignment (kernels.ops.route_handover), else None:
    live_end: torch.Tensor | None = None  # [1] int32: SLOT_BLOCK_M x live slots (live blocks first)
    slot_blocks: torch.Tensor | None = None  # [M*K*SLOT_BLOCK_M] int32 sorted_token_ids, a block per slot
    block_experts: torch.Tensor | None = None  # [M*K] int32: each block's expert, live blocks first


_SLOT = threading.local()


def publish(handover: Handover) -> None:
    """The router's write, for the experts of the same forward in this thread."""
    _SLOT.value = handover


def take(topk_ids: torch.Tensor) -> Handover | None:
    """The experts' read: the hand-over made for exactly `topk_ids`, else None; either way the
    slot is empty afterwards."""
    handover = getattr(_SLOT, "value", None)
    _SLOT.value = None
    return handover if handover is not None and handover.topk_ids is topk_ids else None
