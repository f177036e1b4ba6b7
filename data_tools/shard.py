#!/usr/bin/env python
"""Pack videos and captions into training shards, once: VAE latents and T5 prompt embeddings that any number
of training runs stream from.

    python data_tools/shard.py --input DATASET --model MODEL_DIR --out SHARDS_DIR [--frames F --height H --width W]
    torchrun --nproc_per_node 8 data_tools/shard.py --input ... --model ... --out ...     # one rank per GPU

DATASET is a directory with prompts.txt + videos.txt (the CogVideo finetune layout), a .csv or .jsonl manifest
with video and caption columns, or a directory of videos each with a same-stem .txt caption. Each rank packs
its own shards; rerunning the same command after a crash keeps the finished shards and packs the rest. Bad
inputs are listed with their reason in SHARDS_DIR/rejected.jsonl and the rest is packed.

Frames, size and fps default to the model's native clip, read from its directory (CogVideoX 1.0: 49x480x720 at
8 fps; 1.5: 81x768x1360 at 16 fps); a target off the model's frame rule or patch grid is refused before any work.
For an image-to-video model each sample also stores its clip's first frame (the picture the pipeline would be
given), and manifest.json says "kind": "image-to-video".
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import torch

from data_tools import packing
from data_tools.inputs import InputError, fingerprint, read_inputs
from data_tools.progress import Progress
from data_tools.video import Bucket, parse_buckets
from trainer.dtypes import PRECISIONS, encoding_dtype, torch_name
from trainer.errors import EXIT_USER_ERROR, UserError
from trainer.families import load_family
from trainer.families.base import ModelFamily, NativeClip
from trainer.process_env import default_device, share_cpu_threads, srun_task


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", type=Path, required=True, help="dataset directory, or a .csv/.jsonl manifest")
    p.add_argument("--model", required=True, help="model directory or hub id (its VAE and text encoder pack)")
    p.add_argument("--out", type=Path, required=True, help="directory for the shards and manifest.json")
    p.add_argument("--frames", type=int, help="frames per clip, on the model's rule (1.0: 8k+1, 1.5: 16k+1); "
                                             "default: the model's native clip (49, 81)")
    p.add_argument("--height", type=int, help="default: the model's native height (480, 768)")
    p.add_argument("--width", type=int, help="default: the model's native width (720, 1360)")
    p.add_argument("--buckets", help="several FRAMESxHEIGHTxWIDTH targets, e.g. 49x480x720,49x480x480,25x480x720; "
                                     "each clip goes to the one closest in aspect ratio that it is long enough for "
                                     "(instead of --frames/--height/--width)")
    p.add_argument("--fps", type=float, help="sample frames at this rate (default: the model's, 8 for CogVideoX "
                                           "1.0, 16 for 1.5)")
    p.add_argument("--evenly", action="store_true", help="spread the frames evenly over each whole clip instead")
    p.add_argument("--shard-size", type=int, default=64, help="videos per shard (default 64)")
    p.add_argument("--seed", type=int, default=0, help="seeds each sample's VAE posterior draw")
    p.add_argument("--dtype", choices=sorted(PRECISIONS), default="bf16", help="stored tensor dtype")
    p.add_argument("--no-vae-tiling", dest="vae_tiling", action="store_false",
                   help="encode whole frames at once (more memory; tiling only applies above the VAE's tile size)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--decode-workers", type=int, default=min(4, os.cpu_count() or 1), help="decoding threads")
    p.add_argument("--rank", type=int,
                   help="this process's rank (default: RANK from torchrun, SLURM_PROCID under srun, else 0)")
    p.add_argument("--world-size", type=int,
                   help="number of ranks (default: WORLD_SIZE from torchrun, the step's tasks under srun, else 1)")
    p.add_argument("--strict", action="store_true", help="exit non-zero if any input was rejected")
    p.add_argument("--video-column", default="video", help="manifest column with the video path")
    p.add_argument("--caption-column", default="caption", help="manifest column with the caption")
    args = p.parse_args(argv)
    if args.buckets is not None:
        if any(v is not None for v in (args.frames, args.height, args.width)):
            p.error("--buckets replaces --frames/--height/--width: give one or the other")
        try:
            parse_buckets(args.buckets)
        except ValueError as exc:
            p.error(f"--buckets: {exc}")
    for name in ("frames", "height", "width"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name} must be positive")
    for name in ("shard_size", "decode_workers"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.evenly and args.fps is not None:
        p.error("--evenly spreads the frames over each clip instead of sampling at --fps: give one or the other")
    if args.fps is not None and args.fps <= 0:
        p.error("--fps must be positive (or use --evenly)")
    return args


def targets(args: argparse.Namespace, native: NativeClip) -> tuple[list[Bucket], float | None]:
    """The buckets and fps to pack: the flags, each one left out the model's native clip's."""
    if args.buckets is not None:
        buckets = parse_buckets(args.buckets)
    else:
        frames, height, width = (native.frames if args.frames is None else args.frames,
                                 native.height if args.height is None else args.height,
                                 native.width if args.width is None else args.width)
        buckets = [Bucket(frames, height, width)]
    return buckets, None if args.evenly else (float(native.fps) if args.fps is None else args.fps)


def rank_and_world(args: argparse.Namespace) -> tuple[int, int, int]:
    """(rank, world size, local rank): the flags, else torchrun's variables, else SLURM's inside an srun step,
    else a single process. A plain `python shard.py` in an sbatch script (no step) packs everything itself,
    although SLURM_NTASKS there counts the whole allocation."""
    env = os.environ
    slurm_rank, slurm_world = srun_task(env) or (0, 1)
    rank = args.rank if args.rank is not None else int(env.get("RANK", slurm_rank))
    world = args.world_size if args.world_size is not None else int(env.get("WORLD_SIZE", slurm_world))
    if world < 1 or not 0 <= rank < world:
        raise UserError(f"--rank {rank} / --world-size {world}: the rank must be in [0, world size)")
    devices = max(1, torch.cuda.device_count())
    local = int(env.get("LOCAL_RANK", env.get("SLURM_LOCALID", rank % devices)))  # separate jobs share a node's GPUs
    return rank, world, local


def check_model(args: argparse.Namespace) -> tuple[ModelFamily, list[Bucket], float | None]:
    """The model's family, its buckets and fps, once the model is known to have the encoders and to take every
    bucket."""
    try:
        family = load_family(args.model, sampling=True, weights=False)  # a hub id: the encoders, not the weights
        family.check_encoders("--model", "packing")
        buckets, fps = targets(args, family.native_clip())
    except UserError as exc:
        raise UserError(str(exc).replace("model.path:", "--model:", 1)) from None
    for b in buckets:
        family.latent_shape(b.frames, b.height, b.width, bucket_option(b, args.buckets is not None))
    return family, buckets, fps


def bucket_option(bucket: Bucket, listed: bool) -> Callable[[str], str]:
    """What a message calls a bucket's frame count ("bucket 49x480x720", or --frames without --buckets) and sides
    ("bucket 49x480x720 width", --width)."""
    if not listed:
        return lambda name: "--frames" if name == "num_frames" else f"--{name}"
    return lambda name: f"bucket {bucket}" + ("" if name == "num_frames" else f" {name}")


def pick_device(choice: str, local_rank: int) -> torch.device:
    if choice == "cpu" or (choice == "auto" and not torch.cuda.is_available()):
        share_cpu_threads()  # several ranks on one machine: split the cores instead of oversubscribing them
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is visible")
    torch.cuda.set_device(local_rank % torch.cuda.device_count())
    return default_device()


def pack(args: argparse.Namespace) -> int:
    rank, world, local_rank = rank_and_world(args)
    family, buckets, fps = check_model(args)
    model_dir, encoder_configs = family.model_dir.resolve(), family.encoder_configs()
    layout, entries = read_inputs(args.input, args.video_column, args.caption_column)
    options = packing.PackOptions(buckets=tuple(map(str, buckets)), fps=fps, shard_size=args.shard_size,
                                  seed=args.seed, dtype=args.dtype, vae_tiling=args.vae_tiling,
                                  image=family.image_to_video)
    device = pick_device(args.device, local_rank)
    dtype = encoding_dtype(device)
    # the compute device and dtype change the latents' bits: a rerun must not mix CPU and GPU samples
    identity = packing.identity_of(options, layout, args.input.resolve(), fingerprint(entries), len(entries),
                                   encoder_configs, f"{device.type}/{torch_name(dtype)}")
    out, tag = args.out, f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    packing.claim(out, identity, tag)
    (out / "progress").mkdir(exist_ok=True)
    all_chunks = packing.chunks(entries, args.shard_size)
    mine = [j for j in range(len(all_chunks)) if j % world == rank]
    todo = [j for j in mine if not packing.finished(out, j)]
    say = (lambda msg: print(f"[rank {rank}] {msg}", flush=True)) if world > 1 else (lambda msg: print(msg, flush=True))
    say(f"{args.input} ({layout}): {len(entries)} inputs in {len(all_chunks)} shards; this rank packs "
        f"{len(mine)}, of which {len(mine) - len(todo)} are already finished")
    say(f"clips: {', '.join(map(str, buckets))} (frames x height x width), "
        f"{'evenly spread' if fps is None else f'at {fps:g} fps'}, for {family.describe()} (native clip "
        f"{family.native_clip()})")
    if todo or not (out / packing.EMPTY_PROMPT).exists():
        encoder = family.encoders(device, dtype, args.vae_tiling)
        packing.write_empty_prompt(out, encoder, PRECISIONS[args.dtype], tag)
        start, total = time.perf_counter(), sum(len(all_chunks[j]) for j in todo)
        with Progress(total, enabled=rank == 0, say=say) as progress:
            for j in todo:
                rec = packing.pack_chunk(j, all_chunks[j], encoder, options, out, tag, args.decode_workers,
                                         progress.advance)
                progress.note(f"{rec['shard'] or f'chunk {j} (no shard)'}: {len(rec['samples'])} samples, "
                              f"{len(rec['rejected'])} rejected")
        say(f"packed {total} inputs in {time.perf_counter() - start:.1f} s")
    manifest = packing.finalize(out, len(all_chunks), identity, model_dir, encoder_configs, tag)
    if manifest is None:
        # exit 0 even under --strict: torchrun would stop the ranks still packing. The last rank decides.
        say("done; other ranks are still packing, and the last one to finish writes manifest.json (if every "
            "rank has finished and there is none, rerun the same command: it only writes the manifest)")
        return 0
    summary = ", ".join(f"{k}: {v['samples']}" for k, v in manifest["buckets"].items()) or "none"
    say(f"manifest.json: {manifest['samples']} samples in {len(manifest['shards'])} shards (per bucket: {summary}); "
        f"{manifest['rejected_total']} of {manifest['inputs']} inputs rejected" +
        (f" ({', '.join(f'{k}: {v}' for k, v in manifest['rejected'].items())})" if manifest["rejected"] else ""))
    if manifest["rejected_total"]:
        say(f"rejected inputs and reasons: {out / 'rejected.jsonl'}")
    if manifest["samples"] == 0:
        print(f"error: nothing could be packed from {args.input}; see {out / 'rejected.jsonl'}", file=sys.stderr)
        return 1
    return 1 if args.strict and manifest["rejected_total"] else 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return pack(args)
    except (UserError, InputError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR


if __name__ == "__main__":
    sys.exit(main())
