"""End to end through launch/train.py: real DeepSpeed ranks learn, and the exported LoRA is what diffusers loads.

The runs use the shipped examples/tiny.yaml with --set overrides, so the embedded default is what is tested, on
the 5B-, 2B- and 1.5-style tiny models; ZeRO-3 partitions every parameter (persistence threshold 0) so the
export's gather is exercised.
"""

from __future__ import annotations

import json
from pathlib import Path
from statistics import mean

import av
import pytest
import torch
from diffusers import CogVideoXPipeline, CogVideoXTransformer3DModel
from peft import set_peft_model_state_dict
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from helpers import REPO, read_metrics, run_train, zero_config
from trainer.families.base import lora_config
from trainer.media import read_mp4
from trainer.spec import load_spec

pytestmark = pytest.mark.slow
STEPS = 60


def assert_learned(run_dir: Path, samples_per_step: int) -> list[dict]:
    metrics = read_metrics(run_dir)
    assert [m["optimizer_step"] for m in metrics] == list(range(1, STEPS + 1))
    losses = [m["loss"] for m in metrics]
    first, last = mean(losses[:5]), mean(losses[-10:])
    assert last < 0.8 * first, f"loss did not fall: first steps {first:.4f}, last steps {last:.4f}"
    # the effective batch DeepSpeed used: micro batch x ranks x accumulation samples per optimizer step
    assert all(m["samples_seen"] == m["optimizer_step"] * samples_per_step for m in metrics)
    assert all(m["skipped_steps"] == 0 and m["grad_norm"] > 0 for m in metrics)
    # examples/tiny.yaml: 10 warmup steps to 1e-2, then cosine to 1e-3; the logged lr is the one each step used
    lrs = [m["lr"] for m in metrics]
    assert lrs[0] == pytest.approx(1e-3) and lrs[9] == pytest.approx(1e-2) and lrs[-1] < lrs[20] < lrs[10]
    # TensorBoard holds the same scalars, read back with its own event reader
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    assert {"train/loss", "train/grad_norm", "train/lr", "train/samples_per_s"} <= set(events.Tags()["scalars"])
    tb_loss = [(e.step, e.value) for e in events.Scalars("train/loss")]
    assert [step for step, _ in tb_loss] == list(range(1, STEPS + 1))
    assert [v for _, v in tb_loss] == pytest.approx(losses, rel=1e-6)
    return metrics


def transformer_inputs(pipe: CogVideoXPipeline):
    """Random inputs of the tiny models' native grid (image-to-video: twice the channels, and ofs where the
    transformer has its embedding)."""
    gen, config = torch.Generator().manual_seed(0), pipe.transformer.config
    frames = 4 if config.patch_size_t else 3  # 1.5 patches latent frames in pairs
    latents = torch.randn(1, frames, config.in_channels, 12, 16, generator=gen)  # [B, F, C, H, W]
    embeds = torch.randn(1, 226, 32, generator=gen)
    rope = None
    if config.use_rotary_positional_embeddings:
        rope = pipe._prepare_rotary_positional_embeddings(96, 128, frames, torch.device("cpu"))
    ofs = {"ofs": torch.tensor([2.0])} if config.ofs_embed_dim else {}
    return dict(hidden_states=latents, encoder_hidden_states=embeds, timestep=torch.tensor([500]),
                image_rotary_emb=rope, return_dict=False, **ofs)


