"""What validation and launch/sample.py share around the model family's pipeline: the prompts, encoded once by
the model directory's text encoder exactly as data_tools/shard.py encodes captions, and the files the videos
go to. The same weights, prompt and seed give the same video in both.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from trainer.dtypes import encoding_dtype
from trainer.families.base import ModelFamily
from trainer.process_env import default_device


def encode_prompts(family: ModelFamily, prompts: list[str]) -> torch.Tensor:
    """[P, L, D] on the CPU, in the encoding dtype. Loads the text encoder, encodes, and frees it again."""
    device = default_device()
    encoder = family.prompt_encoder(device, encoding_dtype(device))  # as data_tools/shard.py encodes captions
    embeds = torch.stack([encoder(prompt).cpu() for prompt in prompts])
    del encoder
    if device.type == "cuda":
        torch.cuda.empty_cache()  # nothing of the text encoder stays on the device the transformer trains on
    return embeds


def video_names(prompts: list[str]) -> list[str]:
    """NNN-<the prompt's first words>.mp4, in prompt order."""
    return [f"{i:03d}-{re.sub(r'[^a-z0-9]+', '-', p.lower())[:40].strip('-') or 'prompt'}.mp4"
            for i, p in enumerate(prompts)]


def write_prompt_list(out: Path, prompts: list[str], seed: int, images: list[str] | None = None) -> None:
    """prompts.json beside the videos: which file shows which prompt (and, image-to-video, which image), and the
    seed."""
    listing: dict = {"seed": seed, "videos": dict(zip(video_names(prompts), prompts, strict=True))}
    if images:
        listing["images"] = dict(zip(video_names(prompts), images, strict=True))
    (out / "prompts.json").write_text(json.dumps(listing, indent=1) + "\n")
