#!/usr/bin/env python
"""The trainer's data loader against a raw sequential read of the same shard files.

    python bench/data.py                                      # 256 CogVideoX-5B samples at 49x480x720 (~4 MB each)
    python bench/data.py --workers 4 --micro-batch 2
    python bench/data.py --latents 16,13,60,90 --text-len 226 --text-dim 4096 --samples 512
    python bench/data.py --shards /path/to/shards             # existing shards; the shape comes from their index
    python bench/data.py --quick                              # 16 tiny-model samples: a smoke test in seconds

raw:     every shard file read start to end into one reusable 8 MiB buffer, nothing decoded.
loader:  trainer/data.py's MicroBatches + streaming as training uses them: reader threads read each sample by
         offset straight into its batch row (page-locked where CUDA is) and check that its values are finite.
Both read from the page cache (the files are read once before either is timed), so this measures the loader's
CPU cost, not the disk. MB/s is 10^6 bytes/s: file bytes for raw, tensor payload (latents + prompt) for the
loader; loader/raw is the ratio of the two (1.0 would be a free loader). The first micro-batch (worker
start-up) is not timed; the readers' prefetch that overlaps it flatters the loader by a few batches at most.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import webdataset as wds  # noqa: E402

from common import print_table  # noqa: E402
from trainer.data import MicroBatches, resolve_shards, streaming  # noqa: E402
from trainer.dtypes import short_name  # noqa: E402
from trainer.errors import UserError  # noqa: E402
from trainer.shard_format import SampleShapes, encode_sample, shard_samples  # noqa: E402
from trainer.shard_index import build_index  # noqa: E402

BUFFER = 8 << 20


def write_shards(out: Path, samples: int, per_shard: int, latents: tuple[int, ...], prompt: tuple[int, int]) -> None:
    gen = torch.Generator().manual_seed(0)
    meta = {"caption": "bench", "source": "bench/data.py", "fps": 8, "num_frames": 4 * (latents[1] - 1) + 1,
            "height": 8 * latents[2], "width": 8 * latents[3]}
    for first in range(0, samples, per_shard):
        with open(out / f"bench-{first // per_shard:06d}.tar", "wb") as file, wds.TarWriter(file, encoder=False) as tar:
            for i in range(first, min(first + per_shard, samples)):
                tar.write(encode_sample(f"s{i:06d}", torch.randn(latents, generator=gen).bfloat16(),
                                        torch.randn(prompt, generator=gen).bfloat16(), meta))


def raw_read(shards: list[str]) -> int:
    buffer, total = memoryview(bytearray(BUFFER)), 0
    for shard in shards:
        with open(shard, "rb", buffering=0) as file:
            while n := file.readinto(buffer):
                total += n
    return total


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", type=Path, help="directory of existing shards (default: synthetic ones in a temp dir)")
    p.add_argument("--latents", default="16,13,60,90", help="synthetic latent shape C,F,H,W")
    p.add_argument("--text-len", type=int, default=226)
    p.add_argument("--text-dim", type=int, default=4096)
    p.add_argument("--samples", type=int, default=256)
    p.add_argument("--samples-per-shard", type=int, default=32)
    p.add_argument("--workers", type=int, default=2, help="reader threads (data.num_workers; default 2)")
    p.add_argument("--micro-batch", type=int, default=1)
    p.add_argument("--epochs", type=int, default=4, help="passes over the data on each side (default 4)")
    p.add_argument("--quick", action="store_true", help="16 samples of the tiny test model's shapes, 8 per shard")
    args = p.parse_args(argv)
    if args.quick:
        args.latents, args.text_len, args.text_dim, args.samples, args.samples_per_shard = "4,3,12,16", 226, 32, 16, 8
    if args.shards:
        try:
            shards = resolve_shards(str(args.shards), "--shards")
        except UserError as exc:
            raise SystemExit(str(exc)) from None
        return bench(args, shards, "")
    with tempfile.TemporaryDirectory(prefix="bench-data-") as tmp:
        latents = tuple(int(d) for d in args.latents.split(","))
        write_shards(Path(tmp), args.samples, args.samples_per_shard, latents, (args.text_len, args.text_dim))
        return bench(args, resolve_shards(tmp), "synthetic ")


def bench(args: argparse.Namespace, shards: list[str], kind: str) -> int:
    first = next(shard_samples(shards[0]))
    lat, prompt = first.latents, first.prompt_embeds
    shapes = SampleShapes(lat.shape[0], prompt.shape[0], prompt.shape[1], patch_size=2, source="bench",
                          channels_key="channels", text_keys="text length, width")
    index = build_index(shards, shapes, rank=0, world_size=1, gather=lambda parts: [parts])
    for fault in index.faults:
        print(f"left out: {fault}")
    n = len(index.samples)
    sample_mb = (lat.nbytes + prompt.nbytes) / 1e6

    raw_read(shards)  # warm the page cache: both sides below read from memory
    start = time.perf_counter()
    raw_bytes = sum(raw_read(shards) for _ in range(args.epochs))
    raw_s = time.perf_counter() - start

    dataset = MicroBatches(index, seed=0, micro_batch_size=args.micro_batch, rank=0, world_size=1,
                           shapes=shapes, pin_memory=torch.cuda.is_available())
    batches = args.epochs * dataset.per_epoch - 1
    if batches == 0:
        raise SystemExit("need at least two micro-batches: raise --samples")
    payload = invalid = 0
    touched = 0.0
    with streaming(dataset, threads=args.workers) as stream:
        next(stream)  # thread start-up, not timed
        start = time.perf_counter()
        for _ in range(batches):
            batch = next(stream)
            touched += float(batch.latents.view(-1)[0]) + float(batch.prompt_embeds.view(-1)[0])  # not lazy
            payload += batch.latents.nbytes + batch.prompt_embeds.nbytes
            invalid += int((~batch.valid).sum())
        loader_s = time.perf_counter() - start

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(f"machine: {threads} CPU threads, {gpu}; torch {torch.__version__}")
    print(f"{n} {kind}samples in {len(shards)} shard(s): latents {list(lat.shape)} {short_name(lat.dtype)}"
          f" + prompt_embeds {list(prompt.shape)} {short_name(prompt.dtype)} = {sample_mb:.2f} MB"
          f" per sample; micro-batch {args.micro_batch}")
    print("both sides read from the page cache: this measures the loader's CPU cost, not the disk")
    if invalid:
        print(f"warning: {invalid} sample(s) could not be read (zeros stood in)")
    raw_mbs, loader_mbs = raw_bytes / 1e6 / raw_s, payload / 1e6 / loader_s
    label = f"loader ({args.workers} thread{'s' if args.workers != 1 else ''})"
    print_table("loader against a raw read", ["", "samples/s", "MB/s"],
                [["raw read", args.epochs * n / raw_s, raw_mbs],
                 [label, batches * args.micro_batch / loader_s, loader_mbs]])
    print(f"loader/raw = {loader_mbs / raw_mbs:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
