#!/usr/bin/env python
"""Write synthetic training videos (moving coloured shapes, captions that describe them) as real mp4 files,
in the CogVideo finetune layout that data_tools/shard.py reads:

    OUT/videos/00000.mp4 ...   OUT/videos.txt (one path per line)   OUT/prompts.txt (line N captions line N)

    python data_tools/synth_videos.py --out runs/videos --count 8
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from data_tools.synth import COLOURS, MOTIONS, SHAPES, caption
from trainer.media import write_mp4

RGB = {"red": (230, 40, 40), "green": (40, 200, 60), "blue": (50, 80, 230), "yellow": (240, 220, 40),
       "white": (245, 245, 245), "orange": (250, 140, 20), "purple": (150, 50, 200), "cyan": (40, 220, 220)}
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}


def _mask(shape: str, yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, r: float) -> np.ndarray:
    dy, dx = yy - cy, xx - cx
    if shape == "ball":
        return dy ** 2 + dx ** 2 <= r ** 2
    if shape == "square":
        return (np.abs(dy) <= r) & (np.abs(dx) <= r)
    if shape == "triangle":
        return (dy <= r) & (dy >= -r) & (np.abs(dx) <= (dy + r) / 2)
    return np.abs(np.sqrt(dy ** 2 + dx ** 2) - r * 0.75) <= r * 0.25  # ring


def frames_for(i: int, frames: int, height: int, width: int) -> np.ndarray:
    """[frames, height, width, 3] uint8: sample i's shape crossing the frame in its caption's direction."""
    colour, motion = COLOURS[i % len(COLOURS)], MOTIONS[i % len(MOTIONS)]
    shape = SHAPES[i // len(COLOURS) % len(SHAPES)]
    assert caption(i) == f"a {colour} {shape} moving {motion}"
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    background = (30 + 40 * yy / height)[..., None].repeat(3, axis=2)  # a soft vertical gradient
    r = min(height, width) / 6
    dx, dy = DIRECTIONS[motion]
    out = np.empty((frames, height, width, 3), dtype=np.uint8)
    for f in range(frames):
        progress = f / max(frames - 1, 1) - 0.5  # -0.5 .. 0.5 across the clip
        cx = width / 2 + dx * progress * (width - 2 * r)
        cy = height / 2 + dy * progress * (height - 2 * r)
        img = background.copy()
        img[_mask(shape, yy, xx, cy, cx, r)] = RGB[colour]
        out[f] = img.astype(np.uint8)
    return out


def write_synthetic_videos(out: Path, count: int, frames: int = 12, height: int = 120, width: int = 160,
                           fps: int = 8, first: int = 0) -> list[Path]:
    """Videos first..first+count-1 in the CogVideo finetune layout; returns the mp4 paths."""
    out.mkdir(parents=True, exist_ok=True)
    paths, captions = [], []
    for i in range(first, first + count):
        paths.append(write_mp4(out / "videos" / f"{i:05d}.mp4", frames_for(i, frames, height, width), fps))
        captions.append(caption(i))
    (out / "videos.txt").write_text("".join(f"videos/{p.name}\n" for p in paths))
    (out / "prompts.txt").write_text("".join(f"{c}\n" for c in captions))
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="dataset directory to write")
    parser.add_argument("--count", type=int, default=8)
    parser.add_argument("--frames", type=int, default=12)
    parser.add_argument("--height", type=int, default=120)
    parser.add_argument("--width", type=int, default=160)
    parser.add_argument("--fps", type=int, default=8)
    parser.add_argument("--first", type=int, default=0, help="index of the first video (another set: a later one)")
    args = parser.parse_args(argv)
    if args.height % 2 or args.width % 2:
        parser.error("--height and --width must be even (H.264 with yuv420p)")
    write_synthetic_videos(args.out, args.count, args.frames, args.height, args.width, args.fps, args.first)
    print(f"{args.count} synthetic videos ({args.frames} frames, {args.height}x{args.width}, {args.fps} fps) "
          f"in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
