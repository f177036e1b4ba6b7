"""Resumable checkpoints with a small guarded contract: complete, or ignored.

    checkpoints/step_00000120/          DeepSpeed's state without the frozen base weights (LoRA params,
        ...                             fp32 masters, optimizer, lr scheduler), one file per rank
        trainer_state/rank_00000.safetensors   each rank's RNG states and data position
        complete.json                   the trainer's state; written last, by rank 0, atomically

A checkpoint counts only if it has ``complete.json``; DeepSpeed's own ``latest`` file is not written (it
would name a checkpoint whose files are half on disk). Pruning to ``keep_last`` and the cleanup of what a
killed save left behind happen only after a new checkpoint is complete. A checkpoint saved by another
number of ranks is converted once to DeepSpeed's universal format (``checkpoints/universal/step_...``).
Every collective here runs on every rank; only rank 0 writes shared files.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch.distributed as dist

from trainer.errors import UserError
from trainer.files import atomic_write, fsync_tree
from trainer.state import TrainerState, load_rng_states, save_rng_states

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


def resume_point(resume: str, root: Path) -> Path | None:
    """The checkpoint a run continues from: checkpoint.resume is auto, none or a checkpoint path."""
    if resume == "none":
        return None
    if resume == "auto":
        found = complete_checkpoints(root)
        return found[-1] if found else None
    path = Path(resume)
    if not path.is_dir():
        raise UserError(f"checkpoint.resume: no such checkpoint directory: {path}")
    if not (path / MARKER).is_file():
        raise UserError(f"checkpoint.resume: {path} is not a complete checkpoint (no {MARKER}: its save was "
                        f"interrupted); complete ones: {[p.name for p in complete_checkpoints(path.parent)]}")
    newer = [p for p in complete_checkpoints(root) if p.name > path.name]
    if newer:  # two timelines in one directory: auto and pruning would pick among them by step number
        raise UserError(f"checkpoint.resume: {root} already holds newer checkpoints ({newer[-1].name}) than {path}; "
                        f"resume from an older step into another run.output_dir, or delete the newer ones")
    return path


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
    def __init__(self, root: Path, keep_last: int):
        self.root, self.keep_last = root, keep_last

    def save(self, engine, state: TrainerState, rank_extra: dict) -> Path:
        rank, tag = dist.get_rank(), checkpoint_tag(state.optimizer_step)
        path = self.root / tag
        if rank == 0 and path.exists():  # what a run killed while saving this same step left behind
            shutil.rmtree(path)
        dist.barrier()
        # universal_checkpoint_info lets ds_to_universal convert ZeRO-1/2 checkpoints (ZeRO-3 does without)
        engine.save_checkpoint(str(self.root), tag=tag, save_latest=False, exclude_frozen_parameters=True,
                               client_state={"universal_checkpoint_info": {"universal_checkpoint_version": 0.4}})
        save_rng_states(rank_file(path, rank), {**rank_extra, "rank": rank})
        fsync_tree(path)  # DeepSpeed does not fsync; the marker must never outlive the data it vouches for
        dist.barrier()  # every rank's files are on disk
        if rank == 0:
            marker = {**state.to_dict(), "tag": tag, "saved_at": time.time()}
            atomic_write(path / MARKER, (json.dumps(marker, indent=1) + "\n").encode())
            self.prune()
        dist.barrier()  # nobody leaves (and maybe exits) before the checkpoint is complete
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


def load_checkpoint(engine, path: Path, universal: bool) -> tuple[TrainerState, dict | None]:
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
    return state, load_rng_states(rank_file(path, dist.get_rank()))
