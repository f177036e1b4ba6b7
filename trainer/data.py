"""Training micro-batches read by offset from webdataset shards, in an order that survives any resume.

Each epoch is one seeded permutation of every indexed sample (the same on every rank). Samples are grouped, in
that order, into micro-batches of one latent shape, and a shape's micro-batches into runs of ``group`` =
data-parallel ranks x accumulation micro-batches: one run is one optimizer step, so every micro-batch of a
step, on every rank and every micro-step, has the same shape and no rank waits for another's larger one. A
shape's last partial run of the epoch is dropped (a different few samples each epoch, as the permutation
changes). Run after run, the epochs form the run's global micro-batch sequence; data-parallel rank r of W
(trainer/parallel.py) takes micro-batch k*W + r of it, counted from where the run (re)started.

The position is a DataPosition: the epoch, the micro-batch within it, and the group that epoch was planned
with. A resume with the same group continues the same sequence bit for bit; with another (another number of
ranks or accumulation) it finishes the interrupted epoch in that epoch's order (nothing repeated, and nothing
lost but fewer than one new step's micro-batches at its end, so that the epochs after it start on a step
boundary; its steps may mix shapes) and plans the epochs after it for the new group.
"""

from __future__ import annotations

import functools
import glob
import itertools
import json
import math
import os
import random
import threading
from collections import defaultdict, deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

import torch
from braceexpand import braceexpand

from trainer.dtypes import SAFETENSORS_FLOATS
from trainer.errors import UserError
from trainer.rng import Stream, derive_seed
from trainer.shard_format import (
    EMPTY_PROMPT,
    IMAGE,
    LATENTS,
    PROMPT_EMBEDS,
    SampleShapes,
    ShardError,
    shard_samples,
)
from trainer.shard_index import IMAGE_DTYPES, Extent, SampleRef, ShardIndex, tensor_header


class Batch(NamedTuple):
    keys: list[str]
    shards: list[str]  # each sample's shard file name
    latents: torch.Tensor  # [B, C, F, H, W] as stored (usually bf16)
    prompt_embeds: torch.Tensor  # [B, L, D]
    valid: torch.Tensor  # [B] bool: False where the sample could not be read (zeros stand in; its loss is 0)
    faults: list[ShardError]  # why, for each invalid sample
    position: tuple[int, int]  # (epoch, micro-batch within the epoch) of this micro-batch
    images: torch.Tensor | None = None  # [B, 3, H, W] uint8: image-to-video's conditioning images (first frames)
    captions_dropped: int = 0  # readable samples whose prompt embedding is the empty caption's (data.caption_dropout)


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


def check_first_sample(shards: list[str], shapes: SampleShapes) -> None:
    """Data packed for another model fails here, before any work, whatever data.on_error says: the first
    readable sample must fit the model (single bad samples are the index's business)."""
    for shard in shards:
        try:
            sample = next(shard_samples(shard), None)
        except ShardError:
            continue
        if sample is not None:
            shapes.check(shard, sample.key, tuple(sample.latents.shape), tuple(sample.prompt_embeds.shape),
                         None if sample.image is None else tuple(sample.image.shape))
            return


def check_latent_scale(shards: list[str], ours: float | None, model_dir: Path, field: str = "data.shards") -> None:
    """Latents packed for another model's VAE can have the right shape and the wrong scale (CogVideoX-2B's
    scaling_factor is 1.15, 5B's 0.7): refuse shards whose manifest.json names a scaling_factor other than
    ``ours``, the model's (None: the model directory does not say)."""
    if ours is None:
        return
    for folder in dict.fromkeys(Path(s).parent for s in shards):
        manifest = folder / "manifest.json"
        if not manifest.is_file():
            continue
        theirs = json.loads(manifest.read_text()).get("model", {}).get("vae", {}).get("scaling_factor")
        if theirs is not None and not math.isclose(ours, theirs, rel_tol=1e-6):
            raise UserError(f"{field}: {folder} was packed with a VAE scaling_factor of {theirs} "
                            f"({manifest}), but model.path's VAE has {ours}: these latents are for another model. "
                            f"Repack them with data_tools/shard.py --model {model_dir}")


