"""Tile helpers shared by the forward and backward Triton kernels (:mod:`.forward`, :mod:`.backward`).

Loop bounds of a layout row (where its masked tiles start), the launch-order lookups that map a
program to its tile, and the loads of query/key tiles (pointers, or TMA descriptors on sm90+).
"""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = [
    "COUNT_CHUNK",
    "count_below",
    "head_source",
    "head_sources",
    "key_tile",
    "load_row_tile",
    "ordered_row",
    "ordered_tile",
    "row_tile_ptrs",
    "row_tiles",
]

# Column/row indices are scanned this many at a time to find where the masked tiles start.
COUNT_CHUNK = tl.constexpr(64)


@triton.jit
def count_below(IDX, start, end, thr_a, thr_b, CHUNK: tl.constexpr):
    """(#indices < thr_a, #indices < thr_b) among IDX[start:end] (sorted, so these are prefixes)."""
    n_a = 0
    n_b = 0
    for i in range(start, end, CHUNK):
        offs = i + tl.arange(0, CHUNK)
        c = tl.load(IDX + offs, mask=offs < end, other=2147483647)
        n_a += tl.sum((c < thr_a).to(tl.int32), axis=0)
        n_b += tl.sum((c < thr_b).to(tl.int32), axis=0)
    return n_a, n_b


@triton.jit
def row_tiles(
    COL, start, end, m_start, N_Q, N_K, BLOCK_M: tl.constexpr, LAYOUT_BK: tl.constexpr, IS_CAUSAL: tl.constexpr
):
    """(n_full, n_use) of the layout row whose key blocks are COL[start:end], for the query tile at m_start.

    The tile uses COL[start:start + n_use], the first n_full need no mask. Blocks from c_full on
    hold the partial last key block or cross the causal diagonal; blocks at or past c_stop are
    entirely causal-masked and skipped.
    """
    c_full = N_K // LAYOUT_BK
    c_stop = 2147483647
    scan_end = end
    if IS_CAUSAL:
        c_full = tl.minimum(c_full, (m_start + 1) // LAYOUT_BK)
        c_stop = (tl.minimum(m_start + BLOCK_M, N_Q) - 1) // LAYOUT_BK + 1
    else:
        # no causal mask and N_K a multiple of the block: every tile is full, so skip the scan
        # (a chain of dependent loads before the first tile); a runtime test, not a specialisation
        scan_end = tl.where(N_K % LAYOUT_BK == 0, start, end)
    n_full, n_use = count_below(COL, start, scan_end, c_full, c_stop, COUNT_CHUNK)
    if not IS_CAUSAL:
        n_full = tl.where(scan_end == end, n_full, end - start)
        n_use = tl.where(scan_end == end, n_use, end - start)
    return n_full, n_use


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
