"""Training text for the trainer: files -> documents -> one token stream -> fixed-length blocks.

Inputs: .txt files (one document each), .jsonl files with one object per line holding "text"
or chat "messages" (rendered with the tokenizer's chat template), and directories of those
(searched recursively, in sorted order). No --data means the stdlib-docstring demo corpus.

Blocks are split into train / held-out by a seeded permutation; the train order is a fresh
seeded permutation every epoch, and `batch_indices` is a pure function of the sample position,
so a resumed run sees exactly the batches the interrupted one would have seen.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import torch

from ..errors import ZedaError

SUFFIXES = (".txt", ".jsonl")


@dataclass(frozen=True)
class Blocks:
    train: torch.Tensor  # [N, seq_len] int64
    heldout: torch.Tensor  # [M, seq_len] int64
    num_tokens: int
    sources: tuple[str, ...]


def find_files(paths: Sequence[str | Path]) -> list[Path]:
    """The data files named by `paths` (files or directories), in a stable order."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in SUFFIXES)
            if not found:
                raise ZedaError(f"data directory {p} holds no .txt or .jsonl files")
            files += found
        elif p.is_file():
            if p.suffix not in SUFFIXES:
                raise ZedaError(f"data file {p} is neither .txt nor .jsonl")
            files.append(p)
        else:
            raise ZedaError(f"data path {p} does not exist")
    if not files:
        raise ZedaError("no data files given")
    return files


def read_documents(path: Path, tokenizer) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ZedaError(f"cannot read data file {path} ({exc})") from None
    if path.suffix == ".txt":
        return [text] if text.strip() else []
    return [_jsonl_document(line, tokenizer, f"{path}:{n}") for n, line in enumerate(text.splitlines(), 1) if line.strip()]


def _jsonl_document(line: str, tokenizer, where: str) -> str:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ZedaError(f"{where} is not valid JSON ({exc.msg})") from None
    if isinstance(obj, dict) and isinstance(obj.get("text"), str):
        return obj["text"]
    if isinstance(obj, dict) and isinstance(obj.get("messages"), list):
        return render_chat(obj["messages"], tokenizer, where)
    raise ZedaError(f"{where} has neither a \"text\" string nor a \"messages\" list")


def render_chat(messages: list, tokenizer, where: str) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise ZedaError(f"{where} holds chat messages but the model's tokenizer has no chat template")
    if not all(isinstance(m, dict) and "role" in m and "content" in m for m in messages):
        raise ZedaError(f"{where}: every message needs \"role\" and \"content\"")
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False)
    except Exception as exc:  # jinja errors of a template we did not write
        raise ZedaError(f"{where}: the chat template failed ({exc})") from None


def token_stream(docs: Iterable[str], tokenizer) -> torch.Tensor:
    """All documents' tokens in one stream, each followed by EOS so packing keeps boundaries."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    ids: list[int] = []
    for doc in docs:
        if doc:
            ids += tokenizer(doc, add_special_tokens=False)["input_ids"] + eos
    return torch.tensor(ids, dtype=torch.int64)


def pack(stream: torch.Tensor, seq_len: int) -> torch.Tensor:
    """[n] -> [n // seq_len, seq_len]; the tail shorter than one block is dropped."""
    n = stream.numel() // seq_len
    return stream[: n * seq_len].view(n, seq_len)


def split(blocks: torch.Tensor, heldout_fraction: float, max_heldout: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded split; at least one block on each side."""
    n = blocks.shape[0]
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    k = min(max(1, round(n * heldout_fraction)), max_heldout, n - 1)
    return blocks[order[k:]], blocks[order[:k]]


def load_blocks(
    paths: Sequence[str | Path] | None,
    tokenizer,
    seq_len: int,
    *,
    seed: int,
    heldout_fraction: float = 0.05,
    max_heldout: int = 128,
) -> Blocks:
    if paths:
        files = find_files(paths)
        docs = [d for f in files for d in read_documents(f, tokenizer)]
        sources = tuple(map(str, files))
    else:
        from .demo_corpus import documents

        docs, sources = list(documents()), ("<demo corpus: Python stdlib docstrings>",)
    stream = token_stream(docs, tokenizer)
    if stream.numel() == 0:
        raise ZedaError(f"the data is empty ({', '.join(sources[:3])}{'...' if len(sources) > 3 else ''})")
    blocks = pack(stream, seq_len)
    if blocks.shape[0] < 2:
        raise ZedaError(
            f"the data holds {stream.numel()} tokens: too few for one training and one held-out "
            f"block of --seq-len {seq_len}"
        )
    train, heldout = split(blocks, heldout_fraction, max_heldout, seed)
    return Blocks(train=train, heldout=heldout, num_tokens=int(stream.numel()), sources=sources)


def batch_indices(num_blocks: int, position: int, count: int, seed: int) -> torch.Tensor:
    """Indices of the `count` training blocks at sample `position` of the endless seeded stream.

    Epoch e is the permutation seeded by (seed, e): pure, so any position can be recomputed.
    """
    out = []
    while count > 0:
        epoch, offset = divmod(position, num_blocks)
        perm = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        take = min(count, num_blocks - offset)
        out.append(perm[offset : offset + take])
        position, count = position + take, count - take
    return torch.cat(out)


def stage_seed(seed: int, stage: int) -> int:
    """The seed of stage `stage`'s training stream (`batch_indices`): the batches it trains on and
    the blocks stage 2's teacher cache holds are both drawn from it."""
    return seed * 31 + stage


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on `device` without waiting for the GPU: on CUDA through pinned memory and
    an asynchronous copy (a copy from pageable memory waits for every kernel queued before it)."""
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)
