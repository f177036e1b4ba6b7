"""Start-up: everything checked before a process group exists (preflight), then the pieces a run needs (build).

A bad input fails in preflight, cheaply and the same way on every rank. build joins the process group, lays
out the ranks, indexes the shards (split over ranks), loads the model, wraps it in the DeepSpeed engine,
restores the resume point, watched from the rendezvous on by the start-up bound (trainer/watchdog.py).
"""

from __future__ import annotations

import logging
import socket
import warnings
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING

import torch

from trainer import compiled, low_memory, resume, sequence
from trainer.costs import CostModel, device_peak_tflops
from trainer.data import check_first_sample, check_latent_scale, load_empty_prompts, resolve_shards
from trainer.diffusion import Objective, TimestepDistribution, TimestepSampler
from trainer.dtypes import PRECISIONS
from trainer.ema import LoraEma
from trainer.engine import assemble_config, build_engine, init_distributed
from trainer.errors import UserError
from trainer.families import load_family
from trainer.families.base import ImageConditioning, ModelFamily, VideoModel
from trainer.low_memory import ActivationOffload
from trainer.parallel import ParallelLayout
from trainer.process_env import default_device, env_world_size, local_world_size, share_cpu_threads
from trainer.reporting.wandb_run import check_wandb
from trainer.resume import ResumePoint
from trainer.sequence import UlyssesExchange, check_heads, check_index
from trainer.shard_format import SampleShapes
from trainer.shard_index import ShardIndex, build_index
from trainer.spec import RunSpec, TimestepSampling
from trainer.state import TrainerState
from trainer.validation import Validation, preflight_validation
from trainer.watchdog import STARTUP_COLLECTIVE_MARGIN_S, RollCall, Watchdog

if TYPE_CHECKING:
    from deepspeed import DeepSpeedEngine


@dataclass(frozen=True)
class Plan:
    """Everything checked before a process group exists: a bad input fails here, cheaply, on every rank."""

    family: ModelFamily
    shapes: SampleShapes
    objective: Objective
    shards: list[str]
    ds_config: dict
    resume: ResumePoint
    validation_shards: list[str]  # held-out shards for the validation loss (maybe none)
    empty_prompts: dict[str, torch.Tensor]  # data.caption_dropout: the empty caption's embedding by shard folder
    timesteps: TimestepDistribution  # train.timestep_sampling's distribution on the model's schedule


def preflight(spec: RunSpec) -> Plan:
    family = load_family(spec.model.path, sampling=bool(spec.validation.prompts))
    if family.image_to_video and not spec.validation.prompts:  # a hub id: its VAE encodes the images each step
        family = load_family(spec.model.path, vae=True)
    shapes = family.sample_shapes()
    family.check_lora_targets(list(spec.lora.target_modules))
    objective = family.objective()
    timesteps = check_timesteps(spec.train.timestep_sampling, objective.num_train_timesteps)
    shards = resolve_shards(spec.data.shards)
    check_first_sample(shards, shapes)
    check_latent_scale(shards, family.latent_scale(), family.model_dir)
    empty_prompts = load_empty_prompts(shards, shapes.prompt_shape) if spec.data.caption_dropout else {}
    validation_shards = preflight_validation(spec, family, shapes)
    if spec.logging.wandb is not None:
        check_wandb(spec.logging.wandb.mode)
    world_size = env_world_size()
    layout = ParallelLayout(world_size, sequence=spec.parallel.sequence)  # refuses a world it cannot split
    check_heads(family.structure().heads, layout.sequence, family.describe())
    ds_config = assemble_config(spec, layout.data_size)
    offload = ds_config["zero_optimization"].get("offload_optimizer") or {}
    if spec.train.ema is not None and offload.get("device") == "nvme":  # its masters sit on disk between steps
        raise UserError("train.ema averages DeepSpeed's fp32 master partitions in memory, which an optimizer "
                        "offloaded to NVMe swaps out: offload it to cpu (ds_configs/zero3_offload.json), or leave "
                        "train.ema null")
    low_memory.check_weights(spec.model.weights_dtype, PRECISIONS[spec.train.precision],
                             ds_config["zero_optimization"]["stage"])
    if spec.train.compile:
        compiled.check_compiler(torch.device("cuda" if torch.cuda.is_available() else "cpu"))  # no context yet
    point = resume.plan(spec, world_size, ds_config)
    return Plan(family, shapes, objective, shards, ds_config, point, validation_shards, empty_prompts, timesteps)


