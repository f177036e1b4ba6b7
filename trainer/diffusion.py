"""The CogVideoX training objective: v-prediction on the model's own zero-terminal-SNR DDPM schedule.

Per sample, with ᾱ = alphas_cumprod[t] from the model directory's scheduler config:
    x_t = √ᾱ·x0 + √(1−ᾱ)·ε,   v = √ᾱ·ε − √(1−ᾱ)·x0,   x̂0 = √ᾱ·x_t − √(1−ᾱ)·v̂
    loss = mean over elements of w(t)·(x̂0 − x0)²  with  w(t) = 1/(1 − ᾱ)
Because x̂0 − x0 = −√(1−ᾱ)·(v̂ − v), the weighted x0 loss is exactly mean((v̂ − v)²). We compute that form:
it is the same number without the cancellation in x̂0 − x0 that the 1/(1−ᾱ) weight magnifies near t = 0,
and it stays finite at the terminal timestep where ᾱ = 0. Everything here is fp32 (or the inputs' fp64).
The schedule itself (ᾱ) is the model family's: its scheduler builds it (trainer/families/).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from trainer.rng import Stream, derive_seed


@dataclass(frozen=True)
class Objective:
    alphas_cumprod: torch.Tensor  # [T], fp64 (the scheduler's, bit for bit); the trainer moves it to its device

    @property
    def num_train_timesteps(self) -> int:
        return self.alphas_cumprod.numel()

    def to(self, device: torch.device | str) -> Objective:
        """The same objective with ᾱ on `device`: indexing it there needs no host-device copy per step."""
        return Objective(self.alphas_cumprod.to(device))

    def _alpha(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        dtype = torch.float64 if like.dtype == torch.float64 else torch.float32
        alpha = self.alphas_cumprod.to(device=t.device)[t].to(dtype)  # no copy once the objective is on t's device
        return alpha.view(-1, *([1] * (like.dim() - 1)))

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t in fp32 (fp64 for fp64 inputs); the caller casts to the compute dtype."""
        x0, noise = _upcast(x0), _upcast(noise)
        alpha = self._alpha(t, x0)
        return alpha.sqrt() * x0 + (1 - alpha).sqrt() * noise

    def velocity(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        x0, noise = _upcast(x0), _upcast(noise)
        alpha = self._alpha(t, x0)
        return alpha.sqrt() * noise - (1 - alpha).sqrt() * x0

    def loss(self, v_pred: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Per-sample loss [B] (mean over elements), equal to the 1/(1−ᾱ)-weighted x0 loss; average it over the
        batch."""
        error = _upcast(v_pred) - self.velocity(x0, noise, t)
        return error.square().flatten(1).mean(dim=1)

    def training_loss(self, model: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
                      x0: torch.Tensor, conditioning: torch.Tensor, t: torch.Tensor, generator: torch.Generator,
                      dtype: torch.dtype) -> torch.Tensor:
        """One micro-step's per-sample loss [B]: noise x0 with fresh noise from ``generator``, ask
        ``model(x_t in the compute dtype, conditioning, t)`` for v̂, compare with v in fp32."""
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=torch.float32)
        v_pred = model(self.add_noise(x0, noise, t).to(dtype), conditioning, t)
        return self.loss(v_pred, x0, noise, t)


def _upcast(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.float64 else x.float()


def uniform_timesteps(batch: int, num_train_timesteps: int, generator: torch.Generator) -> torch.Tensor:
    return torch.randint(0, num_train_timesteps, (batch,), generator=generator, device=generator.device)


class TimestepDistribution:
    """The training timesteps' distribution on 0..T-1 (train.timestep_sampling) as its inverse CDF: a
    probability u in [0, 1) maps to a timestep, so independent u give independent draws and a stratified set of
    u a stratified batch of the same distribution. Restricted to ``low..high``, it is the distribution
    conditioned on that range (the same density inside, renormalised). Everything in fp64."""

    def __init__(self, num_train_timesteps: int, kind: str = "uniform", mean: float = 0.0, std: float = 1.0,
                 low: int = 0, high: int | None = None):
        self.T, self.kind, self.mean, self.std = num_train_timesteps, kind, mean, std
        self.low, self.high = low, num_train_timesteps - 1 if high is None else high
        edges = torch.tensor([self.low, self.high + 1], dtype=torch.float64) / num_train_timesteps
        # the range's ends in the distribution's probability coordinate: t/T itself, or the normal's CDF at
        # the logit of t/T (logit 0 = -inf and logit 1 = inf give 0 and 1); Python floats (fp64), so that
        # drawing on a GPU copies nothing from the host (a copy would make the host wait for the device)
        ends = edges if kind == "uniform" else torch.special.ndtr((torch.logit(edges) - mean) / std)
        self.a, self.b = (float(e) for e in ends)

    @property
    def mass(self) -> float:
        """The probability the unrestricted distribution gives the range (fp64; 0 where it underflows)."""
        return self.b - self.a

    @classmethod
    def of(cls, num_train_timesteps: int, kind: str, mean: float, std: float,
           within: tuple[int, int] | None) -> TimestepDistribution:
        """train.timestep_sampling's distribution, mean, std and range (None: the whole schedule)."""
        low, high = within if within is not None else (0, num_train_timesteps - 1)
        return cls(num_train_timesteps, kind, mean, std, low, high)

    @property
    def whole_uniform(self) -> bool:
        return self.kind == "uniform" and self.low == 0 and self.high == self.T - 1

    def __call__(self, u: torch.Tensor) -> torch.Tensor:
        """Timesteps (int64) for probabilities ``u`` (fp64, in [0, 1)), on u's device."""
        p = self.a + u * (self.b - self.a)
        s = p if self.kind == "uniform" else torch.sigmoid(self.mean + self.std * torch.special.ndtri(p))
        return (s * self.T).floor().long().clamp_(self.low, self.high)


def stratified_timesteps(seed: int, optimizer_step: int, global_batch: int, num_train_timesteps: int,
                         device: torch.device | str = "cpu",
                         distribution: TimestepDistribution | None = None) -> torch.Tensor:
    """Timesteps for a whole optimizer step's global batch: one per equal-probability stratum of the
    distribution (uniform over [0, T) by default), in a shuffled order.

    Deterministic from (seed, optimizer_step) and the device type alone, so every rank computes the same
    vector and takes its own slots (see ``stratified_slots``) without communicating. Drawn on the device
    itself: a host-to-device copy every step would make the host wait for the GPU.
    """
    distribution = distribution or TimestepDistribution(num_train_timesteps)
    gen = torch.Generator(device=device).manual_seed(derive_seed(seed, Stream.TIMESTEPS, optimizer_step))
    offsets = torch.rand(global_batch, generator=gen, dtype=torch.float64, device=device)
    u = (torch.arange(global_batch, dtype=torch.float64, device=device) + offsets) / global_batch
    timesteps = distribution(u)
    return timesteps[torch.randperm(global_batch, generator=gen, device=device)]


def stratified_slots(micro_step: int, rank: int, world_size: int, micro_batch: int) -> slice:
    """Where (micro_step, rank)'s samples sit in ``stratified_timesteps``' global vector."""
    start = (micro_step * world_size + rank) * micro_batch
    return slice(start, start + micro_batch)


class TimestepSampler:
    """Timesteps for one micro-batch: independent per sample (from ``generator``, which the loop seeds per
    optimizer step) or stratified over the optimizer step's global batch, from ``distribution``. ``rank`` and
    ``world_size`` are data-parallel (trainer/parallel.py): a sequence group shares its draws."""

    def __init__(self, distribution: TimestepDistribution, stratified: bool, *, seed: int, rank: int,
                 world_size: int, micro_batch: int, accumulation: int, generator: torch.Generator):
        self.distribution, self.stratified, self.seed = distribution, stratified, seed
        self.rank, self.world_size, self.micro_batch, self.accumulation = rank, world_size, micro_batch, accumulation
        self.generator = generator
        self._step_timesteps: tuple[int, torch.Tensor] | None = None  # the current optimizer step's global vector

    def __call__(self, optimizer_step: int, micro_step: int) -> torch.Tensor:
        distribution = self.distribution
        if not self.stratified:
            if distribution.whole_uniform:  # integers straight from the generator, as this trainer always drew
                return uniform_timesteps(self.micro_batch, distribution.T, self.generator)
            u = torch.rand(self.micro_batch, generator=self.generator, dtype=torch.float64,
                           device=self.generator.device)
            return distribution(u)
        if self._step_timesteps is None or self._step_timesteps[0] != optimizer_step:
            global_batch = self.micro_batch * self.world_size * self.accumulation
            self._step_timesteps = (optimizer_step, stratified_timesteps(
                self.seed, optimizer_step, global_batch, distribution.T, self.generator.device, distribution))
        return self._step_timesteps[1][stratified_slots(micro_step, self.rank, self.world_size, self.micro_batch)]
