"""`python -m vllm_zeda.train`: the flags, their checks, and the entry point."""
from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

from ..errors import Interrupted, ZedaError, cli_entry


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
    a("--expert-lr", type=float, default=None,
      help="peak learning rate of the MoE blocks in stage 2 (default 1e-4 with adamw, 1e-3 with adafactor, whose "
           "steps are relative to each tensor's RMS; on the pretrained quickstart model 1e-4 keeps the KL stage 1 "
           "reached and 1e-3 raises it: benchmarks/QUALITY.md)")
    # 0.3, not ZEDA's 0.1: with 0.1 the KL term pulls the skip rate ~0.05 below the target on
    # short runs (measured on the tiny test models); 0.3 lands within 0.02 and still lowers the KL.
    a("--balance-alpha", type=float, default=0.3, metavar="A", help="alpha of the group balancing loss (default 0.3)")
    a("--temperature", type=float, default=1.0, help="distillation temperature (default 1)")
    a("--expert-optimizer", choices=("adamw", "adafactor"), default="adamw",
      help="stage 2's optimizer for the MoE blocks: adamw (8 bytes of state a parameter) or torch's adafactor "
           "(factored second moments, almost none); routers always use AdamW (default adamw)")
    a("--expert-master", choices=("float32", "bfloat16"), default="float32",
      help="what stage 2 keeps the MoE blocks' trained weights in: float32, or bfloat16 with each update rounded "
           "stochastically (half the memory; what fits Qwen3-30B-A3B's 48 layers on one 141 GB GPU); needs bf16 "
           "compute (default float32)")
    a("--optimizer-in-backward", action=argparse.BooleanOptionalAction, default=None,
      help="step each trained tensor's optimizer from its gradient hook inside backward, so no full set of "
           "gradients is held; --grad-clip then bounds each tensor's gradient (default: on a single GPU)")
    a("--teacher-cache", action=argparse.BooleanOptionalAction, default=None,
      help="stage 2: the teacher's top-k log-probs cached on disk before the stage instead of a frozen copy of the "
           "model in memory (default: on GPUs and under torchrun, off in one CPU process)")
    a("--teacher-topk", type=int, default=64, help="tokens per position kept by --teacher-cache (default 64)")
    a("--on-policy", action="store_true",
      help="stage 2 distils on the student's own continuations of the data's prompts: reverse KL(student || "
           "teacher) over the generated tokens, against a frozen copy of the original (the ZEDA authors' "
           "on-policy stage); stage 1 and the held-out evaluation stay on the data")
    a("--rollout-engine", choices=("vllm", "transformers"), default="vllm",
      help="--on-policy: what generates the rollouts: vllm (the student exported and served with the plugin, "
           "zero slots skipped, in a subprocess) or transformers (the student's HF classes in this process) "
           "(default vllm)")
    a("--rollout-every", type=int, default=50, metavar="N",
      help="--on-policy: new rollouts from the current student every N steps of stage 2 (default 50; 1 = "
           "exactly on-policy, practical with --rollout-engine transformers)")
    a("--rollout-prompt-tokens", type=int, default=None, metavar="P",
      help="--on-policy: prompt tokens taken from each training block; the student writes the rest up to "
           "--seq-len (default seq-len / 4)")
    a("--rollout-temperature", type=float, default=1.0, help="--on-policy: sampling temperature, 0 = greedy (default 1)")
    a("--device", choices=("auto", "cpu", "cuda"), default="auto")
    a("--dtype", choices=("auto", "float32", "bfloat16"), default="auto",
      help="compute dtype; auto = bf16 on GPU, fp32 on CPU. With bf16 the frozen weights stay in the checkpoint's "
           "dtype and only trained tensors are fp32 (with fp32 optimizer state); with fp32 every weight is fp32")
    a("--seed", type=int, default=0)
    a("--resume", action="store_true", help="continue an interrupted run from its work directory")
    a("--work-dir", default=None, help="checkpoints and metrics while training (default: .DST.zeda-work next to DST)")
    a("--keep-work-dir", action="store_true", help="keep the work directory after success")
    a("--eval-every", type=int, default=50, help="held-out evaluation every N steps (and at each stage end)")
    a("--save-every", type=int, default=50, help="checkpoint every N steps (and at each stage end)")
    a("--heldout-fraction", type=float, default=0.05, help="share of blocks held out for evaluation (default 0.05)")
    a("--max-heldout-blocks", type=int, default=128)
    a("--grad-clip", type=float, default=1.0)
    a("--grad-checkpointing", action=argparse.BooleanOptionalAction, default=None,
      help="recompute activations in backward: less memory, about a third more compute (default: on GPUs)")
    a("--grad-checkpointing-layers", type=int, default=None, metavar="N",
      help="with --grad-checkpointing: only the first N decoder layers recompute, the others keep their "
           "activations (faster, more memory; default: all layers)")
    a("--compile", action=argparse.BooleanOptionalAction, default=None,
      help="fuse the elementwise work between the GEMMs (norms, attention's q/k norms and rotary, SwiGLU, the "
           "experts' gather and scatter, the KL) with torch.compile: at Qwen3-30B-A3B's shape on an H200 +59%% "
           "tokens/s in stage 1, +35%% in stage 2, less peak memory (benchmarks/RESULTS.md section 8); not "
           "bit-reproducible (inductor's scatter-adds are atomic), so never with --deterministic (default: on in "
           "one GPU process where inductor can build kernels, else off)")
    a("--deterministic", action="store_true",
      help="bit-reproducible GPU runs (torch.use_deterministic_algorithms: no atomic adds in backward), so a "
           "resumed run equals an uninterrupted one bit for bit there too; CPU runs always are")
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
    if args.grad_checkpointing_layers is not None:
        if args.grad_checkpointing_layers < 0:
            raise ZedaError(f"--grad-checkpointing-layers must be >= 0, got {args.grad_checkpointing_layers}")
        if args.grad_checkpointing is False:
            raise ZedaError("--grad-checkpointing-layers needs --grad-checkpointing (drop --no-grad-checkpointing)")
    if not 0.0 < args.heldout_fraction < 1.0:
        raise ZedaError("--heldout-fraction must be strictly between 0 and 1")
    if args.on_policy:
        if args.rollout_every < 1:
            raise ZedaError(f"--rollout-every must be >= 1, got {args.rollout_every}")
        if args.rollout_prompt_tokens is not None and not 1 <= args.rollout_prompt_tokens < args.seq_len:
            raise ZedaError(f"--rollout-prompt-tokens must be between 1 and --seq-len - 1 ({args.seq_len - 1}), got "
                            f"{args.rollout_prompt_tokens}")
        if args.rollout_temperature < 0:
            raise ZedaError("--rollout-temperature must be >= 0")
        if args.teacher_cache:
            raise ZedaError("--on-policy distils on text generated while it trains, which no cache can hold in advance: "
                            "drop --teacher-cache (the teacher is then a frozen copy of the original)")
        from .onpolicy import check_engine

        check_engine(args.rollout_engine)
    if args.compile and args.deterministic:
        raise ZedaError("--compile is not bit-reproducible (inductor's scatter-adds are atomic): drop --compile or "
                        "--deterministic")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ZedaError("--device cuda: no CUDA device is available")


