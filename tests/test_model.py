"""The trainer's transformer wrapper against the diffusers pipeline: same RoPE, same layout, clear errors."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from diffusers import CogVideoXPipeline, CogVideoXTransformer3DModel

from trainer.errors import UserError
from trainer.model import ModelShapes, VideoTransformer, check_lora_targets, resolve_model_dir
from trainer.shard_format import ShardError
from trainer.spec import LoraSection

LORA = LoraSection(rank=4, alpha=8)


def pipeline_rope(pipe: CogVideoXPipeline, frames: int, latent_h: int, latent_w: int):
    # The pipeline takes pixel height/width and latent frames, as in its __call__.
    s = pipe.vae_scale_factor_spatial
    return pipe._prepare_rotary_positional_embeddings(latent_h * s, latent_w * s, frames, torch.device("cpu"))


@pytest.mark.parametrize("frames,height,width", [(3, 12, 16), (13, 60, 90), (2, 8, 8), (5, 20, 12)])
def test_rope_equals_the_pipelines_own(tiny_5b, frames, height, width):
    pipe = CogVideoXPipeline.from_pretrained(tiny_5b)
    model = VideoTransformer(pipe.transformer)
    cos, sin = model.rotary_embedding(frames, height, width, torch.device("cpu"))
    ref_cos, ref_sin = pipeline_rope(pipe, frames, height, width)
    assert torch.equal(cos, ref_cos) and torch.equal(sin, ref_sin)
    assert model.rotary_embedding(frames, height, width, torch.device("cpu"))[0] is cos  # cached per shape


def test_cogvideox_15_geometry_pads_frames_and_matches_rope(tiny_5b):
    pipe = CogVideoXPipeline.from_pretrained(tiny_5b)
    config = {**pipe.transformer.config, "patch_size_t": 2, "use_learned_positional_embeddings": False}
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    pipe.transformer = CogVideoXTransformer3DModel.from_config(config)
    model = VideoTransformer(pipe.transformer)
    latents = torch.arange(3.0).view(1, 1, 3, 1, 1).expand(2, 4, 3, 2, 2)
    padded = model.pad_frames(latents)
    assert padded.shape[2] == 4 and torch.equal(padded[:, :, 0], latents[:, :, 0])  # first frame repeated
    assert torch.equal(padded[:, :, 1:], latents)
    cos, _ = model.rotary_embedding(4, 12, 16, torch.device("cpu"))
    assert torch.equal(cos, pipeline_rope(pipe, 4, 12, 16)[0])


def test_2b_style_has_no_rope_and_forward_keeps_the_layout(tiny_2b):
    model = VideoTransformer.from_pretrained(tiny_2b, LORA, torch.float32, gradient_checkpointing=False, seed=0)
    assert model.rotary_embedding(3, 12, 16, torch.device("cpu")) is None
    gen = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 3, 12, 16, generator=gen)  # [B, C, F, H, W], the shard layout
    embeds, t = torch.randn(2, 226, 32, generator=gen), torch.tensor([10, 900])
    out = model(latents, embeds, t)
    assert out.shape == latents.shape
    # the bare transformer takes and returns [B, F, C, H, W]
    ref = model.transformer(hidden_states=latents.permute(0, 2, 1, 3, 4), encoder_hidden_states=embeds,
                            timestep=t, return_dict=False)[0]
    assert torch.equal(out, ref.permute(0, 2, 1, 3, 4))


def test_lora_is_the_only_trainable_part_and_init_is_seeded(tiny_5b):
    a = VideoTransformer.from_pretrained(tiny_5b, LORA, torch.bfloat16, gradient_checkpointing=True, seed=3)
    b = VideoTransformer.from_pretrained(tiny_5b, LORA, torch.bfloat16, gradient_checkpointing=True, seed=3)
    trainable = a.lora_parameters()
    assert trainable and all("lora_" in name for name in trainable)
    assert len(trainable) == 2 * 4 * 2  # A and B for 4 targets in 2 blocks
    assert sum(p.requires_grad for p in a.parameters()) == len(trainable)
    assert all(torch.equal(p, b.lora_parameters()[n]) for n, p in trainable.items())  # same on every rank
    assert a.transformer.is_gradient_checkpointing
    assert a.transformer.peft_config["default"].lora_alpha == 8


def test_unknown_lora_target_names_the_field(tiny_5b):
    check_lora_targets(tiny_5b, ["to_q", "ff.net.2", "attn1.to_out.0"])
    with pytest.raises(UserError, match=r"lora.target_modules: \['to_qq'\] match no module"):
        check_lora_targets(tiny_5b, ["to_q", "to_qq"])


def test_model_dir_problems_name_model_path(tmp_path, tiny_5b):
    with pytest.raises(UserError, match="model.path: no such directory"):
        resolve_model_dir(str(tmp_path / "absent"))
    partial = tmp_path / "partial"
    shutil.copytree(tiny_5b / "transformer", partial / "transformer")
    with pytest.raises(UserError, match="missing scheduler/scheduler_config.json"):
        resolve_model_dir(str(partial))
    assert resolve_model_dir(str(tiny_5b)) == tiny_5b


def test_image_to_video_transformer_is_refused(tmp_path, tiny_5b):
    i2v = tmp_path / "i2v"
    shutil.copytree(tiny_5b, i2v)
    config_path = i2v / "transformer" / "config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "in_channels": 8}))
    with pytest.raises(UserError, match="image-to-video"):
        ModelShapes.from_model_dir(i2v)


def test_shapes_check_names_shard_key_and_mismatch(tiny_5b):
    shapes = ModelShapes.from_model_dir(tiny_5b)
    shapes.check("s.tar", "k1", (4, 3, 12, 16), (226, 32))
    cases = [
        ("k2", (16, 3, 12, 16), (226, 32), "latents have 16 channels"),
        ("k3", (4, 3, 13, 16), (226, 32), "not divisible by the model's patch"),
        ("k4", (4, 3, 12, 16), (226, 4096), "prompt embeddings are [226, 4096]"),
        ("k5", (4, 12, 16), (226, 32), "latents have shape [4, 12, 16], expected [C, F, H, W]"),
    ]
    for key, latents, prompt, problem in cases:
        with pytest.raises(ShardError) as info:
            shapes.check("s.tar", key, latents, prompt)
        assert f"shard s.tar, sample {key!r}" in str(info.value) and problem in str(info.value)
