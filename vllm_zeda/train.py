"""`python -m vllm_zeda.train`: convert an HF MoE checkpoint to ZEDA and adapt it by two-stage
self-distillation from the frozen original (DESIGN §3).

    python -m vllm_zeda.train --model SRC --output DST [--data PATH ...]
    torchrun --nproc-per-node N -m vllm_zeda.train ...        (DDP, same results, N x the batch)

  inject   Z zero-expert rows in every router (vllm_zeda.inject), into a work directory
  stage 1  router weights only; teacher = the same network in masked mode with the original
           router rows, under no_grad (no second copy of the model)
  stage 2  routers + MoE blocks (experts, shared experts); attention, embeddings, norms frozen;
           teacher = a frozen copy, or its top-k log-probs cached on disk (--teacher-cache)
  write    DST = ZEDA checkpoint (save_pretrained) + zeda_report.json + zeda_report.png

Loss = KL(teacher || student) on next-token distributions + the group balancing loss with w from
--target-zero-fraction. The loop below reads top to bottom; knobs are plain flags.
Resuming (--resume) is exact: the batch at every step is a pure function of (seed, step), and
the checkpoint holds the trained tensors, the optimizer and the RNG states.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.distributed as torch_dist
from torch.nn.parallel import DistributedDataParallel as DDP

from .errors import ZedaError, cli_entry

KILL_ENV = "ZEDA_TRAIN_KILL_AT"  # test hook: "STAGE:STEP" -> os._exit(137) after that step (a kill -9)
CKPT = "trainer_state.pt"
INJECTED = "injected"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m vllm_zeda.train", description="convert an HF MoE checkpoint to ZEDA (zero experts) and adapt it by two-stage self-distillation")
    a = p.add_argument
    a("--model", required=True, help="source HF MoE checkpoint directory (safetensors)")
    a("--output", required=True, help="new directory for the trained ZEDA checkpoint (must not exist)")
    a("--data", nargs="+", default=None, metavar="PATH", help=".txt / .jsonl files or directories (default: the built-in demo corpus)")
    a("--num-zero-experts", type=int, default=None, metavar="Z", help="zero experts per layer (default E/2)")
    a("--target-zero-fraction", type=float, default=0.5, metavar="F", help="skip rate the balancing loss aims at, in (0,1) (default 0.5)")
    a("--stage1-steps", type=int, default=200, metavar="N", help="router-only optimizer steps (default 200)")
    a("--stage2-steps", type=int, default=100, metavar="M", help="router+expert optimizer steps (default 100)")
    a("--seq-len", type=int, default=128, metavar="L", help="tokens per training block (default 128)")
    a("--batch-size", type=int, default=8, metavar="B", help="blocks per micro-batch per process (default 8)")
    a("--grad-accum", type=int, default=1, metavar="A", help="micro-batches per optimizer step (default 1)")
    a("--lr", type=float, default=3e-3, help="peak learning rate of the router weights (default 3e-3)")
    a("--expert-lr", type=float, default=None, help="peak learning rate of expert weights in stage 2 (default lr/3)")
    # 0.3, not ZEDA's 0.1: with 0.1 the KL term pulls the skip rate ~0.05 below the target on
    # short runs (measured on the tiny test models); 0.3 lands within 0.02 and still lowers the KL.
    a("--balance-alpha", type=float, default=0.3, metavar="A", help="alpha of the group balancing loss (default 0.3)")
    a("--temperature", type=float, default=1.0, help="distillation temperature (default 1)")
    a("--teacher-cache", action="store_true", help="stage 2: cache the teacher's top-k log-probs on disk instead of holding a copy")
    a("--teacher-topk", type=int, default=64, help="tokens per position kept by --teacher-cache (default 64)")
    a("--device", choices=("auto", "cpu", "cuda"), default="auto")
    a("--dtype", choices=("auto", "float32", "bfloat16"), default="auto", help="compute dtype; auto = bf16 on GPU, fp32 on CPU (weights stay fp32)")
    a("--seed", type=int, default=0)
    a("--resume", action="store_true", help="continue an interrupted run from its work directory")
    a("--work-dir", default=None, help="checkpoints and metrics while training (default: .DST.zeda-work next to DST)")
    a("--keep-work-dir", action="store_true", help="keep the work directory after success")
    a("--eval-every", type=int, default=50, help="held-out evaluation every N steps (and at each stage end)")
    a("--save-every", type=int, default=50, help="checkpoint every N steps (and at each stage end)")
    a("--heldout-fraction", type=float, default=0.05, help="share of blocks held out for evaluation (default 0.05)")
    a("--max-heldout-blocks", type=int, default=128)
    a("--grad-clip", type=float, default=1.0)
    a("--grad-checkpointing", action="store_true", help="recompute activations in backward (less memory)")
    a("--no-plot", action="store_true", help="skip zeda_report.png")
    a("--quiet", action="store_true", help="no progress bars")
    return p


def check_args(args) -> None:
    """Everything checkable from the flags alone; fails before anything is loaded or written."""
    if not 0.0 < args.target_zero_fraction < 1.0:
        raise ZedaError(f"--target-zero-fraction must be strictly between 0 and 1, got {args.target_zero_fraction}")
    if args.num_zero_experts is not None and args.num_zero_experts < 1:
        raise ZedaError(f"--num-zero-experts must be >= 1, got {args.num_zero_experts}")
    for flag in ("stage1_steps", "stage2_steps"):
        if getattr(args, flag) < 0:
            raise ZedaError(f"--{flag.replace('_', '-')} must be >= 0")
    for flag in ("seq_len", "batch_size", "grad_accum", "eval_every", "save_every", "teacher_topk", "max_heldout_blocks"):
        if getattr(args, flag) < 1:
            raise ZedaError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    for flag in ("lr", "temperature"):
        if not getattr(args, flag) > 0:
            raise ZedaError(f"--{flag} must be > 0")
    if args.balance_alpha < 0:
        raise ZedaError("--balance-alpha must be >= 0")
    if not 0.0 < args.heldout_fraction < 1.0:
        raise ZedaError("--heldout-fraction must be strictly between 0 and 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ZedaError("--device cuda: no CUDA device is available")


def check_output(output: Path) -> None:
    from .checkpoint import check_new_output

    check_new_output(output)
    try:  # os.access says yes to root even on read-only file systems: really try
        probe = output.parent / f".{output.name}.probe-{os.getpid()}"
        probe.mkdir()
        probe.rmdir()
    except OSError as exc:
        raise ZedaError(f"output directory {output.parent} is not writable ({exc.strerror})") from None


# ---------------------------------------------------------------- distributed (torchrun) ----


class Dist:
    """torchrun's environment, or a single process. DDP does the work; this only holds ranks."""

    def __init__(self, device_flag: str):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", "0"))
        use_cuda = device_flag == "cuda" or (device_flag == "auto" and torch.cuda.is_available())
        self.device = torch.device(f"cuda:{local}" if use_cuda else "cpu")
        if use_cuda:
            torch.cuda.set_device(self.device)
        if self.world > 1 and not torch_dist.is_initialized():
            torch_dist.init_process_group("nccl" if use_cuda else "gloo")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            torch_dist.barrier()

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            torch_dist.all_reduce(t)
        return t

    def close(self) -> None:
        if self.world > 1 and torch_dist.is_initialized():
            torch_dist.destroy_process_group()


