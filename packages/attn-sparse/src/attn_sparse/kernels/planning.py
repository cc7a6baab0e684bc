"""Launch planning of the block-sparse kernels, in plain torch (importable without Triton).

The kernels are driven by a CSR block layout passed as raw tensors (:class:`CSR`), so they do not
depend on the layout class:

- ``crow`` (Hl * nqb + 1,) int32 and ``col`` (nnz,) int32: active key blocks of each query block,
  sorted within each row (row ``lh * nqb + i``);
- ``ccol`` (Hl * nkb + 1,) int32 and ``row`` (nnz,) int32: the same tiles grouped by key block
  (the transposed CSR), used by the dk/dv kernel;
- ``Hl`` is 1 (one layout shared by every head) or H (one layout per query head).

Here: tile configs (:class:`KernelConfig`, :func:`default_config`), the order programs take
layout rows and columns (:func:`launch_order`, :func:`row_table`), where the stored-dS backward
keeps each tile's dS (:func:`transposed_slots`) and how it is split into chunks that fit its
scratch (:class:`DsChunk`, :func:`stored_ds_chunks`).
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, NamedTuple

import torch

from attn_core.memo import StorageMemo

__all__ = [
    "CSR",
    "DKV_PROGRAMS_PER_SM",
    "DS_SCRATCH_MEMORY_SHARE",
    "LAUNCH_MEMO",
    "LAUNCH_MEMO_ENTRIES",
    "LAUNCH_MEMO_LAYOUTS",
    "DsChunk",
    "KernelConfig",
    "KernelMask",
    "chunk_slots",
    "default_config",
    "launch_order",
    "row_table",
    "stored_ds_chunks",
    "transposed_slots",
]


@dataclass(frozen=True)
class KernelConfig:
    """Tile sizes and launch settings (all compile-time). Tiles must divide the layout block sizes.

    fwd_m x fwd_n: forward query x key tile; dq_m x dq_n: dq kernel; dkv_m x dkv_n: dk/dv kernel
    (query sub-tile x key tile). Defaults: the fastest measured on an H100 for 128x128 layout
    blocks, D=128, bf16 (tools/bench_sparse.py --tune; docs/benchmarks/sparse_h100.md).
    """

    fwd_m: int = 128
    fwd_n: int = 128
    fwd_warps: int = 8
    fwd_stages: int = 3
    dq_m: int = 64
    dq_n: int = 64
    dq_warps: int = 4
    dq_stages: int = 2
    dkv_m: int = 64
    dkv_n: int = 64
    dkv_warps: int = 4
    dkv_stages: int = 3
    # dqs_m x dqs_n: the dq-from-stored-dS kernel (query x key tile)
    dqs_m: int = 128
    dqs_n: int = 64
    dqs_warps: int = 4
    dqs_stages: int = 3
    # Bytes of scratch for the stored-dS backward (0: always recompute), capped on a GPU at
    # 1/DS_SCRATCH_MEMORY_SHARE of its memory (8 GiB on a 141 GB H200, ~5 GiB on an 80 GB card,
    # 1.5 GiB on a 24 GB one). The dk/dv kernel then also writes dS (one q.dtype value per attended
    # pair) and dq = dS @ K reads it back: 5 matmuls per tile instead of 7. Batch x heads run in
    # chunks that fit, and a (batch, kv head) of a shared layout that does not fit alone runs in
    # ranges of key blocks (see stored_ds_chunks); where one batch of a per-head layout does not
    # fit, the backward recomputes P in a dq kernel.
    ds_scratch_bytes: int = 8 * 2**30
    # Streamed tiles (K/V in the forward and dq kernels, Q/dO in the dk/dv kernel) are loaded
    # through TMA tensor descriptors where the GPU has TMA (sm90+) and the tensors are 16-byte
    # aligned (elsewhere: pointer loads); tools/bench_sparse.py --tune times both.
    tma: bool = True

    def check(self, block_size: tuple[int, int]) -> list[str]:
        """Reasons this config cannot run layouts of ``block_size`` (empty list: it can)."""
        bq, bk = block_size
        out = []
        for name, tile, blk in (
            ("fwd_m", self.fwd_m, bq),
            ("fwd_n", self.fwd_n, bk),
            ("dq_m", self.dq_m, bq),
            ("dq_n", self.dq_n, bk),
            ("dkv_m", self.dkv_m, bq),
            ("dkv_n", self.dkv_n, bk),
            ("dqs_m", self.dqs_m, bq),
            ("dqs_n", self.dqs_n, bk),
        ):
            if tile < 16 or tile & (tile - 1) or blk % tile:
                out.append(f"{name}={tile} must be a power of two >= 16 dividing the layout block {blk}")
        if self.ds_scratch_bytes < 0:
            out.append(f"ds_scratch_bytes={self.ds_scratch_bytes} must be >= 0")
        return out


# Measured on an H100 (bf16, D=128, N=32K, densities 1.0 and 0.1) for 128x64 layout blocks.
_CONFIG_BK64 = KernelConfig(
    fwd_m=64, fwd_n=64, fwd_warps=4, fwd_stages=3, dkv_m=32, dkv_n=64, dkv_warps=4, dkv_stages=3
)


def default_config(block_size: tuple[int, int], *, head_dim: int | None = None, banded: bool = False) -> KernelConfig:
    """Tiles for a layout block size: the measured H100 choice, each tile clipped to the block.

    Clipping (tile = min(preferred, block)) lets 16x16 / 32x32 layouts (CPU tests) run too.
    ``banded`` (token masks: causal, windows, documents): the recompute backward, which measured
    faster than the stored-dS form there, with 64x64 dk/dv tiles of 4 warps and 2 stages (at
    D <= 64: 32x128 tiles, 3 stages); at D <= 64 the forward's 128x128 tiles run with 4 warps.
    Measured on an H100 (bf16, N=32K, causal window 4096; docs/benchmarks/sparse_tune_masks_h100.md):
    H=32/Hkv=8, D=128 backward 14.0 ms against 14.9 with 64x128 dk/dv tiles of 8 warps and 3
    stages (24.2 stored-dS); H=16, D=64 backward 4.28 ms against 4.58 with 64x64 tiles and 4.76
    with 3 stages, forward 1.31 ms against 1.72 with 8 warps. A one-pass backward adding dq with
    fp32 atomics from the dk/dv kernel (5 matmuls per tile) measured 1.2-1.6x slower than this
    recompute form at every tile config tried, and is not offered. The stored form stays the
    default for unmasked layouts, where it was measured faster (docs/benchmarks/sparse_h100.md).
    """
    bq, bk = block_size
    base = _CONFIG_BK64 if bk == 64 else KernelConfig()
    if banded:
        base = replace(base, ds_scratch_bytes=0, dkv_m=64, dkv_n=64, dkv_warps=4, dkv_stages=2)
        if head_dim is not None and head_dim <= 64:
            base = replace(base, fwd_warps=4, dkv_m=32, dkv_n=128, dkv_stages=3)
    return replace(
        base,
        fwd_m=min(base.fwd_m, bq),
        fwd_n=min(base.fwd_n, bk),
        dq_m=min(base.dq_m, bq),
        dq_n=min(base.dq_n, bk),
        dkv_m=min(base.dkv_m, bq),
        dkv_n=min(base.dkv_n, bk),
        dqs_m=min(base.dqs_m, bq),
        dqs_n=min(base.dqs_n, bk),
    )


# Launch data derived from a layout's CSR tensors (launch tables, chunk plans, transposed slots):
# one memo, which eager calls reach through the layout (CSR.from_layout) and the custom ops, which
# get raw tensors (new tensor objects in every compiled backward), from their storage
# (CSR.from_tensors). At most LAUNCH_MEMO_LAYOUTS layouts of LAUNCH_MEMO_ENTRIES entries each.
LAUNCH_MEMO_LAYOUTS = 8
LAUNCH_MEMO_ENTRIES = 16
LAUNCH_MEMO = StorageMemo(LAUNCH_MEMO_LAYOUTS, LAUNCH_MEMO_ENTRIES)


@dataclass(frozen=True)
class CSR:
    """Raw CSR tensors of a block layout (see the module docstring)."""

    crow: torch.Tensor
    col: torch.Tensor
    ccol: torch.Tensor
    row: torch.Tensor
    num_heads: int
    num_query_blocks: int
    num_key_blocks: int
    block_size: tuple[int, int]
    # (nnz,) int32 transposed-CSR position of each tile (see transposed_slots); derived on demand
    tslot: torch.Tensor | None = field(default=None, compare=False, repr=False)
    # (key, build) -> value: where derived per-layout data (launch orders) is memoised, its entry
    # in LAUNCH_MEMO (from_layout, from_tensors); none: built on every use.
    cache: Callable[[Any, Callable[[], Any]], Any] | None = field(default=None, compare=False, repr=False)

    @classmethod
    def from_layout(cls, layout: Any) -> CSR:
        """The raw tensors of an :class:`attn_sparse.layout.BlockLayout`, with their entry in
        LAUNCH_MEMO; cached on the layout (one lookup per call)."""

        def build() -> CSR:
            ccol, row = layout.transposed_csr()
            tensors = (
                layout.crow_indices.contiguous(), layout.col_indices.contiguous(), ccol.contiguous(), row.contiguous()
            )  # fmt: skip
            dims = (
                int(layout.num_heads), int(layout.num_query_blocks), int(layout.num_key_blocks),
                int(layout.block_size[0]), int(layout.block_size[1]),
            )  # fmt: skip
            memo = LAUNCH_MEMO.memo_for(tensors, dims)
            return cls(*tensors, *dims[:3], (dims[3], dims[4]), cache=memo)

        result: CSR = layout.cached_derived(("kernel_csr",), build)
        return result

    @classmethod
    def from_tensors(
        cls, crow: torch.Tensor, col: torch.Tensor, ccol: torch.Tensor, row: torch.Tensor, dims: Sequence[int]
    ) -> CSR:
        """The CSR of raw tensors and :attr:`dims` (what the custom ops receive), its launch data
        memoised in LAUNCH_MEMO while those storages are alive and unmodified."""
        heads, nqb, nkb, bq, bk = dims
        memo = LAUNCH_MEMO.memo_for((crow, col, ccol, row), tuple(dims))
        return cls(crow, col, ccol, row, heads, nqb, nkb, (bq, bk), cache=memo)

    @property
    def dims(self) -> list[int]:
        """[num_heads, num_query_blocks, num_key_blocks, block rows, block columns]."""
        return [self.num_heads, self.num_query_blocks, self.num_key_blocks, *self.block_size]

    def _memo(self, key: tuple[Any, ...], build: Callable[[], Any]) -> Any:
        """build(), memoised under ``key`` in :attr:`cache` (built every call without one)."""
        return build() if self.cache is None else self.cache(key, build)

    def transposed_slots(self) -> torch.Tensor:
        """(nnz,) int32: for each tile in CSR order, its position in the transposed CSR (where the
        dk/dv kernel stores its dS). Memoised per layout."""
        if self.tslot is not None:
            return self.tslot

        def build() -> torch.Tensor:
            return transposed_slots(
                self.crow, self.ccol, self.col, self.row, self.num_query_blocks, self.num_key_blocks
            )

        result: torch.Tensor = self._memo(("transposed_slots",), build)
        return result

    def max_tiles_per_column(self) -> int:
        """The most tiles of one key block (of one layout head). Memoised per layout; reading it
        waits for the GPU once."""

        def build() -> int:
            return int(self.ccol.diff().max()) if self.ccol.numel() > 1 else 0

        result: int = self._memo(("max_tiles_per_column",), build)
        return result

    def column_order(
        self, batch: int, kv_heads: int, group: int, key_blocks: tuple[int, int] | None = None
    ) -> torch.Tensor:
        """:func:`launch_order` of the key-block columns (the dk/dv kernel), all of them or those
        in ``key_blocks`` = (c0, c1); memoised per layout."""
        c0, c1 = key_blocks if key_blocks is not None else (0, self.num_key_blocks)
        result: torch.Tensor = self._memo(
            ("column_order", batch, kv_heads, group, c0, c1),
            lambda: self._build_column_order(batch, kv_heads, group, c0, c1),
        )
        return result

    def _build_column_order(self, batch: int, kv_heads: int, group: int, c0: int, c1: int) -> torch.Tensor:
        counts = self.ccol.diff().view(self.num_heads, self.num_key_blocks)[:, c0:c1]
        return _launch_order(counts, batch, kv_heads, group, c0, self.num_key_blocks)

    def unit_grid(self, units: int, kv_heads: int) -> tuple[int, int]:
        """(batch, kv heads) of the launch grid over ``units`` (batch, kv head) units: whole
        batches for a per-head layout (its layout heads are the grid's heads), else one flat
        batch of units."""
        return (units // kv_heads, kv_heads) if self.num_heads > 1 else (1, units)

    def chunk_tables(
        self, chunks: list[DsChunk], batch: int, kv_heads: int, group: int
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(dk/dv column order, dq-from-dS row table) of each stored-dS chunk, memoised per layout
        as one entry (dense 128K runs 64 chunks: one entry each would overflow the memo)."""

        def build() -> list[tuple[torch.Tensor, torch.Tensor]]:
            # chunks of equal size and key blocks share their tables (units are counted per launch)
            tables: dict[tuple[int, int, int], tuple[torch.Tensor, torch.Tensor]] = {}
            for c in chunks:
                units = c.u1 - c.u0
                if (units, c.c0, c.c1) in tables:
                    continue
                whole = c.c1 - c.c0 == self.num_key_blocks
                grid_batch, grid_kv_heads = self.unit_grid(units, kv_heads)
                order = self._build_column_order(grid_batch, grid_kv_heads, group, c.c0, c.c1)
                bounds = self.row_bounds(None if whole else (c.c0, c.c1))
                table = row_table(*bounds, self.num_heads, grid_batch, grid_kv_heads * group)
                tables[units, c.c0, c.c1] = (order, table)
            return [tables[c.u1 - c.u0, c.c0, c.c1] for c in chunks]

        result: list[tuple[torch.Tensor, torch.Tensor]] = self._memo(
            ("chunk_tables", batch, kv_heads, group, tuple(chunks)), build
        )
        return result

    def row_bounds(self, key_blocks: tuple[int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(starts, ends) (Hl * nqb,) int64: each layout row's CSR bounds, or with ``key_blocks``
        = (c0, c1) those of its key blocks in c0..c1 (columns are sorted within a row, so they are
        a sub-range, found by binary search on (row, column) keys)."""
        starts, ends = self.crow[:-1].long(), self.crow[1:].long()
        if key_blocks is None:
            return starts, ends
        rows = torch.arange(starts.numel(), device=self.crow.device)
        rows_of = torch.repeat_interleave(rows, ends - starts, output_size=self.col.numel())
        keys = rows_of * self.num_key_blocks + self.col.long()
        lo = torch.searchsorted(keys, rows * self.num_key_blocks + key_blocks[0])
        hi = torch.searchsorted(keys, rows * self.num_key_blocks + key_blocks[1])
        return lo, hi

    def row_table(self, batch: int, heads: int, key_blocks: tuple[int, int] | None = None) -> torch.Tensor:
        """:func:`row_table` (the row-parallel kernels' launch table) over all key blocks or those
        in ``key_blocks``, memoised per layout."""

        def build() -> torch.Tensor:
            return row_table(*self.row_bounds(key_blocks), self.num_heads, batch, heads)

        result: torch.Tensor = self._memo(("row_table", batch, heads, key_blocks), build)
        return result

    def column_ranges(self, max_tiles: int) -> list[tuple[int, int, int, int]]:
        """Key-block ranges (c0, c1, p0, p1) of a shared layout, each holding at most ``max_tiles``
        tiles (transposed-CSR positions p0..p1), as few as that allows and balanced by tiles; []
        when one key block alone holds more. Memoised per layout; reading it waits for the GPU once."""

        def build() -> list[tuple[int, int, int, int]]:
            ccol = self.ccol.tolist()
            total = ccol[-1]
            if total == 0 or max(b - a for a, b in itertools.pairwise(ccol)) > max_tiles:
                return []
            greedy = [0]  # packing key blocks greedily gives the fewest ranges
            for c in range(1, self.num_key_blocks + 1):
                if ccol[c] - ccol[greedy[-1]] > max_tiles:
                    greedy.append(c - 1)
            greedy.append(self.num_key_blocks)
            n = len(greedy) - 1
            # as many ranges, cut where the running count crosses each k/n of the tiles, when
            # those fit (they balance the chunks' work; the greedy cuts leave a short last one)
            even = [0, *(bisect.bisect_left(ccol, total * k // n) for k in range(1, n)), self.num_key_blocks]
            fits = all(0 < ccol[b] - ccol[a] <= max_tiles for a, b in itertools.pairwise(even))
            cuts = even if fits and len(set(even)) == n + 1 else greedy
            return [(a, b, ccol[a], ccol[b]) for a, b in itertools.pairwise(cuts)]

        result: list[tuple[int, int, int, int]] = self._memo(("column_ranges", max_tiles), build)
        return result


def launch_order(counts: torch.Tensor, batch: int, heads: int, group: int = 1) -> torch.Tensor:
    """(batch * heads * num_blocks,) int32: the order programs take layout blocks, ``bh * num_blocks + block``.

    ``counts`` (layout_heads, num_blocks): active tiles of each layout block (row, or key-block
    column); one row for a shared layout, one per head otherwise. Blocks are bucketed by their
    active-tile count in powers of two, heaviest bucket first (e.g. BigBird's global rows start
    first instead of forming a tail); inside a bucket the order is (batch, head, block), so a
    head's programs run together and the K/V (or Q/dO) tiles they stream stay in L2 (an exact
    busiest-first sort interleaves heads, which was slower on an H100). ``heads`` counts the
    grid's heads; with ``group`` > 1 (dk/dv programs per kv head) a block's work is summed over
    its query heads.
    """
    return _launch_order(counts, batch, heads, group, 0, counts.shape[1])


def _launch_order(
    counts: torch.Tensor, batch: int, heads: int, group: int, block0: int, num_blocks: int
) -> torch.Tensor:
    """launch_order of blocks block0..block0 + width (counts (layout_heads, width)) of a layout
    with num_blocks blocks per head: entries count blocks of the whole layout."""
    layout_heads, width = counts.shape
    counts = counts.long()
    if layout_heads > 1 and group > 1:
        counts = counts.view(layout_heads // group, group, width).sum(1)
    # floor(log2(count)) for count > 0 and -1 for 0, in one op: count = m * 2**e with 0.5 <= m < 1
    bucket = torch.frexp(counts.double()).exponent - 1
    flat = bucket.expand(heads, width).reshape(1, heads * width).expand(batch, -1).reshape(-1)
    j = torch.argsort(flat, descending=True, stable=True)
    return ((j // width) * num_blocks + block0 + j % width).to(torch.int32)


def row_table(starts: torch.Tensor, ends: torch.Tensor, layout_heads: int, batch: int, heads: int) -> torch.Tensor:
    """(batch * heads * num_blocks, 3) int32 launch table of the row-parallel kernels.

    ``starts``/``ends`` (layout_heads * num_blocks,): the CSR bounds of each layout row (crow[:-1],
    crow[1:]; or a sub-range of it, see :meth:`CSR.row_bounds`). Row j: [entry, start, end] for the
    j-th layout row block of :func:`launch_order` (entry = bh * num_blocks + block), whose layout
    row's key blocks are col[start:end]. ``heads`` counts the grid's heads; a per-head layout
    (``layout_heads`` > 1) has one layout row per head, so there heads == layout_heads.
    """
    num_blocks = starts.numel() // layout_heads
    entry = launch_order((ends - starts).view(layout_heads, num_blocks), batch, heads).long()
    block = entry % num_blocks
    lrow = block if layout_heads == 1 else (entry // num_blocks % heads) * num_blocks + block
    return torch.stack([entry, starts[lrow].long(), ends[lrow].long()], 1).to(torch.int32).contiguous()


def transposed_slots(
    crow: torch.Tensor, ccol: torch.Tensor, col: torch.Tensor, row: torch.Tensor, num_qb: int, num_kb: int
) -> torch.Tensor:
    """(nnz,) int32: the transposed-CSR position of each CSR tile (head, query block r, key block c).

    Both orders sort the key ((head * num_kb + c) * num_qb + r) differently: the transposed CSR is
    sorted by it, so a binary search finds every tile (O(nnz log nnz) on the device, no N x N).
    """
    nnz = col.numel()
    rows_of = torch.repeat_interleave(
        torch.arange(crow.numel() - 1, device=crow.device), crow.diff().long(), output_size=nnz
    )
    cols_of = torch.repeat_interleave(
        torch.arange(ccol.numel() - 1, device=ccol.device), ccol.diff().long(), output_size=nnz
    )
    key_csr = ((rows_of // num_qb) * num_kb + col.long()) * num_qb + rows_of % num_qb
    key_csc = cols_of * num_qb + row.long()
    return torch.searchsorted(key_csc, key_csr).to(torch.int32)


class KernelMask(NamedTuple):
    """The token masks as the kernels take them (see :mod:`attn_sparse.masks`).

    Query i sees keys max(i - left, docs[0, i]) <= j <= min(i + right, docs[1, i] - 1, Nk - 1);
    the dk/dv kernel reads the same mask from the keys: key j is seen by queries
    max(j - right, key_docs[0, j]) <= i <= min(j + left, key_docs[1, j] - 1, Nq - 1).

    ``banded``: False when nothing but the key count masks (the other fields are then unused);
    ``left``, ``right``: >= 0 (an unbounded side is Nq + Nk);
    ``docs``: (2, Nq) int32 contiguous, [first key, end key) each query may see (documents:
    :meth:`TokenMask.document_bounds`; any per-query key intervals: :class:`attn_sparse.intervals.KeyIntervals`),
    or None;
    ``key_docs``: (2, Nk) int32 contiguous, [first query, end query) that may see each key, the same
    mask seen from the keys, or None: then ``docs`` serves both sides, which is right only for
    bounds that are symmetric (documents, where Nq == Nk).
    Both rows of both arrays must be non-decreasing: the kernels find a tile's skipped, masked
    and unmasked neighbours from its first and last rows' bounds.
    """

    banded: bool
    left: int
    right: int
    docs: torch.Tensor | None
    key_docs: torch.Tensor | None = None

    @classmethod
    def causal(cls, is_causal: bool, seq_len_q: int, seq_len_k: int) -> KernelMask:
        """The mask of a call with at most ``is_causal``."""
        far = seq_len_q + seq_len_k
        return cls(bool(is_causal), far, 0 if is_causal else far, None, None)

    @property
    def key_side_docs(self) -> torch.Tensor | None:
        """The bounds the dk/dv kernel reads at key rows: ``key_docs``, else ``docs`` (symmetric bounds)."""
        return self.key_docs if self.key_docs is not None else self.docs


class DsChunk(NamedTuple):
    """One launch pair of the stored-dS backward: (batch, kv head) units u0..u1 and key blocks
    c0..c1, whose tiles are transposed-CSR positions p0..p1 of each unit's layout (the scratch
    holds p1 - p0 slots per query head, or per batch for a per-head layout)."""

    u0: int
    u1: int
    c0: int
    c1: int
    p0: int
    p1: int


def stored_ds_chunks(
    csr: CSR, batch: int, kv_heads: int, group: int, elem_size: int, cfg: KernelConfig
) -> list[DsChunk]:
    """The stored-dS backward's chunks, or [] when the recompute backward runs instead.

    A unit is one (batch, kv head) for a shared layout, whose dS per query head is the layout's
    tiles; a per-head layout's tiles already span every head, so its units are whole batches
    (bounds still counted in (batch, kv head) units). Chunks take whole units where one fits
    ``cfg.ds_scratch_bytes`` (on a GPU, also 1/DS_SCRATCH_MEMORY_SHARE of its memory), balanced;
    where one (batch, kv head) of a shared layout does not fit (dense 128K: 32 GiB of bf16 dS per
    head), each unit runs in ranges of key blocks that do, and dq adds up over the ranges (in
    fp32). More than one chunk is used only while each chunk's dk/dv work, spread over
    DKV_PROGRAMS_PER_SM programs per SM, outlasts its longest program (a key tile that every query
    block attends, as BigBird's global columns): otherwise each chunk waits on a few long programs
    (128K BigBird at density 0.056 in 8 chunks: 5% slower than recompute on an H200).
    """
    bq, bk = csr.block_size
    slot_bytes = bq * bk * elem_size
    nnz = csr.col.numel()
    per_head_layout = csr.num_heads > 1
    heads_per_slot = 1 if per_head_layout else group
    unit_tiles = nnz * heads_per_slot
    units = batch if per_head_layout else batch * kv_heads
    budget = min(cfg.ds_scratch_bytes, _scratch_cap(csr.col.device))
    # descriptor rows (slots * Bk, and transposed-CSR position * Bk) are int32 in the kernels
    max_tiles = min(budget // slot_bytes, (2**31 - 1) // bk)
    if nnz == 0 or units == 0 or max_tiles < heads_per_slot or nnz * bk >= 2**31:
        return []
    nkb = csr.num_key_blocks
    if unit_tiles <= max_tiles:
        n_chunks = -(-units // (max_tiles // unit_tiles))
        bounds = [units * c // n_chunks for c in range(n_chunks + 1)]
        if per_head_layout:
            bounds = [u * kv_heads for u in bounds]
        chunks = [DsChunk(u0, u1, 0, nkb, 0, nnz) for u0, u1 in itertools.pairwise(bounds)]
    elif not per_head_layout:
        ranges = csr.column_ranges(max_tiles // heads_per_slot)
        chunks = [DsChunk(u, u + 1, *r) for u in range(units) for r in ranges]
    else:
        return []
    if len(chunks) > 1:
        sub_tiles = (bq // cfg.dkv_m) * (bk // cfg.dkv_n)
        least = min(chunk_slots(c, per_head_layout, kv_heads, group) for c in chunks)
        chunk_work = least * sub_tiles / (DKV_PROGRAMS_PER_SM * _sm_count(csr.col.device))
        if csr.max_tiles_per_column() * group * (bq // cfg.dkv_m) > chunk_work:
            return []
    return chunks


def chunk_slots(chunk: DsChunk, per_head_layout: bool, kv_heads: int, group: int) -> int:
    """dS tiles (scratch slots) of one chunk: p1 - p0 per query head, or per batch for a per-head layout."""
    copies = (chunk.u1 - chunk.u0) // kv_heads if per_head_layout else (chunk.u1 - chunk.u0) * group
    return copies * (chunk.p1 - chunk.p0)


# dk/dv programs resident per SM (4 warps each; measured on H100/H200 timelines).
DKV_PROGRAMS_PER_SM = 2
# The stored-dS scratch takes at most this fraction (1/share) of a GPU's total memory. Total, not
# free: the caching allocator's free memory moves from call to call, and the backward form (and
# with it which kernels compile) should not.
DS_SCRATCH_MEMORY_SHARE = 16


def _scratch_cap(device: torch.device) -> int:
    """Most bytes of dS scratch on ``device`` (no cap off CUDA: the interpreter's tests size it)."""
    if device.type != "cuda":
        return 2**62
    return int(torch.cuda.get_device_properties(device).total_memory) // DS_SCRATCH_MEMORY_SHARE


def _sm_count(device: torch.device) -> int:
    """SMs of a CUDA device (1 elsewhere: the interpreter runs one program at a time)."""
    if device.type != "cuda":
        return 1
    return int(torch.cuda.get_device_properties(device).multi_processor_count)
