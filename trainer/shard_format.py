"""The training shard format: one webdataset tar member group per sample, nothing pickled.

    <key>.latents.safetensors        {"latents": [C, F, H, W]}   VAE latents, already scaled by the VAE's scaling_factor
    <key>.prompt_embeds.safetensors  {"prompt_embeds": [L, D]}   T5 last hidden state, padded to L (226 for CogVideoX)
    <key>.json                       {"caption", "source", "fps", "num_frames", "height", "width"}
    <key>.image.safetensors          {"image": [3, H, W] uint8}  image-to-video only: the clip's first frame, the
                                                                 picture the pipeline would be given

Writers (data_tools/) call ``encode_sample``; tools read whole shards with ``shard_samples``. The trainer reads
samples by offset (trainer/shard_index.py, trainer/data.py). ``SampleShapes`` is what a model demands of every
sample (its family fills it in from the model's config).
"""

from __future__ import annotations

import json
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import webdataset as wds
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from trainer.errors import UserError

LATENTS = "latents.safetensors"
PROMPT_EMBEDS = "prompt_embeds.safetensors"
META = "json"
IMAGE = "image.safetensors"
MEMBERS = (LATENTS, PROMPT_EMBEDS, META)  # every sample's; IMAGE too where the model is image-to-video
META_FIELDS = ("caption", "source", "fps", "num_frames", "height", "width")
# Beside the shards, once per dataset: the empty caption's embedding ({"prompt_embeds": [L, D]}), what caption
# dropout trains on in a dropped prompt's place.
EMPTY_PROMPT = "empty_prompt.safetensors"


class ShardError(UserError):
    """A sample that cannot be used; the message names the shard and the sample key."""

    def __init__(self, shard: str, key: str | None, problem: str):
        super().__init__(f"shard {shard}, sample {key!r}: {problem}" if key else f"shard {shard}: {problem}")
        self.shard, self.key, self.problem = shard, key, problem

    def __reduce__(self):  # crosses between ranks intact (the index's faults are all-gathered)
        return ShardError, (self.shard, self.key, self.problem)


@dataclass(frozen=True)
class SampleShapes:
    """What every sample must fit, from the model's config before any weights are loaded."""

    latent_channels: int
    text_len: int
    text_dim: int
    patch_size: int  # latent height and width must be multiples of it
    source: str  # the config file the numbers come from, and the names it gives them, for messages
    channels_key: str
    text_keys: str
    image_pixels: int | None = None  # image-to-video: a conditioning image of this many pixels per latent side
    fixed_grid: tuple[int, int, int] | None = None  # the one latent F x H x W learned positions cover (5B-I2V)
    max_grid: tuple[int, int] | None = None  # the largest latent H x W a position table covers (1.5's RoPE)

    def image_shape(self, latents: tuple[int, ...]) -> tuple[int, int, int] | None:
        """The conditioning image [3, H, W] a sample of these latents must carry (None: text-to-video)."""
        if self.image_pixels is None:
            return None
        return 3, latents[2] * self.image_pixels, latents[3] * self.image_pixels

    def _check_image(self, shard: str, key: str, latents: tuple[int, ...], image: tuple[int, ...] | None) -> None:
        want = self.image_shape(latents)
        if want is None and image is not None:
            raise ShardError(shard, key, f"carries a conditioning image ({IMAGE}): it was packed for an image-to-"
                                         f"video model, but the model ({self.source}) is text-to-video. Pack the "
                                         f"videos for this model with data_tools/shard.py")
        if want is not None and image is None:
            raise ShardError(shard, key, f"has no conditioning image ({IMAGE}): it was packed for a text-to-video "
                                         f"model, but the model ({self.source}) is image-to-video. Pack the videos "
                                         f"for this model with data_tools/shard.py, which stores each clip's "
                                         f"first frame")
        if want is not None and tuple(image or ()) != want:
            raise ShardError(shard, key, f"the conditioning image has shape {list(image or ())}, but latents "
                                         f"{list(latents)} need {list(want)} (the clip's first frame)")

    @property
    def prompt_shape(self) -> tuple[int, int]:
        return self.text_len, self.text_dim

    def check(self, shard: str, key: str, latents: tuple[int, ...], prompt_embeds: tuple[int, ...],
              image: tuple[int, ...] | None = None) -> None:
        """Raise a ShardError naming shard and key if a sample of these shapes (``image``: its conditioning
        image's; None: it has none) cannot train this model."""
        if len(latents) != 4:
            raise ShardError(shard, key, f"latents have shape {list(latents)}, expected [C, F, H, W]")
        c, _, h, w = latents
        if c != self.latent_channels:
            raise ShardError(shard, key, f"latents have {c} channels but the model ({self.source}) expects "
                             f"{self.channels_key}={self.latent_channels}: were they encoded with this model's VAE?")
        if h % self.patch_size or w % self.patch_size:
            raise ShardError(shard, key, f"latent height x width {h}x{w} is not divisible by the "
                             f"model's patch_size {self.patch_size}")
        if self.fixed_grid is not None and tuple(latents[1:]) != self.fixed_grid:
            raise ShardError(shard, key, f"latents {list(latents)} are not the one grid the model's learned "
                             f"positional embedding covers, {list(self.fixed_grid)} latent frames x height x width "
                             f"({self.source}: sample_frames, sample_height, sample_width): pack the videos at the "
                             f"model's clip")
        if self.max_grid is not None and (h > self.max_grid[0] or w > self.max_grid[1]):
            raise ShardError(shard, key, f"latent height x width {h}x{w} is beyond the model's rotary position "
                             f"table, {self.max_grid[0]}x{self.max_grid[1]} ({self.source}: sample_height x "
                             f"sample_width)")
        if tuple(prompt_embeds) != self.prompt_shape:
            raise ShardError(shard, key, f"prompt embeddings are {list(prompt_embeds)} but the model "
                             f"({self.source}) expects {list(self.prompt_shape)} ({self.text_keys})")
        self._check_image(shard, key, latents, image)


