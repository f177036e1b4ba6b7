"""Deterministic seeds derived from integers, identical on every rank and in every process.

Never use Python's hash() for this: string hashing is randomised per process.
"""

from __future__ import annotations

from enum import IntEnum

import numpy as np


class Stream(IntEnum):
    """Tags that keep the seeds of different consumers apart. The values are part of every seed drawn: never
    renumber (packed latents depend on VAE_NOISE, resumed runs on the rest)."""

    TIMESTEPS = 0
    NOISE = 1
    DATA_ORDER = 2
    DATA_SHUFFLE = 3  # retired (the data order is one permutation per epoch now); kept so that none reuses 3
    LORA_INIT = 4
    VAE_NOISE = 5
    GLOBAL_RNG = 6
    VALIDATION_NOISE = 7
    IMAGE_NOISE = 8  # image-to-video: the conditioning image's augmentation, posterior draw and dropout
    CAPTION_DROPOUT = 9  # which samples train with the empty caption, per epoch


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from any number of non-negative integers (seed, Stream tag, step, rank, ...)."""
    state = np.random.SeedSequence([int(p) for p in parts]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31 | int(state[1]) >> 1) & 0x7FFF_FFFF_FFFF_FFFF
