"""The trainer's run, top to bottom, in the steps a reader follows: `prepare` (check everything,
load the data) -> `load_student` (inject, load, freeze) -> `run_stage(1)` (routers) ->
`run_stage(2)` (routers + MoE blocks) -> `write_output`.

  inject   Z zero-expert rows in every router, while loading the source (train/converted.py):
           no converted copy on disk
  stage 1  router weights only; teacher = the same network in masked mode with the original
           router rows, under no_grad (no second copy of the model)
  stage 2  routers + MoE blocks (experts, shared experts); attention, embeddings, norms frozen;
           teacher = a frozen copy, or its top-k log-probs cached on disk (--teacher-cache);
           --on-policy: on the student's own continuations of the data's prompts, reverse KL
           (train/onpolicy.py)
  write    DST = ZEDA checkpoint (save_pretrained) + zeda_report.json + zeda_report.png

Loss = KL(teacher || student) on next-token distributions + the group balancing loss with w from
--target-zero-fraction. Resuming (--resume) is exact: the batch at every step is a pure function
of (seed, stage, step), and the checkpoint holds the trained tensors, the optimizer and the RNG
states. Under torchrun each process trains --batch-size blocks a step, the model sharded over the
processes with FSDP2 (fully_shard) and the state saved with torch.distributed.checkpoint.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import ZedaError
from ..routing import balance_weight
from . import state as run_state
from . import teacher as teachers
from .distributed import Dist, local

KILL_ENV = "ZEDA_TRAIN_KILL_AT"  # test hook: "STAGE:STEP" -> os._exit(137) after that step (a kill -9)


# ---------------------------------------------------------------------- model plumbing ----


class RouterTap:
    """Forward hooks that keep each router's logits (with grad) and chosen ids for the balance loss,
    from capture() until take(): holding them longer would keep a step's router logits in memory
    through the next evaluation and, under FSDP2, tie the model into a reference cycle through
    the autograd graph (the tensors' backward hooks hold FSDP's state) that no garbage collection
    frees, so the process group would outlive destroy_process_group."""

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

    def take(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """What the last capture() kept, (logits, ids) per router; the tap lets go of them."""
        taken = self.logits, self.ids
        self.logits, self.ids = [], []
        return taken


def enable_grad_checkpointing(model, layers: int | None) -> int:
    """Activation checkpointing in the first `layers` decoder layers (None: all): they recompute
    their forward in the backward, the others keep their activations. How many recompute."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    decoder = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    for layer in decoder[layers:] if layers is not None else []:
        layer.gradient_checkpointing = False
    return sum(layer.gradient_checkpointing for layer in decoder)


def moe_blocks(model):
    """The modules that own a Zeda router (router + experts + shared experts of one layer)."""
    routers = set(map(id, model.zeda_routers))
    return [m for m in model.modules() if id(getattr(m, "gate", None)) in routers]


def fingerprints(model, names: set[str]) -> dict[str, torch.Tensor]:
    """Exact float64 checksums of the named parameters (this process's shards of them): proof
    that frozen weights stayed put."""
    return {n: torch.stack([local(p).double().sum(), local(p).double().square().sum()]).cpu()
            for n, p in model.named_parameters() if n in names}


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


# --------------------------------------------------------------------------- the run ----


