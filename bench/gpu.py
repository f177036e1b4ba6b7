#!/usr/bin/env python
"""GPU mode: CogVideoX-2B- and 5B-shaped random-weight transformers at 49x480x720 in bf16, gradient
checkpointing on and off, and the shipped 5B combination (ZeRO-3 + checkpointing): seconds per optimizer
step, TFLOP/s, MFU and peak memory against the planner; then one short launch/train.py run on the device.

    python bench/gpu.py                          # on a GPU: the real shapes; rank-128 LoRA on q, k, v, out
    python bench/gpu.py --tiny                   # the same path at tiny width and depth (what a CPU runs)
    python bench/gpu.py --peak-tflops 989        # MFU against this peak (default: by GPU name)

Each configuration runs in its own process: the model family's VideoModel with its LoRA, in a DeepSpeed
engine built from the trainer's config (ZeRO-2, or the shipped zero3.json), one rank, micro-batch 1, random
latents and text in memory. TFLOP/s counts the planner's model FLOPs (forward and backward, no
recomputation), as the trainer logs it. Whether torch's flash-attention kernel takes CogVideoX's attention
(bf16, head dim 64) is checked on the device, as diffusers calls it (scaled_dot_product_attention).

The train run is the real entry, `python launch/train.py`, on the benchmarks' `cpu`-size model (8 blocks of
8 heads x 64) and synthetic shards at 25x192x256: NCCL on a GPU (gloo on a CPU), 2 reader threads into
page-locked memory, bf16, logging every step; its metrics.jsonl gives s/step, data wait and the loss.
On one H100/H200 the whole command takes a few minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import ROOT, machine, print_table  # noqa: E402

COMMON = dict(activation_fn="gelu-approximate", attention_bias=True, attention_head_dim=64, dropout=0.0,
              flip_sin_to_cos=True, freq_shift=0, in_channels=16, out_channels=16, max_text_seq_length=226,
              norm_elementwise_affine=True, norm_eps=1e-5, patch_size=2, sample_frames=49, sample_height=60,
              sample_width=90, spatial_interpolation_scale=1.875, temporal_compression_ratio=4,
              temporal_interpolation_scale=1.0, text_embed_dim=4096, time_embed_dim=512, timestep_activation_fn="silu",
              use_learned_positional_embeddings=False)
SHAPES: dict[str, dict[str, Any]] = {  # THUDM/CogVideoX-2b and -5b transformer/config.json
    "2b": dict(COMMON, num_attention_heads=30, num_layers=30, use_rotary_positional_embeddings=False),
    "5b": dict(COMMON, num_attention_heads=48, num_layers=42, use_rotary_positional_embeddings=True),
}
LATENTS = (16, 13, 60, 90)  # 49x480x720
TINY = dict(num_attention_heads=2, attention_head_dim=16, num_layers=2, text_embed_dim=32, time_embed_dim=32,
            in_channels=4, out_channels=4, sample_frames=9, sample_height=12, sample_width=16)
TINY_LATENTS = (4, 3, 12, 16)  # 9x96x128


CONFIGURATIONS = [("2b", "off", 2), ("2b", "on", 2), ("5b", "off", 2), ("5b", "on", 2), ("5b", "on", 3)]
TRAIN_STEPS = 30


def spec(checkpointing: bool, stage: int = 2):
    from trainer.spec import RunSpec

    return RunSpec.model_validate({
        "model": {"path": "random weights", "gradient_checkpointing": checkpointing},
        "lora": {"rank": 128, "target_modules": ["to_q", "to_k", "to_v", "to_out.0"]},
        "data": {"shards": "in memory"}, "train": {"max_steps": 1000}, "deepspeed": {"config": f"zero{stage}"}})


def flash_attention() -> str:
    """Whether torch's flash kernel runs CogVideoX's attention shape on this device."""
    import torch

    if not torch.cuda.is_available():
        return "n/a (no GPU)"
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q = torch.randn(1, 48, 17_776, 64, device="cuda", dtype=torch.bfloat16)
    try:
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            torch.nn.functional.scaled_dot_product_attention(q, q, q)
        return "yes (bf16, head dim 64, 17,776 tokens)"
    except RuntimeError as exc:
        return f"no ({str(exc).splitlines()[0][:120]})"


def train_run(work: Path, tiny: bool) -> dict:
    """A short run of the real entry on this device; its metrics after two steps of warm-up."""
    from common import write_model, write_shards, write_spec

    size = "tiny" if tiny else "cpu"
    model = write_model(work, size)
    shards = write_shards(work, model, size, 32)
    spec_file = write_spec(work / "train.yaml", model, shards, steps=TRAIN_STEPS, log_every=1, workers=2,
                           train={"precision": "bf16", "timestep_sampling": "stratified"}, optim={"lr": 1e-3})
    env = {**os.environ, "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(29500 + (os.getpid() + 7) % 1000)}
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, str(ROOT / "launch" / "train.py"), "--spec", str(spec_file)], env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"the train run failed:\n{proc.stderr[-3000:]}")
    records = [json.loads(line) for line in (work / "train" / "metrics.jsonl").read_text().splitlines()]
    records = [r for r in records if "loss" in r]
    timed = records[2:]
    return {"size": size, "wall_s": time.perf_counter() - started,
            "s_per_step": sum(r["step_time_s"] for r in timed) / len(timed),
            "data_wait": max(r["data_wait_fraction"] for r in timed),
            "first_loss": sum(r["loss"] for r in records[:5]) / 5,
            "last_loss": sum(r["loss"] for r in records[-5:]) / 5,
            "gpu_gib": max(r.get("gpu_allocated_peak_gb", 0.0) for r in timed)}


def one(shape: str, checkpointing: bool, stage: int, tiny: bool, steps: int, peak_tflops: float | None) -> dict:
    """One configuration, in this process: seconds per step and the rest."""
    from datetime import timedelta

    import torch

    from trainer.costs import CostModel, ZeroSettings, device_peak_tflops
    from trainer.engine import assemble_config, build_engine, init_distributed
    from trainer.families.base import attach_lora
    from trainer.families.cogvideox import CogVideoX

    init_distributed(timedelta(seconds=300))
    run_spec = spec(checkpointing, stage)
    config = dict(SHAPES[shape], **TINY) if tiny else SHAPES[shape]
    latents = TINY_LATENTS if tiny else LATENTS
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    family = CogVideoX.from_config(config)
    transformer = family.transformer_from_config(device).to(torch.bfloat16)
    model = family.wrap(attach_lora(transformer, run_spec.lora, checkpointing, seed=0))
    ds_config = assemble_config(run_spec, 1)
    engine = build_engine(run_spec, model, ds_config)
    x = torch.randn(1, *latents, device=device, dtype=torch.bfloat16)
    text = torch.randn(1, config["max_text_seq_length"], config["text_embed_dim"], device=device, dtype=torch.bfloat16)
    t, target = torch.tensor([500], device=device), torch.randn(1, *latents, device=device)
    times = []
    for _ in range(2 + steps):  # two of warm-up
        start = time.perf_counter()
        loss = torch.nn.functional.mse_loss(engine(x, text, t).float(), target)
        engine.backward(loss)
        engine.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    seconds = sum(times[2:]) / steps
    costs = CostModel(family, run_spec.lora)
    flops = costs.flops(latents)
    peak = peak_tflops or device_peak_tflops(device)
    estimate = costs.memory(latents, 1, ZeroSettings.from_config(ds_config, 1), 2, checkpointing)
    tflops = flops.train / seconds / 1e12
    return {"s_per_step": seconds, "tflops": tflops, "mfu": tflops / peak if peak else None,
            "memory_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None,
            "estimate_gib": estimate.total / 2**30, "tokens": costs.video_tokens(latents) + costs.text_len}


def main(argv: list[str] | None = None) -> int:
    import torch

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny width and depth (default on a CPU)")
    p.add_argument("--steps", type=int, default=5, help="timed steps per configuration, after 2 of warm-up")
    p.add_argument("--shape", choices=sorted(SHAPES), action="append", help="default: both")
    p.add_argument("--peak-tflops", type=float, help="the device's dense bf16 peak (default: by GPU name)")
    p.add_argument("--no-train", action="store_true", help="skip the launch/train.py run")
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: SHAPE,CHECKPOINTING,STAGE here, print JSON
    args = p.parse_args(argv)
    tiny = args.tiny or not torch.cuda.is_available()
    if args.one:
        shape, checkpointing, stage = args.one.split(",")
        print(json.dumps(one(shape, checkpointing == "on", int(stage), tiny, args.steps, args.peak_tflops)))
        return 0
    env = {**os.environ, "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"}
    rows: list[list] = []
    for shape, checkpointing, stage in CONFIGURATIONS:
        if args.shape and shape not in args.shape:
            continue
        env["MASTER_PORT"] = str(29500 + (os.getpid() + len(rows)) % 1000)
        cmd = [sys.executable, __file__, "--one", f"{shape},{checkpointing},{stage}", "--steps", str(args.steps)]
        cmd += ["--tiny"] if tiny else []
        cmd += ["--peak-tflops", str(args.peak_tflops)] if args.peak_tflops else []
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        name = f"{shape}{' (tiny)' if tiny else ''}, ZeRO-{stage}, checkpointing {checkpointing}"
        if proc.returncode != 0:
            oom = "OutOfMemoryError" in proc.stderr or "out of memory" in proc.stderr
            if not oom:
                raise SystemExit(f"{name} failed:\n{proc.stderr[-3000:]}")
            rows.append([name, "out of memory", "", "", "", ""])
            continue
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        rows.append([name, r["s_per_step"], r["tflops"], f"{r['mfu']:.1%}" if r["mfu"] else "n/a",
                     f"{r['memory_gib']:.1f}" if r["memory_gib"] is not None else "n/a", r["estimate_gib"]])
    latents = TINY_LATENTS if tiny else LATENTS
    print(f"\n{machine()}; latents {'x'.join(map(str, latents))}, bf16, 1 rank, micro-batch 1, LoRA rank 128 on "
          f"q/k/v/out; {args.steps} timed steps after 2 of warm-up")
    print_table("GPU mode", ["", "s/step", "TFLOP/s", "MFU", "peak GiB", "planner GiB"], rows)
    print(f"\nflash attention: {flash_attention()}")
    if not args.no_train:
        with tempfile.TemporaryDirectory(prefix="bench-gpu-") as tmp:
            r = train_run(Path(tmp), tiny)
        print(f"\nlaunch/train.py, model '{r['size']}' at 25x192x256 (tiny: 9x96x128), bf16, 2 reader threads, "
              f"{TRAIN_STEPS} steps in {r['wall_s']:.0f} s with start-up: {r['s_per_step']:.3f} s/step after 2, "
              f"data wait at most {r['data_wait']:.1%}, loss {r['first_loss']:.4f} -> {r['last_loss']:.4f} (means "
              f"of the first and last 5 steps), peak GPU {r['gpu_gib']:.2f} GiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