@torch.no_grad()
def assert_export_applies(lora_dir: Path, model_dir: Path, spec_file: Path,
                          pipeline: type = CogVideoXPipeline) -> None:
    """The exported file has one A and B per targeted layer, and ``pipeline.load_lora_weights`` applies it at the
    trained scale: the output peft gives with the spec's LoRA config, not the one of alpha = rank."""
    tensors = load_file(lora_dir / "pytorch_lora_weights.safetensors")
    spec = load_spec(spec_file)
    layers = CogVideoXTransformer3DModel.load_config(model_dir / "transformer")["num_layers"]
    assert len(tensors) == 2 * len(spec.lora.target_modules) * layers
    assert all(k.startswith("transformer.transformer_blocks.") for k in tensors)
    assert all(t.numel() > 0 and t.dtype == torch.float32 for t in tensors.values()), "empty LoRA tensor"
    assert (lora_dir / "spec.yaml").is_file()

    pipe = pipeline.from_pretrained(model_dir, dtype=torch.float32)
    inputs = transformer_inputs(pipe)
    base = pipe.transformer(**inputs)[0]
    pipe.load_lora_weights(lora_dir)
    with_lora = pipe.transformer(**inputs)[0]
    change = (with_lora - base).abs().max().item()
    assert change > 1e-3, f"the LoRA barely changes the output ({change})"

    # What the trained weights give, independently of diffusers' loader: the spec's LoRA config in peft.
    reference = CogVideoXTransformer3DModel.from_pretrained(model_dir, subfolder="transformer",
                                                            dtype=torch.float32)
    reference.add_adapter(lora_config(spec.lora))
    result = set_peft_model_state_dict(reference, {k.removeprefix("transformer."): v for k, v in tensors.items()})
    assert not result.unexpected_keys
    expected = reference(**inputs)[0]
    torch.testing.assert_close(with_lora, expected, rtol=1e-5, atol=1e-6)
    # and the recorded alpha matters: the same tensors loaded at alpha = rank (what a reload without the
    # adapter metadata assumes) give a visibly different output
    assert spec.lora.scale_alpha != spec.lora.rank
    wrong = CogVideoXTransformer3DModel.from_pretrained(model_dir, subfolder="transformer", dtype=torch.float32)
    wrong.add_adapter(lora_config(spec.lora.model_copy(update={"alpha": None})))
    set_peft_model_state_dict(wrong, {k.removeprefix("transformer."): v for k, v in tensors.items()})
    assert (wrong(**inputs)[0] - with_lora).abs().max() > 1e-4

# ZeRO-3 only, for the suite's time: 2 ranks under ZeRO-2 learn and export in the mp4 and 1.5 tests below
@pytest.mark.parametrize("stage", [3])
def test_two_ranks_learn_and_export_a_lora_diffusers_loads(stage, tiny_5b, shards_5b, tmp_path):
    run_dir = tmp_path / "run"
    proc = run_train(REPO / "examples" / "tiny.yaml", ranks=2, overrides=(
        f"model.path={tiny_5b}", f"data.shards={shards_5b}", f"run.output_dir={run_dir}",
        f"deepspeed.config={zero_config(tmp_path, stage)}", f"train.max_steps={STEPS}",
        "train.gradient_accumulation_steps=2", "train.precision=bf16", "logging.every_steps=1",
        "checkpoint.every_steps=30", "train.ema=0.9"))
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert f"ZeRO-{stage}, bf16, 2 rank(s)" in proc.stderr
    assert "= 4 samples per optimizer step" in proc.stderr  # 1 micro x 2 accumulation x 2 ranks, from DeepSpeed
    assert_learned(run_dir, samples_per_step=4)
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step_*")) == ["step_00000030", "step_00000060"]
    # the resumable checkpoints leave the frozen base out: a few kB of LoRA state per rank, not the model
    model_states = list((run_dir / "checkpoints" / "step_00000060").glob("*model_states.pt"))
    assert model_states and all(p.stat().st_size < 200_000 for p in model_states)
    assert (run_dir / "spec.yaml").is_file()
    assert_export_applies(run_dir / "lora", tiny_5b, run_dir / "lora" / "spec.yaml")
    # train.ema: the moving average in the same diffusers format, loaded and applied the same way; it lags the
    # LoRA (decay 0.9: about the last 10 steps' weights), so it is close to it and not equal
    assert_export_applies(run_dir / "lora_ema", tiny_5b, run_dir / "lora_ema" / "spec.yaml")
    ours, average = (load_file(run_dir / name / "pytorch_lora_weights.safetensors") for name in ("lora", "lora_ema"))
    gap = max((ours[k] - average[k]).norm() / ours[k].norm() for k in ours if "lora_B" in k)
    assert 0 < gap < 0.5, gap


def test_2b_style_single_process_learns_and_exports(tiny_2b, shards_2b, tmp_path):
    run_dir = tmp_path / "run"
    proc = run_train(REPO / "examples" / "tiny.yaml", ranks=None, overrides=(
        f"model.path={tiny_2b}", f"data.shards={shards_2b}", f"run.output_dir={run_dir}",
        f"train.max_steps={STEPS}", "train.gradient_accumulation_steps=2", "logging.every_steps=1",
        "checkpoint.every_steps=0", "checkpoint.every_minutes=null", "data.num_workers=2"))
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "ZeRO-2, bf16, 1 rank(s)" in proc.stderr
    assert_learned(run_dir, samples_per_step=2)
    assert not (run_dir / "checkpoints").exists()  # neither step- nor time-based saving: none at the end either
    assert_export_applies(run_dir / "lora", tiny_2b, run_dir / "lora" / "spec.yaml")


