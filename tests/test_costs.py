"""The planner's figures: hand-checked CogVideoX-5B values, and FLOPs and activations traced from diffusers."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from trainer.costs import CostModel
from trainer.errors import UserError
from trainer.families import family_for
from trainer.families.base import lora_config
from trainer.families.cogvideox import CogVideoX, CogVideoXModel
from trainer.planner import latent_shapes
from trainer.spec import LoraSection, RunSpec

# THUDM/CogVideoX-5b transformer/config.json
COGVIDEOX_5B = dict(
    activation_fn="gelu-approximate", attention_bias=True, attention_head_dim=64, dropout=0.0, flip_sin_to_cos=True,
    freq_shift=0, in_channels=16, max_text_seq_length=226, norm_elementwise_affine=True, norm_eps=1e-5,
    num_attention_heads=48, num_layers=42, out_channels=16, patch_size=2, sample_frames=49, sample_height=60,
    sample_width=90, spatial_interpolation_scale=1.875, temporal_compression_ratio=4, temporal_interpolation_scale=1.0,
    text_embed_dim=4096, time_embed_dim=512, timestep_activation_fn="silu", use_learned_positional_embeddings=False,
    use_rotary_positional_embeddings=True)
ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]


def test_cogvideox_5b_hand_checked_values():
    costs = CostModel(CogVideoX.from_config(COGVIDEOX_5B), LoraSection(rank=128, target_modules=ATTENTION))
    assert costs.params_frozen == 5_570_283_072
    assert costs.params_lora == 132_120_576  # 42 blocks x 4 projections x 128 x (3072 + 3072)
    latents = (16, 13, 60, 90)  # 49x480x720 through the VAE's 4x temporal and 8x spatial compression
    assert costs.video_tokens(latents) == 17_550
    flops = costs.flops(latents)
    seq, hidden = 17_550 + 226, 3072
    assert flops.attention_forward == 42 * 4 * seq * seq * hidden
    # a block: q, k, v, out (hidden x hidden), the 4x feed-forward and four rank-128 LoRAs, over every token
    block = 24 * seq * hidden**2 + 4 * seq**2 * hidden + 4 * 2 * seq * 128 * 2 * hidden
    assert flops.forward == pytest.approx(42 * block, rel=0.001)  # the embeddings and proj_out add the rest
    assert 0.3 < flops.attention_share < 0.5
    # backward: one matmul per frozen linear (no weight gradients), two per attention matmul
    assert flops.train == pytest.approx(2 * flops.forward + flops.attention_forward, rel=0.01)
    assert flops.train_checkpointed == pytest.approx(flops.train + flops.forward, rel=0.01)


def small_config(rope: bool) -> dict:
    return dict(COGVIDEOX_5B, num_attention_heads=4, attention_head_dim=32, num_layers=3, text_embed_dim=64,
                time_embed_dim=32, in_channels=8, out_channels=8, sample_frames=9, sample_height=16, sample_width=24,
                use_rotary_positional_embeddings=rope)


def small_model(cfg: dict, lora: LoraSection, dtype: torch.dtype, checkpointing: bool) -> CogVideoXModel:
    from diffusers import CogVideoXTransformer3DModel

    torch.manual_seed(0)
    transformer = CogVideoXTransformer3DModel.from_config(cfg).to(dtype)
    transformer.requires_grad_(False)
    transformer.add_adapter(lora_config(lora))
    for p in transformer.parameters():
        p.data = p.data.to(dtype)
    if checkpointing:
        transformer.enable_gradient_checkpointing()
    return CogVideoXModel(transformer)


def inputs(cfg: dict, latents: tuple[int, ...], dtype: torch.dtype):
    return (torch.randn(1, *latents, dtype=dtype), torch.randn(1, cfg["max_text_seq_length"], cfg["text_embed_dim"],
                                                               dtype=dtype), torch.tensor([500]))


@pytest.mark.parametrize("targets", [ATTENTION, ["to_out.0", "ff.net.2"], ATTENTION + ["ff.net.0.proj", "ff.net.2"]])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_flops_equal_what_torch_counts(targets, checkpointing):
    cfg, latents = small_config(rope=True), (8, 3, 16, 24)
    lora = LoraSection(rank=8, target_modules=targets)
    model = small_model(cfg, lora, torch.float32, checkpointing)
    x, text, t = inputs(cfg, latents, torch.float32)
    model(x, text, t)  # RoPE cached outside the count
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:  # attention as counted matmuls
        out = model(x, text, t)
        forward = counter.get_total_flops()
        out.square().mean().backward()
    flops = CostModel(CogVideoX.from_config(cfg), lora).flops(latents)
    assert flops.forward == forward
    assert (flops.train_checkpointed if checkpointing else flops.train) == counter.get_total_flops()


@pytest.mark.parametrize("rope", [True, False])
@pytest.mark.parametrize("lora", [LoraSection(rank=8, target_modules=ATTENTION),
                                  LoraSection(rank=16, dropout=0.1, target_modules=ATTENTION + ["ff.net.2"])])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_activation_estimate_matches_what_autograd_keeps(rope, lora, checkpointing):
    cfg, latents = small_config(rope), (8, 5, 32, 48)
    model = small_model(cfg, lora, torch.bfloat16, checkpointing)
    x, text, t = inputs(cfg, latents, torch.bfloat16)
    model(x, text, t)
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()} | {
        b.untyped_storage().data_ptr() for b in model.buffers()}
    kept: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            kept[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(x, text, t)
    costs = CostModel(CogVideoX.from_config(cfg), lora)
    assert costs.saved_activation_bytes(latents, 2, checkpointing) == pytest.approx(sum(kept.values()), rel=0.05)


def test_planned_clip_sizes_are_checked_against_the_patch_grid(tiny_5b):
    """A fix found on the way: --video sides used to be checked against the VAE's 8x alone, so 104 pixels (13
    latent rows, which the transformer's 2x2 patches cannot cover) was planned for; it is refused like training
    refuses it."""
    spec = RunSpec.model_validate({"model": {"path": str(tiny_5b)}, "data": {"shards": "x"}, "train": {"max_steps": 1}})
    family = family_for(tiny_5b)
    assert latent_shapes(spec, family, ["9x96x128"]) == Counter({(4, 3, 12, 16): 1})
    with pytest.raises(UserError, match=r"^--video 9x104x128: 104 is not a multiple of 16"):
        latent_shapes(spec, family, ["9x104x128"])
