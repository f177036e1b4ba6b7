"""The run spec: one YAML file, validated by pydantic, the single source of truth for a run.

Every section forbids unknown keys and every error names the field path (``lora.rank``), so a typo
fails at start-up instead of silently training with a default. ``--set section.key=value`` overrides
are applied to the raw YAML before validation, so they are typed and checked exactly like the file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from trainer.errors import UserError


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RunSection(_Section):
    name: str = Field("run", min_length=1)
    # Everything the run writes (checkpoints, LoRA export, logs) goes here; default runs/<name>.
    output_dir: Path | None = None
    seed: int = Field(0, ge=0)
    # From the first optimizer step on: a collective that waits longer than this (a rank died or hangs), or a
    # step without progress for this long, stops every rank with an error.
    collective_timeout_s: float = Field(300.0, gt=0)
    # Start-up, from the rendezvous to the end of the first optimizer step (loading T5 and the transformer from
    # a network filesystem, the first step of a real-size model): a rank slower than this stops every rank,
    # and the message names it.
    startup_timeout_s: float = Field(1800.0, gt=0)

    @property
    def dir(self) -> Path:
        return self.output_dir if self.output_dir is not None else Path("runs") / self.name


class ModelSection(_Section):
    # A diffusers CogVideoX directory (transformer/, scheduler/, ...) or a Hugging Face hub id.
    path: str = Field(min_length=1)
    gradient_checkpointing: bool = False
    # How the frozen base weights are stored (trainer/low_memory.py): null, as loaded in train.precision; fp8,
    # the transformer blocks' linear weights in float8 e4m3 (half of bf16), upcast one layer at a time for its
    # compute (diffusers' layerwise casting); bf16 the same in bf16. LoRA, norms and embeddings stay as they
    # are. ZeRO-2 only; it saves memory at the peak with gradient checkpointing (the backward otherwise keeps
    # every upcast weight).
    weights_dtype: Literal["bf16", "fp8"] | None = None
    # With gradient checkpointing: the block inputs it keeps go to host memory (pinned, copied beside the
    # compute) until the backward pass needs them.
    activation_offload: bool = False


class LoraSection(_Section):
    rank: int = Field(64, gt=0)
    # None means alpha = rank (scale 1). The exported file records alpha, so it reloads at this scale.
    alpha: float | None = Field(None, gt=0)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: list[str] = Field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"], min_length=1)
    # Only initialisations that leave the base weights untouched: the export must apply to the original model.
    init: Literal["default", "gaussian"] = "default"

    @property
    def scale_alpha(self) -> float:
        return float(self.rank) if self.alpha is None else self.alpha


class DataSection(_Section):
    # A brace pattern ("data/train-{000000..000099}.tar"), a directory of .tar files, or a list of either.
    shards: str | list[str]
    micro_batch_size: int = Field(1, gt=0)
    # Reader threads per rank keeping the next micro-batches ready (0: read each when it is needed).
    num_workers: int = Field(2, ge=0)
    # A bad sample (truncated or corrupt shard, missing member, wrong shape or dtype, non-finite values):
    # skip it with a warning naming shard and key, or stop the run naming them.
    on_error: Literal["skip", "fail"] = "skip"
    # Image-to-video: the probability that a sample trains with its (noised) image latents zeroed, drawn per
    # sample and step (0: never). CogVideo's recipe has none; it teaches the model to run without an image.
    image_dropout: float = Field(0.0, ge=0.0, le=1.0)
    # The probability that a sample trains with the empty caption's embedding in place of its prompt's (0:
    # never), drawn per sample and epoch: what classifier-free guidance at sampling needs (CogVideo's SAT recipe
    # drops 10 %). The shards' empty_prompt.safetensors (written by data_tools/shard.py) must be beside them.
    caption_dropout: float = Field(0.0, ge=0.0, lt=1.0)


class OptimSection(_Section):
    lr: float = Field(1e-4, gt=0)
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = Field(1e-4, ge=0)
    eps: float = Field(1e-8, gt=0)
    schedule: Literal["constant", "cosine", "linear"] = "constant"
    warmup_steps: int = Field(0, ge=0)
    # cosine and linear decay from lr to lr * min_lr_ratio at train.max_steps.
    min_lr_ratio: float = Field(0.0, ge=0, le=1)

    @field_validator("betas")
    @classmethod
    def _betas_in_range(cls, betas: tuple[float, float]) -> tuple[float, float]:
        # a field validator, so that the error names optim.betas as every other field error does
        if not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"must each be in [0, 1), got {list(betas)}")
        return betas


class TimestepSampling(_Section):
    # The training timesteps' distribution on 0..T-1 and how a step's draws are spread (trainer/diffusion.py).
    # uniform; or logit_normal: t/T = sigmoid(mean + std * z), z standard normal (SD3's sampling).
    distribution: Literal["uniform", "logit_normal"] = "uniform"
    mean: float = Field(0.0, allow_inf_nan=False)
    std: float = Field(1.0, gt=0, allow_inf_nan=False)
    # Only timesteps min..max (inclusive); null: the whole schedule. The distribution is restricted to it.
    range: tuple[int, int] | None = None
    # Each optimizer step's global batch in equal-probability strata of the distribution (lower-variance loss);
    # else independent draws.
    stratified: bool = False

    @field_validator("range")
    @classmethod
    def _ordered(cls, value: tuple[int, int] | None) -> tuple[int, int] | None:
        if value is not None and not 0 <= value[0] <= value[1]:
            raise ValueError(f"must be [min, max] with 0 <= min <= max, got {list(value)}")
        return value

    def describe(self) -> str:
        shape = "uniform" if self.distribution == "uniform" else f"logit-normal({self.mean:g}, {self.std:g})"
        where = f" on {self.range[0]}..{self.range[1]}" if self.range is not None else ""
        return ("stratified " if self.stratified else "") + shape + where


class TrainSection(_Section):
    max_steps: int = Field(gt=0)  # optimizer steps
    gradient_accumulation_steps: int = Field(1, gt=0)
    max_grad_norm: float = Field(1.0, ge=0)  # 0 disables clipping
    precision: Literal["bf16", "fp16", "fp32"] = "bf16"
    # A section (TimestepSampling), or the short forms "uniform" and "stratified" (uniform over the schedule).
    timestep_sampling: TimestepSampling = TimestepSampling()
    # An optimizer step with a non-finite loss or gradient norm is skipped (weights untouched); this many
    # in a row stop the run, keeping the last complete checkpoint.
    max_consecutive_nonfinite: int = Field(5, gt=0)
    # Compile each transformer block with torch.compile (regional: the repeated block once, reused by every
    # block); the first step of each clip shape compiles, and the start-up report says how long it took.
    compile: bool = False
    # An exponential moving average of the LoRA's fp32 master weights with this decay, updated after each applied
    # optimizer step (trainer/ema.py), checkpointed, and exported beside the LoRA as lora_ema/; null: none.
    ema: float | None = Field(None, gt=0.0, lt=1.0)

    @field_validator("timestep_sampling", mode="before")
    @classmethod
    def _short_form(cls, value: Any) -> Any:
        if value in ("uniform", "stratified"):
            return {"stratified": value == "stratified"}
        if isinstance(value, str):
            raise ValueError(f"must be uniform, stratified or a section (distribution, mean, std, range, "
                             f"stratified), got {value!r}")
        return value


class ParallelSection(_Section):
    # Sequence parallelism (DeepSpeed-Ulysses, trainer/sequence.py): this many consecutive ranks train one
    # micro-batch together, each holding 1/N of its video tokens; attention exchanges them for 1/N of the heads.
    # The ranks must be a multiple of it, and it must divide the heads and every sample's video tokens.
    sequence: int = Field(1, ge=1)


class DeepSpeedSection(_Section):
    # A shipped config by name (zero2, zero3, zero3_offload) or a path to a DeepSpeed JSON file.
    config: str | None = None
    # If both are given they must agree; with neither, ZeRO-2.
    stage: Literal[2, 3] | None = None


class CheckpointSection(_Section):
    every_steps: int = Field(500, ge=0)  # 0: no step-based checkpoints
    # Also save when this many minutes passed since the last save (rank 0's clock decides); null: never.
    every_minutes: float | None = Field(30.0, gt=0)
    keep_last: int = Field(2, gt=0)
    # auto: continue from the newest complete checkpoint in the run directory, or start fresh if there is
    # none; none: always start fresh (refused if the directory holds an earlier run); or a checkpoint path.
    resume: str = Field("auto", min_length=1)


class WandbSection(_Section):
    # Weights & Biases (trainer/reporting/wandb_run.py): the same scalars as TensorBoard, the validation videos,
    # the resolved spec as the run's config; a resumed run continues the run directory's W&B run.
    project: str = Field(min_length=1)
    entity: str | None = None
    name: str | None = None  # null: run.name
    mode: Literal["online", "offline", "disabled"] = "online"  # offline: files under the run directory's wandb/


class LoggingSection(_Section):
    every_steps: int = Field(10, gt=0)
    tensorboard: bool = True
    wandb: WandbSection | None = None  # null: no W&B
    # Each rank writes the shard and key of every sample it trains on to sample_keys/rank_NNNNN.jsonl.
    sample_keys: bool = False
    # The device's dense bf16 peak, for the logged MFU; null: from trainer/costs.py's table by GPU name.
    peak_tflops: float | None = Field(None, gt=0)


class ValidationLossSection(_Section):
    # Held-out shards (same forms as data.shards); null: no validation loss.
    shards: str | list[str] | None = None
    every_steps: int = Field(0, ge=0)  # 0: only at the end
    # Each sample is scored at this many fixed timesteps (evenly spaced quantiles of [0, T)) with fixed noise,
    # so the number is comparable between steps and between runs.
    timesteps: int = Field(10, gt=0, le=1000)
    max_samples: int | None = Field(None, gt=0)  # the first N samples of the held-out shards


class ValidationSection(_Section):
    # Videos sampled with CogVideoXPipeline, the training transformer and its current LoRA; none: no videos.
    prompts: list[str] = Field(default_factory=list)
    # Image-to-video models (CogVideoXImageToVideoPipeline): one image file per prompt, the first frame of its
    # video; the pipeline resizes it to the video's size.
    images: list[str] = Field(default_factory=list)
    negative_prompt: str = ""
    every_steps: int = Field(0, ge=0)  # also at the end of the run; 0: only at the end
    # Frames, size and fps of the videos; null: the model's native clip (CogVideoX 1.0: 49x480x720 at 8 fps,
    # 1.5: 81x768x1360 at 16 fps), read from its directory as its pipeline reads it.
    num_frames: int | None = Field(None, gt=0)
    height: int | None = Field(None, gt=0)
    width: int | None = Field(None, gt=0)
    num_inference_steps: int = Field(50, gt=0)
    guidance_scale: float = Field(6.0, ge=1.0)  # 1: no classifier-free guidance
    use_dynamic_cfg: bool = False  # CogVideoX-5B's recommended schedule of the guidance scale
    seed: int = Field(42, ge=0)  # every prompt starts from this seed's noise, as in diffusers
    fps: int | None = Field(None, gt=0)
    # Write the LoRA the videos were made with beside them (samples/step_N/lora/), to keep the best step's.
    save_lora: bool = True
    # Validate (videos, held-out loss, the LoRA saved beside the videos) with the EMA of the LoRA (train.ema).
    use_ema: bool = False
    loss: ValidationLossSection = ValidationLossSection()


class RunSpec(_Section):
    run: RunSection = RunSection()
    model: ModelSection
    lora: LoraSection = LoraSection()
    data: DataSection
    optim: OptimSection = OptimSection()
    train: TrainSection
    parallel: ParallelSection = ParallelSection()
    deepspeed: DeepSpeedSection = DeepSpeedSection()
    checkpoint: CheckpointSection = CheckpointSection()
    logging: LoggingSection = LoggingSection()
    validation: ValidationSection = ValidationSection()

    @model_validator(mode="after")
    def _cross_field(self) -> RunSpec:
        if self.optim.warmup_steps > self.train.max_steps:
            raise ValueError(
                f"optim.warmup_steps ({self.optim.warmup_steps}) exceeds train.max_steps ({self.train.max_steps})"
            )
        if self.parallel.sequence > 1 and self.lora.dropout:
            raise ValueError(
                f"lora.dropout ({self.lora.dropout}) with parallel.sequence {self.parallel.sequence}: the ranks of "
                f"a sequence group each hold the prompt's tokens, and dropout would mask them differently on each; "
                f"use lora.dropout 0 with sequence parallelism"
            )
        if self.validation.use_ema and self.train.ema is None:
            raise ValueError("validation.use_ema validates with the LoRA's moving average: set train.ema (its decay, "
                             "e.g. 0.999) as well")
        if self.model.activation_offload and not self.model.gradient_checkpointing:
            raise ValueError("model.activation_offload moves the block inputs that gradient checkpointing keeps "
                             "to host memory: set model.gradient_checkpointing true as well")
        return self

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def apply_override(raw: dict[str, Any], override: str) -> None:
    """Apply one ``section.key=value`` to the raw spec dict; the value is parsed as YAML (then typed by the schema)."""
    path, sep, value = override.partition("=")
    keys = path.strip().split(".")
    if not sep or not all(keys):
        raise UserError(f"--set {override!r}: expected section.key=value")
    node = raw
    for i, key in enumerate(keys[:-1]):
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise UserError(f"--set {override!r}: {'.'.join(keys[: i + 1])} is not a section")
        node = child
    try:
        node[keys[-1]] = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError as exc:
        raise UserError(f"--set {override!r}: value is not valid YAML ({exc})") from None


def format_validation_error(exc: ValidationError, source: str) -> str:
    lines = [f"{source}: invalid run spec"]
    for err in exc.errors():
        where = ".".join(str(part) for part in err["loc"]) or "spec"
        if err["type"] == "extra_forbidden":
            lines.append(f"  {where}: unknown field (check the spelling; see examples/ for every field)")
        elif err["type"] == "missing":
            lines.append(f"  {where}: required field is missing")
        else:
            msg = err["msg"].removeprefix("Value error, ")
            shown = "" if err["type"].startswith("value_error") else f" (got {err['input']!r})"
            lines.append(f"  {where}: {msg}{shown}")
    return "\n".join(lines)


def load_spec(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> RunSpec:
    """Read, override and validate a spec file. Raises UserError naming the file and every bad field."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise UserError(f"spec file not found: {path}") from None
    except yaml.YAMLError as exc:
        raise UserError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: the spec must be a mapping of sections (run, model, data, ...)")
    for override in overrides:
        apply_override(raw, override)
    try:
        return RunSpec.model_validate(raw)
    except ValidationError as exc:
        raise UserError(format_validation_error(exc, str(path))) from None