def check_timesteps(sampling: TimestepSampling, num_train_timesteps: int) -> TimestepDistribution:
    """train.timestep_sampling against the model's schedule (the range inside it, and not empty of probability);
    returns its distribution."""
    within, field = sampling.range, "train.timestep_sampling"
    if within is not None and within[1] >= num_train_timesteps:
        raise UserError(f"{field}.range: {list(within)} goes past the model's last timestep "
                        f"({num_train_timesteps - 1}; its scheduler has {num_train_timesteps})")
    distribution = TimestepDistribution.of(num_train_timesteps, sampling.distribution, sampling.mean, sampling.std,
                                           within)
    if distribution.mass < 1e-9:  # the inverse CDF would put every draw on one end
        raise UserError(f"{field}: {sampling.describe()} gives its range a probability of {distribution.mass:.1e}: "
                        f"widen the range or move mean and std towards it")
    return distribution


@dataclass
class Run:
    """The pieces a step needs, built once."""

    spec: RunSpec
    layout: ParallelLayout
    family: ModelFamily
    engine: DeepSpeedEngine
    model: VideoModel
    objective: Objective  # on the engine's device
    timesteps: TimestepSampler
    noise: torch.Generator  # training noise and uniform timesteps, seeded per optimizer step
    dtype: torch.dtype  # the compute dtype
    costs: CostModel  # FLOPs per sample, for the logged TFLOP/s and MFU
    peak_tflops: float | None  # the device's bf16 peak (logging.peak_tflops, else by GPU name): MFU's divisor
    watchdog: Watchdog  # ends the process when start-up, or later a step, stops making progress
    conditioner: ImageConditioning | None  # image-to-video: the conditioning images' encoder (None: text-to-video)
    exchange: UlyssesExchange | None  # parallel.sequence > 1: this rank's sequence group (trainer/sequence.py)
    image_noise: torch.Generator  # its augmentation and dropout, seeded per optimizer step
    offload: ActivationOffload | None  # model.activation_offload: the saved-tensor hooks around each forward
    ema: LoraEma | None  # train.ema: the LoRA's moving average
    validation: Validation | None = None  # validation videos and loss, if the spec asks for them
    sequence_warning: str | None = None  # a sequence group spans nodes (trainer/sequence.py)

    def heartbeat(self, what: str) -> None:
        """Tell the watchdog the run is alive, and doing ``what``."""
        self.watchdog.progress(what)


