"""Image-to-video end to end through launch/train.py on 2 real ranks: mp4 files -> data_tools/shard.py (each
sample with its first frame) -> training that noises, encodes and concatenates the first frame every step ->
validation videos from CogVideoXImageToVideoPipeline started from an image, and a held-out loss -> a LoRA that
CogVideoXImageToVideoPipeline.load_lora_weights applies at the trained scale. The 1.5-I2V-style model under
ZeRO-2, the 5B-I2V-style one under ZeRO-3 (every parameter partitioned)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import CogVideoXImageToVideoPipeline
from PIL import Image

from helpers import REPO, read_metrics, run_train, zero_config
from test_train_e2e import STEPS, assert_export_applies, assert_learned
from trainer.media import read_mp4
from trainer.shard_format import shard_samples

pytestmark = pytest.mark.slow


def first_frames(shards: Path, out: Path, count: int) -> list[Path]:
    """The first frames the packed samples carry, as PNG files: the pictures a user gives validation."""
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, sample in enumerate(s for shard in sorted(shards.glob("*.tar")) for s in shard_samples(str(shard))):
        if i == count:
            break
        assert sample.image is not None
        paths.append(out / f"{sample.key}.png")
        Image.fromarray(sample.image.permute(1, 2, 0).numpy()).save(paths[-1])
    return paths


@pytest.mark.parametrize("flavour,stage", [("1.5-i2v", 2), ("5b-i2v", 3)], ids=["15-i2v-zero2", "5b-i2v-zero3"])
def test_image_to_video_from_mp4_files_learns_samples_and_exports(flavour, stage, request, tmp_path):
    model_dir = request.getfixturevalue({"1.5-i2v": "tiny_15_i2v", "5b-i2v": "tiny_5b_i2v"}[flavour])
    shards = request.getfixturevalue({"1.5-i2v": "packed_15_i2v", "5b-i2v": "packed_5b_i2v"}[flavour])
    frames, fps, version = {"1.5-i2v": (17, 16, "1.5"), "5b-i2v": (9, 8, "1.0")}[flavour]
    manifest = json.loads((shards / "manifest.json").read_text())
    assert manifest["kind"] == "image-to-video" and manifest["image"]["member"] == "image.safetensors"
    assert manifest["samples"] == 6 and list(manifest["buckets"]) == [f"{frames}x96x128"]
    images = first_frames(shards, tmp_path / "images", 2)
    run_dir = tmp_path / "run"
    proc = run_train(REPO / "examples" / "tiny.yaml", ranks=2, overrides=(
        f"model.path={model_dir}", f"data.shards={shards}", f"run.output_dir={run_dir}",
        f"deepspeed.config={zero_config(tmp_path, stage)}", f"train.max_steps={STEPS}", "logging.every_steps=1",
        "checkpoint.every_steps=0", "checkpoint.every_minutes=null", "validation.every_steps=0",
        "validation.num_inference_steps=2", f"validation.images=[{images[0]},{images[1]}]",
        f"validation.loss.shards={shards}", "validation.loss.every_steps=30", "validation.loss.timesteps=2",
        "data.image_dropout=0.1"))
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert f"CogVideoX {version} image-to-video, 3D RoPE" in proc.stderr
    assert f"ZeRO-{stage}, bf16, 2 rank(s)" in proc.stderr
    assert "first frame, noised (sigma = exp(N(-3, 0.5))) and VAE-encoded each step on cpu; dropout 0.1" in proc.stderr
    assert_learned(run_dir, samples_per_step=4)
    held_out = read_metrics(run_dir, validation=True)
    assert [m["optimizer_step"] for m in held_out] == [30, 60]
    assert held_out[1]["val_loss"] < held_out[0]["val_loss"]  # the same weights would give the same number

    out = run_dir / "samples" / f"step_{STEPS:06d}"
    videos = sorted(out.glob("*.mp4"))
    assert len(videos) == 2
    for video in videos:
        decoded = read_mp4(video)
        assert decoded.shape == (frames, 96, 128, 3) and decoded.std() > 0
    listing = json.loads((out / "prompts.json").read_text())
    assert list(listing["images"].values()) == [str(images[0]), str(images[1])]
    assert_export_applies(run_dir / "lora", model_dir, run_dir / "lora" / "spec.yaml", CogVideoXImageToVideoPipeline)

    # the exported LoRA samples the same video again, through launch/sample.py --image, as validation did
    again = tmp_path / "again"
    proc = run_python_sample(run_dir, out / "lora", images[0], again)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ours, theirs = read_mp4(sorted(again.glob("*.mp4"))[0]), read_mp4(videos[0])
    assert ours.shape == theirs.shape
    assert torch.equal(torch.from_numpy(ours), torch.from_numpy(theirs))


def run_python_sample(run_dir: Path, lora: Path, image: Path, out: Path):
    from helpers import run_python

    spec = run_dir / "spec.yaml"
    prompt = json.loads((run_dir / "samples" / f"step_{STEPS:06d}" / "prompts.json").read_text())["videos"]
    return run_python("launch/sample.py", "--spec", str(spec), "--lora", str(lora), "--out", str(out),
                      "--prompt", next(iter(prompt.values())), "--image", str(image))
