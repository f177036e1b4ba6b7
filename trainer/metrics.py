"""What a run reports: metrics.jsonl, events.jsonl and TensorBoard under the run directory, progress on rank 0.

A resumed run first cuts every log back to the checkpoint's step, so the steps it repeats are logged once.
"""

from __future__ import annotations

import json
import math
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from rich import box
from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)
from rich.table import Table
from rich.text import Text

from trainer.distributed import max_across_ranks, sum_across_ranks

T_BUCKETS = 10  # the training loss is also logged per tenth of the timestep range


def bucket_names(num_train_timesteps: int) -> list[str]:
    """loss_t000_099, loss_t100_199, ... for T = 1000."""
    width = num_train_timesteps // T_BUCKETS
    return [f"loss_t{k * width:03d}_{(k + 1) * width - 1 if k < T_BUCKETS - 1 else num_train_timesteps - 1:03d}"
            for k in range(T_BUCKETS)]


@dataclass
class Interval:
    """What one log line sums up since the last: kept on the device (no host sync per step) or as host counts.

    Losses count for applied optimizer steps only (a skipped step's loss is not finite); time waiting for the
    next micro-batch and video tokens are this rank's, summed over the ranks at the log step.
    """

    device: torch.device
    num_train_timesteps: int
    world_size: int = 1
    peak_tflops: float | None = None  # the device's: MFU = achieved TFLOP/s per rank / peak
    loss: torch.Tensor = None
    buckets: torch.Tensor = None  # [2, T_BUCKETS]: loss sums and sample counts per timestep bucket
    applied: int = 0
    taken: int = 0
    tokens: int = 0
    flops: float = 0.0
    data_wait_s: float = 0.0
    started: float = field(default_factory=time.perf_counter)
    tokens_logged: float = 0.0  # over all ranks, since this process started: for the summary

    def __post_init__(self):
        self.loss = torch.zeros((), dtype=torch.float64, device=self.device)
        self.buckets = torch.zeros(2, T_BUCKETS, dtype=torch.float64, device=self.device)

    def add(self, out, applied: bool) -> None:
        """One optimizer step's StepOutput (trainer/loop.py)."""
        self.taken += 1
        self.tokens += out.tokens
        self.flops += out.flops
        self.data_wait_s += out.data_wait_s
        if applied:
            self.loss += out.loss
            self.buckets += out.buckets
            self.applied += 1

    def flush(self, samples_per_step: int) -> dict[str, float]:
        """The interval's numbers over all ranks, then start over. Two collectives and a sync point."""
        elapsed = time.perf_counter() - self.started
        summed = sum_across_ranks([self.loss, self.applied, self.tokens, self.flops, *self.buckets.flatten()]).tolist()
        (loss_sum, applied, tokens, flops), bucket_values = summed[:4], summed[4:]
        self.tokens_logged += tokens
        peaks = memory_peaks(self.device)
        wait, *memory = max_across_ranks([self.data_wait_s / elapsed, *peaks.values()]).tolist()
        values = {"loss": loss_sum / applied if applied else float("nan"),
                  "samples_per_s": self.taken * samples_per_step / elapsed, "tokens_per_s": tokens / elapsed,
                  "step_time_s": elapsed / self.taken, "data_wait_fraction": wait,
                  "tflops_per_s": flops / elapsed / self.world_size / 1e12, **dict(zip(peaks, memory))}
        if self.peak_tflops:
            values["mfu"] = values["tflops_per_s"] / self.peak_tflops
        sums, counts = bucket_values[:T_BUCKETS], bucket_values[T_BUCKETS:]
        for name, total, count in zip(bucket_names(self.num_train_timesteps), sums, counts):
            values[name] = total / count if count else None
        self.loss.zero_()
        self.buckets.zero_()
        self.applied = self.taken = self.tokens = 0
        self.flops = 0.0
        self.data_wait_s, self.started = 0.0, time.perf_counter()
        return values


