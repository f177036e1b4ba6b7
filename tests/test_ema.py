"""train.ema in the real DeepSpeed engine, on gloo ranks started with torch.multiprocessing: the average of
the partitioned fp32 masters equals the closed form over the masters recorded after each step, checkpoints
round-trip it bit for bit, and swapping it in for the export or validation leaves the masters as they were."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file

from helpers import free_port
from trainer.data import MicroBatches
from trainer.ema import EMA_FILE
from trainer.engine import full_fp32_masters
from trainer.loop import train_step
from trainer.spec import RunSpec
from trainer.startup import build, preflight

DECAY, STEPS = 0.7, 4  # a short memory, so that every step's masters weigh in the closed form


def closed_form(records: list[dict[str, torch.Tensor]], decay: float) -> dict[str, torch.Tensor]:
    """ema_k = decay^k m_0 + sum_j (1 - decay) decay^(k-j) m_j, in fp64."""
    k = len(records) - 1
    return {name: decay ** k * records[0][name].double() + sum(
        (1 - decay) * decay ** (k - j) * records[j][name].double() for j in range(1, k + 1)) for name in records[0]}


def _probe(rank: int, world_size: int, port: int, model_dir: str, shards: str, stage: int, out: str) -> None:
    from deepspeed.runtime.zero.partition_parameters import GatheredParameters

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), LOCAL_SIZE=str(world_size),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    spec = RunSpec.model_validate({
        "model": {"path": model_dir}, "data": {"shards": shards, "num_workers": 0}, "lora": {"rank": 4},
        "optim": {"lr": 5e-2}, "deepspeed": {"stage": stage}, "run": {"output_dir": out},
        "train": {"max_steps": STEPS, "ema": DECAY, "precision": "bf16"}})
    run, index, _ = build(spec, preflight(spec))
    assert run.ema is not None and not run.ema.restarted
    params = run.model.lora_parameters()
    if stage == 3:  # partitioned like the masters: each rank holds its share only
        assert sum(s.numel() for s in run.ema.shadow) < sum(p.ds_numel for p in params.values())
    stream = iter(MicroBatches(index, seed=0, micro_batch_size=1, rank=rank, world_size=world_size,
                               shapes=run.family.sample_shapes()))
    records = [full_fp32_masters(params)]
    for step in range(1, STEPS + 1):
        train_step(run, stream, step)
        assert run.engine.was_step_applied()
        run.ema.update()
        records.append(full_fp32_masters(params))
    assert not torch.equal(records[1][next(iter(records[1]))], records[-1][next(iter(records[1]))])  # it moved

    average = run.ema.full()
    expected = closed_form(records, DECAY)
    for name, value in average.items():  # fp32 recursion against fp64: a few ulps
        torch.testing.assert_close(value.double(), expected[name], rtol=1e-6, atol=1e-7)
    masters = full_fp32_masters(params)
    assert all(torch.equal(masters[n], records[-1][n]) for n in params)  # swapped back exactly
    if stage == 3:  # 3 ranks: tensors that do not divide by them leave the last partition padded
        assert any(p.ds_numel % world_size for p in params.values())

    folder = Path(out) / "ckpt"  # every rank saves into the same folder, rank 0 writes
    folder.mkdir(exist_ok=True)
    run.ema.save(folder, rank == 0)
    dist.barrier()
    run.ema.update()  # moves the average on: the load must put back what was saved
    assert run.ema.load(folder)
    loaded = run.ema.full()
    assert all(torch.equal(loaded[n], average[n]) for n in params)

    # validation's view: inside, the compute copies hold the average; outside, everything as it was
    def compute_weights() -> dict[str, torch.Tensor]:  # whole, also under ZeRO-3 (a collective)
        with GatheredParameters(list(params.values())):
            return {n: p.detach().clone() for n, p in params.items()}

    before = compute_weights()
    with run.ema.applied():
        inside, weights = full_fp32_masters(params), compute_weights()
    assert all(torch.equal(inside[n], average[n]) for n in params)
    assert all(torch.equal(w, average[n].to(w.dtype)) for n, w in weights.items())
    assert not all(torch.equal(w, before[n]) for n, w in weights.items())
    after, masters = compute_weights(), full_fp32_masters(params)
    assert all(torch.equal(after[n], before[n]) for n in params)
    assert all(torch.equal(masters[n], records[-1][n]) for n in params)
    dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize(("stage", "ranks"), [(2, 2), (3, 3)], ids=["zero2-2ranks", "zero3-3ranks"])
def test_the_ema_is_the_closed_form_of_the_partitioned_masters(stage, ranks, tiny_5b, shards_5b, tmp_path):
    mp.spawn(_probe, args=(ranks, free_port(), str(tiny_5b), str(shards_5b), stage, str(tmp_path)), nprocs=ranks,
             join=True)
    tensors = load_file(str(tmp_path / "ckpt" / EMA_FILE))
    assert tensors and all(t.dtype == torch.float32 for t in tensors.values())
