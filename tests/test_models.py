"""The published CogVideoX-2b, CogVideoX-5b, CogVideoX1.5-5B, CogVideoX-5b-I2V and CogVideoX1.5-5B-I2V
configurations (tests/configs/, values only; see SOURCES.md there), on the meta device: the native clip and its
rule, the planner's parameters, tokens and FLOPs against counts by hand, the LoRA target check, and the rotary
embedding against the pipeline's own. The shipped example specs plan against them too."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass

import pytest
import torch
from diffusers import AutoencoderKLCogVideoX, CogVideoXDDIMScheduler, CogVideoXPipeline

from helpers import REPO, run_python
from trainer.costs import CostModel
from trainer.errors import UserError
from trainer.families import load_family
from trainer.spec import LoraSection

CONFIGS = REPO / "tests" / "configs"
ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]
LORA = LoraSection(rank=128, target_modules=ATTENTION)


@dataclass(frozen=True)
class Expected:
    native: tuple[int, int, int, int]  # frames, height, width, fps
    latents: tuple[int, int, int, int]  # of the native clip
    tokens: int  # video tokens of the native clip
    params: int  # the frozen transformer
    rope: bool


EXPECTED = {
    # 49x480x720 -> latents 13x60x90 -> 13 x 30 x 45 patches
    "cogvideox-2b": Expected((49, 480, 720, 8), (16, 13, 60, 90), 13 * 30 * 45, 1_693_783_872, rope=False),
    "cogvideox-5b": Expected((49, 480, 720, 8), (16, 13, 60, 90), 13 * 30 * 45, 5_570_283_072, rope=True),
    # 81x768x1360 -> latents 21x96x170; 21 frames padded to 22, patched in pairs: 11 x 48 x 85 = 44,880
    "cogvideox1.5-5b": Expected((81, 768, 1360, 16), (16, 21, 96, 170), 44_880, 5_570_676_352, rope=True),
    # image-to-video: the patch embedding reads 32 channels (+ 16 x 2 x 2 x 3072), 1.5-I2V patches time in pairs
    # (x 2) and adds its ofs embedding (two 512 x 512 linears with biases)
    "cogvideox-5b-i2v": Expected((49, 480, 720, 8), (16, 13, 60, 90), 13 * 30 * 45, 5_570_283_072 + 196_608,
                                 rope=True),
    "cogvideox1.5-5b-i2v": Expected((81, 768, 1360, 16), (16, 21, 96, 170), 44_880,
                                    5_570_676_352 + 393_216 + 525_312, rope=True),
}


def hand_parameters(c: dict) -> int:
    """CogVideoXTransformer3DModel's parameters, counted from the config by hand."""
    h, t, p, pt = c["num_attention_heads"] * c["attention_head_dim"], c["time_embed_dim"], c["patch_size"], 1
    if c.get("patch_size_t"):  # 1.5 patches time in pairs with a Linear; diffusers gives it a bias despite
        pt = c["patch_size_t"]  # patch_bias false (which only applies to 1.0's Conv2d)
        patch = c["in_channels"] * p * p * pt * h + h
    else:
        patch = c["in_channels"] * p * p * h + (h if c.get("patch_bias", True) else 0)
    text = c["text_embed_dim"] * h + h
    time = (h * t + t) + (t * t + t)  # TimestepEmbedding: linear_1, linear_2
    norm_zero = t * 6 * h + 6 * h + 2 * h  # CogVideoXLayerNormZero: the conditioning linear and a LayerNorm
    attention = 4 * (h * h + h) + 2 * 2 * c["attention_head_dim"]  # q, k, v, out; the q and k LayerNorms
    ff = (h * 4 * h + 4 * h) + (4 * h * h + h)
    block = 2 * norm_zero + attention + ff
    out = 2 * h + (t * 2 * h + 2 * h + 2 * h) + (h * p * p * pt * c["out_channels"] + p * p * pt * c["out_channels"])
    o = c.get("ofs_embed_dim") or 0  # 1.5-I2V: a second TimestepEmbedding, for ofs
    ofs = 2 * (o * o + o)
    return patch + text + time + ofs + c["num_layers"] * block + out  # norm_final, norm_out, proj_out


