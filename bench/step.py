#!/usr/bin/env python
"""Step overhead: the trainer's steady-state time per optimizer step against a bare DeepSpeed loop.

    python bench/step.py                     # the small model in fp32 (about 0.15 s a step here), 1 rank
    python bench/step.py --size cpu --precision bf16   # 8 blocks of 8 heads x 64, 1,570 tokens
    python bench/step.py --steps 4 --rounds 1          # the smoke test's
    python bench/step.py --compile --checkpointing --rounds 2 --precision bf16   # compiled against eager

trainer  `python launch/train.py` on synthetic shards (reader threads, noise, timesteps, loss buckets, the
         per-step stop/save decision, logging every step): step_time_s from metrics.jsonl after the warm-up
         steps, and data_wait_fraction from the same records.
bare     the same model, DeepSpeed config and batches, already in memory and noised:
         engine(x_t, text, t), MSE on v, engine.backward, engine.step; nothing else.
plain    the same without DeepSpeed: forward, backward, clip, torch's AdamW (what a hand-written loop costs).
compiled with --compile: the trainer again with train.compile (each block compiled by torch.compile), its
         step time after the warm-up steps (the first step compiles: events.jsonl says for how long).
The ratios trainer/bare and trainer/plain are what the trainer costs on top of the model's own compute and
the optimizer (1.00 would be free).
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

    from trainer.dtypes import PRECISIONS
    from trainer.engine import build_engine, init_distributed
    from trainer.process_env import share_cpu_threads
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
    engine.train()  # as the trainer does
    batches = in_memory_batches(spec, plan, model, engine.device, dtype)

    def step(x_t, text, t, target) -> None:
        for _ in range(spec.train.gradient_accumulation_steps):
            loss = F.mse_loss(engine(x_t, text, t).float(), target)
            engine.backward(loss)
            engine.step()

    return timed(batches, steps, engine.device, step)


def plain(spec_path: str, steps: int) -> list[float]:
    """Seconds per optimizer step of a plain-torch loop on the same model and batches: forward, MSE on v,
    backward, clip, torch's AdamW over the LoRA parameters (one process, no DeepSpeed at all)."""
    import torch
    import torch.nn.functional as F

    from trainer.dtypes import PRECISIONS
    from trainer.process_env import share_cpu_threads
    from trainer.spec import load_spec
    from trainer.startup import preflight

    spec = load_spec(spec_path)
    plan = preflight(spec)
    share_cpu_threads()
    dtype = PRECISIONS[spec.train.precision]
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    model = plan.family.load(spec.lora, dtype, spec.model.gradient_checkpointing, 0).to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optim = spec.optim
    optimizer = torch.optim.AdamW(params, lr=optim.lr, betas=optim.betas, eps=optim.eps,
                                  weight_decay=optim.weight_decay)
    batches = in_memory_batches(spec, plan, model, device, dtype)

    def step(x_t, text, t, target) -> None:
        for _ in range(spec.train.gradient_accumulation_steps):
            loss = F.mse_loss(model(x_t, text, t).float(), target)
            (loss / spec.train.gradient_accumulation_steps).backward()
        torch.nn.utils.clip_grad_norm_(params, spec.train.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return timed(batches, steps, device, step)


def timed(batches: list[tuple], steps: int, device, step) -> list[float]:
    """Seconds per optimizer step of ``step(*batch)`` over the batches in turn, after WARMUP_STEPS untimed
    ones; on a GPU each step is waited for before the clock stops."""
    import torch

    times = []
    for i in range(WARMUP_STEPS + steps):
        batch = batches[i % len(batches)]
        start = time.perf_counter()
        step(*batch)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times[WARMUP_STEPS:]


def in_memory_batches(spec, plan, model, device, dtype) -> list[tuple]:
    """Up to 8 micro-batches of the shards, noised once, on the device: (x_t, text, t, v)."""
    import torch

    from trainer.data import MicroBatches
    from trainer.shard_index import build_index

    objective = plan.objective.to(device)
    index = build_index(plan.shards, plan.shapes)
    data = MicroBatches(index, seed=0, micro_batch_size=spec.data.micro_batch_size, rank=0, world_size=1,
                        shapes=plan.shapes)
    batches = []
    for k in range(min(8, data.per_epoch)):
        batch = data[k]
        x0 = model.prepare_latents(batch.latents.to(device).float())
        noise, t = torch.randn_like(x0), torch.randint(0, 1000, (x0.shape[0],), device=device)
        batches.append((objective.add_noise(x0, noise, t).to(dtype), batch.prompt_embeds.to(device, dtype), t,
                        objective.velocity(x0, noise, t)))
    return batches


def trainer(spec: Path, env: dict, *sets: str) -> list[dict]:
    proc = subprocess.run([sys.executable, str(ROOT / "launch" / "train.py"), "--spec", str(spec),
                           *[a for s in sets for a in ("--set", s)]], env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"the trainer failed:\n{proc.stderr[-3000:]}")
    records = [json.loads(line) for line in (spec.with_suffix("") / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if "loss" in r][WARMUP_STEPS:]


def side(which: str, spec: Path, steps: int, env: dict) -> list[float]:
    proc = subprocess.run([sys.executable, __file__, f"--{which}", str(spec), "--steps", str(steps)], env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"the {which} loop failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=sorted(SIZES), default="small")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                   help="fp32 by default: this CPU emulates bf16, whose slow matmuls would hide a fixed cost")
    p.add_argument("--steps", type=int, default=20, help="timed optimizer steps of each side (after warm-up)")
    p.add_argument("--log-every", type=int, default=1, help="the trainer's logging.every_steps")
    p.add_argument("--workers", type=int, default=2, help="the trainer's data.num_workers (reader threads)")
    p.add_argument("--rounds", type=int, default=5, help="turns of trainer, bare and plain loops (default 5)")
    p.add_argument("--compile", action="store_true", help="also time the trainer with train.compile")
    p.add_argument("--checkpointing", action="store_true", help="gradient checkpointing on (every side)")
    p.add_argument("--bare", help=argparse.SUPPRESS)  # internal: run the bare loop on this spec, print JSON
    p.add_argument("--plain", help=argparse.SUPPRESS)  # internal: the plain-torch loop
    args = p.parse_args(argv)
    if args.bare or args.plain:
        print(json.dumps(bare(args.bare, args.steps) if args.bare else plain(args.plain, args.steps)))
        return 0
    env = {**os.environ, "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(29500 + os.getpid() % 1000)}
    train = {"precision": args.precision, "gradient_accumulation_steps": 2}
    with tempfile.TemporaryDirectory(prefix="bench-step-") as tmp:
        work = Path(tmp)
        model = write_model(work, args.size)
        shards = write_shards(work, model, args.size, 32)
        ckpt = {"gradient_checkpointing": args.checkpointing}
        spec = write_spec(work / "run.yaml", model, shards, steps=WARMUP_STEPS + args.steps, log_every=args.log_every,
                          workers=args.workers, train=train, model=ckpt)
        same = write_spec(work / "bare.yaml", model, shards, steps=WARMUP_STEPS + args.steps, train=train, model=ckpt)
        records: list[dict] = []
        compiled: list[dict] = []
        compile_s: list[float] = []
        times: dict[str, list[float]] = {"bare": [], "plain": []}
        for _ in range(args.rounds):
            shutil.rmtree(spec.with_suffix(""), ignore_errors=True)  # a fresh run, not a resume
            records += trainer(spec, env)
            if args.compile:
                shutil.rmtree(spec.with_suffix(""), ignore_errors=True)
                compiled += trainer(spec, env, "train.compile=true")
                events = (spec.with_suffix("") / "events.jsonl").read_text().splitlines()
                compile_s += [json.loads(e)["seconds"] for e in events if '"compiled"' in e]
            for which in times:
                times[which] += side(which, same, args.steps, env)
    steps = [r["step_time_s"] for r in records]
    trainer_s = statistics.median(steps)  # medians: the machine's noise aside
    wait = statistics.mean(r["data_wait_fraction"] for r in records)
    frames, height, width = SIZES[args.size][1]
    print(f"\n{machine()}; model '{args.size}' at {frames}x{height}x{width}, ZeRO-2, {args.precision}, 1 rank, "
          f"checkpointing {'on' if args.checkpointing else 'off'}, micro-batch 1 x accumulation 2, "
          f"trainer logging every {args.log_every} step(s); {args.rounds} round(s) "
          f"of {args.steps} timed steps each side after {WARMUP_STEPS} of warm-up")
    rows = [["trainer", trainer_s, min(steps), max(steps)]]
    if compiled:
        compiled_steps = [r["step_time_s"] for r in compiled]
        rows.append(["trainer, compiled", statistics.median(compiled_steps), min(compiled_steps), max(compiled_steps)])
    rows += [[f"{which} loop", statistics.median(t), min(t), max(t)] for which, t in
             (("bare DeepSpeed", times["bare"]), ("plain torch", times["plain"]))]
    print_table("step overhead", ["", "median s/step", "min", "max"], rows)
    for which, t in times.items():
        print(f"ratio trainer/{which} (medians) = {trainer_s / statistics.median(t):.3f}")
    print(f"data wait (trainer, after warm-up) = {wait:.2%} of step time")
    if compiled:
        print(f"ratio compiled/eager trainer (medians) = {statistics.median(compiled_steps) / trainer_s:.3f}; "
              f"compiling took {statistics.median(compile_s):.1f} s of the first step (median of {len(compile_s)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
