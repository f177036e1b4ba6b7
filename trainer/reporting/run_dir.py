"""The run directory: opened by rank 0 (the spec, the logs cut back to the resumed step), shared by every node,
and each rank's log of the samples it trained on. Whether a run may start or continue here: trainer/resume.py.
"""

from __future__ import annotations

import json
import socket
import time
import uuid
from pathlib import Path

from trainer.data import Batch
from trainer.errors import UserError
from trainer.parallel import ParallelLayout
from trainer.reporting.writers import Reporter, truncate_jsonl
from trainer.shard_index import ShardIndex
from trainer.spec import RunSpec
from trainer.state import TrainerState

SAMPLE_LOG = "sample_keys"


def open_run_dir(spec: RunSpec, layout: ParallelLayout, state: TrainerState, index: ShardIndex) -> Reporter:
    """Rank 0 writes the spec and cuts the logs back to the resumed step before any rank appends; then every
    rank checks that it sees the same directory."""
    run_dir = spec.run.dir
    if layout.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "spec.yaml").write_text(spec.to_yaml())
        SampleLog.truncate_all(run_dir, state.optimizer_step)
        if state.optimizer_step == 0:
            state.data_errors = len(index.faults)
    # a sync point (rank 0's writes above are done); an unshared directory is refused within half the timeout
    check_shared(run_dir, layout, patience_s=min(60.0, spec.run.collective_timeout_s / 2))
    problem, reporter = None, None
    try:
        reporter = Reporter(run_dir, spec.train.max_steps, active=layout.is_main,
                            tensorboard=spec.logging.tensorboard, start_step=state.optimizer_step,
                            wandb=spec.logging.wandb, config=spec.model_dump(mode="json"), name=spec.run.name)
    except UserError as exc:  # W&B starts on rank 0 alone: every rank learns whether it did, and stops with it
        problem = str(exc)
    found = [p for p in layout.all_gather(problem) if p]
    if found:
        if reporter is not None:
            reporter.close(wandb_wait_s=0)
        raise UserError(found[0], on_every_rank=True)
    assert reporter is not None
    return reporter


def check_shared(run_dir: Path, layout: ParallelLayout, patience_s: float) -> None:
    """Every rank must see the one run directory: each writes its part of every checkpoint there, and a resume
    reads them all. Node-local disks would give each node its own partial checkpoints. Rank 0 writes a token
    under a new name, every rank reads it back (call on every rank: it gathers)."""
    token = layout.all_gather(uuid.uuid4().hex if layout.is_main else None)[0]
    probe = run_dir / f".shared-check-{token}"  # a name no node has looked up before
    if layout.is_main:
        probe.write_text(token)
    layout.barrier()  # the token is written before anyone looks
    run_dir.mkdir(parents=True, exist_ok=True)  # on NFS, also refreshes what this node knows of the directory
    seen = _read_back(probe, token, patience_s)
    views = layout.all_gather((seen, socket.gethostname()))
    if layout.is_main:
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
                "samples": [f"{shard}:{key}" for shard, key in zip(batch.shards, batch.keys, strict=True)],
                "position": list(batch.position)}) + "\n")

    @staticmethod
    def truncate_all(run_dir: Path, last_step: int) -> None:
        """Rank 0, before anyone appends: forget what a killed run logged after the resumed step."""
        for path in sorted((run_dir / SAMPLE_LOG).glob("rank_*.jsonl")):
            truncate_jsonl(path, last_step)
