"""Preemption signals and the per-step decisions every rank must share.

SIGTERM and SIGUSR1 (what SLURM sends before a time limit with ``--signal``) only set a flag; the loop
acts on it at the next optimizer-step boundary, so the step in flight finishes and every rank saves the
same step. One small all-reduce per optimizer step carries the flags: a sync point, but one per optimizer
step, not per micro-step.
"""

from __future__ import annotations

import signal
from dataclasses import dataclass
from pathlib import Path

import torch

from trainer.errors import EXIT_NONFINITE, EXIT_PREEMPTED
from trainer.parallel import ParallelLayout

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Stopped(Exception):
    """The run ended early on purpose (preemption, too many non-finite steps); carries the exit status."""

    def __init__(self, exit_code: int, message: str):
        super().__init__(message)
        self.exit_code = exit_code


class StopSignals:
    """Records the first stop signal (Python runs handlers in the main thread; the loader's reader threads and
    the watchdog keep running)."""

    def __init__(self) -> None:
        self.received: int | None = None
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: object) -> None:
        if self.received is None:
            self.received = signum


def ignore_stop_signals() -> None:
    """For the trainer once its stop is saved: then more signals must not turn exit 75 into "killed" (srun
    --kill-on-bad-exit SIGTERMs the ranks still tearing down once the first one exits)."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


@dataclass(frozen=True)
class StepDecision:
    stop: bool  # some rank got a stop signal: all save this step and exit
    save_due_to_time: bool  # rank 0's clock says checkpoint.every_minutes have passed
    # over all ranks: the ranks of a sequence group each count the samples they share
    data_faults: int  # samples of this step that could not be read
    readable: int  # samples of this step that could


def decide(layout: ParallelLayout, device: torch.device, stop_requested: bool, time_due_on_rank0: bool,
           data_faults: int, readable: int) -> StepDecision:
    """Every rank calls this after each optimizer step and gets the same answer (sums over ranks)."""
    values = torch.tensor([stop_requested, time_due_on_rank0 and layout.is_main, data_faults, readable],
                          dtype=torch.int64, device=device)
    stop, time_due, faults, ok = layout.all_reduce_sum(values).tolist()  # sync point
    return StepDecision(stop > 0, time_due > 0, faults, ok)


def preempted(signum: int | None, optimizer_step: int, checkpoint: Path | None) -> Stopped:
    name = signal.Signals(signum).name if signum else "a stop signal"
    return Stopped(EXIT_PREEMPTED, f"stopped by {name} after optimizer step {optimizer_step}; checkpoint "
                   f"{checkpoint}. Run the same command again to resume (checkpoint.resume: auto).")


def too_many_nonfinite(count: int, last_step: int, checkpoint: Path | None) -> Stopped:
    where = f"the last complete checkpoint is {checkpoint}" if checkpoint else "no checkpoint was saved"
    return Stopped(EXIT_NONFINITE, f"{count} optimizer steps in a row (up to step {last_step}) had a non-finite loss "
                   f"or gradient norm and were skipped; stopping ({where}). Lower optim.lr, check the data with "
                   f"data_tools/inspect_shards.py, or raise train.max_consecutive_nonfinite.")