# ---------------------------------------------------------------------- model plumbing ----


class RouterTap:
    """Forward hooks that keep each router's logits (with grad) and chosen ids for the balance loss."""

    def __init__(self, routers):
        self.logits: list[torch.Tensor] = []
        self.ids: list[torch.Tensor] = []
        self.on = False
        for r in routers:
            r.register_forward_hook(self._hook)

    def _hook(self, module, inputs, output):
        if self.on:
            self.logits.append(output[0])
            self.ids.append(module.last_routing.ids)

    @contextlib.contextmanager
    def capture(self):
        self.logits, self.ids, self.on = [], [], True
        try:
            yield self
        finally:
            self.on = False


@contextlib.contextmanager
def original_model(model, original_rows: list[torch.Tensor]):
    """The model as it was before conversion: masked mode with the original router rows.

    Stage 1 trains the real rows too, so masked mode alone would drift from the original; the
    saved rows are tiny ([E, H] per layer), the rest of the network is unchanged in stage 1.
    """
    routers = model.zeda_routers
    live = [r.weight.data for r in routers]
    model.zeda_set_mode(masked=True)
    for r, rows in zip(routers, original_rows):
        r.weight.data = rows
    try:
        yield model
    finally:
        for r, w in zip(routers, live):
            r.weight.data = w
        model.zeda_set_mode(masked=False)


