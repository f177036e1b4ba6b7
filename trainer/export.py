"""The exported adapter: the model family's LoRA file (for CogVideoX, what ``CogVideoXPipeline.save_lora_weights``
writes), kept apart from checkpoints, with the resolved spec beside it.

The LoRA config goes in as adapter metadata so that ``pipe.load_lora_weights(dir)`` applies the trained
alpha/rank scale. Gathering is a collective; only rank 0 writes. The same file from any complete checkpoint of
a run, after the fact (no GPU needed): ``python launch/export.py --checkpoint runs/NAME/checkpoints/step_N``.
"""

from __future__ import annotations

import contextlib
import io
import shutil
import sys
from pathlib import Path

import torch
from torch import nn

from trainer.checkpoint import MARKER, UNIVERSAL
from trainer.engine import full_fp32_masters
from trainer.errors import EXIT_USER_ERROR, UserError
from trainer.families import load_family
from trainer.families.base import ModelFamily, VideoModel
from trainer.parallel import ParallelLayout
from trainer.spec import RunSpec

LORA_FILE = "pytorch_lora_weights.safetensors"


def gather_lora_state(model: VideoModel) -> dict[str, torch.Tensor]:
    """Full fp32 master weights of every LoRA parameter, on the CPU. A collective: call it on every rank."""
    return full_fp32_masters(model.lora_parameters())


def export_lora(model: VideoModel, family: ModelFamily, layout: ParallelLayout, out_dir: Path,
                spec_yaml: str) -> Path | None:
    """Write the LoRA file (and the spec) to out_dir; returns the file on rank 0, None elsewhere."""
    state = gather_lora_state(model)  # every rank takes part
    if not layout.is_main:
        return None
    return write_lora(family, model.transformer, state, out_dir, spec_yaml)


def write_lora(family: ModelFamily, transformer: nn.Module, state: dict[str, torch.Tensor], out_dir: Path,
               spec_yaml: str) -> Path:
    """The LoRA tensors of `state` (peft names, as in `transformer`) in the family's file format, and the spec."""
    # Write beside the target and swap in, so a crash never leaves a half-written adapter behind.
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    family.write_lora(transformer, state, tmp)
    (tmp / "spec.yaml").write_text(spec_yaml)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
    return out_dir / LORA_FILE


def export_checkpoint(checkpoint: Path, out_dir: Path, spec: RunSpec) -> Path:
    """The LoRA of a DeepSpeed checkpoint of a run, from its fp32 master weights: the same file the run's own
    export writes at that step. Any ZeRO stage and number of ranks; no GPU, no process group, no base weights
    (the transformer's config alone names the tensors)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    if checkpoint.resolve().parent.name == UNIVERSAL:
        raise UserError(f"--checkpoint: {checkpoint} is a universal conversion; give the checkpoint it was made "
                        f"from (checkpoints/{checkpoint.name})")
    if not (checkpoint / MARKER).is_file():
        raise UserError(f"--checkpoint: {checkpoint} is not a complete checkpoint (no {MARKER})")
    family = load_family(spec.model.path, weights=False)  # a local directory or a hub id: configs only
    # DeepSpeed prints every file and shape it reads, with progress bars
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        masters = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint.parent), tag=checkpoint.name,
                                                           exclude_frozen_parameters=True)
    # the engine's module is the family's VideoModel; the peft names are those of its `transformer`
    state = {name.removeprefix("transformer."): t for name, t in masters.items()}
    skeleton = family.transformer_from_config("meta", spec.lora)
    return write_lora(family, skeleton, state, out_dir, spec.to_yaml())


if __name__ == "__main__":  # the old command
    print("error: python -m trainer.export is now python launch/export.py (the same options)", file=sys.stderr)
    sys.exit(EXIT_USER_ERROR)
