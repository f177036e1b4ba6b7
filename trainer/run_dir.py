"""The run directory across restarts: may a run start here, may it continue, and the per-rank sample log."""

from __future__ import annotations

import json
import socket
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from trainer.data import Batch
from trainer.errors import UserError
from trainer.metrics import truncate_jsonl
from trainer.spec import RunSpec

SAMPLE_LOG = "sample_keys"


def check_fresh_start(spec: RunSpec) -> None:
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


def check_resumable(marker: dict, spec: RunSpec, zero_stage: int, path: Path) -> None:
    """Before any work: settings a checkpoint cannot continue under (the sample sequence, the ZeRO layout)."""
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


def check_same_samples(marker: dict, fingerprint: str, path: Path) -> None:
    if marker["data_fingerprint"] != fingerprint:
        raise UserError(f"checkpoint.resume: {path} cannot continue: data.shards hold other samples (or shapes) than "
                        f"when it was saved, so the sample order cannot go on where it stopped. Restore the shards, "
                        f"or start a new run (another run.output_dir).")


def check_shared(run_dir: Path, rank: int, gather: Callable[[object], list], patience_s: float) -> None:
    """Every rank must see the one run directory: each writes its part of every checkpoint there, and a resume
    reads them all. Node-local disks would give each node its own partial checkpoints. Rank 0 writes a token
    under a new name, every rank reads it back (call on every rank: it gathers)."""
    token = gather(uuid.uuid4().hex if rank == 0 else None)[0]
    probe = run_dir / f".shared-check-{token}"  # a name no node has looked up before
    if rank == 0:
        probe.write_text(token)
    gather(None)  # the token is written before anyone looks
    run_dir.mkdir(parents=True, exist_ok=True)  # on NFS, also refreshes what this node knows of the directory
    seen = _read_back(probe, token, patience_s)
    views = gather((seen, socket.gethostname()))
    if rank == 0:
        probe.unlink()
    blind = [f"rank {r} on {host}" for r, (ok, host) in enumerate(views) if not ok]
    if blind:
        raise UserError(f"run.output_dir: {run_dir} is not the same directory on every node: "
                        f"{', '.join(blind[:4])}{' ...' if len(blind) > 4 else ''} cannot see a file rank 0 on "
                        f"{views[0][1]} wrote there. Put run.output_dir on a filesystem all nodes share (checkpoints "
                        f"hold a part from every rank)")


def _read_back(probe: Path, token: str, patience_s: float) -> bool:
    """An NFS client may remember for up to a minute that the run directory did not exist (the checks before
    it was created looked it up): keep looking for a while before calling the directory unshared."""
    deadline = time.monotonic() + patience_s
    while True:
        try:
            return probe.read_text() == token
        except OSError:
            if time.monotonic() > deadline:
                return False
            time.sleep(1.0)


def check_same_resume_point(resume_from: Path | None, gather: Callable[[object], list]) -> None:
    """Each rank chose where to resume in preflight, from what it sees in the run directory: they must agree."""
    choices = gather((str(resume_from) if resume_from else "a fresh start", socket.gethostname()))
    if len({choice for choice, _ in choices}) > 1:
        listed = "; ".join(f"rank {r} on {host}: {choice}" for r, (choice, host) in enumerate(choices))
        raise UserError(f"run.output_dir: the ranks see different checkpoints ({listed}); every node must see the "
                        f"same run.output_dir (a shared filesystem)")


class SampleLog:
    """logging.sample_keys: each rank appends the samples of every micro-step to its own jsonl file."""

    def __init__(self, run_dir: Path, rank: int):
        folder = run_dir / SAMPLE_LOG
        folder.mkdir(parents=True, exist_ok=True)
        self.rank = rank
        self._file = (folder / f"rank_{rank:05d}.jsonl").open("a", buffering=1)

    def write(self, optimizer_step: int, batches: list[Batch]) -> None:
        for micro_step, batch in enumerate(batches):
            self._file.write(json.dumps({
                "optimizer_step": optimizer_step, "micro_step": micro_step, "rank": self.rank,
                "samples": [f"{shard}:{key}" for shard, key in zip(batch.shards, batch.keys)],
                "position": list(batch.position)}) + "\n")

    @staticmethod
    def truncate_all(run_dir: Path, last_step: int) -> None:
        """Rank 0, before anyone appends: forget what a killed run logged after the resumed step."""
        for path in sorted((run_dir / SAMPLE_LOG).glob("rank_*.jsonl")):
            truncate_jsonl(path, last_step)
