"""Training micro-batches read by offset from webdataset shards, in an order that survives any resume.

Each epoch is one seeded permutation of every indexed sample (the same on every rank); samples are grouped
into micro-batches of one latent shape in that order, and a shape's last partial micro-batch of the epoch is
dropped. Every epoch therefore has the same number of micro-batches, and the run's micro-batches form one
global sequence: micro-batch g of the run is epoch g // per_epoch, position g % per_epoch. Rank r of W takes
g = start + k*W + r for its k-th micro-batch. The data position is the single number ``start`` (global
micro-batches consumed = samples seen / micro batch size), so a resume on the same or another number of
ranks continues the sequence without repeating or skipping a sample.
"""

from __future__ import annotations

import glob
import json
import math
import random
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

import torch
from braceexpand import braceexpand
from torch.utils.data import DataLoader, Dataset

from trainer.errors import UserError
from trainer.faults import ignore_stop_signals
from trainer.model import ModelShapes
from trainer.rng import DATA_ORDER, derive_seed
from trainer.shard_format import LATENTS, PROMPT_EMBEDS, ShardError, load_tensor, shard_samples
from trainer.shard_index import Extent, SampleRef, ShardIndex


class Batch(NamedTuple):
    keys: list[str]
    shards: list[str]  # each sample's shard file name
    latents: torch.Tensor  # [B, C, F, H, W] as stored (usually bf16)
    prompt_embeds: torch.Tensor  # [B, L, D]
    valid: torch.Tensor  # [B] bool: False where the sample could not be read (zeros stand in; its loss is 0)
    faults: list[ShardError]  # why, for each invalid sample
    position: tuple[int, int]  # (epoch, micro-batch within the epoch) of this micro-batch


def resolve_shards(shards: str | list[str], field: str = "data.shards") -> list[str]:
    """Expand data.shards (brace patterns, globs, directories, files) into an ordered list of .tar paths;
    errors name ``field``."""
    found: list[str] = []
    for entry in [shards] if isinstance(shards, str) else shards:
        if "{" in entry:
            paths = list(braceexpand(entry))
            missing = [p for p in paths if not Path(p).is_file()]
            if missing:
                more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
                raise UserError(f"{field}: {entry!r} names missing files: {', '.join(missing[:3])}{more}")
        elif Path(entry).is_dir():
            paths = sorted(str(p) for p in Path(entry).glob("*.tar"))
        elif any(ch in entry for ch in "*?["):
            paths = sorted(glob.glob(entry))
        elif Path(entry).is_file():
            paths = [entry]
        else:
            raise UserError(f"{field}: no such file or directory: {entry}")
        if not paths:
            raise UserError(f"{field}: {entry!r} matches no .tar file")
        found.extend(paths)
    return list(dict.fromkeys(found))  # drop repeats, keep order


def check_first_sample(shards: list[str], shapes: ModelShapes) -> None:
    """Data packed for another model fails here, before any work, whatever data.on_error says: the first
    readable sample must fit the model (single bad samples are the index's business)."""
    for shard in shards:
        try:
            sample = next(shard_samples(shard), None)
        except ShardError:
            continue
        if sample is not None:
            shapes.check(shard, sample.key, tuple(sample.latents.shape), tuple(sample.prompt_embeds.shape))
            return


def check_latent_scale(shards: list[str], model_dir: Path, field: str = "data.shards") -> None:
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
            raise UserError(f"{field}: {folder} was packed with a VAE scaling_factor of {theirs} "
                            f"({manifest}), but model.path's VAE has {ours}: these latents are for another model. "
                            f"Repack them with data_tools/shard.py --model {model_dir}")


