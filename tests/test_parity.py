"""Parity with inference: what the trainer feeds the transformer for a packed sample is what CogVideoXPipeline
feeds it at a denoising step of the same latent grid, for CogVideoX 1.0 (5B-style) and 1.5. A wrong grid, a
missing or misplaced 1.5 padding frame, another RoPE, timestep or prompt encoding fails here, before anyone trains.

Both sides call the same transformer, and a forward pre-hook records its keyword arguments. The trainer's side
is trainer/loop.py's own ``sample_losses`` on the shard's sample at t = 999. The pipeline's side is one DDIM step
(trailing spacing: t = 999) at the clip's pixel size. It is given the prompt as text, which its own T5 encodes,
and it starts from the trainer's noisy latents. A second pipeline call from its own noise checks the grid it
would make itself.

A text-to-video pipeline never sees clean latents, and ᾱ(999) = 0 on this zero-terminal-SNR schedule. So the
latent content is checked along the chain instead. The packed latents are the VAE's posterior sample times its
scaling factor (tests/test_packing.py). x0 is those latents, with the first frame repeated in front for 1.5
(here). At an interior timestep of the pipeline's schedule, the trainer's input is the scheduler's own
``add_noise`` of x0 (here)."""

from __future__ import annotations

import pytest
import torch
from diffusers import CogVideoXImageToVideoPipeline, CogVideoXPipeline
from PIL import Image

from trainer.families import family_for
from trainer.families.cogvideox_i2v import to_pixels
from trainer.loop import sample_losses
from trainer.shard_format import shard_samples


def recorded(transformer: torch.nn.Module) -> tuple[list[dict], torch.utils.hooks.RemovableHandle]:
    calls: list[dict] = []
    handle = transformer.register_forward_pre_hook(lambda _m, _args, kwargs: calls.append(dict(kwargs)),
                                                   with_kwargs=True)
    return calls, handle


@pytest.mark.parametrize("flavour", ["5b", "1.5"])
@torch.no_grad()
def test_the_trainer_feeds_the_transformer_what_the_pipeline_does(flavour, request):
    model_dir = request.getfixturevalue({"5b": "tiny_5b", "1.5": "tiny_15"}[flavour])
    shards = request.getfixturevalue({"5b": "packed_5b", "1.5": "packed_15"}[flavour])
    sample = next(shard_samples(str(sorted(shards.glob("*.tar"))[0])))
    family = family_for(model_dir)
    pipe = CogVideoXPipeline.from_pretrained(model_dir, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    model = family.wrap(pipe.transformer)  # the trainer's wrapper around the very same transformer
    calls, handle = recorded(pipe.transformer)

    t = torch.tensor([999])
    x0, _ = sample_losses(model, model, family.objective(), sample.latents[None], sample.prompt_embeds[None], t,
                          torch.Generator().manual_seed(0), torch.float32)
    ours = calls.pop()
    frames, height, width = (sample.meta[k] for k in ("num_frames", "height", "width"))
    latent_frames = sample.latents.shape[1]
    if flavour == "1.5":  # 17 frames -> 5 latent frames, padded in front with a copy of the first to 6
        assert latent_frames == 5 and x0.shape[2] == 6
        assert torch.equal(x0[:, :, 0], x0[:, :, 1]) and torch.equal(x0[:, :, 1:], sample.latents[None].float())
    else:
        assert x0.shape[2] == latent_frames == 3

    pipe(prompt=sample.meta["caption"], num_frames=frames, height=height, width=width, num_inference_steps=1,
         guidance_scale=1.0, latents=ours["hidden_states"], output_type="latent",
         max_sequence_length=pipe.transformer.config.max_text_seq_length)
    pipe(prompt=sample.meta["caption"], num_frames=frames, height=height, width=width, num_inference_steps=1,
         guidance_scale=1.0, generator=torch.Generator().manual_seed(1), output_type="latent",
         max_sequence_length=pipe.transformer.config.max_text_seq_length)
    handle.remove()
    theirs, own_noise = calls
    assert {k for k, v in theirs.items() if v is not None} == {k for k, v in ours.items() if v is not None}
    assert own_noise["hidden_states"].shape == ours["hidden_states"].shape  # the same latent grid, padding included
    assert torch.equal(theirs["hidden_states"], ours["hidden_states"])  # [B, F, C, H, W]; DDIM does not rescale
    assert torch.equal(theirs["timestep"], ours["timestep"]) and theirs["timestep"].dtype == ours["timestep"].dtype
    # the packed prompt embedding is the pipeline's own encoding of the caption, stored in bf16
    assert theirs["encoder_hidden_states"].shape == ours["encoder_hidden_states"].shape
    assert torch.equal(theirs["encoder_hidden_states"].to(torch.bfloat16).float(), ours["encoder_hidden_states"])
    ours_rope, their_rope = ours["image_rotary_emb"], theirs["image_rotary_emb"]
    assert their_rope is not None and ours_rope is not None  # both flavours use 3D RoPE
    assert torch.equal(ours_rope[0], their_rope[0]) and torch.equal(ours_rope[1], their_rope[1])
    assert ours_rope[0].shape[0] == model.video_tokens(*x0.shape[2:])  # one position per video token
    assert theirs["return_dict"] is False and ours["return_dict"] is False

    pipe.scheduler.set_timesteps(2)  # trailing spacing: 999, then 499
    middle = pipe.scheduler.timesteps[1:]
    assert middle.tolist() == [499]
    calls, handle = recorded(pipe.transformer)
    sample_losses(model, model, family.objective(), sample.latents[None], sample.prompt_embeds[None], middle,
                  torch.Generator().manual_seed(0), torch.float32)
    handle.remove()
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))  # sample_losses' first draw
    expected = pipe.scheduler.add_noise(x0, noise, middle).transpose(1, 2)
    torch.testing.assert_close(calls[0]["hidden_states"], expected, rtol=1e-6, atol=1e-6)
    assert (calls[0]["hidden_states"] - ours["hidden_states"]).abs().mean() > 0.1  # x0 shows at t = 499


