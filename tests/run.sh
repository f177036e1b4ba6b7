#!/usr/bin/env bash
# Set up .venv with the test tools and run the whole test suite; CI runs exactly this.
# Arguments go to pytest:  bash tests/run.sh -m "not slow"   bash tests/run.sh tests/test_spec.py
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/launch/setup_env.sh" --dev
VENV="${VENV:-$ROOT/.venv}"
# DeepSpeed JIT-builds its CPU shared-memory comm op once (~30 s); keep the build between runs.
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$HOME/.cache/torch_extensions}"
cd "$ROOT"
exec "$VENV/bin/python" -m pytest "$@"
