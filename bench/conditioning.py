#!/usr/bin/env python
"""What image-to-video's conditioning costs per sample and step: the VAE encoder that encodes the noised first
frame on the training device (trainer/families/cogvideox_i2v.py).

    python bench/conditioning.py                               # the published 5B-I2V and 1.5-I2V VAEs, native sizes
    python bench/conditioning.py --vae tests/configs/cogvideox-5b-i2v/vae --height 480 --width 720

The encoder is the published VAE config's with random weights (the cost does not depend on them): its
parameters and bf16 bytes, the FLOPs of one frame (torch's FLOP counter over the real modules), the time of one
encode on this machine, and its peak memory above the weights. On a GPU that is torch's peak allocation in
bf16; on a CPU it is the process's peak resident memory in fp32 (each ``--vae`` run in a fresh process), about
twice the bf16 figure. The transformer's FLOPs of the same sample, from the planner, put it in proportion.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

from common import ROOT, machine, print_table

PUBLISHED = {"cogvideox-5b-i2v": (480, 720), "cogvideox1.5-5b-i2v": (768, 1360)}


def measure(vae_dir: Path, height: int, width: int, tiling: bool) -> dict:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from trainer.families.cogvideox_i2v import ImageConditioner

    cuda = torch.cuda.is_available()
    device, dtype = (torch.device("cuda"), torch.bfloat16) if cuda else (torch.device("cpu"), torch.float32)
    torch.manual_seed(0)
    config = json.loads((vae_dir / "config.json").read_text())
    conditioner = ImageConditioner.from_config(config, device, dtype, tiling)  # the trainer's encoder, decoder dropped
    params = sum(p.numel() for p in conditioner.vae.parameters())
    pixels = torch.rand(1, 3, height, width, device=device) * 2 - 1
    generator = torch.Generator(device).manual_seed(0)
    if cuda:
        conditioner.encode(pixels, generator, dtype)  # warm-up: kernels chosen, workspaces allocated
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    # on a CPU the first encode is measured: the process's peak so far is the weights'
    before, start = torch.cuda.memory_allocated() if cuda else _rss(), time.perf_counter()
    conditioner.encode(pixels, generator, dtype)
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = (torch.cuda.max_memory_allocated() if cuda else _rss()) - before
    with FlopCounterMode(display=False) as counter:
        conditioner.encode(pixels, generator, dtype)
    return {"params": params, "weights_gb": params * 2 / 1e9, "tflop": counter.get_total_flops() / 1e12,
            "seconds": seconds, "peak_gb": peak / 1e9, "dtype": str(dtype).removeprefix("torch.")}


def _rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports kB


def transformer_tflop(model_dir: Path, height: int, width: int) -> float:
    """The planner's FLOPs of one training sample (forward and backward, checkpointing recomputation included)."""
    from trainer.costs import CostModel
    from trainer.families import load_family
    from trainer.spec import LoraSection

    family = load_family(str(model_dir), weights=False)
    native = family.native_clip()
    latents = family.latent_shape(native.frames, height, width, str)
    costs = CostModel(family, LoraSection(rank=128, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    return costs.flops(latents).train_checkpointed / 1e12


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vae", type=Path, help="a VAE config directory (default: each published I2V model's)")
    parser.add_argument("--height", type=int)
    parser.add_argument("--width", type=int)
    parser.add_argument("--no-tiling", dest="tiling", action="store_false", help="encode the frame whole")
    args = parser.parse_args(argv)
    if args.vae is not None:  # one measurement, printed as JSON for the parent process
        print(json.dumps(measure(args.vae, args.height, args.width, args.tiling)))
        return 0
    rows = []
    for name, (height, width) in PUBLISHED.items():
        model = ROOT / "tests" / "configs" / name
        for tiling in (True, False):  # the trainer tiles, as packing and validation do; whole, as a bare pipeline
            proc = subprocess.run([sys.executable, __file__, "--vae", str(model / "vae"), "--height", str(height),
                                   "--width", str(width), *([] if tiling else ["--no-tiling"])],
                                  capture_output=True, text=True, check=True)
            m = json.loads(proc.stdout.splitlines()[-1])
            share = m["tflop"] / transformer_tflop(model, height, width)
            rows.append([f"{name} {height}x{width}", "tiled" if tiling else "whole", m["params"] / 1e6,
                         m["weights_gb"], m["tflop"], f"{share:.2%}", m["seconds"], m["peak_gb"], m["dtype"]])
    print_table(f"image conditioning: the VAE encoder, one frame per sample and step ({machine()})",
                ["model, image", "encode", "encoder params (M)", "bf16 weights (GB)", "TFLOP", "of the step's",
                 "seconds", "peak above weights (GB)", "dtype"], rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
