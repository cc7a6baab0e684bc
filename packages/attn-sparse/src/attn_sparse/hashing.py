"""Counter-based integer hash for seeded pattern draws (bigbird's random blocks).

A draw is a pure function of (seed, head, query block, draw index), so the same layout comes out
on any device without a random generator or a host -> device copy. The torch builder
(:func:`random_blocks`) and the Triton builder (:mod:`attn_sparse.kernels.pattern_build`) read
the constants below and compute the same integer math:

- :func:`mix32`: a 32-bit xorshift-multiply mixer (the "lowbias32" shape). Values stay in
  [0, 2**32) and the multipliers are odd and < 2**31, so every product is < 2**63: exact in int64
  torch ops and Triton int64 tensors, no overflow anywhere. Each step is a bijection of 32-bit words.
- :func:`seed_key`: the seed modulo 2**64 (negative seeds as their two's complement) folded into
  one 32-bit key.
- draw t of query block q of head h: ``x = mix32(mix32(mix32(key ^ h) ^ q) ^ t)``, mapped to the
  key block ``(x * nk) >> 32`` (multiply-shift: exact in int64 since x < 2**32 and nk < 2**31;
  each block is hit by floor(2**32 / nk) or one more of the 2**32 hash values, a relative bias
  below nk / 2**32).
"""

from __future__ import annotations

from typing import TypeVar

import torch

__all__ = ["HASH_MUL", "HASH_SALT", "HASH_SHIFT", "MASK32", "mix32", "random_blocks", "seed_key"]

MASK32 = 0xFFFFFFFF
HASH_SHIFT = (16, 15, 15)  # xorshift amounts before, between and after the two multiplies
HASH_MUL = (0x21F0AAAD, 0x735A2D97)  # odd (bijective mod 2**32) and < 2**31 (int64 products exact)
HASH_SALT = 0x5BD1E995  # folded into the seed key so that seed 0 does not start from the fixed point 0

T = TypeVar("T", int, torch.Tensor)


def mix32(x: T) -> T:
    """The 32-bit mixer on a Python int or an int64 tensor with values in [0, 2**32)."""
    x = x ^ (x >> HASH_SHIFT[0])
    x = (x * HASH_MUL[0]) & MASK32
    x = x ^ (x >> HASH_SHIFT[1])
    x = (x * HASH_MUL[1]) & MASK32
    return x ^ (x >> HASH_SHIFT[2])


def seed_key(seed: int) -> int:
    """32-bit key of ``seed`` (any int, taken modulo 2**64)."""
    s = seed & ((1 << 64) - 1)
    return mix32(mix32((s >> 32) ^ HASH_SALT) ^ (s & MASK32))


def random_blocks(
    key: int, num_heads: int, num_query_blocks: int, num_key_blocks: int, draws: int, device: torch.device
) -> torch.Tensor:
    """(num_heads, num_query_blocks, draws) int64 key blocks in [0, num_key_blocks), with replacement."""
    h = torch.arange(num_heads, dtype=torch.int64, device=device)[:, None, None]
    q = torch.arange(num_query_blocks, dtype=torch.int64, device=device)[None, :, None]
    t = torch.arange(draws, dtype=torch.int64, device=device)[None, None, :]
    x = mix32(mix32(mix32(h ^ key) ^ q) ^ t)
    return (x * num_key_blocks) >> 32
