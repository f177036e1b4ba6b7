"""The CogVideoX objective against independent references: the weighted x0 loss, plain v-MSE, and the
formula diffusers' CogVideoX LoRA example builds from the scheduler's add_noise/get_velocity."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import CogVideoXDDIMScheduler

from trainer.diffusion import TimestepSampler, stratified_slots, stratified_timesteps
from trainer.errors import UserError
from trainer.families import family_for
from trainer.families.cogvideox import CogVideoX

T = 1000


def batch(dtype: torch.dtype, seed: int = 0, include=(0, 999)):
    gen = torch.Generator().manual_seed(seed)
    shape = (6, 4, 3, 6, 8)  # [B, C, F, H, W]
    x0 = torch.randn(shape, generator=gen, dtype=torch.float64)
    noise = torch.randn(shape, generator=gen, dtype=torch.float64)
    v_pred = torch.randn(shape, generator=gen, dtype=torch.float64)
    t = torch.cat([torch.tensor(include), torch.randint(1, T - 1, (shape[0] - len(include),), generator=gen)])
    return x0.to(dtype), noise.to(dtype), v_pred.to(dtype), t


def weighted_x0_loss(sched: CogVideoXDDIMScheduler, v_pred, x0, noise, t) -> torch.Tensor:
    """ARCHITECTURE.md's objective built as diffusers' CogVideoX LoRA example does, in fp64."""
    sched.alphas_cumprod = sched.alphas_cumprod.double()
    x_t = sched.add_noise(x0, noise, t)
    x0_pred = sched.get_velocity(v_pred, x_t, t)  # = √ᾱ·x_t − √(1−ᾱ)·v̂
    weights = (1 / (1 - sched.alphas_cumprod[t])).view(-1, 1, 1, 1, 1)
    return (weights * (x0_pred - x0) ** 2).flatten(1).mean(1)


@pytest.fixture(params=["tiny_5b", "tiny_2b"])
def scheduler_config(request) -> dict:
    model_dir = request.getfixturevalue(request.param)
    return json.loads((model_dir / "scheduler" / "scheduler_config.json").read_text())


def test_loss_equals_weighted_x0_loss_from_diffusers_in_fp64(scheduler_config):
    objective = CogVideoX.objective_from_scheduler(scheduler_config)
    x0, noise, v_pred, t = batch(torch.float64)
    # the timesteps 0 and 999 are in the batch: w(0) is the largest weight, 999 the zero-SNR end
    reference = weighted_x0_loss(CogVideoXDDIMScheduler.from_config(scheduler_config), v_pred, x0, noise, t)
    ours = objective.loss(v_pred, x0, noise, t)
    assert ours.dtype == torch.float64
    torch.testing.assert_close(ours, reference, rtol=1e-9, atol=0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_loss_equals_plain_v_mse(scheduler_config, dtype):
    objective = CogVideoX.objective_from_scheduler(scheduler_config)
    x0, noise, v_pred, t = batch(dtype, seed=1)
    sched = CogVideoXDDIMScheduler.from_config(scheduler_config)
    sched.alphas_cumprod = sched.alphas_cumprod.double()
    v_target = sched.get_velocity(x0.double(), noise.double(), t)  # √ᾱ·ε − √(1−ᾱ)·x0, fp64
    reference = ((v_pred.double() - v_target) ** 2).flatten(1).mean(1)
    ours = objective.loss(v_pred, x0, noise, t)
    assert ours.dtype == dtype
    relative = ((ours.double() - reference).abs() / reference).max().item()
    assert relative < 1e-6, relative
    # and batch-averaged, as the trainer uses it
    assert abs(ours.double().mean() - reference.mean()) / reference.mean() < 1e-6


def test_noising_matches_diffusers_add_noise(scheduler_config):
    objective = CogVideoX.objective_from_scheduler(scheduler_config)
    x0, noise, _, t = batch(torch.float64, seed=2)
    sched = CogVideoXDDIMScheduler.from_config(scheduler_config)
    sched.alphas_cumprod = sched.alphas_cumprod.double()
    torch.testing.assert_close(objective.add_noise(x0, noise, t), sched.add_noise(x0, noise, t), rtol=1e-12, atol=0)
    assert objective.add_noise(x0.float(), noise.float(), t).dtype == torch.float32  # bf16 input is upcast too
    assert objective.add_noise(x0.bfloat16(), noise.bfloat16(), t).dtype == torch.float32


def test_terminal_timestep_is_zero_snr_and_finite(scheduler_config):
    objective = CogVideoX.objective_from_scheduler(scheduler_config)
    assert objective.num_train_timesteps == T
    assert objective.alphas_cumprod[-1] == 0  # zero terminal SNR: x_999 is pure noise
    x0, noise, v_pred, _ = batch(torch.float32, seed=3)
    t = torch.full((x0.shape[0],), T - 1)
    loss = objective.loss(v_pred, x0, noise, t)
    assert torch.isfinite(loss).all()
    torch.testing.assert_close(objective.add_noise(x0, noise, t), noise)  # ᾱ = 0
    torch.testing.assert_close(loss, ((v_pred + x0) ** 2).flatten(1).mean(1))  # v = −x0 at ᾱ = 0


def test_2b_and_5b_schedules_differ(tiny_2b, tiny_5b):
    a2 = family_for(tiny_2b).objective().alphas_cumprod
    a5 = family_for(tiny_5b).objective().alphas_cumprod
    assert json.loads((tiny_2b / "scheduler" / "scheduler_config.json").read_text())["snr_shift_scale"] == 3.0
    assert json.loads((tiny_5b / "scheduler" / "scheduler_config.json").read_text())["snr_shift_scale"] == 1.0
    assert (a2[1:-1] < a5[1:-1]).all()  # the SNR shift of 3 lowers every intermediate ᾱ
    assert (a5[:500] - a2[:500]).abs().max() > 0.05


def test_non_v_prediction_scheduler_is_refused(tiny_5b):
    config = json.loads((tiny_5b / "scheduler" / "scheduler_config.json").read_text())
    with pytest.raises(UserError, match="prediction_type is 'epsilon'"):
        CogVideoX.objective_from_scheduler({**config, "prediction_type": "epsilon"})


@pytest.mark.parametrize("global_batch", [1, 4, 7, 64])
def test_stratified_timesteps_cover_every_stratum_once(global_batch):
    ts = stratified_timesteps(seed=5, optimizer_step=3, global_batch=global_batch, num_train_timesteps=T)
    assert ts.shape == (global_batch,) and ts.min() >= 0 and ts.max() < T
    strata = sorted((ts.double() * global_batch / T).floor().long().tolist())
    assert strata == list(range(global_batch))
    again = stratified_timesteps(seed=5, optimizer_step=3, global_batch=global_batch, num_train_timesteps=T)
    assert torch.equal(ts, again)  # deterministic from (seed, step): every rank computes the same vector
    if global_batch > 1:
        other = stratified_timesteps(seed=5, optimizer_step=4, global_batch=global_batch, num_train_timesteps=T)
        assert not torch.equal(ts, other)


def test_stratified_slots_partition_the_global_batch():
    world, micro, accum = 3, 2, 4
    seen = []
    for micro_step in range(accum):
        for rank in range(world):
            s = stratified_slots(micro_step, rank, world, micro)
            seen.extend(range(s.start, s.stop))
    assert sorted(seen) == list(range(world * micro * accum))


def test_stratified_sampler_covers_the_global_batch_across_ranks_and_micro_steps():
    world, micro, accum = 3, 2, 2
    drawn = []
    for rank in range(world):
        sampler = TimestepSampler("stratified", seed=1, rank=rank, world_size=world, micro_batch=micro,
                                  accumulation=accum, num_train_timesteps=T, generator=torch.Generator())
        for micro_step in range(accum):
            drawn.extend(sampler(7, micro_step).tolist())
    global_batch = world * micro * accum
    assert sorted(t * global_batch // T for t in drawn) == list(range(global_batch))


def test_uniform_sampler_draws_from_its_generator():
    gen = torch.Generator().manual_seed(0)
    sampler = TimestepSampler("uniform", seed=1, rank=0, world_size=1, micro_batch=4096, accumulation=1,
                              num_train_timesteps=T, generator=gen)
    ts = sampler(1, 0)
    assert ts.min() == 0 and ts.max() == T - 1 and len(set(ts.tolist())) > 900
    assert not torch.equal(ts, sampler(1, 0))  # independent draws, even within one step
