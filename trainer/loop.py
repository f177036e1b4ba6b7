"""The training run: preflight, build, then optimizer steps of gradient-accumulated micro-steps.

A micro-step is one forward/backward on one micro-batch; an optimizer step is `accumulation` micro-steps
followed by one (clipped) update. DeepSpeed counts both: engine.step() is called every micro-step and
applies the optimizer only at the accumulation boundary; engine.backward() divides the loss by the
accumulation. Nothing here syncs the host with the device except on log steps.
"""

from __future__ import annotations

import logging
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from trainer.checkpoint import export_lora, save_checkpoint
from trainer.data import batches, build_loader, check_shards_fit, loader_workers, resolve_shards
from trainer.diffusion import Objective, TimestepSampler
from trainer.distributed import env_world_size, mean_across_ranks, share_cpu_threads
from trainer.engine import COMPUTE_DTYPES, assemble_config, build_engine, init_distributed
from trainer.errors import UserError
from trainer.metrics import Reporter
from trainer.model import ModelShapes, VideoTransformer, check_lora_targets, resolve_model_dir
from trainer.rng import NOISE, derive_seed
from trainer.spec import RunSpec


@dataclass(frozen=True)
class Plan:
    """Everything checked before a process group exists: a bad input fails here, cheaply, on every rank."""

    model_dir: Path
    shapes: ModelShapes
    objective: Objective
    shards: list[str]
    num_workers: int  # loader workers per rank: data.num_workers, capped so each has a shard of its own
    ds_config: dict


def preflight(spec: RunSpec) -> Plan:
    model_dir = resolve_model_dir(spec.model.path)
    shapes = ModelShapes.from_model_dir(model_dir)
    check_lora_targets(model_dir, list(spec.lora.target_modules))
    objective = Objective.from_model_dir(model_dir)
    shards = resolve_shards(spec.data.shards)
    world_size = env_world_size()
    num_workers = loader_workers(len(shards), world_size, spec.data.num_workers)
    check_shards_fit(shards, shapes, model_dir)
    ds_config = assemble_config(spec, world_size)
    earlier = [p.name for p in (spec.run.dir / "metrics.jsonl", spec.run.dir / "lora") if p.exists()]
    earlier += ["checkpoints"] if any((spec.run.dir / "checkpoints").glob("step_*")) else []
    if earlier:  # never overwrite what an earlier run produced
        raise UserError(f"run.output_dir: {spec.run.dir} already holds an earlier run ({', '.join(earlier)}); "
                        f"choose another run.output_dir (or run.name), or delete it")
    return Plan(model_dir, shapes, objective, shards, num_workers, ds_config)


@dataclass
class Run:
    """The pieces a step needs, built once."""

    spec: RunSpec
    engine: object  # deepspeed.DeepSpeedEngine
    model: VideoTransformer
    objective: Objective
    timesteps: TimestepSampler
    noise: torch.Generator
    dtype: torch.dtype


def train_step(run: Run, stream, optimizer_step: int) -> torch.Tensor:
    """One optimizer step; returns the mean micro-batch loss as a device tensor (no host sync)."""
    engine, device = run.engine, run.engine.device
    accumulation = run.spec.train.gradient_accumulation_steps
    total = torch.zeros((), device=device)
    for micro_step in range(accumulation):
        batch = next(stream)
        x0 = run.model.pad_frames(batch.latents.to(device, non_blocking=True).float())
        t = run.timesteps(optimizer_step, micro_step)
        noise = torch.randn(x0.shape, generator=run.noise, device=device, dtype=torch.float32)
        x_t = run.objective.add_noise(x0, noise, t).to(run.dtype)
        v_pred = engine(x_t, batch.prompt_embeds.to(device, run.dtype, non_blocking=True), t)
        loss = run.objective.loss(v_pred, x0, noise, t).mean()  # fp32
        engine.backward(loss)
        engine.step()  # applies the clipped update only at the accumulation boundary
        total += loss.detach()
    return total / accumulation


def build(spec: RunSpec, plan: Plan) -> Run:
    init_distributed()
    rank, world_size = dist.get_rank(), dist.get_world_size()
    if not torch.cuda.is_available():
        share_cpu_threads()
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)  # its per-rank INFO lines drown the progress
    # DeepSpeed calls torch collectives that torch marks deprecated; one warning per rank per call site.
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)
    dtype = COMPUTE_DTYPES[spec.train.precision]
    model = VideoTransformer.from_pretrained(plan.model_dir, spec.lora, dtype, spec.model.gradient_checkpointing,
                                             spec.run.seed)
    engine = build_engine(spec, model, plan.ds_config)
    noise = torch.Generator(device=engine.device).manual_seed(derive_seed(spec.run.seed, NOISE, rank))
    timesteps = TimestepSampler(
        spec.train.timestep_sampling, seed=spec.run.seed, rank=rank, world_size=world_size,
        micro_batch=spec.data.micro_batch_size, accumulation=spec.train.gradient_accumulation_steps,
        num_train_timesteps=plan.objective.num_train_timesteps, generator=noise)
    return Run(spec, engine, model, plan.objective.to(engine.device), timesteps, noise, dtype)


