"""The CogVideoX objective against independent references: the weighted x0 loss, plain v-MSE, and the
formula diffusers' CogVideoX LoRA example builds from the scheduler's add_noise/get_velocity."""

from __future__ import annotations

import json
import math

import pytest
import torch
from diffusers import CogVideoXDDIMScheduler

from trainer.diffusion import TimestepDistribution, TimestepSampler, stratified_slots, stratified_timesteps
from trainer.errors import UserError
from trainer.families import family_for
from trainer.families.cogvideox import CogVideoX
from trainer.rng import Stream, derive_seed

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
        sampler = TimestepSampler(TimestepDistribution(T), True, seed=1, rank=rank, world_size=world,
                                  micro_batch=micro, accumulation=accum, generator=torch.Generator())
        for micro_step in range(accum):
            drawn.extend(sampler(7, micro_step).tolist())
    global_batch = world * micro * accum
    assert sorted(t * global_batch // T for t in drawn) == list(range(global_batch))


def test_uniform_sampler_draws_from_its_generator():
    gen = torch.Generator().manual_seed(0)
    sampler = TimestepSampler(TimestepDistribution(T), False, seed=1, rank=0, world_size=1, micro_batch=4096,
                              accumulation=1, generator=gen)
    ts = sampler(1, 0)
    assert ts.min() == 0 and ts.max() == T - 1 and len(set(ts.tolist())) > 900
    assert not torch.equal(ts, sampler(1, 0))  # independent draws, even within one step


def pmf(kind: str, mean: float, std: float, low: int, high: int) -> list[float]:
    """P(t) on low..high from the definition (math.erf, not the trainer's torch code): uniform, or t/T =
    sigmoid(mean + std * z) conditioned on the range."""
    def cdf(edge: int) -> float:  # P(s < edge / T)
        if kind == "uniform":
            return edge / T
        if edge <= 0 or edge >= T:
            return 0.0 if edge <= 0 else 1.0
        z = (math.log(edge / (T - edge)) - mean) / std
        return 0.5 * (1 + math.erf(z / math.sqrt(2)))

    masses = [cdf(t + 1) - cdf(t) for t in range(low, high + 1)]
    return [m / sum(masses) for m in masses]


def chi_square(draws: torch.Tensor, probabilities: list[float], low: int, bins: int = 20) -> float:
    """Pearson's statistic over ``bins`` groups of consecutive timesteps of about equal probability."""
    cumulative, edges, acc = 0.0, [], 0.0
    for i, p in enumerate(probabilities):
        acc += p
        if acc >= (len(edges) + 1) / bins and len(edges) < bins - 1:
            edges.append(i + 1)
    groups = torch.tensor([0, *edges, len(probabilities)])
    counts = torch.bincount(draws - low, minlength=len(probabilities)).double()
    n = counts.sum().item()
    for a, b in zip(groups[:-1].tolist(), groups[1:].tolist(), strict=True):
        expected = n * sum(probabilities[a:b])
        cumulative += (counts[a:b].sum().item() - expected) ** 2 / expected
    return cumulative


# chi-square with 19 degrees of freedom exceeds 43.82 with probability 0.001: a right distribution passes (the
# seed is fixed, so it passes every time), a mean off by 0.1 or a std off by 10 % fails by far (asserted below)
CRITICAL_19 = 43.82


@pytest.mark.parametrize(("kind", "mean", "std", "within", "stratified"), [
    ("uniform", 0.0, 1.0, (100, 899), False), ("logit_normal", 0.0, 1.0, None, False),
    ("logit_normal", 0.5, 0.8, (200, 700), True), ("logit_normal", -1.0, 1.5, None, True)])
def test_timestep_distributions_match_their_definition(kind, mean, std, within, stratified):
    distribution = TimestepDistribution.of(T, kind, mean, std, within)
    low, high = within or (0, T - 1)
    world, micro, accumulation, steps = 2, 4, 4, 2500  # 32 timesteps a step, 80,000 in all
    gen = torch.Generator()
    samplers = [TimestepSampler(distribution, stratified, seed=3, rank=r, world_size=world, micro_batch=micro,
                                accumulation=accumulation, generator=gen) for r in range(world)]
    per_step = []
    for step in range(1, steps + 1):
        gen.manual_seed(derive_seed(3, Stream.NOISE, step))  # seeded per step, as train_step does (with the rank)
        per_step.append(torch.cat([s(step, m) for m in range(accumulation) for s in samplers]))
    draws = torch.cat(per_step)
    assert draws.dtype == torch.int64 and draws.min() >= low and draws.max() <= high
    expected = pmf(kind, mean, std, low, high)
    statistic = chi_square(draws, expected, low)
    assert statistic < CRITICAL_19, statistic
    assert chi_square(draws, pmf("logit_normal", mean + 0.1, std, low, high), low) > 3 * CRITICAL_19
    assert chi_square(draws, pmf("logit_normal", mean, std * 1.1, low, high), low) > 3 * CRITICAL_19 or \
        kind == "uniform"
    if stratified:  # each step's 32 draws: one in each stratum of equal probability
        below = [0.0]
        for p in expected:
            below.append(below[-1] + p)
        for ts in per_step[:50]:
            for k, t in enumerate(sorted(ts.tolist())):
                assert below[t - low] <= (k + 1) / len(ts) + 1e-9 and below[t - low + 1] >= k / len(ts) - 1e-9
    # a resumed run rebuilds its sampler: step 1000 draws what it drew in the run that got there
    fresh = TimestepSampler(distribution, stratified, seed=3, rank=1, world_size=world, micro_batch=micro,
                            accumulation=accumulation, generator=torch.Generator())
    fresh.generator.manual_seed(derive_seed(3, Stream.NOISE, 1000))
    resumed = [fresh(1000, m) for m in range(accumulation)]
    assert torch.equal(torch.cat(resumed), per_step[999].view(accumulation, world, micro)[:, 1].flatten()) or \
        not stratified
    if not stratified:  # independent draws come from the generator the loop seeds per step and rank
        gen.manual_seed(derive_seed(3, Stream.NOISE, 1000))
        again = [samplers[1](1000, m) for m in range(accumulation)]
        assert all(torch.equal(a, b) for a, b in zip(again, resumed, strict=True))


def test_the_short_forms_and_ranges_the_schedule_cannot_serve():
    from trainer.spec import TimestepSampling, TrainSection
    from trainer.startup import check_timesteps

    assert TrainSection(max_steps=1, timestep_sampling="stratified").timestep_sampling == TimestepSampling(
        stratified=True)
    assert TrainSection(max_steps=1).timestep_sampling.describe() == "uniform"
    assert TimestepSampling(distribution="logit_normal", range=(10, 20), stratified=True).describe() == \
        "stratified logit-normal(0, 1) on 10..20"
    with pytest.raises(ValueError, match="must be uniform, stratified or a section"):
        TrainSection(max_steps=1, timestep_sampling="logit_normal")
    with pytest.raises(ValueError, match="0 <= min <= max"):
        TimestepSampling(range=(500, 100))
    with pytest.raises(ValueError, match="finite number"):
        TimestepSampling(mean=float("nan"))
    check_timesteps(TimestepSampling(distribution="logit_normal", range=(900, 999)), T)
    with pytest.raises(UserError, match=r"train.timestep_sampling: logit-normal\(-3, 0.2\) on 900..999 gives its "
                                        r"range a probability of"):
        check_timesteps(TimestepSampling(distribution="logit_normal", mean=-3, std=0.2, range=(900, 999)), T)
    with pytest.raises(UserError, match=r"range: \[0, 1000\] goes past the model's last timestep \(999"):
        check_timesteps(TimestepSampling(range=(0, 1000)), T)
