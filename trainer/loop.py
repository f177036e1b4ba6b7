"""The training run: optimizer steps of gradient-accumulated micro-steps, with logging, checkpoints and faults.

A micro-step is one forward/backward on one micro-batch; an optimizer step is `accumulation` micro-steps
followed by one (clipped) update. DeepSpeed counts both: engine.step() is called every micro-step and
applies the optimizer only at the accumulation boundary; engine.backward() divides the loss by the
accumulation. The host waits for the device once per optimizer step (the shared stop/save decision and
DeepSpeed's overflow check), and on log steps.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from trainer.checkpoint import Checkpointer
from trainer.compiled import compile_seconds
from trainer.data import Batch, DataPosition, MicroBatches, flat_position, streaming
from trainer.diffusion import Objective
from trainer.errors import UserError
from trainer.export import export_lora
from trainer.families.base import VideoModel
from trainer.faults import StepDecision, StopSignals, decide, preempted, too_many_nonfinite
from trainer.reporting.interval import T_BUCKETS, Interval
from trainer.reporting.run_dir import SampleLog, open_run_dir
from trainer.reporting.startup_table import print_startup
from trainer.reporting.writers import Reporter, duration
from trainer.rng import Stream, derive_seed
from trainer.shard_format import ShardError
from trainer.shard_index import ShardIndex
from trainer.spec import RunSpec
from trainer.startup import Run, build, preflight
from trainer.state import TrainerState
from trainer.watchdog import set_collective_timeout

STOP_WAIT_S = 10.0  # how long a stop waits for W&B to finish: SLURM's KillWait after the signal is 30 s by default


def train(spec: RunSpec) -> Path | None:
    """Run the spec to the end; returns the exported LoRA file on rank 0 (None on other ranks).
    Raises faults.Stopped when preempted or after too many non-finite steps."""
    signals = StopSignals()  # before the slow start-up, so that an early SIGTERM is not fatal
    plan = preflight(spec)
    try:
        run, index, state = build(spec, plan)
        dataset = MicroBatches(index, seed=spec.run.seed, micro_batch_size=spec.data.micro_batch_size,
                               rank=run.layout.data_rank, world_size=run.layout.data_size, shapes=plan.shapes,
                               group=run.layout.data_size * spec.train.gradient_accumulation_steps,
                               position=data_position(state, index), pin_memory=run.engine.device.type == "cuda",
                               caption_dropout=spec.data.caption_dropout, empty_prompts=plan.empty_prompts)
        reporter = open_run_dir(spec, run.layout, state, index)
    except UserError as exc:
        exc.on_every_rank = True  # start-up decides the same on every rank: one message is enough
        raise
    print_startup(reporter, spec=spec, layout=run.layout, engine=run.engine, family=run.family, model=run.model,
                  index=index, shards=len(plan.shards), state=state, resume=plan.resume,
                  held_out=run.validation.loss_index if run.validation is not None else None,
                  sequence_warning=run.sequence_warning, ema_restarted=run.ema is not None and run.ema.restarted)
    loop = Loop(run, state, reporter, signals, dataset, last_checkpoint=plan.resume.checkpoint)
    for shape, count in dataset.never_trained().items():
        reporter.event(state.optimizer_step, "data_warning", f"latent shape {list(shape)} has {count} sample(s), "
                       f"fewer than one optimizer step's {spec.data.micro_batch_size * dataset.group}: never trained "
                       f"(every step trains one shape)", shape=list(shape), samples=count)
    if loop.validation_due(state.optimizer_step):  # what a stop at the checkpoint's step left undone
        run.watchdog.restart_startup(f"the validation of optimizer step {state.optimizer_step}")
        loop.validate(state.optimizer_step)
        run.watchdog.restart_startup(f"optimizer step {state.optimizer_step + 1}")
    with streaming(dataset, threads=spec.data.num_workers) as stream:
        for optimizer_step in range(state.optimizer_step + 1, spec.train.max_steps + 1):
            loop.step(stream, optimizer_step)
    return loop.finish()


def data_position(state: TrainerState, index: ShardIndex) -> DataPosition | None:
    """Where the data goes on (None: the start)."""
    if state.data_position is not None:
        return DataPosition(*state.data_position)
    if state.samples_seen:  # a checkpoint from before positions had a group
        return flat_position(index, state.micro_batch_size, state.micro_batches_consumed)
    return None


@dataclass(frozen=True)
class Actions:
    """What an optimizer step does once its micro-steps are done, in this order."""

    log: bool
    give_up: bool  # too many non-finite steps in a row: stop, keeping the last complete checkpoint
    validate: bool  # if validation is due (a stop saves at once instead; the resumed run validates)
    save: bool
    stop: bool  # a stop signal reached some rank: save and leave

    def after_validation(self, stop: bool) -> Actions:
        """A signal that came while validating is acted on now, not after another step."""
        return replace(self, stop=stop, save=self.save or stop)


def actions(spec: RunSpec, state: TrainerState, decision: StepDecision, optimizer_step: int) -> Actions:
    """The step's decision: the same on every rank (``decision`` is shared, ``state`` advanced alike)."""
    give_up = state.consecutive_nonfinite >= spec.train.max_consecutive_nonfinite
    every_steps, every_minutes = spec.checkpoint.every_steps, spec.checkpoint.every_minutes
    last = optimizer_step == spec.train.max_steps
    periodic = decision.save_due_to_time or bool(every_steps and optimizer_step % every_steps == 0)
    # no periodic save in a streak of skipped steps: the last good checkpoint stays the newest
    periodic = periodic and not state.consecutive_nonfinite
    save = decision.stop or periodic or (last and bool(every_steps or every_minutes))
    log = optimizer_step % spec.logging.every_steps == 0 or last or save or give_up
    return Actions(log=log, give_up=give_up, validate=not decision.stop, save=save, stop=decision.stop)


