"""Decoding for packing: frame choice from timestamps, bucket choice, resize and centre-crop, and a real mp4."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from data_tools.synth_videos import frames_for
from data_tools.video import Bucket, Probe, VideoError, choose_bucket, decode_clip, parse_buckets, probe, resize_crop
from trainer.media import write_mp4


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


def write_frames(path, images, times, rotation: int = 0):
    """H.264 with explicit presentation times (variable frame rate, any start) and an optional display rotation."""
    from fractions import Fraction

    import av

    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=Fraction(30))
        stream.time_base = Fraction(1, 1000)
        stream.height, stream.width = images[0].shape[:2]
        stream.pix_fmt = "yuv420p"
        if rotation:
            stream.set_display_rotation(rotation)
        for image, t in zip(images, times, strict=True):
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame.pts, frame.time_base = round(t * 1000), Fraction(1, 1000)
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return path


def test_frames_are_chosen_by_timestamp_in_variable_frame_rate_video(tmp_path):
    # 11 frames at irregular times starting at 0.5 s, each a flat grey level that identifies it
    times = [0.5, 0.6, 0.65, 0.85, 0.95, 1.2, 1.3, 1.55, 1.75, 1.8, 2.0]
    images = [np.full((96, 128, 3), 10 + 20 * k, dtype=np.uint8) for k in range(len(times))]
    path = write_frames(tmp_path / "vfr.mp4", images, times)
    got = decode_clip(path, [Bucket(5, 96, 128)], 4.0)
    # 4 fps from the first frame: t = 0.5, 0.75, 1.0, 1.25, 1.5 show frames 0, 2, 4, 5, 6
    levels = ((got.frames.mean(dim=(1, 2, 3)) + 1) * 127.5).tolist()
    assert levels == pytest.approx([10 + 20 * k for k in (0, 2, 4, 5, 6)], abs=2)
    evenly = decode_clip(path, [Bucket(5, 96, 128)], None)  # positions 0, 2.5, 5, 7.5, 10 -> 0, 2, 5, 8, 10
    levels = ((evenly.frames.mean(dim=(1, 2, 3)) + 1) * 127.5).tolist()
    assert levels == pytest.approx([10 + 20 * k for k in (0, 2, 5, 8, 10)], abs=2)
    single = decode_clip(path, [Bucket(1, 96, 128)], None)
    assert single.frames.shape == (1, 3, 96, 128)


def test_a_rotated_phone_video_is_packed_upright(tmp_path):
    # stored landscape 96x128 with the left half white; displayed rotated 90 degrees: portrait 128x96
    image = np.zeros((96, 128, 3), dtype=np.uint8)
    image[:, :64] = 255
    path = write_frames(tmp_path / "phone.mp4", [image] * 9, [i / 8 for i in range(9)], rotation=90)
    got = decode_clip(path, parse_buckets("9x96x128,9x128x96"), 8.0)
    assert got.bucket == Bucket(9, 128, 96) and got.source_size == (128, 96)
    upright = torch.from_numpy(np.rot90(image).copy()).permute(2, 0, 1).float() / 127.5 - 1
    assert (got.frames[0] - upright).abs().mean() < 0.05
