"""The input layouts data_tools/shard.py packs, read into one ordered list of entries.

- CogVideo finetune layout: a directory with prompts.txt and videos.txt, line N of one matching line N of the other.
- A manifest: .csv (header row) or .jsonl, with video and caption columns; paths relative to the manifest.
- A directory of videos, each with a same-stem .txt caption beside it (searched recursively, sorted by path).

Every entry keeps its position in the input (its index), so chunking, sample keys and noise seeds do not
depend on which entries are later rejected or on how many ranks pack them. An entry that is bad before any
video is opened (no caption, an empty caption, a row without a column) carries its problem with it.
"""

from __future__ import annotations

import csv
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

VIDEO_SUFFIXES = {".mp4", ".mov", ".mkv", ".webm", ".avi", ".m4v", ".gif"}


class InputError(ValueError):
    """The input as a whole cannot be read (wrong layout, mismatched files, a header without a column)."""


@dataclass(frozen=True)
class Entry:
    index: int
    source: str  # the video as the input names it, for messages and the sample's json
    video: Path | None
    caption: str | None
    reason: str | None = None  # set when the entry is rejected before decoding
    detail: str | None = None


def _entry(index: int, base: Path, source: str | None, caption: str | None, where: str) -> Entry:
    """An entry, or a rejected one whose detail says where in the input it came from."""
    if not source:
        return Entry(index, where, None, caption, "missing_column", f"{where}: no video path")
    video = (base / source).resolve()
    if caption is None:
        return Entry(index, source, video, None, "missing_column", f"{where}: no caption")
    caption = caption.strip()
    if not caption:
        return Entry(index, source, video, "", "empty_caption", f"{where}: the caption is empty")
    return Entry(index, source, video, caption)


def _lines(path: Path) -> list[str]:
    lines = path.read_text(encoding="utf-8-sig").splitlines()  # -sig: drop the BOM some editors write
    while lines and not lines[-1].strip():  # a trailing blank line is not an entry
        lines.pop()
    return lines


def read_cogvideo(root: Path) -> list[Entry]:
    videos = _lines(root / "videos.txt")
    # A blank prompt line opposite a video is that video's (empty) caption, the last one included; blank lines
    # past the last video are not entries.
    prompts = (root / "prompts.txt").read_text(encoding="utf-8-sig").splitlines()
    if len(prompts) > len(videos) and not any(line.strip() for line in prompts[len(videos):]):
        prompts = prompts[:len(videos)]
    if len(prompts) != len(videos):
        raise InputError(f"{root}: prompts.txt has {len(_lines(root / 'prompts.txt'))} lines but videos.txt has "
                         f"{len(videos)}; line N of one must caption line N of the other")
    return [_entry(i, root, v.strip(), p, f"videos.txt line {i + 1}")
            for i, (v, p) in enumerate(zip(videos, prompts, strict=True))]


def read_manifest(path: Path, video_column: str, caption_column: str) -> list[Entry]:
    base = path.parent
    entries = []
    if path.suffix.lower() == ".csv":
        with path.open(newline="", encoding="utf-8-sig") as f:  # Excel's CSV export starts with a BOM
            reader = csv.DictReader(f)
            missing = [c for c in (video_column, caption_column) if c not in (reader.fieldnames or [])]
            if missing:
                raise InputError(f"{path}: the header has no column {missing} (it has {reader.fieldnames})")
            for i, row in enumerate(reader):
                entries.append(_entry(i, base, row.get(video_column), row.get(caption_column),
                                      f"{path.name} line {reader.line_num}"))  # rows may span lines
        return entries
    for i, line in enumerate(_lines(path)):
        where = f"{path.name} line {i + 1}"
        try:
            row = json.loads(line)
            if not isinstance(row, dict):
                raise ValueError("not a JSON object")
        except ValueError as exc:
            entries.append(Entry(i, where, None, None, "invalid_row", f"{where}: {exc}"))
            continue
        video, text = row.get(video_column), row.get(caption_column)
        entries.append(_entry(i, base, video if isinstance(video, str) else None,
                              text if isinstance(text, str) else None, where))
    return entries


def read_video_dir(root: Path) -> list[Entry]:
    videos = sorted(p for p in root.rglob("*") if p.suffix.lower() in VIDEO_SUFFIXES and p.is_file())
    entries = []
    for i, video in enumerate(videos):
        source = str(video.relative_to(root))
        text_file = video.with_suffix(".txt")
        if not text_file.is_file():
            entries.append(Entry(i, source, video, None, "missing_caption", f"{source}: no {text_file.name} beside it"))
            continue
        try:
            text = text_file.read_text(encoding="utf-8-sig")
        except (OSError, UnicodeDecodeError) as exc:
            entries.append(Entry(i, source, video, None, "unreadable_caption", f"{text_file}: {exc}"))
            continue
        entries.append(_entry(i, root, source, text, text_file.name))
    return entries


def read_inputs(path: Path, video_column: str = "video", caption_column: str = "caption") -> tuple[str, list[Entry]]:
    """(layout name, entries) for --input."""
    if path.is_file() and path.suffix.lower() in {".csv", ".jsonl"}:
        return f"{path.suffix[1:].lower()} manifest", read_manifest(path, video_column, caption_column)
    if path.is_dir() and (path / "prompts.txt").is_file() and (path / "videos.txt").is_file():
        return "cogvideo (prompts.txt + videos.txt)", read_cogvideo(path)
    if path.is_dir():
        entries = read_video_dir(path)
        if not entries:
            raise InputError(f"{path}: no prompts.txt + videos.txt and no video files "
                             f"({', '.join(sorted(VIDEO_SUFFIXES))})")
        return "video directory with .txt captions", entries
    if path.exists():
        raise InputError(f"{path}: expected a directory, a .csv or a .jsonl manifest")
    raise InputError(f"{path}: no such file or directory")


def fingerprint(entries: list[Entry]) -> str:
    """Changes when any entry's video path or caption changes: a rerun must pack the same input."""
    digest = hashlib.sha256()
    for e in entries:
        digest.update(json.dumps([e.index, e.source, e.caption, e.reason]).encode())
    return digest.hexdigest()[:16]
