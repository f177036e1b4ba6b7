"""The trainer's own resumable state: counters, the data position, and each rank's RNG states.

DeepSpeed's checkpoint holds the LoRA weights, fp32 masters, optimizer and lr scheduler; this holds the rest.
The global part is JSON (in the checkpoint's completion marker); each rank's RNG states are a safetensors
file, so nothing here is ever unpickled. Training noise and timesteps are seeded per optimizer step and need
no saved state; the global generators (LoRA dropout, anything a user adds) are saved and restored.
"""

from __future__ import annotations

import dataclasses
import json
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from trainer.rng import Stream, derive_seed


@dataclass
class TrainerState:
    optimizer_step: int = 0  # optimizer steps taken (applied or skipped as non-finite)
    micro_step: int = 0  # micro-steps each rank has run
    samples_seen: int = 0  # over all ranks; samples_seen / micro_batch_size is the data position
    nonfinite_steps: int = 0  # optimizer steps skipped for a non-finite loss or gradient norm
    consecutive_nonfinite: int = 0
    data_errors: int = 0  # samples skipped under data.on_error=skip, over all ranks
    consecutive_unreadable: int = 0  # optimizer steps in a row none of whose samples could be read
    validated_step: int = 0  # the last optimizer step whose validation (videos, loss) was done
    data_position: list[int] | None = None  # the next micro-batch: [epoch, within it, its plan's group] (data.py)
    # what the position means: a resume refuses to continue a different sample sequence
    world_size: int = 1
    micro_batch_size: int = 1
    seed: int = 0
    zero_stage: int = 2
    data_fingerprint: str = ""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> TrainerState:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names})

    @property
    def micro_batches_consumed(self) -> int:
        """Global micro-batches trained (all ranks); before positions had a group, the data position."""
        return self.samples_seen // self.micro_batch_size


def seed_global_rngs(seed: int, rank: int, optimizer_step: int = 0) -> None:
    """Fresh, rank-distinct global generators (also after a resume on another number of ranks)."""
    value = derive_seed(seed, Stream.GLOBAL_RNG, rank, optimizer_step)
    random.seed(value)
    np.random.seed(value % 2**32)
    torch.manual_seed(value)  # seeds the CPU and every CUDA device


def save_rng_states(path: Path, extra: dict | None = None) -> None:
    """This rank's torch (CPU, CUDA), numpy and python generator states, plus ``extra`` as JSON metadata."""
    version, py_state, gauss = random.getstate()
    legacy = np.random.get_state()
    assert isinstance(legacy, tuple), "numpy's legacy generator state"
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = legacy
    tensors = {
        "torch_cpu": torch.get_rng_state(),
        "python": torch.tensor(py_state, dtype=torch.int64),
        "numpy": torch.from_numpy(np_keys.astype(np.int64)),
    }
    if torch.cuda.is_available():
        tensors["torch_cuda"] = torch.cuda.get_rng_state()
    meta = {"python": [version, gauss], "numpy": [np_name, int(np_pos), int(np_has_gauss), float(np_gauss)],
            **(extra or {})}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={"trainer": json.dumps(meta)})


def load_rng_states(path: Path) -> dict:
    """Restore what save_rng_states wrote; returns its ``extra`` metadata."""
    from safetensors import safe_open

    tensors = load_file(str(path))
    with safe_open(str(path), "pt") as f:
        meta = json.loads(f.metadata()["trainer"])
    version, gauss = meta.pop("python")
    random.setstate((version, tuple(int(v) for v in tensors["python"].tolist()), gauss))
    np_name, np_pos, np_has_gauss, np_gauss = meta.pop("numpy")
    np.random.set_state((np_name, tensors["numpy"].numpy().astype(np.uint32), np_pos, np_has_gauss, np_gauss))
    torch.set_rng_state(tensors["torch_cpu"])
    if "torch_cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["torch_cuda"])
    return meta
