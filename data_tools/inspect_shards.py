#!/usr/bin/env python
"""Check a packed dataset against its manifest.json: read every sample of every shard, check its tensors'
shapes, dtypes and values, print a per-bucket summary, and exit 1 naming each bad shard and sample key.

    python data_tools/inspect_shards.py SHARDS_DIR
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from trainer.dtypes import from_torch_name
from trainer.reporting.tables import console, print_table
from trainer.shard_format import Sample, ShardError, decode_sample, raw_samples


@dataclass
class Report:
    problems: list[str] = field(default_factory=list)
    samples: Counter = field(default_factory=Counter)  # per bucket, as read
    shards: int = 0

    def bad(self, shard: str, key: str | None, problem: str) -> None:
        self.problems.append(str(ShardError(shard, key, problem)))


def check_sample(sample: Sample, manifest: dict, report: Report) -> None:
    meta = sample.meta
    bucket = f"{meta.get('num_frames')}x{meta.get('height')}x{meta.get('width')}"
    expected = manifest["buckets"].get(bucket)
    dtype = from_torch_name(manifest["dtype"])
    problems = []
    if expected is None:
        problems.append(f"bucket {bucket} (from its json) is not in manifest.json")
    elif list(sample.latents.shape) != expected["latents"]:
        problems.append(f"latents {list(sample.latents.shape)}, manifest says {expected['latents']} for {bucket}")
    if list(sample.prompt_embeds.shape) != manifest["prompt_embeds"]:
        problems.append(f"prompt_embeds {list(sample.prompt_embeds.shape)}, manifest says {manifest['prompt_embeds']}")
    for name, tensor in (("latents", sample.latents), ("prompt_embeds", sample.prompt_embeds)):
        if tensor.dtype != dtype:
            problems.append(f"{name} dtype {tensor.dtype}, manifest says {dtype}")
        if not torch.isfinite(tensor).all():
            problems.append(f"{name} holds NaN or inf")
    if not str(meta.get("caption", "")).strip():
        problems.append("empty caption in its json")
    image_to_video = manifest.get("kind") == "image-to-video"
    if image_to_video and sample.image is None:
        problems.append("no conditioning image, but manifest.json says the shards are image-to-video")
    elif not image_to_video and sample.image is not None:
        problems.append("a conditioning image in a text-to-video dataset")
    elif sample.image is not None and list(sample.image.shape) != [3, meta.get("height"), meta.get("width")]:
        problems.append(f"conditioning image {list(sample.image.shape)}, its json says {meta.get('height')}x"
                        f"{meta.get('width')}")
    for problem in problems:
        report.bad(sample.shard, sample.key, problem)
    if not problems:
        report.samples[bucket] += 1


def check_shard(path: Path, expected_count: int, manifest: dict, report: Report) -> None:
    count = 0
    try:
        for raw in raw_samples(str(path)):
            count += 1
            try:
                check_sample(decode_sample(raw), manifest, report)
            except ShardError as exc:
                report.problems.append(str(exc))
    except ShardError as exc:  # the tar itself is broken: nothing after this point can be read
        report.problems.append(str(exc))
        return
    if count != expected_count:
        report.bad(str(path), None, f"holds {count} samples, manifest.json says {expected_count}")


def inspect_dataset(out: Path) -> tuple[dict, Report]:
    manifest_path = out / "manifest.json"
    if not manifest_path.is_file():
        raise SystemExit(f"error: {manifest_path} does not exist: packing has not finished (rerun shard.py), "
                         f"or {out} was not written by data_tools/shard.py")
    manifest = json.loads(manifest_path.read_text())
    report = Report()
    listed = {s["file"]: s["samples"] for s in manifest["shards"]}
    on_disk = {p.name for p in out.glob("*.tar")}
    for name in sorted(on_disk - listed.keys()):
        report.bad(str(out / name), None, "is not listed in manifest.json")
    for name, count in sorted(listed.items()):
        if name not in on_disk:
            report.bad(str(out / name), None, "is listed in manifest.json but missing")
            continue
        report.shards += 1
        check_shard(out / name, count, manifest, report)
    if not report.problems:  # otherwise the counts are off for the reasons already named
        for bucket, info in manifest["buckets"].items():
            if report.samples[bucket] != info["samples"]:
                report.problems.append(f"bucket {bucket}: read {report.samples[bucket]} good samples, "
                                       f"manifest.json says {info['samples']}")
    empty = out / manifest["empty_prompt"]
    try:
        embeds = load_file(str(empty))["prompt_embeds"]
        if list(embeds.shape) != manifest["prompt_embeds"] or not torch.isfinite(embeds).all():
            report.problems.append(f"{empty}: shape {list(embeds.shape)} or values do not match manifest.json")
    except (OSError, SafetensorError, KeyError) as exc:
        report.problems.append(f"{empty}: cannot be read ({exc})")
    return manifest, report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("shards", type=Path, help="directory written by data_tools/shard.py")
    args = parser.parse_args(argv)
    manifest, report = inspect_dataset(args.shards)
    print_table(console(), f"{args.shards}: {report.shards} shards, dtype {manifest['dtype']}, prompt embeddings "
                f"{manifest['prompt_embeds']}",
                [(bucket, "x".join(map(str, info["latents"])), str(report.samples[bucket]), str(info["samples"]))
                 for bucket, info in manifest["buckets"].items()],
                header=("bucket (FxHxW)", "latents", "samples read", "manifest"))
    print(f"{manifest['rejected_total']} of {manifest['inputs']} inputs were rejected at packing "
          f"{manifest['rejected'] or ''}".rstrip())
    for problem in report.problems:
        print(f"BAD {problem}", file=sys.stderr)
    if report.problems:
        print(f"{len(report.problems)} problem(s) found", file=sys.stderr)
        return 1
    print("all samples check out")
    return 0


if __name__ == "__main__":
    sys.exit(main())