def resolve_auto(args, dist) -> None:
    """The flags left to the machine: on a GPU the teacher cache, activation checkpointing and,
    in a single process, the optimizer in backward (what fits its memory) and torch.compile
    (unless --deterministic, or inductor cannot build kernels here: then off, with a warning);
    off on CPUs. An explicit --compile that cannot build is refused. Under torchrun (FSDP2) the
    teacher cache is the default everywhere, and what cannot step sharded tensors is refused."""
    on_gpu = dist.device.type == "cuda"
    if args.compile is not False:
        from .fused import why_not_compilable

        wanted = args.compile or (on_gpu and dist.world == 1 and not args.deterministic)
        why = why_not_compilable(dist.device) if wanted else None
        if why and args.compile:
            raise ZedaError(f"--compile: {why}; install it, or rerun with --no-compile")
        if why:
            print(f"warning: running without torch.compile ({why}): slower; --no-compile silences this", flush=True)
        args.compile = bool(wanted) and not why
    if args.teacher_cache is None:
        args.teacher_cache = (on_gpu or dist.world > 1) and not args.on_policy
    if args.grad_checkpointing is None:
        args.grad_checkpointing = on_gpu or args.grad_checkpointing_layers is not None
    if args.optimizer_in_backward is None:
        args.optimizer_in_backward = on_gpu and dist.world == 1
    if dist.world == 1:
        return
    refused = {
        "--on-policy": args.on_policy,  # its frozen teacher copy is not sharded, nor is the rollout engine
        "--optimizer-in-backward": args.optimizer_in_backward,
        "--expert-optimizer adafactor": args.expert_optimizer == "adafactor",  # its factored moments need whole rows
        "--expert-master bfloat16": args.expert_master == "bfloat16",
        "--no-teacher-cache": not args.teacher_cache and args.stage2_steps > 0,  # a frozen copy is not sharded
    }
    for flag, asked in refused.items():
        if asked:
            raise ZedaError(f"{flag} runs in one process only; under torchrun FSDP2 shards fp32 weights and AdamW's "
                            "state over the GPUs instead: drop it")


