"""Deterministic seeds derived from integers, identical on every rank and in every process.

Never use Python's hash() for this: string hashing is randomised per process.
"""

import numpy as np

# Stream tags keep the seeds of different consumers apart. Never renumber: packed latents depend on VAE_NOISE
# (DATA_SHUFFLE is retired: the data order is one permutation per epoch now).
TIMESTEPS, NOISE, DATA_ORDER, DATA_SHUFFLE, LORA_INIT, VAE_NOISE, GLOBAL_RNG, VALIDATION_NOISE = range(8)


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from any number of non-negative integers (seed, tag, step, rank, ...)."""
    state = np.random.SeedSequence([int(p) for p in parts]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31 | int(state[1]) >> 1) & 0x7FFF_FFFF_FFFF_FFFF
