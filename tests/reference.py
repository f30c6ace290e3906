"""HF reference decoding and skip statistics, to compare a real vLLM server against."""
from __future__ import annotations

import torch

PROMPT_TEXTS = [
    "The quick brown fox jumps over",
    "def fibonacci(n):",
    "Mixture-of-experts models route each token",
    "In 1905, Einstein published",
    "import torch\nimport numpy as np\n",
    "Once upon a time, in a small village",
    "SELECT name, price FROM products WHERE",
    "The capital of France is",
]


def prompt_ids(tokenizer) -> list[list[int]]:
    return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in PROMPT_TEXTS]


@torch.no_grad()
def hf_greedy(model, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    """Greedy continuation without stopping at EOS (like vLLM's ignore_eos), full recompute."""
    outs = []
    for p in prompts:
        ids = torch.tensor([p])
        for _ in range(max_tokens):
            nxt = model(ids).logits[0, -1].argmax()
            ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
        outs.append(ids[0, len(p):].tolist())
    return outs


@torch.no_grad()
def hf_zero_stats(model, prompts: list[list[int]], outputs: list[list[int]]) -> dict:
    """Skip statistics over exactly the tokens a server feeds through the model: the prompt and
    every generated token but the last."""
    model.zeda_reset_stats()
    for p, o in zip(prompts, outputs):
        model(torch.tensor([p + o[:-1]]))
    return model.zeda_stats()
