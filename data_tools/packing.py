"""Packing, chunk by chunk: the unit of work, of distribution and of resumption.

The input entries are cut into chunks of `shard_size` consecutive entries; chunk j becomes shard-<j>.tar.
A rank packs the chunks j with j % world_size == rank, so ranks are disjoint and a chunk's contents never
depend on the number of ranks. A chunk is finished when progress/chunk-<j>.json exists: it is written,
atomically, after its shard has been renamed into place, so a crash at any point leaves either a finished
chunk or one that the next run packs again (the shard bytes come out the same: fixed tar mtimes, per-sample
noise seeds). Whoever finishes last finds every chunk record present and writes manifest.json and
rejected.jsonl; their content is a pure function of the records, so two ranks writing them at once agree.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
from collections import Counter, deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import webdataset as wds
from safetensors.torch import save as st_save

from data_tools.inputs import Entry
from data_tools.video import Bucket, Clip, VideoError, decode_clip
from trainer.dtypes import PRECISIONS, torch_name
from trainer.errors import UserError
from trainer.families.base import Encoders
from trainer.files import atomic_write
from trainer.shard_format import EMPTY_PROMPT, IMAGE, encode_sample

FORMAT = "cogvideox-lora-trainer shards v1"


@dataclass(frozen=True)
class PackOptions:
    """Everything that decides the packed bytes; a rerun into the same directory must match it."""

    buckets: tuple[str, ...]
    fps: float | None  # None: frames spread evenly over each clip
    shard_size: int
    seed: int
    dtype: str
    vae_tiling: bool
    image: bool = False  # image-to-video: each sample also carries its clip's first frame

    def bucket_list(self) -> list[Bucket]:
        return [Bucket(*(int(v) for v in b.split("x"))) for b in self.buckets]


def shard_name(chunk: int) -> str:
    return f"shard-{chunk:06d}.tar"


def record_path(out: Path, chunk: int) -> Path:
    return out / "progress" / f"chunk-{chunk:06d}.json"


def dump_json(obj) -> bytes:
    return (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode()


def chunks(entries: list[Entry], shard_size: int) -> list[list[Entry]]:
    return [entries[i:i + shard_size] for i in range(0, len(entries), shard_size)]


def claim(out: Path, identity: dict, tag: str) -> None:
    """Record what this directory is packed from; refuse to mix a different input or options into it."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / "pack.json"
    if not path.exists():
        if any(out.glob("*.tar")):
            raise UserError(f"{out} already holds .tar files but no pack.json: it was not written by shard.py; "
                            f"pack into an empty directory")
        atomic_write(path, dump_json(identity), tag)  # every rank writes the same bytes
    before, now = _flat(json.loads(path.read_text())), _flat(identity)
    changed = sorted(k for k in before.keys() | now.keys() if before.get(k) != now.get(k))
    if changed:
        detail = "; ".join(f"{k}: {before.get(k)!r} -> {now.get(k)!r}" for k in changed)
        raise UserError(f"{out} was packed from a different input or with other options ({detail}). "
                        f"Pack into a new directory, or delete this one to start over")


def _flat(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat


def write_empty_prompt(out: Path, encoder: Encoders, dtype: torch.dtype, tag: str) -> None:
    """The embedding of "" that caption dropout trains on, once per dataset."""
    path = out / EMPTY_PROMPT
    if not path.exists():
        atomic_write(path, st_save({"prompt_embeds": encoder.text("").to(dtype).cpu().contiguous()}), tag)


def _decode(entry: Entry, buckets: list[Bucket], fps: float | None) -> Clip | VideoError | None:
    if entry.reason or entry.video is None:
        return None
    try:
        return decode_clip(entry.video, buckets, fps)
    except VideoError as exc:
        return exc
    except Exception as exc:  # a decoder failure on one odd file must not end the whole pack
        return VideoError("unreadable_video", f"{entry.video}: {type(exc).__name__}: {exc}")


def decoded(entries: list[Entry], buckets: list[Bucket], fps: float | None,
            workers: int) -> Iterator[tuple[Entry, Clip | VideoError | None]]:
    """Decode on `workers` threads (PyAV releases the GIL) a few clips ahead of the encoder; keep input order."""
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="decode") as pool:
        todo = iter(entries)
        ahead = deque((e, pool.submit(_decode, e, buckets, fps)) for e in itertools.islice(todo, workers + 1))
        while ahead:
            entry, future = ahead.popleft()
            if (nxt := next(todo, None)) is not None:
                ahead.append((nxt, pool.submit(_decode, nxt, buckets, fps)))
            yield entry, future.result()


