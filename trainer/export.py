"""The exported adapter: what ``CogVideoXPipeline.save_lora_weights`` writes, kept apart from checkpoints.

The LoRA config goes in as adapter metadata so that ``pipe.load_lora_weights(dir)`` applies the trained
alpha/rank scale; the resolved spec is written beside it. Gathering is a collective; only rank 0 writes.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from trainer.model import VideoTransformer

LORA_FILE = "pytorch_lora_weights.safetensors"


def gather_lora_state(model: VideoTransformer) -> dict[str, torch.Tensor]:
    """Full fp32 master weights of every LoRA parameter, on the CPU. A collective: call it on every rank.

    Reading the module's own parameters is not enough: under ZeRO-3 they are empty partitions, and under
    bf16 they are rounded copies. DeepSpeed's fp32 masters are what training continues from.
    """
    from deepspeed.utils import safe_get_full_fp32_param

    state = {}
    for name, param in model.lora_parameters().items():
        full = safe_get_full_fp32_param(param)
        if full is None:
            raise RuntimeError(f"DeepSpeed holds no fp32 master for {name}: is the engine built?")
        state[name] = full.detach().float().cpu().clone()
    return state


def export_lora(model: VideoTransformer, out_dir: Path, spec_yaml: str) -> Path | None:
    """Write the diffusers LoRA file (and the spec) to out_dir; returns the file on rank 0, None elsewhere."""
    state = gather_lora_state(model)  # every rank takes part
    if dist.get_rank() != 0:
        return None
    from diffusers import CogVideoXPipeline
    from peft import get_peft_model_state_dict

    layers = get_peft_model_state_dict(model.transformer, state_dict=state)
    empty = [name for name, t in layers.items() if t.numel() == 0]
    if not layers or empty:
        raise RuntimeError(f"refusing to export an empty LoRA ({len(layers)} tensors, empty: {empty[:3]})")
    # Write beside the target and swap in, so a crash never leaves a half-written adapter behind.
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    CogVideoXPipeline.save_lora_weights(
        tmp, transformer_lora_layers=layers, safe_serialization=True,
        transformer_lora_adapter_metadata=model.transformer.peft_config["default"].to_dict())
    (tmp / "spec.yaml").write_text(spec_yaml)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
    return out_dir / LORA_FILE
