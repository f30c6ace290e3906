"""Pretrain a Qwen3-MoE testbed from scratch on the corpus of `corpus.py` (GPU; a CPU runs the
smoke size). transformers' own Qwen3MoeForCausalLM and its load-balancing loss, AdamW, bf16
autocast over fp32 weights, warm-up then cosine; the output is a bf16 HF checkpoint with the
corpus's tokenizer, ready for `python -m vllm_zeda.train` and `vllm serve`.

  quickstart  4 layers, hidden 256, 16 experts (top-4): <= 16 MB in bf16, the README main job's model
  testbed     8 layers, hidden 512, 32 experts (top-8): the quality testbed of benchmarks/QUALITY.md
  smoke       2 layers, hidden 64, 8 experts (top-2): CPU tests of this script

`--minutes M` times a few steps first (forward + backward, no update) and fixes the step count
that fits M minutes; `--steps N` fixes it outright. Seeded (initialisation and batch order, with
torch's deterministic algorithms where they exist; not checked bit for bit across runs). A state
is saved every --save-every steps in OUT.state: a killed run resumes from it with the same command
(and `--steps` as the killed run printed); a finished run removes it.

    python benchmarks/quality/pretrain.py --corpus .quality/corpus --preset quickstart --minutes 4 --out OUT
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import torch

PRESETS = {
    "quickstart": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                       num_experts=16, num_experts_per_tok=4, moe_intermediate_size=96, intermediate_size=512),
    "testbed": dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4, head_dim=64,
                    num_experts=32, num_experts_per_tok=8, moe_intermediate_size=256, intermediate_size=1024),
    "smoke": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=32,
                  num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, intermediate_size=128),
}


def model_config(preset: str, vocab_size: int, eos_id: int, seq_len: int):
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(vocab_size=vocab_size, max_position_embeddings=max(2048, seq_len), rope_theta=10000.0,
                          norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[], tie_word_embeddings=False,
                          router_aux_loss_coef=0.01, output_router_logits=True, bos_token_id=eos_id,
                          eos_token_id=eos_id, pad_token_id=eos_id, dtype="bfloat16", **PRESETS[preset])


def token_blocks(files: list[Path], tokenizer, seq_len: int) -> torch.Tensor:
    """Every document + EOS, concatenated in file order and cut into [N, seq_len] blocks."""
    ids: list[int] = []
    for f in files:
        texts = [json.loads(line)["text"] for line in f.read_text(encoding="utf-8").splitlines() if line.strip()]
        for doc in tokenizer(texts, add_special_tokens=False)["input_ids"]:
            ids += doc + [tokenizer.eos_token_id]
    n = len(ids) // seq_len
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


def batch_at(step: int, batch: int, n: int, seed: int) -> torch.Tensor:
    """Rows of the step's batch: a seeded permutation per epoch (pure in the step: resumable)."""
    per_epoch = n // batch
    epoch, i = divmod(step, per_epoch)
    g = torch.Generator().manual_seed(seed * 1000 + epoch)
    return torch.randperm(n, generator=g)[i * batch:(i + 1) * batch]