def moe_blocks(model):
    """The modules that own a Zeda router (router + experts + shared experts of one layer)."""
    routers = set(map(id, model.zeda_routers))
    return [m for m in model.modules() if id(getattr(m, "gate", None)) in routers]


def fingerprints(model, names: set[str]) -> dict[str, torch.Tensor]:
    """Exact float64 checksums of the named parameters: proof that frozen weights stayed put."""
    return {n: torch.stack([p.double().sum(), p.double().square().sum()]).cpu() for n, p in model.named_parameters() if n in names}


def assert_unchanged(before: dict, after: dict, what: str) -> None:
    changed = [n for n in before if not torch.equal(before[n], after[n])]
    assert not changed, f"{what}: parameters that must stay frozen changed: {changed[:5]}"


def lr_factor(step: int, total: int) -> float:
    """Linear warm-up over 5% of the steps, then cosine decay to 10% of the peak."""
    warm = max(1, total // 20)
    if step < warm:
        return (step + 1) / warm
    progress = (step - warm) / max(1, total - warm)
    return 0.1 + 0.45 * (1.0 + math.cos(math.pi * progress))


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


def save_state(path: Path, state: dict) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)  # a kill mid-write leaves the previous checkpoint intact


# Flags that must not change across --resume (they decide the data order and the math).
RUN_KEYS = ("model", "data", "num_zero_experts", "target_zero_fraction", "stage1_steps", "stage2_steps", "seq_len",
            "batch_size", "grad_accum", "lr", "expert_lr", "balance_alpha", "temperature", "teacher_cache",
            "teacher_topk", "seed", "heldout_fraction", "max_heldout_blocks", "grad_clip", "dtype")


def distill_kl(teacher, student_logits, temperature):
    from .distill import kl_teacher_student, kl_topk

    if isinstance(teacher, tuple):  # (top-k log-probs, ids) from the cache
        return kl_topk(teacher[0], teacher[1], student_logits, temperature)
    return kl_teacher_student(teacher, student_logits, temperature)


@torch.no_grad()
def evaluate(model, teacher_fn, heldout: torch.Tensor, batch_size: int, dist: Dist, autocast, temperature: float) -> dict:
    """Held-out KL to the teacher and zero-slot fractions (the HF router's own counters), all ranks."""
    n_layers = len(model.zeda_routers)
    acc = torch.zeros(2 + 2 * n_layers, dtype=torch.float64)  # kl*tokens, tokens, zero[L], total[L]
    model.eval()
    mine = torch.arange(dist.rank, heldout.shape[0], dist.world)
    for chunk in mine.split(batch_size):
        x = heldout[chunk].to(dist.device)
        with autocast():
            teacher = teacher_fn(x, ("heldout", chunk))
        model.zeda_stats(reset=True)
        with autocast():
            logits = model(input_ids=x).logits
        stats = model.zeda_stats(reset=True)
        acc[0] += distill_kl(teacher, logits, temperature).item() * x.numel()
        acc[1] += x.numel()
        for i, layer in enumerate(stats["layers"]):
            acc[2 + i] += layer["zero_slots"]
            acc[2 + n_layers + i] += layer["total_slots"]
    acc = dist.sum(acc.to(dist.device)).cpu()
    zero, total = acc[2 : 2 + n_layers], acc[2 + n_layers :]
    layers = [{"layer": r.layer_idx, "zero_fraction": float(z / t)} for r, z, t in zip(model.zeda_routers, zero, total)]
    return {"teacher_kl": float(acc[0] / acc[1]), "zero_fraction": float(zero.sum() / total.sum()), "layers": layers}


