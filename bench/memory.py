#!/usr/bin/env python
"""Memory per rank: measured against the planner's estimate, 1 vs 2 ranks, ZeRO-2 vs ZeRO-3.

    python bench/memory.py                  # the tiny model and the CPU benchmark model, 1 and 2 ranks
    python bench/memory.py --size tiny --ranks 1
    python bench/memory.py --size cpu --stage 2 --ranks 1 --mode ckpt --mode ckpt-fp8 --mode ckpt-offload

--mode (repeatable; default plain) sets the memory modes: plain, fp8 (model.weights_dtype), ckpt (gradient
checkpointing), ckpt-fp8, ckpt-offload (model.activation_offload); fp8 is ZeRO-2 only.

Each configuration starts its ranks (gloo on a CPU, one GPU each otherwise), builds the trainer's own run
(preflight, build: model, engine) and trains a few optimizer steps with its train_step. Per rank:
  frozen     bytes of frozen (base) weights the rank holds between steps (ZeRO-3: its partition, plus the
             small parameters kept whole)
  peak       the peak of live tensor bytes while training (the optimizer steps): torch.cuda.max_memory_allocated
             on a GPU; on a CPU the same count from the allocator's events (torch.profiler, profile_memory)
  estimate   trainer/costs.py's estimate for the same spec (what --dry-run prints): of the training peak
  step       what training adds at its peak to the live bytes it began with (the activations, gradients and
             buffers of a step: fp8 storage adds the upcast weights the backward keeps). On a CPU, with fp8, the
             peak column also counts the bf16 weights the loader allocated and the casting freed: the profile
             does not see those frees (the storages are gone: torch's weak references expire)
  start-up   the peak before the first step (model load, the engine's conversion of the model to ZeRO)
  rss        the process's peak resident memory (interpreter and libraries included)
  offloaded  with offload: the bytes the last forward pass copied to the host, and the planner's count of them
             (exact; its host line rounds each copy up to a power of two, as torch's pinned-memory cache does)
             (on a CPU the copies are host memory too, so the peak does not fall: only a GPU shows that)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

from common import SIZES, free_port, machine, print_table, rank_env, write_model, write_shards, write_spec  # noqa: E402

MiB = 2**20
MODES = {"plain": {}, "fp8": {"weights_dtype": "fp8"}, "ckpt": {"gradient_checkpointing": True},
         "ckpt-fp8": {"gradient_checkpointing": True, "weights_dtype": "fp8"},
         "ckpt-offload": {"gradient_checkpointing": True, "activation_offload": True}}


def frozen_bytes(model: torch.nn.Module) -> int:
    """Frozen parameters, and fp8's per-row scales (trainer/low_memory.py), as this rank holds them."""
    total = sum(b.numel() * b.element_size() for name, b in model.named_buffers() if name.endswith(".weight_scale"))
    for p in model.parameters():
        if p.requires_grad:
            continue
        partition = getattr(p, "ds_tensor", None)  # ZeRO-3: this rank's slice; p.data is empty unless gathered
        total += p.data.numel() * p.element_size() + (partition.numel() * partition.element_size()
                                                       if partition is not None else 0)
    return total


def live_peaks(prof, phase: str) -> tuple[int, int, int]:
    """Peaks of live CPU tensor bytes over a profile (every allocation +, every free -, summed in time order)
    before the ``phase`` range began (start-up) and from then on, and the live bytes when it began."""
    events = prof.profiler.kineto_results.events()
    begin = min(e.start_ns() for e in events if e.name() == phase)
    live, peaks, at_begin = 0, [0, 0], None
    for start, delta in sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]"):
        if start >= begin and at_begin is None:
            at_begin = live
        live += delta
        peaks[start >= begin] = max(peaks[start >= begin], live)
    return peaks[0], peaks[1], at_begin or live