def hand_forward_flops(c: dict, video: int, text: int, rank: int) -> int:
    """Forward FLOPs per sample (2 per multiply-add) of the linears and attention, LoRA on q, k, v and out."""
    h, t, p = c["num_attention_heads"] * c["attention_head_dim"], c["time_embed_dim"], c["patch_size"]
    pt, seq = c.get("patch_size_t") or 1, video + text
    block = (2 * 4 * h * h * seq  # q, k, v, out over every token
             + 2 * 2 * 4 * h * h * seq  # the 4x feed-forward
             + 4 * seq * seq * h  # QK^T and PV
             + 4 * 2 * 2 * rank * h * seq  # four LoRAs, A and B
             + 2 * 2 * t * 6 * h)  # norm1 and norm2's conditioning linears, once per sample
    outside = (2 * c["in_channels"] * p * p * pt * h * video + 2 * c["text_embed_dim"] * h * text
               + 2 * h * p * p * pt * c["out_channels"] * video + 2 * (h * t + t * t) + 2 * t * 2 * h
               + 2 * 2 * (c.get("ofs_embed_dim") or 0) ** 2)
    return c["num_layers"] * block + outside


def meta_pipeline(family) -> CogVideoXPipeline:
    """CogVideoXPipeline around weightless (meta) modules: its RoPE builder reads only their configs."""
    with torch.device("meta"):
        vae = AutoencoderKLCogVideoX.from_config(AutoencoderKLCogVideoX.load_config(family.model_dir / "vae"))
    scheduler = CogVideoXDDIMScheduler.from_pretrained(family.model_dir, subfolder="scheduler")
    return CogVideoXPipeline(tokenizer=None, text_encoder=None, vae=vae,  # type: ignore[arg-type]
                             transformer=family.transformer_from_config("meta"), scheduler=scheduler)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_published_configuration_on_the_meta_device(name):
    family, expected = load_family(str(CONFIGS / name), weights=False), EXPECTED[name]
    cfg = family.config
    native = family.native_clip()
    assert (native.frames, native.height, native.width, native.fps) == expected.native
    latents = family.latent_shape(native.frames, native.height, native.width, str)
    assert latents == expected.latents

    costs, hidden = CostModel(family, LORA), cfg["num_attention_heads"] * cfg["attention_head_dim"]
    assert costs.params_frozen == hand_parameters(cfg) == expected.params
    assert costs.params_lora == cfg["num_layers"] * 4 * 128 * 2 * hidden  # A and B of four projections
    assert costs.video_tokens(latents) == expected.tokens and costs.text_len == 226
    flops = costs.flops(latents)
    assert flops.forward == hand_forward_flops(cfg, expected.tokens, 226, 128)
    seq = expected.tokens + 226
    assert flops.attention_forward == cfg["num_layers"] * 4 * seq * seq * hidden
    # backward: one matmul per frozen linear (no weight gradients), two per attention matmul
    assert flops.train == pytest.approx(2 * flops.forward + flops.attention_forward, rel=0.01)
    assert flops.train_checkpointed == pytest.approx(flops.train + flops.forward, rel=0.01)

    family.check_lora_targets([*ATTENTION, "ff.net.0.proj", "ff.net.2", "proj_out"])
    with pytest.raises(UserError, match=r"lora.target_modules: \['to_qkv'\] match no module"):
        family.check_lora_targets(["to_qkv"])

    # what the trainer feeds the transformer for the native clip: padded latents, and the pipeline's RoPE
    model = family.wrap(family.transformer_from_config("meta"))
    x0 = model.prepare_latents(torch.empty(1, *latents, device="meta"))
    assert x0.shape[2] == (22 if name.startswith("cogvideox1.5-5b") else 13)
    assert model.video_tokens(*x0.shape[2:]) == expected.tokens
    rope = model.rotary_embedding(*x0.shape[2:], torch.device("cpu"))
    if not expected.rope:
        assert rope is None
        return
    assert rope[0].shape == rope[1].shape == (expected.tokens, cfg["attention_head_dim"])
    theirs = meta_pipeline(family)._prepare_rotary_positional_embeddings(
        native.height, native.width, x0.shape[2], torch.device("cpu"))
    assert torch.equal(rope[0], theirs[0]) and torch.equal(rope[1], theirs[1])
    pipe = meta_pipeline(family)
    if cfg.get("use_learned_positional_embeddings"):  # 5B-I2V: learned positions of 49x480x720 alone
        for frames, height, width, wrong in ((49, 480, 480, "width"), (25, 480, 720, "num_frames")):
            with pytest.raises(UserError, match=rf"^{wrong}: .* learned positional embedding .* covers only "
                                                rf"49x480x720"):
                family.latent_shape(frames, height, width, str)
        return
    for frames, height, width in ((49, 480, 480), (81, 320, 960), (17, 768, 1360)):  # other clips: other crops
        grid = model.prepare_latents(torch.empty(1, *family.latent_shape(frames, height, width, str),
                                                 device="meta")).shape[2:]
        ours = model.rotary_embedding(*grid, torch.device("cpu"))
        theirs = pipe._prepare_rotary_positional_embeddings(height, width, grid[0], torch.device("cpu"))
        assert torch.equal(ours[0], theirs[0]) and torch.equal(ours[1], theirs[1]), (frames, height, width)