@dataclass
class Run:
    """Everything a stage needs: the checked flags, the data, the student and what it trains."""

    args: object
    dist: Dist
    src: Path
    output: Path
    work: Path
    cfg: dict
    arch: object
    spec: object
    data: object
    config: dict  # state.run_config: what a --resume must match
    use_bf16: bool
    plot: bool  # write zeda_report.png (--no-plot or no matplotlib: not)
    evals: dict = field(default_factory=dict)  # held-out evaluations by name
    speed: dict = field(default_factory=dict)  # stageN -> report.throughput(...)
    # set by load_student
    model: object = None
    original_rows: list = field(default_factory=list)
    router_names: set = field(default_factory=set)
    moe_names: set = field(default_factory=set)
    frozen_in: dict = field(default_factory=dict)  # stage -> names that must not move in it
    tap: RouterTap | None = None
    fused: object = None  # fused.Fused when --compile
    # builds the converted model in a dtype instead of loading it from `src` (a benchmark's
    # random weights for a shape no disk holds); None: load_converted
    build_model: Callable[[torch.dtype], torch.nn.Module] | None = None

    @property
    def device(self) -> torch.device:
        return self.dist.device

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.use_bf16)

    @property
    def metrics_path(self) -> Path:
        from .report import METRICS

        return self.work / METRICS

    def log(self, record: dict) -> None:
        if self.dist.main:
            with self.metrics_path.open("a") as f:
                f.write(json.dumps(record) + "\n")

    def trained_names(self, stage: int) -> set[str]:
        return self.router_names if stage == 1 else self.moe_names

    def moved_names(self, stage: int, step: int) -> set[str]:
        """The tensors that differ from the source at (stage, step): the routers from the start,
        the MoE blocks once stage 2 has stepped (stage 3 = training done)."""
        experts_moved = (stage == 2 and step > 0) or (stage > 2 and self.args.stage2_steps > 0)
        return self.moe_names if experts_moved else self.router_names

    def master_dtype(self, stage: int, name: str) -> torch.dtype:
        """What a trained tensor is stored in while it trains: fp32, or bf16 for stage 2's MoE
        blocks with --expert-master bfloat16 (the routers are always fp32)."""
        from .optim import MASTER_DTYPES

        if stage == 2 and name not in self.router_names:
            return MASTER_DTYPES[self.args.expert_master]
        return torch.float32

    def checkpoint(self, stage: int, step: int, opt=None) -> None:
        """The resumable state: only the tensors that moved (in their master dtype), the
        optimizer (`opt`, a StageOptimizer, mid-stage), the RNG states and where the run stands.
        Under torchrun the tensors and the optimizer go to torch.distributed.checkpoint shards."""
        trained = self.moved_names(stage, step)
        meta = {"stage": stage, "step": step, "evals": self.evals, "run_config": self.config,
                "rng": run_state.rng_state(), "has_optimizer": opt is not None}
        if self.dist.sharded:
            run_state.save_sharded(self.work, meta, self.model, trained, opt.optimizers if opt else None, self.dist)
        elif self.dist.main:
            run_state.save_state(self.work / run_state.CKPT, {
                **meta, "trained": {n: p.detach().cpu().clone() for n, p in self.model.named_parameters() if n in trained},
                "optimizer": opt.state_dict() if opt else None,
            })
        self.dist.barrier()


def train(args, dist: Dist) -> dict | None:
    """The whole job; returns the report (None for a conversion-only run)."""
    run = prepare(args, dist)
    if run is None:
        return None
    state = run_state.load_for_resume(run.work, run.config) if args.resume else None
    load_student(run)
    stage, step = resume_point(run, state)
    while stage <= 2:
        run_stage(run, stage, step, state)
        stage, step, state = stage + 1, 0, None
        run.checkpoint(stage, 0, None)
    return write_output(run)


def work_dir(args) -> Path:
    """Checkpoints and metrics while training: --work-dir, or .DST.zeda-work next to DST."""
    output = Path(args.output)
    return Path(args.work_dir) if args.work_dir else output.parent / f".{output.name}.zeda-work"


def check_output(output: Path) -> None:
    from ..convert.checkpoint import check_new_output

    check_new_output(output)
    try:  # os.access says yes to root even on read-only file systems: really try
        probe = output.parent / f".{output.name}.probe-{os.getpid()}"
        probe.mkdir()
        probe.rmdir()
    except OSError as exc:
        raise ZedaError(f"output directory {output.parent} is not writable ({exc.strerror})") from None


