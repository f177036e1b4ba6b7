"""Shared fixtures: tiny CogVideoX model directories and synthetic shards, built once per test session."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from data_tools.synth import write_synthetic_shards  # noqa: E402
from data_tools.synth_videos import write_synthetic_videos  # noqa: E402
from data_tools.tiny_model import write_tiny_model  # noqa: E402

# DeepSpeed's CPU shared-memory all-reduce never unlinks /dev/shm/deepspeed_allreduce_buffer_* (about 100 MB per
# rank and run, named by the master port): a test session would fill the machine's RAM. The session removes the
# ones it created once every rank it started has exited: in the controlling process, which under pytest-xdist
# finishes after its workers (a worker that removed them could pull one from under the other worker's ranks).
SHM_BEFORE = pytest.StashKey[set]()


# Under pytest-xdist (tests/run.sh) each file runs on one worker, handed out in collection order: the longest
# files first, so that neither worker is left with one at the end (seconds measured on the 2-core machine).
LONGEST_FIRST = ["test_resume", "test_faults", "test_slurm", "test_bench", "test_memory_modes", "test_sequence",
                 "test_launchers", "test_train_e2e", "test_validation", "test_ema", "test_i2v_e2e", "test_cli_errors",
                 "test_lint", "test_engine", "test_packing"]


def pytest_collection_modifyitems(config, items):
    if getattr(config.option, "numprocesses", None):
        rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
        items.sort(key=lambda item: rank.get(item.path.stem, len(rank)))  # stable: the rest keep their order


def _shm_buffers() -> set[Path]:
    return set(Path("/dev/shm").glob("deepspeed_allreduce_buffer_*"))


def pytest_sessionstart(session):
    if not hasattr(session.config, "workerinput"):
        session.config.stash[SHM_BEFORE] = _shm_buffers()


def pytest_sessionfinish(session, exitstatus):
    if not hasattr(session.config, "workerinput"):
        for path in _shm_buffers() - session.config.stash.get(SHM_BEFORE, set()):
            path.unlink(missing_ok=True)


@pytest.fixture(scope="session")
def tiny_5b(tmp_path_factory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("model") / "tiny-5b", "5b")


@pytest.fixture(scope="session")
def tiny_2b(tmp_path_factory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("model") / "tiny-2b", "2b")


@pytest.fixture(scope="session")
def tiny_15(tmp_path_factory) -> Path:
    """CogVideoX 1.5-style: patch_size_t 2, native clip 17x96x128 at 16 fps (5 latent frames, padded to 6)."""
    return write_tiny_model(tmp_path_factory.mktemp("model") / "tiny-1.5", "1.5")


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


def _pack(videos: Path, model: Path, out: Path, shard_size: int) -> Path:
    """data_tools/shard.py as a user runs it, with the model's own defaults (its native clip and fps)."""
    proc = subprocess.run([sys.executable, "data_tools/shard.py", "--input", str(videos), "--model", str(model),
                           "--out", str(out), "--shard-size", str(shard_size)], cwd=REPO, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.fixture(scope="session")
def packed_5b(videos, tiny_5b, tmp_path_factory) -> Path:
    """The six videos packed for the 5B-style model: 9x96x128 at 8 fps, four samples per shard."""
    return _pack(videos, tiny_5b, tmp_path_factory.mktemp("packed") / "tiny-5b", 4)


@pytest.fixture(scope="session")
def packed_15(videos, tiny_15, tmp_path_factory) -> Path:
    """The six videos packed for the 1.5-style model: 17x96x128 at 16 fps, one sample per shard."""
    return _pack(videos, tiny_15, tmp_path_factory.mktemp("packed") / "tiny-1.5", 1)


@pytest.fixture(scope="session")
def tiny_5b_i2v(tmp_path_factory) -> Path:
    """CogVideoX-5b-I2V-style: 8 input channels (video and image latents), learned positions: 9x96x128 only."""
    return write_tiny_model(tmp_path_factory.mktemp("model") / "tiny-5b-i2v", "5b-i2v")


@pytest.fixture(scope="session")
def tiny_15_i2v(tmp_path_factory) -> Path:
    """CogVideoX1.5-5B-I2V-style: the 1.5 flavour with 8 input channels and an ofs embedding."""
    return write_tiny_model(tmp_path_factory.mktemp("model") / "tiny-1.5-i2v", "1.5-i2v")


@pytest.fixture(scope="session")
def packed_5b_i2v(videos, tiny_5b_i2v, tmp_path_factory) -> Path:
    """The six videos packed for the 5B-I2V-style model (each sample with its first frame), two per shard."""
    return _pack(videos, tiny_5b_i2v, tmp_path_factory.mktemp("packed") / "tiny-5b-i2v", 2)


@pytest.fixture(scope="session")
def packed_15_i2v(videos, tiny_15_i2v, tmp_path_factory) -> Path:
    """The six videos packed for the 1.5-I2V-style model: 17x96x128 at 16 fps with first frames, two per shard."""
    return _pack(videos, tiny_15_i2v, tmp_path_factory.mktemp("packed") / "tiny-1.5-i2v", 2)
