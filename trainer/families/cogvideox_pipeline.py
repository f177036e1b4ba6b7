"""What a CogVideoX directory brings beyond the transformer: its VAE and T5 (packing, validation prompts), its
pipeline (validation videos, launch/sample.py) and the LoRA file that pipeline loads.

Latents are a sample of the VAE's posterior (seeded per sample, so packing is reproducible) times the VAE's
scaling_factor, which is what the transformer is trained on. Prompts are tokenised to the transformer's
max_text_seq_length (226), padded and truncated, and encoded without an attention mask, exactly as
CogVideoXPipeline encodes them at inference: train and sample on the same embeddings.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from trainer.families.base import SampleSettings
from trainer.rng import Stream, derive_seed

ENCODER_PARTS = ("vae/config.json", "text_encoder/config.json", "tokenizer")


class PromptEncoder:
    """The model directory's tokenizer/ and text_encoder/ (T5), encoding one caption at a time."""

    def __init__(self, model_dir: Path, device: torch.device, dtype: torch.dtype, max_len: int):
        from transformers import AutoTokenizer, T5EncoderModel
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()  # per-model "Loading weights" bars would bury our progress
        self.device, self.max_len = device, max_len
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir / "tokenizer")
        model: nn.Module = T5EncoderModel.from_pretrained(model_dir / "text_encoder", dtype=dtype)
        self.model = model.to(device).eval()

    @torch.no_grad()
    def __call__(self, caption: str) -> torch.Tensor:
        """caption -> [max_len, D] (compute dtype, on the device)."""
        tokens = self.tokenizer([caption], padding="max_length", max_length=self.max_len, truncation=True,
                                add_special_tokens=True, return_tensors="pt")
        return self.model(tokens.input_ids.to(self.device))[0][0]


class Encoders:
    """The VAE for frames and T5 for captions, on one device."""

    def __init__(self, model_dir: Path, device: torch.device, dtype: torch.dtype, max_len: int,
                 vae_tiling: bool = True):
        from diffusers import AutoencoderKLCogVideoX

        self.device, self.dtype = device, dtype
        self.vae = AutoencoderKLCogVideoX.from_pretrained(model_dir / "vae", dtype=dtype).to(device).eval()
        if vae_tiling:
            self.vae.enable_tiling()  # encodes large frames tile by tile: far less activation memory
        self.text = PromptEncoder(model_dir, device, dtype, max_len)

    @torch.no_grad()
    def video(self, frames: torch.Tensor, seed: int, index: int) -> torch.Tensor:
        """[F, 3, H, W] in [-1, 1] -> scaled latents [C, F', H', W'] (compute dtype, on the device)."""
        x = frames.to(self.device, self.dtype).permute(1, 0, 2, 3).unsqueeze(0)  # [1, 3, F, H, W]
        generator = torch.Generator(self.device).manual_seed(derive_seed(seed, Stream.VAE_NOISE, index))
        posterior = self.vae.encode(x).latent_dist
        return (posterior.sample(generator=generator) * self.vae.config.scaling_factor)[0]


def load_pipeline(model_dir: Path, transformer: nn.Module, dtype: torch.dtype, device: torch.device,
                  image_to_video: bool = False) -> Any:
    """CogVideoXPipeline (CogVideoXImageToVideoPipeline) around `transformer` (left where it is: under ZeRO-3
    DeepSpeed owns its parameters), with the directory's scheduler and its VAE on `device`; no text encoder
    (prompts come as embeddings)."""
    from diffusers import CogVideoXImageToVideoPipeline, CogVideoXPipeline
    from diffusers.utils import logging as diffusers_logging

    verbosity, bars = diffusers_logging.get_verbosity(), diffusers_logging.is_progress_bar_enabled()
    diffusers_logging.set_verbosity_error()  # "text_encoder is None" and loading bars, on every rank
    diffusers_logging.disable_progress_bar()
    try:
        kind = CogVideoXImageToVideoPipeline if image_to_video else CogVideoXPipeline
        pipe = kind.from_pretrained(model_dir, transformer=transformer, text_encoder=None, tokenizer=None,
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
def sample(pipe: Any, prompt_embeds: torch.Tensor, negative_embeds: torch.Tensor, settings: SampleSettings,
           on_step: Callable[[int], None], output_type: str, image: Any = None) -> Any:
    """One video for one prompt ([L, D] embeddings), starting from the noise of settings.seed (a CPU generator:
    the same noise on any device): frames [F, H, W, 3] in [0, 1] for output_type "np"; "latent" denoises only.
    An image-to-video pipeline is given ``image`` (a picture; it draws the image's posterior from the same
    generator first)."""
    dtype = pipe.vae.dtype

    def callback(_pipe, i, _t, _tensors):
        on_step(i)
        return {}

    conditioning = {} if image is None else {"image": image}
    out = pipe(**conditioning, prompt_embeds=prompt_embeds[None].to(pipe.vae.device, dtype),
               negative_prompt_embeds=negative_embeds[None].to(pipe.vae.device, dtype),
               num_frames=settings.num_frames, height=settings.height, width=settings.width,
               num_inference_steps=settings.num_inference_steps, guidance_scale=settings.guidance_scale,
               use_dynamic_cfg=settings.use_dynamic_cfg, generator=torch.Generator().manual_seed(settings.seed),
               output_type=output_type, callback_on_step_end=callback)
    return out.frames[0]


def write_lora(transformer: nn.Module, state: dict[str, torch.Tensor], out_dir: Path) -> None:
    """The LoRA tensors of `state` (peft names, as in `transformer`) as CogVideoXPipeline.save_lora_weights writes
    them into `out_dir`, with the transformer's LoRA config as adapter metadata: pipe.load_lora_weights(dir)
    then applies the trained alpha/rank scale (without it a reload assumes alpha = rank)."""
    from diffusers import CogVideoXPipeline
    from peft import get_peft_model_state_dict

    layers = get_peft_model_state_dict(transformer, state_dict=state)
    empty = [name for name, t in layers.items() if t.numel() == 0]
    if not layers or empty:
        raise RuntimeError(f"refusing to export an empty LoRA ({len(layers)} tensors, empty: {empty[:3]})")
    peft_config: Any = transformer.peft_config  # the adapter's LoraConfig, by adapter name
    metadata = peft_config["default"].to_dict()
    if isinstance(metadata.get("target_modules"), (list, set)):  # peft keeps a set: no order from run to run
        metadata["target_modules"] = sorted(metadata["target_modules"])
    # Dropout is for training only, but pipe.load_lora_weights leaves the layers it adds in training mode:
    # recorded here, the trained dropout would perturb every video a user samples with this file.
    metadata["lora_dropout"] = 0.0
    CogVideoXPipeline.save_lora_weights(out_dir, transformer_lora_layers=layers, safe_serialization=True,
                                        transformer_lora_adapter_metadata=metadata)
