#!/usr/bin/env bash
# Create or update the virtual environment (.venv, or $VENV) with the trainer and its tested versions.
#   bash launch/setup_env.sh          the trainer
#   bash launch/setup_env.sh --dev    the trainer and the test tools
# The order matters: torch first (a CUDA build where nvidia-smi sees a GPU, the CPU build otherwise), then
# deepspeed without build isolation (its build imports torch), then the package. A torch already in the
# environment is kept.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3}"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
EXTRA=""
[ "${1:-}" = "--dev" ] && EXTRA="[dev]"

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
pip() { "$VENV/bin/python" -m pip --disable-pip-version-check "$@"; }
pip install -q --upgrade pip setuptools wheel

if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "setup: installing torch $TORCH_VERSION (CUDA build)"
    pip install -q "torch==$TORCH_VERSION"
  else
    # A bare torch requirement would pull the multi-GB CUDA build: ask for the CPU build by name, from any
    # configured index or wheel directory, else from PyTorch's CPU index.
    echo "setup: no GPU seen; installing torch $TORCH_VERSION (CPU build)"
    pip install -q "torch==$TORCH_VERSION+cpu" 2>/dev/null \
      || pip install -q "torch==$TORCH_VERSION" --index-url https://download.pytorch.org/whl/cpu
  fi
fi
echo "setup: installing deepspeed (no build isolation), then the trainer$EXTRA"
pip install -q --no-build-isolation -c "$ROOT/launch/constraints.txt" deepspeed
pip install -q -c "$ROOT/launch/constraints.txt" -e "$ROOT$EXTRA"
"$VENV/bin/python" -c "import torch, deepspeed, diffusers; print(f'setup: torch {torch.__version__}, deepspeed {deepspeed.__version__}, diffusers {diffusers.__version__} in $VENV')"