def memory_peaks(device: torch.device) -> dict[str, float]:
    """GiB: the process's peak resident memory, and on a GPU the peak allocated and reserved since the last call."""
    peaks = {"rss_peak_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}  # Linux reports KiB
    if device.type == "cuda":
        peaks["gpu_allocated_peak_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
        peaks["gpu_reserved_peak_gb"] = torch.cuda.max_memory_reserved(device) / 2**30
        torch.cuda.reset_peak_memory_stats(device)
    return peaks


class SpeedColumn(ProgressColumn):
    """Optimizer steps per second, as the progress line's it/s."""

    def render(self, task) -> Text:
        return Text(f"{task.speed:.2f} it/s" if task.speed else "")


class Reporter:
    """Rank 0 writes; every other rank gets a Reporter that does nothing, so callers need no rank checks."""

    def __init__(self, run_dir: Path, total_steps: int, *, active: bool, tensorboard: bool, start_step: int = 0):
        self.active, self.total_steps = active, total_steps
        self.console = Console(stderr=True)
        if not self.console.is_terminal:  # a log file: long lines rather than paths wrapped at 80 columns
            self.console.width = 160
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
            SpeedColumn(), TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), console=self.console,
            disable=not self.console.is_terminal)
        self._task = self._progress.add_task("train", total=total_steps, completed=start_step, status="")
        self._progress.start()

    def print(self, *args) -> None:
        if self.active:
            self.console.print(*args, soft_wrap=True)

    def table(self, title: str, rows: list[tuple[str, str]]) -> None:
        """Two columns, name and value: the run at start-up and its summary at the end."""
        if not self.active:
            return
        table = Table(title=title, title_justify="left", title_style="bold", show_header=False, box=box.SIMPLE)
        table.add_column(style="bold", no_wrap=True)
        table.add_column(overflow="fold")
        for name, value in rows:
            table.add_row(name, value)
        self.console.print(table)

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
        self._record(optimizer_step, values, "train/")
        status = f"loss {values['loss']:.4f}  lr {values['lr']:.2e}  gnorm {values['grad_norm']:.3f}"
        self._progress.update(self._task, status=status)
        eta = values["step_time_s"] * (self.total_steps - optimizer_step)
        skipped = (f"  skipped {values['skipped_steps']:.0f}" if values["skipped_steps"] else "") + (
            f"  data errors {values['data_errors']:.0f}" if values.get("data_errors") else "")
        memory = (f"gpu {values['gpu_reserved_peak_gb']:.1f} GiB" if "gpu_reserved_peak_gb" in values
                  else f"rss {values['rss_peak_gb']:.1f} GiB")
        flops = f"{values['tflops_per_s']:.3g} TFLOP/s" + (f" (MFU {values['mfu']:.1%})" if "mfu" in values else "")
        self.print(f"step {optimizer_step:>7}  {status}  {1 / values['step_time_s']:.2f} it/s  "
                   f"{values['samples_per_s']:.2f} samples/s  {values['tokens_per_s']:,.0f} tok/s  {flops}  "
                   f"data wait {values['data_wait_fraction']:.1%}  {memory}  eta {duration(eta)}{skipped}")

    def _record(self, optimizer_step: int, values: dict, prefix: str, jsonl: dict | None = None) -> None:
        """One metrics.jsonl line (``jsonl``, else ``values``) and the finite numbers as TensorBoard scalars."""
        record = {"optimizer_step": optimizer_step, "time": time.time(), **(jsonl or values)}
        self._jsonl.write(json.dumps(record) + "\n")
        if self._writer is not None:
            for name, value in values.items():
                if isinstance(value, (int, float)) and math.isfinite(value):
                    self._writer.add_scalar(prefix + name, value, optimizer_step)

    @property
    def tensorboard(self) -> bool:
        return self._writer is not None

    def log_validation(self, optimizer_step: int, values: dict[str, float]) -> None:
        """Validation numbers: their own record in metrics.jsonl, validation/* in TensorBoard, one console line."""
        if not self.active:
            return
        self._record(optimizer_step, {k.removeprefix("val_"): v for k, v in values.items()}, "validation/",
                     jsonl=values)
        self.print(f"step {optimizer_step:>7}  validation loss {values['val_loss']:.4f}")

    def video(self, tag: str, frames, fps: int, optimizer_step: int) -> None:
        """A video as an animated GIF in TensorBoard's image tab (what SummaryWriter.add_video writes, without
        its moviepy dependency)."""
        if self._writer is None:
            return
        from tensorboard.compat.proto.summary_pb2 import Summary

        from trainer.media import gif_bytes

        gif, (width, height) = gif_bytes(frames, fps)
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
