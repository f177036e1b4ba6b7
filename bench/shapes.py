#!/usr/bin/env python
"""Mixed shapes: the fraction of step time a rank waits for its peers, with the old plan and the trainer's.

    python bench/shapes.py                    # the CPU model, 2 ranks, buckets 25x192x256 and 9x96x128
    python bench/shapes.py --steps 4          # shorter

Two buckets of very different cost (1,344 and 144 video tokens per sample), 16 samples each, 2 ranks x
accumulation 2, fp32 (this CPU emulates bf16). Each rank trains its micro-batches of trainer/data.py's
MicroBatches with the trainer's model and objective (forward, backward), then all-reduces its LoRA gradients,
as data parallelism does at every optimizer step. That all-reduce moves a few kB: its time is the wait for
the slowest rank. Two plans of the same epochs:
  per micro-batch   group 1: each micro-batch's shape independent of its peers' (the plan before)
  per step          group = ranks x accumulation: every micro-batch of an optimizer step one shape (the trainer)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

from common import ROOT, SIZES, free_port, machine, print_table, rank_env, write_model  # noqa: E402

BUCKETS = ((25, 192, 256), (9, 96, 128))
ACCUMULATION = 2
WARMUP_STEPS = 2


def worker(rank: int, world_size: int, port: int, model_dir: str, shards: list[str], steps: int, out: str) -> None:
    rank_env(rank, world_size, port)
    import torch.distributed as dist

    from trainer.data import MicroBatches
    from trainer.families import load_family
    from trainer.process_env import share_cpu_threads
    from trainer.shard_index import build_index
    from trainer.spec import LoraSection

    dist.init_process_group("gloo")
    share_cpu_threads()
    family = load_family(model_dir)
    shapes, objective = family.sample_shapes(), family.objective()
    model = family.load(LoraSection(rank=16), torch.float32, False, 0)
    params = [p for p in model.parameters() if p.requires_grad]
    index = build_index(shards, shapes)
    results = {}
    for name, group in (("per micro-batch", 1), ("per step", world_size * ACCUMULATION)):
        data = MicroBatches(index, seed=0, micro_batch_size=1, rank=rank, world_size=world_size, shapes=shapes,
                            group=group)
        generator = torch.Generator().manual_seed(rank)
        step_s, wait_s, mixed = [], [], 0
        for step in range(WARMUP_STEPS + steps):
            dist.barrier()  # every rank starts the step together
            start = time.perf_counter()
            seen = set()
            for micro in range(ACCUMULATION):
                batch = data[step * ACCUMULATION + micro]
                seen.add(tuple(batch.latents.shape[1:]))
                x0 = model.prepare_latents(batch.latents.float())
                t = torch.randint(0, objective.num_train_timesteps, (1,), generator=generator)
                loss = objective.training_loss(model, x0, batch.prompt_embeds.float(), t, generator, torch.float32)
                loss.mean().backward()
            waiting = time.perf_counter()
            flat = torch.cat([p.grad.flatten() for p in params if p.grad is not None])
            dist.all_reduce(flat)  # returns when the slowest rank has sent its gradients
            done = time.perf_counter()
            for p in params:
                p.grad = None
            everyone: list = [None] * world_size
            dist.all_gather_object(everyone, sorted(seen))
            if step >= WARMUP_STEPS:
                step_s.append(done - start)
                wait_s.append(done - waiting)
                mixed += len({shape for shapes_ in everyone for shape in map(tuple, shapes_)}) > 1
        results[name] = {"step_s": step_s, "wait_s": wait_s, "mixed": mixed}
    Path(out, f"rank{rank}.json").write_text(json.dumps(results))
    # Leave together and at once: tearing the process group down (or letting the interpreter do it) while the
    # peer still talks to rank 0's store aborted a rank now and then (std::terminate, 1 run in 4-8 here).
    dist.barrier()
    os._exit(0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=sorted(SIZES), default="cpu")
    p.add_argument("--steps", type=int, default=12, help="timed optimizer steps per plan (after warm-up)")
    args = p.parse_args(argv)
    from data_tools.synth import write_synthetic_shards

    world_size = 2
    with tempfile.TemporaryDirectory(prefix="bench-shapes-") as tmp:
        work = Path(tmp)
        model = write_model(work, args.size)
        shards: list[str] = []
        for i, (frames, height, width) in enumerate(BUCKETS):
            shards += map(str, write_synthetic_shards(model, work / f"bucket{i}", 16, 4, frames, height, width,
                                                      seed=100 * i))
        mp.spawn(worker, args=(world_size, free_port(), str(model), shards, args.steps, tmp), nprocs=world_size)
        ranks = [json.loads((work / f"rank{r}.json").read_text()) for r in range(world_size)]
    rows = []
    for name in ranks[0]:
        step = statistics.mean(s for r in ranks for s in r[name]["step_s"])
        wait = sum(w for r in ranks for w in r[name]["wait_s"]) / sum(s for r in ranks for s in r[name]["step_s"])
        rows.append([name, step, f"{wait:.1%}", f"{ranks[0][name]['mixed']} of {args.steps}"])
    print(f"\n{machine()}; model '{args.size}', buckets {' and '.join('x'.join(map(str, b)) for b in BUCKETS)}, "
          f"{world_size} ranks x accumulation {ACCUMULATION}, fp32; {args.steps} timed steps per plan after "
          f"{WARMUP_STEPS} of warm-up")
    print_table("shapes of one optimizer step", ["plan", "mean s/step", "waiting for peers", "mixed steps"], rows)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
