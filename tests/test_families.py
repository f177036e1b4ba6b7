"""The model-family seam: the registry picks a family by what the directory says, and CogVideoX's model wrapper
matches the diffusers pipeline (same RoPE, same layout) with clear errors."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from diffusers import CogVideoXPipeline, CogVideoXTransformer3DModel

from trainer.errors import UserError
from trainer.families import family_for, load_family, resolve_model_dir
from trainer.families.cogvideox import CogVideoX, CogVideoXModel
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
    model = CogVideoXModel(pipe.transformer)
    cos, sin = model.rotary_embedding(frames, height, width, torch.device("cpu"))
    ref_cos, ref_sin = pipeline_rope(pipe, frames, height, width)
    assert torch.equal(cos, ref_cos) and torch.equal(sin, ref_sin)
    assert model.rotary_embedding(frames, height, width, torch.device("cpu"))[0] is cos  # cached per shape


def test_cogvideox_15_geometry_pads_frames_and_matches_rope(tiny_5b):
    pipe = CogVideoXPipeline.from_pretrained(tiny_5b)
    config = {**pipe.transformer.config, "patch_size_t": 2, "use_learned_positional_embeddings": False}
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    pipe.transformer = CogVideoXTransformer3DModel.from_config(config)
    model = CogVideoXModel(pipe.transformer)
    latents = torch.arange(3.0).view(1, 1, 3, 1, 1).expand(2, 4, 3, 2, 2)
    padded = model.prepare_latents(latents)
    assert padded.shape[2] == 4 and torch.equal(padded[:, :, 0], latents[:, :, 0])  # first frame repeated
    assert torch.equal(padded[:, :, 1:], latents)
    cos, _ = model.rotary_embedding(4, 12, 16, torch.device("cpu"))
    assert torch.equal(cos, pipeline_rope(pipe, 4, 12, 16)[0])


def test_2b_style_has_no_rope_and_forward_keeps_the_layout(tiny_2b):
    model = family_for(tiny_2b).load(LORA, torch.float32, gradient_checkpointing=False, seed=0)
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
    a = family_for(tiny_5b).load(LORA, torch.bfloat16, gradient_checkpointing=True, seed=3)
    b = family_for(tiny_5b).load(LORA, torch.bfloat16, gradient_checkpointing=True, seed=3)
    trainable = a.lora_parameters()
    assert trainable and all("lora_" in name for name in trainable)
    assert len(trainable) == 2 * 4 * 2  # A and B for 4 targets in 2 blocks
    assert sum(p.requires_grad for p in a.parameters()) == len(trainable)
    assert all(torch.equal(p, b.lora_parameters()[n]) for n, p in trainable.items())  # same on every rank
    assert a.transformer.is_gradient_checkpointing
    assert a.transformer.peft_config["default"].lora_alpha == 8


def test_unknown_lora_target_names_the_field(tiny_5b):
    family = family_for(tiny_5b)
    family.check_lora_targets(["to_q", "ff.net.2", "attn1.to_out.0"])
    with pytest.raises(UserError, match=r"lora.target_modules: \['to_qq'\] match no module"):
        family.check_lora_targets(["to_q", "to_qq"])


def test_model_dir_problems_name_model_path(tmp_path, tiny_5b):
    with pytest.raises(UserError, match="model.path: no such directory"):
        resolve_model_dir(str(tmp_path / "absent"))
    partial = tmp_path / "partial"
    shutil.copytree(tiny_5b / "transformer", partial / "transformer")
    with pytest.raises(UserError, match="missing scheduler/scheduler_config.json"):
        resolve_model_dir(str(partial))
    assert resolve_model_dir(str(tiny_5b)) == tiny_5b


def test_an_image_to_video_transformer_wants_first_frames_and_twice_the_channels(tmp_path, tiny_5b):
    """in_channels = 2 x out_channels is image-to-video: samples of out_channels latents that carry their first
    frame (8 pixels per latent side). Any other mismatch of in and out is refused, naming the config."""
    i2v = tmp_path / "i2v"
    shutil.copytree(tiny_5b, i2v)
    config_path = i2v / "transformer" / "config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "in_channels": 8}))
    family = family_for(i2v)
    shapes = family.sample_shapes()
    assert family.image_to_video and "image-to-video" in family.describe()
    assert shapes.latent_channels == 4 and shapes.image_shape((4, 3, 12, 16)) == (3, 96, 128)
    assert family_for(tiny_5b).sample_shapes().image_shape((4, 3, 12, 16)) is None
    config_path.write_text(json.dumps({**config, "in_channels": 6}))
    with pytest.raises(UserError, match=r"in_channels 6 and out_channels 4: an image-to-video CogVideoX has twice"):
        family_for(i2v).sample_shapes()


def test_shapes_check_names_shard_key_and_mismatch(tiny_5b):
    shapes = family_for(tiny_5b).sample_shapes()
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


def test_the_registry_picks_the_family_the_directory_names(tmp_path, tiny_5b, tiny_2b):
    assert isinstance(load_family(str(tiny_5b)), CogVideoX)
    assert family_for(tiny_5b).describe() == "CogVideoX 1.0 text-to-video, 3D RoPE"
    assert family_for(tiny_2b).describe() == "CogVideoX 1.0 text-to-video, sin-cos positions"
    config = json.loads((tiny_5b / "transformer" / "config.json").read_text())
    assert CogVideoX.from_config({**config, "patch_size_t": 2}).describe() == "CogVideoX 1.5 text-to-video, 3D RoPE"
    # a transformer config without _class_name: model_index.json names the class
    bare = tmp_path / "bare"
    shutil.copytree(tiny_5b, bare)
    unnamed = {k: v for k, v in config.items() if k != "_class_name"}
    (bare / "transformer" / "config.json").write_text(json.dumps(unnamed))
    assert isinstance(family_for(bare), CogVideoX)
    (bare / "model_index.json").unlink()
    with pytest.raises(UserError, match=r"names the transformer class None; this trainer knows "
                                        r"CogVideoXTransformer3DModel"):
        family_for(bare)
    other = tmp_path / "other"
    shutil.copytree(tiny_5b, other)
    (other / "transformer" / "config.json").write_text(json.dumps({**config, "_class_name": "MochiTransformer3DModel"}))
    with pytest.raises(UserError, match=r"model.path: .*config.json names the transformer class "
                                        r"'MochiTransformer3DModel'"):
        load_family(str(other))


def test_one_skeleton_builder_gives_the_loaded_transformers_structure_without_memory(tiny_5b):
    family = family_for(tiny_5b)
    skeleton = family.transformer_from_config("meta", LORA)
    assert all(p.is_meta for p in skeleton.parameters())
    loaded = family.load(LORA, torch.float32, gradient_checkpointing=False, seed=0).transformer
    assert [(n, p.shape, p.requires_grad) for n, p in skeleton.named_parameters()] == [
        (n, p.shape, p.requires_grad) for n, p in loaded.named_parameters()]
    assert sum(p.requires_grad for p in skeleton.parameters()) == 2 * 4 * 2


def test_the_model_decides_the_clip_and_refuses_clips_off_its_rule(tiny_5b, tiny_15):
    family = family_for(tiny_5b)
    native = family.native_clip()  # the tiny models' base grid is 12 x 16 latents: 96x128
    assert (native.frames, native.height, native.width, native.fps, native.frame_multiple) == (9, 96, 128, 8, 8)
    assert family.latent_shape(49, 480, 720, str) == (4, 13, 60, 90)  # the VAE's 4x time, 8x space
    for frames in (48, 13):  # 13 is 4k+1, which the VAE makes, but off 1.0's 8k+1
        with pytest.raises(UserError, match=rf"^--frames: {frames} frames is off CogVideoX 1.0's frame rule 8k\+1 "
                                            r"\(its model card; the VAE compresses time 4x\), for example"):
            family.latent_shape(frames, 96, 128, lambda name: "--frames")
    with pytest.raises(UserError, match=r"^height: 100 is not a multiple of 16 \(the VAE's 8x compression times "
                                        r"the transformer's patch size 2\)"):
        family.latent_shape(49, 100, 128, str)
    assert family.latent_shape(9, 480, 960, str) == (4, 3, 60, 120)  # 1.0's RoPE crops: any size beyond the grid

    family = family_for(tiny_15)
    native = family.native_clip()
    assert (native.frames, native.height, native.width, native.fps, native.frame_multiple) == (17, 96, 128, 16, 16)
    assert family.latent_shape(17, 96, 128, str) == (4, 5, 12, 16)  # 5 latent frames: an odd number, padded to 6
    with pytest.raises(UserError, match=r"^num_frames: 25 frames is off CogVideoX 1.5's frame rule 16k\+1"):
        family.latent_shape(25, 96, 128, str)
    with pytest.raises(UserError, match=r"^height: 112 is beyond the transformer's rotary position table "
                                        r"\(sample_height 12 latents = 96 pixels"):
        family.latent_shape(17, 112, 128, str)


def test_a_hub_id_resolves_from_the_cache_under_the_per_node_lock(tiny_5b, tmp_path, monkeypatch):
    """No hub here: the cache holds the snapshot (as a first rank's download leaves it) and the hub is offline;
    the id resolves through snapshot_download under the node's lock, with the files the trainer needs."""
    from huggingface_hub import constants

    snapshot = tmp_path / "hub" / "models--org--tiny" / "snapshots" / ("0" * 40)
    shutil.copytree(tiny_5b, snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    resolved = resolve_model_dir("org/tiny", sampling=True)
    assert resolved == snapshot and (resolved / "transformer" / "config.json").is_file()
    assert (tmp_path / "hub" / ".trainer-org--tiny.lock").exists()
    assert family_for(resolved).sample_shapes().prompt_shape == family_for(tiny_5b).sample_shapes().prompt_shape
