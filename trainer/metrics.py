"""What a run reports: metrics.jsonl, events.jsonl and TensorBoard under the run directory, progress on rank 0.

A resumed run first cuts every log back to the checkpoint's step, so the steps it repeats are logged once.
"""

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
        for name in ("metrics.jsonl", "events.jsonl"):
            truncate_jsonl(run_dir / name, start_step)
        self._jsonl = (run_dir / "metrics.jsonl").open("a", buffering=1)  # line-buffered: survives a crash
        self._events = (run_dir / "events.jsonl").open("a", buffering=1)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step hides what a killed run logged after the checkpoint this run resumes from
            self._writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"), purge_step=start_step + 1)
        self._progress = Progress(
            TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[status]}"),
            TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), console=self.console,
            disable=not self.console.is_terminal)
        self._task = self._progress.add_task("train", total=total_steps, completed=start_step, status="")
        self._progress.start()

    def print(self, *args) -> None:
        if self.active:
            self.console.print(*args, soft_wrap=True)

    def event(self, optimizer_step: int, event: str, message: str, **details) -> None:
        """Something a user must see (skipped samples and steps, resume, preemption): console and events.jsonl."""
        if not self.active:
            return
        self._events.write(json.dumps({"optimizer_step": optimizer_step, "event": event, "time": time.time(),
                                       "message": message, **details}) + "\n")
        self.console.print(f"[yellow]{event}[/yellow]: {message}", soft_wrap=True, markup=True, highlight=False)

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
        skipped = (f"  skipped {values['skipped_steps']:.0f}" if values["skipped_steps"] else "") + (
            f"  data errors {values['data_errors']:.0f}" if values.get("data_errors") else "")
        self.print(f"step {optimizer_step:>7}  {status}  {values['samples_per_s']:.2f} samples/s{skipped}")

    @property
    def tensorboard(self) -> bool:
        return self._writer is not None

    def log_validation(self, optimizer_step: int, values: dict[str, float]) -> None:
        """Validation numbers: their own record in metrics.jsonl, validation/* in TensorBoard, one console line."""
        if not self.active:
            return
        self._jsonl.write(json.dumps({"optimizer_step": optimizer_step, "time": time.time(), **values}) + "\n")
        if self._writer is not None:
            for name, value in values.items():
                self._writer.add_scalar(f"validation/{name.removeprefix('val_')}", value, optimizer_step)
        self.print(f"step {optimizer_step:>7}  validation loss {values['val_loss']:.4f}")

    def video(self, tag: str, frames, fps: int, optimizer_step: int) -> None:
        """A video as an animated GIF in TensorBoard's image tab (what SummaryWriter.add_video writes, without
        its moviepy dependency)."""
        if self._writer is None:
            return
        from tensorboard.compat.proto.summary_pb2 import Summary

        from trainer.media import gif_bytes

        gif = gif_bytes(frames, fps)
        height, width = frames.shape[1:3]
        image = Summary.Image(height=height, width=width, colorspace=3, encoded_image_string=gif)
        self._writer._get_file_writer().add_summary(Summary(value=[Summary.Value(tag=tag, image=image)]),
                                                   optimizer_step)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
        if self._writer is not None:
            self._writer.close()
        if self._jsonl is not None:
            self._jsonl.close()
            self._events.close()


def truncate_jsonl(path: Path, last_step: int) -> None:
    """Keep the records of optimizer steps up to last_step (what a resumed run has not redone)."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines(keepends=True)
            if line.strip() and json.loads(line).get("optimizer_step", 0) <= last_step]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(kept))
    tmp.replace(path)
