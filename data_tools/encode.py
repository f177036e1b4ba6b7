"""The model directory's own encoders, as the pipeline uses them: the VAE for frames, T5 for captions.

Latents are a sample of the VAE's posterior (seeded per sample, so packing is reproducible) times the VAE's
scaling_factor, which is what the transformer is trained on. Prompts are tokenised to the transformer's
max_text_seq_length (226), padded and truncated, and encoded without an attention mask, exactly as
CogVideoXPipeline encodes them at inference: train and sample on the same embeddings.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from trainer.model import read_transformer_config
from trainer.rng import VAE_NOISE, derive_seed


def encoding_dtype(device: torch.device) -> torch.dtype:
    """bf16 on a GPU, fp32 on a CPU (no fast bf16 convolutions): packing and validation prompts alike."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def default_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


class PromptEncoder:
    """The model directory's tokenizer/ and text_encoder/ (T5), encoding one caption at a time."""

    def __init__(self, model_dir: Path, device: torch.device, dtype: torch.dtype):
        from transformers import AutoTokenizer, T5EncoderModel
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()  # per-model "Loading weights" bars would bury our progress
        self.device = device
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir / "tokenizer")
        self.model = T5EncoderModel.from_pretrained(model_dir / "text_encoder", dtype=dtype).to(device).eval()
        self.max_len = read_transformer_config(model_dir)["max_text_seq_length"]

    @torch.no_grad()
    def __call__(self, caption: str) -> torch.Tensor:
        """caption -> [max_len, D] (compute dtype, on the device)."""
        tokens = self.tokenizer([caption], padding="max_length", max_length=self.max_len, truncation=True,
                                add_special_tokens=True, return_tensors="pt")
        return self.model(tokens.input_ids.to(self.device))[0][0]


class Encoder:
    def __init__(self, model_dir: Path, device: torch.device, dtype: torch.dtype, vae_tiling: bool = True):
        from diffusers import AutoencoderKLCogVideoX

        self.device, self.dtype = device, dtype
        self.vae = AutoencoderKLCogVideoX.from_pretrained(model_dir / "vae", dtype=dtype).to(device).eval()
        if vae_tiling:
            self.vae.enable_tiling()  # encodes large frames tile by tile: far less activation memory
        self.text = PromptEncoder(model_dir, device, dtype)

    @torch.no_grad()
    def video(self, frames: torch.Tensor, seed: int, index: int) -> torch.Tensor:
        """[F, 3, H, W] in [-1, 1] -> scaled latents [C, F', H', W'] (compute dtype, on the device)."""
        x = frames.to(self.device, self.dtype).permute(1, 0, 2, 3).unsqueeze(0)  # [1, 3, F, H, W]
        generator = torch.Generator(self.device).manual_seed(derive_seed(seed, VAE_NOISE, index))
        posterior = self.vae.encode(x).latent_dist
        return (posterior.sample(generator=generator) * self.vae.config.scaling_factor)[0]


def read_config(model_dir: Path, part: str) -> dict:
    return json.loads((model_dir / part / "config.json").read_text())


def latent_geometry(model_dir: Path) -> tuple[int, int, int]:
    """(latent channels, temporal compression, spatial compression) of the model directory's VAE."""
    vae = read_config(model_dir, "vae")
    return vae["latent_channels"], vae["temporal_compression_ratio"], 2 ** (len(vae["block_out_channels"]) - 1)
