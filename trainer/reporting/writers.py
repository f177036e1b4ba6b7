"""The writers: metrics.jsonl, events.jsonl and TensorBoard under the run directory, the console on rank 0.

A resumed run first cuts every log back to the checkpoint's step, so the steps it repeats are logged once.
"""

from __future__ import annotations

import json
import math
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from trainer.reporting.tables import console, print_table


class SpeedColumn(ProgressColumn):
    """Optimizer steps per second, as the progress line's it/s."""

    def render(self, task: Any) -> Text:
        return Text(f"{task.speed:.2f} it/s" if task.speed else "")


@dataclass
class _Outputs:
    """What rank 0's Reporter writes to."""

    jsonl: TextIO  # metrics.jsonl, line-buffered: survives a crash
    events: TextIO  # events.jsonl
    progress: Progress
    task: TaskID
    tensorboard: Any  # SummaryWriter, or None
    wandb: Any  # wandb's Run (logging.wandb), or None


class Reporter:
    """Rank 0 writes; every other rank gets a Reporter that does nothing, so callers need no rank checks."""

    def __init__(self, run_dir: Path, total_steps: int, *, active: bool, tensorboard: bool, start_step: int = 0,
                 wandb: Any = None, config: dict | None = None, name: str = "run"):
        """``wandb``: the spec's logging.wandb section (None: no W&B); ``config`` the resolved spec it records."""
        self.active, self.total_steps = active, total_steps
        self.console = console(stderr=True)
        self._out: _Outputs | None = None
        if not active:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        for log_file in ("metrics.jsonl", "events.jsonl"):
            truncate_jsonl(run_dir / log_file, start_step)
        writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step hides what a killed run logged after the checkpoint this run resumes from
            writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"), purge_step=start_step + 1)
        wandb_run = None
        if wandb is not None:
            from trainer.reporting.wandb_run import open_wandb

            wandb_run = open_wandb(wandb, run_dir, name, config or {})
        progress = Progress(
            TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[status]}"),
            SpeedColumn(), TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), console=self.console,
            disable=not self.console.is_terminal)
        task = progress.add_task("train", total=total_steps, completed=start_step, status="")
        self._out = _Outputs((run_dir / "metrics.jsonl").open("a", buffering=1),
                             (run_dir / "events.jsonl").open("a", buffering=1), progress, task, writer, wandb_run)
        progress.start()

    def print(self, *args: Any) -> None:
        if self.active:  # plain text: rich's highlighter scans every line for numbers otherwise (~1 ms a line)
            self.console.print(*args, soft_wrap=True, highlight=False, markup=False)

    def table(self, title: str, rows: list[tuple[str, str]]) -> None:
        """Two columns, name and value: the run at start-up and its summary at the end."""
        if self.active:
            print_table(self.console, title, rows)

    def event(self, optimizer_step: int, event: str, message: str, **details: Any) -> None:
        """Something a user must see (skipped samples and steps, resume, preemption): console and events.jsonl."""
        if self._out is None:
            return
        self._out.events.write(json.dumps({"optimizer_step": optimizer_step, "event": event, "time": time.time(),
                                           "message": message, **details}) + "\n")
        self.console.print(f"[yellow]{event}[/yellow]: {message}", soft_wrap=True, markup=True, highlight=False)

    def advance(self, optimizer_step: int) -> None:
        if self._out is not None:
            self._out.progress.update(self._out.task, completed=optimizer_step)

    def log(self, optimizer_step: int, values: dict[str, float]) -> None:
        if self._out is None:
            return
        self._record(self._out, optimizer_step, values, "train/")
        status = f"loss {values['loss']:.4f}  lr {values['lr']:.2e}  gnorm {values['grad_norm']:.3f}"
        self._out.progress.update(self._out.task, status=status)
        eta = values["step_time_s"] * (self.total_steps - optimizer_step)
        skipped = (f"  skipped {values['skipped_steps']:.0f}" if values["skipped_steps"] else "") + (
            f"  data errors {values['data_errors']:.0f}" if values.get("data_errors") else "")
        memory = (f"gpu {values['gpu_reserved_peak_gb']:.1f} GiB" if "gpu_reserved_peak_gb" in values
                  else f"rss {values['rss_peak_gb']:.1f} GiB")
        flops = f"{values['tflops_per_s']:.3g} TFLOP/s" + (f" (MFU {values['mfu']:.1%})" if "mfu" in values else "")
        self.print(f"step {optimizer_step:>7}  {status}  {1 / values['step_time_s']:.2f} it/s  "
                   f"{values['samples_per_s']:.2f} samples/s  {values['tokens_per_s']:,.0f} tok/s  {flops}  "
                   f"data wait {values['data_wait_fraction']:.1%}  {memory}  eta {duration(eta)}{skipped}")

    @staticmethod
    def _record(out: _Outputs, optimizer_step: int, values: dict, prefix: str, jsonl: dict | None = None) -> None:
        """One metrics.jsonl line (``jsonl``, else ``values``) and the finite numbers as TensorBoard scalars."""
        record = {"optimizer_step": optimizer_step, "time": time.time(), **(jsonl or values)}
        out.jsonl.write(json.dumps(record) + "\n")
        scalars = {prefix + name: value for name, value in values.items()
                   if isinstance(value, (int, float)) and math.isfinite(value)}
        if out.tensorboard is not None:
            for name, value in scalars.items():
                out.tensorboard.add_scalar(name, value, optimizer_step)
        if out.wandb is not None:
            from trainer.reporting.wandb_run import log

            log(out.wandb, optimizer_step, scalars)

    @property
    def wants_videos(self) -> bool:
        """Whether ``video`` writes anywhere (TensorBoard or W&B, rank 0 only)."""
        return self._out is not None and (self._out.tensorboard is not None or self._out.wandb is not None)

    def log_validation(self, optimizer_step: int, values: dict[str, float]) -> None:
        """Validation numbers: their own record in metrics.jsonl, validation/* in TensorBoard, one console line."""
        if self._out is None:
            return
        self._record(self._out, optimizer_step, {k.removeprefix("val_"): v for k, v in values.items()},
                     "validation/", jsonl=values)
        self.print(f"step {optimizer_step:>7}  validation loss {values['val_loss']:.4f}")

    def video(self, tag: str, path: Path, fps: int, optimizer_step: int) -> None:
        """An mp4 as an animated GIF in TensorBoard's image tab (what SummaryWriter.add_video writes, without its
        moviepy dependency), and as itself in W&B."""
        if self._out is None:
            return
        if self._out.tensorboard is not None:
            from tensorboard.compat.proto.summary_pb2 import Summary

            from trainer.media import gif_bytes, read_mp4

            gif, (width, height) = gif_bytes(read_mp4(path), fps)
            image = Summary.Image(height=height, width=width, colorspace=3, encoded_image_string=gif)
            self._out.tensorboard._get_file_writer().add_summary(
                Summary(value=[Summary.Value(tag=tag, image=image)]), optimizer_step)
        if self._out.wandb is not None:
            from trainer.reporting.wandb_run import log_video

            log_video(self._out.wandb, tag, path, fps, optimizer_step)

    def close(self, wandb_wait_s: float | None = None) -> None:
        """``wandb_wait_s``: how long a stop may wait for W&B to finish (online, its uploads; a preempted job has
        seconds before SIGKILL, and the checkpoint is already saved); None: as long as it takes."""
        if self._out is not None:
            self._out.progress.stop()
            if self._out.tensorboard is not None:
                self._out.tensorboard.close()
            if self._out.wandb is not None:
                finishing = threading.Thread(target=self._out.wandb.finish, daemon=True)
                finishing.start()
                finishing.join(wandb_wait_s)
            self._out.jsonl.close()
            self._out.events.close()


def duration(seconds: float) -> str:
    seconds = round(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def truncate_jsonl(path: Path, last_step: int) -> None:
    """Keep the records of optimizer steps up to last_step (what a resumed run has not redone)."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines(keepends=True)
            if line.strip() and json.loads(line).get("optimizer_step", 0) <= last_step]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(kept))
    tmp.replace(path)
