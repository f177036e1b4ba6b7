"""What one log line sums up since the last: losses per timestep bucket, throughput, data wait, memory peaks.

Kept on the device (no host sync per step) or as host counts, and summed over the ranks at the log step. The
ranks of one sequence-parallel group train the same samples: their tokens and FLOPs count once.
"""

from __future__ import annotations

import resource
import time
from dataclasses import dataclass, field

import torch

from trainer.parallel import ParallelLayout

T_BUCKETS = 10  # the training loss is also logged per tenth of the timestep range


def bucket_names(num_train_timesteps: int) -> list[str]:
    """loss_t000_099, loss_t100_199, ... for T = 1000."""
    width = num_train_timesteps // T_BUCKETS
    return [f"loss_t{k * width:03d}_{(k + 1) * width - 1 if k < T_BUCKETS - 1 else num_train_timesteps - 1:03d}"
            for k in range(T_BUCKETS)]


@dataclass
class Interval:
    """Losses count for applied optimizer steps only (a skipped step's loss is not finite); time waiting for the
    next micro-batch and video tokens are this rank's, summed over the ranks at the log step.
    """

    device: torch.device
    num_train_timesteps: int
    layout: ParallelLayout
    peak_tflops: float | None = None  # the device's: MFU = achieved TFLOP/s per rank / peak
    captions: bool = False  # data.caption_dropout is on: log the fraction of samples trained with the empty caption
    loss: torch.Tensor = field(init=False)
    buckets: torch.Tensor = field(init=False)  # [2, T_BUCKETS]: loss sums and sample counts per timestep bucket
    applied: int = 0
    taken: int = 0
    tokens: int = 0
    flops: float = 0.0
    data_wait_s: float = 0.0
    samples: int = 0  # readable samples this rank trained on, and how many of them with the empty caption
    dropped: int = 0
    started: float = field(default_factory=time.perf_counter)
    tokens_logged: float = 0.0  # over all ranks, since this process started: for the summary

    def __post_init__(self) -> None:
        self.loss = torch.zeros((), dtype=torch.float64, device=self.device)
        self.buckets = torch.zeros(2, T_BUCKETS, dtype=torch.float64, device=self.device)

    def add(self, loss: torch.Tensor, buckets: torch.Tensor, tokens: int, flops: float, data_wait_s: float,
            applied: bool, captions: tuple[int, int] = (0, 0)) -> None:
        """One optimizer step: its mean loss and [2, T_BUCKETS] loss sums and counts (on the device), this rank's
        video tokens, model FLOPs and seconds waiting for data; whether its update was applied; its readable
        samples and those of them trained with the empty caption."""
        self.taken += 1
        self.samples += captions[0]
        self.dropped += captions[1]
        self.tokens += tokens
        self.flops += flops
        self.data_wait_s += data_wait_s
        if applied:
            self.loss += loss
            self.buckets += buckets
            self.applied += 1

    def flush(self, samples_per_step: int) -> dict[str, float]:
        """The interval's numbers over all ranks, then start over. Two collectives and a sync point."""
        layout, elapsed = self.layout, time.perf_counter() - self.started
        summed = layout.sum([self.loss, self.applied, self.tokens, self.flops, self.samples, self.dropped,
                             *self.buckets.flatten()]).tolist()
        (loss_sum, applied, tokens, flops, samples, dropped), bucket_values = summed[:6], summed[6:]
        tokens /= layout.sequence  # a sequence group's ranks each counted the samples they share
        self.tokens_logged += tokens
        peaks = memory_peaks(self.device)
        wait, *memory = layout.max([self.data_wait_s / elapsed, *peaks.values()]).tolist()
        values = {"loss": loss_sum / applied if applied else float("nan"),
                  "samples_per_s": self.taken * samples_per_step / elapsed, "tokens_per_s": tokens / elapsed,
                  "step_time_s": elapsed / self.taken, "data_wait_fraction": wait,
                  "tflops_per_s": flops / layout.sequence / elapsed / layout.world_size / 1e12,
                  **dict(zip(peaks, memory, strict=True))}
        if self.peak_tflops:
            values["mfu"] = values["tflops_per_s"] / self.peak_tflops
        if self.captions:  # a sequence group's ranks count the samples they share alike: the ratio is the same
            values["caption_dropout_fraction"] = dropped / samples if samples else 0.0
        sums, counts = bucket_values[:T_BUCKETS], bucket_values[T_BUCKETS:]
        for name, total, count in zip(bucket_names(self.num_train_timesteps), sums, counts, strict=True):
            values[name] = total / count if count else None
        self.loss.zero_()
        self.buckets.zero_()
        self.applied = self.taken = self.tokens = self.samples = self.dropped = 0
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
