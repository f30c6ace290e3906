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
            "expert_optimizer", "expert_master", "optimizer_in_backward", "on_policy", "rollout_every",
            "rollout_prompt_tokens", "rollout_temperature")  # not --rollout-engine: saved rounds are reused


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
    """Write atomically: a kill or a full disk mid-write leaves the previous file intact. Ctrl-C,
    SIGTERM (cli_entry) or a full disk also remove the partial file (a SIGKILL leaves it, for the
    next save to overwrite); a full disk is raised as OSError ENOSPC, whichever way torch.save
    reported it."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        torch.save(state, tmp)
    except BaseException as exc:  # torch.save reports a failed write as a RuntimeError
        tmp.unlink(missing_ok=True)
        if not isinstance(exc, (OSError, RuntimeError)) or not is_disk_full(exc, path.parent):
            raise
        raise OSError(errno.ENOSPC, "No space left on device", str(path)) from None
    os.replace(tmp, path)


def save_sharded(work: Path, meta: dict, model, names: set[str], optimizers, dist) -> None:
    """Under torchrun: the named tensors and the optimizers' state as torch.distributed.checkpoint
    shards (each process writes its own) in a directory named for (stage, step); then rank 0
    points CKPT (`meta` + that directory's name) at it atomically and removes the previous one. A
    kill at any point leaves CKPT naming a complete directory."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    name = f"trainer_state.s{meta['stage']}-{meta['step']}.dcp"
    target = work / name
    state = {"trained": {n: t for n, t in get_model_state_dict(model).items() if n in names}}
    if optimizers:
        state["optimizer"] = get_optimizer_state_dict(model, optimizers)
    if dist.main:
        shutil.rmtree(target, ignore_errors=True)  # what a run killed while writing it left
    dist.barrier()
    try:
        dcp.save(state, checkpoint_id=target)
    except Exception as exc:  # dcp wraps each process's failure in its own exception type
        if free_gb(work) >= 1.0:
            raise
        raise OSError(errno.ENOSPC, "No space left on device", str(target)) from exc
    dist.barrier()
    if dist.main:
        previous = work / CKPT
        old = torch.load(previous, weights_only=False).get("sharded") if previous.is_file() else None
        save_state(previous, {**meta, "sharded": name})
        if old and old != name:
            shutil.rmtree(work / old, ignore_errors=True)


def load_sharded(path: Path, model, names: set[str], optimizers=None) -> None:
    """Load what save_sharded wrote into the (sharded) model's named tensors, and the optimizers."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict, set_model_state_dict,
                                                         set_optimizer_state_dict)

    state = {}
    if names:
        state["trained"] = {n: t for n, t in get_model_state_dict(model).items() if n in names}
    if optimizers:
        state["optimizer"] = get_optimizer_state_dict(model, optimizers)
    dcp.load(state, checkpoint_id=path)
    if names:
        set_model_state_dict(model, state["trained"], options=StateDictOptions(strict=False))
    if optimizers:
        set_optimizer_state_dict(model, optimizers, state["optimizer"])


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
