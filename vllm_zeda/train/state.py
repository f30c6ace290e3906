"""The trainer's resumable state in its work directory: the trained tensors, the optimizer, the
RNG states and where the run stands, written atomically so a kill leaves the previous one."""
from __future__ import annotations

import os
import random
from pathlib import Path

import torch

from ..errors import ZedaError

CKPT = "trainer_state.pt"

# Flags that must not change across --resume (they decide the data order and the math).
RUN_KEYS = ("model", "data", "num_zero_experts", "target_zero_fraction", "stage1_steps", "stage2_steps", "seq_len",
            "batch_size", "grad_accum", "lr", "expert_lr", "balance_alpha", "temperature", "teacher_cache",
            "teacher_topk", "seed", "heldout_fraction", "max_heldout_blocks", "grad_clip", "dtype")


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
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)  # a kill mid-write leaves the previous checkpoint intact


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
