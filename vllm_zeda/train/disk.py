"""What a training run will write, estimated before it starts, and the check that the disk holds it.

The run writes the output once (the source's weights, routers grown by Z rows), and in its work
directory the resumable state (the trained tensors in fp32, plus AdamW's two fp32 moments where it
is the optimizer; while a
new one is written atomically the previous one still exists, so twice that) and, with
--teacher-cache, the teacher's top-k log-probs and ids (4 + 4 bytes each) for every block stage 2
reads. The source is read in place: no converted copy is written.
"""
from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from ..archs import router_layer
from ..errors import ZedaError

STATE_BYTES_PER_PARAM = {"adamw": 3 * 4, "adafactor": 4}  # fp32 tensor (+ AdamW's two moments; Adafactor's
# factored moments are negligible)
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
         cache_entries: int, expert_optimizer: str = "adamw") -> DiskPlan:
    """The bytes a run writes: `sizes` from tensor_sizes; `cache_entries` = positions x top-k the
    teacher cache holds (0 without it)."""
    grow = (num_real + num_zero) / num_real  # a router's rows, E -> E+Z
    routers = {name for name in sizes if router_layer(name) is not None}
    moe_layers = {router_layer(name) for name in routers}
    output = sum(b * (grow if name in routers else 1) for name, (_, b) in sizes.items())
    state = STATE_BYTES_PER_PARAM["adamw"] * sum(n * grow for name, (n, _) in sizes.items() if name in routers)
    if stage2:  # the MoE blocks: experts, shared experts and their gates
        state += STATE_BYTES_PER_PARAM[expert_optimizer] * sum(
            n for name, (n, _) in sizes.items() if name not in routers and moe_layer(name) in moe_layers)
    return DiskPlan(output=int(output), state=int(2 * state),
                    teacher_cache=CACHE_BYTES_PER_ENTRY * cache_entries)


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
