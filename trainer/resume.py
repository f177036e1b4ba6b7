"""Whether and from where a run continues: decided at preflight, confirmed at build, restored into the engine.

    checkpoint.resume: none   start fresh; refused if run.output_dir holds an earlier run
    checkpoint.resume: auto   the newest complete checkpoint in run.output_dir/checkpoints, else fresh (refused
                              if the directory holds a finished run that kept no checkpoint)
    checkpoint.resume: PATH   that complete checkpoint; refused if the directory holds newer ones (two timelines)

A checkpoint continues only under the settings that fix its sample sequence and ZeRO layout (micro batch size,
seed, ZeRO stage, the indexed samples): anything else is refused with a message before any work. Saved by
another number of ranks, it is converted once to DeepSpeed's universal format and loaded from that, and the
old ranks' RNG states, which have no owner then, are re-seeded. The checkpoint format is trainer/checkpoint.py.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from trainer.checkpoint import MARKER, complete_checkpoints, ensure_universal, load_checkpoint, read_marker
from trainer.errors import UserError
from trainer.parallel import ParallelLayout
from trainer.spec import RunSpec
from trainer.state import TrainerState, seed_global_rngs

if TYPE_CHECKING:
    from deepspeed import DeepSpeedEngine


@dataclass(frozen=True)
class ResumePoint:
    checkpoint: Path | None  # the complete checkpoint to continue from; None: a fresh start
    marker: dict | None  # its complete.json
    universal: bool = False  # saved by another number of ranks: load DeepSpeed's universal conversion

    @property
    def fresh(self) -> bool:
        return self.checkpoint is None


def plan(spec: RunSpec, world_size: int, ds_config: dict) -> ResumePoint:
    """Preflight (no process group yet; every rank decides alike from what it sees). Marks ``ds_config`` to load
    a universal checkpoint when the number of ranks changed (DeepSpeed reads that when the engine is built)."""
    root = spec.run.dir / "checkpoints"
    path = _find(spec.checkpoint.resume, root)
    if path is None:
        _check_fresh_start(spec)
        return ResumePoint(None, None)
    marker = read_marker(path)
    _check_resumable(marker, spec, ds_config["zero_optimization"]["stage"], path)
    universal = marker["world_size"] != world_size
    if universal:
        ds_config["checkpoint"] = {**ds_config.get("checkpoint", {}), "load_universal": True}
    return ResumePoint(path, marker, universal)


def _find(resume: str, root: Path) -> Path | None:
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


def _check_fresh_start(spec: RunSpec) -> None:
    """Starting from scratch must not overwrite what an earlier run produced."""
    run_dir = spec.run.dir
    if spec.checkpoint.resume == "none":
        earlier = [p.name for p in (run_dir / "metrics.jsonl", run_dir / "lora") if p.exists()]
        earlier += ["checkpoints"] if any((run_dir / "checkpoints").glob("step_*")) else []
        if earlier:
            raise UserError(f"run.output_dir: {run_dir} already holds an earlier run ({', '.join(earlier)}) and "
                            f"checkpoint.resume is none; choose another run.output_dir (or run.name), delete it, "
                            f"or resume it with checkpoint.resume: auto")
    elif (run_dir / "lora").exists():
        # auto found no complete checkpoint: logs alone are a run killed before its first save (start over),
        # but an exported LoRA is a finished run that kept no checkpoint
        raise UserError(f"run.output_dir: {run_dir} holds a finished run (lora/) without a complete checkpoint "
                        f"to resume from; choose another run.output_dir (or run.name), or delete it")


def _check_resumable(marker: dict, spec: RunSpec, zero_stage: int, path: Path) -> None:
    """Settings a checkpoint cannot continue under (the sample sequence, the ZeRO layout)."""
    problems = []
    if marker["micro_batch_size"] != spec.data.micro_batch_size:
        problems.append(f"data.micro_batch_size is {spec.data.micro_batch_size}, the checkpoint's is "
                        f"{marker['micro_batch_size']}")
    if marker["seed"] != spec.run.seed:
        problems.append(f"run.seed is {spec.run.seed}, the checkpoint's is {marker['seed']}")
    if marker.get("zero_stage", zero_stage) != zero_stage:
        problems.append(f"the DeepSpeed config is ZeRO-{zero_stage}, the checkpoint's is ZeRO-{marker['zero_stage']}")
    if problems:
        raise UserError(f"checkpoint.resume: {path} cannot continue with this spec: " + "; ".join(problems) +
                        ". Restore those settings, or start a new run (another run.output_dir).")


def confirm_point(point: ResumePoint, layout: ParallelLayout) -> None:
    """Build, first collective: each rank chose in preflight from what it sees in the run directory; they must
    agree (a node-local run directory would not)."""
    choices = layout.all_gather((str(point.checkpoint) if point.checkpoint else "a fresh start", socket.gethostname()))
    if len({choice for choice, _ in choices}) > 1:
        listed = "; ".join(f"rank {r} on {host}: {choice}" for r, (choice, host) in enumerate(choices))
        raise UserError(f"run.output_dir: the ranks see different checkpoints ({listed}); every node must see the "
                        f"same run.output_dir (a shared filesystem)")


def confirm_samples(point: ResumePoint, fingerprint: str) -> None:
    """Build, once the shards are indexed: the checkpoint's sample order must be the one these shards give."""
    if point.marker is not None and point.marker["data_fingerprint"] != fingerprint:
        raise UserError(f"checkpoint.resume: {point.checkpoint} cannot continue: data.shards hold other samples (or "
                        f"shapes) than when it was saved, so the sample order cannot go on where it stopped. Restore "
                        f"the shards, or start a new run (another run.output_dir).")


def restore(point: ResumePoint, engine: DeepSpeedEngine, layout: ParallelLayout, spec: RunSpec,
            fingerprint: str) -> TrainerState:
    """The trainer's state to start from, with the engine and this rank's generators set to it."""
    if point.checkpoint is None:
        seed_global_rngs(spec.run.seed, layout.rank)
        return TrainerState(world_size=layout.world_size, micro_batch_size=spec.data.micro_batch_size,
                            seed=spec.run.seed, zero_stage=engine.zero_optimization_stage(),
                            data_fingerprint=fingerprint)
    if point.universal:
        if layout.is_main:
            ensure_universal(point.checkpoint)
        layout.barrier()  # the conversion is on disk before any rank reads it
    state, saved = load_checkpoint(engine, point.checkpoint, point.universal, layout.rank)
    if saved is None:  # another number of ranks: the saved generator states have no owner
        seed_global_rngs(spec.run.seed, layout.rank, state.optimizer_step)
    state.world_size = layout.world_size
    return state