def worker(rank: int, world_size: int, port: int, spec_path: str, steps: int, out: str) -> None:
    rank_env(rank, world_size, port)
    from torch.profiler import ProfilerActivity, profile

    from trainer.costs import ZeroSettings
    from trainer.data import MicroBatches, streaming
    from trainer.dtypes import PRECISIONS
    from trainer.loop import train_step
    from trainer.spec import load_spec
    from trainer.startup import build, preflight

    spec = load_spec(spec_path)
    plan = preflight(spec)
    cuda = torch.cuda.is_available()
    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    with prof if not cuda else contextlib.nullcontext():
        run, index, _ = build(spec, plan)
        dataset = MicroBatches(index, seed=0, micro_batch_size=spec.data.micro_batch_size, rank=rank,
                               world_size=world_size, shapes=plan.shapes)
        if cuda:
            torch.cuda.synchronize()
            startup_peak, resident = torch.cuda.max_memory_allocated(), torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        with streaming(dataset, threads=0) as stream, torch.profiler.record_function("training"):
            for step in range(1, steps + 1):
                train_step(run, stream, step)
    if cuda:
        peak = torch.cuda.max_memory_allocated()
        step = peak - resident
    else:
        startup_peak, peak, resident = live_peaks(prof, "training")
        step = peak - resident
    shape = index.samples[0].shape
    estimate = run.costs.memory(shape, spec.data.micro_batch_size, ZeroSettings.from_config(plan.ds_config, world_size),
                                PRECISIONS[spec.train.precision].itemsize, spec.model.gradient_checkpointing,
                                storage_bytes=1 if spec.model.weights_dtype == "fp8" else None,
                                offload=spec.model.activation_offload)
    Path(out, f"rank{rank}.json").write_text(json.dumps({
        "frozen": frozen_bytes(run.model), "peak": peak, "step": step, "startup_peak": startup_peak,
        "estimate": estimate.total,
        "parts": estimate.parts, "offloaded": run.offload.offloaded_bytes if run.offload else 0,
        "offload_estimate": spec.data.micro_batch_size * run.costs.saved_activation_bytes(
            shape, PRECISIONS[spec.train.precision].itemsize, True) if run.offload else 0,
        "rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
    torch.distributed.barrier()
    os._exit(0)  # at once, together: a teardown racing the peer's aborts it now and then (bench/shapes.py)


def measure(work: Path, size: str, world_size: int, stage: int, steps: int, mode: str = "plain") -> dict:
    model = write_model(work, size)
    shards = write_shards(work, model, size, 8)
    name = f"{size}-zero{stage}-{world_size}-{mode}"
    spec = write_spec(work / f"{name}.yaml", model, shards, steps=steps, stage=stage, model=MODES[mode])
    out = work / name
    out.mkdir(exist_ok=True)
    mp.spawn(worker, args=(world_size, free_port(), str(spec), steps, str(out)), nprocs=world_size)
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(world_size)]
    largest = {key: max(r[key] for r in ranks)
               for key in ("frozen", "peak", "step", "startup_peak", "estimate", "rss", "offloaded",
                           "offload_estimate")}
    return largest | {"parts": ranks[0]["parts"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=sorted(SIZES), action="append", help="model size (default: all)")
    p.add_argument("--ranks", type=int, choices=[1, 2], action="append", help="ranks (default: 1 and 2)")
    p.add_argument("--stage", type=int, choices=[2, 3], action="append", help="ZeRO stage (default: both)")
    p.add_argument("--mode", choices=sorted(MODES), action="append", help="memory modes (default: plain)")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--parts", action="store_true", help="also print the estimate's parts")
    args = p.parse_args(argv)
    rows, results = [], {}
    modes = args.mode or ["plain"]
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as tmp:
        for size in args.size or sorted(SIZES, reverse=True):
            for stage in args.stage or [2, 3]:
                for world_size in args.ranks or [1, 2]:
                    for mode in modes:
                        if "fp8" in mode and stage == 3:
                            continue  # refused: trainer/low_memory.py
                        r = results[(size, stage, world_size, mode)] = measure(Path(tmp), size, world_size, stage,
                                                                               args.steps, mode)
                        rows.append([f"{size}  ZeRO-{stage}  {world_size} rank(s)  {mode}", r["frozen"] / MiB,
                                     r["peak"] / MiB, r["step"] / MiB, r["estimate"] / MiB,
                                     f"{r['estimate'] / r['peak'] - 1:+.1%}",
                                     r["startup_peak"] / MiB, r["rss"] / MiB,
                                     f"{r['offloaded'] / MiB:.1f} / {r['offload_estimate'] / MiB:.1f}"
                                     if r["offloaded"] else ""])
                        if args.parts:
                            print(size, stage, world_size, mode, {k: f"{v / MiB:.2f}" for k, v in r["parts"].items()})
    print(f"\n{machine()}; {args.steps} optimizer steps; per rank, the largest over the ranks")
    print_table("memory per rank (MiB)", ["", "frozen", "peak", "step", "estimate", "est/peak-1", "start-up peak",
                                          "peak RSS", "offloaded / planned"], rows)
    for (size, stage, world_size, mode), r in results.items():
        if world_size == 2 and (size, stage, 1, mode) in results:
            ratio = r["frozen"] / results[(size, stage, 1, mode)]["frozen"]
            print(f"{size} ZeRO-{stage} {mode}: frozen bytes per rank, 2 ranks / 1 rank = {ratio:.3f}")
        base = results.get((size, stage, world_size, base_name(mode)))
        if "fp8" in mode and base is not None:
            print(f"{size} ZeRO-{stage} {world_size} rank(s) {mode}: frozen bytes fp8 / {base_name(mode)} = "
                  f"{r['frozen'] / base['frozen']:.3f}; a step adds {(r['step'] - base['step']) / MiB:+.1f} MiB "
                  f"(planned {(r['parts'].get('frozen weights upcast to compute', 0)) / MiB:+.1f}: the upcast "
                  f"copies autograd keeps)")
    return 0


def base_name(mode: str) -> str:
    return mode.replace("fp8", "").rstrip("-") or "plain"


if __name__ == "__main__":
    sys.exit(main())