def build(spec: RunSpec, plan: Plan) -> tuple[Run, ShardIndex, TrainerState]:
    # start-up's collectives wait as long as start-up may take; trainer/loop.py shortens it after the first step
    init_distributed(timedelta(seconds=spec.run.startup_timeout_s + STARTUP_COLLECTIVE_MARGIN_S))
    layout = ParallelLayout.from_process_group(spec.parallel.sequence)
    watchdog = Watchdog(spec.run.startup_timeout_s, spec.run.collective_timeout_s, layout.rank, layout.world_size,
                        RollCall.of_process_group(layout.rank, layout.world_size))
    watchdog.start()
    if not torch.cuda.is_available():
        share_cpu_threads()
    if spec.model.activation_offload:  # after init_distributed chose this rank's GPU (before, it would open a
        low_memory.check_pinned_memory(default_device())  # CUDA context on GPU 0 from every rank)
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)  # its per-rank INFO lines drown the progress
    # DeepSpeed calls torch collectives that torch marks deprecated; one warning per rank per call site.
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)
    watchdog.progress("confirming the resume point")
    resume.confirm_point(plan.resume, layout)
    watchdog.progress("indexing the shards")
    index = build_index(plan.shards, plan.shapes, layout.rank, layout.world_size, gather=layout.all_gather)
    if index.faults and spec.data.on_error == "fail":
        raise index.faults[0]
    if not index.samples:
        raise UserError(f"data.shards: no usable sample in {len(plan.shards)} shard(s) ({len(index.faults)} "
                        f"problem(s); the first: {index.faults[0] if index.faults else 'none'})")
    resume.confirm_samples(plan.resume, index.fingerprint())
    check_index(index, plan.family, layout.sequence, "data.shards")
    # before the transformer is loaded: T5 comes and goes while the device is still empty
    watchdog.progress("preparing validation (T5 encodes the prompts)")
    validation = Validation.prepare(spec, plan.family, plan.shapes, plan.validation_shards, layout)
    dtype = PRECISIONS[spec.train.precision]
    watchdog.progress("loading the conditioning images' encoder")  # before the transformer: a bad VAE ends it cheaply
    conditioner = plan.family.image_conditioner(default_device(), dtype, spec.data.image_dropout)
    watchdog.progress("loading the transformer")
    model = plan.family.load(spec.lora, dtype, spec.model.gradient_checkpointing, spec.run.seed)
    mpu, exchange = sequence.join(layout)
    spans = None
    if exchange is not None:
        spans = sequence.spanning_nodes(layout, layout.all_gather(socket.gethostname()), local_world_size())
        sequence.check_buckets(plan.ds_config, max(p.numel() for p in model.lora_parameters().values()))
        plan.family.split_sequence(model.transformer, exchange)
    structure = plan.family.structure()
    storage = low_memory.storage_dtype(spec.model.weights_dtype, dtype)
    if storage is not None:  # before the engine: it moves the stored (smaller) weights to the device
        low_memory.store_frozen_weights(model.transformer, structure.block_prefix, storage, dtype)
    if spec.train.compile:  # last: the blocks compile with the split's processors and the stored linears in them
        compiled.compile_blocks(model.transformer, structure.block_class)
    watchdog.progress("building the DeepSpeed engine")
    engine = build_engine(spec, model, plan.ds_config, mpu)
    if storage is not None:
        low_memory.check_stored(model.transformer, storage)
    engine.train()  # diffusers' from_pretrained leaves the module in eval mode (LoRA dropout off)
    noise = torch.Generator(device=engine.device)
    timesteps = TimestepSampler(plan.timesteps, spec.train.timestep_sampling.stratified, seed=spec.run.seed,
                                rank=layout.data_rank, world_size=layout.data_size,
                                micro_batch=spec.data.micro_batch_size,
                                accumulation=spec.train.gradient_accumulation_steps, generator=noise)
    costs = CostModel(plan.family, spec.lora)
    peak = spec.logging.peak_tflops or device_peak_tflops(engine.device)
    watchdog.progress("restoring the resume point")
    state = resume.restore(plan.resume, engine, layout, spec, index.fingerprint())  # last: it sets the generators
    offload = ActivationOffload(engine.device) if spec.model.activation_offload else None
    ema = None
    if spec.train.ema is not None:  # from the resumed masters; then the checkpoint's average, where it has one
        ema = LoraEma(engine, model.lora_parameters(), spec.train.ema)
        ema.restarted = plan.resume.checkpoint is not None and not ema.load(plan.resume.checkpoint)
    run = Run(spec, layout, plan.family, engine, model, plan.objective.to(engine.device), timesteps, noise, dtype,
              costs, peak, watchdog, conditioner, exchange, torch.Generator(device=engine.device), offload, ema,
              validation, spans)
    return run, index, state
