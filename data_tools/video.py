"""Decode a clip for packing: pick its bucket, sample its frames, resize and centre-crop, scale to [-1, 1].

Frame times come from demuxing the packets (cheap: nothing is decoded), so the bucket and the frames are
chosen before any pixel is decoded, and only the chosen frames are converted to RGB.
"""

from __future__ import annotations

import bisect
import itertools
import math
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
import torch
import torch.nn.functional as F


@dataclass(frozen=True, order=True)
class Bucket:
    frames: int
    height: int
    width: int

    def __str__(self) -> str:
        return f"{self.frames}x{self.height}x{self.width}"


def parse_buckets(text: str) -> list[Bucket]:
    """'49x480x720,49x480x480' -> buckets (frames x height x width)."""
    buckets = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        try:
            frames, height, width = (int(v) for v in part.lower().split("x"))
        except ValueError:
            raise ValueError(f"bucket {part!r} is not FRAMESxHEIGHTxWIDTH (for example 49x480x720)") from None
        if min(frames, height, width) <= 0:
            raise ValueError(f"bucket {part!r}: frames, height and width must be positive")
        buckets.append(Bucket(frames, height, width))
    if not buckets:
        raise ValueError("no buckets given")
    return sorted(set(buckets))


class VideoError(Exception):
    """A clip that cannot be packed; ``reason`` is a short code for rejected.jsonl."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason, self.detail = reason, detail


@dataclass(frozen=True)
class Clip:
    frames: torch.Tensor  # [F, 3, H, W] float32 in [-1, 1]
    bucket: Bucket
    fps: float  # of the sampled frames
    source_size: tuple[int, int]  # (height, width) before resizing


@dataclass(frozen=True)
class Probe:
    times: list[float]  # presentation times of every frame, ascending, seconds
    height: int  # as stored; decode_clip swaps them for a stream displayed rotated by 90 degrees
    width: int
    pts: tuple[int, ...] = ()  # the frames' presentation timestamps, in the order of `times`

    def frame_indices(self, frames: int, fps: float | None) -> list[int] | None:
        """Which frames to keep for `frames` frames at `fps` (None: evenly over the clip); None if too short."""
        n = len(self.times)
        if fps is None:
            if n < frames:
                return None
            return [round(i * (n - 1) / (frames - 1)) for i in range(frames)] if frames > 1 else [0]
        step = self.frame_step()
        targets = [self.times[0] + i / fps for i in range(frames)]
        if n < 1 or targets[-1] > self.times[-1] + step / 2:
            return None
        # the frame shown at each target time: the last one that starts at or before it (with rounding slack)
        return [max(0, bisect.bisect_right(self.times, t + 1e-6) - 1) for t in targets]

    def frame_step(self) -> float:
        """The typical time between frames (0 for a single frame)."""
        return float(np.median(np.diff(self.times))) if len(self.times) > 1 else 0.0

    def duration(self) -> float:
        return self.times[-1] - self.times[0] + self.frame_step()


def probe(path: Path) -> Probe:
    """Frame timestamps from the packets alone (no decoding); packets the decoder will drop are left out."""
    if not path.is_file():
        raise VideoError("missing_video", f"no such file: {path}")
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise VideoError("unreadable_video", f"{path}: no video stream")
            stream = container.streams.video[0]
            height, width = stream.codec_context.height, stream.codec_context.width
            pts = sorted(p.pts for p in container.demux(stream) if p.pts is not None and p.size and not p.is_discard)
            times = [float(t * stream.time_base) for t in pts]
    except av.error.FFmpegError as exc:
        raise VideoError("unreadable_video", f"{path}: {exc}") from None
    if not times or not height or not width:
        raise VideoError("unreadable_video", f"{path}: no decodable frames")
    return Probe(times, height, width, tuple(pts))


def choose_bucket(p: Probe, buckets: list[Bucket], fps: float | None) -> tuple[Bucket, list[int]]:
    """The fillable bucket closest in aspect ratio; ties go to more frames, then more pixels."""
    fillable = [(b, idx) for b in buckets if (idx := p.frame_indices(b.frames, fps)) is not None]
    if not fillable:
        need = min(b.frames for b in buckets)
        rate = f"at {fps:g} fps ({(need - 1) / fps:.2f} s)" if fps else "evenly"
        raise VideoError("too_short", f"clip has {len(p.times)} frames over {p.duration():.2f} s; "
                                      f"the shortest bucket needs {need} frames {rate}")
    aspect = math.log(p.width / p.height)

    def rank(item):
        b = item[0]
        return (abs(aspect - math.log(b.width / b.height)), -b.frames, -b.height * b.width)

    return min(fillable, key=rank)


def resize_crop(frames: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """[F, 3, h, w] uint8 -> [F, 3, height, width] float32 in [-1, 1]: cover the target, then centre-crop."""
    _, _, h, w = frames.shape
    scale = max(height / h, width / w)
    new_h, new_w = max(height, round(h * scale)), max(width, round(w * scale))
    x = frames.float()
    if (new_h, new_w) != (h, w):
        x = F.interpolate(x, size=(new_h, new_w), mode="bilinear", align_corners=False, antialias=True)
    top, left = (new_h - height) // 2, (new_w - width) // 2
    x = x[:, :, top:top + height, left:left + width]
    return (x.clamp(0, 255) / 127.5 - 1.0).contiguous()


def _upright(frame: av.VideoFrame) -> np.ndarray:
    """RGB pixels as displayed: phones store portrait video as landscape frames plus a rotation."""
    turns = round((frame.rotation or 0) / 90) % 4  # counter-clockwise quarter turns, as np.rot90 counts them
    image = frame.to_ndarray(format="rgb24")
    return np.ascontiguousarray(np.rot90(image, turns)) if turns else image


def decode_clip(path: Path, buckets: list[Bucket], fps: float | None) -> Clip:
    p = probe(path)
    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            frames = container.decode(stream)  # presentation order
            first = next(frames, None)
            if first is None:
                raise VideoError("unreadable_video", f"{path}: no decodable frames")
            if round((first.rotation or 0) / 90) % 2:
                p = Probe(p.times, p.width, p.height, p.pts)  # displayed sideways: choose the bucket for that
            bucket, indices = choose_bucket(p, buckets, fps)
            wanted = {p.pts[i] for i in indices}
            kept: dict[int, torch.Tensor] = {}
            for position, frame in enumerate(itertools.chain([first], frames)):
                # frames are matched by timestamp, so frames the decoder drops cannot shift the selection
                stamp = frame.pts if frame.pts is not None else p.pts[min(position, len(p.pts) - 1)]
                if stamp in wanted:  # resize at once: a clip of 4K frames would not fit in memory
                    image = torch.from_numpy(_upright(frame)).permute(2, 0, 1).unsqueeze(0)
                    kept[stamp] = resize_crop(image, bucket.height, bucket.width)[0]
                if len(kept) == len(wanted):
                    break
    except av.error.FFmpegError as exc:
        raise VideoError("unreadable_video", f"{path}: {exc}") from None
    if len(kept) < len(wanted):
        raise VideoError("unreadable_video", f"{path}: decoding stopped after {len(kept)} of {len(wanted)} "
                                             f"needed frames")
    span = p.times[indices[-1]] - p.times[indices[0]]
    sampled_fps = fps if fps else ((len(indices) - 1) / span if span > 0 else 0.0)
    clip = torch.stack([kept[p.pts[i]] for i in indices])
    return Clip(clip, bucket, float(sampled_fps), (p.height, p.width))
