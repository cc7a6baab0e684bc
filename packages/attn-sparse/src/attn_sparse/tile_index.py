"""Int32 tile indices: their limit, and 16-byte aligned sections of one index buffer.

Shared by the CSR builders (:mod:`attn_sparse.csr`) and the Triton pattern kernels
(:mod:`attn_sparse.kernels.pattern_build`); imports nothing of the package.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["INT32_MAX", "aligned_sections", "check_tile_count"]

INT32_MAX = 2**31 - 1

# Triton specialises pointer arguments on 16-byte alignment, so a view starting mid-buffer would
# compile kernel variants: sections the builders pack into one buffer start at 16-byte offsets.
_INT32_PER_16_BYTES = 4


def aligned_sections(sizes: Sequence[int]) -> list[int]:
    """Start offsets of int32 sections of ``sizes`` in one buffer, each 16-byte aligned, then the total."""
    starts, pos = [], 0
    for n in sizes:
        starts.append(pos)
        pos += -(-n // _INT32_PER_16_BYTES) * _INT32_PER_16_BYTES
    return [*starts, pos]


def check_tile_count(nnz: int) -> None:
    """Raise ValueError when a pattern's ``nnz`` active tiles do not fit int32 indices."""
    if nnz > INT32_MAX:
        raise ValueError(f"pattern has {nnz} active tiles; at most {INT32_MAX} (int32 indices) are supported")
