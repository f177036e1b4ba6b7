"""The data tools as tools: inspect_shards.py on good and broken shards, every script's command line, and the
packing benchmark."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from data_tools.inspect_shards import inspect_dataset
from helpers import REPO
from trainer.shard_format import shard_samples


def test_inspect_passes_good_shards_and_names_bad_ones(packed_5b, tmp_path):
    ok = subprocess.run([sys.executable, "data_tools/inspect_shards.py", str(packed_5b)], cwd=REPO, capture_output=True,
                        text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr
    assert "9x96x128" in ok.stdout and "4x3x12x16" in ok.stdout and "all samples check out" in ok.stdout

    bad = tmp_path / "bad"
    shutil.copytree(packed_5b, bad)
    import webdataset as wds

    from trainer.shard_format import encode_sample
    samples = list(shard_samples(str(bad / "shard-000000.tar")))
    with wds.TarWriter(str(bad / "shard-000000.tar"), encoder=False) as sink:
        for s in samples:
            latents = s.latents.clone()
            if s.key == "000000002":
                latents[0, 0, 0, 0] = float("nan")
            sink.write(encode_sample(s.key, latents, s.prompt_embeds, s.meta))
    raw = (bad / "shard-000001.tar").read_bytes()
    (bad / "shard-000001.tar").write_bytes(raw[: len(raw) // 2])  # truncated mid-way
    _, report = inspect_dataset(bad)
    assert any("shard-000000.tar, sample '000000002': latents holds NaN or inf" in p for p in report.problems)
    assert any("shard-000001.tar" in p and "cannot be read" in p for p in report.problems)
    proc = subprocess.run([sys.executable, "data_tools/inspect_shards.py", str(bad)], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 1 and "sample '000000002'" in proc.stderr and "shard-000001.tar" in proc.stderr


@pytest.mark.parametrize("script", ["shard.py", "inspect_shards.py", "synth_videos.py", "synth.py", "tiny_model.py"])
def test_data_tools_run_as_scripts(script):
    """`python data_tools/X.py` puts data_tools/ first on sys.path: no module there may shadow the standard library
    (an inspect.py once crashed `import av`), and every script runs from there."""
    shadowing = {p.stem for p in (REPO / "data_tools").glob("*.py")} & sys.stdlib_module_names
    assert not shadowing
    proc = subprocess.run([sys.executable, f"data_tools/{script}", "--help"], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "usage:" in proc.stdout


def test_the_packing_benchmark_runs():
    """Not a timing test: the shipped benchmark must run and print its numbers."""
    proc = subprocess.run([sys.executable, "bench/pack.py", "--clips", "2"], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "ratio pack/bare = " in proc.stdout and "pack " in proc.stdout and "bare " in proc.stdout
