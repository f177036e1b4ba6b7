#!/usr/bin/env python
"""Packing throughput against the bare encode time of the same clips.

    python bench/pack.py                                     # tiny model, 8 clips, 9x96x128 from 120x160
    python bench/pack.py --frames 49 --height 480 --width 720 --src-height 720 --src-width 1280
    python bench/pack.py --model /path/to/CogVideoX-5b --device cuda --frames 49 --height 480 --width 720 ...

pack:  what data_tools/shard.py does per shard: decode on threads, VAE + T5 encode, write the tar, fsync.
bare:  VAE + T5 on the same clips, already decoded and in memory: no file I/O, no decoding.
The ratio pack/bare is the cost of everything around the encoders (1.0 would be free I/O and decoding).
Without --model a tiny random-weight model is written to a temporary directory: its encoders are far
cheaper than CogVideoX's real ones, so the ratio it shows is an upper bound for real models.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from data_tools import packing  # noqa: E402
from data_tools.inputs import read_inputs  # noqa: E402
from data_tools.synth_videos import write_synthetic_videos  # noqa: E402
from data_tools.tiny_model import write_tiny_model  # noqa: E402
from data_tools.video import Bucket, decode_clip  # noqa: E402
from trainer.dtypes import encoding_dtype  # noqa: E402
from trainer.families import load_family  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # time the kernels, not their launches


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, help="model directory (default: a tiny random-weight CogVideoX)")
    p.add_argument("--clips", type=int, default=8)
    p.add_argument("--frames", type=int, help="default: the model's native clip (the tiny model's 9x96x128)")
    p.add_argument("--height", type=int)
    p.add_argument("--width", type=int)
    p.add_argument("--src-height", type=int, default=120)
    p.add_argument("--src-width", type=int, default=160)
    p.add_argument("--fps", type=int, help="default: the model's")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--decode-workers", type=int, default=4)
    args = p.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="bench-pack-") as tmp:
        return bench(args, Path(tmp))


def bench(args: argparse.Namespace, work: Path) -> int:
    model = args.model or write_tiny_model(work / "model", "5b")
    family = load_family(str(model))
    native = family.native_clip()
    args.frames, args.height, args.width = (args.frames or native.frames, args.height or native.height,
                                            args.width or native.width)
    args.fps = args.fps or native.fps
    family.latent_shape(args.frames, args.height, args.width, lambda name: f"--{name.replace('num_', '')}")
    src_frames = (args.frames - 1) + args.fps // 2 + 1  # a little longer than the clip needs
    write_synthetic_videos(work / "videos", args.clips, src_frames, args.src_height, args.src_width, args.fps)
    _, entries = read_inputs(work / "videos")
    videos = [e.video for e in entries if e.video is not None]
    captions = [e.caption for e in entries if e.caption is not None]
    assert len(videos) == len(captions) == len(entries), "every synthetic video has its caption"
    device = torch.device(args.device)
    dtype = encoding_dtype(device)

    start = time.perf_counter()
    encoder = family.encoders(device, dtype, vae_tiling=True)
    load_s = time.perf_counter() - start
    bucket = Bucket(args.frames, args.height, args.width)
    clips = [decode_clip(video, [bucket], float(args.fps)) for video in videos]
    encoder.video(clips[0].frames, 0, 0), encoder.text(captions[0])  # warm-up: kernels, allocator
    sync(device)

    start = time.perf_counter()
    for entry, clip, caption in zip(entries, clips, captions, strict=True):
        encoder.video(clip.frames, 0, entry.index).cpu()
        encoder.text(caption).cpu()
    sync(device)
    bare_s = time.perf_counter() - start

    options = packing.PackOptions(buckets=(str(bucket),), fps=float(args.fps), shard_size=len(entries), seed=0,
                                  dtype="bf16", vae_tiling=True)
    out = work / "shards"
    (out / "progress").mkdir(parents=True)
    start = time.perf_counter()
    record = packing.pack_chunk(0, entries, encoder, options, out, "bench", args.decode_workers, lambda: None)
    sync(device)
    pack_s = time.perf_counter() - start
    assert len(record["samples"]) == len(entries), record["rejected"]

    start = time.perf_counter()
    for video in videos:
        decode_clip(video, [bucket], float(args.fps))
    decode_s = time.perf_counter() - start

    n = len(entries)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"model {args.model or 'tiny 5B-style (random weights)'} on {device.type} ({name}), {dtype}; {n} clips of "
          f"{bucket} from {args.src_height}x"
          f"{args.src_width} sources at {args.fps} fps; model load {load_s:.1f} s")
    print(f"pack    {pack_s:8.2f} s  {n / pack_s:7.2f} clips/s   (decode + encode + tar + fsync)")
    print(f"bare    {bare_s:8.2f} s  {n / bare_s:7.2f} clips/s   (VAE + T5 only, clips in memory)")
    print(f"decode  {decode_s:8.2f} s  {n / decode_s:7.2f} clips/s   (PyAV + resize only, one thread)")
    print(f"ratio pack/bare = {pack_s / bare_s:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
