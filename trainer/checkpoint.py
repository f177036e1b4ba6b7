"""Resumable checkpoints with a small guarded contract: complete, or ignored.

    checkpoints/step_00000120/          DeepSpeed's state without the frozen base weights (LoRA params,
        ...                             fp32 masters, optimizer, lr scheduler), one file per rank
        trainer_state/rank_00000.safetensors   each rank's RNG states and data position
        complete.json                   the trainer's state; written last, by rank 0, atomically

A checkpoint counts only if it has ``complete.json``; DeepSpeed's own ``latest`` file is not written (it
would name a checkpoint whose files are half on disk). Pruning to ``keep_last`` and the cleanup of what a
killed save left behind happen only after a new checkpoint is complete. A checkpoint saved by another
number of ranks is converted once to DeepSpeed's universal format (``checkpoints/universal/step_...``).
Every collective here runs on every rank; only rank 0 writes shared files. Whether and from where a run
continues is trainer/resume.py's business; this is the format.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from trainer.files import atomic_write, fsync_tree
from trainer.parallel import ParallelLayout
from trainer.state import TrainerState, load_rng_states, save_rng_states

if TYPE_CHECKING:
    from deepspeed import DeepSpeedEngine

MARKER = "complete.json"
UNIVERSAL = "universal"


def checkpoint_tag(optimizer_step: int) -> str:
    return f"step_{optimizer_step:08d}"


def rank_file(path: Path, rank: int) -> Path:
    return path / "trainer_state" / f"rank_{rank:05d}.safetensors"


def read_marker(path: Path) -> dict:
    return json.loads((path / MARKER).read_text())


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under root, oldest first."""
    return sorted(p for p in root.glob("step_*") if (p / MARKER).is_file())


def ensure_universal(path: Path) -> Path:
    """Rank 0: convert a checkpoint to DeepSpeed's universal format once; returns the converted folder.

    The same as running ``python -m deepspeed.checkpoint.ds_to_universal --input_folder <ckpt>
    --output_folder <ckpt's root>/universal/<ckpt name>`` by hand.
    """
    out = path.parent / UNIVERSAL / path.name
    if (out / MARKER).is_file():
        return out
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    proc = subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(path),
                           "--output_folder", str(tmp), "--num_extract_workers", "1", "--num_merge_workers", "1"],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"converting {path} to a universal checkpoint failed:\n{proc.stdout[-2000:]}"
                           f"{proc.stderr[-4000:]}")
    (tmp / "latest_universal").unlink(missing_ok=True)  # names the temporary folder; the marker says it all
    shutil.copy2(path / MARKER, tmp / MARKER)
    fsync_tree(tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


class Checkpointer:
    def __init__(self, root: Path, keep_last: int, layout: ParallelLayout):
        self.root, self.keep_last, self.layout = root, keep_last, layout

    def save(self, engine: DeepSpeedEngine, state: TrainerState, rank_extra: dict,
             also: Callable[[Path], None] | None = None) -> Path:
        """``also(folder)`` runs on every rank after DeepSpeed's save, before the checkpoint is complete: more of
        the run's state (the LoRA's moving average), under the same contract."""
        rank, tag = self.layout.rank, checkpoint_tag(state.optimizer_step)
        path = self.root / tag
        if rank == 0 and path.exists():  # what a run killed while saving this same step left behind
            shutil.rmtree(path)
        self.layout.barrier()
        # universal_checkpoint_info lets ds_to_universal convert ZeRO-1/2 checkpoints (ZeRO-3 does without)
        engine.save_checkpoint(str(self.root), tag=tag, save_latest=False, exclude_frozen_parameters=True,
                               client_state={"universal_checkpoint_info": {"universal_checkpoint_version": 0.4}})
        save_rng_states(rank_file(path, rank), {**rank_extra, "rank": rank})
        if also is not None:
            also(path)
        fsync_tree(path)  # DeepSpeed does not fsync; the marker must never outlive the data it vouches for
        self.layout.barrier()  # every rank's files are on disk
        if rank == 0:
            marker = {**state.to_dict(), "tag": tag, "saved_at": time.time()}
            atomic_write(path / MARKER, (json.dumps(marker, indent=1) + "\n").encode())
            self.prune()
        self.layout.barrier()  # nobody leaves (and maybe exits) before the checkpoint is complete
        return path

    def prune(self) -> None:
        """Keep the newest keep_last complete checkpoints; drop older ones and unfinished saves older than them."""
        complete = complete_checkpoints(self.root)
        keep = set(complete[-self.keep_last:])
        newest = complete[-1].name if complete else ""
        for path in sorted(self.root.glob("step_*")):
            if path not in keep and path.name < newest:
                shutil.rmtree(path, ignore_errors=True)
        for path in sorted((self.root / UNIVERSAL).glob("step_*")):
            if path.name.removesuffix(".partial") not in {p.name for p in keep}:
                shutil.rmtree(path, ignore_errors=True)


def load_checkpoint(engine: DeepSpeedEngine, path: Path, universal: bool,
                    rank: int) -> tuple[TrainerState, dict | None]:
    """Load DeepSpeed's state and the trainer's; restore this rank's RNG states when the number of ranks
    is unchanged. Returns the state and this rank's saved extras (None after a change of ranks)."""
    state = TrainerState.from_dict(read_marker(path))
    load_dir = path.parent / UNIVERSAL if universal else path.parent
    loaded, _ = engine.load_checkpoint(str(load_dir), tag=path.name, load_module_strict=False,
                                       load_optimizer_states=True, load_lr_scheduler_states=True)
    if loaded is None:
        raise RuntimeError(f"DeepSpeed could not load the checkpoint {path}")
    if universal:
        return state, None
    return state, load_rng_states(rank_file(path, rank))
