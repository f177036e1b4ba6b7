"""The data path: shard resolution, the sample index and its faults, the global micro-batch sequence."""

from __future__ import annotations

import itertools
import json
import os
import re
import tarfile
import threading
from collections import Counter
from pathlib import Path

import pytest
import torch
import webdataset as wds

from helpers import META
from trainer.data import DataPosition, MicroBatches, read_sample, resolve_shards, streaming
from trainer.errors import UserError
from trainer.families import family_for
from trainer.shard_format import SampleShapes, ShardError, decode_sample, encode_sample, shard_samples
from trainer.shard_index import Extent, ShardIndex, build_index, tensor_header


def write_shards(root: Path, shapes_per_shard: list[list[tuple[int, int, int, int]]], text=(226, 32),
                 edit=None) -> list[str]:
    """Shards of samples with the given latent shapes; each sample's latents are filled with its index.
    ``edit(i, members)`` may change sample i's member dict before it is written."""
    root.mkdir(parents=True, exist_ok=True)
    index = itertools.count()
    for s, shapes in enumerate(shapes_per_shard):
        with wds.TarWriter(str(root / f"part-{s:03d}.tar"), encoder=False) as sink:
            for shape in shapes:
                i = next(index)
                members = encode_sample(f"s{i:04d}", torch.full(shape, float(i)), torch.zeros(text), META)
                sink.write(edit(i, members) if edit else members)
    return [str(p) for p in sorted(root.glob("*.tar"))]


def sample_ids(batch) -> list[int]:
    return [int(k[1:]) for k in batch.keys]


@pytest.fixture
def shapes(tiny_5b) -> SampleShapes:
    return family_for(tiny_5b).sample_shapes()


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


def dataset(index, *, rank=0, world_size=1, position=None, group=None, seed=7, micro=1, shapes):
    return MicroBatches(index, seed=seed, micro_batch_size=micro, position=position, group=group, rank=rank,
                        world_size=world_size, shapes=shapes)


def test_every_epoch_is_a_seeded_permutation_of_all_samples(tmp_path, shapes):
    index = build_index(write_shards(tmp_path, [[(4, 3, 12, 16)] * 3] * 4), shapes)
    assert len(index.samples) == 12 and not index.faults
    data = dataset(index, shapes=shapes)
    assert data.per_epoch == 12
    epochs = [[sample_ids(data[e * 12 + j])[0] for j in range(12)] for e in range(3)]
    assert all(sorted(epoch) == list(range(12)) for epoch in epochs)  # every sample once per epoch
    assert epochs[0] != epochs[1] != epochs[2]  # reshuffled each epoch
    assert epochs[0] == [sample_ids(dataset(index, shapes=shapes)[j])[0] for j in range(12)]  # reproducible
    assert epochs[0] != [sample_ids(dataset(index, seed=8, shapes=shapes)[j])[0] for j in range(12)]


