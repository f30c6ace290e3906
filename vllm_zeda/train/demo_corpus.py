"""A demo corpus of real English text that needs no download: the docstrings of the Python
standard library installed with this interpreter.

Read with `ast` (nothing is imported or executed), files in sorted order, so the text is the same
on every run of the same Python. `python -m vllm_zeda.train.demo_corpus OUT.txt` writes it to a file.
"""
from __future__ import annotations

import ast
import functools
import inspect
import sys
import sysconfig
from pathlib import Path

from ..errors import ZedaError

DEFAULT_MAX_CHARS = 400_000
MIN_DOC_CHARS = 80  # one-line docstrings ("Return self.") are mostly noise


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def module_documents(path: Path) -> str:
    """One document per module: its docstring, then its classes' and functions' docstrings."""
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
        return ""
    parts = []
    for node in ast.walk(tree):  # the module itself comes first
        if node is not tree and not isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        doc = ast.get_docstring(node, clean=False)
        if doc and len(doc) >= MIN_DOC_CHARS:
            parts.append(inspect.cleandoc(doc))
    return "\n\n".join(parts)


@functools.lru_cache(maxsize=2)
def documents(max_chars: int = DEFAULT_MAX_CHARS) -> tuple[str, ...]:
    """Module documents in file-name order until `max_chars` characters are collected."""
    root = stdlib_dir()
    files = sorted(root.glob("*.py")) + sorted(root.glob("*/*.py"))
    docs, total = [], 0
    for path in files:
        if path.name.startswith("test") or path.parent.name.startswith(("test", "idle")):
            continue
        text = module_documents(path)
        if not text:
            continue
        docs.append(text[: max_chars - total])
        total += len(docs[-1])
        if total >= max_chars:
            break
    if total == 0:
        raise ZedaError(f"no standard-library sources with docstrings under {root}; pass --data")
    return tuple(docs)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m vllm_zeda.train.demo_corpus OUT.txt")
    Path(sys.argv[1]).write_text("\n\n".join(documents()) + "\n")