def _rejection(entry: Entry, reason: str, detail: str) -> dict:
    return {"index": entry.index, "source": entry.source, "reason": reason, "detail": detail}


def _encode(entry: Entry, clip: Clip, encoder: Encoders, options: PackOptions) -> tuple[dict, dict]:
    """(tar members, the record's line) of one sample; VideoError when the encoders cannot give finite tensors."""
    store = PRECISIONS[options.dtype]
    assert entry.caption is not None, "an entry without a caption is rejected before decoding"
    try:
        latents = encoder.video(clip.frames, options.seed, entry.index).to(store).cpu()
        embeds = encoder.text(entry.caption).to(store).cpu()
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()  # one oversized clip must not end the pack; the next ones fit again
        raise VideoError("out_of_memory", f"{entry.source}: encoding {clip.bucket} ran out of memory "
                                          f"(keep VAE tiling on, or use a smaller bucket)") from None
    if not (torch.isfinite(latents).all() and torch.isfinite(embeds).all()):
        raise VideoError("non_finite", f"{entry.source}: the encoders returned NaN/inf")
    key = f"{entry.index:09d}"
    # the picture the image-to-video pipeline would be given for this clip: its first frame, as 8-bit RGB
    image = first_frame(clip.frames) if options.image else None
    meta = {"caption": entry.caption, "source": entry.source, "fps": clip.fps, "num_frames": clip.bucket.frames,
            "height": clip.bucket.height, "width": clip.bucket.width, "source_size": list(clip.source_size),
            "index": entry.index}
    line = {"key": key, "bucket": str(clip.bucket), "latents": list(latents.shape),
            "prompt_embeds": list(embeds.shape)}
    if image is not None:
        line["image"] = list(image.shape)
    return encode_sample(key, latents, embeds, meta, image), line