def build_teacher_cache(path: Path, model, original_rows, blocks, keys: torch.Tensor, k: int, args, dist: Dist, autocast) -> None:
    """Each rank writes the top-k log-probs of its share of `keys` (block ids) to its own file."""
    from .distill import teacher_topk

    mine = keys[dist.rank :: dist.world]
    logps, ids = [], []
    model.eval()
    with torch.no_grad(), original_model(model, original_rows):
        for chunk in mine.split(args.batch_size):
            with autocast():
                logits = model(input_ids=blocks(chunk).to(dist.device)).logits
            lp, ix = teacher_topk(logits, k, args.temperature)
            logps.append(lp.cpu())
            ids.append(ix.to(torch.int32).cpu())
    part = path.with_name(f"{path.name}.rank{dist.rank}")
    save_state(part, {"keys": mine, "logp": torch.cat(logps), "ids": torch.cat(ids)})


def load_teacher_cache(path: Path, world: int) -> tuple[dict[int, int], torch.Tensor, torch.Tensor]:
    parts = [torch.load(path.with_name(f"{path.name}.rank{r}"), mmap=True) for r in range(world)]
    keys = torch.cat([p["keys"] for p in parts])
    row = {int(k): i for i, k in enumerate(keys)}
    return row, torch.cat([p["logp"] for p in parts]), torch.cat([p["ids"] for p in parts])


# --------------------------------------------------------------------------- the run ----


