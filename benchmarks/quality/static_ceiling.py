"""The ceiling for a fixed share of slots: the teacher made statically top-K' (K' < K) and its MoE
blocks (routers + experts) distilled from the top-K teacher with the trainer's stage-2 recipe and
budget. What ZEDA at kept K'/K cannot be expected to beat on a model: if this model also stays far
from the teacher, the shortfall is the model's capacity at that many slots, not ZEDA's recipe.

Same data (`vllm_zeda.train.data.load_blocks`, seeded blocks), loss (KL(teacher || student),
`losses.kl_teacher_student`), learning rates (routers 3e-3, experts 1e-4, AdamW), schedule
(`loop.lr_factor`) and steps as a conversion's two stages together. Writes a plain HF checkpoint
(`evaluate.py --static MODEL` measures it beside ZEDA).

    python benchmarks/quality/static_ceiling.py --teacher examples/tiny_moe --top-k 2 \
        --data .quality/corpus/train --out .quality/static_top2 --steps 800 --seq-len 256
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teacher", required=True)
    p.add_argument("--top-k", type=int, required=True)
    p.add_argument("--data", nargs="+", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=800)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=3e-3, help="routers")
    p.add_argument("--expert-lr", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    out = Path(a.out)
    if out.exists():
        raise SystemExit(f"static_ceiling: {out} exists")
    config = Path(a.teacher, "config.json")
    if not config.is_file():
        raise SystemExit(f"static_ceiling: --teacher {a.teacher} is not a model folder (no config.json)")
    k = json.loads(config.read_text()).get("num_experts_per_tok")
    if not k or not 1 <= a.top_k < k:
        raise SystemExit(f"static_ceiling: --top-k must be between 1 and the teacher's top-k less one ({k}), got {a.top_k}")
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from vllm_zeda.errors import ZedaError
    from vllm_zeda.train.data import batch_indices, load_blocks
    from vllm_zeda.train.losses import kl_teacher_student
    from vllm_zeda.train.loop import lr_factor

    torch.manual_seed(a.seed)
    tokenizer = AutoTokenizer.from_pretrained(a.teacher)
    try:
        data = load_blocks(a.data, tokenizer, a.seq_len, seed=a.seed)
    except ZedaError as exc:  # a missing, empty or unreadable --data: its one line
        raise SystemExit(f"static_ceiling: {exc}") from None
    teacher = AutoModelForCausalLM.from_pretrained(a.teacher, dtype=torch.float32).eval().requires_grad_(False)
    student = AutoModelForCausalLM.from_pretrained(a.teacher, dtype=torch.float32, num_experts_per_tok=a.top_k)
    student.requires_grad_(False)
    routers, experts = [], []
    for name, param in student.named_parameters():
        if ".mlp." in name:
            (routers if ".mlp.gate." in name else experts).append(param.requires_grad_(True))
    opt = torch.optim.AdamW([{"params": routers, "lr": a.lr, "base": a.lr},
                             {"params": experts, "lr": a.expert_lr, "base": a.expert_lr}], weight_decay=0.0)
    student.train()
    t0, log = time.time(), []
    for step in tqdm(range(a.steps), desc=f"static top-{a.top_k}", unit="step"):
        for g in opt.param_groups:
            g["lr"] = g["base"] * lr_factor(step, a.steps)
        x = data.train[batch_indices(data.train.shape[0], step * a.batch_size, a.batch_size, a.seed * 31 + 2)]
        with torch.no_grad():
            t = teacher(input_ids=x).logits
        loss = kl_teacher_student(t, student(input_ids=x).logits)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(routers + experts, 1.0)
        opt.step()
        log.append(float(loss))
    student.eval()
    with torch.no_grad():
        kl = sum(float(kl_teacher_student(teacher(input_ids=h[None]).logits, student(input_ids=h[None]).logits))
                 for h in data.heldout) / data.heldout.shape[0]
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    student.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "static_ceiling.json").write_text(json.dumps({
        "teacher": a.teacher, "top_k": a.top_k, "settings": {k: v for k, v in vars(a).items() if k != "out"},
        "heldout_kl": kl, "train_kl_last_50": sum(log[-50:]) / min(50, len(log)), "seconds": round(time.time() - t0, 1),
        "date": time.strftime("%Y-%m-%d")}, indent=1) + "\n")
    tmp.rename(out)
    print(f"static_ceiling: top-{a.top_k}, held-out KL {kl:.5f}, {time.time() - t0:.0f} s -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