@pytest.mark.parametrize("flavour", ["5b-i2v", "1.5-i2v"])
@torch.no_grad()
def test_image_to_video_inputs_are_the_i2v_pipelines(flavour, request):
    """The same for CogVideoXImageToVideoPipeline, given the packed sample's first frame as a picture: the channel
    concatenation, the image latents' scale (5B-I2V multiplies by the VAE's scaling factor, 1.5-I2V divides),
    their place in the (1.5: padded) frames, RoPE, ofs (1.5-I2V) and the timestep, with the conditioning encoded
    as the pipeline encodes it (no training noise; the posterior drawn from the same generator)."""
    model_dir = request.getfixturevalue({"5b-i2v": "tiny_5b_i2v", "1.5-i2v": "tiny_15_i2v"}[flavour])
    shards = request.getfixturevalue({"5b-i2v": "packed_5b_i2v", "1.5-i2v": "packed_15_i2v"}[flavour])
    sample = next(shard_samples(str(sorted(shards.glob("*.tar"))[0])))
    assert sample.image is not None and sample.image.dtype == torch.uint8
    assert list(sample.image.shape) == [3, sample.meta["height"], sample.meta["width"]]
    family = family_for(model_dir)
    pipe = CogVideoXImageToVideoPipeline.from_pretrained(model_dir, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    model = family.wrap(pipe.transformer)
    conditioner = family.image_conditioner(torch.device("cpu"), torch.float32, dropout=0.0)
    assert conditioner is not None
    image_latents = conditioner.clean(sample.image[None], torch.Generator().manual_seed(3), torch.float32)
    calls, handle = recorded(pipe.transformer)
    x0, _ = sample_losses(model, model, family.objective(), sample.latents[None], sample.prompt_embeds[None],
                          torch.tensor([999]), torch.Generator().manual_seed(0), torch.float32, image_latents)
    ours = calls.pop()
    channels = x0.shape[1]
    picture = Image.fromarray(sample.image.permute(1, 2, 0).numpy())
    pipe(image=picture, prompt=sample.meta["caption"], num_frames=sample.meta["num_frames"],
         height=sample.meta["height"], width=sample.meta["width"], num_inference_steps=1, guidance_scale=1.0,
         latents=ours["hidden_states"][:, :, :channels], generator=torch.Generator().manual_seed(3),
         output_type="latent", max_sequence_length=pipe.transformer.config.max_text_seq_length)
    handle.remove()
    (theirs,) = calls
    assert {k for k, v in theirs.items() if v is not None} == {k for k, v in ours.items() if v is not None}
    assert ours["hidden_states"].shape[2] == 2 * channels == pipe.transformer.config.in_channels
    assert torch.equal(theirs["hidden_states"], ours["hidden_states"])  # video and image latents, every frame
    conditioning = ours["hidden_states"][:, :, channels:]  # [B, F, C, H, W]: the image's latent frame, then zeros
    assert conditioning.shape[1] == x0.shape[2] == (6 if flavour == "1.5-i2v" else 3)
    assert conditioning[:, 0].abs().mean() > 0.1 and not conditioning[:, 1:].any()
    scale = pipe.vae.config.scaling_factor
    posterior = pipe.vae.encode(to_pixels(sample.image[None], torch.device("cpu"))[:, :, None]).latent_dist.sample(
        torch.Generator().manual_seed(3))
    expected = posterior / scale if flavour == "1.5-i2v" else posterior * scale  # invert_scale_latents on 1.5
    torch.testing.assert_close(conditioning[:, :1].transpose(1, 2), expected, rtol=1e-6, atol=1e-6)
    assert torch.equal(theirs["timestep"], ours["timestep"])
    for ours_part, their_part in zip(ours["image_rotary_emb"], theirs["image_rotary_emb"], strict=True):
        assert torch.equal(ours_part, their_part)
    if flavour == "1.5-i2v":
        assert torch.equal(ours["ofs"], theirs["ofs"]) and ours["ofs"].tolist() == [2.0]
    else:
        assert "ofs" not in ours and theirs["ofs"] is None
    assert torch.equal(theirs["encoder_hidden_states"].to(torch.bfloat16).float(), ours["encoder_hidden_states"])