def train(args, dist: Dist) -> dict | None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import vllm_zeda  # noqa: F401  (registers the Zeda classes with the Auto* factories)

    from .checkpoint import atomic_output_dir, load_config
    from .data import batch_indices, load_blocks
    from .distill import balance_loss, zero_fractions
    from .inject import convert_checkpoint, describe_source
    from .report import METRICS, PLOT, plot, read_metrics, throughput, write_report
    from .routing import balance_weight

    # ---- validate everything before the first write
    check_args(args)
    src, output = Path(args.model), Path(args.output)
    cfg = load_config(src)
    arch, spec = describe_source(cfg, args.num_zero_experts, args.target_zero_fraction)
    max_pos = cfg.get("max_position_embeddings")
    if isinstance(max_pos, int) and args.seq_len > max_pos:
        raise ZedaError(f"--seq-len {args.seq_len} is above the model's max_position_embeddings ({max_pos})")
    check_output(output)
    if args.stage1_steps == 0 and args.stage2_steps == 0:  # conversion only
        if dist.main:
            convert_checkpoint(src, output, spec.num_zero_experts, seed=args.seed,
                               target_zero_fraction=args.target_zero_fraction, progress=not args.quiet)
            print(f"wrote {output}: converted only ({spec.num_real_experts} real + {spec.num_zero_experts} zero experts, no training)")
        dist.barrier()
        return None
    try:
        tokenizer = AutoTokenizer.from_pretrained(src)
    except Exception as exc:  # transformers raises many types for a missing/broken tokenizer
        raise ZedaError(f"cannot load the tokenizer of {src} ({type(exc).__name__}: {exc})") from None
    data = load_blocks(args.data, tokenizer, args.seq_len, seed=args.seed,
                       heldout_fraction=args.heldout_fraction, max_heldout=args.max_heldout_blocks)
    work = Path(args.work_dir) if args.work_dir else output.parent / f".{output.name}.zeda-work"
    if work.exists() and not args.resume:
        raise ZedaError(f"work directory {work} exists (an interrupted run?): pass --resume to continue it, or remove it")
    if args.resume and not work.exists():
        raise ZedaError(f"--resume: no work directory {work} to resume from")
    run_config = {k: getattr(args, k) for k in RUN_KEYS} | {"world_size": dist.world}
    state = None
    if args.resume and (work / CKPT).is_file():
        state = torch.load(work / CKPT, weights_only=False)
        diff = [k for k in run_config if state["run_config"].get(k) != run_config[k]]
        if diff:
            raise ZedaError(f"--resume: {diff[0]} differs from the interrupted run ({state['run_config'].get(diff[0])!r} vs {run_config[diff[0]]!r})")

    # ---- precision and device
    device = dist.device
    use_bf16 = args.dtype == "bfloat16" or (args.dtype == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported())
    autocast = lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16)  # noqa: E731
    if dist.main:
        print(f"zeda-train: {arch.base_architecture}, E={spec.num_real_experts} Z={spec.num_zero_experts} "
              f"top-{spec.top_k}; {data.train.shape[0]} train / {data.heldout.shape[0]} held-out blocks of "
              f"{args.seq_len} tokens; {dist.world} process(es) on {device}, {'bf16' if use_bf16 else 'fp32'}", flush=True)

    # ---- inject (once; the work dir keeps it for --resume and for the stage-2 teacher)
    dist.barrier()  # every rank has checked the work dir before rank 0 creates it
    if dist.main:
        work.mkdir(parents=True, exist_ok=True)
    injected = work / INJECTED
    if dist.main and not injected.exists():
        convert_checkpoint(src, injected, spec.num_zero_experts, seed=args.seed,
                           target_zero_fraction=args.target_zero_fraction, progress=False)
    dist.barrier()
    model = AutoModelForCausalLM.from_pretrained(injected, dtype=torch.float32).to(device)  # fp32 master weights
    save_dtype = _checkpoint_dtype(cfg)
    model.zeda_set_mode(masked=False, zero_bias=0.0)
    if args.grad_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    for p in model.parameters():
        p.requires_grad_(False)
    routers = model.zeda_routers
    original_rows = [r.weight.detach().clone() for r in routers]
    names = {p: n for n, p in model.named_parameters()}
    router_names = {names[r.weight] for r in routers}
    moe_names = {names[p] for m in moe_blocks(model) for p in m.parameters()}
    frozen_in = {1: set(names.values()) - router_names, 2: set(names.values()) - moe_names}
    tap = RouterTap(routers)
    e, z, k_slots = spec.num_real_experts, spec.num_zero_experts, spec.top_k
    w = balance_weight(args.target_zero_fraction, e, z)
    expert_lr = args.expert_lr if args.expert_lr is not None else args.lr / 3

    # ---- where we are: fresh, or from the checkpoint
    stage, step, evals = 1, 0, {}
    if state is not None:
        params = dict(model.named_parameters())
        for n, t in state["trained"].items():
            params[n].data.copy_(t)
        stage, step, evals = state["stage"], state["step"], state["evals"]
        set_rng_state(state["rng"])
        if dist.main:
            print(f"resuming at stage {stage}, step {step}", flush=True)
    else:
        torch.manual_seed(args.seed)
        random.seed(args.seed)
    metrics_path = work / METRICS
    if dist.main:  # drop records written after the checkpoint we resume from
        keep = [m for m in read_metrics(metrics_path) if state is not None and (m["stage"], m["step"]) <= (stage, step)]
        metrics_path.write_text("".join(json.dumps(m) + "\n" for m in keep))

    def log(record: dict) -> None:
        if dist.main:
            with metrics_path.open("a") as f:
                f.write(json.dumps(record) + "\n")

    def teacher_stage1(x, key):
        with torch.no_grad(), original_model(model, original_rows):
            return model(input_ids=x).logits

    steps_of = {1: args.stage1_steps, 2: args.stage2_steps}
    speed = {}  # stageN -> report.throughput(...)
    kill_at = os.environ.get(KILL_ENV)
    cache_path = work / "teacher_cache.pt"

    while stage <= 2:
        total = steps_of[stage]
        trainable = router_names if stage == 1 else moe_names
        params = [p for n, p in model.named_parameters() if n in trainable]
        for p in params:
            p.requires_grad_(True)
        frozen_before = fingerprints(model, frozen_in[stage])

        # ---- the teacher of this stage
        teacher_fn = teacher_stage1
        teacher_model = None
        if stage == 2 and total > 0:
            if args.teacher_cache:
                keys_needed = torch.unique(torch.cat([
                    batch_indices(data.train.shape[0], 0, total * args.grad_accum * dist.world * args.batch_size, args.seed * 31 + 2),
                    data.train.shape[0] + torch.arange(data.heldout.shape[0]),
                ]))
                all_blocks = torch.cat([data.train, data.heldout])
                blocks_of = lambda ks: all_blocks[ks]  # noqa: E731
                if not all(cache_path.with_name(f"{cache_path.name}.rank{r}").is_file() for r in range(dist.world)):
                    if step > 0:
                        raise ZedaError(f"--resume: the teacher cache in {work} is gone and the experts have moved on; start again")
                    build_teacher_cache(cache_path, model, original_rows, blocks_of, keys_needed, args.teacher_topk, args, dist, autocast)
                    dist.barrier()
                row, cache_lp, cache_ids = load_teacher_cache(cache_path, dist.world)

                def teacher_fn(x, key):
                    ks = key[1] + data.train.shape[0] if key[0] == "heldout" else key[1]
                    rows = torch.tensor([row[int(k)] for k in ks])
                    return cache_lp[rows].to(x.device), cache_ids[rows].to(x.device)
            else:
                teacher_model = AutoModelForCausalLM.from_pretrained(injected, dtype=torch.bfloat16 if use_bf16 else torch.float32).to(device).eval()
                teacher_model.zeda_set_mode(masked=True)
                teacher_model.requires_grad_(False)

                def teacher_fn(x, key):
                    with torch.no_grad():
                        return teacher_model(input_ids=x).logits

        # ---- optimizer (routers at --lr; experts at --expert-lr), restored on resume
        groups = [{"params": [p for n, p in model.named_parameters() if n in router_names], "lr": args.lr, "base_lr": args.lr}]
        if stage == 2:
            groups.append({"params": [p for n, p in model.named_parameters() if n in moe_names - router_names], "lr": expert_lr, "base_lr": expert_lr})
        opt = torch.optim.AdamW(groups, betas=(0.9, 0.95), weight_decay=0.0)
        if state is not None and state.get("optimizer") is not None and state["stage"] == stage:
            opt.load_state_dict(state["optimizer"])
        ddp = DDP(model, find_unused_parameters=stage == 2) if dist.world > 1 else model

        if stage == 1 and step == 0 and "after_injection" not in evals:
            evals["after_injection"] = evaluate(model, teacher_fn, data.heldout, args.batch_size, dist, autocast, args.temperature)
            log({"event": "eval", "stage": 1, "step": 0, **evals["after_injection"]})

        def checkpoint(stage_now: int, step_now: int, optimizer_state) -> None:
            if dist.main:
                trained = router_names if stage_now == 1 else moe_names
                save_state(work / CKPT, {
                    "stage": stage_now, "step": step_now, "evals": evals, "run_config": run_config, "rng": rng_state(),
                    "trained": {n: p.detach().cpu().clone() for n, p in model.named_parameters() if n in trained},
                    "optimizer": optimizer_state,
                })
            dist.barrier()

        bar = None
        if dist.main and not args.quiet and total > step:
            from tqdm import tqdm

            bar = tqdm(total=total, initial=step, desc=f"stage {stage} ({'routers' if stage == 1 else 'routers+experts'})", unit="step")
        data_seed = args.seed * 31 + stage
        step_seconds = []  # this process's steps of this stage (not those before a --resume)
        while step < total:
            t_step = time.perf_counter()
            for group in opt.param_groups:
                group["lr"] = group["base_lr"] * lr_factor(step, total)
            sums = torch.zeros(3 + len(routers), dtype=torch.float64)  # loss, kl, balance, zero[L]
            model.train()  # no dropout in these configs; lets --grad-checkpointing act
            for micro in range(args.grad_accum):
                # sample position of this rank in the seeded stream: pure in (step, micro, rank)
                pos = ((step * args.grad_accum + micro) * dist.world + dist.rank) * args.batch_size
                idx = batch_indices(data.train.shape[0], pos, args.batch_size, data_seed)
                x = data.train[idx].to(device)
                with autocast():
                    teacher = teacher_fn(x, ("train", idx))
                last = micro == args.grad_accum - 1
                sync = contextlib.nullcontext() if (last or ddp is model) else ddp.no_sync()
                with sync:
                    with autocast(), tap.capture():
                        logits = ddp(input_ids=x).logits
                    f_z = zero_fractions(tap.ids, e)
                    if dist.world > 1:  # f is a count statistic: use the all-rank value (exact DDP)
                        f_z = dist.sum(f_z.clone()) / dist.world
                    kl = distill_kl(teacher, logits, args.temperature)
                    bal = balance_loss(tap.logits, tap.ids, num_real=e, num_zero=z, top_k=k_slots, w=w,
                                       alpha=args.balance_alpha, layer_zero_fractions=f_z)
                    loss = kl + bal
                    (loss / args.grad_accum).backward()
                sums += torch.cat([torch.stack([loss.detach(), kl.detach(), bal.detach()]).double().cpu(), f_z.double().cpu()])
            if args.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, args.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            sums = dist.sum(sums.to(device)).cpu() / (args.grad_accum * dist.world)  # .cpu() waits for the GPU
            step_seconds.append(time.perf_counter() - t_step)
            record = {"event": "train", "stage": stage, "step": step, "loss": float(sums[0]), "kl": float(sums[1]),
                      "balance": float(sums[2]), "zero_fraction": float(sums[3:].mean()),
                      "layers": [{"layer": r.layer_idx, "zero_fraction": float(v)} for r, v in zip(routers, sums[3:])],
                      "lr": opt.param_groups[0]["lr"], "step_seconds": round(step_seconds[-1], 4), "time": time.time()}
            log(record)
            if bar is not None:
                bar.set_postfix(loss=f"{record['loss']:.4f}", kl=f"{record['kl']:.4f}", zero=f"{record['zero_fraction']:.3f}")
                bar.update(1)
            if step % args.eval_every == 0 or step == total:
                ev = evaluate(model, teacher_fn, data.heldout, args.batch_size, dist, autocast, args.temperature)
                log({"event": "eval", "stage": stage, "step": step, **ev})
                if step == total:
                    evals[f"after_stage{stage}"] = ev
                if bar is not None:
                    bar.write(f"stage {stage} step {step}: held-out KL {ev['teacher_kl']:.5f}, zero fraction {ev['zero_fraction']:.3f}")
            if step % args.save_every == 0 and step < total:
                checkpoint(stage, step, opt.state_dict())
            if kill_at == f"{stage}:{step}":
                os._exit(137)
        if bar is not None:
            bar.close()
        if step_seconds:
            speed[f"stage{stage}"] = throughput(step_seconds, args.batch_size * args.seq_len * args.grad_accum * dist.world, dist.world)
        if total == 0:
            evals.setdefault(f"after_stage{stage}", evals.get("after_stage1") or evals["after_injection"])

        # ---- end of stage: frozen weights really stayed frozen; next stage starts from here
        assert_unchanged(frozen_before, fingerprints(model, frozen_in[stage]), f"stage {stage}")
        for p in params:
            p.requires_grad_(False)
            p.grad = None
        del ddp, opt, teacher_model
        stage, step, state = stage + 1, 0, None
        checkpoint(stage, 0, None)

    # ---- write the ZEDA checkpoint, the report and the plot (atomically)
    final = evals["after_stage2"]
    report = {
        "zero_fraction": final["zero_fraction"],
        "layers": final["layers"],
        "teacher_kl": final["teacher_kl"],
        "target_zero_fraction": args.target_zero_fraction,
        "stage1_steps": args.stage1_steps,
        "stage2_steps": args.stage2_steps,
        "after_injection": evals["after_injection"],
        "after_stage1": evals["after_stage1"],
        "after_stage2": final,
        "num_real_experts": e, "num_zero_experts": z, "top_k": k_slots,
        "base_architecture": arch.base_architecture,
        "source_model": str(src),
        "data": list(data.sources), "seq_len": args.seq_len, "heldout_blocks": int(data.heldout.shape[0]),
        "train_blocks": int(data.train.shape[0]), "seed": args.seed, "world_size": dist.world,
        "device": device.type, "compute_dtype": "bfloat16" if use_bf16 else "float32",
        "throughput": speed,
        "balance_alpha": args.balance_alpha, "balance_w": w, "temperature": args.temperature,
        "note": "zero_fraction / teacher_kl: held-out blocks, dynamic routing, zero_bias 0; teacher = the original model",
    }
    if dist.main:
        with atomic_output_dir(output) as tmp:
            model.to(save_dtype).save_pretrained(tmp)
            for f in injected.iterdir():  # tokenizer, generation config, chat template...
                if f.is_file() and f.suffix not in (".safetensors", ".bin") and f.name not in ("config.json", "model.safetensors.index.json") and not (tmp / f.name).exists():
                    shutil.copy2(f, tmp / f.name)
            _check_written_config(tmp, spec)
            write_report(tmp, report)
            shutil.copy2(metrics_path, tmp / METRICS)
            if not args.no_plot:
                plot(tmp / PLOT, report, read_metrics(metrics_path))
        if not args.keep_work_dir:
            shutil.rmtree(work, ignore_errors=True)
        a, s1, s2 = evals["after_injection"], evals["after_stage1"], final
        print(f"wrote {output}\n  held-out zero fraction {a['zero_fraction']:.3f} -> {s1['zero_fraction']:.3f} -> {s2['zero_fraction']:.3f}"
              f" (target {args.target_zero_fraction})\n  KL to the original   {a['teacher_kl']:.5f} -> {s1['teacher_kl']:.5f} -> {s2['teacher_kl']:.5f}"
              f"   (after injection -> stage 1 -> stage 2)", flush=True)
        for name, sp in speed.items():
            if sp["tokens_per_s"] is not None:
                print(f"  {name}: {sp['tokens_per_s']:,.0f} training tok/s ({sp['tokens_per_s_per_process']:,.0f} per process,"
                      f" {sp['steps_timed']} steps timed)", flush=True)
    dist.barrier()
    return report


def _checkpoint_dtype(cfg: dict) -> torch.dtype:
    name = cfg.get("dtype") or cfg.get("torch_dtype") or "float32"
    return getattr(torch, str(name).replace("torch.", ""), torch.float32)


def _check_written_config(out: Path, spec) -> None:
    from .spec import read_spec

    cfg = json.loads((out / "config.json").read_text())
    written = read_spec(cfg)
    if written is None or written.num_zero_experts != spec.num_zero_experts:
        raise ZedaError("internal: save_pretrained wrote a config without the zeda block")


@cli_entry
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    check_args(args)
    dist = Dist(args.device)
    try:
        train(args, dist)
    finally:
        dist.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
