"""The exported adapter: what ``CogVideoXPipeline.save_lora_weights`` writes, kept apart from checkpoints.

The LoRA config goes in as adapter metadata so that ``pipe.load_lora_weights(dir)`` applies the trained
alpha/rank scale; the resolved spec is written beside it. Gathering is a collective; only rank 0 writes.
The same file from any complete checkpoint of a run, after the fact (no GPU needed):

    python -m trainer.export --checkpoint runs/NAME/checkpoints/step_00001000 [--out DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import shutil
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from trainer.checkpoint import MARKER, UNIVERSAL
from trainer.errors import EXIT_USER_ERROR, UserError
from trainer.model import VideoTransformer, lora_config
from trainer.spec import RunSpec, load_spec

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
    return write_lora(model.transformer, state, out_dir, spec_yaml)


def write_lora(transformer, state: dict[str, torch.Tensor], out_dir: Path, spec_yaml: str) -> Path:
    """The LoRA tensors of `state` (peft names, as in `transformer`) as CogVideoXPipeline saves them, with the
    transformer's LoRA config as adapter metadata."""
    from diffusers import CogVideoXPipeline
    from peft import get_peft_model_state_dict

    layers = get_peft_model_state_dict(transformer, state_dict=state)
    empty = [name for name, t in layers.items() if t.numel() == 0]
    if not layers or empty:
        raise RuntimeError(f"refusing to export an empty LoRA ({len(layers)} tensors, empty: {empty[:3]})")
    # Write beside the target and swap in, so a crash never leaves a half-written adapter behind.
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    metadata = transformer.peft_config["default"].to_dict()
    if isinstance(metadata.get("target_modules"), (list, set)):  # peft keeps a set: no order from run to run
        metadata["target_modules"] = sorted(metadata["target_modules"])
    # Dropout is for training only, but pipe.load_lora_weights leaves the layers it adds in training mode:
    # recorded here, the trained dropout would perturb every video a user samples with this file.
    metadata["lora_dropout"] = 0.0
    CogVideoXPipeline.save_lora_weights(tmp, transformer_lora_layers=layers, safe_serialization=True,
                                        transformer_lora_adapter_metadata=metadata)
    (tmp / "spec.yaml").write_text(spec_yaml)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
    return out_dir / LORA_FILE


def export_checkpoint(checkpoint: Path, out_dir: Path, spec: RunSpec) -> Path:
    """The LoRA of a DeepSpeed checkpoint of a run, from its fp32 master weights: the same file the run's own
    export writes at that step. Any ZeRO stage and number of ranks; no GPU, no process group, no base weights."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    if checkpoint.resolve().parent.name == UNIVERSAL:
        raise UserError(f"--checkpoint: {checkpoint} is a universal conversion; give the checkpoint it was made "
                        f"from (checkpoints/{checkpoint.name})")
    if not (checkpoint / MARKER).is_file():
        raise UserError(f"--checkpoint: {checkpoint} is not a complete checkpoint (no {MARKER})")
    # DeepSpeed prints every file and shape it reads, with progress bars
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        masters = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint.parent), tag=checkpoint.name,
                                                           exclude_frozen_parameters=True)
    # the engine's module is VideoTransformer; the peft names are those of its `transformer`
    state = {name.removeprefix("transformer."): t for name, t in masters.items()}
    return write_lora(lora_skeleton(spec), state, out_dir, spec.to_yaml())


def lora_skeleton(spec: RunSpec):
    """The run's transformer with its LoRA, on the meta device: names and config, no memory, no weights read."""
    from diffusers import CogVideoXTransformer3DModel

    try:  # a local directory or a hub id: only transformer/config.json is read
        config = CogVideoXTransformer3DModel.load_config(spec.model.path, subfolder="transformer")
    except (OSError, ValueError) as exc:
        raise UserError(f"model.path: cannot read {spec.model.path}/transformer/config.json ({exc})") from None
    with torch.device("meta"):
        transformer = CogVideoXTransformer3DModel.from_config(config)
        transformer.add_adapter(lora_config(spec.lora))
    return transformer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer.export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, required=True, help="a run's checkpoints/step_NNNNNNNN")
    parser.add_argument("--out", type=Path, help="output directory (default: RUN/lora_exports/step_NNNNNNNN)")
    parser.add_argument("--spec", type=Path, help="the run's spec (default: RUN/spec.yaml)")
    args = parser.parse_args(argv)
    run_dir = args.checkpoint.resolve().parent.parent
    try:
        if args.spec is None and not (run_dir / "spec.yaml").is_file():
            raise UserError(f"--spec: {run_dir / 'spec.yaml'} is missing; give the run's spec with --spec")
        spec = load_spec(args.spec or run_dir / "spec.yaml")
        out = args.out or run_dir / "lora_exports" / args.checkpoint.name
        written = export_checkpoint(args.checkpoint, out, spec)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    print(f"LoRA of {args.checkpoint}: {written}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