@dataclass
class Sample:
    key: str
    shard: str
    latents: torch.Tensor  # [C, F, H, W]
    prompt_embeds: torch.Tensor  # [L, D]
    meta: dict = field(default_factory=dict)
    image: torch.Tensor | None = None  # [3, H, W] uint8, image-to-video shards only


def encode_sample(key: str, latents: torch.Tensor, prompt_embeds: torch.Tensor, meta: dict,
                  image: torch.Tensor | None = None) -> dict[str, object]:
    """A dict for webdataset's TarWriter (encoder=False): every value is already bytes."""
    if latents.dim() != 4 or prompt_embeds.dim() != 2:
        raise ValueError(f"{key}: latents must be [C, F, H, W] and prompt_embeds [L, D]")
    if image is not None and (image.dim() != 3 or image.dtype != torch.uint8):
        raise ValueError(f"{key}: the conditioning image must be [3, H, W] uint8")
    missing = [name for name in META_FIELDS if name not in meta]
    if missing:
        raise ValueError(f"{key}: metadata lacks {missing}")
    members: dict[str, object] = {
        "__key__": key,
        LATENTS: st_save({"latents": latents.contiguous().cpu()}),
        PROMPT_EMBEDS: st_save({"prompt_embeds": prompt_embeds.contiguous().cpu()}),
        META: json.dumps(meta).encode(),
    }
    if image is not None:
        members[IMAGE] = st_save({"image": image.contiguous().cpu()})
    return members


def load_image(blob: bytes, shard: str, key: str) -> torch.Tensor:
    """The conditioning image of an image member: [3, H, W] uint8, else a ShardError naming shard and key."""
    image = load_tensor(blob, IMAGE, "image", 3, shard, key, floating=False)
    if image.dtype != torch.uint8 or image.shape[0] != 3:
        raise ShardError(shard, key, f"image is {image.dtype} {list(image.shape)}, expected [3, H, W] uint8")
    return image


def load_tensor(blob: bytes, member: str, name: str, ndim: int, shard: str, key: str,
                floating: bool = True) -> torch.Tensor:
    """The named tensor of one safetensors member; a ShardError naming shard, key and problem otherwise."""
    try:
        tensors = st_load(blob)
    except SafetensorError as exc:
        raise ShardError(shard, key, f"{member} is not a valid safetensors blob ({exc})") from None
    if name not in tensors:
        raise ShardError(shard, key, f"{member} has no tensor named {name!r} (has {sorted(tensors)})")
    tensor = tensors[name]
    if tensor.dim() != ndim:
        raise ShardError(shard, key, f"{name} has shape {list(tensor.shape)}, expected {ndim} dimensions")
    if floating and not tensor.is_floating_point():
        raise ShardError(shard, key, f"{name} has dtype {tensor.dtype}, expected a floating-point tensor")
    return tensor


def load_meta(blob: bytes, shard: str, key: str) -> dict:
    """A sample's json member: a JSON object, else a ShardError naming shard and key."""
    try:
        meta = json.loads(blob)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise ShardError(shard, key, f"the json member is not valid JSON ({exc})") from None
    if not isinstance(meta, dict):
        raise ShardError(shard, key, f"the json member holds a {type(meta).__name__}, not a JSON object")
    return meta


def decode_sample(raw: dict) -> Sample:
    """Turn webdataset's raw member dict into a Sample; raise ShardError naming what is wrong."""
    key, shard = raw.get("__key__", "?"), raw.get("__url__", "?")
    missing = [m for m in MEMBERS if m not in raw]
    if missing:
        raise ShardError(shard, key, f"missing member(s) {missing}")
    meta = load_meta(raw[META], shard, key)
    return Sample(
        key=key,
        shard=shard,
        latents=load_tensor(raw[LATENTS], LATENTS, "latents", 4, shard, key),
        prompt_embeds=load_tensor(raw[PROMPT_EMBEDS], PROMPT_EMBEDS, "prompt_embeds", 2, shard, key),
        meta=meta,
        image=load_image(raw[IMAGE], shard, key) if IMAGE in raw else None,
    )


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
    """The decoded samples of one shard, in order; the first bad one raises a ShardError naming shard and key."""
    for raw in raw_samples(shard):
        yield decode_sample(raw)
