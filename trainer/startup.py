"""Start-up: everything checked before a process group exists (preflight), then the pieces a run needs (build).

A bad input fails in preflight, cheaply and the same way on every rank. build joins the process group,
indexes the shards (split over ranks), loads the model, wraps it in the DeepSpeed engine and, when resuming,
loads the checkpoint.
"""

from __future__ import annotations

import logging
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from trainer.checkpoint import ensure_universal, load_checkpoint, read_marker, resume_point
from trainer.costs import CostModel, device_peak_tflops
from trainer.data import check_first_sample, check_latent_scale, resolve_shards
from trainer.diffusion import Objective, TimestepSampler
from trainer.distributed import all_gather, env_world_size, share_cpu_threads
from trainer.engine import COMPUTE_DTYPES, assemble_config, build_engine, init_distributed
from trainer.errors import UserError
from trainer.metrics import Reporter
from trainer.model import ModelShapes, VideoTransformer, check_lora_targets, read_transformer_config, resolve_model_dir
from trainer.run_dir import check_fresh_start, check_resumable, check_same_resume_point, check_same_samples
from trainer.shard_index import ShardIndex, build_index
from trainer.spec import RunSpec
from trainer.state import TrainerState, seed_global_rngs
from trainer.validation import Validation, preflight_validation


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
    validation_shards: list[str]  # held-out shards for the validation loss (maybe none)


def preflight(spec: RunSpec) -> Plan:
    model_dir = resolve_model_dir(spec.model.path, sampling=bool(spec.validation.prompts))
    shapes = ModelShapes.from_model_dir(model_dir)
    check_lora_targets(model_dir, list(spec.lora.target_modules))
    objective = Objective.from_model_dir(model_dir)
    shards = resolve_shards(spec.data.shards)
    check_first_sample(shards, shapes)
    check_latent_scale(shards, model_dir)
    validation_shards = preflight_validation(spec, model_dir, shapes)
    world_size = env_world_size()
    ds_config = assemble_config(spec, world_size)
    resume_from, universal = resume_point(spec.checkpoint.resume, spec.run.dir / "checkpoints"), False
    if resume_from is None:
        check_fresh_start(spec)
    else:
        marker = read_marker(resume_from)
        check_resumable(marker, spec, ds_config["zero_optimization"]["stage"], resume_from)
        universal = marker["world_size"] != world_size
        if universal:  # DeepSpeed reads this flag when the engine is built
            ds_config["checkpoint"] = {**ds_config.get("checkpoint", {}), "load_universal": True}
    return Plan(model_dir, shapes, objective, shards, ds_config, resume_from, universal, validation_shards)


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
    costs: CostModel  # FLOPs per sample, for the logged TFLOP/s and MFU
    peak_tflops: float | None  # the device's bf16 peak (logging.peak_tflops, else by GPU name): MFU's divisor
    validation: Validation | None = None  # validation videos and loss, if the spec asks for them
    heartbeat: Callable[[str], None] = lambda what: None  # tells the watchdog the run is alive


def build(spec: RunSpec, plan: Plan) -> tuple[Run, ShardIndex, TrainerState]:
    init_distributed(timedelta(seconds=spec.run.collective_timeout_s))
    rank, world_size = dist.get_rank(), dist.get_world_size()
    if not torch.cuda.is_available():
        share_cpu_threads()
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)  # its per-rank INFO lines drown the progress
    # DeepSpeed calls torch collectives that torch marks deprecated; one warning per rank per call site.
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)
    check_same_resume_point(plan.resume_from, all_gather)
    index = build_index(plan.shards, plan.shapes, rank, world_size, gather=all_gather)
    if index.faults and spec.data.on_error == "fail":
        raise index.faults[0]
    if not index.samples:
        raise UserError(f"data.shards: no usable sample in {len(plan.shards)} shard(s) ({len(index.faults)} "
                        f"problem(s); the first: {index.faults[0] if index.faults else 'none'})")
    if plan.resume_from is not None:
        check_same_samples(read_marker(plan.resume_from), index.fingerprint(), plan.resume_from)
    # before the transformer is loaded: T5 comes and goes while the device is still empty
    validation = Validation.prepare(spec, plan.model_dir, plan.shapes, plan.validation_shards, rank, world_size,
                                    all_gather)
    dtype = COMPUTE_DTYPES[spec.train.precision]
    model = VideoTransformer.from_pretrained(plan.model_dir, spec.lora, dtype, spec.model.gradient_checkpointing,
                                             spec.run.seed)
    engine = build_engine(spec, model, plan.ds_config)
    noise = torch.Generator(device=engine.device)
    timesteps = TimestepSampler(
        spec.train.timestep_sampling, seed=spec.run.seed, rank=rank, world_size=world_size,
        micro_batch=spec.data.micro_batch_size, accumulation=spec.train.gradient_accumulation_steps,
        num_train_timesteps=plan.objective.num_train_timesteps, generator=noise)
    costs = CostModel(read_transformer_config(plan.model_dir), spec.lora)
    peak = spec.logging.peak_tflops or device_peak_tflops(engine.device)
    run = Run(spec, engine, model, plan.objective.to(engine.device), timesteps, noise, dtype, rank, costs, peak,
              validation)

    if plan.resume_from is None:
        seed_global_rngs(spec.run.seed, rank)
        state = TrainerState(world_size=world_size, micro_batch_size=spec.data.micro_batch_size, seed=spec.run.seed,
                             zero_stage=engine.zero_optimization_stage(), data_fingerprint=index.fingerprint())
        return run, index, state
    if plan.universal:
        if rank == 0:
            ensure_universal(plan.resume_from)
        dist.barrier()  # the conversion is on disk before any rank reads it
    state, saved = load_checkpoint(engine, plan.resume_from, plan.universal)
    if saved is None:  # another number of ranks: the saved generator states have no owner
        seed_global_rngs(spec.run.seed, rank, state.optimizer_step)
    state.world_size = world_size
    return run, index, state