def test_zero3_offload_config_trains_and_exports(tiny_5b, shards_5b, tmp_path):
    run_dir = tmp_path / "run"
    proc = run_train(REPO / "examples" / "tiny.yaml", overrides=(
        f"model.path={tiny_5b}", f"data.shards={shards_5b}", f"run.output_dir={run_dir}",
        "deepspeed.config=zero3_offload", "train.max_steps=3", "optim.warmup_steps=1", "logging.every_steps=1",
        "checkpoint.every_steps=3"))
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "ZeRO-3, bf16, 1 rank(s)" in proc.stderr
    assert [m["optimizer_step"] for m in read_metrics(run_dir)] == [1, 2, 3]
    assert (run_dir / "checkpoints" / "step_00000003").is_dir()
    tensors = load_file(run_dir / "lora" / "pytorch_lora_weights.safetensors")
    assert tensors and all(t.numel() > 0 for t in tensors.values())
    assert any(t.abs().sum() > 0 for name, t in tensors.items() if "lora_B" in name)  # B moved off its zero init


def test_trains_from_mp4_files_packed_by_shard_py(tiny_5b, packed_5b, tmp_path):
    """The whole path a user takes: mp4 files -> data_tools/shard.py (conftest's packed_5b, with the model's
    defaults) -> launch/train.py -> a LoRA diffusers loads."""
    assert json.loads((packed_5b / "manifest.json").read_text())["samples"] == 6
    run_dir = tmp_path / "run"
    proc = run_train(REPO / "examples" / "tiny.yaml", ranks=2, overrides=(
        f"model.path={tiny_5b}", f"data.shards={packed_5b}", f"run.output_dir={run_dir}", f"train.max_steps={STEPS}",
        "logging.every_steps=1", "checkpoint.every_steps=0"))
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert_learned(run_dir, samples_per_step=4)
    assert_export_applies(run_dir / "lora", tiny_5b, run_dir / "lora" / "spec.yaml")


@pytest.mark.parametrize("stage", [2, 3], ids=["zero2", "zero3"])
def test_cogvideox_15_from_mp4_files_learns_samples_and_exports(stage, tiny_15, packed_15, tmp_path):
    """The whole path a 1.5 user takes: mp4 files -> data_tools/shard.py with the model's defaults (17x96x128 at
    16 fps: 5 latent frames, padded to 6) -> 2 ranks -> videos from CogVideoXPipeline at the model's clip (ZeRO-2)
    or the one asked for (ZeRO-3) -> a LoRA that load_lora_weights applies at the trained scale."""
    manifest = json.loads((packed_15 / "manifest.json").read_text())
    assert manifest["options"]["fps"] == 16.0 and list(manifest["buckets"]) == ["17x96x128"]
    assert manifest["buckets"]["17x96x128"]["latents"] == [4, 5, 12, 16] and manifest["samples"] == 6
    run_dir = tmp_path / "run"
    asked = {2: {}, 3: {"num_frames": 33, "height": 80, "width": 112, "fps": 10}}[stage]
    proc = run_train(REPO / "examples" / "tiny.yaml", ranks=2, overrides=(
        f"model.path={tiny_15}", f"data.shards={packed_15}", f"run.output_dir={run_dir}",
        f"deepspeed.config={zero_config(tmp_path, stage)}", f"train.max_steps={STEPS}", "logging.every_steps=1",
        "checkpoint.every_steps=0", "checkpoint.every_minutes=null", "validation.every_steps=0",
        "validation.num_inference_steps=2", *[f"validation.{k}={v}" for k, v in asked.items()]))
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert f"ZeRO-{stage}, bf16, 2 rank(s)" in proc.stderr
    assert "144 video + 226 text (latents 4x5x12x16, 6 samples)" in proc.stderr  # 6 x 12 x 16 / (2 x 2 x 2)
    assert_learned(run_dir, samples_per_step=4)
    frames, height, width, fps = (asked.get(k, v) for k, v in (("num_frames", 17), ("height", 96), ("width", 128),
                                                                 ("fps", 16)))
    assert f"({frames}x{height}x{width} at {fps} fps, 2 sampling steps)" in proc.stderr
    videos = sorted((run_dir / "samples" / f"step_{STEPS:06d}").glob("*.mp4"))
    assert len(videos) == 2
    for video in videos:
        decoded = read_mp4(video)
        assert decoded.shape == (frames, height, width, 3) and decoded.std() > 0
        with av.open(str(video)) as container:
            assert container.streams.video[0].average_rate == fps
    assert_export_applies(run_dir / "lora", tiny_15, run_dir / "lora" / "spec.yaml")