def prepare(args, dist: Dist) -> Run | None:
    """Validate everything before the first write, load the data; a run with no training steps
    is a bare conversion, done here."""
    from transformers import AutoTokenizer

    from ..convert.checkpoint import load_config, quantization, shard_files
    from ..convert.inject import convert_checkpoint, describe_source
    from . import disk
    from .data import load_blocks

    src, output = Path(args.model), Path(args.output)
    cfg = load_config(src)
    arch, spec = describe_source(cfg, args.num_zero_experts, args.target_zero_fraction)
    quant = quantization(cfg)
    if quant and (args.stage1_steps or args.stage2_steps):
        raise ZedaError(f"{src} is quantized ({quant}): the trainer adapts unquantized weights; train the bf16 source, "
                        "then serve the output quantized (vllm serve --quantization fp8), or inject without training "
                        "(--stage1-steps 0 --stage2-steps 0)")
    max_pos = cfg.get("max_position_embeddings")
    if isinstance(max_pos, int) and args.seq_len > max_pos:
        raise ZedaError(f"--seq-len {args.seq_len} is above the model's max_position_embeddings ({max_pos})")
    check_output(output)
    sizes = disk.tensor_sizes(src, shard_files(src)[0])
    work = work_dir(args)
    if args.stage1_steps == 0 and args.stage2_steps == 0:  # conversion only
        converted = disk.plan(sizes, spec.num_real_experts, spec.num_zero_experts, stage2=False, cache_entries=0)
        disk.check_free_space(disk.DiskPlan(converted.output, 0, 0), output, work, resuming=False)
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
    if work.exists() and not args.resume:
        raise ZedaError(f"work directory {work} exists (an interrupted run?): pass --resume to continue it, or remove it")
    if args.resume and not work.exists():
        raise ZedaError(f"--resume: no work directory {work} to resume from")
    cache_entries = 0
    if args.teacher_cache and args.stage2_steps > 0:  # every block stage 2 reads, and the held-out ones
        samples = args.stage2_steps * args.grad_accum * dist.world * args.batch_size
        blocks = min(data.train.shape[0], samples) + data.heldout.shape[0]
        cache_entries = blocks * args.seq_len * min(args.teacher_topk, int(cfg.get("vocab_size") or args.teacher_topk))
    disk_plan = disk.plan(sizes, spec.num_real_experts, spec.num_zero_experts, stage2=args.stage2_steps > 0,
                          cache_entries=cache_entries, expert_optimizer=args.expert_optimizer,
                          expert_master=args.expert_master, saves_mid_stage2=args.save_every < args.stage2_steps)
    if args.on_policy and args.rollout_engine == "vllm" and args.stage2_steps > 0:  # the student exported each round
        import dataclasses

        disk_plan = dataclasses.replace(disk_plan, state=disk_plan.state + disk_plan.output)
    disk.check_free_space(disk_plan, output, work, resuming=args.resume)
    device = dist.device
    use_bf16 = args.dtype == "bfloat16" or (args.dtype == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported())
    if args.expert_master == "bfloat16" and not use_bf16 and args.stage2_steps > 0:
        raise ZedaError("--expert-master bfloat16 needs bf16 compute: pass --dtype bfloat16 (auto is bf16 on GPUs only)")
    from .report import plotting_available

    plot = not args.no_plot and plotting_available()
    if dist.main and not args.no_plot and not plot:
        print("warning: matplotlib is not installed: the report is written without zeda_report.png "
              "(pip install matplotlib, or pass --no-plot)", file=sys.stderr, flush=True)
    if dist.main:
        print(f"zeda-train: {arch.base_architecture}, E={spec.num_real_experts} Z={spec.num_zero_experts} "
              f"top-{spec.top_k}; {data.train.shape[0]} train / {data.heldout.shape[0]} held-out blocks of "
              f"{args.seq_len} tokens; {dist.world} process(es) on {device}, {'bf16' if use_bf16 else 'fp32'}; "
              f"writes about {disk_plan.output / 2**30:.2f} GB of output and up to {disk_plan.work / 2**30:.2f} GB "
              f"in {work}", flush=True)
    return Run(args=args, dist=dist, src=src, output=output, work=work, cfg=cfg, arch=arch, spec=spec, data=data,
               config=run_state.run_config(args, dist.world), use_bf16=use_bf16, plot=plot)


def load_converted_model(run: Run, dtype: torch.dtype, to_device: bool = True) -> torch.nn.Module:
    """The converted model (injected while loading, seeded), on this process's device or in host
    memory (rank 0's copy that FSDP2 scatters into the shards)."""
    from .converted import load_converted

    if run.build_model is not None:
        return run.build_model(dtype)
    model = load_converted(run.src, run.cfg, run.arch, run.spec, seed=run.args.seed, dtype=dtype)
    return model.to(run.device) if to_device else model