def describe(run: Run, plan: Plan, index: ShardIndex, state: TrainerState, reporter: Reporter) -> None:
    """The run at a glance (rank 0), then what the resume or the index found."""
    def numel(p):  # ZeRO-3 leaves each rank an empty partition; ds_numel is the full size
        return getattr(p, "ds_numel", p.numel())

    total = sum(numel(p) for p in run.model.parameters())
    trainable = sum(numel(p) for p in run.model.lora_parameters().values())
    spec, engine, world = run.spec, run.engine, dist.get_world_size()
    lora, optim, validation = spec.lora, spec.optim, spec.validation
    shapes = Counter(ref.shape for ref in index.samples).most_common(3)
    tokens = "; ".join(f"{run.model.video_tokens(*shape[1:]):,} video + {plan.shapes.text_len} text (latents "
                       f"{'x'.join(map(str, shape))}, {n} samples)" for shape, n in shapes)
    rows = [
        ("model", str(plan.model_dir)),
        ("parameters", f"{total:,} total, {trainable:,} LoRA trainable ({100 * trainable / total:.2f}%)"),
        ("LoRA", f"rank {lora.rank}, alpha {lora.scale_alpha:g}, dropout {lora.dropout:g}, on "
                 f"{', '.join(lora.target_modules)}"),
        ("DeepSpeed", f"ZeRO-{engine.zero_optimization_stage()}, {spec.train.precision}, {world} rank(s) on "
                      f"{engine.device.type}"),
        ("batch", f"micro {engine.train_micro_batch_size_per_gpu()} x accumulation "
                  f"{engine.gradient_accumulation_steps()} x {world} rank(s) = {engine.train_batch_size()} "
                  f"samples per optimizer step"),
        ("tokens per sample", tokens),
        ("data", f"{len(index.samples):,} samples in {len(plan.shards)} shard(s)"),
        ("schedule", f"{spec.train.max_steps} optimizer steps, lr {optim.lr:g} {optim.schedule}, "
                     f"{optim.warmup_steps} warmup; timesteps {spec.train.timestep_sampling}"),
    ]
    if run.validation is not None:
        parts = [f"{len(validation.prompts)} prompt(s) every {validation.every_steps or spec.train.max_steps} steps"
                 if validation.prompts else "",
                 f"loss on {len(run.validation.loss_index.samples[:validation.loss.max_samples])} held-out samples "
                 f"every {validation.loss.every_steps or spec.train.max_steps} steps"
                 if run.validation.loss_index is not None else ""]
        rows.append(("validation", "; ".join(filter(None, parts)) + ", and at the end"))
    run_dir = spec.run.dir
    rows.append(("output", f"{run_dir}: checkpoints/, lora/ (the adapter), metrics.jsonl"
                           + (", tensorboard/" if spec.logging.tensorboard else "")
                           + (", samples/" if validation.prompts else "")))
    reporter.table(f"run {spec.run.name}", rows)
    if plan.resume_from is not None:
        reporter.event(state.optimizer_step, "resumed", f"from {plan.resume_from} at optimizer step "
                       f"{state.optimizer_step}, {state.samples_seen} samples seen"
                       + (" (another number of ranks: universal checkpoint)" if plan.universal else ""))
    if state.optimizer_step == 0:  # a resumed run logged them when it started
        for fault in index.faults:
            reporter.event(0, "data_error", f"skipping: {fault}", shard=fault.shard, key=fault.key)
    elif index.faults:
        reporter.print(f"{len(index.faults)} sample(s) left out at start-up, as when the run began (events.jsonl)")
    held_out = run.validation.loss_index if run.validation is not None else None
    if held_out is not None and held_out.faults:
        reporter.print(f"validation.loss.shards: {len(held_out.faults)} held-out sample(s) left out (the first: "
                       f"{held_out.faults[0]})")
