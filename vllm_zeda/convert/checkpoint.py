"""Reading an HF checkpoint directory: config, shard list, router tensors; atomic output dirs."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import Iterator

from ..errors import ZedaError

CONFIG = "config.json"
INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


def load_config(model_dir: Path) -> dict:
    path = model_dir / CONFIG
    if not model_dir.is_dir():
        raise ZedaError(f"model directory {model_dir} does not exist")
    if not path.is_file():
        raise ZedaError(f"{path} is missing")
    try:
        cfg = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ZedaError(f"{path} is not valid JSON ({exc})") from None
    if not isinstance(cfg, dict):
        raise ZedaError(f"{path} does not hold a JSON object")
    return cfg


def quantization(cfg: dict) -> str | None:
    """The checkpoint's quantization method ("fp8", "compressed-tensors", ...), or None when its
    weights are plain floating point."""
    q = cfg.get("quantization_config")
    if not isinstance(q, dict):
        return None
    return str(q.get("quant_method") or q.get("format") or "unknown")


def shard_files(model_dir: Path) -> tuple[list[str], dict | None]:
    """Shard file names (in order) and the index JSON, if the checkpoint is sharded."""
    index_path = model_dir / INDEX
    if index_path.is_file():
        try:
            index = json.loads(index_path.read_text())
            weight_map = index["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ZedaError(f"{index_path} is corrupt ({exc!s})") from None
        shards = sorted(set(weight_map.values()))
    elif (model_dir / SINGLE).is_file():
        index, shards = None, [SINGLE]
    else:
        if any(model_dir.glob("*.bin")):
            raise ZedaError(f"{model_dir} holds PyTorch .bin weights; only safetensors checkpoints are supported")
        raise ZedaError(f"{model_dir} has no safetensors weights ({SINGLE} or {INDEX})")
    missing = [s for s in shards if not (model_dir / s).is_file()]
    if missing:
        raise ZedaError(f"checkpoint shard {model_dir / missing[0]} is missing")
    return shards, index


def check_new_output(output: Path) -> None:
    if output.exists():
        raise ZedaError(f"output path {output} already exists; choose a new one")
    parent = output.parent if str(output.parent) else Path(".")
    if not parent.is_dir():
        raise ZedaError(f"output parent directory {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise ZedaError(f"output directory {parent} is not writable")


@contextlib.contextmanager
def atomic_output_dir(output: Path) -> Iterator[Path]:
    """A temporary sibling of `output`, renamed to it only if the block finishes."""
    check_new_output(output)
    tmp = output.parent / f".{output.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        if output.exists():
            raise ZedaError(f"output path {output} appeared while converting; not overwriting it")
        tmp.rename(output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
