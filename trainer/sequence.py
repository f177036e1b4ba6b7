"""Sequence parallelism (DeepSpeed-Ulysses): the collectives of one sequence group, and the groups DeepSpeed uses.

With ``parallel.sequence`` N > 1, the N consecutive ranks of a sequence group (trainer/parallel.py) train one
micro-batch together. Each holds 1/N of its video tokens, in order, through every block; attention trades that
split for 1/N of the heads over the whole sequence and back (DeepSpeed's ``_SeqAllToAll``, the all-to-all of
its ``DistributedAttention``). The prompt's tokens and the timestep conditioning stay whole on every rank.
The family decides where in its transformer these calls go (families/cogvideox_ulysses.py); this module owns
the process groups and the collectives, so that model code never imports deepspeed.

DeepSpeed learns the layout from ``parallel_state_sp``, the model-parallel unit its Ulysses support ships
(``deepspeed.initialize(mpu=...)``): ZeRO partitions and reduces gradients over the whole world (sequence x
data), and averages them over the data-parallel ranks only (under ZeRO-3 on its all-reduce path, which
trainer/engine.py selects). That is right for the split here: each rank's
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
    video_tokens = family.structure().video_tokens
    for shape, refs in by_shape.items():
        first = refs[0]
        check_split(video_tokens(shape), sequence,
                    f"{field}: shard {index.shards[first.shard]}, sample {first.key!r} (latents {list(shape)}"
                    + (f"; {len(refs) - 1} more sample(s) of that shape)" if len(refs) > 1 else ")"))


def check_buckets(ds_config: dict, largest: int) -> None:
    """ZeRO-3 takes its all-reduce path (trainer/engine.py) only for a bucket of at most reduce_bucket_size
    elements: a trainable tensor larger than that would go through the reduce-scatter, N times too small."""
    zero = ds_config["zero_optimization"]
    size = int(zero.get("reduce_bucket_size", 500_000_000))
    if zero["stage"] == 3 and size < largest:
        raise UserError(f"deepspeed.config: zero_optimization.reduce_bucket_size is {size:,} elements, less than "
                        f"the largest LoRA tensor ({largest:,}); with parallel.sequence > 1 ZeRO-3 must reduce "
                        f"every gradient in a bucket: raise it")


def spanning_nodes(layout: ParallelLayout, hosts: list[str], per_node: int) -> str | None:
    """A warning where a sequence group spans nodes (its all-to-alls then cross the network): by hostname, or,
    where the hosts look alike (containers, simulated nodes), by the launcher's ranks per node."""
    groups = [g for g in layout.sequence_groups() if len({hosts[r] for r in g}) > 1]
    if not groups and per_node % layout.sequence == 0:
        return None
    where = (f"ranks {groups[0][0]}-{groups[0][-1]} are on {len({hosts[r] for r in groups[0]})} hosts" if groups
             else f"{per_node} rank(s) on this node")
    return (f"parallel.sequence {layout.sequence} with {where}: a sequence group spans nodes, and the all-to-alls "
            f"of every attention cross the network; choose a parallel.sequence that divides the ranks per node, "
            f"with each node's ranks consecutive")


def join(layout: ParallelLayout) -> tuple[Any, UlyssesExchange] | tuple[None, None]:
    """Build the sequence and sequence-data groups (every rank calls this, once): DeepSpeed's model-parallel
    unit for ``deepspeed.initialize(mpu=...)`` and this rank's exchange; (None, None) without a split."""
    if layout.sequence == 1:
        return None, None
    from deepspeed.runtime.sequence_parallel import parallel_state_sp

    parallel_state_sp.initialize_sequence_parallel(layout.sequence)
    return _SequenceUnit(parallel_state_sp), UlyssesExchange(parallel_state_sp.get_sequence_parallel_group(),
                                                            layout.sequence, layout.sequence_rank)


class _SequenceUnit:
    """DeepSpeed's ``parallel_state_sp`` as the engine's mpu, saying what it leaves out: no tensor parallelism.
    It aliases the model-parallel size to the sequence size, so DeepSpeed's checkpoints would otherwise record a
    tensor-parallel degree of N over one model file, and its universal conversion and loading (a resume on
    another number of ranks) would fail."""

    def __init__(self, unit: Any):
        self._unit = unit

    def __getattr__(self, name: str) -> Any:
        return getattr(self._unit, name)

    @staticmethod
    def get_tensor_model_parallel_world_size() -> int:
        return 1

    @staticmethod
    def get_tensor_model_parallel_rank() -> int:
        return 0


class UlyssesExchange:
    """The collectives of one sequence group, as model code calls them (families/base.py SequenceExchange).
    Tensors are [B, tokens, ...] or [B, tokens, heads, head_dim]; token chunks and head groups go in rank order."""

    def __init__(self, group: Any, size: int, rank: int):
        self.group, self.size, self.rank = group, size, rank

    def all_valid(self, valid: torch.Tensor) -> torch.Tensor:
        """Which samples of the group's micro-batch every rank could read (a bool mask, the same on each)."""
        agreed = valid.to(torch.uint8)
        dist.all_reduce(agreed, op=dist.ReduceOp.MIN, group=self.group)
        return agreed.bool()

    def split(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """This rank's chunk of ``dim`` (a view; the gradient of the rest is zero here)."""
        if x.shape[dim] % self.size:
            raise ValueError(f"{x.shape[dim]} tokens do not split over {self.size} ranks (check_split)")
        return x.chunk(self.size, dim)[self.rank]

    def gather(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """Every rank's chunk, concatenated along ``dim``. What follows must be the same on every rank of the
        group (the loss): the backward then keeps this rank's chunk of the gradient, no communication."""
        return _Gather.apply(x, dim, self, False)

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
        return _Gather.apply(x, 2, self, True)


class _Gather(torch.autograd.Function):
    """Every rank's ``x`` concatenated along ``dim``. The backward either sums every rank's gradient of this
    rank's chunk (``summed``: the ranks use the result differently) or keeps this rank's chunk of its own
    gradient (the ranks use it alike)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, dim: int, exchange: UlyssesExchange, summed: bool) -> torch.Tensor:
        ctx.dim, ctx.exchange, ctx.summed = dim, exchange, summed
        parts = [torch.empty_like(x) for _ in range(exchange.size)]
        dist.all_gather(parts, x.contiguous(), group=exchange.group)
        return torch.cat(parts, dim)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        exchange = ctx.exchange
        if not ctx.summed:
            return grad.chunk(exchange.size, ctx.dim)[exchange.rank].contiguous(), None, None, None
        sent = torch.stack(grad.chunk(exchange.size, ctx.dim)).contiguous()  # [N, ...]: rank j's chunk to rank j
        received = torch.empty_like(sent)
        dist.all_to_all_single(received, sent, group=exchange.group)
        return received.sum(0), None, None, None
