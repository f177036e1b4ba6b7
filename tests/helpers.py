"""Helpers for tests that run the real entrypoint: free ports, ZeRO configs, the launcher, metrics."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

from trainer.process_env import free_port

REPO = Path(__file__).resolve().parents[1]
# Metadata every test sample carries (the shard format requires these fields).
META = {"caption": "c", "source": "test", "fps": 8, "num_frames": 9, "height": 96, "width": 128}


def zero_config(tmp_path: Path, stage: int) -> Path:
    """The shipped config of a stage; for ZeRO-3 with every parameter partitioned, so gathers really happen
    (tiny parameters sit under the default persistence threshold and would never be partitioned)."""
    config = json.loads((REPO / "ds_configs" / f"zero{stage}.json").read_text())
    if stage == 3:
        config["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    path = tmp_path / f"zero{stage}.json"
    path.write_text(json.dumps(config))
    return path


def write_spec(path: Path, spec: dict) -> Path:
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def train_env() -> dict[str, str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    # DeepSpeed JIT-builds its CPU shared-memory comm op once; keep it between runs and test sessions.
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "torch_extensions"))
    return env


def run_train(spec: Path, *, ranks: int | None = None, overrides: tuple[str, ...] = (), env: dict | None = None,
              timeout: int = 900) -> subprocess.CompletedProcess:
    """launch/train.py as a user runs it: a plain process (ranks=None) or under the deepspeed launcher."""
    args = ["launch/train.py", "--spec", str(spec), *[a for o in overrides for a in ("--set", o)]]
    if ranks is None:
        cmd = [sys.executable, *args]
    else:
        launcher = Path(sys.executable).with_name("deepspeed")
        cmd = [str(launcher), "--num_gpus", str(ranks), "--master_port", str(free_port()), *args]
    return subprocess.run(cmd, cwd=REPO, env={**train_env(), **(env or {})}, capture_output=True, text=True,
                          timeout=timeout)


def lora_file(folder: Path) -> dict:
    """The tensors of an exported adapter directory."""
    from safetensors.torch import load_file

    return load_file(folder / "pytorch_lora_weights.safetensors")


def lora(run_dir: Path) -> dict:
    return lora_file(run_dir / "lora")


def assert_equal_lora(ours: dict, theirs: dict) -> None:
    import torch

    assert ours.keys() == theirs.keys()
    different = [k for k in ours if not torch.equal(ours[k], theirs[k])]
    assert not different, f"{len(different)} LoRA tensors differ, e.g. {different[:2]}"


def run_python(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """A tool of this repository (a script or -m module) as a user runs it, from the repository root."""
    return subprocess.run([sys.executable, *args], cwd=REPO, env=train_env(), capture_output=True, text=True,
                          timeout=timeout)


def assert_same_run(run_dir: Path, reference: Path) -> None:
    """The exported LoRA tensors (and the moving average's, where the reference has one) are torch.equal and
    every optimizer step logged the same loss and caption-dropout fraction, once."""
    assert_equal_lora(lora(run_dir), lora(reference))
    assert (run_dir / "lora_ema").is_dir() == (reference / "lora_ema").is_dir()
    if (reference / "lora_ema").is_dir():
        assert_equal_lora(lora_file(run_dir / "lora_ema"), lora_file(reference / "lora_ema"))
    def logged(run: Path) -> list:
        return [(m["optimizer_step"], m["loss"], m.get("caption_dropout_fraction")) for m in read_metrics(run)]

    assert logged(run_dir) == logged(reference)


def read_metrics(run_dir: Path, validation: bool = False) -> list[dict]:
    """The training records of metrics.jsonl, or with validation=True the validation records."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if ("val_loss" in r) == validation]


def rewrite_shards(src: Path, dst: Path, edit) -> list[Path]:
    """Copy a directory of shards sample by sample; ``edit(shard_index, key, members)`` returns the members to
    write (changed or not) or None to leave the sample out. Keys and order are kept."""
    import webdataset as wds

    from trainer.shard_format import raw_samples

    dst.mkdir(parents=True, exist_ok=True)
    out = []
    for i, shard in enumerate(sorted(src.glob("*.tar"))):
        with wds.TarWriter(str(dst / shard.name), encoder=False) as sink:
            for raw in raw_samples(str(shard)):
                members = {k: v for k, v in raw.items() if not k.startswith("__") or k == "__key__"}
                members = edit(i, raw["__key__"], members)
                if members is not None:
                    sink.write(members)
        out.append(dst / shard.name)
    return out


def skip_or_fail(reason: str) -> None:
    """A cluster test that cannot run here is skipped with the reason; where REQUIRE_CLUSTER_TESTS=1 (.ci/run,
    on machines that can install the tools) that is a failure instead."""
    import pytest

    if os.environ.get("REQUIRE_CLUSTER_TESTS") == "1":
        pytest.fail(f"REQUIRE_CLUSTER_TESTS=1 but {reason}")
    pytest.skip(reason)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def wandb_records(run_file: Path) -> list:
    """The records of an offline W&B run file (``run-<id>.wandb``), parsed with wandb's own protobuf schema.
    wandb 0.31 writes them from its Go core and no longer ships its Python reader, so the file's framing
    (LevelDB's log format behind a 7-byte ``:W&B`` header: 32 KiB blocks of records with a 7-byte header each,
    a record split over blocks as FIRST, MIDDLE..., LAST) is read here."""
    import struct
    import zlib  # noqa: F401 (the checksum is the log format's masked CRC-32C; not checked here)

    from wandb.proto import wandb_internal_pb2

    raw, block, header = run_file.read_bytes(), 32768, 7
    ident, magic, version = struct.unpack("<4sHB", raw[:header])
    assert (ident, magic, version) == (b":W&B", 0xBEE1, 0), (ident, magic, version)
    records, index, parts = [], header, b""
    while index < len(raw):
        if block - index % block < header:  # the rest of a block too short for a header is padding
            index += block - index % block
            continue
        _, length, kind = struct.unpack("<IHB", raw[index:index + header])
        data = raw[index + header:index + header + length]
        index += header + length
        parts = data if kind in (1, 2) else parts + data  # FULL, FIRST start a record; MIDDLE, LAST go on
        if kind in (1, 4):  # FULL, LAST end it
            record = wandb_internal_pb2.Record()
            record.ParseFromString(parts)
            records.append(record)
    return records


def wandb_history(run_file: Path) -> list[dict]:
    """The history rows (what run.log wrote) of an offline W&B run file, values decoded from JSON."""
    rows = []
    for record in wandb_records(run_file):
        if record.WhichOneof("record_type") == "history":
            rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                         for item in record.history.item})
    return rows
