"""What the trainer needs from a model family, and the parts every family shares.

A family (trainer/families/cogvideox.py) knows one kind of model directory: which transformer it holds and
how to load it, what a sample must look like, how the transformer is called in the shard layout, its noise
schedule, its FLOP structure, the encoders packing and validation use, the pipeline that samples videos and
the LoRA file format its pipeline loads. Variants (CogVideoX 1.0 and 1.5, text- or image-conditioned) are
configuration of one family, read from the directory's configs; the registry (families/__init__.py) picks
the family by the transformer class the directory names. No deepspeed here: the engine wraps the model.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import nn

from trainer.rng import Stream, derive_seed

if TYPE_CHECKING:
    import numpy as np

    from trainer.diffusion import Objective
    from trainer.shard_format import SampleShapes
    from trainer.spec import LoraSection, ValidationSection


def lora_config(section: LoraSection) -> Any:
    """The spec's LoRA as peft's LoraConfig."""
    from peft import LoraConfig

    return LoraConfig(
        r=section.rank,
        lora_alpha=section.scale_alpha,  # type: ignore[arg-type]  # peft's hint says int; a float works
        lora_dropout=section.dropout,
        target_modules=list(section.target_modules),
        init_lora_weights=True if section.init == "default" else "gaussian",
    )


def attach_lora(transformer: nn.Module, lora: LoraSection, gradient_checkpointing: bool, seed: int) -> nn.Module:
    """Freeze a diffusers transformer and add the spec's LoRA, initialised the same on every rank (ZeRO-3
    partitions each rank's own copy without a broadcast)."""
    transformer.requires_grad_(False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(seed, Stream.LORA_INIT))
        transformer.add_adapter(lora_config(lora))  # type: ignore[operator]
    if gradient_checkpointing:
        transformer.enable_gradient_checkpointing()  # type: ignore[operator]
    return transformer


class VideoModel(nn.Module):
    """The engine's module: a LoRA-adapted transformer called in the shard layout.

    ``prepare_latents`` turns stored latents [B, C, F, H, W] into the clean latents x0 the objective noises (a
    family may pad them); ``forward(noisy, prompt_embeds, timesteps, image_latents=None)`` returns v̂ in the
    layout of x0 (image-to-video models are given the conditioning's image latents [B, C, 1, H, W])."""

    def __init__(self, transformer: nn.Module):
        super().__init__()
        self.transformer = transformer

    @property
    def config(self) -> Any:
        return self.transformer.config

    @abstractmethod
    def prepare_latents(self, latents: torch.Tensor) -> torch.Tensor: ...

    @abstractmethod
    def video_tokens(self, frames: int, height: int, width: int) -> int:
        """Transformer tokens of a latent video of this grid."""

    def lora_parameters(self) -> dict[str, nn.Parameter]:
        """The trainable LoRA parameters, named as in the bare transformer (peft names, with the adapter name)."""
        return {name: p for name, p in self.transformer.named_parameters() if p.requires_grad}


@dataclass(frozen=True)
class TransformerStructure:
    """What the planner (trainer/costs.py) counts: a stack of identical blocks, each a chain of linears with one
    attention in it, between embeddings and an output projection. Names are module paths in the transformer."""

    layers: int
    heads: int
    head_dim: int
    text_tokens: int
    block_prefix: str  # the blocks' container: "transformer_blocks." -> "transformer_blocks.3.attn1.to_q"
    block_class: str  # the block module's class name
    attention_inputs: tuple[str, ...]  # linears that read the block's input and feed attention (q, k, v)
    attention_output: str  # the linear that reads attention's output
    after_attention: tuple[str, ...]  # the linears after it, in execution order
    per_sample: tuple[str, ...]  # linears of a block that see one row per sample (the timestep conditioning)
    outside: dict[str, str]  # linears outside the blocks: the tokens they see ("video", "text"); else "sample"
    trained_stream: tuple[str, ...]  # linears outside the blocks whose input carries a gradient (the output)
    saved_hidden_wide: int  # per token of a block: hidden-wide tensors autograd keeps for backward
    saved_ff_wide: int  # feed-forward-wide ones
    saved_stats_bytes: int  # bytes of fp32 normalisation statistics
    rope: bool  # a rotary table (cos, sin) per video token and head dim, fp32
    video_tokens: Callable[[tuple[int, ...]], int]  # latents [C, F, H, W] -> transformer tokens


@dataclass(frozen=True)
class NativeClip:
    """What a model variant was trained on, read from its directory: the clip packing and sampling default to,
    and the frame-count rule every packed or sampled clip must follow (``frame_multiple``·k + 1)."""

    frames: int
    height: int
    width: int
    fps: int
    frame_multiple: int

    def __str__(self) -> str:
        return f"{self.frames}x{self.height}x{self.width} at {self.fps} fps"


@dataclass(frozen=True)
class SampleSettings:
    """How validation and launch/sample.py sample a video."""

    num_frames: int
    height: int
    width: int
    num_inference_steps: int
    guidance_scale: float
    use_dynamic_cfg: bool
    seed: int
    fps: int

    @classmethod
    def of(cls, section: ValidationSection, native: NativeClip) -> SampleSettings:
        """The section's settings; frames, size and fps left unset (null) are the model's native clip."""
        def pick(value: int | None, default: int) -> int:
            return default if value is None else value

        return cls(pick(section.num_frames, native.frames), pick(section.height, native.height),
                   pick(section.width, native.width), section.num_inference_steps, section.guidance_scale,
                   section.use_dynamic_cfg, section.seed, pick(section.fps, native.fps))