def load_student(run: Run) -> None:
    """Create the work dir, load the converted model with fp32 master weights, freeze
    everything, and note what each stage trains."""
    args, dist = run.args, run.dist
    dist.barrier()  # every rank has checked the work dir before rank 0 creates it
    if dist.main:
        run.work.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    # bf16 compute: frozen weights in the checkpoint's dtype, trained ones fp32 (run_stage); fp32: all fp32
    dtype = _checkpoint_dtype(run.cfg) if run.use_bf16 else torch.float32
    source = None
    if dist.sharded:  # rank 0 loads the only full copy (host memory); every process shards an empty model
        from .converted import empty_converted

        source = load_converted_model(run, dtype, to_device=False) if dist.main else None
        model = empty_converted(run.cfg, run.arch, run.spec, dtype=dtype)
    else:
        model = load_converted_model(run, dtype)
    model.zeda_set_mode(masked=False, zero_bias=0.0)
    if args.grad_checkpointing:
        enable_grad_checkpointing(model, args.grad_checkpointing_layers)
    for p in model.parameters():
        p.requires_grad_(False)
    routers = model.zeda_routers
    names = {p: n for n, p in model.named_parameters()}
    run.model = model
    run.router_names = {names[r.weight] for r in routers}
    run.moe_names = {names[p] for m in moe_blocks(model) for p in m.parameters()}
    if dist.sharded:  # FSDP2 keeps each weight's dtype from here on: trained ones get their master dtype now
        last_stage = 2 if args.stage2_steps > 0 else 1
        for p, n in names.items():
            if n in run.trained_names(last_stage):
                p.data = p.data.to(run.master_dtype(last_stage, n))
        dist.shard(model, torch.bfloat16 if run.use_bf16 else None)
        dist.fill_from_rank0(model, source)
        del source
        run.original_rows = [r.weight.full_tensor().to(dtype) for r in routers]
    else:
        run.original_rows = [r.weight.detach().clone() for r in routers]
    run.frozen_in = {1: set(names.values()) - run.router_names, 2: set(names.values()) - run.moe_names}
    run.tap = RouterTap(routers)
    if args.compile:
        from .fused import Fused

        run.fused = Fused()
        run.fused.install(model)


def resume_point(run: Run, state: dict | None) -> tuple[int, int]:
    """(stage, step) to start from: fresh, or the checkpoint's (its tensors, evaluations and RNG
    restored); the metrics file is cut back to that point."""
    from .report import read_metrics

    stage, step = 1, 0
    if state is not None:
        stage, step, run.evals = state["stage"], state["step"], state["evals"]
        if "sharded" in state:
            run_state.load_sharded(run.work / state["sharded"], run.model, run.moved_names(stage, step))
        else:
            params = dict(run.model.named_parameters())
            for n, t in state["trained"].items():  # in their master dtype, whatever the frozen weights'
                params[n].data = t.to(run.device)
        run_state.set_rng_state(state["rng"])
        if run.dist.main:
            print(f"resuming at stage {stage}, step {step}", flush=True)
    else:
        torch.manual_seed(run.args.seed)
        random.seed(run.args.seed)
    if run.dist.main:  # drop records written after the checkpoint we resume from
        keep = [m for m in read_metrics(run.metrics_path) if state is not None and (m["stage"], m["step"]) <= (stage, step)]
        run.metrics_path.write_text("".join(json.dumps(m) + "\n" for m in keep))
    return stage, step


def stage_teacher(run: Run, stage: int, step: int):
    """(teacher function, the model behind it to free after the stage or None)."""
    args, dist, data = run.args, run.dist, run.data
    total = args.stage1_steps if stage == 1 else args.stage2_steps
    if stage == 1 or total == 0:
        return teachers.masked_teacher(run.model, run.original_rows), None
    if not args.teacher_cache:
        copy = load_converted_model(run, torch.bfloat16 if run.use_bf16 else torch.float32)
        return teachers.frozen_copy_teacher(copy)
    from .data import batch_indices, stage_seed

    path = run.work / teachers.CACHE
    if not teachers.cache_complete(path, dist.world):
        if step > 0:
            raise ZedaError(f"--resume: the teacher cache in {run.work} is gone and the experts have moved on; start again")
        samples = total * args.grad_accum * dist.world * args.batch_size
        keys = torch.unique(torch.cat([
            batch_indices(data.train.shape[0], 0, samples, stage_seed(args.seed, 2)),
            data.train.shape[0] + torch.arange(data.heldout.shape[0]),
        ]))
        all_blocks = torch.cat([data.train, data.heldout])
        teachers.build_teacher_cache(path, run.model, run.original_rows, lambda ks: all_blocks[ks], keys,
                                     args.teacher_topk, args, dist, run.autocast)
        dist.barrier()
    return teachers.cached_teacher(path, dist.world, data.train.shape[0]), None


