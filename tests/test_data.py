"""The shard reader: shard resolution, per-rank/worker splits, seeded order, endless epochs, shape buckets."""

from __future__ import annotations

import itertools
import json
from collections import Counter
from pathlib import Path

import pytest
import torch
import webdataset as wds

from helpers import META
from trainer.data import ShardStream, batches, build_loader, check_shards_fit, loader_workers, resolve_shards
from trainer.errors import UserError
from trainer.model import ModelShapes
from trainer.shard_format import ShardError, decode_sample, encode_sample



def write_shards(root: Path, shapes_per_shard: list[list[tuple[int, int, int, int]]], text=(226, 32)) -> list[str]:
    """Shards of samples with the given latent shapes; each sample's latents are filled with its index."""
    root.mkdir(parents=True, exist_ok=True)
    index = itertools.count()
    for s, shapes in enumerate(shapes_per_shard):
        with wds.TarWriter(str(root / f"part-{s:03d}.tar"), encoder=False) as sink:
            for shape in shapes:
                i = next(index)
                sink.write(encode_sample(f"s{i:04d}", torch.full(shape, float(i)), torch.zeros(text), META))
    return [str(p) for p in sorted(root.glob("*.tar"))]


def sample_ids(batch) -> list[int]:
    return [int(k[1:]) for k in batch.keys]


@pytest.fixture
def shapes(tiny_5b) -> ModelShapes:
    return ModelShapes.from_model_dir(tiny_5b)


def test_resolve_shards_forms_and_errors(tmp_path):
    paths = write_shards(tmp_path / "d", [[(4, 3, 12, 16)]] * 3)
    assert resolve_shards(str(tmp_path / "d")) == paths
    assert resolve_shards(str(tmp_path / "d" / "part-{000..002}.tar")) == paths
    assert resolve_shards(str(tmp_path / "d" / "part-*.tar")) == paths
    assert resolve_shards([paths[2], paths[0], paths[2]]) == [paths[2], paths[0]]
    with pytest.raises(UserError, match=r"data.shards: .*names missing files: .*part-003.tar"):
        resolve_shards(str(tmp_path / "d" / "part-{000..003}.tar"))
    with pytest.raises(UserError, match="data.shards: no such file or directory"):
        resolve_shards(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="matches no .tar file"):
        resolve_shards(str(tmp_path / "empty"))


def epoch_of(stream_factory, world_size: int, workers: int, epoch: int) -> list[list[str]]:
    return [stream_factory(rank).shards_for(epoch, w, workers) for rank in range(world_size) for w in range(workers)]


def test_each_rank_and_worker_reads_disjoint_shards_in_a_seeded_order(tmp_path, shapes):
    paths = write_shards(tmp_path, [[(4, 3, 12, 16)]] * 12)

    def stream(rank, seed=7):
        return ShardStream(paths, rank=rank, world_size=2, seed=seed, micro_batch_size=1, shuffle_buffer=0,
                           shapes=shapes)

    for epoch in range(3):
        readers = epoch_of(stream, 2, 3, epoch)
        flat = [s for reader in readers for s in reader]
        assert sorted(flat) == sorted(paths) and len(flat) == len(paths)  # disjoint, complete
    assert epoch_of(stream, 2, 3, 0) != epoch_of(stream, 2, 3, 1)  # reshuffled each epoch
    assert epoch_of(stream, 2, 3, 0) == epoch_of(stream, 2, 3, 0)  # deterministic
    assert epoch_of(lambda r: stream(r, seed=8), 2, 3, 0) != epoch_of(stream, 2, 3, 0)


def test_stream_is_endless_and_reproducible(tmp_path, shapes):
    paths = write_shards(tmp_path, [[(4, 3, 12, 16)] * 3] * 4)  # 12 samples

    def first(n):
        stream = ShardStream(paths, rank=1, world_size=2, seed=3, micro_batch_size=1, shuffle_buffer=4, shapes=shapes)
        return [sample_ids(b)[0] for b in itertools.islice(iter(stream), n)]

    ids = first(30)  # rank 1 holds 6 samples per epoch: 5 epochs
    assert ids == first(30)
    for epoch in range(5):
        chunk = ids[epoch * 6:(epoch + 1) * 6]
        assert len(set(chunk)) == 6  # every sample of the epoch exactly once
    assert ids[:6] != ids[6:12]