def describe(run: Run, plan: Plan, reporter: Reporter) -> None:
    def numel(p):  # ZeRO-3 leaves each rank an empty partition; ds_numel is the full size
        return getattr(p, "ds_numel", p.numel())

    total = sum(numel(p) for p in run.model.parameters())
    trainable = sum(numel(p) for p in run.model.lora_parameters().values())
    spec, engine = run.spec, run.engine
    if plan.num_workers < spec.data.num_workers:
        reporter.print(f"note: {plan.num_workers} loader worker(s) per rank instead of data.num_workers="
                       f"{spec.data.num_workers}: each worker needs a shard of its own ({len(plan.shards)} shard(s))")
    reporter.print(
        f"model {plan.model_dir}: {total:,} parameters, {trainable:,} LoRA trainable (rank {spec.lora.rank}, "
        f"alpha {spec.lora.scale_alpha:g})\n"
        f"ZeRO-{engine.zero_optimization_stage()}, {dist.get_world_size()} rank(s) on {engine.device}, "
        f"{spec.train.precision}; micro batch {engine.train_micro_batch_size_per_gpu()} x accumulation "
        f"{engine.gradient_accumulation_steps()} x ranks = {engine.train_batch_size()} samples per optimizer step\n"
        f"data: {len(plan.shards)} shard(s); output: {spec.run.dir}")


def train(spec: RunSpec) -> Path | None:
    """Run the spec to the end; returns the exported LoRA file on rank 0 (None on other ranks)."""
    plan = preflight(spec)
    run = build(spec, plan)
    engine, rank, world_size = run.engine, dist.get_rank(), dist.get_world_size()
    run_dir = spec.run.dir
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "spec.yaml").write_text(spec.to_yaml())
    loader = build_loader(plan.shards, rank=rank, world_size=world_size, seed=spec.run.seed,
                          micro_batch_size=spec.data.micro_batch_size, shuffle_buffer=spec.data.shuffle_buffer,
                          num_workers=plan.num_workers, shapes=plan.shapes, pin_memory=engine.device.type == "cuda")
    reporter = Reporter(run_dir, spec.train.max_steps, active=rank == 0, tensorboard=spec.logging.tensorboard)
    describe(run, plan, reporter)

    stream, global_batch = batches(loader), engine.train_batch_size()
    interval_loss, interval_steps, skipped, started = torch.zeros((), device=engine.device), 0, 0, time.perf_counter()
    last_loss = float("nan")
    for optimizer_step in range(1, spec.train.max_steps + 1):
        lr = engine.get_lr()[0]  # the rate this step's update uses; the scheduler moves on inside the step
        interval_loss += train_step(run, stream, optimizer_step)
        interval_steps += 1
        skipped += not engine.was_step_applied()
        reporter.advance(optimizer_step)

        if optimizer_step % spec.logging.every_steps == 0 or optimizer_step == spec.train.max_steps:
            last_loss = (mean_across_ranks(interval_loss) / interval_steps).item()  # sync point
            elapsed = time.perf_counter() - started
            reporter.log(optimizer_step, {
                "loss": last_loss, "grad_norm": float(engine.get_global_grad_norm() or 0.0),
                "lr": lr, "samples_per_s": interval_steps * global_batch / elapsed,
                "samples_seen": optimizer_step * global_batch, "skipped_steps": skipped})
            interval_loss.zero_()
            interval_steps, started = 0, time.perf_counter()

        every = spec.checkpoint.every_steps
        if every and (optimizer_step % every == 0 or optimizer_step == spec.train.max_steps):
            save_checkpoint(engine, run_dir / "checkpoints", optimizer_step, spec.checkpoint.keep_last,
                            {"optimizer_step": optimizer_step, "samples_seen": optimizer_step * global_batch})

    lora_file = export_lora(run.model, run_dir / "lora", spec.to_yaml())
    reporter.close()
    if lora_file is not None:
        reporter.print(f"done: {spec.train.max_steps} optimizer steps, final loss {last_loss:.4f}\n"
                       f"LoRA: {lora_file}\nmetrics: {run_dir / 'metrics.jsonl'}"
                       + (f"\ncheckpoints: {run_dir / 'checkpoints'}" if spec.checkpoint.every_steps else ""))
    return lora_file