def test_the_sequence_is_one_for_any_number_of_ranks_and_resumes_from_samples_seen(tmp_path, shapes):
    """Rank r of W takes global micro-batch k*W + r from the start position: 2 ranks together read exactly what
    1 rank reads with the same micro-batches per step (group), and a run resumed at its position on another
    number of ranks neither repeats nor skips a sample."""
    index = build_index(write_shards(tmp_path, [[(4, 3, 12, 16)] * 5] * 2), shapes)  # 10 samples, 2 epochs below
    one = [sample_ids(dataset(index, group=2, shapes=shapes)[k])[0] for k in range(20)]  # 1 rank x accumulation 2
    two = [dataset(index, rank=r, world_size=2, shapes=shapes) for r in range(2)]  # 2 ranks x accumulation 1
    interleaved = [sample_ids(two[k % 2][k // 2])[0] for k in range(20)]
    assert interleaved == one
    # 2 ranks ran 6 steps (12 micro-batches, into epoch 2); 1 rank with accumulation 2 takes over
    assert two[0].position_at(12) == DataPosition(1, 2, 2)
    resumed = dataset(index, position=DataPosition(1, 2, 2), group=2, shapes=shapes)
    assert [sample_ids(resumed[k])[0] for k in range(8)] == one[12:20]
    assert resumed[0].position == (1, 2)  # epoch 1, its third micro-batch


def test_every_optimizer_step_trains_one_shape_and_another_group_finishes_the_epoch_in_its_order(tmp_path, shapes):
    small, large = (4, 3, 12, 16), (4, 2, 8, 8)
    index = build_index(write_shards(tmp_path, [[small] * 9, [large] * 7]), shapes)
    shape_of = {i: ref.shape for i, ref in enumerate(index.samples)}
    # 2 ranks x accumulation 2: 4 micro-batches per optimizer step
    ranks = [dataset(index, rank=r, world_size=2, group=4, shapes=shapes) for r in range(2)]
    assert ranks[0].per_epoch == 8 + 4  # a shape's last partial step is dropped: 1 small and 3 large
    step_shapes = []
    for step in range(3 * 12 // 4):  # three epochs
        batches = [ranks[r][2 * step + m] for m in range(2) for r in range(2)]  # every rank, every micro-step
        step_shapes.append({shape_of[i] for b in batches for i in sample_ids(b)})
    assert all(len(shapes_) == 1 for shapes_ in step_shapes)
    assert {next(iter(s)) for s in step_shapes} == {small, large}
    mixed = dataset(index, rank=0, world_size=1, group=1, shapes=shapes)  # micro-batch by micro-batch, as before
    assert any(len({shape_of[sample_ids(mixed[4 * s + m])[0]] for m in range(4)}) > 1 for s in range(9))
    for epoch in range(3):
        ids = [i for batch in ranks[0].epoch_plan(epoch) for i in batch]
        assert len(ids) == len(set(ids)) == 12

    # one step trained (4 micro-batches of epoch 0), then 1 rank x accumulation 2 takes over: the rest of epoch 0
    # in epoch 0's order, then epochs planned for 2 micro-batches a step
    position = ranks[0].position_at(4)
    assert position == DataPosition(0, 4, 4)
    resumed = dataset(index, position=position, group=2, shapes=shapes)
    before = [i for k in range(2) for r in range(2) for i in sample_ids(ranks[r][k])]
    after = [i for k in range(8) for i in sample_ids(resumed[k])]
    assert sorted(before + after) == sorted(i for b in ranks[0].epoch_plan(0) for i in b)  # none lost or repeated
    assert resumed[8].position == (1, 0) and resumed.position_at(8) == DataPosition(1, 0, 2)
    later = [{shape_of[sample_ids(resumed[k])[0]] for k in (s, s + 1)} for s in range(8, 8 + 2 * 6, 2)]
    assert all(len(s) == 1 for s in later)
    # 3 micro-batches a step: the 8 left of epoch 0 are 2 steps and 2 dropped, and epoch 1 starts on a step
    odd = dataset(index, position=position, group=3, shapes=shapes)
    assert odd.position_at(5) == DataPosition(0, 9, 4) and odd.position_at(6) == DataPosition(1, 0, 3)
    assert all(len({shape_of[sample_ids(odd[k])[0]] for k in range(s, s + 3)}) == 1 for s in range(6, 6 + 3 * 6, 3))


def test_micro_batches_hold_one_latent_shape_and_drop_partial_ones(tmp_path, shapes):
    small, large = (4, 3, 12, 16), (4, 2, 8, 8)
    index = build_index(write_shards(tmp_path, [[small, large, small, large, small, large, small]] * 2), shapes)
    data = dataset(index, micro=3, shapes=shapes)
    assert data.per_epoch == 2 + 2  # 8 small and 6 large samples: 2 full micro-batches each, 2 small left over
    seen = Counter()
    for k in range(3 * data.per_epoch):
        batch = data[k]
        assert batch.latents.shape[0] == 3 and batch.prompt_embeds.shape == (3, 226, 32) and batch.valid.all()
        for i, latent in zip(sample_ids(batch), batch.latents, strict=True):
            assert (latent == i).all()  # each row is its own sample
        seen[tuple(batch.latents.shape[1:])] += 1
    assert seen[small] == 6 and seen[large] == 6
    with pytest.raises(UserError, match="no latent shape has the 9 samples of one optimizer step"):
        dataset(index, micro=9, shapes=shapes)


@pytest.mark.parametrize("threads", [0, 1, 3])
def test_reader_threads_return_the_sequence_in_order_and_stop_on_the_way_out(tmp_path, shapes, threads):
    index = build_index(write_shards(tmp_path, [[(4, 3, 12, 16)] * 2] * 4), shapes)
    data = dataset(index, rank=1, world_size=2, position=DataPosition(1, 2, 2), micro=2, shapes=shapes)
    with streaming(data, threads=threads) as stream:
        got = list(itertools.islice(stream, 9))  # past the end of an epoch (4 micro-batches each)
    assert not [t for t in threading.enumerate() if t.name.startswith("loader")]
    for k, batch in enumerate(got):
        want = data[k]
        assert batch.keys == want.keys and batch.position == want.position
        assert torch.equal(batch.latents, want.latents) and torch.equal(batch.prompt_embeds, want.prompt_embeds)


def test_a_reader_threads_failure_reaches_the_trainer(tmp_path, shapes):
    index = build_index(write_shards(tmp_path, [[(4, 3, 12, 16)] * 4]), shapes)
    data = dataset(index, shapes=shapes)
    data.epoch_plan = None  # not callable: every read fails with a TypeError
    with pytest.raises(TypeError), streaming(data, threads=2) as stream:
        next(stream)
    assert not [t for t in threading.enumerate() if t.name.startswith("loader")]


def test_rows_read_in_place_equal_what_safetensors_decodes_in_any_stored_dtype(tmp_path, shapes):
    dtypes = [torch.bfloat16, torch.float32, torch.float16, torch.bfloat16]

    def edit(i, members):
        gen = torch.Generator().manual_seed(i)
        return encode_sample(members["__key__"], torch.randn(4, 3, 12, 16, generator=gen).to(dtypes[i]),
                             torch.randn(226, 32, generator=gen).to(dtypes[3 - i]), META)

    paths = write_shards(tmp_path, [[(4, 3, 12, 16)] * 4], edit=edit)
    index = build_index(paths, shapes)
    assert [r.dtypes for r in index.samples] == [("BF16", "BF16"), ("F32", "F16"), ("F16", "F32"), ("BF16", "BF16")]
    decoded = {s.key: s for s in shard_samples(paths[0])}
    data = dataset(index, micro=4, shapes=shapes)
    batch = data[0]
    assert batch.latents.dtype == torch.float32 and batch.valid.all()  # promoted: fp32 holds every value exactly
    for key, latents, prompt in zip(batch.keys, batch.latents, batch.prompt_embeds, strict=True):
        assert torch.equal(latents, decoded[key].latents.float())
        assert torch.equal(prompt, decoded[key].prompt_embeds.float())
    alone = read_sample(index, index.samples[1], shapes)
    assert alone[0].dtype == torch.float32 and alone[1].dtype == torch.float16
    assert torch.equal(alone[0], decoded["s0001"].latents) and torch.equal(alone[1], decoded["s0001"].prompt_embeds)


def test_a_shard_changed_after_start_up_gives_invalid_samples_named_by_key(tmp_path, shapes):
    paths = write_shards(tmp_path, [[(4, 3, 12, 16)] * 3])
    index = build_index(paths, shapes)
    data = dataset(index, micro=3, shapes=shapes)
    good = data[0]
    blob = Path(paths[0]).read_bytes()
    Path(paths[0]).write_bytes(blob[:index.samples[2].latents.offset + 200])  # s0002's data cut short
    batch = data[0]
    assert batch.valid.tolist() == [key != "s0002" for key in batch.keys]
    assert [f.problem for f in batch.faults] == ["latents.safetensors is truncated"]
    assert torch.equal(batch.latents[batch.valid], good.latents[batch.valid]) and good.valid.all()
    resized = write_shards(tmp_path / "other", [[(4, 3, 12, 16), (4, 2, 12, 16), (4, 3, 12, 16)]])
    Path(paths[0]).write_bytes(Path(resized[0]).read_bytes())  # s0001 now another shape, s0002 moved
    faults = [str(f) for f in data[0].faults]
    assert faults[0] == f"shard {paths[0]}, sample 's0001': latents changed shape since start-up: [4, 2, 12, 16]"
    assert faults[1].startswith(f"shard {paths[0]}, sample 's0002': latents.safetensors is not a valid")
    Path(paths[0]).unlink()
    assert [f.problem for f in data[0].faults][0].startswith("cannot be read")


def test_a_split_index_merges_to_the_whole(tmp_path, shapes):
    paths = write_shards(tmp_path, [[(4, 3, 12, 16)] * 2] * 5)
    whole = build_index(paths, shapes)
    parts = [build_index(paths, shapes, rank, 2, gather=lambda mine: [mine]) for rank in range(2)]
    assert [len(p.samples) for p in parts] == [6, 4]  # shards 0, 2, 4 and 1, 3
    merged = ShardIndex.merge(paths, [(p.samples, p.faults) for p in reversed(parts)])
    assert merged.samples == whole.samples and merged.fingerprint() == whole.fingerprint()
    assert build_index(paths[:4], shapes).fingerprint() != whole.fingerprint()


def test_the_index_names_each_bad_sample_and_keeps_the_good_ones(tmp_path, shapes):
    """Faults found from headers alone, before any step: each is named by shard and key; good samples stay."""
    from safetensors.torch import save as st_save

    def edit(i, members):
        if i == 1:
            del members["prompt_embeds.safetensors"]
        if i == 2:
            members["latents.safetensors"] = st_save({"latents": torch.zeros(16, 3, 12, 16)})
        if i == 3:
            members["latents.safetensors"] = st_save({"latents": torch.zeros(4, 3, 12, 16, dtype=torch.int32)})
        if i == 4:
            members["latents.safetensors"] = b"\x80\x04pickle?"
        return members

    paths = write_shards(tmp_path / "d", [[(4, 3, 12, 16)] * 6, [(4, 3, 12, 16)] * 4, []], edit=edit)
    data = Path(paths[1]).read_bytes()
    Path(paths[1]).write_bytes(data[: len(data) * 3 // 5])  # cut mid-sample, as an interrupted copy leaves it
    (tmp_path / "d" / "junk.tar").write_bytes(b"not a tar file at all" * 30)
    index = build_index(resolve_shards(str(tmp_path / "d")), shapes)
    problems = [str(f) for f in index.faults]
    expected = [r"junk.tar: cannot be read",  # resolve_shards sorts the directory's files
                r"part-000.tar, sample 's0001': missing member\(s\) \['prompt_embeds.safetensors'\]",
                r"part-000.tar, sample 's0002': latents have 16 channels",
                r"part-000.tar, sample 's0003': latents has dtype I32",
                r"part-000.tar, sample 's0004': latents.safetensors is not a valid safetensors blob",
                r"part-001.tar.*truncated|part-001.tar: cannot be read",
                r"part-002.tar: holds no samples"]
    assert len(problems) == len(expected), problems
    for problem, pattern in zip(problems, expected, strict=True):
        assert re.search(pattern, problem), (pattern, problem)
    kept = [r.key for r in index.samples]
    assert kept[:2] == ["s0000", "s0005"] and set(kept[2:]) <= {"s0006", "s0007", "s0008"} and len(kept) >= 3
    with tarfile.open(paths[0]) as tar:  # the index's offsets are where the tar keeps the data
        member = tar.getmember("s0000.latents.safetensors")
        assert index.samples[0].latents == (member.offset_data, member.size)


@pytest.mark.parametrize("header, data, problem", [
    ({"latents": {"dtype": "BF16", "shape": [2, 3], "data_offsets": [0, 12]}}, 12, None),
    ({"latents": {"dtype": "BF16", "shape": [2, 3], "data_offsets": [0, 10]}}, 10,
     "is not a valid safetensors blob (10 bytes of data for latents of shape [2, 3] in BF16)"),
    ({"latents": {"dtype": "BF16", "shape": [2, 3], "data_offsets": [0, 12]}}, 6, "latents.safetensors is truncated"),
    ({"latents": {"dtype": "BF16", "shape": [2, 3], "data_offsets": [-2, 10]}}, 12, "blob (data offsets -2, 10)"),
    ({"latents": {"dtype": ["BF16"], "shape": [2, 3], "data_offsets": [0, 12]}}, 12, "latents has dtype ['BF16']"),
    ({"other": {"dtype": "BF16", "shape": [2, 3], "data_offsets": [0, 12]}}, 12, "holding 'latents'"),
    ({"latents": {"dtype": "BF16", "shape": [-2, -3], "data_offsets": [0, 12]}}, 12,
     "latents has shape [-2, -3]: every dimension must be positive"),
    ({"latents": {"dtype": "BF16", "shape": [0, 3], "data_offsets": [0, 0]}}, 0, "every dimension must be positive"),
    ({"latents": {"dtype": "BF16", "shape": "23", "data_offsets": [0, 12]}}, 12, "holding 'latents'"),
    ({"latents": {"dtype": "BF16", "shape": [2.0, 3], "data_offsets": [0, 12]}}, 12, "holding 'latents'"),
    (b'{"latents": {"dtype": "BF16", "shape": [1e400], "data_offsets": [0, 12]}}', 12, "holding 'latents'"),
    (b"[" * 100_000, 12, "holding 'latents'"),  # deeper than json's recursion limit
])
def test_tensor_headers_are_checked_before_any_byte_is_read_into_a_batch(tmp_path, header, data, problem):
    """The reader trusts a header's offset and size to read raw bytes into a tensor: they must add up."""
    head = header if isinstance(header, bytes) else json.dumps(header).encode()
    blob = len(head).to_bytes(8, "little") + head + bytes(data)
    path = tmp_path / "blob"
    path.write_bytes(b"tar header" + blob)
    fd = os.open(path, os.O_RDONLY)
    try:
        if problem is None:
            assert tensor_header(fd, Extent(10, len(blob)), "s.tar", "k", "latents.safetensors", "latents") == (
                (2, 3), "BF16", 10 + 8 + len(head), 12)
        else:
            with pytest.raises(ShardError) as caught:
                tensor_header(fd, Extent(10, len(blob)), "s.tar", "k", "latents.safetensors", "latents")
            assert problem in str(caught.value) and str(caught.value).startswith("shard s.tar, sample 'k': ")
    finally:
        os.close(fd)


def test_non_finite_values_found_when_read_become_an_invalid_sample(tmp_path, shapes):
    def edit(i, members):
        if i == 1:
            members["latents.safetensors"] = encode_sample("x", torch.full((4, 3, 12, 16), float("nan")),
                                                           torch.zeros(226, 32), META)["latents.safetensors"]
        return members

    index = build_index(write_shards(tmp_path, [[(4, 3, 12, 16)] * 3], edit=edit), shapes)
    data = dataset(index, micro=3, shapes=shapes)
    batch = data[0]
    bad = batch.keys.index("s0001")
    assert batch.valid.tolist() == [i != bad for i in range(3)]
    assert (batch.latents[bad] == 0).all() and torch.isfinite(batch.latents).all()
    expected = f"shard {index.shards[0]}, sample 's0001': latents hold NaN or inf values"
    assert [str(f) for f in batch.faults] == [expected]


def test_decode_rejects_missing_members_and_non_safetensors():
    raw = encode_sample("k", torch.zeros(4, 3, 12, 16), torch.zeros(226, 32), META)
    raw.update(__url__="x.tar")
    assert decode_sample(raw).latents.shape == (4, 3, 12, 16)
    with pytest.raises(ShardError, match=r"missing member\(s\) \['prompt_embeds.safetensors'\]"):
        decode_sample({k: v for k, v in raw.items() if k != "prompt_embeds.safetensors"})
    with pytest.raises(ShardError, match="latents.safetensors is not a valid safetensors blob"):
        decode_sample({**raw, "latents.safetensors": b"\x80\x04pickle?"})
    with pytest.raises(ShardError, match="the json member is not valid JSON"):
        decode_sample({**raw, "json": b"{"})
    assert json.loads(raw["json"]) == META


def test_caption_dropout_is_drawn_per_sample_and_epoch_whatever_the_ranks(tmp_path, shapes):
    """data.caption_dropout: the dropped samples train with the folder's empty-caption embedding; which ones is
    a function of (seed, sample, epoch), so 1 and 2 ranks drop the same, a resumed run too, and the fraction is
    the probability's."""
    from safetensors.torch import save_file

    from trainer.data import caption_dropped, load_empty_prompts
    from trainer.shard_format import EMPTY_PROMPT

    paths = write_shards(tmp_path / "d", [[(4, 3, 12, 16)] * 10] * 4)  # prompts are zeros
    with pytest.raises(UserError, match=rf"data.caption_dropout: {re.escape(str(tmp_path / 'd' / EMPTY_PROMPT))} "
                                        r"is missing: .*data_tools/shard.py"):
        load_empty_prompts(paths, shapes.prompt_shape)
    save_file({"prompt_embeds": torch.ones(3, 32)}, str(tmp_path / "d" / EMPTY_PROMPT))
    with pytest.raises(UserError, match=r"shape \[3, 32\], the model's are \[226, 32\]"):
        load_empty_prompts(paths, shapes.prompt_shape)
    save_file({"prompt_embeds": torch.ones(226, 32)}, str(tmp_path / "d" / EMPTY_PROMPT))
    empty = load_empty_prompts(paths, shapes.prompt_shape)
    index = build_index(paths, shapes)

    def drops(data, ks) -> set[tuple[tuple[int, int], int]]:
        out = set()
        for k in ks:
            batch = data[k]
            rows = batch.prompt_embeds.flatten(1).eq(1).all(1)
            assert batch.captions_dropped == int(rows.sum())  # the empty caption's embedding, nothing else
            assert batch.prompt_embeds[~rows].eq(0).all()
            out |= {(batch.position, sample) for sample, row in zip(sample_ids(batch), rows.tolist(),
                                                                     strict=True) if row}
        return out

    def data(**kw):
        return MicroBatches(index, seed=7, micro_batch_size=1, shapes=shapes, caption_dropout=0.3,
                            empty_prompts=empty, **{"rank": 0, "world_size": 1, **kw})

    one = drops(data(group=2), range(200))  # 5 epochs of 40
    two = drops(data(rank=0, world_size=2), range(100)) | drops(data(rank=1, world_size=2), range(100))
    assert one == two
    resumed = drops(data(group=2, position=DataPosition(2, 6, 2)), range(200 - 86))
    assert resumed == {d for d in one if d[0] >= (2, 6)}
    assert 0.2 < len(one) / 200 < 0.4  # 30 % of 200 draws
    per_epoch = [{s for (p, s) in one if p[0] == e} for e in range(5)]
    assert per_epoch[0] != per_epoch[1]  # drawn again each epoch
    draws = [caption_dropped(7, e, i, 0.3) for e in range(100) for i in range(100)]
    assert abs(sum(draws) / len(draws) - 0.3) < 0.015  # 10,000 draws: 3.3 standard deviations
    assert not any(caption_dropped(7, e, i, 0.0) for e in range(10) for i in range(10))