DEFAULT_EXPERT_LR = {"adamw": 1e-4, "adafactor": 1e-3}


def expert_learning_rate(args) -> float:
    """Stage 2's peak learning rate of the MoE blocks: --expert-lr, or the optimizer's default."""
    return args.expert_lr if args.expert_lr is not None else DEFAULT_EXPERT_LR[args.expert_optimizer]


def stage_optimizer(run: Run, stage: int, state: dict | None):
    """Routers at --lr (AdamW), in stage 2 the MoE blocks at --expert-lr (--expert-optimizer);
    after the backward or inside it (--optimizer-in-backward); restored on resume."""
    from .data import stage_seed
    from .optim import StageOptimizer

    args = run.args
    expert_lr = expert_learning_rate(args)
    named = list(run.model.named_parameters())
    groups = [{"params": [p for n, p in named if n in run.router_names], "lr": args.lr, "base_lr": args.lr,
               "optimizer": "adamw"}]
    if stage == 2:
        groups.append({"params": [p for n, p in named if n in run.moe_names - run.router_names],
                       "lr": expert_lr, "base_lr": expert_lr, "optimizer": args.expert_optimizer,
                       "master": args.expert_master})
    fused = {"adafactor_step": run.fused.bf16_adafactor_step} if run.fused else {}
    opt = StageOptimizer(groups, in_backward=args.optimizer_in_backward, grad_clip=args.grad_clip,
                         seed=stage_seed(args.seed, stage), **fused)
    if state is not None and state.get("has_optimizer") and state["stage"] == stage:
        if "sharded" in state:
            run_state.load_sharded(run.work / state["sharded"], run.model, set(), opt.optimizers)
        else:
            opt.load_state_dict(state["optimizer"])
    return opt


