"""The LoRA-adapted CogVideoX transformer, as the trainer calls it. No deepspeed here: the engine wraps it.

``VideoTransformer`` takes latents in the shard layout [B, C, F, H, W], adds the 3D rotary embedding the
diffusers pipeline would build for that latent grid (cached per shape), and returns v̂ in the same layout.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from trainer.errors import UserError
from trainer.rng import LORA_INIT, derive_seed
from trainer.shard_format import ShardError
from trainer.spec import LoraSection

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# What the trainer needs from a model directory; validation and packing load more.
REQUIRED_FILES = ("transformer/config.json", "scheduler/scheduler_config.json")


def resolve_model_dir(path: str, sampling: bool = False, weights: bool = True) -> Path:
    """A local CogVideoX directory, or a hub id fetched into the HF cache: the transformer and scheduler, and
    with ``sampling`` (validation videos) the VAE, tokenizer and text encoder too; without ``weights`` (the
    planner) only the configs."""
    local = Path(path).expanduser()
    if local.exists():
        missing = [f for f in REQUIRED_FILES if not (local / f).is_file()]
        if missing:
            raise UserError(f"model.path: {local} is not a diffusers CogVideoX directory (missing {', '.join(missing)})")
        return local
    if not _HUB_ID.match(path):
        raise UserError(f"model.path: no such directory: {local}")
    try:
        from huggingface_hub import snapshot_download

        parts = ["vae/*", "tokenizer/*", "text_encoder/*"] if sampling else ["vae/config.json"]  # the latent scale
        transformer = "transformer/*" if weights else "transformer/config.json"
        fetched = snapshot_download(path, allow_patterns=["model_index.json", transformer, "scheduler/*", *parts])
    except Exception as exc:  # network, auth, missing repo: all end the same way for the user
        raise UserError(f"model.path: {path!r} is not a local directory and could not be fetched from the hub ({exc})")
    return resolve_model_dir(fetched, sampling, weights)


def read_transformer_config(model_dir: Path) -> dict:
    return json.loads((model_dir / "transformer" / "config.json").read_text())


@dataclass(frozen=True)
class ModelShapes:
    """What every sample must fit, read from transformer/config.json before any weights are loaded."""

    latent_channels: int
    text_len: int
    text_dim: int
    patch_size: int
    source: str

    @classmethod
    def from_model_dir(cls, model_dir: Path) -> ModelShapes:
        cfg = read_transformer_config(model_dir)
        source = str(model_dir / "transformer" / "config.json")
        if cfg.get("in_channels") != cfg.get("out_channels"):
            raise UserError(
                f"model.path: {source} has in_channels {cfg.get('in_channels')} != out_channels "
                f"{cfg.get('out_channels')}: an image-to-video transformer; this trainer fine-tunes text-to-video models"
            )
        return cls(cfg["in_channels"], cfg["max_text_seq_length"], cfg["text_embed_dim"], cfg["patch_size"], source)

    def check(self, shard: str, key: str, latents: tuple[int, ...], prompt_embeds: tuple[int, ...]) -> None:
        """Raise a ShardError naming shard and key if a sample of these shapes cannot train this model."""
        if len(latents) != 4:
            raise ShardError(shard, key, f"latents have shape {list(latents)}, expected [C, F, H, W]")
        c, _, h, w = latents
        if c != self.latent_channels:
            raise ShardError(shard, key, f"latents have {c} channels but the model ({self.source}) "
                             f"expects in_channels={self.latent_channels}: were they encoded with this model's VAE?")
        if h % self.patch_size or w % self.patch_size:
            raise ShardError(shard, key, f"latent height x width {h}x{w} is not divisible by the "
                             f"model's patch_size {self.patch_size}")
        expected = (self.text_len, self.text_dim)
        if tuple(prompt_embeds) != expected:
            raise ShardError(shard, key, f"prompt embeddings are {list(prompt_embeds)} but the model "
                             f"({self.source}) expects {list(expected)} (max_text_seq_length, text_embed_dim)")


def lora_config(section: LoraSection):
    from peft import LoraConfig

    return LoraConfig(
        r=section.rank,
        lora_alpha=section.scale_alpha,
        lora_dropout=section.dropout,
        target_modules=list(section.target_modules),
        init_lora_weights=True if section.init == "default" else "gaussian",
    )


def check_lora_targets(model_dir: Path, targets: list[str]) -> None:
    """Check the LoRA targets against a weightless copy of the transformer (meta device: no memory, no I/O).

    peft matches a target by the module name or its dotted suffix; say which target matched nothing.
    """
    from diffusers import CogVideoXTransformer3DModel

    with torch.device("meta"):
        skeleton = CogVideoXTransformer3DModel.from_config(read_transformer_config(model_dir))
    names = [name for name, _ in skeleton.named_modules()]
    unmatched = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if unmatched:
        examples = sorted({n.split(".", 2)[-1] for n in names if n.startswith("transformer_blocks.0.")})[:12]
        raise UserError(f"lora.target_modules: {unmatched} match no module of the transformer "
                        f"(modules of a block include {examples})")


class VideoTransformer(nn.Module):
    def __init__(self, transformer: nn.Module):
        super().__init__()
        self.transformer = transformer
        self._rope_cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    @classmethod
    def from_pretrained(cls, model_dir: Path, lora: LoraSection, dtype: torch.dtype, gradient_checkpointing: bool,
                        seed: int) -> VideoTransformer:
        from diffusers import CogVideoXTransformer3DModel

        transformer = CogVideoXTransformer3DModel.from_pretrained(model_dir, subfolder="transformer", dtype=dtype)
        return cls.from_transformer(transformer, lora, gradient_checkpointing, seed)

    @classmethod
    def from_transformer(cls, transformer: nn.Module, lora: LoraSection, gradient_checkpointing: bool,
                         seed: int) -> VideoTransformer:
        """Freeze a loaded transformer and add the LoRA (the GPU benchmark's random-weight models come here)."""
        transformer.requires_grad_(False)
        # Same LoRA init on every rank: ZeRO-3 partitions each rank's own copy without a broadcast.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(seed, LORA_INIT))
            transformer.add_adapter(lora_config(lora))
        if gradient_checkpointing:
            transformer.enable_gradient_checkpointing()
        return cls(transformer)

    @property
    def config(self):
        return self.transformer.config

    def pad_frames(self, latents: torch.Tensor) -> torch.Tensor:
        """CogVideoX 1.5 patches time in pairs: repeat the first latent frame at the front to a multiple of it."""
        p_t = self.config.patch_size_t
        frames = latents.shape[2]
        if p_t is None or frames % p_t == 0:
            return latents
        pad = p_t - frames % p_t
        return torch.cat([latents[:, :, :1].expand(-1, -1, pad, -1, -1), latents], dim=2)

    def video_tokens(self, frames: int, height: int, width: int) -> int:
        """Transformer tokens of a latent video (CogVideoX 1.5 pads the frames to a multiple of patch_size_t)."""
        p, p_t = self.config.patch_size, self.config.patch_size_t or 1
        return -(-frames // p_t) * (height // p) * (width // p)

    def rotary_embedding(self, frames: int, height: int, width: int, device: torch.device):
        """The (cos, sin) pair CogVideoXPipeline._prepare_rotary_positional_embeddings builds for this latent grid."""
        cfg = self.config
        if not cfg.use_rotary_positional_embeddings:
            return None
        key = (frames, height, width, str(device))
        if key not in self._rope_cache:
            from diffusers.models.embeddings import get_3d_rotary_pos_embed
            from diffusers.pipelines.cogvideo.pipeline_cogvideox import get_resize_crop_region_for_grid

            p, p_t = cfg.patch_size, cfg.patch_size_t
            grid = (height // p, width // p)
            base_h, base_w = cfg.sample_height // p, cfg.sample_width // p
            if p_t is None:  # CogVideoX 1.0: crop coordinates relative to the model's base grid
                self._rope_cache[key] = get_3d_rotary_pos_embed(
                    embed_dim=cfg.attention_head_dim, crops_coords=get_resize_crop_region_for_grid(grid, base_w, base_h),
                    grid_size=grid, temporal_size=frames, device=device)
            else:  # CogVideoX 1.5
                self._rope_cache[key] = get_3d_rotary_pos_embed(
                    embed_dim=cfg.attention_head_dim, crops_coords=None, grid_size=grid,
                    temporal_size=(frames + p_t - 1) // p_t, grid_type="slice", max_size=(base_h, base_w), device=device)
        return self._rope_cache[key]

    def forward(self, latents: torch.Tensor, prompt_embeds: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """latents [B, C, F, H, W] (noisy), prompt_embeds [B, L, D], timesteps [B] -> v̂ [B, C, F, H, W]."""
        _, _, frames, height, width = latents.shape
        rope = self.rotary_embedding(frames, height, width, latents.device)
        out = self.transformer(hidden_states=latents.transpose(1, 2), encoder_hidden_states=prompt_embeds,
                               timestep=timesteps, image_rotary_emb=rope, return_dict=False)[0]
        return out.transpose(1, 2)

    def lora_parameters(self) -> dict[str, nn.Parameter]:
        """The trainable LoRA parameters, named as in the bare transformer (peft names, with the adapter name)."""
        return {name: p for name, p in self.transformer.named_parameters() if p.requires_grad}
