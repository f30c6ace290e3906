"""benchmarks/quality: the training-free baselines' rules, and the testbed pipeline at smoke size
(a tokenizer trained on a few local texts -> pretrain -> convert -> evaluate), and the bundled
quickstart model."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks" / "quality"))
import baselines  # noqa: E402
import corpus  # noqa: E402
import plot  # noqa: E402


def probs(tokens=64, experts=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(tokens, experts, generator=g) * 2, dim=-1)


def test_static_k_keeps_the_best_slots_renormalised():
    pr = probs()
    w, ids = baselines.static_k(pr, 4, 2)
    top, top_ids = torch.topk(pr, 2, dim=-1)
    assert torch.equal(ids[:, :2], top_ids)
    assert torch.allclose(w[:, :2], top / top.sum(-1, keepdim=True)) and torch.all(w[:, 2:] == 0)
    assert baselines.kept_fraction(w) == 0.5


@pytest.mark.parametrize("rule", ["top_p", "threshold", "random_drop"])
def test_dialled_rules_keep_between_one_slot_and_k_and_weights_sum_to_one(rule):
    pr, g = probs(), torch.Generator().manual_seed(0)
    run = {"top_p": lambda v: baselines.top_p(pr, 4, v), "threshold": lambda v: baselines.threshold(pr, 4, v),
           "random_drop": lambda v: baselines.random_drop(pr, 4, v, g)}[rule]
    shares = []
    for dial in (0.0, 0.3, 0.6, 0.9, 1.0):
        w, _ = run(dial)
        assert torch.allclose(w.sum(-1), torch.ones(w.shape[0]))
        assert torch.all((w > 0).sum(-1) >= 1)
        shares.append(baselines.kept_fraction(w))
    # top-p keeps more as p grows; the threshold and the drop rate keep less as they grow
    assert shares == sorted(shares, reverse=rule != "top_p") and shares[0] != shares[-1]


def test_top_p_stops_once_the_better_slots_reach_p():
    pr = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    assert (baselines.top_p(pr, 4, 0.75)[0] > 0).sum() == 2  # 0.5 < 0.75, 0.8 >= 0.75
    assert (baselines.top_p(pr, 4, 0.85)[0] > 0).sum() == 3


def test_math_documents_drop_held_out_questions_seen_in_train():
    train = [{"question": f"q{i}", "answer": str(i)} for i in range(5)]
    held = [{"question": "q1", "answer": "1"}, {"question": "new", "answer": "7"}]
    docs, held_docs = corpus.math_documents(train, held, per_doc=2)
    assert len(docs) == 3 and docs[0] == "Question: q0\nAnswer: 0\n\nQuestion: q1\nAnswer: 1\n\n"
    assert held == [{"question": "new", "answer": "7"}] and held_docs == ["Question: new\nAnswer: 7\n\n"]


POINTS = [
    {"method": "teacher", "kept": 1.0, "ppl_code": 10.0, "code_next_token_acc": 0.5},
    {"method": "threshold", "kept": 0.25, "ppl_code": 13.0, "code_next_token_acc": 0.40},
    {"method": "threshold", "kept": 0.5, "ppl_code": 11.0, "code_next_token_acc": 0.45},
    {"method": "zeda", "target": 0.5, "kept": 0.52, "ppl_code": 10.2, "code_next_token_acc": 0.49},
    {"method": "zeda", "target": 0.5, "dial": 1.0, "kept": 0.3, "ppl_code": 10.8, "code_next_token_acc": 0.47},
]


def test_plot_curves_run_from_the_teacher_down_and_star_the_trained_points(tmp_path):
    ppl = plot.curves(POINTS, "ppl_code", relative=True)
    flat = {name: [round(v, 6) for xy in pts for v in xy] for name, pts in ppl.items()}
    assert flat["threshold"] == [0.25, 30.0, 0.5, 10.0, 1.0, 0.0]  # sorted by kept, the teacher included
    assert flat["zeda T=0.5"] == [0.3, 8.0, 0.52, 2.0]  # no teacher point: its own curve
    assert plot.trained_points(POINTS, "code_next_token_acc", relative=False) == {"zeda T=0.5": (0.52, 49.0)}
    out = tmp_path / "q.png"
    plot.plot({"points": POINTS}, out, "smoke")  # metrics absent from the points (math) get no panel
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_testbed_pipeline_smoke(tmp_path):
    """corpus tokenizer -> pretrain.py -> python -m vllm_zeda.train -> evaluate.py, on local text."""
    root = tmp_path / "corpus"
    texts = {"code": [Path(corpus.__file__).read_text(), Path(baselines.__file__).read_text()],
             "prose": ["The manual page describes the command and its options in plain words. " * 40],
             "math": ["".join(corpus.qa({"question": f"What is {i} + {i}?", "answer": str(2 * i)}) for i in range(80))]}
    for split in ("train", "heldout"):
        for name, docs in texts.items():
            corpus.write_jsonl(root / split / f"{name}.jsonl", docs)
    (root / "math_eval.jsonl").write_text("".join(json.dumps({"question": f"What is {i} + {i}?", "answer": str(2 * i)}) + "\n"
                                                  for i in range(4)))
    (root / "MANIFEST.json").write_text(json.dumps({"files": {}}))
    corpus.train_tokenizer(sorted((root / "train").glob("*.jsonl")), 300, root / "tokenizer")

    run = lambda *args: subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, capture_output=True, text=True)  # noqa: E731
    base, zeda, result = tmp_path / "base", tmp_path / "zeda", tmp_path / "q.json"
    out = run("benchmarks/quality/pretrain.py", "--corpus", root, "--preset", "smoke", "--steps", 6, "--batch-size", 4,
              "--seq-len", 64, "--out", base, "--device", "cpu")
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads((base / "pretrain_report.json").read_text())
    assert report["steps"] == 6 and set(report["heldout_perplexity"]) == {"code", "prose", "math"}
    out = run("-m", "vllm_zeda.train", "--model", base, "--output", zeda, "--data", root / "train", "--stage1-steps", 3,
              "--stage2-steps", 2, "--seq-len", 32, "--quiet", "--no-plot")
    assert out.returncode == 0, out.stderr[-2000:]
    out = run("benchmarks/quality/evaluate.py", "--teacher", base, "--zeda", zeda, "--corpus", root, "--out", result,
              "--kept", 0.5, "--zero-biases", 30.0, "--seq-len", 32, "--max-blocks", 2, "--math-questions", 4, "--batch-size", 4)
    assert out.returncode == 0, out.stderr[-2000:]
    points = json.loads(result.read_text())["points"]
    methods = [p["method"] for p in points]
    assert methods == ["teacher", "static_k", "top_p", "threshold", "random_drop", "zeda", "zeda"]
    assert points[0]["kept"] == 1.0 and points[1]["kept"] == 0.5
    assert points[-1]["dial"] == 30.0 and points[-1]["kept"] == 0.0  # the dial pushes every slot to a zero expert


def test_bundled_quickstart_model_is_a_small_pretrained_qwen3_moe():
    from transformers import AutoConfig, AutoTokenizer

    base = ROOT / "examples" / "tiny_moe"
    assert (base / "model.safetensors").stat().st_size <= 16_000_000
    config = AutoConfig.from_pretrained(base)
    assert config.model_type == "qwen3_moe" and config.num_experts == 16 and config.num_experts_per_tok == 4
    tok = AutoTokenizer.from_pretrained(base)
    assert tok.tokenize("151") == ["1", "5", "1"]
    for f in ("train/code.jsonl", "heldout/prose.jsonl", "math_eval.jsonl"):
        assert (base / "data" / f).stat().st_size > 0


def test_teacher_sample_prompts_keep_each_sources_share_of_text(tmp_path):
    import teacher_samples
    from vllm_zeda.testing.tiny import byte_tokenizer

    train = tmp_path / "train"
    train.mkdir()
    (train / "long.jsonl").write_text("".join(json.dumps({"text": "a" * 300 + str(i)}) + "\n" for i in range(3)))
    (train / "short.jsonl").write_text("".join(json.dumps({"text": "b" * 100 + str(i)}) + "\n" for i in range(9)))
    got = teacher_samples.prompts(tmp_path, byte_tokenizer(), count=40, length=16, seed=0)
    shares = {s: sum(src == s for src, _ in got) for s in ("long", "short")}
    assert shares == {"long": 20, "short": 20}  # 903 vs 909 bytes: by documents it would be 10 / 30
    assert all(len(ids) == 16 for _, ids in got)
    assert got == teacher_samples.prompts(tmp_path, byte_tokenizer(), count=40, length=16, seed=0)


def test_static_ceiling_distils_a_static_top_k_and_refuses_bad_input_in_one_line(tmp_path):
    """static_ceiling.py: the bundled model made static top-2 and distilled a few steps, written
    as a plain HF checkpoint with its report; a bad --teacher, --top-k or --data: one line."""
    from transformers import AutoConfig

    base, out = ROOT / "examples" / "tiny_moe", tmp_path / "static"
    run = lambda *args: subprocess.run([sys.executable, "benchmarks/quality/static_ceiling.py", *map(str, args)],  # noqa: E731
                                       cwd=ROOT, capture_output=True, text=True)
    done = run("--teacher", base, "--top-k", 2, "--data", base / "data" / "train", "--out", out, "--steps", 3,
               "--seq-len", 32, "--batch-size", 2)
    assert done.returncode == 0, done.stderr[-2000:]
    assert AutoConfig.from_pretrained(out).num_experts_per_tok == 2
    report = json.loads((out / "static_ceiling.json").read_text())
    assert report["top_k"] == 2 and report["heldout_kl"] > 0
    for args, says in ((["--teacher", tmp_path / "nope", "--top-k", 2], "no config.json"),
                       (["--teacher", base, "--top-k", 4], "--top-k must be"),
                       (["--teacher", base, "--top-k", 2, "--data", tmp_path / "nope.txt"], "does not exist")):
        bad = run(*args, *([] if "--data" in args else ["--data", base / "data" / "train"]), "--out", tmp_path / "bad")
        assert bad.returncode != 0 and says in bad.stderr and "Traceback" not in bad.stderr
        assert len(bad.stderr.strip().splitlines()) == 1


def test_the_weight_convention_probe_renormalises_over_real_slots_only():
    """benchmarks/quality/weight_convention.py: the real slots' weights sum to 1 whenever a token
    keeps one, zero slots weigh 0, the choice of slots is route_softmax's; masked mode unchanged."""
    import importlib.util

    from vllm_zeda.routing import route_softmax

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "quality" / "weight_convention.py"
    spec = importlib.util.spec_from_file_location("weight_convention", path)
    probe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(probe)
    logits = torch.randn(64, 12, generator=torch.Generator().manual_seed(0))
    logits[:8, 8:] += 10  # tokens whose slots are all zero
    ref, got = route_softmax(logits, 8, 4, True), probe.route_real_renormalised(logits, 8, 4, True)
    assert torch.equal(got.ids, ref.ids) and torch.all(got.weights[got.is_zero] == 0)
    live = (~got.is_zero).any(-1)
    assert torch.allclose(got.weights[live].sum(-1), torch.ones(int(live.sum()))) and not live[:8].any()
    assert torch.all(got.weights[~live] == 0)
    masked = probe.route_real_renormalised(logits, 8, 4, True, masked=True)
    assert torch.allclose(masked.weights, route_softmax(logits, 8, 4, True, masked=True).weights)
