"""Streaming training batches from webdataset shards.

Every (rank, loader worker) reads its own disjoint shards. The shard order of an epoch is a permutation
drawn from (seed, epoch), the same on every rank; samples are then shuffled in a buffer seeded by
(seed, epoch, rank, worker). Nothing depends on wall-clock or process-global RNG state, so the stream a
rank sees is a pure function of the spec and its rank. The stream is endless: epochs follow each other.
Micro-batches hold samples of one latent shape; a sample waits in its shape's bucket until it fills.
"""

from __future__ import annotations

import glob
import itertools
import json
import math
import random
import tarfile
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import torch
import webdataset as wds
from braceexpand import braceexpand
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from trainer.errors import UserError
from trainer.model import ModelShapes
from trainer.rng import DATA_ORDER, DATA_SHUFFLE, derive_seed
from trainer.shard_format import Sample, ShardError, decode_sample


class Batch(NamedTuple):
    keys: list[str]
    latents: torch.Tensor  # [B, C, F, H, W] as stored (usually bf16)
    prompt_embeds: torch.Tensor  # [B, L, D]


def resolve_shards(shards: str | list[str]) -> list[str]:
    """Expand data.shards (brace patterns, globs, directories, files) into an ordered list of .tar paths."""
    found: list[str] = []
    for entry in [shards] if isinstance(shards, str) else shards:
        if "{" in entry:
            paths = list(braceexpand(entry))
            missing = [p for p in paths if not Path(p).is_file()]
            if missing:
                more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
                raise UserError(f"data.shards: {entry!r} names missing files: {', '.join(missing[:3])}{more}")
        elif Path(entry).is_dir():
            paths = sorted(str(p) for p in Path(entry).glob("*.tar"))
        elif any(ch in entry for ch in "*?["):
            paths = sorted(glob.glob(entry))
        elif Path(entry).is_file():
            paths = [entry]
        else:
            raise UserError(f"data.shards: no such file or directory: {entry}")
        if not paths:
            raise UserError(f"data.shards: {entry!r} matches no .tar file")
        found.extend(paths)
    return list(dict.fromkeys(found))  # drop repeats, keep order


def raw_samples(shard: str) -> Iterator[dict]:
    """webdataset's member dicts of one shard; a truncated, corrupt or unreadable tar becomes a ShardError."""
    key = None
    try:
        for raw in wds.tarfile_samples([{"url": shard}]):
            key = raw.get("__key__")
            yield raw
    except (tarfile.TarError, OSError, ValueError) as exc:  # truncated, corrupt, unreadable, duplicate keys
        after = f" after sample {key!r}" if key else ""
        raise ShardError(shard, None, f"cannot be read{after} ({exc})") from None


def shard_samples(shard: str) -> Iterator[Sample]:
    """The decoded samples of one shard; the first bad one raises a ShardError naming the shard and key."""
    for raw in raw_samples(shard):
        yield decode_sample(raw)


def first_sample(shard: str) -> Sample:
    """The first sample of a shard; used to check shapes against the model before any work starts."""
    sample = next(shard_samples(shard), None)
    if sample is None:
        raise ShardError(shard, None, "holds no samples")
    return sample


def check_shards_fit(shards: list[str], shapes: ModelShapes, model_dir: Path) -> None:
    shapes.check(first_sample(shards[0]))
    check_latent_scale(shards, model_dir)


def check_latent_scale(shards: list[str], model_dir: Path) -> None:
    """Latents packed for another model's VAE can have the right shape and the wrong scale (CogVideoX-2B's
    scaling_factor is 1.15, 5B's 0.7): refuse shards whose manifest.json names a different scaling_factor."""
    vae_config = model_dir / "vae" / "config.json"
    if not vae_config.is_file():
        return
    ours = json.loads(vae_config.read_text()).get("scaling_factor")
    for folder in dict.fromkeys(Path(s).parent for s in shards):
        manifest = folder / "manifest.json"
        if not manifest.is_file():
            continue
        theirs = json.loads(manifest.read_text()).get("model", {}).get("vae", {}).get("scaling_factor")
        if None not in (ours, theirs) and not math.isclose(ours, theirs, rel_tol=1e-6):
            raise UserError(f"data.shards: {folder} was packed with a VAE scaling_factor of {theirs} "
                            f"({manifest}), but model.path's VAE has {ours}: these latents are for another model. "
                            f"Repack them with data_tools/shard.py --model {model_dir}")


