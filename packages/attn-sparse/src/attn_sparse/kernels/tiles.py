"""Tile helpers shared by the forward and backward Triton kernels (:mod:`.forward`, :mod:`.backward`).

Loop bounds of a layout row or column (which of its tiles need the per-element mask, which are
skipped: see :mod:`attn_sparse.masks` for the interval form of the token masks), the launch-order lookups that map a
program to its tile, and the loads of query/key tiles (pointers, or TMA descriptors on sm90+).
"""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = [
    "COUNT_CHUNK",
    "band_bounds",
    "band_tiles",
    "count_below",
    "head_source",
    "head_sources",
    "key_tile",
    "load_row_tile",
    "ordered_row",
    "ordered_tile",
    "row_band",
    "row_tile_ptrs",
    "row_tiles",
]

# Column/row indices are scanned this many at a time to find where the masked tiles start.
COUNT_CHUNK = tl.constexpr(64)


@triton.jit
def count_below(IDX, start, end, t_a, t_b, t_c, t_d, CHUNK: tl.constexpr):
    """How many of IDX[start:end] (sorted, so these are prefixes) are below each of t_a..t_d."""
    n_a = 0
    n_b = 0
    n_c = 0
    n_d = 0
    for i in range(start, end, CHUNK):
        offs = i + tl.arange(0, CHUNK)
        c = tl.load(IDX + offs, mask=offs < end, other=2147483647)
        n_a += tl.sum((c < t_a).to(tl.int32), axis=0)
        n_b += tl.sum((c < t_b).to(tl.int32), axis=0)
        n_c += tl.sum((c < t_c).to(tl.int32), axis=0)
        n_d += tl.sum((c < t_d).to(tl.int32), axis=0)
    return n_a, n_b, n_c, n_d


@triton.jit
def row_tiles(COL, start, end, N_K, LAYOUT_BK: tl.constexpr):
    """(p_a, p_b, p_c, p_d) for a row without token masks (only the key count masks): COL[start:p_c]
    need no mask, COL[p_c:p_d] (the partial last key block) do; p_a == p_b == start.

    N_K a multiple of the block: every tile is full, so the scan (a chain of dependent loads
    before the first tile) is skipped; a runtime test, not a specialisation.
    """
    c_full = N_K // LAYOUT_BK
    scan_end = tl.where(N_K % LAYOUT_BK == 0, start, end)
    _, _, n_full, n_use = count_below(COL, start, scan_end, 0, 0, c_full, 2147483647, COUNT_CHUNK)
    n_full = tl.where(scan_end == end, n_full, end - start)
    n_use = tl.where(scan_end == end, n_use, end - start)
    return start, start, start + n_full, start + n_use


@triton.jit
def band_bounds(offs, N_SELF, N_OTHER, back, ahead, DOCS, HAS_DOCS: tl.constexpr):
    """(lo, hi) int32 for indices ``offs`` on one side (queries, or keys): x pairs with the other
    side's y in lo <= y <= hi, lo = max(x - back, doc_start(x), 0), hi = min(x + ahead,
    doc_end(x) - 1, N_OTHER - 1) (attn_sparse.masks). Queries: back, ahead = the window's left,
    right; keys: right, left (the same mask seen from the key). DOCS: (2, N_SELF) int32 document
    starts and ends (HAS_DOCS). Computed in int64: x + ahead may pass 2**31."""
    x = offs.to(tl.int64)
    lo = tl.maximum(x - back, 0)
    hi = tl.minimum(x + ahead, N_OTHER - 1)
    if HAS_DOCS:
        ok = offs < N_SELF
        lo = tl.maximum(lo, tl.load(DOCS + offs, mask=ok, other=0).to(tl.int64))
        hi = tl.minimum(hi, tl.load(DOCS + N_SELF + offs, mask=ok, other=1).to(tl.int64) - 1)
    return lo.to(tl.int32), hi.to(tl.int32)