def run_stage(run: Run, stage: int, step: int, state: dict | None) -> None:
    """Train stage `stage` from `step` to its end: evaluations, metrics, checkpoints, and at the
    end the proof that the weights this stage must not touch did not move."""
    from .data import batch_indices, stage_seed, to_device
    from .losses import balance_loss, zero_fractions
    from .report import throughput

    args, dist, model, data, spec = run.args, run.dist, run.model, run.data, run.spec
    routers = model.zeda_routers
    e, z, k_slots = spec.num_real_experts, spec.num_zero_experts, spec.top_k
    w = balance_weight(args.target_zero_fraction, e, z)
    total = args.stage1_steps if stage == 1 else args.stage2_steps
    trainable = run.trained_names(stage)
    named = [(n, p) for n, p in model.named_parameters() if n in trainable]
    params = [p for _, p in named]
    for n, p in named:  # master weights for what this stage trains (fp32 optimizer state follows)
        master = run.master_dtype(stage, n)
        if p.dtype != master:
            p.data = p.data.to(master)
        p.requires_grad_(True)
    if run.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(run.device)
    dist.reshard(model)
    frozen_before = fingerprints(model, run.frozen_in[stage])
    teacher_fn, teacher_model = stage_teacher(run, stage, step)
    opt = stage_optimizer(run, stage, state)

    def evaluate_now() -> dict:
        return evaluate(model, teacher_fn, data.heldout, args.batch_size, dist, run.autocast, args.temperature, run.fused)

    if stage == 1 and step == 0 and "after_injection" not in run.evals:
        run.evals["after_injection"] = evaluate_now()
        run.log({"event": "eval", "stage": 1, "step": 0, **run.evals["after_injection"]})

    bar = None
    on_policy = stage == 2 and args.on_policy
    if dist.main and not args.quiet and total > step:
        from tqdm import tqdm

        bar = tqdm(total=total, initial=step, desc=f"stage {stage} ({'routers' if stage == 1 else 'routers+experts'})", unit="step")
    data_seed = stage_seed(args.seed, stage)

    def step_blocks(step: int, micro: int) -> torch.Tensor:
        """The training blocks of (step, micro) on this rank: a pure function of the seeded stream."""
        pos = ((step * args.grad_accum + micro) * dist.world + dist.rank) * args.batch_size
        return batch_indices(data.train.shape[0], pos, args.batch_size, data_seed)

    rollouts = None
    if on_policy:
        from .losses import reverse_kl_generated
        from .onpolicy import Rollouts, prompt_tokens

        rollouts = Rollouts(run, total, step_blocks, log=bar.write if bar is not None else print)
    kill_at = os.environ.get(KILL_ENV)
    step_seconds = []  # this process's steps of this stage (not those before a --resume)
    # A step's numbers are read one step late: the host queues step n+1 while the GPU still runs
    # step n (reading them at once would drain the queue every step). `pending`: (step, summed
    # numbers on the device, lr) of the step not yet read; `since`: when the last read returned.
    pending, since = None, time.perf_counter()

    def read_pending() -> None:
        nonlocal pending, since
        done, sums, lr = pending
        sums = sums.cpu() / (args.grad_accum * dist.world)  # .cpu() waits for the GPU
        now = time.perf_counter()
        step_seconds.append(now - since)
        pending, since = None, now
        record = {"event": "train", "stage": stage, "step": done, "loss": float(sums[0]), "kl": float(sums[1]),
                  "balance": float(sums[2]), "zero_fraction": float(sums[3:].mean()),
                  "layers": [{"layer": r.layer_idx, "zero_fraction": float(v)} for r, v in zip(routers, sums[3:])],
                  "lr": lr, "step_seconds": round(step_seconds[-1], 4), "time": time.time()}
        run.log(record)
        if bar is not None:
            bar.set_postfix(loss=f"{record['loss']:.4f}", kl=f"{record['kl']:.4f}", zero=f"{record['zero_fraction']:.3f}")
            bar.update(1)

    try:
        while step < total:
            for group in opt.param_groups:
                group["lr"] = group["base_lr"] * lr_factor(step, total)
            # loss, kl, balance, zero[L], summed on the device: read one step late (read_pending)
            sums = torch.zeros(3 + len(routers), dtype=torch.float64, device=run.device)
            model.train()  # no dropout in these configs; lets --grad-checkpointing act
            for micro in range(args.grad_accum):
                idx = step_blocks(step, micro)
                x = to_device(rollouts.batch(step, micro) if on_policy else data.train[idx], run.device)
                with run.autocast():
                    teacher = teacher_fn(x, ("train", idx))
                last = micro == args.grad_accum - 1
                opt.arm(last)  # --optimizer-in-backward: the hooks step in this backward
                if dist.sharded:  # reduce-scatter the gradients in the last micro-batch's backward only
                    model.set_requires_gradient_sync(last)
                with run.autocast(), run.tap.capture():
                    logits = model(input_ids=x, use_cache=False).logits
                router_logits, router_ids = run.tap.take()
                f_z = zero_fractions(router_ids, e)
                if dist.world > 1:  # f is a count statistic: use the all-rank value
                    f_z = dist.sum(f_z.clone()) / dist.world
                if on_policy:  # the student's own tokens: reverse KL over what it generated
                    kl = reverse_kl_generated(teacher, logits, prompt_tokens(args), args.temperature)
                else:
                    kl = teachers.distill_kl(teacher, logits, args.temperature, run.fused)
                bal = balance_loss(router_logits, router_ids, num_real=e, num_zero=z, top_k=k_slots, w=w,
                                   alpha=args.balance_alpha, layer_zero_fractions=f_z, scoring=run.arch.scoring)
                loss = kl + bal
                (loss / args.grad_accum).backward()
                sums += torch.cat([torch.stack([loss.detach(), kl.detach(), bal.detach()]).double(), f_z.detach().double()])
                # the outputs go now, not when the next micro-batch's teacher logits already exist
                del logits, teacher, router_logits, router_ids, loss, kl, bal
            opt.clip_and_step(params)
            step += 1
            if pending is not None:  # the step before, while this one runs
                read_pending()
            pending = (step, dist.sum(sums), opt.param_groups[0]["lr"])
            evaluating = step % args.eval_every == 0 or step == total
            saving = step % args.save_every == 0 and step < total
            killing = kill_at == f"{stage}:{step}"
            if not (evaluating or saving or killing):
                continue
            read_pending()  # this step's record before its evaluation, checkpoint or kill
            if evaluating:
                ev = evaluate_now()
                run.log({"event": "eval", "stage": stage, "step": step, **ev})
                if step == total:
                    run.evals[f"after_stage{stage}"] = ev
                if bar is not None:
                    bar.write(f"stage {stage} step {step}: held-out KL {ev['teacher_kl']:.5f}, zero fraction {ev['zero_fraction']:.3f}")
            if saving:
                run.checkpoint(stage, step, opt)
            if killing:
                os._exit(137)
            since = time.perf_counter()  # an evaluation or a checkpoint is no step's time
        if bar is not None:
            bar.close()
    except BaseException:  # the last finished step's record still goes to the metrics, if it can be read
        if pending is not None:
            with contextlib.suppress(Exception):
                read_pending()
        raise
    finally:  # also on an error: no optimizer hook or trainable flag outlives the stage
        opt.close()
        for p in params:
            p.requires_grad_(False)
            p.grad = None
    if step_seconds:
        tokens_per_step = args.batch_size * args.seq_len * args.grad_accum * dist.world
        run.speed[f"stage{stage}"] = throughput(step_seconds, tokens_per_step, dist.world)
        if rollouts is not None:  # inside the steps' times above
            run.speed[f"stage{stage}"]["rollout_seconds"] = round(rollouts.seconds, 2)
        if run.device.type == "cuda":
            run.speed[f"stage{stage}"]["peak_memory_gb"] = round(torch.cuda.max_memory_allocated(run.device) / 2**30, 2)
    if total == 0:
        run.evals.setdefault(f"after_stage{stage}", run.evals.get("after_stage1") or run.evals["after_injection"])
    dist.reshard(model)
    assert_unchanged(frozen_before, fingerprints(model, run.frozen_in[stage]), f"stage {stage}")
    del opt, teacher_model


