"""CogVideoX, as one family whose variants are configuration read from the model directory.

    1.0 (CogVideoX-2b, -5b)   patch_size_t None; 2B sin-cos positions, 5B 3D RoPE with crop coordinates
                              relative to the model's base grid (sample_height/sample_width)
    1.5 (CogVideoX1.5-5B)     patch_size_t 2: latent frames padded in front to a multiple of it by repeating
                              the first (as CogVideo's finetune does; the padding is kept in the loss), RoPE
                              of grid type "slice"
    image-to-video            in_channels = 2 x out_channels: image latents concatenated on channels, 1.5-I2V
                              with an ofs embedding (ofs_embed_dim), 5B-I2V with learned positional embeddings
                              that fix its clip to sample_frames at the base grid; the conditioning is
                              cogvideox_i2v.py's, fed by ``CogVideoXModel.inputs``

The transformer sees latents [B, F, C, H, W] and prompt embeddings of T5; the trainer's layout is the shard's
[B, C, F, H, W]. Everything a CogVideoX directory brings beyond the transformer (its VAE, T5 and pipeline) is in
cogvideox_pipeline.py.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import trainer.families.cogvideox_pipeline as media
from trainer.diffusion import Objective
from trainer.errors import UserError
from trainer.families.base import (
    NativeClip,
    SampleSettings,
    SequenceExchange,
    TransformerStructure,
    VideoModel,
    attach_lora,
    lora_config,
)
from trainer.families.cogvideox_i2v import OFS, ImageConditioner, check_images, encoder_parameters, image_inputs
from trainer.families.cogvideox_ulysses import split_sequence
from trainer.media import to_uint8
from trainer.shard_format import SampleShapes
from trainer.spec import LoraSection, ValidationSection

TRANSFORMER_CLASS = "CogVideoXTransformer3DModel"


def _video_tokens(config: Mapping[str, Any], frames: int, height: int, width: int) -> int:
    """Transformer tokens of a latent grid (1.5 pads the frames to a multiple of patch_size_t)."""
    p, p_t = config["patch_size"], config.get("patch_size_t") or 1
    return -(-frames // p_t) * (height // p) * (width // p)


@dataclass(frozen=True)
class ModelCard:
    """What a version's model card says that no config file holds (zai-org/CogVideo README.md, "Model
    Introduction": CogVideoX-2B/5B 720x480 at 8 fps, 8N+1 frames; CogVideoX1.5-5B 1360x768 at 16 fps, 16N+1
    frames with N <= 10)."""

    height: int
    width: int
    fps: int
    frame_multiple: int


MODEL_CARDS = {"1.0": ModelCard(height=480, width=720, fps=8, frame_multiple=8),
               "1.5": ModelCard(height=768, width=1360, fps=16, frame_multiple=16)}


@dataclass(frozen=True)
class Variant:
    version: str  # "1.0" or "1.5"
    rope: bool  # 3D rotary positions (5B, 1.5) rather than sin-cos ones (2B)
    image_to_video: bool
    learned_positions: bool  # 5B-I2V: a learned positional embedding of sample_frames at the base grid

    @classmethod
    def of(cls, config: dict) -> Variant:
        return cls(version="1.0" if config.get("patch_size_t") is None else "1.5",
                   rope=bool(config.get("use_rotary_positional_embeddings")),
                   image_to_video=config.get("in_channels") != config.get("out_channels"),
                   learned_positions=bool(config.get("use_learned_positional_embeddings")))


class CogVideoX:
    """A CogVideoX model directory (or, for weightless uses such as the planner, a transformer config alone)."""

    def __init__(self, model_dir: Path | None, config: dict):
        self.dir, self.config = model_dir, {k: v for k, v in config.items() if not k.startswith("_")}
        self.variant = Variant.of(self.config)

    @classmethod
    def from_config(cls, config: dict) -> CogVideoX:
        return cls(None, config)

    @property
    def model_dir(self) -> Path:
        if self.dir is None:
            raise RuntimeError("this CogVideoX has a transformer config only, no model directory")
        return self.dir

    def describe(self) -> str:
        positions = "3D RoPE" if self.variant.rope else "sin-cos positions"
        kind = "image-to-video" if self.variant.image_to_video else "text-to-video"
        return f"CogVideoX {self.variant.version} {kind}, {positions}"

    def _source(self) -> str:
        return str(self.dir / "transformer" / "config.json") if self.dir else "the transformer config"

    # ---- what the data must be

    @property
    def image_to_video(self) -> bool:
        return self.variant.image_to_video

    def sample_shapes(self) -> SampleShapes:
        cfg = self.config
        channels, key = cfg["in_channels"], "in_channels"
        if self.variant.image_to_video:
            if cfg["in_channels"] != 2 * cfg["out_channels"]:
                raise UserError(f"model.path: {self._source()} has in_channels {cfg['in_channels']} and out_channels "
                                f"{cfg['out_channels']}: an image-to-video CogVideoX has twice as many in as out")
            channels, key = cfg["out_channels"], "out_channels (in_channels / 2: video and image latents)"
        image = None  # image-to-video samples carry their first frame: the VAE's compression times the latents
        if self.variant.image_to_video and self.dir is not None:  # the VAE that encodes it every step
            self.check_encoders("model.path", "training an image-to-video model", ("vae/config.json",))
        if self.variant.image_to_video:
            image = self._compression()[0] if self.dir is not None else 8  # CogVideoX's, from a config alone
        # the latent grids the positions cover: 5B-I2V's learned embedding one, 1.5's RoPE table up to its size
        fixed = ((cfg["sample_frames"] - 1) // cfg["temporal_compression_ratio"] + 1, cfg["sample_height"],
                 cfg["sample_width"]) if self.variant.learned_positions else None
        largest = (cfg["sample_height"], cfg["sample_width"]) if self.variant.version == "1.5" else None
        return SampleShapes(channels, cfg["max_text_seq_length"], cfg["text_embed_dim"], cfg["patch_size"],
                            self._source(), key, "max_text_seq_length, text_embed_dim", image_pixels=image,
                            fixed_grid=fixed, max_grid=largest)

    def _vae_config(self) -> dict | None:
        path = self.model_dir / "vae" / "config.json"
        return json.loads(path.read_text()) if path.is_file() else None

    def latent_scale(self) -> float | None:
        """The VAE's scaling_factor that packed latents were multiplied by (None: the directory has no VAE)."""
        vae = self._vae_config()
        return None if vae is None else vae.get("scaling_factor")

    def native_clip(self) -> NativeClip:
        """The clip the variant was trained on: frames from the transformer config's sample_frames (what its
        pipeline defaults to); height and width from the model card, or from the transformer's base grid
        (sample_height x sample_width latents, whole patches) where that is smaller; fps and the frame rule from
        the card. (The pipeline defaults the size to the base grid, which for CogVideoX1.5-5B's published
        300 x 300, the extent of its RoPE table, is 2400x2400.)"""
        spatial, _, _ = self._compression()
        card, patch = MODEL_CARDS[self.variant.version], self.config["patch_size"]
        base = [self.config.get(key, default) // patch * patch * spatial  # diffusers' defaults where unset
                for key, default in (("sample_height", 60), ("sample_width", 90))]
        return NativeClip(self.config.get("sample_frames", 49), min(card.height, base[0]), min(card.width, base[1]),
                          card.fps, card.frame_multiple)

    def _compression(self) -> tuple[int, int, int]:
        """(spatial, temporal) compression and latent channels of the directory's VAE."""
        vae = self._vae_config()
        if vae is None:
            raise UserError(f"model.path: {self.model_dir} has no vae/config.json to size clips with")
        return 2 ** (len(vae["block_out_channels"]) - 1), vae["temporal_compression_ratio"], vae["latent_channels"]

    def latent_shape(self, frames: int, height: int, width: int,
                     option: Callable[[str], str]) -> tuple[int, int, int, int]:
        """Latents [C, F, H, W] of a clip, or a UserError naming ``option(name)`` (name: num_frames, height or
        width) when the clip is off the variant's rule: frames off its model card's k·m+1, sides not multiples
        of the VAE's compression times the patch, or (1.5) beyond the transformer's RoPE table."""
        spatial, temporal, channels = self._compression()
        multiple = MODEL_CARDS[self.variant.version].frame_multiple
        if multiple % temporal:
            raise UserError(f"model.path: {self.model_dir}'s VAE compresses time {temporal}x, which cannot make "
                            f"CogVideoX {self.variant.version}'s {multiple}k+1 frames")
        if frames < 1 or (frames - 1) % multiple:
            near = max(1, int((frames - 1) / multiple + 0.5)) * multiple + 1
            raise UserError(f"{option('num_frames')}: {frames} frames is off CogVideoX {self.variant.version}'s "
                            f"frame rule {multiple}k+1 (its model card; the VAE compresses time {temporal}x), "
                            f"for example {near}")
        patch = self.config["patch_size"]
        for name, value in (("height", height), ("width", width)):
            if value % (spatial * patch):
                raise UserError(f"{option(name)}: {value} is not a multiple of {spatial * patch} (the VAE's "
                                f"{spatial}x compression times the transformer's patch size {patch})")
        if self.variant.learned_positions:  # diffusers refuses other sizes, and swaps in sin-cos at other lengths
            cfg = self.config
            native = (cfg["sample_frames"], cfg["sample_height"] * spatial, cfg["sample_width"] * spatial)
            for name, value, want in zip(("num_frames", "height", "width"), (frames, height, width), native,
                                         strict=True):
                if value != want:
                    raise UserError(f"{option(name)}: {value}, but this transformer's learned positional embedding "
                                    f"(use_learned_positional_embeddings, as CogVideoX-5b-I2V) covers only "
                                    f"{native[0]}x{native[1]}x{native[2]} (sample_frames x sample_height x "
                                    f"sample_width latents x {spatial}, in {self._source()}): diffusers refuses "
                                    f"other sizes and uses other positions at other frame counts")
        if self.variant.version == "1.5":  # "slice" RoPE: positions are rows of a table of the base grid's size
            for name, value, key in (("height", height, "sample_height"), ("width", width, "sample_width")):
                if value > self.config[key] * spatial:
                    raise UserError(f"{option(name)}: {value} is beyond the transformer's rotary position table "
                                    f"({key} {self.config[key]} latents = {self.config[key] * spatial} pixels, "
                                    f"in {self._source()})")
        return channels, (frames - 1) // temporal + 1, height // spatial, width // spatial

    def encoder_configs(self) -> dict[str, dict]:
        """The configs of the encoders that make a sample (what manifest.json records)."""
        return {part: json.loads((self.model_dir / part / "config.json").read_text())
                for part in ("vae", "text_encoder")}

    def check_encoders(self, label: str, purpose: str, parts: tuple[str, ...] = media.ENCODER_PARTS) -> None:
        missing = [part for part in parts if not (self.model_dir / part).exists()]
        if missing:
            what = "VAE and text encoder" if any(not part.startswith("vae") for part in parts) else "VAE"
            raise UserError(f"{label}: {purpose} needs the model directory's {what}, but "
                            f"{self.model_dir} lacks {', '.join(missing)}")

    def encoders(self, device: torch.device, dtype: torch.dtype, vae_tiling: bool = True) -> media.Encoders:
        return media.Encoders(self.model_dir, device, dtype, self.config["max_text_seq_length"], vae_tiling)

    def prompt_encoder(self, device: torch.device, dtype: torch.dtype) -> media.PromptEncoder:
        return media.PromptEncoder(self.model_dir, device, dtype, self.config["max_text_seq_length"])

    def image_encoder_parameters(self) -> int:
        """Parameters of the VAE encoder image-to-video training holds on every rank (0: text-to-video)."""
        vae = self._vae_config() if self.variant.image_to_video else None
        return 0 if vae is None else encoder_parameters(vae)

    def image_conditioner(self, device: torch.device, dtype: torch.dtype, dropout: float) -> ImageConditioner | None:
        """The VAE encoder that turns each step's conditioning images into image latents (None: text-to-video)."""
        return ImageConditioner.load(self.model_dir, device, dtype, dropout) if self.variant.image_to_video else None

    # ---- the transformer

    def transformer_from_config(self, device: torch.device | str, lora: LoraSection | None = None) -> nn.Module:
        """The transformer with random weights (on the meta device: a skeleton, no memory), with ``lora``'s
        adapter if given. The one place a transformer is built from its config."""
        from diffusers import CogVideoXTransformer3DModel

        with torch.device(device):
            transformer = CogVideoXTransformer3DModel.from_config(self.config)
            if lora is not None:
                transformer.add_adapter(lora_config(lora))
        return transformer

    def check_lora_targets(self, targets: list[str]) -> None:
        """Check the LoRA targets against the skeleton: peft matches a target by the module name or its dotted
        suffix; say which target matched nothing."""
        names = [name for name, _ in self.transformer_from_config("meta").named_modules()]
        unmatched = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
        if unmatched:
            examples = sorted({n.split(".", 2)[-1] for n in names if n.startswith("transformer_blocks.0.")})[:12]
            raise UserError(f"lora.target_modules: {unmatched} match no module of the transformer "
                            f"(modules of a block include {examples})")

    def load_transformer(self, dtype: torch.dtype) -> nn.Module:
        from diffusers import CogVideoXTransformer3DModel
        return CogVideoXTransformer3DModel.from_pretrained(self.model_dir, subfolder="transformer", dtype=dtype)

    def load(self, lora: LoraSection, dtype: torch.dtype, gradient_checkpointing: bool, seed: int) -> CogVideoXModel:
        """The pretrained transformer, frozen, with the spec's LoRA."""
        return self.wrap(attach_lora(self.load_transformer(dtype), lora, gradient_checkpointing, seed))

    def wrap(self, transformer: nn.Module) -> CogVideoXModel:
        return CogVideoXModel(transformer)

    @staticmethod
    def objective_from_scheduler(config: dict, source: str = "scheduler config") -> Objective:
        """The v-prediction objective on the scheduler's own ᾱ (diffusers builds it: the sampler's, bit for bit)."""
        from diffusers import CogVideoXDDIMScheduler

        prediction = config.get("prediction_type", "epsilon")
        if prediction != "v_prediction":
            raise UserError(f"{source}: prediction_type is {prediction!r}; CogVideoX training needs 'v_prediction'")
        return Objective(CogVideoXDDIMScheduler.from_config(config).alphas_cumprod.to(torch.float64))

    def objective(self) -> Objective:
        path = self.model_dir / "scheduler" / "scheduler_config.json"
        try:
            config = json.loads(path.read_text())
        except FileNotFoundError:
            raise UserError(f"model.path: {path} is missing (a CogVideoX directory has a scheduler/ folder)") from None
        return self.objective_from_scheduler(config, str(path))

    def video_tokens(self, latent_shape: tuple[int, ...]) -> int:
        """Latents [C, F, H, W] -> transformer tokens."""
        return _video_tokens(self.config, *latent_shape[1:])

    def structure(self) -> TransformerStructure:
        """CogVideoXBlock: norm1 (conditioned on the timestep), q/k/v over text + video tokens, attention, out,
        norm2, the GELU feed-forward; patch embeddings in front, proj_out behind."""
        cfg, heads = self.config, self.config["num_attention_heads"]
        return TransformerStructure(
            layers=cfg["num_layers"], heads=heads, head_dim=cfg["attention_head_dim"],
            text_tokens=cfg["max_text_seq_length"], block_prefix="transformer_blocks.", block_class="CogVideoXBlock",
            attention_inputs=("attn1.to_q", "attn1.to_k", "attn1.to_v"), attention_output="attn1.to_out.0",
            after_attention=("ff.net.0.proj", "ff.net.2"), per_sample=("norm1.linear", "norm2.linear"),
            outside={"patch_embed.proj": "video", "patch_embed.text_proj": "text", "proj_out": "video"},
            trained_stream=("proj_out",), saved_hidden_wide=8, saved_ff_wide=1, saved_stats_bytes=8 * (2 + 2 * heads),
            rope=bool(cfg.get("use_rotary_positional_embeddings")), video_tokens=self.video_tokens)

    def split_sequence(self, transformer: nn.Module, exchange: SequenceExchange) -> None:
        split_sequence(transformer, exchange)  # families/cogvideox_ulysses.py

    # ---- sampling and the LoRA file

    def check_sampling(self, section: ValidationSection, field: Callable[[str], str]) -> SampleSettings:
        self.check_encoders(field("prompts"), "sampling videos", ("model_index.json", *media.ENCODER_PARTS))
        settings = SampleSettings.of(section, self.native_clip())
        self.latent_shape(settings.num_frames, settings.height, settings.width, field)
        check_images(section.prompts, section.images, self.variant.image_to_video, self.describe(), field("images"))
        return settings

    def pipeline(self, transformer: nn.Module, dtype: torch.dtype, device: torch.device) -> Any:
        return media.load_pipeline(self.model_dir, transformer, dtype, device, self.variant.image_to_video)

    def generate(self, pipe: Any, prompt_embeds: torch.Tensor, negative_embeds: torch.Tensor,
                 settings: SampleSettings, on_step: Callable[[int], None] = lambda i: None,
                 image: Any = None) -> np.ndarray:
        return to_uint8(media.sample(pipe, prompt_embeds, negative_embeds, settings, on_step, "np", image))

    def denoise(self, pipe: Any, prompt_embeds: torch.Tensor, negative_embeds: torch.Tensor,
                settings: SampleSettings, on_step: Callable[[int], None] = lambda i: None, image: Any = None) -> None:
        media.sample(pipe, prompt_embeds, negative_embeds, settings, on_step, "latent", image)

    def write_lora(self, transformer: nn.Module, state: dict[str, torch.Tensor], out_dir: Path) -> None:
        media.write_lora(transformer, state, out_dir)

    def load_lora(self, pipe: Any, path: Path) -> None:
        pipe.load_lora_weights(path)  # with the file's adapter metadata: the trained alpha / rank scale


