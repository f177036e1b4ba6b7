"""An index of every usable sample: where its tensors lie in which shard, and their shapes.

Built once at start-up from tar and safetensors headers only (no tensor data is read), so that the trainer
can (1) read any sample by offset, which makes the data position a single number that survives a resume on
any number of ranks, and (2) find truncated shards, missing members and wrong shapes or dtypes before the
first step instead of mid-run. Non-finite values can only be found by reading the data; the loader does that.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import struct
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import torch

from trainer.dtypes import SAFETENSORS_FLOATS
from trainer.shard_format import IMAGE, LATENTS, MEMBERS, META, PROMPT_EMBEDS, SampleShapes, ShardError, load_meta

MAX_HEADER = 100_000_000  # safetensors' own limit on the JSON header
MAX_META = 1_000_000  # a sample's json member is a few hundred bytes; one larger than this is not ours
_KEY_AND_MEMBER = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")  # webdataset's split: key up to the first dot


class Extent(NamedTuple):
    offset: int  # byte offset of the member's data in the tar file
    size: int


class SampleRef(NamedTuple):
    shard: int  # position in the run's shard list
    key: str
    latents: Extent
    prompt_embeds: Extent
    shape: tuple[int, ...]  # latent shape [C, F, H, W]: samples of one shape share micro-batches
    dtypes: tuple[str, str]  # safetensors dtypes of latents and prompt_embeds
    image: Extent | None = None  # the conditioning image (image-to-video shards)


class TensorHeader(NamedTuple):
    shape: tuple[int, ...]
    dtype: str  # safetensors name: "BF16", "F16", "F32" or "F64"
    offset: int  # byte offset of the tensor's data in the tar file
    size: int


IMAGE_DTYPES = {"U8": torch.uint8}  # a conditioning image is a picture


def tensor_header(fd: int, extent: Extent, shard: str, key: str, member: str, name: str,
                  dtypes: dict[str, torch.dtype] = SAFETENSORS_FLOATS) -> TensorHeader:
    """Where the one tensor of a safetensors member lies and what it is (one of ``dtypes``), from its JSON header
    (read with pread: the file position, which tarfile may be using, does not move)."""
    head = _pread(fd, min(extent.size, 512), extent.offset, shard, key)  # the length and, usually, the JSON
    if len(head) < 8:
        raise ShardError(shard, key, f"{member} is truncated")
    (length,) = struct.unpack("<Q", head[:8])
    if length > min(extent.size - 8, MAX_HEADER):
        raise ShardError(shard, key, f"{member} is not a valid safetensors blob (header length {length})")
    if 8 + length > len(head):
        head = _pread(fd, 8 + length, extent.offset, shard, key)
    invalid = ShardError(shard, key, f"{member} is not a valid safetensors blob holding {name!r}")
    try:
        info = json.loads(head[8:8 + length])[name]
        shape, dtype, (start, end) = info["shape"], info["dtype"], info["data_offsets"]
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError, KeyError, TypeError, ValueError):
        raise invalid from None
    if not (isinstance(shape, list) and all(_is_int(d) for d in shape) and _is_int(start) and _is_int(end)):
        raise invalid  # "23" or 16.9 or 1e400 as a size: refused, not coerced
    shape = tuple(shape)
    if not all(d > 0 for d in shape):
        raise ShardError(shard, key, f"{name} has shape {list(shape)}: every dimension must be positive")
    if not 0 <= start <= end:
        raise ShardError(shard, key, f"{member} is not a valid safetensors blob (data offsets {start}, {end})")
    if 8 + length + end > extent.size or len(head) < 8 + length:
        raise ShardError(shard, key, f"{member} is truncated")
    if not isinstance(dtype, str) or dtype not in dtypes:
        raise ShardError(shard, key, f"{name} has dtype {dtype}, expected one of {sorted(dtypes)}")
    if end - start != math.prod(shape) * dtypes[dtype].itemsize:
        raise ShardError(shard, key, f"{member} is not a valid safetensors blob ({end - start} bytes of data "
                                     f"for {name} of shape {list(shape)} in {dtype})")
    return TensorHeader(shape, dtype, extent.offset + 8 + length + start, end - start)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _pread(fd: int, size: int, offset: int, shard: str, key: str) -> bytes:
    try:
        return os.pread(fd, size, offset)
    except OSError as exc:
        raise ShardError(shard, key, f"cannot be read ({exc})") from None


def _member_groups(path: str) -> Iterator[tuple[str, dict[str, Extent]]]:
    """(key, {member: extent}) for each group of consecutive members sharing a key, in tar order."""
    key: str | None = None
    members: dict[str, Extent] = {}
    try:
        size = Path(path).stat().st_size
        with tarfile.open(path, "r:") as tar:
            for info in tar:
                match = _KEY_AND_MEMBER.match(info.name) if info.isfile() else None
                if match is None:
                    continue
                if match.group(1) != key:
                    if key is not None:
                        yield key, members
                    key, members = match.group(1), {}
                if info.offset_data + info.size > size:
                    raise ShardError(path, key, f"is truncated in member {info.name!r}")
                members[match.group(2)] = Extent(info.offset_data, info.size)
    except (tarfile.TarError, OSError) as exc:
        after = f" after sample {key!r}" if key else ""
        raise ShardError(path, None, f"cannot be read{after} ({exc})") from None
    if key is not None:
        yield key, members


def index_shard(path: str, shard_id: int, shapes: SampleShapes) -> tuple[list[SampleRef], list[ShardError]]:
    """The usable samples of one shard and the problems found. A tar that breaks off keeps the complete
    samples before the break; a group whose members are truncated, missing or mis-shaped is left out."""
    refs: list[SampleRef] = []
    faults: list[ShardError] = []
    try:
        file = open(path, "rb")
    except OSError as exc:
        return [], [ShardError(path, None, f"cannot be read ({exc})")]
    groups = _member_groups(path)
    with file:
        while True:
            try:
                item = next(groups, None)
            except ShardError as exc:
                faults.append(exc)
                break
            if item is None:
                break
            key, members = item
            try:
                missing = [m for m in MEMBERS if m not in members]
                if missing:
                    raise ShardError(path, key, f"missing member(s) {missing}")
                latents = tensor_header(file.fileno(), members[LATENTS], path, key, LATENTS, "latents")
                prompt = tensor_header(file.fileno(), members[PROMPT_EMBEDS], path, key, PROMPT_EMBEDS,
                                       "prompt_embeds")
                image = tensor_header(file.fileno(), members[IMAGE], path, key, IMAGE, "image",
                                      IMAGE_DTYPES) if IMAGE in members else None
                shapes.check(path, key, latents.shape, prompt.shape, image and image.shape)
                # the metadata is small and never read in training: check it here, or a corrupt member would
                # train unnoticed (and uncounted) whatever data.on_error says
                meta = members[META]
                if meta.size > MAX_META:
                    raise ShardError(path, key, f"the json member is {meta.size:,} bytes: metadata, not data, "
                                                f"belongs there (at most {MAX_META:,})")
                load_meta(_pread(file.fileno(), meta.size, meta.offset, path, key), path, key)
            except ShardError as exc:
                faults.append(exc)
                continue
            refs.append(SampleRef(shard_id, key, members[LATENTS], members[PROMPT_EMBEDS], latents.shape,
                                  (latents.dtype, prompt.dtype), members.get(IMAGE) if image else None))
    if not refs and not faults:
        faults.append(ShardError(path, None, "holds no samples"))
    return refs, faults


class ShardIndex(NamedTuple):
    shards: list[str]
    samples: list[SampleRef]
    faults: list[ShardError]  # what was left out, in shard order

    @classmethod
    def merge(cls, shards: list[str], parts: list[tuple[list[SampleRef], list[ShardError]]]) -> ShardIndex:
        """Join per-shard results given in any order; samples end in shard order, then tar order."""
        samples = sorted((r for refs, _ in parts for r in refs), key=lambda r: (r.shard, r.latents.offset))
        faults = [f for _, found in parts for f in found]
        position = {path: i for i, path in enumerate(shards)}
        faults.sort(key=lambda f: position.get(f.shard, len(shards)))
        return cls(shards, samples, faults)

    def fingerprint(self) -> str:
        """Changes when the shards, their samples or their shapes change: a resume then cannot continue the
        same sample order, and says so instead of silently training on a different sequence."""
        digest = hashlib.sha256()
        for ref in self.samples:
            digest.update(f"{Path(self.shards[ref.shard]).name}/{ref.key}/{ref.shape}\n".encode())
        return digest.hexdigest()[:16]


def build_index(shards: list[str], shapes: SampleShapes, rank: int = 0, world_size: int = 1,
                gather: Callable[[Any], list[Any]] | None = None) -> ShardIndex:
    """Each rank reads the headers of every world_size-th shard; ``gather`` (all ranks' objects) joins them."""
    mine = [(i, path) for i, path in enumerate(shards) if i % world_size == rank]
    parts = [index_shard(path, i, shapes) for i, path in mine]
    if gather is not None:
        parts = [part for ranks_parts in gather(parts) for part in ranks_parts]
    return ShardIndex.merge(shards, parts)