@cli_entry
def main(argv: list[str] | None = None) -> int:
    from .distributed import Dist
    from .loop import train, work_dir

    args = build_parser().parse_args(argv)
    check_args(args)
    if args.deterministic:  # cuBLAS reads its workspace setting when it starts: before any CUDA work
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    dist = Dist(args.device)
    try:
        resolve_auto(args, dist)
        train(args, dist)
    except torch.cuda.OutOfMemoryError:
        raise ZedaError(f"out of GPU memory: {memory_remedies(args)}; " + resume_hint(work_dir(args))) from None
    except OSError as exc:
        from .state import free_gb, is_disk_full

        where = Path(exc.filename or args.output)
        if not is_disk_full(exc, where.parent):
            raise
        raise ZedaError(f"the disk is full: cannot write {where} ({free_gb(where.parent):.1f} GB free there): free "
                        f"space, then {resume_hint(work_dir(args))}") from None
    except torch._dynamo.exc.BackendCompilerFailed as exc:  # inductor's own errors derive from it
        cause = getattr(exc, "inner_exception", None) or exc
        raise ZedaError(f"--compile: torch.compile failed ({first_line(cause)}): rerun with --no-compile; "
                        + resume_hint(work_dir(args))) from None
    except RuntimeError as exc:
        if not (args.deterministic and "deterministic" in str(exc)):
            raise
        raise ZedaError(f"--deterministic: {first_line(exc)} (drop --deterministic); "
                        + resume_hint(work_dir(args))) from None
    except KeyboardInterrupt:
        raise Interrupted("interrupted: " + resume_hint(work_dir(args))) from None
    finally:
        dist.close()
    return 0


def first_line(exc: BaseException) -> str:
    return next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)


def memory_remedies(args) -> str:
    """What frees GPU memory, among the flags this run has not set yet."""
    ways = [f"lower --batch-size (now {args.batch_size}) or --seq-len (now {args.seq_len})"]
    if not args.grad_checkpointing:
        ways.append("add --grad-checkpointing")
    elif args.grad_checkpointing_layers is not None:
        ways.append("drop --grad-checkpointing-layers (every layer recomputes)")
    if args.stage2_steps > 0 and (args.expert_master, args.expert_optimizer) != ("bfloat16", "adafactor"):
        ways.append("keep stage 2's experts in bf16 with Adafactor (--expert-master bfloat16 --expert-optimizer adafactor)")
    ways.append("spread the run over more GPUs (torchrun)")
    return ", ".join(ways[:-1]) + ", or " + ways[-1]


def resume_hint(work: Path) -> str:
    """What to do after a run stopped early: resume from its last checkpoint, or start over."""
    from .state import CKPT

    if (work / CKPT).is_file():
        return f"rerun the same command with --resume (the last checkpoint is in {work})"
    if work.exists():
        return f"rerun the same command with --resume ({work} holds no checkpoint yet: training starts over)"
    return "nothing was written: start again"
