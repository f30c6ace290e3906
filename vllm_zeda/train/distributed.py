"""torchrun's environment for the trainer: ranks, the device, the few collectives it uses, and
FSDP2 (torch.distributed.fsdp.fully_shard) sharding of the model over the processes."""
from __future__ import annotations

import gc
import os

import torch
import torch.distributed as torch_dist


class Dist:
    """torchrun's environment, or a single process."""

    def __init__(self, device_flag: str):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", "0"))
        use_cuda = device_flag == "cuda" or (device_flag == "auto" and torch.cuda.is_available())
        self.device = torch.device(f"cuda:{local}" if use_cuda else "cpu")
        if use_cuda:
            torch.cuda.set_device(self.device)
        if self.world > 1 and not torch_dist.is_initialized():
            torch_dist.init_process_group("nccl" if use_cuda else "gloo")

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def sharded(self) -> bool:
        """Whether the model is sharded with FSDP2 (under torchrun)."""
        return self.world > 1

    def barrier(self) -> None:
        if self.world > 1:
            torch_dist.barrier()

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            torch_dist.all_reduce(t)
        return t

    def share(self, items: torch.Tensor, batch_size: int):
        """This process's share of `items` (every world-th from its rank) in batches, as
        (batch, real): every process yields the same number of batches, those past its share
        repeating its first one with real=False, so sharded forwards stay in step."""
        mine = items[self.rank :: self.world]
        batches = list(mine.split(batch_size))
        rounds = -(-((items.numel() + self.world - 1) // self.world) // batch_size)  # the largest share's batches
        for i in range(rounds):
            yield (batches[i], True) if i < len(batches) else (items[:1], False)

    def shard(self, model: torch.nn.Module, compute_dtype: torch.dtype | None) -> None:
        """FSDP2 over all processes: each decoder layer is one group, the rest (embeddings, final
        norm, head) the root's; parameters, gradients and optimizer state are sharded, moved to
        this process's device. `compute_dtype`: what the gathered weights are cast to (bf16 runs:
        frozen bf16 and trained fp32 weights in one group), gradients reduced in fp32."""
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mesh = init_device_mesh(self.device.type, (self.world,))
        policy = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32 if compute_dtype else None)
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh, mp_policy=policy)
        fully_shard(model, mesh=mesh, mp_policy=policy)

    def fill_from_rank0(self, model: torch.nn.Module, source: torch.nn.Module | None) -> None:
        """After shard() of a meta-device model: memory for this process's shards, then rank 0's
        `source` (the only full copy, in its host memory; None elsewhere) scattered into them by
        torch.distributed.checkpoint's state-dict API, and the buffers no state dict holds (rotary
        frequencies) broadcast from it."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        model.to_empty(device=self.device)
        state = source.state_dict() if source is not None else {}
        set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
        names = sorted(n for n, _ in model.named_buffers())
        saved = set(self.broadcast_object(sorted(state)))
        for name in names:
            if name not in saved:
                buf = model.get_buffer(name)
                if self.main:
                    buf.copy_(source.get_buffer(name))
                torch_dist.broadcast(buf, src=0)

    def broadcast_object(self, obj):
        """Rank 0's `obj` on every process."""
        box = [obj]
        torch_dist.broadcast_object_list(box, src=0)
        return box[0]

    def reshard(self, model: torch.nn.Module) -> None:
        """Put every FSDP2 group back in its sharded state (the root stays gathered after a
        forward), so named_parameters() are the sharded tensors again."""
        if self.sharded:
            for m in model.modules():
                if hasattr(m, "reshard"):
                    m.reshard()

    def close(self) -> None:
        """Destroy the process group while the interpreter is whole: first the garbage the
        sharded model leaves (FSDP2's modules hold the group), so the group's last reference
        goes here and its worker threads are joined now, not during interpreter shutdown."""
        if self.world > 1 and torch_dist.is_initialized():
            gc.collect()
            torch_dist.destroy_process_group()


def local(t: torch.Tensor) -> torch.Tensor:
    """This process's shard of a sharded (DTensor) parameter; a plain tensor as it is."""
    return t.to_local() if hasattr(t, "to_local") else t
