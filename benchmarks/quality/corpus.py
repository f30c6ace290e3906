"""The quality testbed's text: three sources that install offline, split train / held-out, and a
byte-level BPE tokenizer trained on the train split.

  code   Python's standard library sources (`sysconfig` stdlib, tests and site-packages left out)
  prose  English man pages, sections 1, 2, 5, 7 and 8, rendered to plain text by `man` (a seeded
         sample of section 1, which alone holds thousands of pages)
  math   question/answer pairs from DeepMind's `mathematics_dataset` (PyPI), run in a venv of its
         own (`math_questions.py` says why); held-out questions never occur in the train split

Out (--out DIR): train/{code,prose,math}.jsonl and heldout/{...}.jsonl (one {"text"} document a
line: what `python -m vllm_zeda.train --data DIR/train` reads), math_eval.jsonl (held-out
questions with answers, for exact match), tokenizer/ (transformers' fast tokenizer, with a chat
template that asks a chat turn as a "Question:"), MANIFEST.json (each file's documents, bytes
and sha256; the sources' versions). Deterministic: the same machine image gives the same bytes.

    python benchmarks/quality/corpus.py --out .quality/corpus [--vocab-size 4096]
    python benchmarks/quality/corpus.py --sample-of .quality/corpus --out examples/tiny_moe/data  # a small slice
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import sysconfig
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
SOURCES = ("code", "prose", "math")
HELDOUT_EVERY = 20  # one document in 20 is held out, chosen by a hash of its name
EOS = "<|endoftext|>"
MAN_SECTIONS = ("1", "2", "5", "7", "8")
CHAT_TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'user' %}Question: {{ m['content'] }}\n"
                 "{% elif m['role'] == 'assistant' %}Answer: {{ m['content'] }}\n\n{% endif %}{% endfor %}"
                 "{% if add_generation_prompt %}Answer:{% endif %}")


def held_out(name: str) -> bool:
    return int(hashlib.sha256(name.encode()).hexdigest(), 16) % HELDOUT_EVERY == 0


def code_documents() -> list[tuple[str, str]]:
    """(relative path, source) of every stdlib module outside tests and site-packages."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "test", "tests", "idle_test", "__pycache__"}
    docs = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if skip.intersection(rel.parts[:-1]):
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        if text.strip():
            docs.append((str(rel), text))
    return docs


def render_man(path: str) -> str:
    env = {**os.environ, "MANWIDTH": "80", "MAN_KEEP_FORMATTING": "0", "LC_ALL": "C.UTF-8"}
    try:
        out = subprocess.run(["man", "-E", "UTF-8", "-l", path], capture_output=True, env=env, timeout=60).stdout
        text = subprocess.run(["col", "-bx"], input=out, capture_output=True, timeout=60).stdout
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return text.decode("utf-8", errors="replace")


def man_pages(man_root: Path, section1_pages: int, seed: int) -> list[str]:
    """Page files, English, not links to another page (`.so`), section 1 sampled with `seed`."""
    pages = []
    for section in MAN_SECTIONS:
        found = []
        for f in sorted((man_root / f"man{section}").glob("*.gz")):
            if f.is_symlink():
                continue
            with gzip.open(f, "rb") as fh:
                if fh.read(4) == b".so ":
                    continue
            found.append(str(f))
        if section == "1" and len(found) > section1_pages:
            found = sorted(random.Random(seed).sample(found, section1_pages))
        pages += found
    return pages


def prose_documents(man_root: Path, section1_pages: int, seed: int, workers: int) -> list[tuple[str, str]]:
    pages = man_pages(man_root, section1_pages, seed)
    if not pages:
        raise SystemExit(f"corpus: no man pages under {man_root} (install `man-db` and `manpages`)")
    with ProcessPoolExecutor(workers) as pool:
        texts = list(pool.map(render_man, pages, chunksize=16))
    return [(Path(p).name, t) for p, t in zip(pages, texts) if len(t.strip()) > 200]


def math_python(venv: Path) -> Path:
    """A venv with mathematics_dataset and its sympy 1.5; made on first use (pip, from PyPI)."""
    python = venv / "bin" / "python"
    if not python.exists():
        print(f"corpus: creating {venv} for mathematics_dataset (sympy 1.5)", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        pip = subprocess.run([str(python), "-m", "pip", "install", "-q", "mathematics_dataset==1.0.1", "sympy==1.5.1"])
        if pip.returncode:
            shutil.rmtree(venv, ignore_errors=True)
            raise SystemExit("corpus: pip could not install mathematics_dataset==1.0.1 sympy==1.5.1 (PyPI reachable?)")
    return python


def math_questions(python: Path, count: int, seed: int) -> list[dict]:
    out = subprocess.run([str(python), str(HERE / "math_questions.py"), "--count", str(count), "--seed", str(seed)],
                         capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"corpus: math_questions.py failed: {out.stderr.strip().splitlines()[-1:]}")
    return [json.loads(line) for line in out.stdout.splitlines()]


def qa(q: dict) -> str:
    return f"Question: {q['question']}\nAnswer: {q['answer']}\n\n"


def math_documents(train_qs: list[dict], heldout_qs: list[dict], per_doc: int) -> tuple[list[str], list[str]]:
    """Documents of `per_doc` question/answer pairs each; a held-out question asked in the train
    questions too is dropped from the held-out side."""
    seen = {q["question"] for q in train_qs}
    heldout_qs[:] = [q for q in heldout_qs if q["question"] not in seen]
    chunk = lambda qs: ["".join(qa(q) for q in qs[i:i + per_doc]) for i in range(0, len(qs), per_doc)]
    return chunk(train_qs), chunk(heldout_qs)


def write_jsonl(path: Path, texts: list[str]) -> dict:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = "".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts).encode()
    path.write_bytes(data)
    return {"documents": len(texts), "bytes": len(data), "text_chars": sum(map(len, texts)),
            "sha256": hashlib.sha256(data).hexdigest()}