def _buffer_shuffle(samples: Iterator[Sample], size: int, rng: random.Random) -> Iterator[Sample]:
    if size <= 1:
        yield from samples
        return
    buffer: list[Sample] = []
    for sample in samples:
        if len(buffer) < size:
            buffer.append(sample)
            continue
        i = rng.randrange(size)
        yield buffer[i]
        buffer[i] = sample
    rng.shuffle(buffer)
    yield from buffer


def collate(samples: list[Sample]) -> Batch:
    return Batch([s.key for s in samples], torch.stack([s.latents for s in samples]),
                 torch.stack([s.prompt_embeds for s in samples]))


class ShardStream(IterableDataset):
    def __init__(self, shards: list[str], *, rank: int, world_size: int, seed: int, micro_batch_size: int,
                 shuffle_buffer: int, shapes: ModelShapes):
        super().__init__()
        self.shards, self.rank, self.world_size, self.seed = shards, rank, world_size, seed
        self.micro_batch_size, self.shuffle_buffer, self.shapes = micro_batch_size, shuffle_buffer, shapes

    def shards_for(self, epoch: int, worker: int, num_workers: int) -> list[str]:
        order = random.Random(derive_seed(self.seed, DATA_ORDER, epoch)).sample(self.shards, len(self.shards))
        return order[self.rank :: self.world_size][worker::num_workers]

    def samples(self, epoch: int, worker: int, num_workers: int) -> Iterator[Sample]:
        mine = self.shards_for(epoch, worker, num_workers)
        count = 0
        for shard in mine:
            for sample in shard_samples(shard):
                self.shapes.check(sample)
                count += 1
                yield sample
        if count == 0:  # an endless stream of empty epochs would never yield, and the other ranks would wait
            raise ShardError(", ".join(mine), None, f"hold no samples (rank {self.rank}, loader worker {worker})")

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        worker, num_workers = (0, 1) if info is None else (info.id, info.num_workers)
        buckets: dict[tuple, list[Sample]] = defaultdict(list)
        try:
            for epoch in itertools.count():
                rng = random.Random(derive_seed(self.seed, DATA_SHUFFLE, epoch, self.rank, worker))
                for sample in _buffer_shuffle(self.samples(epoch, worker, num_workers), self.shuffle_buffer, rng):
                    bucket = buckets[tuple(sample.latents.shape)]
                    bucket.append(sample)
                    if len(bucket) == self.micro_batch_size:
                        yield collate(bucket)
                        bucket.clear()
        except ShardError as exc:
            # Raised in a loader worker, it would reach the trainer as a RuntimeError wrapping the worker's
            # traceback; handed over as a value, it is re-raised as itself by `batches`.
            yield exc


def batches(loader: DataLoader | ShardStream) -> Iterator[Batch]:
    """The batches of a loader (or a bare stream); a data error from any worker is raised here, in the trainer."""
    for item in loader:
        if isinstance(item, ShardError):
            raise item
        yield item


def loader_workers(num_shards: int, world_size: int, num_workers: int) -> int:
    """Loader workers per rank: as asked, but no more than the rank's share of shards (each needs its own)."""
    if num_shards < world_size:
        raise UserError(f"data.shards: {num_shards} shard(s) for {world_size} ranks; every rank reads shards of "
                        f"its own, so pack the data into at least {world_size} shards")
    return min(num_workers, num_shards // world_size)


def build_loader(shards: list[str], *, rank: int, world_size: int, seed: int, micro_batch_size: int,
                 shuffle_buffer: int, num_workers: int, shapes: ModelShapes, pin_memory: bool) -> DataLoader:
    """num_workers: per rank, at most ``loader_workers`` allows (each worker needs a shard of its own)."""
    stream = ShardStream(shards, rank=rank, world_size=world_size, seed=seed, micro_batch_size=micro_batch_size,
                         shuffle_buffer=shuffle_buffer, shapes=shapes)
    return DataLoader(stream, batch_size=None, num_workers=num_workers, pin_memory=pin_memory,
                      persistent_workers=num_workers > 0, prefetch_factor=4 if num_workers > 0 else None)


__all__ = ["Batch", "ShardError", "ShardStream", "batches", "build_loader", "check_shards_fit", "loader_workers",
           "resolve_shards"]