@torch.no_grad()
def evaluate(model, teacher_fn, heldout: torch.Tensor, batch_size: int, dist: Dist, autocast, temperature: float,
             fused=None) -> dict:
    """Held-out KL to the teacher and zero-slot fractions (the HF router's own counters), all ranks."""
    n_layers = len(model.zeda_routers)
    acc = torch.zeros(2 + 2 * n_layers, dtype=torch.float64)  # kl*tokens, tokens, zero[L], total[L]
    model.eval()
    for chunk, real in dist.share(torch.arange(heldout.shape[0]), batch_size):
        x = heldout[chunk].to(dist.device)
        with autocast():
            teacher = teacher_fn(x, ("heldout", chunk))
        model.zeda_stats(reset=True)
        with autocast():
            logits = model(input_ids=x, use_cache=False).logits
        stats = model.zeda_stats(reset=True)
        if not real:
            continue
        acc[0] += teachers.distill_kl(teacher, logits, temperature, fused).item() * x.numel()
        acc[1] += x.numel()
        for i, layer in enumerate(stats["layers"]):
            acc[2 + i] += layer["zero_slots"]
            acc[2 + n_layers + i] += layer["total_slots"]
    acc = dist.sum(acc.to(dist.device)).cpu()
    zero, total = acc[2 : 2 + n_layers], acc[2 + n_layers :]
    layers = [{"layer": r.layer_idx, "zero_fraction": float(z / t)} for r, z, t in zip(model.zeda_routers, zero, total)]
    return {"teacher_kl": float(acc[0] / acc[1]), "zero_fraction": float(zero.sum() / total.sum()), "layers": layers}


