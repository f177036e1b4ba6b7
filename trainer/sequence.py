"""Sequence parallelism (DeepSpeed-Ulysses): the collectives of one sequence group, and the groups DeepSpeed uses.

With ``parallel.sequence`` N > 1, the N consecutive ranks of a sequence group (trainer/parallel.py) train one
micro-batch together. Each holds 1/N of its video tokens, in order, through every block; attention trades that
split for 1/N of the heads over the whole sequence and back (DeepSpeed's ``_SeqAllToAll``, the all-to-all of
its ``DistributedAttention``). The prompt's tokens and the timestep conditioning stay whole on every rank.
The family decides where in its transformer these calls go (families/cogvideox_ulysses.py); this module owns
the process groups and the collectives, so that model code never imports deepspeed.

DeepSpeed learns the layout from ``parallel_state_sp``, the model-parallel unit its Ulysses support ships
(``deepspeed.initialize(mpu=...)``): ZeRO partitions and reduces gradients over the whole world (sequence x
data), and averages them over the data-parallel ranks only. That is right for the split here: each rank's
gradients are its part of its group's micro-batch gradient (the parts sum to it), because every rank's
loss is the same full-sample loss and the gather before it hands each rank the gradient of its own tokens.

Splits are even: the video tokens of every sample must be a multiple of N (``check_split``), and so must
the heads; a clip that cannot be split is refused at start-up rather than padded (padding would need an
attention mask, which rules out the flash kernels).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from trainer.errors import UserError
from trainer.parallel import ParallelLayout

if TYPE_CHECKING:
    from trainer.families.base import ModelFamily
    from trainer.shard_index import SampleRef, ShardIndex


def check_heads(heads: int, sequence: int, model: str) -> None:
    if heads % sequence:
        fits = [n for n in range(2, heads + 1) if heads % n == 0]
        raise UserError(f"parallel.sequence: {sequence} does not divide the {heads} attention heads of {model}: "
                        f"each rank of a sequence group attends with 1/N of them (it divides by "
                        f"{', '.join(map(str, fits[:8]))}{' ...' if len(fits) > 8 else ''})")


def check_split(tokens: int, sequence: int, what: str) -> None:
    """``what`` (a sample's grid, a clip) has ``tokens`` video tokens, split evenly over the sequence group."""
    if sequence > 1 and tokens % sequence:
        fits = [n for n in range(2, 17) if tokens % n == 0]
        raise UserError(f"parallel.sequence: {sequence} does not divide the {tokens:,} video tokens of {what}: "
                        f"each rank holds an equal share (this size splits over "
                        f"{', '.join(map(str, fits)) if fits else 'no group of 2 to 16'} rank(s)); pack or "
                        f"sample clips whose token count it divides, or choose another parallel.sequence")


def check_index(index: ShardIndex, family: ModelFamily, sequence: int, field: str) -> None:
    """Every latent shape of ``index`` splits over the sequence group (build, before the model loads)."""
    if sequence == 1:
        return
    by_shape: dict[tuple[int, ...], list[SampleRef]] = {}
    for ref in index.samples:
        by_shape.setdefault(ref.shape, []).append(ref)
    for shape, refs in by_shape.items():
        first = refs[0]
        check_split(family.structure().video_tokens(shape), sequence,
                    f"{field}: shard {index.shards[first.shard]}, sample {first.key!r} (latents {list(shape)}"
                    + (f"; {len(refs) - 1} more sample(s) of that shape)" if len(refs) > 1 else ")"))


def join(layout: ParallelLayout) -> tuple[Any, UlyssesExchange] | tuple[None, None]:
    """Build the sequence and sequence-data groups (every rank calls this, once): DeepSpeed's model-parallel
    unit for ``deepspeed.initialize(mpu=...)`` and this rank's exchange; (None, None) without a split."""
    if layout.sequence == 1:
        return None, None
    from deepspeed.runtime.sequence_parallel import parallel_state_sp

    parallel_state_sp.initialize_sequence_parallel(layout.sequence)
    return parallel_state_sp, UlyssesExchange(parallel_state_sp.get_sequence_parallel_group(), layout.sequence,
                                              layout.sequence_rank)


class UlyssesExchange:
    """The collectives of one sequence group, as model code calls them (families/base.py SequenceExchange).
    Tensors are [B, tokens, ...] or [B, tokens, heads, head_dim]; token chunks and head groups go in rank order."""

    def __init__(self, group: Any, size: int, rank: int):
        self.group, self.size, self.rank = group, size, rank

    def split(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """This rank's chunk of ``dim`` (a view; the gradient of the rest is zero here)."""
        if x.shape[dim] % self.size:
            raise ValueError(f"{x.shape[dim]} tokens do not split over {self.size} ranks (check_split)")
        return x.chunk(self.size, dim)[self.rank]

    def gather(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """Every rank's chunk, concatenated along ``dim``. What follows must be the same on every rank of the
        group (the loss): the backward then keeps this rank's chunk of the gradient, no communication."""
        return _GatherSame.apply(x, dim, self)

    def scatter_heads(self, x: torch.Tensor) -> torch.Tensor:
        """[B, S/N, H, D] -> [B, S, H/N, D]: the whole sequence, this rank's heads."""
        from deepspeed.sequence.layer import _SeqAllToAll

        return _SeqAllToAll.apply(self.group, x.contiguous(), 2, 1, 0)

    def gather_heads(self, x: torch.Tensor) -> torch.Tensor:
        """[B, S, H/N, D] -> [B, S/N, H, D]: the inverse of ``scatter_heads``."""
        from deepspeed.sequence.layer import _SeqAllToAll

        return _SeqAllToAll.apply(self.group, x.contiguous(), 1, 2, 0)

    def local_heads(self, x: torch.Tensor) -> torch.Tensor:
        """[B, L, H, D] held whole by every rank (the prompt's tokens) -> this rank's heads [B, L, H/N, D]."""
        return x.chunk(self.size, 2)[self.rank]

    def all_heads(self, x: torch.Tensor) -> torch.Tensor:
        """[B, L, H/N, D] -> [B, L, H, D] on every rank. The ranks use the result differently (each attends
        with its own heads next), so the backward sums their gradients of this rank's heads (a reduce-scatter,
        run as an all-to-all: gloo has no reduce-scatter, and torch's differentiable all-gather falls back to
        scatters addressed by global rank, which fail in a group that does not start at rank 0)."""
        return _GatherSummed.apply(x, 2, self)


def _all_gather(x: torch.Tensor, dim: int, exchange: UlyssesExchange) -> torch.Tensor:
    parts = [torch.empty_like(x) for _ in range(exchange.size)]
    dist.all_gather(parts, x.contiguous(), group=exchange.group)
    return torch.cat(parts, dim)


class _GatherSummed(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, dim: int, exchange: UlyssesExchange) -> torch.Tensor:
        ctx.dim, ctx.exchange = dim, exchange
        return _all_gather(x, dim, exchange)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        exchange = ctx.exchange
        sent = torch.stack(grad.chunk(exchange.size, ctx.dim)).contiguous()  # [N, ...]: rank j's heads to rank j
        received = torch.empty_like(sent)
        dist.all_to_all_single(received, sent, group=exchange.group)
        return received.sum(0), None, None


class _GatherSame(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, dim: int, exchange: UlyssesExchange) -> torch.Tensor:
        ctx.dim, ctx.exchange = dim, exchange
        return _all_gather(x, dim, exchange)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        return grad.chunk(ctx.exchange.size, ctx.dim)[ctx.exchange.rank].contiguous(), None, None