@torch.no_grad()
def perplexity(model, blocks: torch.Tensor, batch: int, device, autocast) -> float:
    model.eval()
    nll, count = 0.0, 0
    for i in range(0, blocks.shape[0], batch):
        x = blocks[i:i + batch].to(device)
        with autocast():
            logits = model(input_ids=x).logits.float()
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1),
                                                 reduction="sum")
        nll, count = nll + loss.item(), count + x[:, 1:].numel()
    model.train()
    return math.exp(nll / count)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--corpus", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--preset", choices=sorted(PRESETS), default="quickstart")
    steps = p.add_mutually_exclusive_group(required=True)
    steps.add_argument("--steps", type=int)
    steps.add_argument("--minutes", type=float)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=float, default=0.03, help="share of the steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-every", type=int, default=500)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args()
    from transformers import AutoTokenizer, Qwen3MoeForCausalLM

    corpus, out = Path(a.corpus), Path(a.out)
    if not (corpus / "tokenizer").is_dir() or not (corpus / "train").is_dir():
        raise SystemExit(f"pretrain: {corpus} is no built corpus: python benchmarks/quality/corpus.py --out {corpus}")
    work = out.with_name(out.name + ".state")
    work.mkdir(parents=True, exist_ok=True)
    device = torch.device(a.device)
    use_bf16 = device.type == "cuda"
    autocast = lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16)  # noqa: E731
    torch.manual_seed(a.seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

    t0 = time.time()
    tokenizer = AutoTokenizer.from_pretrained(corpus / "tokenizer")
    tokenizer.model_max_length = 1 << 30  # documents are cut into blocks here, never fed whole
    train = token_blocks(sorted((corpus / "train").glob("*.jsonl")), tokenizer, a.seq_len)
    heldout = {f.stem: token_blocks([f], tokenizer, a.seq_len) for f in sorted((corpus / "heldout").glob("*.jsonl"))}
    print(f"pretrain: {train.numel():,} train tokens in {train.shape[0]} blocks, held out "
          f"{ {k: v.numel() for k, v in heldout.items()} } ({time.time() - t0:.0f} s)", flush=True)

    config = model_config(a.preset, len(tokenizer), tokenizer.eos_token_id, a.seq_len)
    model = Qwen3MoeForCausalLM._from_config(config, torch_dtype=torch.float32,
                                             experts_implementation="grouped_mm" if device.type == "cuda" else "eager")
    model.to(device).train()
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, betas=(0.9, 0.95), weight_decay=0.1, eps=1e-8)

    def step_once(rows: torch.Tensor) -> torch.Tensor:
        x = train[rows].to(device)
        with autocast():
            loss = model(input_ids=x, labels=x).loss
        loss.backward()
        return loss

    total = a.steps
    if total is None:  # time the step: 2 warm-up + 4 timed, gradients thrown away
        for i in range(6):
            if i == 2:
                torch.cuda.synchronize() if use_bf16 else None
                t = time.perf_counter()
            step_once(batch_at(i, a.batch_size, train.shape[0], a.seed + 1))
            opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize() if use_bf16 else None
        per_step = (time.perf_counter() - t) / 4
        total = max(1, int(a.minutes * 60 / per_step))
        print(f"pretrain: {per_step * 1000:.0f} ms a step -> {total} steps in {a.minutes} min", flush=True)
    warmup = max(1, int(a.warmup * total))

    step, curve = 0, []
    state = work / "state.pt"
    if state.exists():
        saved = torch.load(state, map_location=device, weights_only=False)
        if saved["total"] != total or saved["preset"] != a.preset:
            raise SystemExit(f"pretrain: {state} is from another run (steps {saved['total']}, {saved['preset']}): "
                             f"pass --steps {saved['total']} --preset {saved['preset']} or delete {work}")
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["opt"])
        step, curve = saved["step"], saved["curve"]
        torch.set_rng_state(saved["rng"])
        print(f"pretrain: resumed at step {step} of {total}", flush=True)

    from tqdm import tqdm

    bar = tqdm(total=total, initial=step, desc=f"pretrain {a.preset}", unit="step", mininterval=5)
    t_train = time.time()
    while step < total:
        for g in opt.param_groups:
            g["lr"] = lr_at(step, total, a.lr, warmup)
        loss = step_once(batch_at(step, a.batch_size, train.shape[0], a.seed))
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        if step % 25 == 0 or step == total:
            curve.append([step, round(loss.item(), 4)])
            bar.set_postfix(loss=f"{curve[-1][1]:.3f}")
        bar.update(1)
        if step % a.save_every == 0 and step < total:
            torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step, "total": total,
                        "preset": a.preset, "curve": curve, "rng": torch.get_rng_state()}, work / "state.tmp")
            os.replace(work / "state.tmp", state)
    bar.close()
    train_seconds = time.time() - t_train

    ppl = {k: round(perplexity(model, v, a.batch_size, device, autocast), 4) for k, v in heldout.items()}
    print(f"pretrain: held-out perplexity {ppl}", flush=True)
    tmp = out.with_name(out.name + ".partial")
    model.config.output_router_logits = False
    model.to(torch.bfloat16).save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    report = {"preset": a.preset, "params": n_params, "steps": total, "batch_size": a.batch_size, "seq_len": a.seq_len,
              "tokens": total * a.batch_size * a.seq_len, "train_tokens": train.numel(), "lr": a.lr, "seed": a.seed,
              "train_seconds": round(train_seconds, 1), "heldout_perplexity": ppl, "loss_curve": curve,
              "device": torch.cuda.get_device_name() if use_bf16 else "cpu", "torch": torch.__version__,
              "transformers": __import__("transformers").__version__, "date": time.strftime("%Y-%m-%d"),
              "corpus_manifest": json.loads((corpus / "MANIFEST.json").read_text())}
    (tmp / "pretrain_report.json").write_text(json.dumps(report, indent=1) + "\n")
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    shutil.rmtree(work, ignore_errors=True)
    print(f"pretrain: {n_params / 1e6:.2f} M params, {report['tokens']:,} tokens in {train_seconds:.0f} s -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
