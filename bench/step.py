#!/usr/bin/env python
"""Step overhead: the trainer's steady-state time per optimizer step against a bare DeepSpeed loop.

    python bench/step.py                     # the CPU model (8 blocks of 8 heads x 64, 1,570 tokens), 1 rank
    python bench/step.py --size tiny --steps 4 --rounds 1   # the smoke test's

trainer  `python launch/train.py` on synthetic shards (reader threads, noise, timesteps, loss buckets, the
         per-step stop/save decision, logging every step): step_time_s from metrics.jsonl after the warm-up
         steps, and data_wait_fraction from the same records.
bare     the same model, DeepSpeed config and batches, already in memory and noised:
         engine(x_t, text, t), MSE on v, engine.backward, engine.step; nothing else.
The ratio trainer/bare is what the trainer costs on top of the model's own compute (1.00 would be free).
The two sides take turns (--rounds), so that the machine's drift over minutes falls on both alike; the medians
are over every timed step of every round.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import ROOT, SIZES, machine, print_table, write_model, write_shards, write_spec  # noqa: E402

WARMUP_STEPS = 2


def bare(spec_path: str, steps: int) -> list[float]:
    """Seconds per optimizer step of the bare loop, after WARMUP_STEPS steps (one rank)."""
    from datetime import timedelta

    import torch
    import torch.nn.functional as F

    from trainer.data import MicroBatches
    from trainer.dtypes import PRECISIONS
    from trainer.engine import build_engine, init_distributed
    from trainer.process_env import share_cpu_threads
    from trainer.shard_index import build_index
    from trainer.spec import load_spec
    from trainer.startup import preflight

    spec = load_spec(spec_path)
    plan = preflight(spec)
    init_distributed(timedelta(seconds=300))
    if not torch.cuda.is_available():
        share_cpu_threads()  # as the trainer does
    dtype = PRECISIONS[spec.train.precision]
    model = plan.family.load(spec.lora, dtype, spec.model.gradient_checkpointing, 0)
    engine = build_engine(spec, model, plan.ds_config)
    device, objective = engine.device, plan.objective.to(engine.device)
    index = build_index(plan.shards, plan.shapes, 0, 1, gather=lambda value: [value])
    data = MicroBatches(index, seed=0, micro_batch_size=spec.data.micro_batch_size, start=0, rank=0, world_size=1,
                        shapes=plan.shapes)
    batches = []
    for k in range(min(8, data.per_epoch)):
        batch = data[k]
        x0 = model.prepare_latents(batch.latents.to(device).float())
        noise, t = torch.randn_like(x0), torch.randint(0, 1000, (x0.shape[0],), device=device)
        batches.append((objective.add_noise(x0, noise, t).to(dtype), batch.prompt_embeds.to(device, dtype), t,
                        objective.velocity(x0, noise, t)))
    times = []
    for step in range(WARMUP_STEPS + steps):
        x_t, text, t, target = batches[step % len(batches)]
        start = time.perf_counter()
        for _ in range(spec.train.gradient_accumulation_steps):
            loss = F.mse_loss(engine(x_t, text, t).float(), target)
            engine.backward(loss)
            engine.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times[WARMUP_STEPS:]


def trainer(spec: Path, env: dict) -> list[dict]:
    proc = subprocess.run([sys.executable, str(ROOT / "launch" / "train.py"), "--spec", str(spec)], env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"the trainer failed:\n{proc.stderr[-3000:]}")
    records = [json.loads(line) for line in (spec.with_suffix("") / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if "loss" in r][WARMUP_STEPS:]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=sorted(SIZES), default="cpu")
    p.add_argument("--steps", type=int, default=12, help="timed optimizer steps of each side (after warm-up)")
    p.add_argument("--workers", type=int, default=2, help="the trainer's data.num_workers (reader threads)")
    p.add_argument("--rounds", type=int, default=5, help="turns of trainer then bare loop (default 5)")
    p.add_argument("--bare", help=argparse.SUPPRESS)  # internal: run the bare loop on this spec, print JSON
    args = p.parse_args(argv)
    if args.bare:
        print(json.dumps(bare(args.bare, args.steps)))
        return 0
    env = {**os.environ, "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(29500 + os.getpid() % 1000)}
    with tempfile.TemporaryDirectory(prefix="bench-step-") as tmp:
        work = Path(tmp)
        model = write_model(work, args.size)
        shards = write_shards(work, model, args.size, 32)
        spec = write_spec(work / "run.yaml", model, shards, steps=WARMUP_STEPS + args.steps, log_every=1,
                          data={"num_workers": args.workers})
        same = write_spec(work / "bare.yaml", model, shards, steps=WARMUP_STEPS + args.steps)  # its own output_dir
        records, bare_times = [], []
        for _ in range(args.rounds):
            shutil.rmtree(spec.with_suffix(""), ignore_errors=True)  # a fresh run, not a resume
            records += trainer(spec, env)
            proc = subprocess.run([sys.executable, __file__, "--bare", str(same), "--steps", str(args.steps)],
                                  env=env, capture_output=True, text=True)
            if proc.returncode != 0:
                raise SystemExit(f"the bare loop failed:\n{proc.stderr[-3000:]}")
            bare_times += json.loads(proc.stdout.strip().splitlines()[-1])
    steps = [r["step_time_s"] for r in records]
    trainer_s, bare_s = statistics.median(steps), statistics.median(bare_times)  # the machine's noise aside
    wait = statistics.mean(r["data_wait_fraction"] for r in records)
    frames, height, width = SIZES[args.size][1]
    print(f"\n{machine()}; model '{args.size}' at {frames}x{height}x{width}, ZeRO-2, bf16, 1 rank, micro-batch 1; "
          f"{args.rounds} round(s) of {args.steps} timed steps each side after {WARMUP_STEPS} of warm-up")
    print_table("step overhead", ["", "median s/step", "min", "max"],
                [["trainer", trainer_s, min(steps), max(steps)], ["bare DeepSpeed loop", bare_s, min(bare_times),
                                                                   max(bare_times)]])
    print(f"\nratio trainer/bare (medians) = {trainer_s / bare_s:.3f}")
    print(f"data wait (trainer, after warm-up) = {wait:.2%} of step time")
    print(f"TFLOP/s per rank (trainer, planner FLOPs) = {statistics.mean(r['tflops_per_s'] for r in records):.3g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
