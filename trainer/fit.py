"""What fits a GPU: every way the trainer can lay a run out in memory, its estimated bytes per rank
(trainer/costs.py) and what it costs in speed, cheapest first. `launch/train.py --dry-run --gpu-memory 24`
prints it.

The ways: ZeRO-2 or ZeRO-3; gradient checkpointing off or on; the frozen block linears in the compute dtype or
in fp8 (model.weights_dtype, ZeRO-2 only); with checkpointing, its block inputs offloaded to the host
(model.activation_offload); sequence groups of 1, 2, 4 or 8 ranks (parallel.sequence) where the ranks, the heads
and the video tokens divide. "Cheapest" ranks them by what each adds to a step: first the recomputation
checkpointing adds (a share of the step's FLOPs), then the bytes a rank moves per micro-step beyond the LoRA
gradients' reduction (ZeRO-3's gathers, the offload's copies, the all-to-alls), then fp8 last among equals (it
changes the numbers a little; the others do not), then ZeRO-2 before ZeRO-3 and the smaller first.
"""

from __future__ import annotations

from dataclasses import dataclass

from trainer.costs import CostModel, ZeroSettings

# An estimate fits when it is at most this share of the GPU: the CUDA context, the allocator's caching and the
# framework's own buffers take the rest (the planner's "leave 10-20 %").
HEADROOM = 0.85
SEQUENCE_GROUPS = (1, 2, 4, 8)


@dataclass(frozen=True)
class Way:
    stage: int
    checkpointing: bool
    fp8: bool
    offload: bool
    sequence: int
    device_bytes: float
    host_bytes: float
    recompute: float  # extra FLOPs over the step without checkpointing, as a share of it
    moved_bytes: float  # per micro-step and rank

    def spec_fields(self) -> str:
        """The spec settings that choose it (--set form; the shipped DeepSpeed config of its stage)."""
        return ", ".join([f"deepspeed.config=zero{self.stage}", f"deepspeed.stage={self.stage}",
                          f"model.gradient_checkpointing={str(self.checkpointing).lower()}",
                          *(["model.weights_dtype=fp8"] if self.fp8 else []),
                          *(["model.activation_offload=true"] if self.offload else []),
                          *([f"parallel.sequence={self.sequence}"] if self.sequence > 1 else [])])

    def describe(self) -> str:
        return " + ".join([f"ZeRO-{self.stage}", *(["checkpointing"] if self.checkpointing else []),
                           *(["fp8"] if self.fp8 else []), *(["offload"] if self.offload else []),
                           *([f"sequence {self.sequence}"] if self.sequence > 1 else [])])

    def cost_key(self) -> tuple[float, float, bool, int, float]:
        # ties (one rank: ZeRO-3 gathers nothing) go to ZeRO-2, whose hooks cost nothing, then to less memory
        return (round(self.recompute, 6), self.moved_bytes, self.fp8, self.stage, self.device_bytes)


def ways(costs: CostModel, shape: tuple[int, ...], micro: int, zero: dict[int, ZeroSettings], dtype_bytes: int,
         world_size: int) -> list[Way]:
    """Every combination that can run on ``world_size`` ranks, cheapest first."""
    tokens, flops = costs.video_tokens(shape), costs.flops(shape)
    groups = [n for n in SEQUENCE_GROUPS if world_size % n == 0 and costs.heads % n == 0 and tokens % n == 0]
    recomputed = flops.train_checkpointed / flops.train - 1
    found = []
    for stage, settings in zero.items():
        for checkpointing in (False, True):
            for fp8 in (False, True) if stage == 2 else (False,):
                for offload in (False, True) if checkpointing else (False,):
                    for n in groups:
                        est = costs.memory(shape, micro, settings, dtype_bytes, checkpointing, n,
                                           storage_bytes=1 if fp8 else None, offload=offload)
                        moved = costs.moved_bytes(shape, micro, settings, dtype_bytes, checkpointing, n, offload)
                        found.append(Way(stage, checkpointing, fp8, offload, n, est.total, sum(est.host.values()),
                                         recomputed if checkpointing else 0.0, moved))
    return sorted(found, key=Way.cost_key)


def fits(way: Way, gpu_bytes: float) -> bool:
    return way.device_bytes <= HEADROOM * gpu_bytes