class CogVideoXModel(VideoModel):
    """The transformer as the trainer calls it: latents [B, C, F, H, W] in, v̂ in the same layout out, with the 3D
    rotary embedding the pipeline builds for that latent grid (cached per shape)."""

    def __init__(self, transformer: nn.Module):
        super().__init__(transformer)
        self._rope_cache: dict[tuple, Any] = {}  # (cos, sin) per latent grid and device

    def prepare_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """1.5 patches time in pairs: repeat the first latent frame at the front to a multiple of it."""
        p_t = self.config.patch_size_t
        frames = latents.shape[2]
        if p_t is None or frames % p_t == 0:
            return latents
        pad = p_t - frames % p_t
        return torch.cat([latents[:, :, :1].expand(-1, -1, pad, -1, -1), latents], dim=2)

    def video_tokens(self, frames: int, height: int, width: int) -> int:
        return _video_tokens(self.config, frames, height, width)

    def rotary_embedding(self, frames: int, height: int, width: int, device: torch.device) -> Any:
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
            if p_t is None:  # 1.0: crop coordinates relative to the model's base grid
                crops = get_resize_crop_region_for_grid(grid, base_w, base_h)
                self._rope_cache[key] = get_3d_rotary_pos_embed(
                    embed_dim=cfg.attention_head_dim, crops_coords=crops, grid_size=grid, temporal_size=frames,
                    device=device)
            else:  # 1.5
                self._rope_cache[key] = get_3d_rotary_pos_embed(
                    embed_dim=cfg.attention_head_dim, crops_coords=None, grid_size=grid,
                    temporal_size=(frames + p_t - 1) // p_t, grid_type="slice", max_size=(base_h, base_w),
                    device=device)
        return self._rope_cache[key]

    def inputs(self, noisy: torch.Tensor, prompt_embeds: torch.Tensor, timesteps: torch.Tensor,
               image_latents: torch.Tensor | None = None) -> dict[str, Any]:
        """The transformer's keyword arguments for latents [B, C, F, H, W]: what the pipeline passes at a
        denoising step of the same grid. Image-to-video: the image latents [B, C, 1, H, W] (cogvideox_i2v.py)
        concatenated on channels, and ofs where the transformer has its embedding."""
        _, _, frames, height, width = noisy.shape
        hidden = noisy
        if image_latents is not None:
            conditioning = image_inputs(image_latents, frames, self.config.patch_size_t)
            hidden = torch.cat([noisy, conditioning.to(noisy.dtype)], dim=1)
        args = {"hidden_states": hidden.transpose(1, 2), "encoder_hidden_states": prompt_embeds, "timestep": timesteps,
                "image_rotary_emb": self.rotary_embedding(frames, height, width, noisy.device), "return_dict": False}
        if self.config.ofs_embed_dim:
            args["ofs"] = noisy.new_full((1,), OFS)
        return args

    def forward(self, noisy: torch.Tensor, prompt_embeds: torch.Tensor, timesteps: torch.Tensor,
                image_latents: torch.Tensor | None = None) -> torch.Tensor:
        """noisy latents [B, C, F, H, W], prompt_embeds [B, L, D], timesteps [B] (image-to-video: image latents
        [B, C, 1, H, W]) -> v̂ [B, C, F, H, W]."""
        return self.transformer(**self.inputs(noisy, prompt_embeds, timesteps, image_latents))[0].transpose(1, 2)
