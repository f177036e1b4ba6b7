#!/usr/bin/env bash
# Set up .venv with the test tools and run the whole test suite; CI runs exactly this.
#   bash tests/run.sh                      the whole suite: two pytest-xdist workers, then the serial tests alone
#   bash tests/run.sh -m "not slow"        any arguments: one plain pytest with them (tests/test_spec.py, -k ...)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/launch/setup_env.sh" --dev
VENV="${VENV:-$ROOT/.venv}"
# DeepSpeed JIT-builds its CPU shared-memory comm op once (~30 s); keep the build between runs.
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$HOME/.cache/torch_extensions}"
cd "$ROOT"
if [ "$#" -gt 0 ]; then
  exec "$VENV/bin/python" -m pytest "$@"
fi
# Most of the suite waits on process start-up (imports), launchers and collectives, one core busy out of two:
# two workers fill the other. Each file runs on one worker (--dist loadscope: its module fixtures, such as the
# reference runs and the SLURM cluster, are built once), the longest files first (tests/conftest.py). One thread per process: two workers' OpenMP teams
# sharing two cores spin at each other's barriers (the trainer's ranks take OMP_NUM_THREADS when it is set).
# The tests marked serial measure wall-clock bounds (collective and start-up timeouts) and run alone after.
parallel=0; OMP_NUM_THREADS=1 "$VENV/bin/python" -m pytest -n 2 --dist loadscope -m "not serial" --durations=30 || parallel=$?
serial=0; "$VENV/bin/python" -m pytest -m serial || serial=$?
echo "tests/run.sh: parallel part exit $parallel, serial part exit $serial"
[ "$parallel" -eq 0 ] && [ "$serial" -eq 0 ]
