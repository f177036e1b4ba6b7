"""The run at a glance, printed by rank 0 when training starts, then what the resume or the index found."""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING

from trainer.dtypes import PRECISIONS
from trainer.families.base import ModelFamily, SampleSettings, VideoModel
from trainer.low_memory import storage_dtype, stored_bytes
from trainer.parallel import ParallelLayout
from trainer.reporting.writers import Reporter
from trainer.resume import ResumePoint
from trainer.shard_index import ShardIndex
from trainer.spec import RunSpec
from trainer.state import TrainerState

if TYPE_CHECKING:
    from deepspeed import DeepSpeedEngine


def print_startup(reporter: Reporter, *, spec: RunSpec, layout: ParallelLayout, engine: DeepSpeedEngine,
                  family: ModelFamily, model: VideoModel, index: ShardIndex, shards: int, state: TrainerState,
                  resume: ResumePoint, held_out: ShardIndex | None, sequence_warning: str | None = None,
                  ema_restarted: bool = False) -> None:
    def numel(p):  # ZeRO-3 leaves each rank an empty partition; ds_numel is the full size
        return getattr(p, "ds_numel", p.numel())

    total = sum(numel(p) for p in model.parameters())
    trainable = sum(numel(p) for p in model.lora_parameters().values())
    lora, optim, validation, world = spec.lora, spec.optim, spec.validation, layout.world_size
    text_len = family.sample_shapes().text_len
    shapes = Counter(ref.shape for ref in index.samples).most_common(3)
    tokens = "; ".join(f"{model.video_tokens(*shape[1:]):,} video + {text_len} text (latents "
                       f"{'x'.join(map(str, shape))}, {n} samples)" for shape, n in shapes)
    rows = [
        ("model", f"{family.model_dir} ({family.describe()})"),
        ("parameters", f"{total:,} total, {trainable:,} LoRA trainable ({100 * trainable / total:.2f}%)"),
        ("LoRA", f"rank {lora.rank}, alpha {lora.scale_alpha:g}, dropout {lora.dropout:g}, on "
                 f"{', '.join(lora.target_modules)}"),
        ("DeepSpeed", f"ZeRO-{engine.zero_optimization_stage()}, {spec.train.precision}, {world} rank(s) on "
                      f"{engine.device.type}"),
        ("batch", f"micro {engine.train_micro_batch_size_per_gpu()} x accumulation "
                  f"{engine.gradient_accumulation_steps()} x {layout.data_size} rank(s) = "
                  f"{engine.train_batch_size()} samples per optimizer step"),
        ("tokens per sample", tokens),
        *([("parallel", f"{layout.data_size} data-parallel x {layout.sequence} sequence-parallel (DeepSpeed-Ulysses): "
                        f"each rank of a group holds 1/{layout.sequence} of a sample's video tokens, and all-to-alls "
                        f"them for 1/{layout.sequence} of the heads in every attention")]
          if layout.sequence > 1 else []),
        *([("memory", modes)] if (modes := memory_modes(spec, model)) else []),
        ("data", f"{len(index.samples):,} samples in {shards} shard(s)" + (
            f"; caption dropout {spec.data.caption_dropout:g} (the empty caption's embedding, per sample and epoch)"
            if spec.data.caption_dropout else "")),
        *([("conditioning", f"first frame, noised (sigma = exp(N(-3, 0.5))) and VAE-encoded each step on "
                            f"{engine.device.type}; dropout {spec.data.image_dropout:g}")]
          if family.image_to_video else []),
        ("schedule", f"{spec.train.max_steps} optimizer steps, lr {optim.lr:g} {optim.schedule}, "
                     f"{optim.warmup_steps} warmup; timesteps {spec.train.timestep_sampling.describe()}"),
        *([("EMA", f"decay {spec.train.ema:g} of the LoRA's fp32 masters, after each applied step; exported to "
                   f"lora_ema/" + ("; validation uses it" if validation.use_ema else ""))]
          if spec.train.ema is not None else []),
    ]
    if validation.prompts or held_out is not None:
        settings = SampleSettings.of(validation, family.native_clip()) if validation.prompts else None
        parts = [f"{len(validation.prompts)} prompt(s) every {validation.every_steps or spec.train.max_steps} steps "
                 f"({settings.num_frames}x{settings.height}x{settings.width} at {settings.fps} fps, "
                 f"{settings.num_inference_steps} sampling steps)" if settings else "",
                 f"loss on {len(held_out.samples[:validation.loss.max_samples])} held-out samples "
                 f"every {validation.loss.every_steps or spec.train.max_steps} steps" if held_out is not None else ""]
        rows.append(("validation", "; ".join(filter(None, parts)) + ", and at the end"))
    rows.append(("output", f"{spec.run.dir}: checkpoints/, lora/ (the adapter), metrics.jsonl"
                           + (", tensorboard/" if spec.logging.tensorboard else "")
                           + (", samples/" if validation.prompts else "")))
    reporter.table(f"run {spec.run.name}", rows)
    if not resume.fresh:
        reporter.event(state.optimizer_step, "resumed", f"from {resume.checkpoint} at optimizer step "
                       f"{state.optimizer_step}, {state.samples_seen} samples seen"
                       + (" (another number of ranks: universal checkpoint)" if resume.universal else ""))
    if ema_restarted:
        reporter.event(state.optimizer_step, "ema_warning", f"{resume.checkpoint} holds no moving average of the "
                       f"LoRA (train.ema was off): it starts at the resumed weights")
    if state.optimizer_step == 0:  # a resumed run logged them when it started
        for fault in index.faults:
            reporter.event(0, "data_error", f"skipping: {fault}", shard=fault.shard, key=fault.key)
    elif index.faults:
        reporter.print(f"{len(index.faults)} sample(s) left out at start-up, as when the run began (events.jsonl)")
    if sequence_warning:
        reporter.event(state.optimizer_step, "layout_warning", sequence_warning, sequence=layout.sequence)
    if held_out is not None and held_out.faults:
        reporter.print(f"validation.loss.shards: {len(held_out.faults)} held-out sample(s) left out (the first: "
                       f"{held_out.faults[0]})")


def memory_modes(spec: RunSpec, model: VideoModel) -> str:
    """The memory and speed modes a run has on (trainer/low_memory.py, trainer/compiled.py), in one line."""
    frozen = stored_bytes(model)
    stored = storage_dtype(spec.model.weights_dtype, PRECISIONS[spec.train.precision]) is not None
    parts = [f"frozen block linears stored in {spec.model.weights_dtype} ({frozen / 2**20:,.1f} MiB of frozen "
             f"weights on this rank)" if stored else "",
             "activation offload: the checkpointed block inputs wait in host memory" if spec.model.activation_offload
             else "", "torch.compile of each transformer block, at the first step" if spec.train.compile else ""]
    return "; ".join(filter(None, parts))

