#!/usr/bin/env python
"""Write a tiny, random-weight but complete CogVideoX model directory that diffusers loads offline.

    python data_tools/tiny_model.py --out runs/tiny-5b --flavour 5b     # or 2b, 1.5, 5b-i2v, 1.5-i2v

Real classes throughout (CogVideoXTransformer3DModel, AutoencoderKLCogVideoX, T5EncoderModel, a T5 tokenizer,
CogVideoXDDIMScheduler), saved with save_pretrained, so the trainer loads it through exactly the code path a
real THUDM/CogVideoX-5b directory takes. Geometry matches the real models (8x spatial and 4x temporal VAE
compression, patch size 2, 226 text tokens); only widths, depths and the base grid are small. Each flavour
carries its model's published structure and settings (huggingface.co/THUDM/<model>/, the files named):
  2b   transformer/config.json: no RoPE (sin-cos positions); scheduler_config.json: snr_shift_scale 3.0;
       vae/config.json: scaling_factor 1.15258426, invert_scale_latents false
  5b   transformer: 3D RoPE; scheduler: snr_shift_scale 1.0; vae: scaling_factor 0.7, invert_scale_latents false
  1.5  (CogVideoX1.5-5B) transformer: patch_size_t 2, patch_bias false, no learned positional embedding,
       3D RoPE ("slice" grid), max_text_seq_length 226 (the model card's 224 is the SAT training length; the
       diffusers config, its conversion script and CogVideoXPipeline's default say 226); vae: scaling_factor
       0.7, invert_scale_latents true; scheduler: snr_shift_scale 1.0 (as diffusers'
       scripts/convert_cogvideox_to_diffusers.py is run for it and the SAT config's ZeroSNRDDPM default)
  5b-i2v   (CogVideoX-5b-I2V) transformer: the 5b flavour with in_channels = 2 x out_channels (the image
       latents are concatenated on channels, 32 = 2 x 16 published) and use_learned_positional_embeddings true
       beside 3D RoPE (its clip is the base grid at sample_frames, nothing else); scheduler and vae as 5b
  1.5-i2v  (CogVideoX1.5-5B-I2V, as diffusers' conversion script writes it for --version 1.5 --i2v) the 1.5
       flavour with in_channels = 2 x out_channels and ofs_embed_dim (512 published, equal to time_embed_dim:
       diffusers adds the ofs embedding to the timestep's); scheduler and vae as 1.5
  tests/configs/SOURCES.md says where each published value was read, and which were inferred.
  All: a zero-terminal-SNR v-prediction DDIM schedule, scaled_linear betas 0.00085..0.012, "trailing" spacing.
The base grid (sample_height x sample_width latents) is 12 x 16, a native clip of 96x128: 9 frames for the 1.0
flavours and 17 (16k+1, as 1.5's 81) for 1.5, whose 5 latent frames are an odd number, padded to 6.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch


@dataclass(frozen=True)
class Flavour:
    transformer: dict[str, Any]  # CogVideoXTransformer3DModel arguments of the flavour's structure
    snr_shift_scale: float
    vae_scaling_factor: float
    invert_scale_latents: bool = False
    image_to_video: bool = False


_5B = {"use_rotary_positional_embeddings": True, "sample_frames": 9}
_15 = {"use_rotary_positional_embeddings": True, "patch_size_t": 2, "patch_bias": False,
       "use_learned_positional_embeddings": False, "sample_frames": 17}
FLAVOURS = {
    "2b": Flavour({"use_rotary_positional_embeddings": False, "sample_frames": 9}, 3.0, 1.15258426),
    "5b": Flavour(_5B, 1.0, 0.7),
    "1.5": Flavour(_15, 1.0, 0.7, invert_scale_latents=True),
    "5b-i2v": Flavour({**_5B, "use_learned_positional_embeddings": True}, 1.0, 0.7, image_to_video=True),
    "1.5-i2v": Flavour({**_15, "ofs_embed_dim": 32}, 1.0, 0.7, invert_scale_latents=True, image_to_video=True),
}
LATENT_CHANNELS = 4
TEXT_DIM = 32
TEXT_LEN = 226  # what CogVideoXPipeline encodes prompts to


def _tokenizer():
    """A character-level Unigram T5 tokenizer built offline (no sentencepiece file, no hub)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import T5TokenizerFast  # type: ignore[attr-defined]  # (a lazy module to mypy)

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [(ch, -1.0 - i / 100) for i, ch in enumerate("▁abcdefghijklmnopqrstuvwxyz0123456789,.-'")]
    backend = Tokenizer(models.Unigram(pieces, unk_id=2, byte_fallback=False))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Metaspace()
    tokenizer = T5TokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                extra_ids=0, model_max_length=TEXT_LEN)
    return tokenizer, len(pieces)


