"""Decoding for packing: frame choice from timestamps, bucket choice, resize and centre-crop, and a real mp4."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from data_tools.synth_videos import frames_for, write_mp4
from data_tools.video import Bucket, Probe, VideoError, choose_bucket, decode_clip, parse_buckets, probe, resize_crop


def clip(n: int, fps: float, height: int = 480, width: int = 720) -> Probe:
    return Probe([i / fps for i in range(n)], height, width)


def test_parse_buckets():
    assert parse_buckets("49x480x720, 25x480x480,49x480x720") == [Bucket(25, 480, 480), Bucket(49, 480, 720)]
    for bad in ("49x480", "ax480x720", "0x480x720", ""):
        with pytest.raises(ValueError):
            parse_buckets(bad)


def test_frames_at_a_rate_pick_the_frame_shown_at_each_time():
    # a 30 fps source sampled at 8 fps: frame shown at t = i/8 is floor(30 i / 8)
    assert clip(60, 30).frame_indices(9, 8.0) == [int(30 * i / 8) for i in range(9)]
    # a source at the target rate: every frame, in order
    assert clip(9, 8).frame_indices(9, 8.0) == list(range(9))
    # 49 frames at 8 fps need 6 s: 5.9 s of 30 fps video is too short, 6 s is enough
    assert clip(177, 30).frame_indices(49, 8.0) is None
    assert clip(181, 30).frame_indices(49, 8.0) is not None


def test_frames_evenly_span_the_whole_clip():
    assert clip(17, 30).frame_indices(9, None) == [0, 2, 4, 6, 8, 10, 12, 14, 16]
    assert clip(8, 30).frame_indices(9, None) is None
    indices = clip(1000, 30).frame_indices(49, None)
    assert indices[0] == 0 and indices[-1] == 999 and indices == sorted(set(indices))


def test_bucket_is_the_closest_aspect_the_clip_is_long_enough_for():
    buckets = parse_buckets("49x480x720,49x480x480,25x480x720")
    wide, square = clip(200, 30, 1080, 1920), clip(200, 30, 500, 512)
    assert choose_bucket(wide, buckets, 8.0)[0] == Bucket(49, 480, 720)
    assert choose_bucket(square, buckets, 8.0)[0] == Bucket(49, 480, 480)
    short_wide = clip(100, 30, 1080, 1920)  # 3.3 s: too short for 49 frames at 8 fps, enough for 25
    assert choose_bucket(short_wide, buckets, 8.0)[0] == Bucket(25, 480, 720)
    with pytest.raises(VideoError) as err:
        choose_bucket(clip(20, 30), buckets, 8.0)
    assert err.value.reason == "too_short" and "25 frames at 8 fps (3.00 s)" in err.value.detail


def test_resize_covers_the_target_then_crops_the_centre():
    # a 100x200 frame: left 40 columns black, right 40 white, grey between; target 64x64 square
    image = torch.full((1, 3, 100, 200), 128, dtype=torch.uint8)
    image[..., :40], image[..., 160:] = 0, 255
    out = resize_crop(image, 64, 64)
    assert out.shape == (1, 3, 64, 64) and out.dtype == torch.float32
    # the centre crop of the 64x128 resize keeps only the grey middle
    torch.testing.assert_close(out, torch.full_like(out, 128 / 127.5 - 1), atol=0.02, rtol=0)
    full = resize_crop(image, 100, 200)  # same size: values only rescaled to [-1, 1]
    assert full.min() == -1 and full.max() == 1


def test_decoded_frames_match_what_was_encoded(tmp_path):
    frames = frames_for(5, 12, 120, 160)
    path = write_mp4(tmp_path / "v.mp4", frames, fps=8)
    p = probe(path)
    assert len(p.times) == 12 and (p.height, p.width) == (120, 160)
    got = decode_clip(path, [Bucket(9, 120, 160)], 8.0)
    assert got.bucket == Bucket(9, 120, 160) and got.fps == 8.0 and got.frames.shape == (9, 3, 120, 160)
    expected = torch.from_numpy(frames[:9]).permute(0, 3, 1, 2).float() / 127.5 - 1
    assert (got.frames - expected).abs().mean() < 0.02  # H.264 at crf 18 is close, not exact
    evenly = decode_clip(path, [Bucket(5, 96, 128)], None)
    assert evenly.frames.shape == (5, 3, 96, 128) and evenly.fps == pytest.approx(4 / (11 / 8))


def test_unreadable_and_missing_videos_raise_with_a_reason(tmp_path):
    garbage = tmp_path / "bad.mp4"
    garbage.write_bytes(np.random.default_rng(0).bytes(4096))
    for path, reason in ((garbage, "unreadable_video"), (tmp_path / "none.mp4", "missing_video")):
        with pytest.raises(VideoError) as err:
            decode_clip(path, [Bucket(9, 96, 128)], 8.0)
        assert err.value.reason == reason and str(path) in err.value.detail