class Loop:
    """One optimizer step at a time: train, count, decide together, then log, validate, save or stop."""

    def __init__(self, run: Run, state: TrainerState, reporter: Reporter, signals: StopSignals,
                 dataset: MicroBatches, last_checkpoint: Path | None):
        self.run, self.spec, self.engine, self.state = run, run.spec, run.engine, state
        self.reporter, self.signals, self.dataset, self.last_checkpoint = reporter, signals, dataset, last_checkpoint
        self.checkpointer = Checkpointer(self.spec.run.dir / "checkpoints", self.spec.checkpoint.keep_last, run.layout)
        self.samples = SampleLog(self.spec.run.dir, run.layout.rank) if self.spec.logging.sample_keys else None
        self.interval = Interval(self.engine.device, run.objective.num_train_timesteps, run.layout, run.peak_tflops,
                                 captions=bool(self.spec.data.caption_dropout))
        self.last_save, self.last_loss = time.monotonic(), float("nan")
        self.started, self.first_step = time.perf_counter(), state.optimizer_step
        self.consumed = 0  # global micro-batches trained this session

    def step(self, stream: Iterator[Batch], optimizer_step: int) -> None:
        lr = self.engine.get_lr()[0]  # the rate this step's update uses; the scheduler moves on inside the step
        out = train_step(self.run, stream, optimizer_step)
        self.count(out, optimizer_step)
        every_minutes = self.spec.checkpoint.every_minutes
        time_due = every_minutes is not None and time.monotonic() - self.last_save >= 60 * every_minutes
        decision = self.decide(time_due, len(out.faults), out.readable)
        if self.run.watchdog.in_startup:  # every rank is past its first step: the steady bound from now on
            set_collective_timeout(self.spec.run.collective_timeout_s)
            self.run.watchdog.started_up()
            if self.spec.train.compile:
                seconds = compile_seconds()
                self.reporter.event(optimizer_step, "compiled", f"torch.compile took {seconds:.1f} s of the first "
                                    f"step (a new clip shape compiles once more)", seconds=round(seconds, 2))
        self.check_data(out, decision, optimizer_step)
        self.reporter.advance(optimizer_step)

        todo = actions(self.spec, self.state, decision, optimizer_step)
        if todo.log:
            self.log(optimizer_step, lr)
        if todo.give_up:
            self.reporter.close(wandb_wait_s=STOP_WAIT_S)
            raise too_many_nonfinite(self.state.consecutive_nonfinite, optimizer_step, self.last_checkpoint)
        paused = time.perf_counter()
        if todo.validate and self.validate(optimizer_step):
            todo = todo.after_validation(self.decide(False, 0, 0).stop)
        if todo.save:
            self.save(optimizer_step)
        self.interval.started += time.perf_counter() - paused  # the throughput is the training's alone
        if todo.stop:
            self.reporter.close(wandb_wait_s=STOP_WAIT_S)
            raise preempted(self.signals.received, optimizer_step, self.last_checkpoint)

    def decide(self, time_due: bool, data_faults: int, readable: int) -> StepDecision:
        """The shared decision (a collective): stop signals, rank 0's clock, this step's data faults."""
        return decide(self.run.layout, self.engine.device, self.signals.received is not None, time_due,
                      data_faults, readable)

    def validate(self, optimizer_step: int) -> bool:
        """Validation due after this optimizer step and not yet done; returns whether it ran. Before the step's
        checkpoint, which then records it done: a run stopped before validating does it when it resumes."""
        if not self.validation_due(optimizer_step):
            return False
        assert self.run.validation is not None
        self.run.validation(self.run, optimizer_step, self.reporter, self.run.heartbeat)
        self.state.validated_step = optimizer_step
        return True

    def validation_due(self, optimizer_step: int) -> bool:
        validation = self.run.validation
        return (validation is not None and self.state.validated_step < optimizer_step
                and any(validation.due(optimizer_step)))

    def count(self, out: StepOutput, optimizer_step: int) -> None:
        state = self.state
        state.optimizer_step = optimizer_step
        state.micro_step += self.spec.train.gradient_accumulation_steps
        state.samples_seen += self.engine.train_batch_size()
        self.consumed += self.dataset.group
        state.data_position = list(self.dataset.position_at(self.consumed))
        if self.samples is not None:
            self.samples.write(optimizer_step, out.batches)
        applied = self.engine.was_step_applied()  # DeepSpeed skips an update whose gradients are not finite
        self.interval.add(out.loss, out.buckets, out.tokens, out.flops, out.data_wait_s, applied,
                          (out.readable, out.captions_dropped))
        if not applied and self.engine.lr_scheduler is not None:
            # DeepSpeed holds the schedule on a skipped update; ours follows optimizer steps, skipped ones
            # included, so that it reaches its floor at train.max_steps whatever was skipped (and a resume,
            # which restores the scheduler, continues it alike)
            self.engine.lr_scheduler.step()
        if applied:
            state.consecutive_nonfinite = 0
            if self.run.ema is not None:
                self.run.ema.update()
        elif nonfinite_step(self.run, out, optimizer_step, self.reporter):
            state.nonfinite_steps += 1
            state.consecutive_nonfinite += 1

    def check_data(self, out: StepOutput, decision: StepDecision, optimizer_step: int) -> None:
        state = self.state
        if decision.data_faults:  # raises everywhere under fail; else the distinct samples, once each
            state.data_errors += data_faults(self.run, out.faults, optimizer_step, self.reporter)
        state.consecutive_unreadable = 0 if decision.readable else state.consecutive_unreadable + 1
        if state.consecutive_unreadable >= self.spec.train.max_consecutive_nonfinite:
            raise unreadable(state.consecutive_unreadable, out.faults)

    def log(self, optimizer_step: int, lr: float) -> None:
        values = self.interval.flush(self.engine.train_batch_size())
        self.last_loss = values["loss"]
        self.reporter.log(optimizer_step, {
            "loss": values.pop("loss"), "grad_norm": float(self.engine.get_global_grad_norm() or 0.0), "lr": lr,
            **values, "samples_seen": self.state.samples_seen, "skipped_steps": self.state.nonfinite_steps,
            "data_errors": self.state.data_errors})

    def save(self, optimizer_step: int) -> None:
        position = (self.state.data_position or [0, 0])[:2]
        self.run.heartbeat(f"the checkpoint save of optimizer step {optimizer_step}")
        ema = self.run.ema
        self.last_checkpoint = self.checkpointer.save(
            self.engine, self.state, {"next_epoch_and_micro_batch": position},
            also=None if ema is None else lambda folder: ema.save(folder, self.run.layout.is_main))
        self.run.heartbeat(f"the checkpoint save of optimizer step {optimizer_step}")
        self.last_save = time.monotonic()
        self.reporter.event(optimizer_step, "checkpoint", f"saved {self.last_checkpoint}")

    def finish(self) -> Path | None:
        spec, run_dir = self.spec, self.spec.run.dir
        self.run.heartbeat("the LoRA export")
        lora_file = export_lora(self.run.model, self.run.family, self.run.layout, run_dir / "lora", spec.to_yaml())
        if self.run.ema is not None:
            self.run.heartbeat("the export of the LoRA's moving average")
            with self.run.ema.swapped():  # the export reads the masters: the average, in the same format
                export_lora(self.run.model, self.run.family, self.run.layout, run_dir / "lora_ema", spec.to_yaml())
        self.run.layout.barrier()  # nobody tears the process group down while rank 0 still writes the export
        self.run.watchdog.stop()
        self.reporter.close()
        self.summary(lora_file)
        return lora_file

    def summary(self, lora_file: Path | None) -> None:
        spec, run_dir = self.spec, self.spec.run.dir
        elapsed, steps = time.perf_counter() - self.started, spec.train.max_steps - self.first_step
        rows = [("optimizer steps", f"{steps} this session" + (f" (resumed at {self.first_step})"
                                                              if self.first_step else "")),
                ("time", f"{duration(elapsed)}, validation and checkpoints included"),
                ("throughput", f"{steps * self.engine.train_batch_size() / elapsed:.2f} samples/s, "
                               f"{self.interval.tokens_logged / elapsed:,.0f} video tokens/s"),
                ("final loss", f"{self.last_loss:.4f}" if steps else "(no step this session)"),
                ("LoRA", str(lora_file) + (f", its moving average in {run_dir / 'lora_ema'}"
                                           if self.run.ema is not None and lora_file is not None else "")),
                ("metrics", f"{run_dir / 'metrics.jsonl'}" + (f", {run_dir / 'tensorboard'}"
                                                              if spec.logging.tensorboard else "")
                 + (f", W&B ({spec.logging.wandb.mode}, {run_dir / 'wandb'})" if spec.logging.wandb else ""))]
        if self.run.validation is not None and spec.validation.prompts:
            rows.append(("samples", str(run_dir / "samples")))
        if self.last_checkpoint is not None:
            rows.append(("checkpoints", str(run_dir / "checkpoints")))
        self.reporter.table("done", rows)


