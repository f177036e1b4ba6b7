"""Image-to-video's parts, without training: the conditioning recipe's draws, and bad input stopped before any
work with one message naming the field, shard or file (through launch/train.py, launch/sample.py and
data_tools/shard.py as a user runs them, and the trainer's own preflight)."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
import torch

from data_tools import shard
from helpers import rewrite_shards, run_python, run_train, write_spec
from trainer.errors import UserError
from trainer.families import family_for
from trainer.families.cogvideox_i2v import (
    IMAGE_NOISE_LOG_MEAN,
    IMAGE_NOISE_LOG_STD,
    image_noise_sigma,
    to_pixels,
)
from trainer.shard_format import IMAGE, shard_samples
from trainer.shard_index import build_index
from trainer.spec import RunSpec
from trainer.startup import preflight


def test_the_noise_levels_follow_the_recipe_and_repeat_with_the_seed():
    """sigma = exp(N(-3, 0.5)): over 20,000 draws the log's mean and standard deviation are -3 and 0.5 within
    4 standard errors, and the same seed draws the same levels."""
    sigma = image_noise_sigma(20_000, torch.Generator().manual_seed(0)).double().log()
    assert IMAGE_NOISE_LOG_MEAN == -3.0 and IMAGE_NOISE_LOG_STD == 0.5
    assert abs(sigma.mean().item() + 3.0) < 4 * 0.5 / math.sqrt(20_000)
    assert abs(sigma.std().item() - 0.5) < 4 * 0.5 / math.sqrt(2 * 20_000)
    assert torch.equal(image_noise_sigma(8, torch.Generator().manual_seed(5)),
                       image_noise_sigma(8, torch.Generator().manual_seed(5)))


def test_augmented_image_latents_are_noised_dropped_and_seeded(tiny_15_i2v, packed_15_i2v):
    family = family_for(tiny_15_i2v)
    images = torch.stack([s.image for s in shard_samples(str(sorted(packed_15_i2v.glob("*.tar"))[0]))])
    assert images.shape == (2, 3, 96, 128) and images.dtype == torch.uint8

    def draw(dropout: float, seed: int) -> torch.Tensor:
        conditioner = family.image_conditioner(torch.device("cpu"), torch.float32, dropout)
        assert conditioner is not None
        return conditioner.augmented(images, torch.Generator().manual_seed(seed), torch.float32)

    conditioner = family.image_conditioner(torch.device("cpu"), torch.float32, 0.0)
    noised = draw(0.0, 0)
    assert noised.shape == (2, 4, 1, 12, 16)
    assert torch.equal(noised, draw(0.0, 0)) and not torch.equal(noised, draw(0.0, 1))  # seeded per step
    # in pixel space, before the VAE: the picture in [-1, 1] plus sigma x N(0, 1), then the encoder's posterior
    # draw, in that order from the step's generator
    generator = torch.Generator().manual_seed(0)
    sigma = image_noise_sigma(2, generator)
    pixels = to_pixels(images, torch.device("cpu"))
    noisy = pixels + sigma.view(-1, 1, 1, 1) * torch.randn(pixels.shape, generator=generator)
    assert torch.equal(noised, conditioner.encode(noisy, generator, torch.float32))
    assert 0 < (noisy - pixels).abs().mean() < 0.5 and pixels.min() >= -1 and pixels.max() <= 1
    assert not draw(1.0, 0).any() and draw(0.0, 0).abs().sum(dim=(1, 2, 3, 4)).min() > 0
    kept = torch.stack([draw(0.5, seed).abs().sum(dim=(1, 2, 3, 4)) > 0 for seed in range(40)])
    assert 0.3 < kept.float().mean() < 0.7  # dropped per sample with probability 0.5


@pytest.fixture
def i2v_spec(tiny_5b_i2v, packed_5b_i2v, tmp_path) -> dict:
    return {"run": {"output_dir": str(tmp_path / "run")}, "model": {"path": str(tiny_5b_i2v)},
            "data": {"shards": str(packed_5b_i2v), "num_workers": 0}, "train": {"max_steps": 2},
            "validation": {"prompts": ["a", "b"], "images": []}}


def fails_through_train_py(tmp_path: Path, spec: dict, *expected: str) -> None:
    proc = run_train(write_spec(tmp_path / "run.yaml", spec))
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and proc.stderr.count("error:") == 1, proc.stderr
    for text in expected:
        assert text in proc.stderr, proc.stderr
    assert not (tmp_path / "run").exists()  # nothing started


def test_text_to_video_shards_for_an_image_to_video_model(tmp_path, i2v_spec, packed_5b):
    fails_through_train_py(tmp_path, {**i2v_spec, "data": {"shards": str(packed_5b)}, "validation": {}},
                           f"shard {packed_5b / 'shard-000000.tar'}, sample '000000000': has no conditioning image "
                           f"({IMAGE}): it was packed for a text-to-video model", "is image-to-video")


def test_an_unreadable_validation_image(tmp_path, i2v_spec):
    broken = tmp_path / "frame.png"
    broken.write_text("not a picture")
    fails_through_train_py(tmp_path, {**i2v_spec, "validation": {"prompts": ["a"], "images": [str(broken)]}},
                           f"validation.images: cannot read the image {broken} (UnidentifiedImageError")


def preflight_fails(spec: dict, match: str) -> None:
    with pytest.raises(UserError, match=match):
        preflight(RunSpec.model_validate(spec))


def test_preflight_names_what_does_not_fit_an_image_to_video_run(tmp_path, i2v_spec, tiny_5b, packed_5b,
                                                                 packed_15_i2v):
    picture = tmp_path / "first.png"
    from PIL import Image

    Image.new("RGB", (128, 96), (200, 30, 30)).save(picture)
    preflight(RunSpec.model_validate({**i2v_spec, "validation": {"prompts": ["a"], "images": [str(picture)]}}))
    preflight_fails({**i2v_spec, "model": {"path": str(tiny_5b)}, "validation": {}},
                    r"sample '000000000': carries a conditioning image \(image.safetensors\): it was packed for "
                    r"an image-to-video model, but the model .* is text-to-video")
    preflight_fails({**i2v_spec, "validation": {"prompts": ["a", "b"], "images": [str(picture)]}},
                    r"^validation.images: an image-to-video model samples each prompt from an image: give one per "
                    r"prompt \(2 prompt\(s\), 1 image\(s\)\)")
    preflight_fails({**i2v_spec, "validation": {"prompts": ["a"], "images": [str(tmp_path / "missing.png")]}},
                    r"^validation.images: cannot read the image .*missing.png \(FileNotFoundError")
    preflight_fails({**i2v_spec, "model": {"path": str(tiny_5b)}, "data": {"shards": str(packed_5b)},
                     "validation": {"prompts": ["a"], "images": [str(picture)]}},
                    r"^validation.images: CogVideoX 1.0 text-to-video, 3D RoPE samples from prompts alone")
    preflight_fails({**i2v_spec, "validation": {"loss": {"shards": str(packed_5b)}}},
                    r"^validation.loss.shards: shard .*: has no conditioning image")
    preflight_fails({**i2v_spec, "validation": {"prompts": ["a"], "images": [str(picture)], "height": 80}},
                    r"^validation.height: 80, but this transformer's learned positional embedding .* covers only "
                    r"9x96x128")
    preflight_fails({**i2v_spec, "validation": {"prompts": [], "images": [str(picture)]}},
                    r"^validation.images: 1 image\(s\) but no validation.prompts")
    preflight_fails({**i2v_spec, "data": {"shards": str(packed_15_i2v)}, "validation": {}},
                    r"latents \[4, 5, 12, 16\] are not the one grid the model's learned positional embedding "
                    r"covers, \[3, 12, 16\] latent frames x height x width")
    no_vae = tmp_path / "no-vae"
    shutil.copytree(i2v_spec["model"]["path"], no_vae, ignore=shutil.ignore_patterns("vae"))
    preflight_fails({**i2v_spec, "model": {"path": str(no_vae)}, "validation": {}},
                    r"^model.path: training an image-to-video model needs the model directory's VAE, but .* lacks "
                    r"vae/config.json")


def test_position_tables_bound_the_latent_grid(tmp_path, tiny_15, tiny_5b_i2v):
    """1.5's RoPE table (the base grid, 12 x 16 latents here) bounds every sample's grid; 5B-I2V's learned
    embedding admits its one grid; and a VAE that cannot be loaded is named before the transformer loads."""
    shapes = family_for(tiny_15).sample_shapes()
    shapes.check("s.tar", "k", (4, 5, 12, 16), (226, 32))
    with pytest.raises(UserError, match=r"sample 'k': latent height x width 14x16 is beyond the model's rotary "
                                        r"position table, 12x16"):
        shapes.check("s.tar", "k", (4, 5, 14, 16), (226, 32))
    family_for(tiny_5b_i2v).sample_shapes().check("s.tar", "k", (4, 3, 12, 16), (226, 32), (3, 96, 128))
    broken = tmp_path / "broken"
    shutil.copytree(tiny_5b_i2v, broken)
    for weights in (broken / "vae").glob("diffusion_pytorch_model*"):
        weights.write_bytes(b"not safetensors")
    with pytest.raises(UserError, match=r"^model.path: cannot load the VAE that encodes the conditioning images"):
        family_for(broken).image_conditioner(torch.device("cpu"), torch.float32, 0.0)


def test_an_image_to_video_sample_without_its_image_is_left_out_by_name(tmp_path, tiny_5b_i2v, packed_5b_i2v):
    def edit(i, key, members):
        return {k: v for k, v in members.items() if k != IMAGE} if key == "000000001" else members

    shards = rewrite_shards(packed_5b_i2v, tmp_path / "edited", edit)
    index = build_index([str(s) for s in shards], family_for(tiny_5b_i2v).sample_shapes())
    assert len(index.samples) == 5 and all(ref.image is not None for ref in index.samples)
    assert [f.key for f in index.faults] == ["000000001"] and "has no conditioning image" in str(index.faults[0])


def test_the_tools_refuse_before_any_work(tmp_path, tiny_5b_i2v, videos, capsys):
    """shard.py: a clip other than 5B-I2V's one; sample.py: prompts and images that do not pair up."""
    out = tmp_path / "packed"
    assert shard.main(["--input", str(videos), "--model", str(tiny_5b_i2v), "--out", str(out), "--height",
                       "80"]) == 2
    assert "--height: 80, but this transformer's learned positional embedding" in capsys.readouterr().err
    assert not out.exists()
    model = tmp_path / "model"
    shutil.copytree(tiny_5b_i2v, model)
    proc = run_python("launch/sample.py", "--model", str(model), "--prompt", "a", "--prompt", "b", "--image",
                      str(tmp_path / "one.png"), "--out", str(tmp_path / "videos"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "--image: an image-to-video model samples each prompt from an image: give one per prompt (2 prompt(s), " \
           "1 image(s))" in proc.stderr
    assert not (tmp_path / "videos").exists()
