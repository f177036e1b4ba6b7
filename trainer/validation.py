"""Validation: videos sampled from the training transformer, and a loss at fixed timesteps and fixed noise.

Both run on every rank at the same optimizer steps, in eval mode (no LoRA dropout), without gradients and with
every random generator saved and restored, so the training that follows is bit-identical to a run without
validation. The work is spread over the ranks by prompt and by sample, and every rank runs the same number of
forward passes: a rank with nothing left repeats one whose result it discards. ZeRO-3 needs that (each layer's
forward gathers its parameters from every rank), and it keeps the ranks arriving at the closing collective
together, so none waits out the collective timeout while another samples.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch

from trainer.data import check_first_sample, check_latent_scale, read_sample, resolve_shards
from trainer.diffusion import Objective
from trainer.ema import LoraEma
from trainer.errors import UserError
from trainer.export import export_lora
from trainer.families.base import ImageConditioning, ModelFamily, SampleSettings, VideoModel
from trainer.media import read_image, write_mp4
from trainer.parallel import ParallelLayout
from trainer.reporting.writers import Reporter
from trainer.rng import Stream, derive_seed
from trainer.sampling import encode_prompts, video_names, write_prompt_list
from trainer.sequence import UlyssesExchange, check_index, check_split
from trainer.shard_format import SampleShapes, ShardError
from trainer.shard_index import ShardIndex, build_index
from trainer.spec import RunSpec

if TYPE_CHECKING:
    from deepspeed import DeepSpeedEngine

Heartbeat = Callable[[str], None]


class Training(Protocol):
    """What validation reads of the run (trainer/startup.py's Run)."""

    engine: DeepSpeedEngine
    model: VideoModel
    family: ModelFamily
    layout: ParallelLayout
    objective: Objective
    dtype: torch.dtype
    conditioner: ImageConditioning | None
    exchange: UlyssesExchange | None
    ema: LoraEma | None


def preflight_validation(spec: RunSpec, family: ModelFamily, shapes: SampleShapes) -> list[str]:
    """Check the validation section against the model directory; returns the held-out shards (maybe none)."""
    section = spec.validation
    if section.images and not section.prompts:
        raise UserError(f"validation.images: {len(section.images)} image(s) but no validation.prompts (an image-to-"
                        f"video model samples one video per prompt, each from its image)")
    if section.prompts:
        def field(name: str) -> str:
            return f"validation.{name}"

        clip = family.check_sampling(section, field)
        latents = family.latent_shape(clip.num_frames, clip.height, clip.width, field)
        check_split(family.structure().video_tokens(latents), spec.parallel.sequence,
                    f"the validation videos' {clip.num_frames}x{clip.height}x{clip.width} clip (validation.num_frames, "
                    f"height, width)")
    if section.loss.shards is None:
        return []
    shards = resolve_shards(section.loss.shards, "validation.loss.shards")
    try:
        check_first_sample(shards, shapes)
    except ShardError as exc:
        raise UserError(f"validation.loss.shards: {exc}") from None
    check_latent_scale(shards, family.latent_scale(), family.model_dir, "validation.loss.shards")
    return shards


def loss_timesteps(count: int, num_train_timesteps: int) -> list[int]:
    """Evenly spaced quantiles of [0, T): the midpoints of `count` equal strata."""
    return [int((k + 0.5) * num_train_timesteps / count) for k in range(count)]


@contextmanager
def evaluating(engine: DeepSpeedEngine) -> Iterator[None]:
    """Eval mode, no gradients, torch's own linear, and every generator restored afterwards: validation leaves
    no trace in training, and computes what diffusers computes from the exported LoRA."""
    training = engine.module.training
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    py_state, np_state = random.getstate(), np.random.get_state()
    engine.eval()
    try:
        with torch.random.fork_rng(devices=devices), torch.no_grad(), torch_linear():
            yield
    finally:
        engine.train(training)
        random.setstate(py_state)
        np.random.set_state(np_state)


@contextmanager
def zero3_forward_passes(run: Training) -> Iterator[None]:
    """The pipeline calls the transformer below the engine's root module, whose forward hook tells ZeRO-3's
    parameter prefetcher that a new pass begins (reset_step). Say it before each of the transformer's forward
    passes, so the prefetcher traces a sampling pass as it traces an evaluation through the engine, instead of
    one endless pass. The same passes run on every rank, as the trace's cross-rank check requires."""
    offload = getattr(getattr(run.engine, "optimizer", None), "parameter_offload", None)  # ZeRO-3 only
    if offload is None:
        yield
        return
    handle = run.model.transformer.register_forward_pre_hook(
        lambda module, args: offload.get_param_coordinator().reset_step(), prepend=True)
    try:
        yield
    finally:
        handle.remove()


@contextmanager
def torch_linear() -> Iterator[None]:
    """ZeRO-3 replaces torch.nn.functional.linear process-wide by a matmul followed by a separate bias add (its
    memory-efficient backward), which rounds differently in bf16: validation videos would not be the ones a user
    gets from the exported LoRA in diffusers. Put torch's own back while validating (no backward happens here)."""
    from deepspeed.runtime.zero.partition_parameters import InsertPostInitMethodToModuleSubClasses

    original = getattr(InsertPostInitMethodToModuleSubClasses, "linear_bk", None)  # DeepSpeed's saved copy
    patched = torch.nn.functional.linear
    if original is None or patched is original:
        yield
        return
    torch.nn.functional.linear = original
    try:
        yield
    finally:
        torch.nn.functional.linear = patched


@dataclass
class Validation:
    spec: RunSpec
    prompt_embeds: torch.Tensor | None  # [P, L, D] on the CPU, encoded once at start-up
    negative_embeds: torch.Tensor | None  # [L, D]
    loss_index: ShardIndex | None
    shapes: SampleShapes  # what a held-out sample holds, and what stands in for one that cannot be read
    images: list[Any]  # image-to-video: the pictures validation.images name, one per prompt
    pipe: Any = None  # the family's pipeline, built at the first sampling

    @classmethod
    def prepare(cls, spec: RunSpec, family: ModelFamily, shapes: SampleShapes, loss_shards: list[str],
                layout: ParallelLayout) -> Validation | None:
        """At start-up, before the transformer is loaded: the prompts are encoded with the model directory's T5,
        which is freed again (training never holds T5), and the ranks index the held-out shards together."""
        section = spec.validation
        if not section.prompts and not loss_shards:
            return None
        embeds = negative = None
        if section.prompts:
            # every rank encodes for itself: nobody waits in a collective while another loads T5 (minutes for
            # T5-XXL from a network filesystem), and a rank that cannot load it fails on its own
            encoded = encode_prompts(family, [*section.prompts, section.negative_prompt])
            embeds, negative = encoded[:-1], encoded[-1]
        index = build_index(loss_shards, shapes, layout.rank, layout.world_size,
                            gather=layout.all_gather) if loss_shards else None
        if index is not None and not index.samples:
            raise UserError(f"validation.loss.shards: no usable sample ({index.faults[0] if index.faults else ''})")
        if index is not None:
            check_index(index, family, layout.sequence, "validation.loss.shards")
        images = [read_image(Path(path), "validation.images") for path in section.images]
        return cls(spec, embeds, negative, index, shapes, images)

    def due(self, optimizer_step: int) -> tuple[bool, bool]:  # the same on every rank
        """(sample videos, compute the loss) after this optimizer step: every N steps and at the end."""
        section, last = self.spec.validation, optimizer_step == self.spec.train.max_steps

        def at(every: int) -> bool:
            return last or bool(every and optimizer_step % every == 0)

        return bool(section.prompts) and at(section.every_steps), self.loss_index is not None and at(
            section.loss.every_steps)

    def __call__(self, run: Training, optimizer_step: int, reporter: Reporter, heartbeat: Heartbeat) -> None:
        videos, loss = self.due(optimizer_step)
        if not (videos or loss):
            return
        ema = run.ema if self.spec.validation.use_ema else None
        with evaluating(run.engine), ema.applied() if ema is not None else nullcontext():  # validation.use_ema
            if loss:
                self.loss(run, optimizer_step, reporter, heartbeat)
            if videos:
                self.videos(run, optimizer_step, reporter, heartbeat)

    def loss(self, run: Training, optimizer_step: int, reporter: Reporter, heartbeat: Heartbeat) -> dict[str, float]:
        """The held-out loss at fixed timesteps, with noise fixed per sample (by its place in the held-out
        index, so the ranks' split does not matter): the same weights always give the same number."""
        section, engine, device = self.spec.validation.loss, run.engine, run.engine.device
        assert self.loss_index is not None, "no validation.loss.shards"
        refs = self.loss_index.samples[:section.max_samples]
        rank, world = run.layout.data_rank, run.layout.data_size
        timesteps = torch.tensor(loss_timesteps(section.timesteps, run.objective.num_train_timesteps), device=device)
        sums = torch.zeros(len(timesteps) + 1, dtype=torch.float64, device=device)  # per timestep, then samples
        faults = []
        for first in range(0, math.ceil(len(refs) / world) * world, world):
            i = first + rank
            ref = refs[min(i, len(refs) - 1)]
            try:
                latents, prompt, image = read_sample(self.loss_index, ref, self.shapes)
                weight = 1.0 if i < len(refs) else 0.0  # past the end: the same passes, not counted
            except ShardError as exc:
                faults.append(str(exc))
                image_shape = self.shapes.image_shape(ref.shape)
                latents, prompt, weight = torch.zeros(ref.shape), torch.zeros(self.shapes.prompt_shape), 0.0
                image = None if image_shape is None else torch.zeros(image_shape, dtype=torch.uint8)
            if run.exchange is not None:  # a sample one rank of the group could not read counts for none of them
                weight *= float(run.exchange.all_valid(torch.tensor([weight > 0], device=device))[0])
            x0 = run.model.prepare_latents(latents[None].to(device).float())
            noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(
                derive_seed(self.spec.validation.seed, Stream.VALIDATION_NOISE, i)), dtype=torch.float32).to(device)
            embeds = prompt[None].to(device, run.dtype)
            conditioning = () if run.conditioner is None or image is None else (run.conditioner.clean(
                image[None], torch.Generator().manual_seed(derive_seed(self.spec.validation.seed, Stream.IMAGE_NOISE,
                                                                       i)), run.dtype),)  # what the pipeline feeds
            for k, t in enumerate(timesteps[:, None]):  # batches of one: the number does not depend on the spec
                v_pred = engine(run.objective.add_noise(x0, noise, t).to(run.dtype), embeds, t, *conditioning)
                sums[k] += weight * run.objective.loss(v_pred, x0, noise, t)[0]
            sums[-1] += weight
            heartbeat(f"the validation loss of optimizer step {optimizer_step}")
        run.layout.all_reduce_sum(sums)  # a sync point
        # once each: a rank's padding pass re-reads a sample another rank read
        for problem in dict.fromkeys(f for found in run.layout.all_gather(faults) for f in found):
            reporter.event(optimizer_step, "data_error", f"validation loss: skipping {problem}")
        if not sums[-1]:  # the same on every rank
            raise UserError(f"validation.loss.shards: none of the {len(refs)} held-out samples could be read at "
                            f"optimizer step {optimizer_step}; check them with data_tools/inspect_shards.py",
                            on_every_rank=True)
        per_t = (sums[:-1] / sums[-1]).tolist()
        values = {"val_loss": sum(per_t) / len(per_t),
                  **{f"val_loss_t{t:03d}": v for t, v in zip(timesteps.tolist(), per_t, strict=True)}}
        reporter.log_validation(optimizer_step, values)
        return values

    def videos(self, run: Training, optimizer_step: int, reporter: Reporter, heartbeat: Heartbeat) -> Path:
        """An mp4 per prompt under samples/step_N/ (each rank writes its own prompts), the LoRA that made them,
        and an animated GIF per prompt in TensorBoard (rank 0 reads the files back)."""
        section, settings = self.spec.validation, SampleSettings.of(self.spec.validation, run.family.native_clip())
        out = self.spec.run.dir / "samples" / f"step_{optimizer_step:06d}"
        rank, world, prompts = run.layout.data_rank, run.layout.data_size, section.prompts
        assert self.prompt_embeds is not None and self.negative_embeds is not None, "no validation.prompts"
        files = [out / name for name in video_names(prompts)]
        started = time.perf_counter()
        pipe = self.pipeline(run)
        pipe.vae.to(run.engine.device)
        with zero3_forward_passes(run):
            for first in range(0, math.ceil(len(prompts) / world) * world, world):
                i = first + rank
                embeds = self.prompt_embeds[min(i, len(prompts) - 1)]
                image = self.images[min(i, len(prompts) - 1)] if self.images else None

                def on_step(s: int) -> None:
                    heartbeat(f"validation sampling step {s} of optimizer step {optimizer_step}")

                if i < len(prompts) and run.layout.sequence_rank == 0:  # a sequence group samples it together
                    frames = run.family.generate(pipe, embeds, self.negative_embeds, settings, on_step, image)
                    write_mp4(files[i], frames, settings.fps)
                else:  # the same transformer passes as the other ranks (ZeRO-3 gathers, a group's exchange)
                    run.family.denoise(pipe, embeds, self.negative_embeds, settings, on_step, image)
        pipe.vae.to("cpu")  # the device's memory is the training's again
        if section.save_lora:
            export_lora(run.model, run.family, run.layout, out / "lora", self.spec.to_yaml())  # a collective
        run.layout.barrier()  # every rank's videos are on disk: a sync point
        if run.layout.is_main:
            write_prompt_list(out, prompts, settings.seed, section.images)
        if reporter.wants_videos:  # rank 0 only
            for path in files:
                reporter.video(f"validation/{path.stem}", path, settings.fps, optimizer_step)
        reporter.event(optimizer_step, "validation", f"{len(prompts)} video(s) in {out} "
                       f"{'with the LoRA moving average ' if section.use_ema else ''}"
                       f"({time.perf_counter() - started:.0f} s)")
        return out

    def pipeline(self, run: Training) -> Any:
        if self.pipe is None:
            self.pipe = run.family.pipeline(run.model.transformer, run.dtype, torch.device("cpu"))
        return self.pipe

