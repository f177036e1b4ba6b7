"""Videos in and out: H.264 mp4 files (PyAV), the animated GIF that TensorBoard shows for a video, and the
conditioning images of image-to-video sampling (Pillow)."""

from __future__ import annotations

import io
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from trainer.errors import UserError


def write_mp4(path: Path, frames: np.ndarray, fps: int) -> Path:
    """frames [F, H, W, 3] uint8 -> H.264 (yuv420p, so height and width must be even), constant frame rate."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps))
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": "18", "preset": "fast"}
        for image in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")))
        container.mux(stream.encode())  # flush
    return path


def read_mp4(path: Path) -> np.ndarray:
    """Every frame of a video file as [F, H, W, 3] uint8."""
    with av.open(str(path)) as container:
        return np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)])


def to_uint8(video: np.ndarray) -> np.ndarray:
    """The pipeline's float frames in [0, 1] -> uint8, rounded as diffusers' own export_to_video rounds them."""
    return (np.clip(video, 0.0, 1.0) * 255).round().astype(np.uint8)


def gif_bytes(frames: np.ndarray, fps: int, max_side: int = 256) -> tuple[bytes, tuple[int, int]]:
    """An animated GIF of the frames, shrunk so that its longer side is at most max_side (event files stay small),
    and its (width, height)."""
    from PIL import Image

    images = [Image.fromarray(frame) for frame in frames]
    scale = max_side / max(images[0].size)
    if scale < 1:
        size = (max(1, round(images[0].width * scale)), max(1, round(images[0].height * scale)))
        images = [image.resize(size, Image.Resampling.BILINEAR) for image in images]
    out = io.BytesIO()
    images[0].save(out, format="GIF", save_all=True, append_images=images[1:], duration=round(1000 / fps), loop=0)
    return out.getvalue(), images[0].size


def read_image(path: Path, field: str):  # -> PIL.Image.Image (imported lazily)
    """An image file as RGB pixels, or a UserError naming ``field`` and the file."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as exc:  # missing, unreadable, not an image
        raise UserError(f"{field}: cannot read the image {path} ({type(exc).__name__}: {exc})") from None
