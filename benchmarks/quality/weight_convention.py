"""A probe of ZEDA's weight convention (not a product option): zero slots dilute the renormalised
weights (routing.route_softmax: the sum includes them) against zero slots handing their weight to
the token's real slots (renormalised over real slots only). Runs a module or script with the HF
classes' softmax routing swapped for the second rule, e.g. the trainer, then evaluate.py:

    python benchmarks/quality/weight_convention.py vllm_zeda.train --model examples/tiny_moe \\
        --output OUT --data .quality/corpus/train --seq-len 256 --stage1-steps 200 --stage2-steps 600
    python benchmarks/quality/weight_convention.py benchmarks/quality/evaluate.py \\
        --teacher examples/tiny_moe --zeda OUT --corpus .quality/corpus --kept 0.5 ...

Only the transformers classes (trainer and evaluation) follow the swapped rule; vLLM's router
does not, so such a checkpoint must not be served. Results: benchmarks/QUALITY.md.
"""
from __future__ import annotations

import importlib.util
import runpy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import vllm_zeda.hf.modeling as modeling  # noqa: E402
from vllm_zeda.routing import Routing, route_softmax  # noqa: E402


def route_real_renormalised(logits, num_real, top_k, renormalize, *, masked=False, zero_bias=0.0) -> Routing:
    """route_softmax, but renormalised over the real slots only (a token whose K slots are all
    zero keeps weight 0 everywhere). In masked mode it equals route_softmax."""
    r = route_softmax(logits, num_real, top_k, False, masked=masked, zero_bias=zero_bias)
    if not renormalize:
        return r
    total = r.weights.sum(-1, keepdim=True)
    return Routing(weights=torch.where(total > 0, r.weights / total.clamp_min(1e-20), r.weights), ids=r.ids,
                   num_real=num_real)


def _module_exists(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:  # a missing parent package
        return False


def main() -> None:
    if len(sys.argv) < 2:
        raise SystemExit("usage: weight_convention.py MODULE_OR_SCRIPT [ARGS...]")
    target = sys.argv[1]
    if not (Path(target).is_file() if target.endswith(".py") else _module_exists(target)):
        raise SystemExit(f"weight_convention.py: no {'script' if target.endswith('.py') else 'module'} {target}")
    modeling.route_softmax = route_real_renormalised
    sys.argv = sys.argv[1:]
    if target.endswith(".py"):
        runpy.run_path(target, run_name="__main__")
    else:
        runpy.run_module(target, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