@triton.jit
def band_tiles(IDX, start, end, lo, hi, ok, LAYOUT_B: tl.constexpr):
    """(p_a, p_b, p_c, p_d): positions in IDX[start:end] (the sorted blocks of a layout row or
    column) for a tile whose lines (queries, or keys) see the intervals lo..hi (where ok).

    IDX[p_a:p_b] and IDX[p_c:p_d] hold the band's edges and need the per-element mask;
    IDX[p_b:p_c] lie inside every line's interval (no mask); the rest are skipped. lo and hi
    never decrease along the lines, so the tile sees blocks from its first lo to its last hi,
    and every line sees those from its last lo to its first hi.
    """
    lo_first = tl.min(tl.where(ok, lo, 2147483647), 0)
    lo_last = tl.max(tl.where(ok, lo, 0), 0)
    hi_first = tl.min(tl.where(ok, hi, 2147483647), 0)
    hi_last = tl.max(tl.where(ok, hi, -1), 0)
    t_a = lo_first // LAYOUT_B
    t_b = tl.maximum(t_a, (lo_last + LAYOUT_B - 1) // LAYOUT_B)
    t_c = tl.maximum(t_b, (hi_first + 1) // LAYOUT_B)
    t_d = tl.maximum(t_c, (hi_last + LAYOUT_B) // LAYOUT_B)
    n_a, n_b, n_c, n_d = count_below(IDX, start, end, t_a, t_b, t_c, t_d, COUNT_CHUNK)
    return start + n_a, start + n_b, start + n_c, start + n_d


@triton.jit
def row_band(
    COL, start, end, offs_m, m_ok, N_Q, N_K, win_left, win_right, DOCS,
    BANDED: tl.constexpr, HAS_DOCS: tl.constexpr, BLOCK_M: tl.constexpr, LAYOUT_BK: tl.constexpr,
):  # fmt: skip
    """(lo, hi, p_a, p_b, p_c, p_d) of a query tile's layout row COL[start:end]: each row's key
    interval and the tile positions of :func:`band_tiles` (BANDED: the token masks), or of
    :func:`row_tiles` (only keys past N_K masked: lo = 0, hi = N_K - 1)."""
    if BANDED:
        lo, hi = band_bounds(offs_m, N_Q, N_K, win_left, win_right, DOCS, HAS_DOCS)
        p_a, p_b, p_c, p_d = band_tiles(COL, start, end, lo, hi, m_ok, LAYOUT_BK)
    else:
        lo = tl.zeros([BLOCK_M], tl.int32)
        hi = tl.full([BLOCK_M], N_K - 1, tl.int32)
        p_a, p_b, p_c, p_d = row_tiles(COL, start, end, N_K, LAYOUT_BK)
    return lo, hi, p_a, p_b, p_c, p_d


@triton.jit
def ordered_tile(ORDER, NUM_BLOCKS, TILE: tl.constexpr, LAYOUT_B: tl.constexpr, RECORD: tl.constexpr):
    """(batch*head index, first token, pointer to its ORDER record) of the tile this program owns.

    ORDER holds RECORD int32 per launched layout block, the first being bh * NUM_BLOCKS + block
    (launch_order: RECORD = 1; row_table: 3); each layout block holds LAYOUT_B // TILE consecutive
    programs.
    """
    SUBT: tl.constexpr = LAYOUT_B // TILE
    pid = tl.program_id(0)
    rec = ORDER + (pid // SUBT) * RECORD
    entry = tl.load(rec)
    return entry // NUM_BLOCKS, (entry % NUM_BLOCKS) * LAYOUT_B + (pid % SUBT) * TILE, rec


@triton.jit
def ordered_row(TABLE, NUM_BLOCKS, TILE: tl.constexpr, LAYOUT_B: tl.constexpr):
    """(batch*head index, first token, row start, row end) of this program's tile.

    TABLE is :meth:`CSR.row_table`: per launched layout row block, its launch-order entry with the
    CSR bounds of its layout row already gathered, so the first key block index is one dependent
    load away instead of two (order, then row offsets), which shortens every program's start; that
    matters on short rows (a handful of tiles per program). Gathering the first key block into the
    table too was slower on long rows in an H200 probe.
    """
    bh, first, rec = ordered_tile(TABLE, NUM_BLOCKS, TILE, LAYOUT_B, 3)
    return bh, first, tl.load(rec + 1), tl.load(rec + 2)


@triton.jit
def key_tile(
    SRC,
    b,
    hk,
    n0,
    N_K,
    stride_n,
    HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr,
    MASKED: tl.constexpr,
    TMA: tl.constexpr,
    TRANSPOSED: tl.constexpr,
):
    """Keys n0..n0+BLOCK_N of a K or V head: (BLOCK_N, D), or (D, BLOCK_N) when TRANSPOSED.

    SRC is the head's base pointer, or a TMA descriptor over (B, N, Hkv, D), which zero-fills rows
    past N_K (its N extent is per batch), so that path needs no mask; pointer loads mask them when
    MASKED.
    """
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    if TMA:
        tile = SRC.load([b, n0, hk, 0]).reshape(BLOCK_N, HEAD_DIM)
        if TRANSPOSED:
            tile = tl.trans(tile)
    else:
        base = SRC + n0.to(tl.int64) * stride_n
        if TRANSPOSED:
            ptrs = base + offs_n[None, :] * stride_n + offs_d[:, None]
            keep = ((n0 + offs_n) < N_K)[None, :]
        else:
            ptrs = base + offs_n[:, None] * stride_n + offs_d[None, :]
            keep = ((n0 + offs_n) < N_K)[:, None]
        if MASKED:
            tile = tl.load(ptrs, mask=keep, other=0.0)
        else:
            tile = tl.load(ptrs)
    return tile


@triton.jit
def row_tile_ptrs(X, b, h, rows, offs_d, stride_b, stride_n, stride_h):
    """Pointers to the (rows, HEAD_DIM) tile of (batch b, head h) of a (B, N, heads, D) tensor."""
    return X + b.to(tl.int64) * stride_b + h.to(tl.int64) * stride_h + rows * stride_n + offs_d[None, :]


@triton.jit
def load_row_tile(X, b, h, rows, offs_d, row_ok, stride_b, stride_n, stride_h):
    """The (rows, HEAD_DIM) tile of (batch b, head h), zeros where not row_ok."""
    ptrs = row_tile_ptrs(X, b, h, rows, offs_d, stride_b, stride_n, stride_h)
    return tl.load(ptrs, mask=row_ok[:, None], other=0.0)


@triton.jit
def head_source(X, b, head, stride_b, stride_h, TMA: tl.constexpr):
    """Where the streamed tiles of a (B, N, heads, D) tensor are read from for (batch b, head):
    the TMA descriptor itself, or the head's base pointer."""
    if TMA:
        X_src = X
    else:
        X_src = X + b.to(tl.int64) * stride_b + head.to(tl.int64) * stride_h
    return X_src


@triton.jit
def head_sources(X, Y, b, head, stride_xb, stride_xh, stride_yb, stride_yh, TMA: tl.constexpr):
    """head_source of two tensors of one head (K/V, or Q/dO in the dk/dv kernel)."""
    return head_source(X, b, head, stride_xb, stride_xh, TMA), head_source(Y, b, head, stride_yb, stride_yh, TMA)
