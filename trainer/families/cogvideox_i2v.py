"""Image-to-video CogVideoX: the conditioning image, as CogVideo trains it and CogVideoXImageToVideoPipeline feeds it.

    packed      each sample's first frame, uint8 [3, H, W] (trainer/shard_format.py's image member): the picture
                the pipeline would be given for that clip
    each step   per sample sigma = exp(N(-3, 0.5)); the image in [-1, 1] plus sigma x N(0, 1), in pixel space; the
                VAE's posterior sample of that one-frame video, scaled as the pipeline scales image latents
                (x scaling_factor, but / scaling_factor for VAEs with invert_scale_latents: CogVideoX 1.5);
                zeroed with probability data.image_dropout (``ImageConditioner.augmented``)
    validation  the same without noise and dropout, which is what the pipeline encodes (``ImageConditioner.clean``)
    the input   [noisy video latents ; image latents] on channels, the image latents being the one latent frame
                followed by zeros to the video's (padded) frame count, and ofs = 2.0 where the transformer config
                has ofs_embed_dim (``image_inputs``)

Why the VAE encoder runs on the training device every step instead of packing encoded images: the noise is
fresh for every step of every epoch, as in CogVideo's recipe, and the shards stay one picture per sample (1 MB at
480x720). The cost is one encoder pass of one frame per sample per step, without gradients, tiled, and the
encoder's weights on every rank (the decoder is dropped); README "Models" has the numbers
(bench/conditioning.py). All draws come from the step's
generator, seeded by (seed, data-parallel rank, optimizer step): a resumed step draws the same.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from trainer.errors import UserError
from trainer.media import read_image

# CogVideo's finetune (finetune/models/cogvideox_i2v/lora_trainer.py): sigma = exp(N(-3, 0.5)) on [-1, 1] pixels
IMAGE_NOISE_LOG_MEAN, IMAGE_NOISE_LOG_STD = -3.0, 0.5
OFS = 2.0  # what CogVideoXImageToVideoPipeline passes where the transformer has an ofs embedding


class ImageConditioner:
    """A CogVideoX VAE's encoder on the training device: conditioning images -> image latents."""

    def __init__(self, vae: Any, device: torch.device, dtype: torch.dtype, dropout: float,
                 tiling: bool = True):
        vae.decoder = None  # encoding only: the decoder is the larger half of the VAE
        if tiling:
            # In tiles above the VAE's tile size (240x360), as packing encodes the videos and validation's pipeline
            # the image: a whole 768x1360 frame peaks at several GB beside the training state (bench/conditioning.py)
            vae.enable_tiling()
        self.vae = vae.to(device).eval().requires_grad_(False)  # in ``dtype`` already
        self.device, self.dtype, self.dropout = device, dtype, dropout
        config = vae.config
        # the pipeline's rule (prepare_latents): 1.5's VAE was trained on image latents divided by the factor
        self.scale = 1 / config.scaling_factor if config.invert_scale_latents else config.scaling_factor

    @classmethod
    def load(cls, model_dir: Path, device: torch.device, dtype: torch.dtype, dropout: float) -> ImageConditioner:
        """The model directory's VAE, in ``dtype`` (the training precision: the pipeline encodes in its own)."""
        from diffusers import AutoencoderKLCogVideoX

        try:
            vae = AutoencoderKLCogVideoX.from_pretrained(model_dir / "vae", dtype=dtype)
        except (OSError, ValueError) as exc:
            raise UserError(f"model.path: cannot load the VAE that encodes the conditioning images from "
                            f"{model_dir / 'vae'} ({type(exc).__name__}: {exc})") from None
        return cls(vae, device, dtype, dropout)

    @classmethod
    def from_config(cls, config: dict, device: torch.device, dtype: torch.dtype, tiling: bool) -> ImageConditioner:
        """Random weights of a VAE config (bench/conditioning.py: the cost does not depend on them)."""
        from diffusers import AutoencoderKLCogVideoX
        from diffusers.utils import logging as diffusers_logging

        verbosity = diffusers_logging.get_verbosity()
        diffusers_logging.set_verbosity_error()  # "modules that should be kept in float32: []": there are none
        try:
            vae = AutoencoderKLCogVideoX.from_config(config).to(dtype)
        finally:
            diffusers_logging.set_verbosity(verbosity)
        return cls(vae, device, dtype, 0.0, tiling)

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor, generator: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
        """[B, 3, H, W] in [-1, 1] -> image latents [B, C, 1, H/8, W/8] in ``dtype``: one image at a time, each a
        posterior sample drawn from ``generator`` in turn, scaled, as the pipeline encodes its image."""
        samples = [self.vae.encode(image[None, :, None].to(self.device, self.dtype)).latent_dist.sample(generator)
                   for image in pixels]
        return self.scale * torch.cat(samples).to(dtype)

    def clean(self, images: torch.Tensor, generator: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
        """uint8 images [B, 3, H, W] -> image latents as the pipeline makes them (no noise, no dropout)."""
        return self.encode(to_pixels(images, self.device), generator, dtype)

    def augmented(self, images: torch.Tensor, generator: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
        """uint8 images [B, 3, H, W] -> training image latents: noised in pixel space, encoded, maybe dropped."""
        pixels = to_pixels(images, self.device)
        batch = pixels.shape[0]
        sigma = image_noise_sigma(batch, generator).view(-1, 1, 1, 1)
        noise = torch.randn(pixels.shape, generator=generator, device=self.device)
        latents = self.encode(pixels + sigma * noise, generator, dtype)
        keep = torch.rand(batch, generator=generator, device=self.device) >= self.dropout
        return latents * keep.view(-1, 1, 1, 1, 1).to(latents.dtype)


def image_noise_sigma(batch: int, generator: torch.Generator) -> torch.Tensor:
    """Per-sample noise levels sigma = exp(N(-3, 0.5)) [B] (CogVideo draws one per batch; per sample, a micro-
    batch of several samples sees as many levels as the same samples in micro-batches of one)."""
    log_sigma = torch.randn(batch, generator=generator, device=generator.device) * IMAGE_NOISE_LOG_STD
    return (log_sigma + IMAGE_NOISE_LOG_MEAN).exp()


def to_pixels(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 [B, 3, H, W] -> float32 in [-1, 1], as the pipeline's image processor normalises a picture."""
    return images.to(device, non_blocking=True).float() / 127.5 - 1.0


def image_inputs(image_latents: torch.Tensor, frames: int, patch_size_t: int | None) -> torch.Tensor:
    """Image latents [B, C, 1, h, w] -> the channel-concatenated conditioning [B, C, frames, h, w] for a video of
    ``frames`` latent frames (1.5: already padded): the latent frame, then zeros. The pipeline then repeats
    ``frames % patch_size_t`` leading frames in front, which is none: its frame count is padded already."""
    batch, channels, _, height, width = image_latents.shape
    padded = torch.cat([image_latents, image_latents.new_zeros(batch, channels, frames - 1, height, width)], dim=2)
    lead = frames % patch_size_t if patch_size_t else 0
    return torch.cat([padded[:, :, :lead], padded], dim=2)


def check_images(prompts: list[str], images: list[str], image_to_video: bool, model: str, field: str) -> None:
    """Sampling's images: one readable image per prompt for an image-to-video model, none otherwise; errors name
    ``field``."""
    if image_to_video and len(images) != len(prompts):
        raise UserError(f"{field}: an image-to-video model samples each prompt from an image: give one per prompt "
                        f"({len(prompts)} prompt(s), {len(images)} image(s))")
    if not image_to_video and images:
        raise UserError(f"{field}: {model} samples from prompts alone; images are for image-to-video models")
    for path in images:
        read_image(Path(path), field)


def encoder_parameters(vae_config: dict) -> int:
    """Parameters of a CogVideoX VAE config's encoder half (counted on the meta device: no memory)."""
    from diffusers import AutoencoderKLCogVideoX

    with torch.device("meta"):
        vae = AutoencoderKLCogVideoX.from_config(vae_config)
    return sum(p.numel() for p in vae.parameters()) - sum(p.numel() for p in vae.decoder.parameters())