def test_micro_batches_hold_one_latent_shape(tmp_path, shapes):
    small, large = (4, 3, 12, 16), (4, 2, 8, 8)
    paths = write_shards(tmp_path, [[small, large, small, large, small, large]] * 2)
    stream = ShardStream(paths, rank=0, world_size=1, seed=0, micro_batch_size=3, shuffle_buffer=0, shapes=shapes)
    seen = Counter()
    for batch in itertools.islice(iter(stream), 8):
        assert batch.latents.shape[0] == 3 and batch.prompt_embeds.shape == (3, 226, 32)
        for i, latent in zip(sample_ids(batch), batch.latents):
            assert (latent == i).all()  # each row is its own sample
        seen[tuple(batch.latents.shape[1:])] += 1
    assert seen[small] == 4 and seen[large] == 4


def test_loader_workers_together_read_everything(tmp_path, shapes):
    paths = write_shards(tmp_path, [[(4, 3, 12, 16)] * 2] * 4)
    loader = build_loader(paths, rank=0, world_size=1, seed=0, micro_batch_size=1, shuffle_buffer=0,
                          num_workers=2, shapes=shapes, pin_memory=False)
    ids = [sample_ids(b)[0] for b in itertools.islice(batches(loader), 8)]
    assert sorted(ids) == list(range(8))
    assert loader_workers(4, world_size=2, num_workers=3) == 2  # one shard per worker at most
    assert loader_workers(4, world_size=1, num_workers=0) == 0
    with pytest.raises(UserError, match=r"data.shards: 4 shard\(s\) for 5 ranks"):
        loader_workers(4, world_size=5, num_workers=1)


def test_a_bad_sample_in_a_worker_arrives_as_itself(tmp_path, shapes):
    paths = write_shards(tmp_path, [[(4, 3, 12, 16)], [(4, 3, 12, 16)]], text=(226, 64))
    loader = build_loader(paths, rank=0, world_size=1, seed=0, micro_batch_size=1, shuffle_buffer=0,
                          num_workers=2, shapes=shapes, pin_memory=False)
    with pytest.raises(ShardError) as info:
        next(batches(loader))
    assert "prompt embeddings are [226, 64]" in str(info.value) and ".tar, sample 's000" in str(info.value)


def test_startup_check_names_the_shard_and_key(tmp_path, shapes):
    paths = write_shards(tmp_path, [[(16, 3, 12, 16)]])
    with pytest.raises(ShardError, match=r"part-000.tar, sample 's0000': latents have 16 channels"):
        check_shards_fit(paths, shapes, tmp_path)
    (tmp_path / "junk.tar").write_bytes(b"not a tar file at all" * 30)
    with pytest.raises(UserError, match="junk.tar"):
        check_shards_fit([str(tmp_path / "junk.tar")], shapes, tmp_path)


def test_decode_rejects_missing_members_and_non_safetensors():
    raw = encode_sample("k", torch.zeros(4, 3, 12, 16), torch.zeros(226, 32), META)
    raw.update(__url__="x.tar")
    assert decode_sample(raw).latents.shape == (4, 3, 12, 16)
    with pytest.raises(ShardError, match=r"missing member\(s\) \['prompt_embeds.safetensors'\]"):
        decode_sample({k: v for k, v in raw.items() if k != "prompt_embeds.safetensors"})
    with pytest.raises(ShardError, match="latents.safetensors is not a valid safetensors blob"):
        decode_sample({**raw, "latents.safetensors": b"\x80\x04pickle?"})
    with pytest.raises(ShardError, match="metadata is not valid JSON"):
        decode_sample({**raw, "json": b"{"})
    assert json.loads(raw["json"]) == META


def test_a_truncated_shard_is_named_not_a_traceback(tmp_path, shapes):
    paths = write_shards(tmp_path, [[(4, 3, 12, 16)] * 3])
    data = Path(paths[0]).read_bytes()
    Path(paths[0]).write_bytes(data[: len(data) // 2])  # cut mid-sample, as an interrupted copy leaves it
    stream = ShardStream(paths, rank=0, world_size=1, seed=0, micro_batch_size=1, shuffle_buffer=0, shapes=shapes)
    with pytest.raises(ShardError, match=r"shard .*part-000.tar: cannot be read after sample 's000"):
        list(itertools.islice(batches(stream), 5))


def test_empty_shards_stop_the_stream_instead_of_spinning(tmp_path, shapes):
    paths = write_shards(tmp_path, [[], [(4, 3, 12, 16)]])
    empty = ShardStream(paths, rank=0, world_size=2, seed=0, micro_batch_size=1, shuffle_buffer=0, shapes=shapes)
    full = ShardStream(paths, rank=1, world_size=2, seed=0, micro_batch_size=1, shuffle_buffer=0, shapes=shapes)
    owner_of_empty = empty if empty.shards_for(0, 0, 1) == [paths[0]] else full
    with pytest.raises(ShardError, match=r"part-000.tar: hold no samples \(rank \d, loader worker 0\)"):
        next(batches(owner_of_empty))
