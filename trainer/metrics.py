"""What a run reports: metrics.jsonl and TensorBoard under the run directory, a progress bar on rank 0."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class Reporter:
    """Rank 0 writes; every other rank gets a Reporter that does nothing, so callers need no rank checks."""

    def __init__(self, run_dir: Path, total_steps: int, *, active: bool, tensorboard: bool, start_step: int = 0):
        self.active = active
        self.console = Console(stderr=True)
        self._jsonl = self._writer = self._progress = None
        if not active:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        self._jsonl = (run_dir / "metrics.jsonl").open("a", buffering=1)  # line-buffered: survives a crash
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        self._progress = Progress(
            TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[status]}"),
            TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), console=self.console,
            disable=not self.console.is_terminal)
        self._task = self._progress.add_task("train", total=total_steps, completed=start_step, status="")
        self._progress.start()

    def print(self, *args) -> None:
        if self.active:
            self.console.print(*args, soft_wrap=True)

    def advance(self, optimizer_step: int) -> None:
        if self._progress is not None:
            self._progress.update(self._task, completed=optimizer_step)

    def log(self, optimizer_step: int, values: dict[str, float]) -> None:
        if not self.active:
            return
        record = {"optimizer_step": optimizer_step, "time": time.time(), **values}
        self._jsonl.write(json.dumps(record) + "\n")
        if self._writer is not None:
            for name, value in values.items():
                if isinstance(value, (int, float)) and math.isfinite(value):
                    self._writer.add_scalar(f"train/{name}", value, optimizer_step)
        status = f"loss {values['loss']:.4f}  lr {values['lr']:.2e}  gnorm {values['grad_norm']:.3f}"
        self._progress.update(self._task, status=status)
        self.print(f"step {optimizer_step:>7}  {status}  {values['samples_per_s']:.2f} samples/s"
                           + (f"  skipped {values['skipped_steps']:.0f}" if values["skipped_steps"] else ""))

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
        if self._writer is not None:
            self._writer.close()
        if self._jsonl is not None:
            self._jsonl.close()
