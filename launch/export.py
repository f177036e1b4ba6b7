#!/usr/bin/env python
"""The LoRA of any complete checkpoint of a run, as the run itself would have exported it at that step (no GPU,
no process group, no base weights):

    python launch/export.py --checkpoint runs/NAME/checkpoints/step_00001000 [--out DIR] [--spec SPEC]

It reads the checkpoint's fp32 master weights with DeepSpeed's zero_to_fp32 (any ZeRO stage, any number of
ranks) and writes the model family's LoRA file to RUN/lora_exports/step_NNNNNNNN by default.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runs from a checkout without installing

from trainer.errors import EXIT_USER_ERROR, UserError  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, required=True, help="a run's checkpoints/step_NNNNNNNN")
    parser.add_argument("--out", type=Path, help="output directory (default: RUN/lora_exports/step_NNNNNNNN)")
    parser.add_argument("--spec", type=Path, help="the run's spec (default: RUN/spec.yaml)")
    args = parser.parse_args(argv)
    run_dir = args.checkpoint.resolve().parent.parent
    try:
        from trainer.export import export_checkpoint
        from trainer.spec import load_spec

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