class MicroBatches(Dataset):
    """Micro-batch k of one rank; a pure function of (index, seed, micro batch, start, rank, world size)."""

    def __init__(self, index: ShardIndex, *, seed: int, micro_batch_size: int, start: int, rank: int,
                 world_size: int, shapes: ModelShapes):
        self.index, self.seed, self.micro_batch_size = index, seed, micro_batch_size
        self.start, self.rank, self.world_size = start, rank, world_size
        self.prompt_shape = (shapes.text_len, shapes.text_dim)
        counts: dict[tuple, int] = defaultdict(int)
        for ref in index.samples:
            counts[ref.shape] += 1
        self.per_epoch = sum(n // micro_batch_size for n in counts.values())
        if self.per_epoch == 0:
            raise UserError(f"data.shards: no latent shape has data.micro_batch_size={micro_batch_size} samples "
                            f"({dict(counts) or 'no usable samples'}); lower the micro batch size or add data")
        self._plan: tuple[int, list[list[int]]] | None = None  # the current epoch's micro-batches, per worker

    def epoch_plan(self, epoch: int) -> list[list[int]]:
        """The epoch's micro-batches as sample ids: a seeded permutation, grouped by shape in that order."""
        if self._plan is None or self._plan[0] != epoch:
            n = len(self.index.samples)
            order = random.Random(derive_seed(self.seed, DATA_ORDER, epoch)).sample(range(n), n)
            buckets: dict[tuple, list[int]] = defaultdict(list)
            plan = []
            for i in order:
                bucket = buckets[self.index.samples[i].shape]
                bucket.append(i)
                if len(bucket) == self.micro_batch_size:
                    plan.append(bucket.copy())
                    bucket.clear()
            self._plan = (epoch, plan)
        return self._plan[1]

    def global_position(self, k: int) -> int:
        return self.start + k * self.world_size + self.rank

    def __getitem__(self, k: int) -> Batch:
        epoch, j = divmod(self.global_position(k), self.per_epoch)
        refs = [self.index.samples[i] for i in self.epoch_plan(epoch)[j]]
        latents, prompts, valid, faults = [], [], [], []
        for ref in refs:
            try:
                lat, prompt = self.read(ref)
                valid.append(True)
            except ShardError as exc:
                faults.append(exc)
                lat, prompt = torch.zeros(ref.shape), torch.zeros(self.prompt_shape)
                valid.append(False)
            latents.append(lat)
            prompts.append(prompt)
        names = [Path(self.index.shards[r.shard]).name for r in refs]
        return Batch([r.key for r in refs], names, torch.stack(latents), torch.stack(prompts), torch.tensor(valid),
                     faults, (epoch, j))

    def read(self, ref: SampleRef) -> tuple[torch.Tensor, torch.Tensor]:
        return read_sample(self.index, ref)


def read_sample(index: ShardIndex, ref: SampleRef) -> tuple[torch.Tensor, torch.Tensor]:
    """(latents, prompt embeddings) of one indexed sample, read by offset; a ShardError names shard and key."""
    shard = index.shards[ref.shard]
    try:
        with open(shard, "rb") as file:
            latents = load_tensor(_read(file, ref.latents), LATENTS, "latents", 4, shard, ref.key)
            prompt = load_tensor(_read(file, ref.prompt_embeds), PROMPT_EMBEDS, "prompt_embeds", 2, shard, ref.key)
    except OSError as exc:
        raise ShardError(shard, ref.key, f"cannot be read ({exc})") from None
    for name, tensor in (("latents", latents), ("prompt_embeds", prompt)):
        # NaN and inf carry through a sum: one fp32 reduction instead of a full-size boolean tensor (10x
        # cheaper, bench/data.py); only a sum that is not finite (maybe an fp32 overflow) needs the full check
        if not torch.isfinite(tensor.sum(dtype=torch.float32)) and not torch.isfinite(tensor).all():
            raise ShardError(shard, ref.key, f"{name} hold NaN or inf values")
    if tuple(latents.shape) != ref.shape:
        raise ShardError(shard, ref.key, f"latents changed shape since start-up: {list(latents.shape)}")
    return latents, prompt


def _read(file, extent: Extent) -> bytes:
    file.seek(extent.offset)
    return file.read(extent.size)


class _Endless:
    def __iter__(self) -> Iterator[int]:
        k = 0
        while True:
            yield k
            k += 1


def _worker_init(worker_id: int) -> None:
    """SLURM signals every process of a task, loader workers included. torch's workers die on SIGTERM, and the
    trainer would then fail before its preemption save; the trainer alone acts on these signals, and the
    workers exit when it does."""
    ignore_stop_signals()


@contextmanager
def streaming(loader: DataLoader) -> Iterator[Batch]:
    """Iterate a loader and stop its workers on the way out, also on an exception. The workers ignore SIGTERM
    (_worker_init), so the SIGTERM that multiprocessing sends at interpreter exit would not end them:
    they are told to stop through their queues instead."""
    stream = iter(loader)
    try:
        yield stream
    finally:
        shutdown = getattr(stream, "_shutdown_workers", None)  # torch's own orderly shutdown of the workers
        if shutdown is not None:
            shutdown()


def build_loader(dataset: MicroBatches, *, num_workers: int, pin_memory: bool) -> DataLoader:
    """Workers fetch micro-batches k = 0, 1, 2, ... ahead of the trainer; DataLoader returns them in order."""
    # its own generator: iter() draws a base seed, which must not come from (and advance) the global one that
    # a resumed run restores for LoRA dropout
    return DataLoader(dataset, batch_size=None, sampler=_Endless(), num_workers=num_workers, pin_memory=pin_memory,
                      prefetch_factor=4 if num_workers > 0 else None, worker_init_fn=_worker_init,
                      generator=torch.Generator().manual_seed(dataset.seed))


__all__ = ["Batch", "MicroBatches", "ShardError", "build_loader", "check_first_sample", "check_latent_scale",
           "read_sample", "resolve_shards", "streaming"]
