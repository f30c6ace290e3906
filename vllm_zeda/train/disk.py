"""What a training run will write, estimated before it starts, and the check that the disk holds it.

The run writes the output once (the source's weights, routers grown by Z rows), and in its work
directory the resumable state and, with --teacher-cache, the teacher's top-k log-probs and ids
(4 + 4 bytes each) for every block stage 2 reads. The state holds only what has moved from the
source: the routers (fp32, AdamW's two fp32 moments), and once stage 2 has stepped the MoE blocks
(in their master dtype, plus AdamW's moments where it is their optimizer). A new state is written
before the previous one goes, so a stage that saves mid-way holds two at once. The source is read
in place: no converted copy is written.
"""
from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from ..archs import router_layer
from ..errors import ZedaError

MASTER_BYTES = {"float32": 4, "bfloat16": 2}
MOMENT_BYTES = {"adamw": 2 * 4, "adafactor": 0}  # Adafactor's factored moments are negligible
CACHE_BYTES_PER_ENTRY = 4 + 4  # fp32 log-prob + int32 token id
HEADROOM = 1.05
_MOE_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.(?:mlp|block_sparse_moe)\.")


@dataclass(frozen=True)
class DiskPlan:
    output: int  # bytes
    state: int
    teacher_cache: int

    @property
    def work(self) -> int:
        return self.state + self.teacher_cache


def tensor_sizes(src: Path, shards: list[str]) -> dict[str, tuple[int, int]]:
    """name -> (elements, bytes) of every tensor in the checkpoint, from the safetensors headers."""
    from safetensors import safe_open

    sizes = {}
    for shard in shards:
        with safe_open(src / shard, framework="pt") as f:
            for name in f.keys():
                t = f.get_slice(name)
                n = 1
                for d in t.get_shape():
                    n *= d
                sizes[name] = (n, n * _dtype_bytes(t.get_dtype()))
    return sizes


def plan(sizes: dict[str, tuple[int, int]], num_real: int, num_zero: int, *, stage2: bool,
         cache_entries: int, expert_optimizer: str = "adamw", expert_master: str = "float32",
         saves_mid_stage2: bool = True) -> DiskPlan:
    """The bytes a run writes: `sizes` from tensor_sizes; `cache_entries` = positions x top-k the
    teacher cache holds (0 without it); `saves_mid_stage2`: --save-every < --stage2-steps."""
    grow = (num_real + num_zero) / num_real  # a router's rows, E -> E+Z
    routers = {name for name in sizes if router_layer(name) is not None}
    moe_layers = {router_layer(name) for name in routers}
    output = sum(b * (grow if name in routers else 1) for name, (_, b) in sizes.items())
    router_state = (MASTER_BYTES["float32"] + MOMENT_BYTES["adamw"]) * sum(n * grow for name, (n, _) in sizes.items() if name in routers)
    state = 2 * router_state  # stage 1's saves: the new one is written before the old one goes
    if stage2:  # the MoE blocks: experts, shared experts and their gates, in the states from stage 2's first save
        moe = sum(n for name, (n, _) in sizes.items() if name not in routers and moe_layer(name) in moe_layers)
        moved = router_state + (MASTER_BYTES[expert_master] + MOMENT_BYTES[expert_optimizer]) * moe
        state = (2 if saves_mid_stage2 else 1) * moved + router_state
    return DiskPlan(output=int(output), state=int(state), teacher_cache=CACHE_BYTES_PER_ENTRY * cache_entries)


def moe_layer(name: str) -> int | None:
    m = _MOE_LAYER.search(name)
    return int(m.group(1)) if m else None


def check_free_space(disk_plan: DiskPlan, output: Path, work: Path, resuming: bool) -> None:
    """Refuse, in one line, a run whose writes do not fit the free space of their disks (the
    output's and the work dir's, counted together where they share one). A resumed run has
    written part of its work dir already: that part is not counted again."""
    needs: dict[int, list] = {}
    for where, size, what in ((output.parent, disk_plan.output, "the output"),
                              (work if work.exists() else work.parent, disk_plan.work, "checkpoints and teacher cache")):
        if resuming and what != "the output":
            size = max(0, size - dir_bytes(work))
        key = os.stat(where).st_dev
        entry = needs.setdefault(key, [where, 0, []])
        entry[1] += size
        entry[2].append(f"{what} {size / 2**30:.1f} GB")
    for where, size, parts in needs.values():
        free = shutil.disk_usage(where).free
        if size * HEADROOM > free:
            raise ZedaError(f"not enough disk space: the run writes about {size / 2**30:.1f} GB to {where}'s disk "
                            f"({', '.join(parts)}) but {free / 2**30:.1f} GB are free; free space, or pass --work-dir "
                            "on another disk")


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.exists() else 0


def _dtype_bytes(dtype: str) -> int:
    return {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2, "U16": 2,
            "F8_E4M3": 1, "F8_E5M2": 1, "I8": 1, "U8": 1, "BOOL": 1}.get(dtype, 4)