def load_empty_prompts(shards: list[str], prompt_shape: tuple[int, ...],
                       field: str = "data.caption_dropout") -> dict[str, torch.Tensor]:
    """The empty caption's embedding of each directory the shards are in (data_tools/shard.py writes it beside
    them), checked: caption dropout trains on it. Read with safetensors: nothing is unpickled."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    found = {}
    for folder in dict.fromkeys(str(Path(s).parent) for s in shards):
        path = Path(folder) / EMPTY_PROMPT
        if not path.is_file():
            raise UserError(f"{field}: {path} is missing: caption dropout puts the empty caption's embedding in a "
                            f"dropped prompt's place, and data_tools/shard.py writes it beside the shards it packs "
                            f"(pack again into that directory: it only adds what is missing), or set {field} 0")
        try:
            embeds = load_file(str(path))["prompt_embeds"]
        except (OSError, SafetensorError, KeyError) as exc:
            raise UserError(f"{field}: {path} cannot be read as the empty caption's embedding ({exc})") from None
        if tuple(embeds.shape) != tuple(prompt_shape):
            raise UserError(f"{field}: {path} holds prompt embeddings of shape {list(embeds.shape)}, the model's are "
                            f"{list(prompt_shape)}: it was packed for another model")
        if not torch.isfinite(embeds).all():
            raise UserError(f"{field}: {path} holds NaN or inf values")
        found[folder] = embeds
    return found


def caption_dropped(seed: int, epoch: int, sample: int, probability: float) -> bool:
    """Whether sample ``sample`` (its place in the index) trains with the empty caption in ``epoch``: a pure
    function of the three, so that a resume draws the same and the number of ranks does not matter."""
    return probability > 0 and derive_seed(seed, Stream.CAPTION_DROPOUT, epoch, sample) < probability * 2**63


class DataPosition(NamedTuple):
    """Where the global micro-batch sequence goes on: ``micro_batch`` of ``epoch``, planned with ``group``."""

    epoch: int = 0
    micro_batch: int = 0
    group: int = 1


def shape_counts(index: ShardIndex) -> dict[tuple, int]:
    """Indexed samples per latent shape."""
    counts: dict[tuple, int] = defaultdict(int)
    for ref in index.samples:
        counts[ref.shape] += 1
    return counts


def epoch_length(counts: dict[tuple, int], micro_batch_size: int, group: int) -> int:
    """Micro-batches in an epoch planned with ``group``: each shape's whole steps."""
    step = micro_batch_size * group
    return sum(n // step * group for n in counts.values())


class MicroBatches:
    """Micro-batch k of one data-parallel rank; a pure function of (index, seed, micro batch, group, position,
    data-parallel rank and size)."""

    def __init__(self, index: ShardIndex, *, seed: int, micro_batch_size: int, rank: int, world_size: int,
                 shapes: SampleShapes, group: int | None = None, position: DataPosition | None = None,
                 pin_memory: bool = False, caption_dropout: float = 0.0,
                 empty_prompts: dict[str, torch.Tensor] | None = None):
        self.index, self.seed, self.micro_batch_size = index, seed, micro_batch_size
        # data.caption_dropout, and the empty caption's embedding by shard directory (load_empty_prompts)
        self.caption_dropout, self.empty_prompts = caption_dropout, empty_prompts or {}
        if caption_dropout and not self.empty_prompts:
            raise ValueError("caption dropout needs the shards' empty-prompt embeddings")
        self.rank, self.world_size = rank, world_size
        self.group = world_size if group is None else group  # micro-batches per optimizer step, all ranks
        self.position = position if position is not None else DataPosition(0, 0, self.group)
        self.prompt_shape, self.image_shape = shapes.prompt_shape, shapes.image_shape
        self.pin_memory = pin_memory  # batches are read straight into page-locked memory for async copies
        self.shape_counts = shape_counts(index)
        self.per_epoch = self.epoch_length(self.group)
        if self.per_epoch == 0:
            step = micro_batch_size * self.group
            raise UserError(f"data.shards: no latent shape has the {step} samples of one optimizer step "
                            f"(data.micro_batch_size={micro_batch_size} x {self.group} micro-batches: data-"
                            f"parallel ranks x train.gradient_accumulation_steps; the shapes have "
                            f"{dict(self.shape_counts) or 'no usable samples'}); lower one of them or add data")
        self._plans: dict[tuple[int, int], list[list[int]]] = {}  # recent epochs: readers straddle two
        self._plans_lock = threading.Lock()

    def epoch_length(self, group: int) -> int:
        """Micro-batches in an epoch planned with ``group``."""
        return epoch_length(self.shape_counts, self.micro_batch_size, group)

    def never_trained(self) -> dict[tuple, int]:
        """Shapes with fewer samples than one optimizer step takes: no epoch trains them."""
        step = self.micro_batch_size * self.group
        return {shape: n for shape, n in self.shape_counts.items() if n < step}

    def epoch_plan(self, epoch: int, group: int | None = None) -> list[list[int]]:
        """The epoch's micro-batches as sample ids: a seeded permutation, cut into micro-batches of one shape in
        that order, emitted in runs of ``group`` of one shape as each run fills."""
        group = self.group if group is None else group
        with self._plans_lock:  # computed once, however many reader threads ask
            if (epoch, group) not in self._plans:
                n = len(self.index.samples)
                order = random.Random(derive_seed(self.seed, Stream.DATA_ORDER, epoch)).sample(range(n), n)
                filling: dict[tuple, list[int]] = defaultdict(list)
                runs: dict[tuple, list[list[int]]] = defaultdict(list)
                plan = []
                for i in order:
                    shape = self.index.samples[i].shape
                    batch = filling[shape]
                    batch.append(i)
                    if len(batch) == self.micro_batch_size:
                        runs[shape].append(batch.copy())
                        batch.clear()
                        if len(runs[shape]) == group:
                            plan.extend(runs.pop(shape))
                self._plans = {key: p for key, p in self._plans.items() if key[0] >= epoch - 1}
                self._plans[epoch, group] = plan
            return self._plans[epoch, group]

    def position_at(self, offset: int) -> DataPosition:
        """The position of global micro-batch ``offset`` counted from this run's start position: the rest of
        the start epoch in its own plan, then whole epochs planned with this run's group."""
        start = self.position
        left = self.epoch_length(start.group) - start.micro_batch
        left -= left % self.group  # under another group: its last partial step is dropped, as every epoch's are
        if offset < left:
            return DataPosition(start.epoch, start.micro_batch + offset, start.group)
        epochs, within = divmod(offset - left, self.per_epoch)
        return DataPosition(start.epoch + 1 + epochs, within, self.group)

    def global_position(self, k: int) -> DataPosition:
        return self.position_at(k * self.world_size + self.rank)

    def __getitem__(self, k: int) -> Batch:
        epoch, j, group = self.global_position(k)
        ids = self.epoch_plan(epoch, group)[j]
        refs = [self.index.samples[i] for i in ids]
        # one tensor per batch, each sample read into its row: no decode, stack or hand-over copies
        latents = self._empty(refs, 0, refs[0].shape)
        prompts = self._empty(refs, 1, self.prompt_shape)
        image_shape = self.image_shape(refs[0].shape)
        images = None if image_shape is None else torch.empty((len(refs), *image_shape), dtype=torch.uint8,
                                                              pin_memory=self.pin_memory)
        valid, faults, dropped = [], [], 0
        for row, (i, ref, lat, prompt) in enumerate(zip(ids, refs, latents, prompts, strict=True)):
            image = None if images is None else images[row]
            try:
                read_sample_into(self.index, ref, lat, prompt, image)
                valid.append(True)
                if caption_dropped(self.seed, epoch, i, self.caption_dropout):
                    prompt.copy_(self.empty_prompts[str(Path(self.index.shards[ref.shard]).parent)])
                    dropped += 1
            except ShardError as exc:
                faults.append(exc)
                for tensor in (lat, prompt, image):
                    if tensor is not None:
                        tensor.zero_()
                valid.append(False)
        names = [Path(self.index.shards[r.shard]).name for r in refs]
        return Batch([r.key for r in refs], names, latents, prompts, torch.tensor(valid), faults, (epoch, j), images,
                     dropped)

    def _empty(self, refs: list[SampleRef], member: int, shape: tuple[int, ...]) -> torch.Tensor:
        dtype = functools.reduce(torch.promote_types, (SAFETENSORS_FLOATS[r.dtypes[member]] for r in refs))
        return torch.empty((len(refs), *shape), dtype=dtype, pin_memory=self.pin_memory)


def flat_position(index: ShardIndex, micro_batch_size: int, consumed: int) -> DataPosition:
    """The position of a checkpoint saved before positions had a group: its epochs were planned micro-batch by
    micro-batch (group 1), and the position was micro-batches consumed."""
    epoch, within = divmod(consumed, epoch_length(shape_counts(index), micro_batch_size, 1))
    return DataPosition(epoch, within, 1)


def read_sample(index: ShardIndex, ref: SampleRef, shapes: SampleShapes,
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(latents, prompt embeddings, conditioning image or None) of one indexed sample, in their stored dtypes;
    a ShardError names shard and key."""
    latents = torch.empty(ref.shape, dtype=SAFETENSORS_FLOATS[ref.dtypes[0]])
    prompt = torch.empty(shapes.prompt_shape, dtype=SAFETENSORS_FLOATS[ref.dtypes[1]])
    image_shape = shapes.image_shape(ref.shape)
    image = None if image_shape is None else torch.empty(image_shape, dtype=torch.uint8)
    read_sample_into(index, ref, latents, prompt, image)
    return latents, prompt, image


def read_sample_into(index: ShardIndex, ref: SampleRef, latents: torch.Tensor, prompt: torch.Tensor,
                     image: torch.Tensor | None = None) -> None:
    """Read one indexed sample by offset straight into ``latents``, ``prompt`` and (image-to-video) ``image``
    (contiguous, e.g. rows of a batch), checking what the index found still holds and that every value is
    finite; a ShardError names shard, key and problem."""
    shard = index.shards[ref.shard]
    try:
        fd = os.open(shard, os.O_RDONLY)
    except OSError as exc:
        raise ShardError(shard, ref.key, f"cannot be read ({exc})") from None
    try:
        _read_tensor(fd, ref.latents, LATENTS, "latents", latents, shard, ref.key)
        _read_tensor(fd, ref.prompt_embeds, PROMPT_EMBEDS, "prompt_embeds", prompt, shard, ref.key)
        if image is not None:
            if ref.image is None:
                raise ShardError(shard, ref.key, f"has no conditioning image ({IMAGE})")
            _read_tensor(fd, ref.image, IMAGE, "image", image, shard, ref.key, IMAGE_DTYPES)
    finally:
        os.close(fd)
    for name, tensor in (("latents", latents), ("prompt_embeds", prompt)):
        # NaN and inf carry through a sum: one reduction in the stored dtype (32 GB/s for bf16 on one core here)
        # instead of a full-size boolean tensor (0.8 GB/s); only a sum that is not finite (maybe an overflow:
        # fp16's range is small) needs the full check
        if not torch.isfinite(tensor.sum()) and not torch.isfinite(tensor).all():
            raise ShardError(shard, ref.key, f"{name} hold NaN or inf values")


def _read_tensor(fd: int, extent: Extent, member: str, name: str, out: torch.Tensor, shard: str, key: str,
                 dtypes: dict[str, torch.dtype] = SAFETENSORS_FLOATS) -> None:
    header = tensor_header(fd, extent, shard, key, member, name, dtypes)
    if header.shape != tuple(out.shape):
        raise ShardError(shard, key, f"{name} changed shape since start-up: {list(header.shape)}")
    stored = dtypes[header.dtype]
    target = out if stored == out.dtype else torch.empty(header.shape, dtype=stored)  # a batch of mixed dtypes
    buffer = target.view(-1).view(torch.uint8).numpy().data  # a memoryview of the tensor's bytes
    done = 0
    while done < header.size:  # pread may return less than asked
        try:
            n = os.preadv(fd, [buffer[done:]], header.offset + done)
        except OSError as exc:
            raise ShardError(shard, key, f"cannot be read ({exc})") from None
        if n == 0:
            raise ShardError(shard, key, f"{member} is truncated")
        done += n
    if target is not out:
        out.copy_(target)


@contextmanager
def streaming(dataset: MicroBatches, threads: int) -> Iterator[Iterator[Batch]]:
    """Micro-batches k = 0, 1, 2, ... in order, read by ``threads`` threads of this process ahead of the
    trainer (0: read when asked); stops them on the way out, also on an exception.

    Threads rather than worker processes: the reads and the finite check release the GIL, each batch is read
    straight into its final (page-locked) memory with nothing to hand over between processes (0.16 -> ~0.7 of a
    raw read in bench/data.py, against torch DataLoader workers), and SLURM, which signals every process of a
    task, finds no loader process to kill before the trainer's preemption save."""
    if threads == 0:
        yield map(dataset.__getitem__, itertools.count())
        return
    # page-locked memory is allocated under the rank's own GPU, never a context on GPU 0 from a new thread
    device = torch.cuda.current_device() if dataset.pin_memory else None

    def on_the_rank_gpu() -> None:
        if device is not None:
            torch.cuda.set_device(device)

    with ThreadPoolExecutor(threads, thread_name_prefix="loader", initializer=on_the_rank_gpu) as pool:
        ahead = deque(pool.submit(dataset.__getitem__, k) for k in range(2 * threads))  # keeps every thread busy

        def stream() -> Iterator[Batch]:
            for k in itertools.count(len(ahead)):
                batch = ahead.popleft().result()  # a reader's exception surfaces here, in the trainer
                ahead.append(pool.submit(dataset.__getitem__, k))
                yield batch

        try:
            yield stream()
        finally:
            for future in ahead:
                future.cancel()  # the reads already running finish (milliseconds); the pool then joins them


__all__ = ["Batch", "DataPosition", "MicroBatches", "ShardError", "caption_dropped", "check_first_sample",
           "check_latent_scale", "flat_position", "load_empty_prompts", "read_sample", "read_sample_into",
           "resolve_shards", "streaming"]
