"""Shared fixtures: tiny CogVideoX model directories and synthetic shards, built once per test session."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from data_tools.synth import write_synthetic_shards  # noqa: E402
from data_tools.synth_videos import write_synthetic_videos  # noqa: E402
from data_tools.tiny_model import write_tiny_model  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def no_leaked_shm_buffers():
    """DeepSpeed's CPU shared-memory all-reduce never unlinks /dev/shm/deepspeed_allreduce_buffer_* (about 100 MB
    per rank and run, named by the master port): a test session would fill the machine's RAM. Remove the ones
    this session created, once every rank it started has exited."""
    shm = Path("/dev/shm")
    before = set(shm.glob("deepspeed_allreduce_buffer_*"))
    yield
    for path in set(shm.glob("deepspeed_allreduce_buffer_*")) - before:
        path.unlink(missing_ok=True)


@pytest.fixture(scope="session")
def tiny_5b(tmp_path_factory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("model") / "tiny-5b", "5b")


@pytest.fixture(scope="session")
def tiny_2b(tmp_path_factory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("model") / "tiny-2b", "2b")


def _shards(model: Path, factory, name: str, samples: int, per_shard: int) -> Path:
    out = factory.mktemp("shards") / name
    write_synthetic_shards(model, out, samples=samples, samples_per_shard=per_shard)
    return out


@pytest.fixture(scope="session")
def shards_5b(tiny_5b, tmp_path_factory) -> Path:
    return _shards(tiny_5b, tmp_path_factory, "tiny-5b", 4, 1)


@pytest.fixture(scope="session")
def shards_10(tiny_5b, tmp_path_factory) -> Path:
    """Ten samples in five shards: an epoch is 2.5 optimizer steps of 2 ranks x 2 micro-batches."""
    return _shards(tiny_5b, tmp_path_factory, "tiny-5b-10", 10, 2)


@pytest.fixture(scope="session")
def shards_2b(tiny_2b, tmp_path_factory) -> Path:
    return _shards(tiny_2b, tmp_path_factory, "tiny-2b", 4, 1)


@pytest.fixture(scope="session")
def videos(tmp_path_factory) -> Path:
    """Six real mp4 files (12 frames, 120x160, 8 fps) in the CogVideo finetune layout."""
    out = tmp_path_factory.mktemp("videos") / "cogvideo"
    write_synthetic_videos(out, count=6)
    return out
