"""`python -m vllm_zeda.convert`: inject Z zero experts into an HF MoE checkpoint (no training).

The trainer (`python -m vllm_zeda.train --stage1-steps 0 --stage2-steps 0`) does the same and
more; this is the bare conversion.
"""
from __future__ import annotations

import argparse
import sys

from ..errors import ZedaError, cli_entry


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m vllm_zeda.convert", description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="source HF MoE checkpoint directory (safetensors)")
    p.add_argument("--output", required=True, help="new directory for the ZEDA checkpoint (must not exist)")
    p.add_argument("--num-zero-experts", type=int, default=None, help="Z (default: E/2)")
    p.add_argument("--target-zero-fraction", type=float, default=0.5, help="recorded in the zeda block (default 0.5)")
    p.add_argument("--seed", type=int, default=0, help="seed of the new router rows (default 0)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


@cli_entry
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.num_zero_experts is not None and args.num_zero_experts < 1:
        raise ZedaError(f"--num-zero-experts must be >= 1, got {args.num_zero_experts}")
    from .inject import convert_checkpoint

    spec = convert_checkpoint(
        args.model,
        args.output,
        args.num_zero_experts,
        seed=args.seed,
        target_zero_fraction=args.target_zero_fraction,
        progress=not args.quiet,
    )
    print(
        f"wrote {args.output}: {spec.base_architecture} with {spec.num_real_experts} real + "
        f"{spec.num_zero_experts} zero experts, top-{spec.top_k}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
