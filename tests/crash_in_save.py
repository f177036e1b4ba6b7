"""launch/train.py, except that rank 1 dies inside the checkpoint save of optimizer step 8: after DeepSpeed
wrote its files and before the trainer's own state and the completion marker (tests/test_resume.py)."""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import trainer.checkpoint  # noqa: E402
from launch.train import main  # noqa: E402

real = trainer.checkpoint.save_rng_states


def save_rng_states(path, extra=None):
    if "step_00000008" in str(path) and extra and extra.get("rank") == 1:
        os._exit(9)  # as a SIGKILL would: no cleanup, no exception handling
    real(path, extra)


trainer.checkpoint.save_rng_states = save_rng_states
sys.exit(main())