def write_output(run: Run) -> dict:
    """The ZEDA checkpoint, its report and plot, written atomically; the work dir then goes."""
    from ..convert.checkpoint import atomic_output_dir
    from ..convert.inject import carry_unbuilt_layers, copy_side_files
    from .onpolicy import prompt_tokens
    from .report import METRICS, PLOT, plot, read_metrics, write_report

    args, dist, spec, evals = run.args, run.dist, run.spec, run.evals
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
        "num_real_experts": spec.num_real_experts, "num_zero_experts": spec.num_zero_experts, "top_k": spec.top_k,
        "base_architecture": run.arch.base_architecture,
        "source_model": str(run.src),
        "data": list(run.data.sources), "seq_len": args.seq_len, "heldout_blocks": int(run.data.heldout.shape[0]),
        "train_blocks": int(run.data.train.shape[0]), "seed": args.seed, "world_size": dist.world,
        "device": run.device.type, "compute_dtype": "bfloat16" if run.use_bf16 else "float32",
        "frozen_dtype": str(_checkpoint_dtype(run.cfg) if run.use_bf16 else torch.float32).removeprefix("torch."),
        "teacher": "top-k cache" if args.teacher_cache else "frozen copy", "grad_checkpointing": args.grad_checkpointing,
        "expert_optimizer": args.expert_optimizer, "expert_master": args.expert_master,
        "lr": args.lr, "expert_lr": expert_learning_rate(args),
        "optimizer_in_backward": args.optimizer_in_backward, "deterministic": args.deterministic,
        "throughput": run.speed,
        "balance_alpha": args.balance_alpha,
        "balance_w": balance_weight(args.target_zero_fraction, spec.num_real_experts, spec.num_zero_experts),
        "temperature": args.temperature,
        "stage2_data": ({"on_policy": True, "rollout_engine": args.rollout_engine, "rollout_every": args.rollout_every,
                         "rollout_prompt_tokens": prompt_tokens(args), "rollout_temperature": args.rollout_temperature,
                         "loss": "KL(student || teacher) over the generated tokens"}
                        if args.on_policy else {"on_policy": False, "loss": "KL(teacher || student) over the data's text"}),
        "note": "zero_fraction / teacher_kl: held-out blocks, dynamic routing, zero_bias 0; teacher = the original model",
    }
    dtype = _checkpoint_dtype(run.cfg)
    full = None
    if dist.sharded:  # gathered by every process, held by rank 0 (in host memory)
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(run.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        full = {n: t.to(dtype) for n, t in full.items()}
    if dist.main:
        with atomic_output_dir(run.output) as tmp:
            if full is not None:
                run.model.save_pretrained(tmp, state_dict=full)
            else:
                run.model.to(dtype).save_pretrained(tmp)
            carry_unbuilt_layers(run.src, tmp, run.cfg, spec, args.seed)  # e.g. an MTP layer
            copy_side_files(run.src, tmp, skip=set(os.listdir(tmp)))  # tokenizer, chat template, ...
            _check_written_config(tmp, spec)
            write_report(tmp, report)
            shutil.copy2(run.metrics_path, tmp / METRICS)
            if run.plot:
                plot(tmp / PLOT, report, read_metrics(run.metrics_path))
        if not args.keep_work_dir:
            shutil.rmtree(run.work, ignore_errors=True)
        a, s1, s2 = evals["after_injection"], evals["after_stage1"], final
        print(f"wrote {run.output}\n  held-out zero fraction {a['zero_fraction']:.3f} -> {s1['zero_fraction']:.3f} -> {s2['zero_fraction']:.3f}"
              f" (target {args.target_zero_fraction})\n  KL to the original   {a['teacher_kl']:.5f} -> {s1['teacher_kl']:.5f} -> {s2['teacher_kl']:.5f}"
              f"   (after injection -> stage 1 -> stage 2)", flush=True)
        for name, sp in run.speed.items():
            if sp["tokens_per_s"] is not None:
                print(f"  {name}: {sp['tokens_per_s']:,.0f} training tok/s ({sp['tokens_per_s_per_process']:,.0f} per process,"
                      f" {sp['steps_timed']} steps timed)", flush=True)
    dist.barrier()
    return report


def _checkpoint_dtype(cfg: dict) -> torch.dtype:
    name = cfg.get("dtype") or cfg.get("torch_dtype") or "float32"
    return getattr(torch, str(name).replace("torch.", ""), torch.float32)


def _check_written_config(out: Path, spec) -> None:
    from ..spec import read_spec

    cfg = json.loads((out / "config.json").read_text())
    written = read_spec(cfg)
    if written is None or written.num_zero_experts != spec.num_zero_experts:
        raise ZedaError("internal: save_pretrained wrote a config without the zeda block")
