"""Durable file writes: what a crash (or a SIGKILL) leaves behind is the old file or the new one, never half."""

from __future__ import annotations

import os
from pathlib import Path


def fsync_dir(path: Path) -> None:
    """Make a rename or new entries in ``path`` survive a machine crash, not only a process kill."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes, tag: str = "") -> None:
    """Write to a temporary name, flush it to disk, then rename: readers see all of it or nothing.
    ``tag`` keeps concurrent writers' temporary files apart."""
    tmp = path.with_name(f".{path.name}.partial{'-' + tag if tag else ''}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def fsync_tree(root: Path) -> None:
    """Flush every file under ``root`` (written by libraries that do not fsync) and the folders holding them.

    Other ranks may still be writing into the same tree: a file can vanish between listing and opening (a
    temporary renamed into place). Its writer flushes the final file in its own call, so skip it here."""
    for folder, _, files in os.walk(root):
        for name in files:
            try:
                fd = os.open(os.path.join(folder, name), os.O_RDONLY)
            except FileNotFoundError:
                continue
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(folder))
