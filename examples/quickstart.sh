#!/usr/bin/env bash
# The README's main job: set up the CPU environment if needed, then build a tiny MoE, convert +
# train it, serve it with `vllm serve --enable-zeda`, query it and print the skip statistics.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/examples/setup_cpu.sh"
exec python "$ROOT/examples/quickstart.py" "$@"
