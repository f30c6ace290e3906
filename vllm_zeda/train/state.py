"""The trainer's resumable state in its work directory: the trained tensors, the optimizer, the
RNG states and where the run stands, written atomically so a kill leaves the previous one."""
from __future__ import annotations

import errno
import os
import random
import shutil
from pathlib import Path

import torch

from ..errors import ZedaError

CKPT = "trainer_state.pt"

# Flags that must not change across --resume (they decide the data order and the math).
RUN_KEYS = ("model", "data", "num_zero_experts", "target_zero_fraction", "stage1_steps", "stage2_steps", "seq_len",
            "batch_size", "grad_accum", "lr", "expert_lr", "balance_alpha", "temperature", "teacher_cache",
            "teacher_topk", "seed", "heldout_fraction", "max_heldout_blocks", "grad_clip", "dtype",
            "expert_optimizer", "expert_master", "optimizer_in_backward")


def run_config(args, world_size: int) -> dict:
    return {k: getattr(args, k) for k in RUN_KEYS} | {"world_size": world_size}


def load_for_resume(work: Path, config: dict) -> dict | None:
    """The state an interrupted run left in `work`, or None if it saved none yet; refuses a
    resume whose flags differ from that run's."""
    path = work / CKPT
    if not path.is_file():
        return None
    state = torch.load(path, weights_only=False)
    diff = [k for k in config if state["run_config"].get(k) != config[k]]
    if diff:
        raise ZedaError(f"--resume: {diff[0]} differs from the interrupted run ({state['run_config'].get(diff[0])!r} vs {config[diff[0]]!r})")
    return state


def save_state(path: Path, state: dict) -> None:
    """Write atomically: a kill or a full disk mid-write leaves the previous file intact (a full
    disk is raised as OSError ENOSPC, whichever way torch.save reported it)."""
    tmp = path.with_suffix(".tmp")
    try:
        torch.save(state, tmp)
    except (OSError, RuntimeError) as exc:  # torch.save reports a failed write as a RuntimeError
        tmp.unlink(missing_ok=True)
        if not is_disk_full(exc, path.parent):
            raise
        raise OSError(errno.ENOSPC, "No space left on device", str(path)) from None
    os.replace(tmp, path)


def is_disk_full(exc: BaseException, where: Path) -> bool:
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return isinstance(exc, RuntimeError) and "write" in str(exc) and free_gb(where) < 1.0


def free_gb(where: Path) -> float:
    try:
        return shutil.disk_usage(where).free / 2**30
    except OSError:
        return float("nan")


def rng_state() -> dict:
    import numpy as np

    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    import numpy as np

    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