def test_the_15_clip_rule_and_rope_do_not_depend_on_which_published_base_grid(tmp_path):
    """CogVideoX1.5-5B's transformer config has held sample_height x sample_width 300 x 300 and (by its hub
    history) 96 x 170: the native clip, the rule's messages and the RoPE at 81x768x1360 are the same with both."""
    other = tmp_path / "cogvideox1.5-5b"
    shutil.copytree(CONFIGS / "cogvideox1.5-5b", other)
    path = other / "transformer" / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "sample_height": 96, "sample_width": 170}))
    a, b = load_family(str(CONFIGS / "cogvideox1.5-5b"), weights=False), load_family(str(other), weights=False)
    assert str(a.native_clip()) == str(b.native_clip()) == "81x768x1360 at 16 fps"
    ropes = [f.wrap(f.transformer_from_config("meta")).rotary_embedding(22, 96, 170, torch.device("cpu"))
             for f in (a, b)]
    assert torch.equal(ropes[0][0], ropes[1][0]) and torch.equal(ropes[0][1], ropes[1][1])
    with pytest.raises(UserError, match=r"^--frames: 41 frames is off CogVideoX 1.5's frame rule 16k\+1"):
        a.latent_shape(41, 768, 1360, lambda name: "--frames")
    a.latent_shape(161, 768, 1360, str)  # 10 s: N = 10
    b.latent_shape(81, 768, 1360, str)
    with pytest.raises(UserError, match=r"--height: 1360 is beyond the transformer's rotary position table "
                                        r"\(sample_height 96 latents = 768 pixels"):
        b.latent_shape(81, 1360, 768, lambda name: f"--{name}")  # portrait: beyond this table


@pytest.mark.parametrize("example,model,ranks", [("cogvideox-2b-lora", "cogvideox-2b", 8),
                                                 ("cogvideox-5b-lora", "cogvideox-5b", 8),
                                                 ("cogvideox1.5-5b-lora", "cogvideox1.5-5b", 8),
                                                 ("cogvideox-5b-i2v-lora", "cogvideox-5b-i2v", 8),
                                                 ("cogvideox1.5-5b-i2v-lora", "cogvideox1.5-5b-i2v", 8)])
