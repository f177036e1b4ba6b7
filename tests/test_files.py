"""File helpers the checkpoints rely on."""

from __future__ import annotations

import os

from trainer import files


def test_fsync_tree_skips_a_file_another_rank_renamed_away(tmp_path, monkeypatch):
    """Ranks flush one checkpoint tree at once; a temporary listed by one rank may be renamed by its writer
    before it is opened (seen in CI: a ZeRO-3 save failed with FileNotFoundError on '.tmp…')."""
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "rank_00000.safetensors").write_bytes(b"x")
    real_walk = os.walk

    def walk_listing_a_vanished_temporary(root):
        for folder, dirs, names in real_walk(root):
            yield folder, dirs, [*names, ".tmpgone"]

    monkeypatch.setattr(files.os, "walk", walk_listing_a_vanished_temporary)
    files.fsync_tree(tmp_path)  # must not raise
