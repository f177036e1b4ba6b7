#!/usr/bin/env python
"""Sequence parallelism's memory: activation bytes per rank with parallel.sequence 2 against 1, measured and
planned, and the all-to-all bytes a rank sends per micro-step.

    python bench/sequence.py                 # the `cpu` model (8 blocks of 8 heads x 64) at 49x192x256, fp32
    python bench/sequence.py --video 25x192x256 --checkpointing off

Two ranks (gloo on a CPU) load the trainer's transformer with a rank-16 LoRA and run one micro-step's forward
and backward (trainer/loop.py sample_losses) on the same sample: first each rank the whole model
(parallel.sequence 1), then the two as one sequence group, the video tokens split (trainer/sequence.py), and
last, as a control, each rank alone with the exchange's collectives replaced by local copies of the same shapes
(ShapesOnly: the model's own memory, without what the collectives hold; gloo keeps the buffers of recent
collectives alive on its threads). Per rank:
  saved      bytes autograd keeps from the forward pass for the backward (storages other than weights)
  peak       the peak of live tensor bytes above what was live before the forward (the CPU allocator's events,
             torch.profiler; torch.cuda.max_memory_allocated on a GPU): activations, gradients in flight,
             temporaries
  planned    trainer/costs.py's activation estimate for the same sample (what --dry-run prints)
  sent       bytes this rank sent in the micro-step's all-to-alls and gathers (forward, recomputation and
             backward), counted at torch.distributed's calls; planned beside it
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from datetime import timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

from common import SIZES, free_port, machine, print_table, rank_env, write_model  # noqa: E402

MiB = 2**20


def live_peak(prof) -> int:
    """The peak of live CPU tensor bytes over a profile, above what was live when it began: the allocator's own
    running total, which each allocation event carries. (Summing the events' sizes instead misses frees made on
    gloo's threads, which the profiler does not record: collectives' buffers would look leaked.)"""
    totals = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        event = stack.pop()
        stack.extend(event.children)
        fields = event.extra_fields
        if hasattr(fields, "total_allocated") and fields.device.type == "cpu":
            totals.append((event.start_time_ns, fields.total_allocated, fields.alloc_size))
    totals.sort()
    before = totals[0][1] - totals[0][2]  # the total just before the first event
    return max(total for _, total, _ in totals) - before


def count_sent(size: int) -> dict[str, int]:
    """Count what this rank sends through torch.distributed's all-to-all and all-gather (which DeepSpeed's
    exchange and trainer/sequence.py call), forward, recomputed forward and backward alike."""
    import torch.distributed as dist

    sent = {"bytes": 0}
    all_to_all, all_gather = dist.all_to_all_single, dist.all_gather

    def counted_all_to_all(output, input, *args, **kwargs):
        sent["bytes"] += input.numel() * input.element_size() * (size - 1) // size  # its own chunk stays
        return all_to_all(output, input, *args, **kwargs)

    def counted_all_gather(outputs, input, *args, **kwargs):
        sent["bytes"] += input.numel() * input.element_size() * (size - 1)  # to each of the others
        return all_gather(outputs, input, *args, **kwargs)

    dist.all_to_all_single, dist.all_gather = counted_all_to_all, counted_all_gather  # type: ignore[assignment]
    return sent


class ShapesOnly:
    """The control: the exchange's tensors, shapes and autograd graph on one rank, from local copies instead of
    collectives (the numbers are wrong; the memory is the model's own, without the collectives' buffers)."""

    def __init__(self, size: int, rank: int):
        self.size, self.rank = size, rank

    def split(self, x, dim):
        return x.chunk(self.size, dim)[self.rank]

    def gather(self, x, dim):
        return torch.cat([x] * self.size, dim)

    def scatter_heads(self, x):
        return torch.cat([x] * self.size, 1).chunk(self.size, 2)[self.rank].contiguous()

    def gather_heads(self, x):
        return torch.cat([x.chunk(self.size, 1)[self.rank]] * self.size, 2).contiguous()

    def local_heads(self, x):
        return x.chunk(self.size, 2)[self.rank]

    def all_heads(self, x):
        return torch.cat([x] * self.size, 2)


def worker(rank: int, world: int, port: int, model_dir: str, video: tuple[int, int, int], checkpointing: bool,
           out: str) -> None:
    rank_env(rank, world, port)
    from torch.autograd.graph import saved_tensors_hooks
    from torch.profiler import ProfilerActivity, profile

    from trainer import sequence
    from trainer.costs import CostModel
    from trainer.engine import init_distributed
    from trainer.families import load_family
    from trainer.loop import sample_losses
    from trainer.parallel import ParallelLayout
    from trainer.spec import LoraSection

    init_distributed(timedelta(minutes=30))
    torch.set_num_threads(1)
    _, exchange = sequence.join(ParallelLayout.from_process_group(sequence=world))
    sent = count_sent(world)
    family = load_family(model_dir)
    lora = LoraSection(rank=16)
    shape = family.latent_shape(*video, str)
    costs = CostModel(family, lora)
    results = {}
    for split in (1, world, "control"):
        model = family.load(lora, torch.float32, checkpointing, seed=0)
        model.train()
        if split != 1:
            family.split_sequence(model.transformer, exchange if split == world  # type: ignore[arg-type]
                                  else ShapesOnly(world, rank))
        n = 1 if split == 1 else world
        sent["bytes"] = 0
        weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
        draws = torch.Generator().manual_seed(0)
        latents = torch.randn(1, *shape, generator=draws)
        prompt = torch.randn(1, costs.text_len, model.config.text_embed_dim, generator=draws)
        kept: dict[int, int] = {}

        def pack(tensor, weights=weights, kept=kept):
            storage = tensor.untyped_storage()
            if storage.data_ptr() not in weights:
                kept[storage.data_ptr()] = storage.nbytes()
            return tensor

        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            with saved_tensors_hooks(pack, lambda tensor: tensor):
                _, per_sample = sample_losses(model, model, family.objective(), latents, prompt, torch.tensor([500]),
                                              torch.Generator().manual_seed(1), torch.float32)
            saved = sum(kept.values())
            per_sample.sum().backward()
        results[split] = {"saved": saved, "peak": live_peak(prof),
                          "planned": costs.activation_bytes(shape, 4, checkpointing, n),
                          "planned_saved": costs.saved_activation_bytes(shape, 4, checkpointing, n),
                          "sent": sent["bytes"], "planned_sent": costs.exchange_bytes(shape, 4, checkpointing, n)}
        del model
    Path(out, f"rank{rank}.json").write_text(json.dumps(results))
    torch.distributed.barrier()
    os._exit(0)  # at once, together: a teardown racing the peer's aborts it now and then (bench/shapes.py)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=sorted(SIZES), default="cpu")
    p.add_argument("--video", default="49x192x256", help="FRAMESxHEIGHTxWIDTH (default 49x192x256)")
    p.add_argument("--checkpointing", choices=["on", "off", "both"], default="both")
    args = p.parse_args(argv)
    video = tuple(int(v) for v in args.video.split("x"))
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-sequence-") as tmp:
        model = write_model(Path(tmp), args.size)
        for checkpointing in {"on": [True], "off": [False], "both": [False, True]}[args.checkpointing]:
            out = Path(tmp, f"checkpointing-{checkpointing}")
            out.mkdir()
            mp.spawn(worker, args=(2, free_port(), str(model), video, checkpointing, str(out)), nprocs=2)
            ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
            whole, split, control = ({key: max(r[n][key] for r in ranks) for key in ranks[0][n]}
                                     for n in ("1", "2", "control"))
            label = f"checkpointing {'on' if checkpointing else 'off'}"
            for name, r in ((f"{label}, parallel.sequence 1", whole), (f"{label}, parallel.sequence 2", split),
                            (f"{label}, 2, control: no collectives", control)):
                rows.append([name, r["saved"] / MiB, r["planned_saved"] / MiB, r["peak"] / MiB, r["planned"] / MiB,
                             f"{r['planned'] / r['peak'] - 1:+.1%}", r["sent"] / MiB, r["planned_sent"] / MiB])
            rows.append([f"{label}: 2 / 1 (control / 1)", split["saved"] / whole["saved"],
                         split["planned_saved"] / whole["planned_saved"],
                         f"{split['peak'] / whole['peak']:.3g} ({control['peak'] / whole['peak']:.3g})",
                         split["planned"] / whole["planned"], "", "", ""])
    frames, height, width = video
    print(f"\n{machine()}; `{args.size}` model, one {frames}x{height}x{width} sample, fp32, rank-16 LoRA; per rank, "
          f"the larger of the two")
    print_table("activations per rank (MiB)", ["", "saved", "planned", "peak", "planned", "planned/peak-1",
                                               "sent", "planned"], rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