def test_shipped_examples_plan_against_the_published_configs(example, model, ranks):
    """launch/train.py --dry-run, as a user runs it before packing: the model's native clip when there are no
    shards yet, the spec's own ZeRO stage and checkpointing marked."""
    proc = run_python("launch/train.py", "--spec", f"examples/{example}.yaml", "--dry-run", "--ranks", str(ranks),
                      "--set", f"model.path={CONFIGS / model}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    expected = EXPECTED[model]
    frames, height, width, fps = expected.native
    assert f"planning for the model's native clip {frames}x{height}x{width}" in out
    assert f"{expected.tokens:,} video + 226 text tokens" in out
    assert f"{expected.params:,} frozen" in out
    assert "checkpointing on *" in out  # every shipped example checkpoints
    if model.endswith("-i2v"):  # what the memory table leaves out, said below it
        assert "the conditioning VAE encoder on every rank, 92,215,456 parameters (175.9 MiB in bf16)" in out


def test_the_planner_plans_the_native_clip_only_before_packing(tmp_path):
    """No shards yet: the native clip. Shards that should be there but are not (an empty folder): an error."""
    from trainer.planner import latent_shapes
    from trainer.spec import RunSpec

    family = load_family(str(CONFIGS / "cogvideox1.5-5b"), weights=False)
    spec = RunSpec.model_validate({"model": {"path": str(CONFIGS / "cogvideox1.5-5b")},
                                   "data": {"shards": str(tmp_path / "not-packed-yet")}, "train": {"max_steps": 1}})
    notes: list[str] = []
    assert latent_shapes(spec, family, [], notes.append) == {(16, 21, 96, 170): 1}
    assert "planning for the model's native clip 81x768x1360" in notes[0]
    (tmp_path / "empty").mkdir()
    empty = spec.model_copy(update={"data": spec.data.model_copy(update={"shards": str(tmp_path / "empty")})})
    with pytest.raises(UserError, match=r"data.shards: .* matches no .tar file"):
        latent_shapes(empty, family, [], notes.append)


@pytest.mark.parametrize("flavour,published", [("2b", "cogvideox-2b"), ("5b", "cogvideox-5b"),
                                               ("1.5", "cogvideox1.5-5b"), ("5b-i2v", "cogvideox-5b-i2v"),
                                               ("1.5-i2v", "cogvideox1.5-5b-i2v")])
def test_each_tiny_flavour_has_its_published_structure_and_settings(flavour, published, request):
    """Only sizes differ: widths, depths, the base grid and sample_frames (so that the native clip is small);
    in and out channels keep their ratio (2 for image-to-video), the ofs embedding its presence."""
    tiny = request.getfixturevalue({"2b": "tiny_2b", "5b": "tiny_5b", "1.5": "tiny_15", "5b-i2v": "tiny_5b_i2v",
                                    "1.5-i2v": "tiny_15_i2v"}[flavour])
    sizes = {"num_attention_heads", "attention_head_dim", "num_layers", "in_channels", "out_channels",
             "time_embed_dim", "text_embed_dim", "sample_frames", "sample_height", "sample_width", "ofs_embed_dim"}

    def read(root, part):
        return {k: v for k, v in json.loads((root / part).read_text()).items() if not k.startswith("_")}

    def transformer(root):  # every argument, the class's defaults where the file leaves one out
        config = load_family(str(root), weights=False).transformer_from_config("meta").config
        return {k: v for k, v in config.items() if not k.startswith("_")}

    ours, theirs = transformer(tiny), transformer(CONFIGS / published)
    assert ours.keys() == theirs.keys()
    assert {k: ours[k] for k in ours.keys() - sizes} == {k: theirs[k] for k in theirs.keys() - sizes}
    assert ours["in_channels"] / ours["out_channels"] == theirs["in_channels"] / theirs["out_channels"]
    assert (ours["ofs_embed_dim"] is None) == (theirs["ofs_embed_dim"] is None)
    assert ours["ofs_embed_dim"] in (None, ours["time_embed_dim"])  # diffusers adds it to the time embedding
    assert read(tiny, "scheduler/scheduler_config.json") == read(CONFIGS / published,
                                                                  "scheduler/scheduler_config.json")
    vae, their_vae = read(tiny, "vae/config.json"), read(CONFIGS / published, "vae/config.json")
    for key in ("scaling_factor", "invert_scale_latents", "temporal_compression_ratio"):
        assert vae[key] == their_vae[key], key
    assert len(vae["block_out_channels"]) == len(their_vae["block_out_channels"])  # the same 8x spatial
