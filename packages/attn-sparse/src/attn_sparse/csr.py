"""CSR building blocks of block layouts: row ids, interval expansion, sorted-row offsets (O(nnz), vectorised).

:class:`attn_sparse.layout.BlockLayout` and the pattern builders (:mod:`attn_sparse.patterns`)
assemble their CSR arrays with these; nothing here knows a layout's geometry.
"""

from __future__ import annotations

import torch

from attn_core.packing import host_to_device
from attn_core.triton_env import compiled_triton_available

from .tile_index import INT32_MAX, aligned_sections, check_tile_count

__all__ = [
    "HOST_ROW_WORK",
    "band_csr",
    "crow_from_sorted_rows",
    "expand_intervals",
    "row_ids",
    "row_work_device",
]


def row_ids(crow: torch.Tensor, nnz: int) -> torch.Tensor:
    """Row index (int64) of every stored tile, O(nnz)."""
    counts = (crow[1:] - crow[:-1]).long()
    return torch.repeat_interleave(torch.arange(counts.numel(), device=crow.device), counts, output_size=nnz)


# Row-level work (R rows x K intervals) up to this many entries runs on the CPU even for a GPU
# layout: on tiny arrays a CPU op is cheaper than a GPU launch, and the CPU knows the output size
# without waiting for the device; only the O(nnz) expansion then runs on the GPU. Measured on an
# H100 host (docs/benchmarks/sparse_layout_build_h100.md): 2**13 was the best of 2**13..2**18;
# CPU work on ~30K-entry rows (bigbird's random blocks) was already 1.5-4x slower than the GPU.
HOST_ROW_WORK = 1 << 13


def row_work_device(device: torch.device, entries: int) -> torch.device:
    """Where R x K row-level interval work for a layout on ``device`` runs (see HOST_ROW_WORK)."""
    return torch.device("cpu") if entries <= HOST_ROW_WORK else device


def expand_intervals(
    start: torch.Tensor,
    length: torch.Tensor,
    num_rows: int,
    *,
    step: int = 1,
    nnz: int | None = None,
    device: torch.device | None = None,
    triton: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """CSR from per-row disjoint, increasing runs ``start, start + step, ...`` of ``length`` columns.

    start, length: (R, K) int64 with the runs of each row in increasing order (length 0 = none);
    ``step`` > 1 gives strided runs (e.g. every 16th column). ``nnz``: the total when the caller
    already knows it (skips the one device -> host read of the size). ``device``: where the CSR
    goes (default start's device); row-level inputs on the CPU travel there in one copy and only
    the O(nnz) part runs on ``device``: one Triton launch (``triton``; None: on CUDA when Triton
    is usable, see :func:`attn_core.triton_env.compiled_triton_available`) or a few torch ops.
    Returns (crow int32 (R + 1,), col int32 (nnz,)) in O(R * K + nnz), without sorting.
    """
    here = start.device
    out = here if device is None else device
    counts = length.sum(dim=1) if length.shape[1] > 1 else length.reshape(-1)
    crow = torch.zeros(num_rows + 1, dtype=torch.int64, device=here)
    torch.cumsum(counts, dim=0, out=crow[1:])
    if nnz is None:
        nnz = int(crow[-1])  # the one size the output needs (free on the CPU, one number from a GPU)
    check_tile_count(nnz)
    if nnz == 0:
        return _moved(crow.to(torch.int32), out), torch.zeros(0, dtype=torch.int32, device=out)
    flat_len = length.reshape(-1)
    begin = crow[:-1] if length.shape[1] == 1 else torch.cumsum(flat_len, dim=0) - flat_len
    if triton is None:
        triton = compiled_triton_available(out)
    if triton:  # every value fits in int32 (offsets <= nnz, columns < num_key_blocks)
        from .kernels.pattern_build import expand_runs  # imports Triton: only when it runs

        parts = (crow, begin, start.reshape(-1), flat_len)
        at = aligned_sections([p.numel() for p in parts])
        pack = torch.empty(at[-1], dtype=torch.int32, device=here)
        for p, a in zip(parts, at):
            pack[a : a + p.numel()] = p
        pack = _moved(pack, out)  # one copy when the rows were built on the CPU
        crow, begin, first, runs = (pack[a : a + p.numel()] for p, a in zip(parts, at))
        return crow, expand_runs(begin, first, runs, step, nnz)
    # col = run start + (position in the flattened output - where the run begins) * step; int32
    # arithmetic (when every intermediate fits) halves the memory traffic of the O(nnz) part.
    dtype = torch.int32 if nnz * step <= INT32_MAX else torch.int64
    shift = start.reshape(-1) - begin if step == 1 else start.reshape(-1) - begin * step
    if out != here:  # one copy of the row-level arrays to ``device`` (crow first: its view starts the buffer)
        r, m = num_rows + 1, flat_len.numel()
        pack = _moved(torch.cat([crow, shift, flat_len]).to(dtype), out)
        crow, shift, flat_len = pack[:r], pack[r : r + m], pack[r + m :]
    else:
        shift = shift.to(dtype)
    col = torch.repeat_interleave(shift, flat_len, output_size=nnz)  # empty runs repeat 0 times
    pos = torch.arange(nnz, device=out, dtype=dtype)
    if step == 1:
        col += pos
    else:
        col.add_(pos, alpha=step)
    return crow.to(torch.int32), col.to(torch.int32)


def _moved(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` on ``device``: a host-built tensor goes without waiting for the device's queued work."""
    return host_to_device(t, device) if t.device.type == "cpu" else t.to(device)


def band_csr(
    lo: torch.Tensor, hi: torch.Tensor, num_cols: int, *, device: torch.device | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Both CSR orientations of rows that each hold one column interval moving only rightwards.

    lo, hi: (R,) int64, non-decreasing, 0 <= lo <= hi <= num_cols: row r holds columns
    [lo[r], hi[r]). Then the rows holding column c are one interval too: those with lo <= c (a
    prefix) minus those with hi <= c (a shorter prefix), two binary searches, no sort.
    Returns (crow (R + 1,), col (nnz,), ccol (num_cols + 1,), rows (nnz,)), int32 on ``device``
    (default lo's device; see :func:`expand_intervals`), rows increasing within each column.
    O(R + num_cols log R + nnz); the size nnz is read from the device once when lo is on a GPU.
    """
    cols = torch.arange(num_cols, device=lo.device)
    first_row = torch.searchsorted(hi, cols, right=True)
    end_row = torch.searchsorted(lo, cols, right=True)
    crow, col = expand_intervals(lo[:, None], (hi - lo)[:, None], lo.numel(), device=device)
    ccol, rows = expand_intervals(
        first_row[:, None], (end_row - first_row)[:, None], num_cols, nnz=col.numel(), device=device
    )
    return crow, col, ccol, rows


def crow_from_sorted_rows(rows: torch.Tensor, num_rows: int) -> torch.Tensor:
    """Row offsets (int32 (num_rows + 1,)) of tiles whose row ids ``rows`` are non-decreasing.

    A binary search instead of bincount: no host synchronisation on GPUs."""
    bounds = torch.arange(num_rows + 1, device=rows.device, dtype=rows.dtype)
    return torch.searchsorted(rows, bounds).to(torch.int32)
