"""Small pieces of validation and reporting, without ranks: names, timesteps, GIFs, the timestep buckets."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from trainer.media import gif_bytes, to_uint8
from trainer.reporting.interval import bucket_names
from trainer.reporting.writers import duration
from trainer.sampling import video_names
from trainer.validation import loss_timesteps


def test_loss_timesteps_are_the_midpoints_of_equal_strata():
    assert loss_timesteps(10, 1000) == [50, 150, 250, 350, 450, 550, 650, 750, 850, 950]
    assert loss_timesteps(4, 1000) == [125, 375, 625, 875]
    assert loss_timesteps(1, 1000) == [500]


def test_bucket_names_cover_every_timestep_once():
    assert bucket_names(1000)[:2] == ["loss_t000_099", "loss_t100_199"] and bucket_names(1000)[-1] == "loss_t900_999"
    assert len(bucket_names(1000)) == 10


def test_video_names_are_numbered_and_readable():
    names = video_names(["A Cat, on a mat!", "", "x" * 100])
    assert names[0] == "000-a-cat-on-a-mat.mp4" and names[1] == "001-prompt.mp4" and names[2] == f"002-{'x' * 40}.mp4"


def test_gif_keeps_every_frame_and_shrinks_the_picture():
    frames = to_uint8(np.random.default_rng(0).random((5, 480, 720, 3)))
    data, size = gif_bytes(frames, fps=8)
    gif = Image.open(io.BytesIO(data))
    assert gif.format == "GIF" and gif.n_frames == 5 and gif.size == size == (256, 171)
    assert to_uint8(np.array([-0.5, 0.0, 0.5, 1.0, 2.0])).tolist() == [0, 0, 128, 255, 255]


def test_duration():
    assert duration(0) == "0:00:00" and duration(3725.4) == "1:02:05"
