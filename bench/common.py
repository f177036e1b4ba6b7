"""What the trainer benchmarks share: CogVideoX-shaped random-weight models, synthetic shards, specs, ranks."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from trainer.process_env import free_port  # noqa: E402, F401  (the benchmarks' ranks meet on it)
from trainer.reporting import tables  # noqa: E402

# Transformer widths and depths (the rest is data_tools/tiny_model.py's geometry: 4 latent channels, patch 2,
# 226 text tokens of width 32) and the clip size each benchmark size trains on.
SIZES = {
    "tiny": ({}, (9, 96, 128)),  # the test and quickstart model: 144 video + 226 text tokens
    "cpu": ({"num_attention_heads": 8, "attention_head_dim": 64, "num_layers": 8}, (25, 192, 256)),  # 1,344 + 226
    # bench/step.py's default: about 0.15 s an optimizer step (accumulation 2) in fp32 on the 2-core CI machine
    "small": ({"num_attention_heads": 4, "attention_head_dim": 32, "num_layers": 5}, (17, 128, 192)),  # 480 + 226
}


def write_model(work: Path, size: str) -> Path:
    from data_tools.tiny_model import write_tiny_model

    out = work / f"model-{size}"
    if not (out / "model_index.json").is_file():
        write_tiny_model(out, "5b", **SIZES[size][0])
    return out


def write_shards(work: Path, model: Path, size: str, samples: int) -> Path:
    from data_tools.synth import write_synthetic_shards

    out = work / f"shards-{size}-{samples}"
    if not out.is_dir():
        frames, height, width = SIZES[size][1]
        write_synthetic_shards(model, out, samples, max(1, samples // 4), frames, height, width)
    return out


def write_spec(path: Path, model_dir: Path, shards: Path, *, steps: int, stage: int = 2, log_every: int = 1,
               workers: int = 2, **sections) -> Path:
    """A run spec with no checkpoints and no validation: what the benchmarks time is training alone."""
    spec: dict[str, dict] = {"run": {"output_dir": str(path.with_suffix(""))}, "model": {"path": str(model_dir)},
            "lora": {"rank": 16}, "data": {"shards": str(shards), "num_workers": workers},
            "train": {"max_steps": steps}, "deepspeed": {"config": f"zero{stage}"},
            "checkpoint": {"every_steps": 0, "every_minutes": None}, "logging": {"every_steps": log_every}}
    for section, values in sections.items():
        spec.setdefault(section, {}).update(values)
    path.write_text(yaml.safe_dump(spec))
    return path


def rank_env(rank: int, world_size: int, port: int) -> None:
    """What a launcher would set, for a rank started by torch.multiprocessing."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_WORLD_SIZE=str(world_size),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))


def print_table(title: str, header: list[str], rows: list[list]) -> None:
    """The trainer's table printer, numbers to 3 significant digits (whole numbers from 1,000)."""
    cells = [[c if isinstance(c, str) else f"{c:,.3g}" if abs(c) < 1000 else f"{c:,.0f}" for c in row] for row in rows]
    print()
    tables.print_table(tables.console(), title, cells, header=header)


def machine() -> str:
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()}, torch {torch.__version__}"
    return f"CPU, {os.cpu_count()} cores, torch {torch.__version__}"