def write_tiny_model(out: Path, flavour: str = "5b", seed: int = 0, **sizes: Any) -> Path:
    """``sizes``: CogVideoXTransformer3DModel arguments to change (the benchmarks' wider, deeper models)."""
    from diffusers import (
        AutoencoderKLCogVideoX,
        CogVideoXDDIMScheduler,
        CogVideoXImageToVideoPipeline,
        CogVideoXPipeline,
        CogVideoXTransformer3DModel,
    )
    from diffusers.utils import logging as diffusers_logging
    from transformers import T5Config, T5EncoderModel

    kind = FLAVOURS[flavour]
    torch.manual_seed(seed)
    tokenizer, vocab_size = _tokenizer()
    text_encoder = T5EncoderModel(T5Config(
        vocab_size=vocab_size, d_model=TEXT_DIM, d_kv=8, d_ff=64, num_layers=1, num_heads=4,
        relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1,
        decoder_start_token_id=0))  # type: ignore[call-arg]  # T5Config takes what PretrainedConfig does
    transformer: Any = CogVideoXTransformer3DModel(**{
        "num_attention_heads": 2, "attention_head_dim": 16,  # RoPE splits the head dim t:h:w: a multiple of 16
        "num_layers": 2, "in_channels": LATENT_CHANNELS * (2 if kind.image_to_video else 1),
        "out_channels": LATENT_CHANNELS, "time_embed_dim": 32, "text_embed_dim": TEXT_DIM,
        "sample_height": 12, "sample_width": 16,  # the base grid: 96x128 video
        "patch_size": 2, "temporal_compression_ratio": 4, "max_text_seq_length": TEXT_LEN,
        **kind.transformer, **sizes})
    # Real CogVideoX transformers ship bf16 weights; so do we (the trainer loads them in the compute dtype).
    # (diffusers warns about casting with .to(); this model has no fp32-only modules to keep.)
    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    transformer = transformer.to(torch.bfloat16)
    diffusers_logging.set_verbosity(verbosity)
    vae = AutoencoderKLCogVideoX(
        latent_channels=LATENT_CHANNELS, block_out_channels=(8, 8, 16, 16), layers_per_block=1, norm_num_groups=4,
        temporal_compression_ratio=4, scaling_factor=kind.vae_scaling_factor,
        invert_scale_latents=kind.invert_scale_latents)
    scheduler = CogVideoXDDIMScheduler(
        num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
        clip_sample=False, prediction_type="v_prediction", rescale_betas_zero_snr=True, set_alpha_to_one=True,
        steps_offset=0, timestep_spacing="trailing", snr_shift_scale=kind.snr_shift_scale)
    pipeline = CogVideoXImageToVideoPipeline if kind.image_to_video else CogVideoXPipeline  # model_index.json
    pipe = pipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer,
                             scheduler=scheduler)
    pipe.save_pretrained(out)  # type: ignore[union-attr]  # DiffusionPipeline's, hidden from mypy
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="model directory to write")
    parser.add_argument("--flavour", choices=sorted(FLAVOURS), default="5b")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    write_tiny_model(args.out, args.flavour, args.seed)
    print(f"tiny CogVideoX ({args.flavour}-style) written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