@dataclass
class StepOutput:
    loss: torch.Tensor  # mean micro-batch loss, on the device (no host sync)
    buckets: torch.Tensor  # [2, T_BUCKETS] on the device: per-sample loss sums and counts by timestep bucket
    micro_losses: list[torch.Tensor] = field(default_factory=list)
    batches: list[Batch] = field(default_factory=list)
    faults: list[ShardError] = field(default_factory=list)  # samples that could not be read (zeros stood in)
    readable: int = 0  # samples that could
    captions_dropped: int = 0  # readable samples trained with the empty caption (data.caption_dropout)
    tokens: int = 0  # video tokens this rank trained on
    flops: float = 0.0  # model FLOPs this rank ran (trainer/costs.py: forward and backward, no recomputation)
    data_wait_s: float = 0.0  # time this rank waited for its micro-batches

    def add(self, loss: torch.Tensor, accumulation: int, per_sample: torch.Tensor, valid: torch.Tensor,
            t: torch.Tensor, num_train_timesteps: int) -> None:
        """One micro-step's mean loss, and its samples' losses by timestep bucket."""
        self.loss += loss / accumulation
        self.micro_losses.append(loss)
        bucket = (t * T_BUCKETS // num_train_timesteps).clamp(max=T_BUCKETS - 1)
        self.buckets[0].index_add_(0, bucket, torch.where(valid, per_sample, 0.0).double())
        self.buckets[1].index_add_(0, bucket, valid.double())


def train_step(run: Run, stream: Iterator[Batch], optimizer_step: int) -> StepOutput:
    """One optimizer step. Noise and timesteps (and image-to-video's image augmentation) are seeded by (seed,
    data-parallel rank, step): a resumed step draws the same. The diffusion maths is the objective's, the
    conditioning the family's; what is counted here, the loop's."""
    engine, device = run.engine, run.engine.device
    accumulation = run.spec.train.gradient_accumulation_steps
    run.noise.manual_seed(derive_seed(run.spec.run.seed, Stream.NOISE, run.layout.data_rank, optimizer_step))
    run.image_noise.manual_seed(derive_seed(run.spec.run.seed, Stream.IMAGE_NOISE, run.layout.data_rank,
                                            optimizer_step))
    out = StepOutput(torch.zeros((), device=device), torch.zeros(2, T_BUCKETS, dtype=torch.float64, device=device))
    for micro_step in range(accumulation):
        waiting = time.perf_counter()
        batch = next(stream)
        out.data_wait_s += time.perf_counter() - waiting
        t = run.timesteps(optimizer_step, micro_step)
        image_latents = None
        if run.conditioner is not None and batch.images is not None:
            image_latents = run.conditioner.augmented(batch.images, run.image_noise, run.dtype)
        with run.offload() if run.offload is not None else nullcontext():  # model.activation_offload
            x0, per_sample = sample_losses(engine, run.model, run.objective,
                                           batch.latents.to(device, non_blocking=True),
                                           batch.prompt_embeds.to(device, non_blocking=True), t, run.noise, run.dtype,
                                           image_latents)
        valid = batch.valid.to(device, non_blocking=True)
        if run.exchange is not None:  # a sample one rank of the group could not read counts for none of them
            valid = run.exchange.all_valid(valid)
        loss = valid_mean(per_sample, valid)
        engine.backward(loss)
        engine.step()  # applies the clipped update only at the accumulation boundary
        run.heartbeat(f"micro-step {micro_step} of optimizer step {optimizer_step}")
        out.add(loss.detach(), accumulation, per_sample.detach(), valid, t, run.objective.num_train_timesteps)
        out.tokens += run.model.video_tokens(*x0.shape[2:]) * x0.shape[0]
        out.flops += run.costs.flops(batch.latents.shape[1:]).train * x0.shape[0]
        out.batches.append(batch)
        out.faults.extend(batch.faults)
        out.readable += len(batch.keys) - len(batch.faults)
        out.captions_dropped += batch.captions_dropped
    return out


def sample_losses(call: Callable[..., torch.Tensor], model: VideoModel, objective: Objective, latents: torch.Tensor,
                  prompt_embeds: torch.Tensor, t: torch.Tensor, noise: torch.Generator, dtype: torch.dtype,
                  image_latents: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(x0, per-sample losses [B]) of one micro-batch of stored latents and prompt embeddings: the family's clean
    latents (1.5 pads its frames), the prompt in the compute dtype, the objective's noise, and for image-to-
    video the image latents beside them. ``call`` runs the model (the engine; tests/test_parity.py calls the
    bare model to compare its inputs with the pipeline's)."""
    x0 = model.prepare_latents(latents.float())
    model_call = call if image_latents is None else (lambda x, c, t: call(x, c, t, image_latents))
    return x0, objective.training_loss(model_call, x0, prompt_embeds.to(dtype), t, noise, dtype)  # cast on device


def valid_mean(per_sample: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """The micro-batch's mean loss over the samples that could be read: one that could not stands in as zeros
    (the positions stay exact) and is neither in the sum nor in the count; none readable gives 0."""
    return torch.where(valid, per_sample, 0.0).sum() / valid.sum().clamp(min=1)


def nonfinite_step(run: Run, out: StepOutput, optimizer_step: int, reporter: Reporter) -> bool:
    """A skipped update: name the samples whose loss was not finite (on every rank). Returns whether it counts
    as a numerical fault; under fp16 a skip with finite losses is the loss scaler backing off, not a fault."""
    bad = [f"{shard}:{key}" for loss, b in zip(torch.stack(out.micro_losses).tolist(), out.batches, strict=True)
           if not math.isfinite(loss) for shard, key in zip(b.shards, b.keys, strict=True)]
    everyone = list(dict.fromkeys(key for keys in run.layout.all_gather(bad) for key in keys))  # once per group
    if not everyone and run.spec.train.precision == "fp16":
        return False
    reporter.event(optimizer_step, "nonfinite", f"optimizer step {optimizer_step} skipped: non-finite "
                   + (f"loss on samples {everyone}" if everyone else "gradient norm; weights unchanged"),
                   samples=everyone)
    return True


def data_faults(run: Run, local: list[ShardError], optimizer_step: int, reporter: Reporter) -> int:
    """Samples that could not be read this step, on any rank: reported by rank 0 and counted, or under
    data.on_error=fail raised on every rank (the step in flight trained on zeros in their place; nothing is
    saved after it)."""
    gathered = run.layout.all_gather([(f.shard, f.key, f.problem) for f in local])
    everyone = [ShardError(*f) for f in dict.fromkeys(f for faults in gathered for f in faults)]  # a sequence
    # group's ranks read the same samples: each fault once
    if run.spec.data.on_error == "fail":
        everyone[0].on_every_rank = True
        raise everyone[0]
    for fault in everyone:
        reporter.event(optimizer_step, "data_error", f"skipping {fault}", shard=fault.shard, key=fault.key)
    return len(everyone)


def unreadable(steps: int, faults: list[ShardError]) -> UserError:
    return UserError(f"data.shards: no sample of the last {steps} optimizer steps could be read (the last: "
                     f"{faults[0] if faults else 'on another rank'}); the shards changed or went bad after "
                     f"start-up. Check them with data_tools/inspect_shards.py", on_every_rank=True)
