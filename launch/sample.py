#!/usr/bin/env python
"""Generate videos from a model directory plus an exported LoRA, as validation does during training.

    python launch/sample.py --spec runs/NAME/spec.yaml --lora runs/NAME/samples/step_000500/lora --out videos/
    python launch/sample.py --model THUDM/CogVideoX-5b --lora runs/NAME/lora --prompt "a cat ..." --out videos/
    python launch/sample.py --model THUDM/CogVideoX-5b-I2V --lora ... --prompt "a cat ..." --image cat.png --out v/

With --spec, the model, precision, prompts and sampling settings are the run's validation settings, so the
videos of a validation step are reproduced from the LoRA saved beside them; any option given overrides them.
One process, on the GPU when there is one. Writes NNN-<prompt>.mp4 per prompt and prompts.json into --out.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runs from a checkout without installing

from trainer.dtypes import PRECISIONS  # noqa: E402
from trainer.errors import EXIT_USER_ERROR, UserError  # noqa: E402

if TYPE_CHECKING:
    from trainer.families.base import ModelFamily, SampleSettings
    from trainer.spec import ValidationSection

SETTINGS = ("num_frames", "height", "width", "num_inference_steps", "guidance_scale", "seed", "fps")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spec", type=Path, help="a run spec: model, precision and its validation settings")
    parser.add_argument("--model", help="model directory or hub id (default: the spec's model.path)")
    parser.add_argument("--lora", type=Path, help="exported LoRA directory or .safetensors file (none: base model)")
    parser.add_argument("--prompt", action="append", dest="prompts", help="repeatable (default: the spec's)")
    parser.add_argument("--image", action="append", dest="images",
                        help="image-to-video models: the first frame of the video, one per --prompt, in order "
                             "(default: the spec's validation.images)")
    parser.add_argument("--negative-prompt")
    parser.add_argument("--out", type=Path, required=True, help="directory for the mp4 files")
    parser.add_argument("--precision", choices=sorted(PRECISIONS), help="default: the spec's, else bf16")
    parser.add_argument("--dynamic-cfg", action=argparse.BooleanOptionalAction, default=None)
    for name in SETTINGS:
        kind = float if name == "guidance_scale" else int
        parser.add_argument(f"--{name.replace('_', '-')}", type=kind, dest=name)
    return parser.parse_args(argv)


def resolve(args: argparse.Namespace) -> tuple[str, ValidationSection, str]:
    """The spec's validation section with the command line's choices on top, checked like a spec."""
    from pydantic import ValidationError

    from trainer.spec import ValidationSection, format_validation_error, load_spec

    spec = load_spec(args.spec) if args.spec else None
    values = spec.validation.model_dump(exclude={"loss"}) if spec else {}
    values.update({k: getattr(args, k) for k in SETTINGS if getattr(args, k) is not None})
    if args.prompts:
        values["prompts"] = args.prompts
        values["images"] = []  # the spec's images belong to its prompts
    if args.images:
        values["images"] = args.images
    if args.negative_prompt is not None:
        values["negative_prompt"] = args.negative_prompt
    if args.dynamic_cfg is not None:
        values["use_dynamic_cfg"] = args.dynamic_cfg
    try:
        section = ValidationSection.model_validate(values)
    except ValidationError as exc:
        raise UserError(format_validation_error(exc, "launch/sample.py")) from None
    model = args.model or (spec.model.path if spec else None)
    if model is None:
        raise UserError("--model: give a model directory (or --spec, to use its model.path)")
    if not section.prompts:
        raise UserError("--prompt: no prompts (give --prompt, or a --spec with validation.prompts)")
    precision = args.precision or (spec.train.precision if spec else "bf16")
    return model, section, precision


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        model, section, precision = resolve(args)
        from trainer.families import load_family

        try:
            family = load_family(model, sampling=True)
        except UserError as exc:
            raise UserError(str(exc).replace("model.path:", "--model:" if args.model else "--spec's model.path:",
                                             1)) from None
        settings = family.check_sampling(
            section, lambda name: {"prompts": "--model", "images": "--image"}.get(name, f"--{name.replace('_', '-')}"))
        if args.lora is not None and not args.lora.exists():
            raise UserError(f"--lora: no such file or directory: {args.lora}")
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    print(f"sampling {len(section.prompts)} video(s) of {settings.num_frames}x{settings.height}x{settings.width} at "
          f"{settings.fps} fps, {settings.num_inference_steps} steps (unset sizes: the model's native clip, "
          f"{family.native_clip()})", flush=True)
    sample(family, args.lora, section, settings, precision, args.out)
    return 0


def sample(family: ModelFamily, lora: Path | None, section: ValidationSection, settings: SampleSettings,
           precision: str, out: Path) -> list[Path]:
    import torch

    from trainer.media import read_image, write_mp4
    from trainer.sampling import encode_prompts, video_names, write_prompt_list

    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    dtype = PRECISIONS[precision]
    embeds = encode_prompts(family, [*section.prompts, section.negative_prompt])  # the text encoder is freed again
    pipe = family.pipeline(family.load_transformer(dtype).to(device), dtype, device)
    if lora is not None:
        family.load_lora(pipe, lora)  # with the file's adapter metadata: the trained alpha / rank scale
    pipe.transformer.eval()  # the layers load_lora_weights adds come in training mode
    names = video_names(section.prompts)
    images = [read_image(Path(path), "--image") for path in section.images]
    files = []
    for i, prompt in enumerate(section.prompts):
        frames = family.generate(pipe, embeds[i], embeds[-1], settings, image=images[i] if images else None)
        files.append(write_mp4(out / names[i], frames, settings.fps))
        print(f"{files[-1]}  ({prompt})", flush=True)
    write_prompt_list(out, section.prompts, settings.seed, section.images)
    return files


if __name__ == "__main__":
    sys.exit(main())
