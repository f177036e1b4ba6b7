#!/usr/bin/env python
"""Write a small webdataset of synthetic training samples in the trainer's shard format.

    python data_tools/synth.py --model runs/tiny-5b --out runs/tiny-5b-shards --samples 8 --samples-per-shard 2

Shaped for the given model directory: latent channels and compression from its vae/ and transformer/
configs; captions encoded by its own text_encoder/ and tokenizer/ (the real T5 path). The latents are
smooth moving patterns, a different one per caption, so a LoRA can visibly learn them. Real videos are
packed by data_tools/shard.py.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from trainer.errors import EXIT_USER_ERROR, UserError
from trainer.families import load_family
from trainer.shard_format import EMPTY_PROMPT, encode_sample

COLOURS = ["red", "green", "blue", "yellow", "white", "orange", "purple", "cyan"]
SHAPES = ["ball", "square", "triangle", "ring"]
MOTIONS = ["left", "right", "up", "down"]


def caption(i: int) -> str:
    return f"a {COLOURS[i % len(COLOURS)]} {SHAPES[i // len(COLOURS) % len(SHAPES)]} moving {MOTIONS[i % len(MOTIONS)]}"


def pattern(i: int, shape: tuple[int, int, int, int]) -> torch.Tensor:
    """A smooth wave travelling along its caption's direction, with per-channel phase; unit-ish variance."""
    c, f, h, w = shape
    t, y, x = torch.meshgrid(torch.arange(f, dtype=torch.float32), torch.linspace(0, 1, h), torch.linspace(0, 1, w),
                             indexing="ij")
    dx, dy = [(-1, 0), (1, 0), (0, -1), (0, 1)][i % 4]
    freq = 1 + i % 3
    channels = [torch.sin(2 * math.pi * (freq * (x + y) + 0.25 * (dx * t / f + dy * t / f) * 4 + k / c + i / 7))
                for k in range(c)]
    return math.sqrt(2) * torch.stack(channels)


def picture(rgb: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """[3, h, w] in about [-1.5, 1.5] -> a uint8 picture [3, height, width], smoothly upscaled."""
    big = torch.nn.functional.interpolate(rgb[None], size=(height, width), mode="bilinear", align_corners=False)[0]
    return ((big / 1.5).clamp(-1, 1) * 127.5 + 127.5).round().to(torch.uint8)


def write_synthetic_shards(model_dir: Path, out: Path, samples: int, samples_per_shard: int,
                           frames: int | None = None, height: int | None = None, width: int | None = None,
                           seed: int = 0) -> list[Path]:
    """Frames and size left out are the model's native clip's."""
    import webdataset as wds

    family = load_family(str(model_dir))
    native = family.native_clip()
    frames, height, width = frames or native.frames, height or native.height, width or native.width
    shape = family.latent_shape(frames, height, width, lambda name: f"--{name.replace('num_', '')}")
    captions = [caption(seed + i) for i in range(samples)]
    encode = family.prompt_encoder(torch.device("cpu"), torch.float32)
    embeds = [encode(text) for text in captions]
    out.mkdir(parents=True, exist_ok=True)
    # the empty caption's embedding, as data_tools/shard.py writes it (caption dropout trains on it)
    save_file({"prompt_embeds": encode("").to(torch.bfloat16).contiguous()}, str(out / EMPTY_PROMPT))
    with wds.ShardWriter(str(out / "train-%06d.tar"), maxcount=samples_per_shard, encoder=False, verbose=0) as sink:
        for i, text in enumerate(captions):
            meta = {"caption": text, "source": "synthetic", "fps": native.fps, "num_frames": frames,
                    "height": height, "width": width}
            latents = pattern(seed + i, shape)
            # an image-to-video sample's first frame: the pattern's first latent frame, as a picture
            image = picture(latents[:3, 0], height, width) if family.image_to_video else None
            sink.write(encode_sample(f"synth{seed + i:06d}", latents.to(torch.bfloat16), embeds[i].to(torch.bfloat16),
                                     meta, image))
    return sorted(out.glob("train-*.tar"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True, help="CogVideoX model directory the data is for")
    parser.add_argument("--out", type=Path, required=True, help="directory for the .tar shards")
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--samples-per-shard", type=int, default=2)
    parser.add_argument("--frames", type=int, help="video frames the latents stand for (default: the model's)")
    parser.add_argument("--height", type=int, help="default: the model's native height")
    parser.add_argument("--width", type=int, help="default: the model's native width")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        shards = write_synthetic_shards(args.model, args.out, args.samples, args.samples_per_shard, args.frames,
                                        args.height, args.width, args.seed)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    print(f"{args.samples} synthetic samples in {len(shards)} shard(s) under {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