class ImageConditioning(Protocol):
    """Conditioning images (uint8 [B, 3, H, W]) -> image latents [B, C, 1, H', W'] in ``dtype``, drawing what is
    random from ``generator``: ``augmented`` as training sees them, ``clean`` as the pipeline makes them."""

    def augmented(self, images: torch.Tensor, generator: torch.Generator, dtype: torch.dtype) -> torch.Tensor: ...
    def clean(self, images: torch.Tensor, generator: torch.Generator, dtype: torch.dtype) -> torch.Tensor: ...


class SequenceExchange(Protocol):
    """The collectives of one sequence-parallel group (trainer/sequence.py), as a family's transformer calls them
    under ``parallel.sequence`` > 1: token chunks and head groups in rank order, tensors [B, tokens, ...]."""

    size: int
    rank: int

    def split(self, x: torch.Tensor, dim: int) -> torch.Tensor: ...
    def gather(self, x: torch.Tensor, dim: int) -> torch.Tensor: ...
    def scatter_heads(self, x: torch.Tensor) -> torch.Tensor: ...
    def gather_heads(self, x: torch.Tensor) -> torch.Tensor: ...
    def local_heads(self, x: torch.Tensor) -> torch.Tensor: ...
    def all_heads(self, x: torch.Tensor) -> torch.Tensor: ...


class Encoders(Protocol):
    """A model directory's own encoders, as its pipeline uses them (packing and validation prompts)."""

    def video(self, frames: torch.Tensor, seed: int, index: int) -> torch.Tensor:
        """[F, 3, H, W] in [-1, 1] -> the latents the transformer trains on, seeded per sample."""

    def text(self, caption: str) -> torch.Tensor:
        """A caption -> prompt embeddings [L, D], as the pipeline encodes prompts."""


class ModelFamily(Protocol):
    """One kind of model directory, read from its configs (no weights until ``load``)."""

    @property
    def model_dir(self) -> Path: ...

    def describe(self) -> str: ...

    # what the data must be
    @property
    def image_to_video(self) -> bool:
        """Whether samples carry a conditioning image (the clip's first frame) and the model is fed it."""
    def sample_shapes(self) -> SampleShapes: ...
    def latent_scale(self) -> float | None: ...
    def native_clip(self) -> NativeClip: ...
    def latent_shape(self, frames: int, height: int, width: int,
                     option: Callable[[str], str]) -> tuple[int, int, int, int]: ...
    def encoder_configs(self) -> dict[str, dict]: ...
    def check_encoders(self, label: str, purpose: str) -> None: ...
    def encoders(self, device: torch.device, dtype: torch.dtype, vae_tiling: bool = True) -> Encoders: ...
    def prompt_encoder(self, device: torch.device, dtype: torch.dtype) -> Callable[[str], torch.Tensor]: ...
    def image_encoder_parameters(self) -> int:
        """Parameters of the conditioning encoder every rank holds (0: none)."""
    def image_conditioner(self, device: torch.device, dtype: torch.dtype, dropout: float) -> ImageConditioning | None:
        """What turns a micro-batch's conditioning images into the model's image latents (None: text-to-video)."""

    # the transformer
    def transformer_from_config(self, device: torch.device | str, lora: LoraSection | None = None) -> nn.Module: ...
    def check_lora_targets(self, targets: list[str]) -> None: ...
    def load_transformer(self, dtype: torch.dtype) -> nn.Module: ...
    def load(self, lora: LoraSection, dtype: torch.dtype, gradient_checkpointing: bool, seed: int) -> VideoModel: ...
    def wrap(self, transformer: nn.Module) -> VideoModel: ...
    def objective(self) -> Objective: ...
    def structure(self) -> TransformerStructure: ...
    def split_sequence(self, transformer: nn.Module, exchange: SequenceExchange) -> None:
        """Make ``transformer`` hold 1/N of each sample's video tokens and attend through ``exchange``, from
        outside the model (its inputs and outputs stay whole)."""

    # sampling and the LoRA file
    def check_sampling(self, section: ValidationSection, field: Callable[[str], str]) -> SampleSettings:
        """The settings ``section`` samples with (its unset sizes the native clip's), once this directory has
        what sampling needs and can make that clip; errors name ``field(name)``."""
    def pipeline(self, transformer: nn.Module, dtype: torch.dtype, device: torch.device) -> Any: ...
    def generate(self, pipe: Any, prompt_embeds: torch.Tensor, negative_embeds: torch.Tensor,
                 settings: SampleSettings, on_step: Callable[[int], None] = ..., image: Any = None) -> np.ndarray:
        """Frames [F, H, W, 3] uint8; an image-to-video pipeline starts from ``image`` (a picture)."""
    def denoise(self, pipe: Any, prompt_embeds: torch.Tensor, negative_embeds: torch.Tensor,
                settings: SampleSettings, on_step: Callable[[int], None] = ..., image: Any = None) -> None:
        """``generate`` without the decode: the same transformer passes, no video (a rank's padding pass)."""
    def write_lora(self, transformer: nn.Module, state: dict[str, torch.Tensor], out_dir: Path) -> None: ...
    def load_lora(self, pipe: Any, path: Path) -> None: ...
