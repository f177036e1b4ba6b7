"""CogVideoX under sequence parallelism: where the split, the exchange and the gather go (trainer/sequence.py).

Applied from outside diffusers' ``CogVideoXTransformer3DModel``, whose forward stays as it is:
- after ``patch_embed`` (which adds the 2B's sin-cos and 5B-I2V's learned positions to the whole grid), each
  rank keeps its contiguous 1/N of the video tokens, in the transformer's (frame, row, column) order; the
  prompt's tokens stay whole, and the timestep embedding is computed whole on every rank;
- every block's attention runs ``UlyssesAttnProcessor``: the q/k/v projections, the per-head norms and the
  rotary embedding (this rank's rows of the global grid's table) on the local tokens, exactly as
  ``CogVideoXAttnProcessor2_0`` does; then the video tokens' q/k/v are exchanged for the whole sequence and
  1/N of the heads, the prompt's for the same heads (a slice: every rank has them), attention runs over all
  text and video tokens with those heads, and the video output goes back to the token split; the prompt's
  output is gathered over heads, so that every rank carries the whole prompt stream into the next block;
- after ``proj_out`` the video tokens are gathered again, so that the unpatchify and the loss (1.5's padding
  frame included, as without the split) see the whole sample, the same on every rank of the group.
Norms, feed-forwards and the adaptive layer norms act per token: they need nothing.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from trainer.errors import UserError
from trainer.families.base import SequenceExchange


def split_sequence(transformer: nn.Module, exchange: SequenceExchange) -> None:
    dropout = transformer.config.get("dropout", 0.0)  # type: ignore[operator, union-attr]
    if dropout:  # it would drop the prompt's tokens, which every rank of the group holds, differently on each
        raise UserError(f"parallel.sequence: the transformer's config has dropout {dropout}; sequence parallelism "
                        f"needs the same prompt stream on every rank of a group: set dropout to 0 in "
                        f"transformer/config.json")
    def keep_local_video(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        text = args[0].shape[1]  # patch_embed(text_embeds, image_embeds) -> [B, text + video, D]
        return torch.cat([output[:, :text], exchange.split(output[:, text:], 1)], dim=1)

    modules = dict(transformer.named_children())
    modules["patch_embed"].register_forward_hook(keep_local_video)
    modules["proj_out"].register_forward_hook(lambda module, args, output: exchange.gather(output, 1))
    transformer.set_attn_processor(UlyssesAttnProcessor(exchange))  # type: ignore[operator]


class UlyssesAttnProcessor:
    """``CogVideoXAttnProcessor2_0`` (diffusers) with the video tokens split over a sequence group."""

    def __init__(self, exchange: SequenceExchange):
        self.exchange = exchange

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor,
                 attention_mask: torch.Tensor | None = None,
                 image_rotary_emb: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
        from diffusers.models.embeddings import apply_rotary_emb

        if attention_mask is not None:  # CogVideoX passes none; a mask over a split sequence is not handled
            raise ValueError("sequence-parallel CogVideoX attention takes no attention mask")
        exchange, text = self.exchange, encoder_hidden_states.size(1)
        hidden_states = torch.cat([encoder_hidden_states, hidden_states], dim=1)
        batch = hidden_states.shape[0]
        if image_rotary_emb is not None:  # the whole grid's table: this rank's rows
            image_rotary_emb = tuple(exchange.split(part, 0) for part in image_rotary_emb)

        def heads_of(projection: nn.Module, norm: nn.Module | None, rotary: bool) -> torch.Tensor:
            x = projection(hidden_states)
            x = x.view(batch, -1, attn.heads, x.shape[-1] // attn.heads).transpose(1, 2)  # [B, H, L + S/N, D]
            if norm is not None:
                x = norm(x)
            if rotary and image_rotary_emb is not None:
                rotated = apply_rotary_emb(x[:, :, text:], image_rotary_emb)
                x = torch.cat([x[:, :, :text], rotated], dim=2)  # type: ignore[list-item]
            x = x.transpose(1, 2)  # [B, L + S/N, H, D]
            return torch.cat([exchange.local_heads(x[:, :text]), exchange.scatter_heads(x[:, text:])],
                             dim=1).transpose(1, 2)  # [B, H/N, L + S, D]

        query = heads_of(attn.to_q, attn.norm_q, True)
        key = heads_of(attn.to_k, attn.norm_k, not attn.is_cross_attention)
        value = heads_of(attn.to_v, None, False)
        out = F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False).transpose(1, 2)
        out = torch.cat([exchange.all_heads(out[:, :text]), exchange.gather_heads(out[:, text:])], dim=1)
        out = attn.to_out[1](attn.to_out[0](out.flatten(2)))  # [B, L + S/N, H * D]: linear, dropout
        encoder_hidden_states, hidden_states = out.split([text, out.size(1) - text], dim=1)
        return hidden_states, encoder_hidden_states