def first_frame(frames: torch.Tensor) -> torch.Tensor:
    """[F, 3, H, W] in [-1, 1] -> the first frame as uint8 [3, H, W] (data_tools/video.py's scaling, undone)."""
    return ((frames[0] + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)


def pack_chunk(chunk: int, entries: list[Entry], encoder: Encoders, options: PackOptions, out: Path, tag: str,
               decode_workers: int, on_entry: Callable[[], None]) -> dict:
    """Pack one chunk into its shard and write its record; returns the record."""
    samples, rejected = [], []
    tmp = out / f".{shard_name(chunk)}.partial-{tag}"
    with open(tmp, "wb") as f:
        # fixed mtime: the same input gives the same bytes
        with contextlib.closing(wds.TarWriter(f, encoder=False, mtime=0.0)) as sink:
            for entry, clip in decoded(entries, options.bucket_list(), options.fps, decode_workers):
                on_entry()
                if entry.reason:
                    rejected.append(_rejection(entry, entry.reason, entry.detail or ""))
                    continue
                if isinstance(clip, VideoError):
                    rejected.append(_rejection(entry, clip.reason, clip.detail))
                    continue
                assert clip is not None, "only a rejected entry has no clip"
                try:
                    members, line = _encode(entry, clip, encoder, options)
                except VideoError as exc:
                    rejected.append(_rejection(entry, exc.reason, exc.detail))
                    continue
                sink.write(members)
                samples.append(line)
        f.flush()
        os.fsync(f.fileno())  # on disk before the rename makes it visible
    if samples:
        os.replace(tmp, out / shard_name(chunk))
    else:
        tmp.unlink()
    record = {"chunk": chunk, "shard": shard_name(chunk) if samples else None, "entries": len(entries),
              "samples": samples, "rejected": rejected}
    atomic_write(record_path(out, chunk), dump_json(record), tag)
    return record


def read_record(out: Path, chunk: int) -> dict:
    return json.loads(record_path(out, chunk).read_text())


def finished(out: Path, chunk: int) -> bool:
    """The chunk's record exists, and so does its shard if it has one (someone may have deleted it)."""
    return record_path(out, chunk).exists() and (
        read_record(out, chunk)["shard"] is None or (out / shard_name(chunk)).exists())


def finalize(out: Path, num_chunks: int, identity: dict, model_dir: Path, encoder_configs: dict[str, dict],
             tag: str) -> dict | None:
    """manifest.json and rejected.jsonl once every chunk is finished (None while some are not)."""
    if not all(finished(out, j) for j in range(num_chunks)):
        return None
    for stale in [*out.glob(".shard-*.partial-*"), *(out / "progress").glob(".chunk-*.partial-*")]:
        stale.unlink(missing_ok=True)  # left by crashed runs: every chunk is finished, so no writer owns them
    records = [read_record(out, j) for j in range(num_chunks)]
    rejected = [r for rec in records for r in rec["rejected"]]
    atomic_write(out / "rejected.jsonl", b"".join(json.dumps(r, sort_keys=True).encode() + b"\n" for r in rejected),
                 tag)
    buckets: dict[str, dict] = {}
    for sample in (s for rec in records for s in rec["samples"]):
        frames, height, width = (int(v) for v in sample["bucket"].split("x"))
        b = buckets.setdefault(sample["bucket"], {"frames": frames, "height": height, "width": width,
                                                  "latents": sample["latents"], "samples": 0})
        b["samples"] += 1
    embeds = {tuple(s["prompt_embeds"]) for rec in records for s in rec["samples"]}
    image = identity["options"].get("image", False)
    manifest = {
        "format": FORMAT,
        # what the samples condition: a text-to-video directory trains text-to-video models only, and an
        # image-to-video one image-to-video models (its samples carry the first frame too)
        "kind": "image-to-video" if image else "text-to-video",
        **({"image": {"member": IMAGE, "what": "the clip's first frame, uint8 [3, height, width]"}} if image else {}),
        "samples": sum(b["samples"] for b in buckets.values()),
        "buckets": dict(sorted(buckets.items())),
        "prompt_embeds": list(next(iter(embeds))) if len(embeds) == 1 else sorted(map(list, embeds)),
        "dtype": torch_name(PRECISIONS[identity["options"]["dtype"]]),
        "shards": [{"file": rec["shard"], "samples": len(rec["samples"])} for rec in records if rec["shard"]],
        "empty_prompt": EMPTY_PROMPT,
        "inputs": sum(rec["entries"] for rec in records),
        "rejected": dict(sorted(Counter(r["reason"] for r in rejected).items())),
        "rejected_total": len(rejected),
        "input": identity["input"],
        "options": identity["options"],
        "model": {"path": str(model_dir), **encoder_configs},
    }
    atomic_write(out / "manifest.json", dump_json(manifest), tag)
    return manifest


def identity_of(options: PackOptions, layout: str, input_path: Path, fingerprint: str, entries: int,
                encoder_configs: dict[str, dict], compute: str) -> dict:
    vae, text = encoder_configs["vae"], encoder_configs["text_encoder"]
    chosen = asdict(options)
    if not options.image:
        del chosen["image"]  # text-to-video packs keep the identity they had before image-to-video existed
    return json.loads(json.dumps({"format": FORMAT, "options": chosen, "compute": compute,
            "input": {"path": str(input_path), "layout": layout, "entries": entries, "fingerprint": fingerprint},
            "model": {"vae_scaling_factor": vae.get("scaling_factor"), "latent_channels": vae["latent_channels"],
                      "text_hidden_size": text.get("d_model")}}))  # as it reads back from pack.json
