"""The parallel layout: which rank does what, built once at start-up, and the collectives the trainer runs.

The world is data-parallel x sequence-parallel. Rank r belongs to data-parallel rank r // S and sequence
rank r % S, where S is the sequence-parallel size: the S ranks of one sequence group are consecutive (so
that one node can hold whole groups and their all-to-alls stay on its links; start-up warns where one does
not) and train the same micro-batch; data
order, timesteps, noise and the batch arithmetic follow the data-parallel rank. S is the spec's
parallel.sequence (1: every rank is a data-parallel rank); trainer/sequence.py builds the groups' collectives.

Everything else asks this object, never torch.distributed, for ranks and sizes; the collectives here run over
the whole world and must be called by every rank.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from trainer.errors import UserError


@dataclass(frozen=True)
class ParallelLayout:
    world_size: int
    rank: int = 0
    sequence: int = 1  # ranks that share one sample's tokens

    def __post_init__(self) -> None:
        if self.sequence < 1 or self.world_size % self.sequence:
            raise UserError(f"parallel.sequence: the world of {self.world_size} rank(s) cannot be split into "
                            f"sequence-parallel groups of {self.sequence}: the number of ranks must be a multiple "
                            f"of it")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} outside a world of {self.world_size}")

    @classmethod
    def from_process_group(cls, sequence: int = 1) -> ParallelLayout:
        """The layout of the process group this process joined (trainer/engine.py init_distributed)."""
        return cls(dist.get_world_size(), dist.get_rank(), sequence)

    @property
    def data_size(self) -> int:
        """Data-parallel ranks: micro-batches trained side by side."""
        return self.world_size // self.sequence

    @property
    def data_rank(self) -> int:
        return self.rank // self.sequence

    @property
    def sequence_rank(self) -> int:
        return self.rank % self.sequence

    @property
    def is_main(self) -> bool:
        """Rank 0 writes the run's shared files (spec, logs, exports, markers)."""
        return self.rank == 0

    def sequence_groups(self) -> list[tuple[int, ...]]:
        """The ranks of each sequence-parallel group, by data-parallel rank."""
        return [tuple(range(d * self.sequence, (d + 1) * self.sequence)) for d in range(self.data_size)]

    def data_groups(self) -> list[tuple[int, ...]]:
        """The ranks that hold the same part of each sample (one data-parallel group per sequence rank)."""
        return [tuple(range(s, self.world_size, self.sequence)) for s in range(self.sequence)]

    # Collectives over the whole world: every rank calls them, in the same order. A world of one has nothing
    # to exchange: they return at once (the per-step decision and the log step's sums cost a gloo round trip
    # each otherwise).

    def all_gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order, on every rank (pickled: our own ranks' objects only)."""
        if self.world_size == 1:
            return [obj]
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, obj)
        return gathered

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over the ranks, in place; returns it."""
        if self.world_size > 1:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def sum(self, values: list) -> torch.Tensor:
        """All-reduce sum of a few numbers (device tensors or Python numbers) as one float64 vector on the CPU.
        A sync point: call it on log steps only."""
        device = next((v.device for v in values if isinstance(v, torch.Tensor)), torch.device("cpu"))
        vector = torch.stack([torch.as_tensor(v, dtype=torch.float64, device=device) for v in values])
        return self.all_reduce_sum(vector).cpu()

    def max(self, values: list[float]) -> torch.Tensor:
        """All-reduce max of a few Python numbers as one float64 vector on the CPU."""
        vector = torch.tensor(values, dtype=torch.float64)
        if self.world_size == 1:
            return vector
        if dist.get_backend() == "nccl":  # NCCL reduces device tensors only
            vector = vector.cuda()
        dist.all_reduce(vector, op=dist.ReduceOp.MAX)
        return vector.cpu()


def rank_in(group: Any) -> int:
    """This process's rank in a process group DeepSpeed made (ZeRO-3's partition group; None: the world)."""
    return dist.get_rank(group=group)
