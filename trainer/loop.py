"""The training run: preflight, build, then optimizer steps of gradient-accumulated micro-steps.

A micro-step is one forward/backward on one micro-batch; an optimizer step is `accumulation` micro-steps
followed by one (clipped) update. DeepSpeed counts both: engine.step() is called every micro-step and
applies the optimizer only at the accumulation boundary; engine.backward() divides the loss by the
accumulation. The host waits for the device once per optimizer step (the shared stop/save decision and
DeepSpeed's overflow check), and on log steps.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from trainer.checkpoint import Checkpointer, ensure_universal, load_checkpoint, read_marker, resume_point
from trainer.data import (Batch, MicroBatches, build_loader, check_first_sample, check_latent_scale, resolve_shards,
                          streaming)
from trainer.diffusion import Objective, TimestepSampler
from trainer.distributed import env_world_size, share_cpu_threads, sum_across_ranks
from trainer.engine import COMPUTE_DTYPES, assemble_config, build_engine, init_distributed
from trainer.errors import UserError
from trainer.export import export_lora
from trainer.faults import StopSignals, Watchdog, decide, preempted, too_many_nonfinite
from trainer.metrics import Reporter
from trainer.model import ModelShapes, VideoTransformer, check_lora_targets, resolve_model_dir
from trainer.rng import NOISE, derive_seed
from trainer.run_dir import SampleLog, check_fresh_start, check_resumable, check_same_samples
from trainer.shard_format import ShardError
from trainer.shard_index import ShardIndex, build_index
from trainer.spec import RunSpec
from trainer.state import TrainerState, seed_global_rngs


@dataclass(frozen=True)
class Plan:
    """Everything checked before a process group exists: a bad input fails here, cheaply, on every rank."""

    model_dir: Path
    shapes: ModelShapes
    objective: Objective
    shards: list[str]
    ds_config: dict
    resume_from: Path | None  # a complete checkpoint to continue from
    universal: bool  # it was saved by another number of ranks: load DeepSpeed's universal conversion


def preflight(spec: RunSpec) -> Plan:
    model_dir = resolve_model_dir(spec.model.path)
    shapes = ModelShapes.from_model_dir(model_dir)
    check_lora_targets(model_dir, list(spec.lora.target_modules))
    objective = Objective.from_model_dir(model_dir)
    shards = resolve_shards(spec.data.shards)
    check_first_sample(shards, shapes)
    check_latent_scale(shards, model_dir)
    world_size = env_world_size()
    ds_config = assemble_config(spec, world_size)
    resume_from = resume_point(spec.checkpoint.resume, spec.run.dir / "checkpoints")
    if resume_from is None:
        check_fresh_start(spec)
    if resume_from is not None:
        check_resumable(read_marker(resume_from), spec, ds_config["zero_optimization"]["stage"], resume_from)
    universal = resume_from is not None and read_marker(resume_from)["world_size"] != world_size
    if universal:
        ds_config["checkpoint"] = {**ds_config.get("checkpoint", {}), "load_universal": True}
    return Plan(model_dir, shapes, objective, shards, ds_config, resume_from, universal)


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
    rank: int
    heartbeat: Callable[[str], None] = lambda what: None  # tells the watchdog the run is alive


@dataclass
class StepOutput:
    loss: torch.Tensor  # mean micro-batch loss, on the device (no host sync)
    micro_losses: list[torch.Tensor] = field(default_factory=list)
    batches: list[Batch] = field(default_factory=list)
    faults: list[ShardError] = field(default_factory=list)  # samples that could not be read (zeros stood in)
    readable: int = 0  # samples that could


def train_step(run: Run, stream, optimizer_step: int) -> StepOutput:
    """One optimizer step. Noise and timesteps are seeded by (seed, rank, step): a resumed step draws the same."""
    engine, device = run.engine, run.engine.device
    accumulation = run.spec.train.gradient_accumulation_steps
    run.noise.manual_seed(derive_seed(run.spec.run.seed, NOISE, run.rank, optimizer_step))
    out = StepOutput(torch.zeros((), device=device))
    for micro_step in range(accumulation):
        batch = next(stream)
        x0 = run.model.pad_frames(batch.latents.to(device, non_blocking=True).float())
        t = run.timesteps(optimizer_step, micro_step)
        noise = torch.randn(x0.shape, generator=run.noise, device=device, dtype=torch.float32)
        x_t = run.objective.add_noise(x0, noise, t).to(run.dtype)
        v_pred = engine(x_t, batch.prompt_embeds.to(device, run.dtype, non_blocking=True), t)
        per_sample = run.objective.loss(v_pred, x0, noise, t)  # fp32
        # a sample that could not be read stands in as zeros and contributes nothing
        loss = torch.where(batch.valid.to(device, non_blocking=True), per_sample, 0.0).mean()
        engine.backward(loss)
        engine.step()  # applies the clipped update only at the accumulation boundary
        run.heartbeat(f"micro-step {micro_step} of optimizer step {optimizer_step}")
        out.loss += loss.detach() / accumulation
        out.micro_losses.append(loss.detach())
        out.batches.append(batch)
        out.faults.extend(batch.faults)
        out.readable += len(batch.keys) - len(batch.faults)
    return out


def build(spec: RunSpec, plan: Plan) -> tuple[Run, ShardIndex, TrainerState, dict | None]:
    init_distributed(timedelta(seconds=spec.run.collective_timeout_s))
    rank, world_size = dist.get_rank(), dist.get_world_size()
    if not torch.cuda.is_available():
        share_cpu_threads()
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)  # its per-rank INFO lines drown the progress
    # DeepSpeed calls torch collectives that torch marks deprecated; one warning per rank per call site.
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)
    index = build_index(plan.shards, plan.shapes, rank, world_size, gather=_all_gather)
    if index.faults and spec.data.on_error == "fail":
        raise index.faults[0]
    if not index.samples:
        raise UserError(f"data.shards: no usable sample in {len(plan.shards)} shard(s) ({len(index.faults)} "
                        f"problem(s); the first: {index.faults[0] if index.faults else 'none'})")
    if plan.resume_from is not None:
        check_same_samples(read_marker(plan.resume_from), index.fingerprint(), plan.resume_from)
    dtype = COMPUTE_DTYPES[spec.train.precision]
    model = VideoTransformer.from_pretrained(plan.model_dir, spec.lora, dtype, spec.model.gradient_checkpointing,
                                             spec.run.seed)
    engine = build_engine(spec, model, plan.ds_config)
    noise = torch.Generator(device=engine.device)
    timesteps = TimestepSampler(
        spec.train.timestep_sampling, seed=spec.run.seed, rank=rank, world_size=world_size,
        micro_batch=spec.data.micro_batch_size, accumulation=spec.train.gradient_accumulation_steps,
        num_train_timesteps=plan.objective.num_train_timesteps, generator=noise)
    run = Run(spec, engine, model, plan.objective.to(engine.device), timesteps, noise, dtype, rank)

    if plan.resume_from is None:
        seed_global_rngs(spec.run.seed, rank)
        state = TrainerState(world_size=world_size, micro_batch_size=spec.data.micro_batch_size, seed=spec.run.seed,
                             zero_stage=engine.zero_optimization_stage(), data_fingerprint=index.fingerprint())
        return run, index, state, None
    if plan.universal:
        if rank == 0:
            ensure_universal(plan.resume_from)
        dist.barrier()  # the conversion is on disk before any rank reads it
    state, saved = load_checkpoint(engine, plan.resume_from, plan.universal)
    if saved is None:  # another number of ranks: the saved generator states have no owner
        seed_global_rngs(spec.run.seed, rank, state.optimizer_step)
    state.world_size = world_size
    return run, index, state, saved


def _all_gather(obj):
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)  # our own ranks' objects, over our own process group
    return gathered


def describe(run: Run, plan: Plan, index: ShardIndex, state: TrainerState, reporter: Reporter) -> None:
    def numel(p):  # ZeRO-3 leaves each rank an empty partition; ds_numel is the full size
        return getattr(p, "ds_numel", p.numel())

    total = sum(numel(p) for p in run.model.parameters())
    trainable = sum(numel(p) for p in run.model.lora_parameters().values())
    spec, engine = run.spec, run.engine
    reporter.print(
        f"model {plan.model_dir}: {total:,} parameters, {trainable:,} LoRA trainable (rank {spec.lora.rank}, "
        f"alpha {spec.lora.scale_alpha:g})\n"
        f"ZeRO-{engine.zero_optimization_stage()}, {dist.get_world_size()} rank(s) on {engine.device}, "
        f"{spec.train.precision}; micro batch {engine.train_micro_batch_size_per_gpu()} x accumulation "
        f"{engine.gradient_accumulation_steps()} x ranks = {engine.train_batch_size()} samples per optimizer step\n"
        f"data: {len(index.samples)} samples in {len(plan.shards)} shard(s); output: {spec.run.dir}")
    if plan.resume_from is not None:
        reporter.event(state.optimizer_step, "resumed", f"from {plan.resume_from} at optimizer step "
                       f"{state.optimizer_step}, {state.samples_seen} samples seen"
                       + (" (another number of ranks: universal checkpoint)" if plan.universal else ""))
    if state.optimizer_step == 0:  # a resumed run logged them when it started
        for fault in index.faults:
            reporter.event(0, "data_error", f"skipping: {fault}", shard=fault.shard, key=fault.key)
    elif index.faults:
        reporter.print(f"{len(index.faults)} sample(s) left out at start-up, as when the run began (events.jsonl)")


def train(spec: RunSpec) -> Path | None:
    """Run the spec to the end; returns the exported LoRA file on rank 0 (None on other ranks).
    Raises faults.Stopped when preempted or after too many non-finite steps."""
    signals = StopSignals()  # before the slow start-up, so that an early SIGTERM is not fatal
    plan = preflight(spec)
    try:
        run, index, state, _ = build(spec, plan)
    except UserError as exc:
        exc.on_every_rank = True  # start-up sees the same files on every rank: one message is enough
        raise
    engine, rank, world_size = run.engine, dist.get_rank(), dist.get_world_size()
    run_dir, accumulation = spec.run.dir, spec.train.gradient_accumulation_steps
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "spec.yaml").write_text(spec.to_yaml())
        SampleLog.truncate_all(run_dir, state.optimizer_step)
        if state.optimizer_step == 0:
            state.data_errors = len(index.faults)
    reporter = Reporter(run_dir, spec.train.max_steps, active=rank == 0, tensorboard=spec.logging.tensorboard,
                        start_step=state.optimizer_step)
    dist.barrier()  # the logs are cut back before any rank appends
    describe(run, plan, index, state, reporter)
    dataset = MicroBatches(index, seed=spec.run.seed, micro_batch_size=spec.data.micro_batch_size,
                           start=state.micro_batches_consumed, rank=rank, world_size=world_size, shapes=plan.shapes)
    loader = build_loader(dataset, num_workers=spec.data.num_workers, pin_memory=engine.device.type == "cuda")
    samples = SampleLog(run_dir, rank) if spec.logging.sample_keys else None
    checkpointer = Checkpointer(run_dir / "checkpoints", spec.checkpoint.keep_last)
    last_checkpoint, last_save = plan.resume_from, time.monotonic()
    every_steps, every_minutes = spec.checkpoint.every_steps, spec.checkpoint.every_minutes

    interval_loss, interval_steps, started = torch.zeros((), device=engine.device), 0, time.perf_counter()
    interval_taken, last_loss = 0, float("nan")
    watchdog = Watchdog(spec.run.collective_timeout_s, rank)
    run.heartbeat = watchdog.progress
    with streaming(loader) as stream:
        for optimizer_step in range(state.optimizer_step + 1, spec.train.max_steps + 1):
            lr = engine.get_lr()[0]  # the rate this step's update uses; the scheduler moves on inside the step
            out = train_step(run, stream, optimizer_step)
            state.optimizer_step, state.micro_step = optimizer_step, state.micro_step + accumulation
            state.samples_seen += engine.train_batch_size()
            interval_taken += 1
            if samples is not None:
                samples.write(optimizer_step, out.batches)
            if engine.was_step_applied():  # DeepSpeed skips an update whose gradients are not finite
                state.consecutive_nonfinite = 0
                interval_loss += out.loss
                interval_steps += 1
            elif nonfinite_step(run, out, optimizer_step, reporter):
                state.nonfinite_steps += 1
                state.consecutive_nonfinite += 1
            give_up = state.consecutive_nonfinite >= spec.train.max_consecutive_nonfinite  # the same on every rank
            time_due = every_minutes is not None and time.monotonic() - last_save >= 60 * every_minutes
            decision = decide(engine.device, signals.received is not None, time_due, len(out.faults), out.readable)
            if decision.data_faults:
                data_faults(run, out.faults, optimizer_step, reporter)  # raises on every rank under on_error=fail
                state.data_errors += decision.data_faults
            state.consecutive_unreadable = 0 if decision.readable else state.consecutive_unreadable + 1
            if state.consecutive_unreadable >= spec.train.max_consecutive_nonfinite:
                raise unreadable(state.consecutive_unreadable, out.faults)
            reporter.advance(optimizer_step)

            last = optimizer_step == spec.train.max_steps
            # no periodic save in a streak of skipped steps: the last good checkpoint stays the newest
            periodic = decision.save_due_to_time or (every_steps and optimizer_step % every_steps == 0)
            periodic = periodic and not state.consecutive_nonfinite
            save = decision.stop or periodic or (last and (every_steps or every_minutes))
            if optimizer_step % spec.logging.every_steps == 0 or last or save or give_up:
                loss_sum, steps = sum_across_ranks([interval_loss, interval_steps]).tolist()
                last_loss = loss_sum / steps if steps else float("nan")
                elapsed = time.perf_counter() - started
                reporter.log(optimizer_step, {
                    "loss": last_loss, "grad_norm": float(engine.get_global_grad_norm() or 0.0), "lr": lr,
                    "samples_per_s": interval_taken * engine.train_batch_size() / elapsed,
                    "samples_seen": state.samples_seen, "skipped_steps": state.nonfinite_steps,
                    "data_errors": state.data_errors})
                interval_loss.zero_()
                interval_steps, interval_taken, started = 0, 0, time.perf_counter()
            if give_up:
                reporter.close()
                raise too_many_nonfinite(state.consecutive_nonfinite, optimizer_step, last_checkpoint)

            if save:
                position = divmod(state.micro_batches_consumed + rank, dataset.per_epoch)  # this rank's next
                watchdog.progress(f"the checkpoint save of optimizer step {optimizer_step}")
                last_checkpoint = checkpointer.save(engine, state, {"next_epoch_and_micro_batch": list(position)})
                watchdog.progress(f"the checkpoint save of optimizer step {optimizer_step}")
                last_save = time.monotonic()
                reporter.event(optimizer_step, "checkpoint", f"saved {last_checkpoint}")
            if decision.stop:
                reporter.close()
                raise preempted(signals.received, optimizer_step, last_checkpoint)

    watchdog.progress("the LoRA export")
    lora_file = export_lora(run.model, run_dir / "lora", spec.to_yaml())
    dist.barrier()  # nobody tears the process group down while rank 0 still writes the export
    watchdog.stop()
    reporter.close()
    if lora_file is not None:
        reporter.print(f"done: {spec.train.max_steps} optimizer steps, final loss {last_loss:.4f}\n"
                       f"LoRA: {lora_file}\nmetrics: {run_dir / 'metrics.jsonl'}"
                       + (f"\ncheckpoints: {run_dir / 'checkpoints'}" if last_checkpoint else ""))
    return lora_file


def nonfinite_step(run: Run, out: StepOutput, optimizer_step: int, reporter: Reporter) -> bool:
    """A skipped update: name the samples whose loss was not finite (on every rank). Returns whether it counts
    as a numerical fault; under fp16 a skip with finite losses is the loss scaler backing off, not a fault."""
    bad = [f"{shard}:{key}" for loss, b in zip(torch.stack(out.micro_losses).tolist(), out.batches)
           if not math.isfinite(loss) for shard, key in zip(b.shards, b.keys)]
    everyone = [key for keys in _all_gather(bad) for key in keys]
    if not everyone and run.spec.train.precision == "fp16":
        return False
    reporter.event(optimizer_step, "nonfinite", f"optimizer step {optimizer_step} skipped: non-finite "
                   + (f"loss on samples {everyone}" if everyone else "gradient norm; weights unchanged"),
                   samples=everyone)
    return True


def data_faults(run: Run, local: list[ShardError], optimizer_step: int, reporter: Reporter) -> None:
    """Samples that could not be read this step, on any rank: reported by rank 0, or under data.on_error=fail
    raised on every rank (the step in flight trained on zeros in their place; nothing is saved after it)."""
    everyone = [ShardError(*f) for faults in _all_gather([(f.shard, f.key, f.problem) for f in local]) for f in faults]
    if run.spec.data.on_error == "fail":
        everyone[0].on_every_rank = True
        raise everyone[0]
    for fault in everyone:
        reporter.event(optimizer_step, "data_error", f"skipping {fault}", shard=fault.shard, key=fault.key)


def unreadable(steps: int, faults: list[ShardError]) -> UserError:
    error = UserError(f"data.shards: no sample of the last {steps} optimizer steps could be read (the last: "
                      f"{faults[0] if faults else 'on another rank'}); the shards changed or went bad after "
                      f"start-up. Check them with data_tools/inspect.py")
    error.on_every_rank = True
    return error
