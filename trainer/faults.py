"""Preemption signals and the per-step decisions every rank must share.

SIGTERM and SIGUSR1 (what SLURM sends before a time limit with ``--signal``) only set a flag; the loop
acts on it at the next optimizer-step boundary, so the step in flight finishes and every rank saves the
same step. One small all-reduce per optimizer step carries the flags: a sync point, but one per optimizer
step, not per micro-step.
"""

from __future__ import annotations

import signal
from dataclasses import dataclass

import torch
import torch.distributed as dist

from trainer.errors import EXIT_NONFINITE, EXIT_PREEMPTED

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Stopped(Exception):
    """The run ended early on purpose (preemption, too many non-finite steps); carries the exit status."""

    def __init__(self, exit_code: int, message: str):
        super().__init__(message)
        self.exit_code = exit_code


class StopSignals:
    """Records the first stop signal; loader workers forked later inherit the handler and keep running."""

    def __init__(self):
        self.received: int | None = None
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.received is None:
            self.received = signum


@dataclass(frozen=True)
class StepDecision:
    stop: bool  # some rank got a stop signal: all save this step and exit
    save_due_to_time: bool  # rank 0's clock says checkpoint.every_minutes have passed
    data_faults: bool  # some rank skipped a sample this step: gather and report them


def decide(device: torch.device, stop_requested: bool, time_due_on_rank0: bool, data_faults: bool) -> StepDecision:
    """Every rank calls this after each optimizer step and gets the same answer (the max over ranks)."""
    flags = torch.tensor([stop_requested, time_due_on_rank0 and dist.get_rank() == 0, data_faults],
                         dtype=torch.int32, device=device)
    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    return StepDecision(*(bool(f) for f in flags.tolist()))  # sync point


def preempted(signum: int, optimizer_step: int, checkpoint) -> Stopped:
    name = signal.Signals(signum).name if signum else "a stop signal"
    return Stopped(EXIT_PREEMPTED, f"stopped by {name} after optimizer step {optimizer_step}; checkpoint "
                   f"{checkpoint}. Run the same command again to resume (checkpoint.resume: auto).")


def too_many_nonfinite(count: int, last_step: int, checkpoint) -> Stopped:
    where = f"the last complete checkpoint is {checkpoint}" if checkpoint else "no checkpoint was saved"
    return Stopped(EXIT_NONFINITE, f"{count} optimizer steps in a row (up to step {last_step}) had a non-finite loss "
                   f"or gradient norm and were skipped; stopping ({where}). Lower optim.lr, check the data with "
                   f"data_tools/inspect.py, or raise train.max_consecutive_nonfinite.")
