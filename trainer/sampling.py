"""Videos from CogVideoXPipeline: a given transformer, the model directory's VAE and scheduler, prompt embeddings.

Validation (the training transformer with its current LoRA) and launch/sample.py (the base transformer with an
exported LoRA file) both sample through here, so the same weights, prompt and seed give the same video.
Prompts are encoded by the model directory's T5 exactly as data_tools/shard.py encodes captions.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from trainer.errors import UserError
from trainer.media import to_uint8
from trainer.spec import ValidationSection

# What sampling needs from a model directory beyond what training needs.
SAMPLING_PARTS = ("model_index.json", "vae/config.json", "text_encoder/config.json", "tokenizer")


@dataclass(frozen=True)
class SampleSettings:
    num_frames: int
    height: int
    width: int
    num_inference_steps: int
    guidance_scale: float
    use_dynamic_cfg: bool
    seed: int
    fps: int

    @classmethod
    def from_section(cls, section: ValidationSection) -> SampleSettings:
        return cls(section.num_frames, section.height, section.width, section.num_inference_steps,
                   section.guidance_scale, section.use_dynamic_cfg, section.seed, section.fps)


def check_settings(settings: SampleSettings, model_dir: Path,
                   field: Callable[[str], str] = lambda name: f"validation.{name}") -> None:
    """Frames and size the model directory's VAE and transformer can produce; errors name the spec field (or
    whatever ``field`` calls it: launch/sample.py names its options)."""
    missing = [part for part in SAMPLING_PARTS if not (model_dir / part).exists()]
    if missing:
        raise UserError(f"{field('prompts')}: sampling videos needs the model directory's VAE and text encoder, but "
                        f"{model_dir} lacks {', '.join(missing)}")
    from data_tools.encode import latent_geometry

    _, temporal, spatial = latent_geometry(model_dir)
    patch = json.loads((model_dir / "transformer" / "config.json").read_text())["patch_size"]
    if (settings.num_frames - 1) % temporal:
        raise UserError(f"{field('num_frames')}: {settings.num_frames} frames cannot be made by this VAE (a multiple "
                        f"of its temporal compression {temporal}, plus 1: for example 49)")
    for name, value in (("height", settings.height), ("width", settings.width)):
        if value % (spatial * patch):
            raise UserError(f"{field(name)}: {value} is not a multiple of {spatial * patch} (the VAE's "
                            f"{spatial}x compression times the transformer's patch size {patch})")


def encode_prompts(model_dir: Path, prompts: list[str]) -> torch.Tensor:
    """[P, L, D] on the CPU, in the encoding dtype. Loads T5, encodes, and frees it again."""
    from data_tools.encode import PromptEncoder, default_device, encoding_dtype

    device = default_device()
    encoder = PromptEncoder(model_dir, device, encoding_dtype(device))  # as data_tools/shard.py encodes captions
    embeds = torch.stack([encoder(prompt).cpu() for prompt in prompts])
    del encoder
    if device.type == "cuda":
        torch.cuda.empty_cache()  # nothing of T5 stays on the device the transformer trains on
    return embeds


def load_pipeline(model_dir: Path, transformer, dtype: torch.dtype, device: torch.device):
    """CogVideoXPipeline around `transformer` (left where it is: under ZeRO-3 DeepSpeed owns its parameters),
    with the directory's scheduler and its VAE on `device`; no text encoder (prompts come as embeddings)."""
    from diffusers import CogVideoXPipeline
    from diffusers.utils import logging as diffusers_logging

    verbosity, bars = diffusers_logging.get_verbosity(), diffusers_logging.is_progress_bar_enabled()
    diffusers_logging.set_verbosity_error()  # "text_encoder is None" and loading bars, on every rank
    diffusers_logging.disable_progress_bar()
    try:
        pipe = CogVideoXPipeline.from_pretrained(model_dir, transformer=transformer, text_encoder=None, tokenizer=None,
                                                 dtype=dtype)
    finally:
        diffusers_logging.set_verbosity(verbosity)
        if bars:
            diffusers_logging.enable_progress_bar()
    pipe.vae.to(device)
    pipe.vae.enable_tiling()  # decodes 480x720 in tiles: far less memory beside the training state
    pipe.vae.enable_slicing()
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def generate(pipe, prompt_embeds: torch.Tensor, negative_embeds: torch.Tensor, settings: SampleSettings,
             on_step: Callable[[int], None] = lambda i: None, decode: bool = True) -> np.ndarray | None:
    """One video [F, H, W, 3] uint8 for one prompt ([L, D] embeddings), starting from the noise of
    settings.seed (a CPU generator: the same noise on any device). decode=False runs the denoising only."""
    dtype = pipe.vae.dtype

    def callback(_pipe, i, _t, _tensors):
        on_step(i)
        return {}

    out = pipe(prompt_embeds=prompt_embeds[None].to(pipe.vae.device, dtype),
               negative_prompt_embeds=negative_embeds[None].to(pipe.vae.device, dtype),
               num_frames=settings.num_frames, height=settings.height, width=settings.width,
               num_inference_steps=settings.num_inference_steps, guidance_scale=settings.guidance_scale,
               use_dynamic_cfg=settings.use_dynamic_cfg, generator=torch.Generator().manual_seed(settings.seed),
               output_type="np" if decode else "latent", callback_on_step_end=callback)
    return to_uint8(out.frames[0]) if decode else None


def video_names(prompts: list[str]) -> list[str]:
    """NNN-<the prompt's first words>.mp4, in prompt order."""
    return [f"{i:03d}-{re.sub(r'[^a-z0-9]+', '-', p.lower())[:40].strip('-') or 'prompt'}.mp4"
            for i, p in enumerate(prompts)]


def write_prompt_list(out: Path, prompts: list[str], seed: int) -> None:
    """prompts.json beside the videos: which file shows which prompt, and the seed."""
    listing = {"seed": seed, "videos": dict(zip(video_names(prompts), prompts))}
    (out / "prompts.json").write_text(json.dumps(listing, indent=1) + "\n")