def train_tokenizer(files: list[Path], vocab_size: int, out: Path) -> None:
    """Byte-level BPE over the train split, every digit a token of its own (numbers spelt digit by
    digit, as Qwen's tokenizer does); saved as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    def texts():
        for f in files:
            with f.open(encoding="utf-8") as fh:
                for line in fh:
                    yield json.loads(line)["text"]

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts(), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=None, pad_token=EOS,
                                   unk_token=None, model_max_length=2048)
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(out))


def write_sample(corpus: Path, out: Path, chars: dict[str, int], questions: int) -> None:
    """A small slice of a built corpus: for each split and source the first documents (in a seeded
    order) up to `chars[split]` characters, and the first held-out math questions."""
    for split, budget in chars.items():
        for source in SOURCES:
            lines = (corpus / split / f"{source}.jsonl").read_text(encoding="utf-8").splitlines()
            random.Random(0).shuffle(lines)
            kept, used = [], 0
            for line in lines:
                text = json.loads(line)["text"][: budget - used]
                kept.append(text)
                used += len(text)
                if used >= budget:
                    break
            write_jsonl(out / split / f"{source}.jsonl", kept)
    qs = (corpus / "math_eval.jsonl").read_text().splitlines()[:questions]
    (out / "math_eval.jsonl").write_text("".join(line + "\n" for line in qs))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--man-root", default="/usr/share/man")
    p.add_argument("--section1-pages", type=int, default=1500, help="man(1) pages sampled (sections 2, 5, 7, 8: all)")
    p.add_argument("--math-train", type=int, default=150_000, help="train questions")
    p.add_argument("--math-heldout", type=int, default=3_000, help="held-out questions (before removing repeats)")
    p.add_argument("--math-venv", default=str(Path(".quality") / "mathenv"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sample-of", metavar="CORPUS", help="write a small slice of this built corpus to --out instead")
    a = p.parse_args()
    out = Path(a.out)
    if a.sample_of:
        write_sample(Path(a.sample_of), out, {"train": 60_000, "heldout": 20_000}, questions=200)
        return 0
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    t0 = time.time()

    python = math_python(Path(a.math_venv))
    print("corpus: code (stdlib sources)", flush=True)
    code = code_documents()
    print(f"corpus: prose (man pages, {os.cpu_count()} workers)", flush=True)
    prose = prose_documents(Path(a.man_root), a.section1_pages, a.seed, os.cpu_count() or 1)
    print("corpus: math (mathematics_dataset)", flush=True)
    train_qs = math_questions(python, a.math_train, a.seed)
    heldout_qs = math_questions(python, a.math_heldout, a.seed + 1)
    math_train, math_heldout = math_documents(train_qs, heldout_qs, per_doc=16)

    manifest = {"built": time.strftime("%Y-%m-%d"), "python": platform.python_version(), "platform": platform.platform(),
                "seed": a.seed, "vocab_size": a.vocab_size, "files": {}}
    for name, docs in (("code", code), ("prose", prose)):
        for split, keep in (("train", False), ("heldout", True)):
            texts = [t for n, t in docs if held_out(n) == keep]
            manifest["files"][f"{split}/{name}.jsonl"] = write_jsonl(tmp / split / f"{name}.jsonl", texts)
    manifest["files"]["train/math.jsonl"] = write_jsonl(tmp / "train" / "math.jsonl", math_train)
    manifest["files"]["heldout/math.jsonl"] = write_jsonl(tmp / "heldout" / "math.jsonl", math_heldout)
    evals = tmp / "math_eval.jsonl"
    evals.write_text("".join(json.dumps(q) + "\n" for q in heldout_qs))
    manifest["files"]["math_eval.jsonl"] = {"questions": len(heldout_qs), "sha256": hashlib.sha256(evals.read_bytes()).hexdigest()}

    print(f"corpus: tokenizer (byte-level BPE, {a.vocab_size} entries)", flush=True)
    train_tokenizer(sorted((tmp / "train").glob("*.jsonl")), a.vocab_size, tmp / "tokenizer")
    manifest["tokenizer_sha256"] = hashlib.sha256((tmp / "tokenizer" / "tokenizer.json").read_bytes()).hexdigest()
    (tmp / "MANIFEST.json").write_text(json.dumps(manifest, indent=1) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    for f, m in manifest["files"].items():
        print(f"  {f}: {m.get('documents', m.get('questions'))} documents, {m.get('bytes', 0) / 1e6:.1f} MB")
    print(f"corpus: {out} in {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
