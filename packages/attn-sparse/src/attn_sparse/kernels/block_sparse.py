"""Triton block-sparse attention: forward with LSE and an exact backward.

Work is driven by a CSR block layout, passed as raw tensors so the kernels do not depend on the
layout class:

- ``crow`` (Hl * nqb + 1,) int32 and ``col`` (nnz,) int32: active key blocks of each query block,
  sorted within each row (row ``lh * nqb + i``);
- ``ccol`` (Hl * nkb + 1,) int32 and ``row`` (nnz,) int32: the same tiles grouped by key block
  (the transposed CSR), used by the dk/dv kernel;
- ``Hl`` is 1 (one layout shared by every head) or H (one layout per query head).

Each program of the forward / dq kernel owns BLOCK_M query rows (inside one layout row block of
Bq rows) and loops over that row's active key blocks, BLOCK_N keys at a time; the dk/dv kernel
owns BLOCK_N keys of one kv head and loops over the active query blocks of that key block for
every query head of its GQA group (so dk/dv are written once, with no atomics). Softmax runs in
base 2 with fp32 accumulation. Because column (row) indices are sorted, the tiles that need a
mask (causal diagonal tiles, the partial last key block) form a suffix (prefix) of each list:
they are counted first and run in a separate masked loop, so the bulk loop has no masking.
The backward has two forms. Stored dS (the default where the scratch fits, see stored_ds_chunks):
a delta kernel (rowsum(out * dout)), then per chunk of (batch, kv head) units (and, where one unit
does not fit, of key blocks) the dk/dv kernel, which also writes dS (q.dtype) into a scratch slot
per tile, and a row-parallel dq = dS @ K kernel (adding up over key-block chunks in fp32):
5 matmuls per tile. Recompute: the dq kernel recomputes P and dP (and writes delta), then the dk/dv
kernel: 7 matmuls per tile, no scratch. Both give the same dS values (cast to q.dtype before its
matmuls), so dq, dk and dv agree between the two.
Programs take layout rows (columns) in launch_order: heaviest power-of-two work bucket first,
head by head inside a bucket, so BigBird-like global rows start early instead of forming a tail
while a head's programs share its tiles in L2. On sm90+ GPUs the streamed tiles (K/V, or Q/dO in the dk/dv kernel) come through TMA
tensor descriptors (KernelConfig.tma). Forward and backward are
``torch.library`` custom ops (``attn_sparse::block_sparse_fwd`` / ``_bwd``) with a registered
autograd formula when ``torch.compile`` traces them (no graph breaks); eager calls use a plain
``torch.autograd.Function`` around the same functions.

Shapes: q (B, Nq, H, D); k, v (B, Nk, Hkv, D); out like q; lse (B, H, Nq) fp32, natural log,
``-inf`` for rows that see no key (whose output is 0).
"""

from __future__ import annotations

import bisect
import itertools
import math
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from typing import Any, NamedTuple

import torch
import triton
import triton.language as tl
from torch.multiprocessing.reductions import StorageWeakRef

from .._memo import BoundedMemo
from .._triton_env import interpret_mode
from ._launch import device_guard

try:  # host-side TMA descriptors (Triton >= 3.3)
    from triton.tools.tensor_descriptor import TensorDescriptor as _TensorDescriptor
except ImportError:  # pragma: no cover - older Triton: the pointer path is used
    _TensorDescriptor = None

__all__ = [
    "CSR",
    "DsChunk",
    "KernelConfig",
    "block_sparse_attention_csr",
    "block_sparse_backward",
    "block_sparse_forward",
    "default_config",
    "interpret_mode",
    "launch_order",
    "row_table",
]

LOG2E = 1.4426950408889634
# Column/row indices are scanned this many at a time to find where the masked tiles start.
COUNT_CHUNK = tl.constexpr(64)


@triton.jit
def _count_below(IDX, start, end, thr_a, thr_b, CHUNK: tl.constexpr):
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
def _row_tiles(
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
    n_full, n_use = _count_below(COL, start, scan_end, c_full, c_stop, COUNT_CHUNK)
    if not IS_CAUSAL:
        n_full = tl.where(scan_end == end, n_full, end - start)
        n_use = tl.where(scan_end == end, n_use, end - start)
    return n_full, n_use


@triton.jit
def _ordered_tile(ORDER, NUM_BLOCKS, TILE: tl.constexpr, LAYOUT_B: tl.constexpr, RECORD: tl.constexpr):
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
def _ordered_row(TABLE, NUM_BLOCKS, TILE: tl.constexpr, LAYOUT_B: tl.constexpr):
    """(batch*head index, first token, row start, row end) of this program's tile.

    TABLE is :meth:`CSR.row_table`: per launched layout row block, its launch-order entry with the
    CSR bounds of its layout row already gathered, so the first key block index is one dependent
    load away instead of two (order, then row offsets), which shortens every program's start; that
    matters on short rows (a handful of tiles per program). Gathering the first key block into the
    table too was slower on long rows in an H200 probe.
    """
    bh, first, rec = _ordered_tile(TABLE, NUM_BLOCKS, TILE, LAYOUT_B, 3)
    return bh, first, tl.load(rec + 1), tl.load(rec + 2)


@triton.jit
def _key_tile(
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
def _row_tile_ptrs(X, b, h, rows, offs_d, stride_b, stride_n, stride_h):
    """Pointers to the (rows, HEAD_DIM) tile of (batch b, head h) of a (B, N, heads, D) tensor."""
    return X + b.to(tl.int64) * stride_b + h.to(tl.int64) * stride_h + rows * stride_n + offs_d[None, :]


@triton.jit
def _load_row_tile(X, b, h, rows, offs_d, row_ok, stride_b, stride_n, stride_h):
    """The (rows, HEAD_DIM) tile of (batch b, head h), zeros where not row_ok."""
    ptrs = _row_tile_ptrs(X, b, h, rows, offs_d, stride_b, stride_n, stride_h)
    return tl.load(ptrs, mask=row_ok[:, None], other=0.0)


@triton.jit
def _head_source(X, b, head, stride_b, stride_h, TMA: tl.constexpr):
    """Where the streamed tiles of a (B, N, heads, D) tensor are read from for (batch b, head):
    the TMA descriptor itself, or the head's base pointer."""
    if TMA:
        X_src = X
    else:
        X_src = X + b.to(tl.int64) * stride_b + head.to(tl.int64) * stride_h
    return X_src


@triton.jit
def _head_sources(X, Y, b, head, stride_xb, stride_xh, stride_yb, stride_yh, TMA: tl.constexpr):
    """_head_source of two tensors of one head (K/V, or Q/dO in the dk/dv kernel)."""
    return _head_source(X, b, head, stride_xb, stride_xh, TMA), _head_source(Y, b, head, stride_yb, stride_yh, TMA)


@triton.jit
def _fwd_inner(
    acc,
    l_i,
    m_i,
    q,
    K_src,
    V_src,
    b,
    hk,
    COL,
    it_lo,
    it_hi,
    row_end,
    offs_m,
    N_K,
    stride_kn,
    stride_vn,
    qk_scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr,
    LAYOUT_BK: tl.constexpr,
    MASKED: tl.constexpr,
    IS_CAUSAL: tl.constexpr,
    TMA: tl.constexpr,
):
    """Online softmax over key tiles it_lo..it_hi (<= row_end, the end of the row's tiles); K_src/V_src:
    head pointers, or TMA descriptors."""
    SUB: tl.constexpr = LAYOUT_BK // BLOCK_N
    offs_n = tl.arange(0, BLOCK_N)
    # Each next key block index is read one iteration ahead: the K/V loads depend on it, and
    # Triton's pipeliner does not prefetch that scalar load, so reading it in the same iteration
    # stalls every tile (~15% of the forward on an H100; the backward loops measured no gain).
    # The first read is bounded by the row's end, not it_hi, so it need not wait for the count.
    col_next = tl.load(COL + it_lo // SUB, mask=it_lo < row_end, other=0)
    for it in range(it_lo, it_hi):
        col = col_next
        col_next = tl.load(COL + tl.minimum(it + 1, it_hi - 1) // SUB)
        n0 = col * LAYOUT_BK + (it % SUB) * BLOCK_N
        k_t = _key_tile(K_src, b, hk, n0, N_K, stride_kn, HEAD_DIM, BLOCK_N, MASKED, TMA, True)
        v = _key_tile(V_src, b, hk, n0, N_K, stride_vn, HEAD_DIM, BLOCK_N, MASKED, TMA, False)
        qk = tl.dot(q, k_t)
        if MASKED:
            keep = ((n0 + offs_n) < N_K)[None, :]
            if IS_CAUSAL:
                keep = keep & ((n0 + offs_n)[None, :] <= offs_m[:, None])
            qk = tl.where(keep, qk * qk_scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            # a row with every key masked so far keeps m = -inf; use 0 as its reference point
            m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.math.exp2(qk - m_ref[:, None])
        else:
            # the scale folds into one FMA: exp2(qk * scale - m)
            m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
            m_ref = m_new
            p = tl.math.exp2(qk * qk_scale - m_ref[:, None])
        alpha = tl.math.exp2(m_i - m_ref)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
        m_i = m_new
    return acc, l_i, m_i


# Lengths and layout sizes are not specialised on (divisibility by 16, == 1): a new N or pattern
# reuses the compiled kernels instead of compiling variants.
@triton.jit(do_not_specialize=["N_Q", "N_K", "NUM_QB"])
def _fwd_kernel(
    Q,
    K,
    V,
    O,
    LSE,
    COL,
    TABLE,
    stride_qb,
    stride_qn,
    stride_qh,
    stride_kb,
    stride_kn,
    stride_kh,
    stride_vb,
    stride_vn,
    stride_vh,
    stride_ob,
    stride_on,
    stride_oh,
    N_Q,
    N_K,
    H,
    GROUP,
    NUM_QB,
    qk_scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    LAYOUT_BQ: tl.constexpr,
    LAYOUT_BK: tl.constexpr,
    IS_CAUSAL: tl.constexpr,
    TMA: tl.constexpr,
):
    SUB: tl.constexpr = LAYOUT_BK // BLOCK_N
    bh, m_start, start, end = _ordered_row(TABLE, NUM_QB, BLOCK_M, LAYOUT_BQ)
    b = bh // H
    h = bh % H
    hk = h // GROUP
    if m_start >= N_Q:
        return
    offs_m = m_start + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    m_ok = offs_m < N_Q

    Q_head = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    K_src, V_src = _head_sources(K, V, b, hk, stride_kb, stride_kh, stride_vb, stride_vh, TMA)
    q_ptrs = Q_head + m_start.to(tl.int64) * stride_qn + tl.arange(0, BLOCK_M)[:, None] * stride_qn + offs_d[None, :]
    q = tl.load(q_ptrs, mask=m_ok[:, None], other=0.0)

    n_full, n_use = _row_tiles(COL, start, end, m_start, N_Q, N_K, BLOCK_M, LAYOUT_BK, IS_CAUSAL)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    acc, l_i, m_i = _fwd_inner(
        acc, l_i, m_i, q, K_src, V_src, b, hk, COL, start * SUB, (start + n_full) * SUB, end * SUB, offs_m, N_K,
        stride_kn, stride_vn, qk_scale, HEAD_DIM, BLOCK_N, LAYOUT_BK, False, IS_CAUSAL, TMA,
    )  # fmt: skip
    acc, l_i, m_i = _fwd_inner(
        acc, l_i, m_i, q, K_src, V_src, b, hk, COL, (start + n_full) * SUB, (start + n_use) * SUB, end * SUB, offs_m,
        N_K, stride_kn, stride_vn, qk_scale, HEAD_DIM, BLOCK_N, LAYOUT_BK, True, IS_CAUSAL, TMA,
    )  # fmt: skip

    empty = l_i == 0.0
    # one reciprocal per row and a multiply per element: a division per element (64 per thread)
    # was a measurable part of the epilogue, which short rows pay once per handful of tiles
    out = acc * (1.0 / tl.where(empty, 1.0, l_i))[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(tl.where(empty, 1.0, l_i))) / 1.4426950408889634)
    o_ptrs = (
        O
        + b.to(tl.int64) * stride_ob
        + h.to(tl.int64) * stride_oh
        + m_start.to(tl.int64) * stride_on
        + tl.arange(0, BLOCK_M)[:, None] * stride_on
        + offs_d[None, :]
    )
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=m_ok[:, None])
    tl.store(LSE + bh.to(tl.int64) * N_Q + offs_m, lse, mask=m_ok)


@triton.jit
def _dq_inner(
    dq,
    q,
    do,
    lse2,
    delta,
    K_src,
    V_src,
    b,
    hk,
    COL,
    it_lo,
    it_hi,
    offs_m,
    N_K,
    stride_kn,
    stride_vn,
    qk_scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr,
    LAYOUT_BK: tl.constexpr,
    MASKED: tl.constexpr,
    IS_CAUSAL: tl.constexpr,
    TMA: tl.constexpr,
):
    SUB: tl.constexpr = LAYOUT_BK // BLOCK_N
    offs_n = tl.arange(0, BLOCK_N)
    for it in range(it_lo, it_hi):
        col = tl.load(COL + it // SUB)
        n0 = col * LAYOUT_BK + (it % SUB) * BLOCK_N
        k_t = _key_tile(K_src, b, hk, n0, N_K, stride_kn, HEAD_DIM, BLOCK_N, MASKED, TMA, True)
        v_t = _key_tile(V_src, b, hk, n0, N_K, stride_vn, HEAD_DIM, BLOCK_N, MASKED, TMA, True)
        p = tl.math.exp2(tl.dot(q, k_t) * qk_scale - lse2[:, None])
        if MASKED:
            keep = ((n0 + offs_n) < N_K)[None, :]
            if IS_CAUSAL:
                keep = keep & ((n0 + offs_n)[None, :] <= offs_m[:, None])
            p = tl.where(keep, p, 0.0)
        dp = tl.dot(do, v_t)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k_t.dtype), tl.trans(k_t))
    return dq


@triton.jit(do_not_specialize=["N_Q", "N_K", "NUM_QB"])
def _dq_kernel(
    Q,
    K,
    V,
    O,
    DO,
    DQ,
    LSE,
    DELTA,
    COL,
    TABLE,
    stride_qb,
    stride_qn,
    stride_qh,
    stride_kb,
    stride_kn,
    stride_kh,
    stride_vb,
    stride_vn,
    stride_vh,
    stride_ob,
    stride_on,
    stride_oh,
    stride_db,
    stride_dn,
    stride_dh,
    stride_gb,
    stride_gn,
    stride_gh,
    N_Q,
    N_K,
    H,
    GROUP,
    NUM_QB,
    qk_scale,
    sm_scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    LAYOUT_BQ: tl.constexpr,
    LAYOUT_BK: tl.constexpr,
    IS_CAUSAL: tl.constexpr,
    TMA: tl.constexpr,
):
    SUB: tl.constexpr = LAYOUT_BK // BLOCK_N
    bh, m_start, start, end = _ordered_row(TABLE, NUM_QB, BLOCK_M, LAYOUT_BQ)
    b = bh // H
    h = bh % H
    hk = h // GROUP
    if m_start >= N_Q:
        return
    offs_m = m_start + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    m_ok = offs_m < N_Q
    rows = m_start.to(tl.int64) + tl.arange(0, BLOCK_M)[:, None]

    q = _load_row_tile(Q, b, h, rows, offs_d, m_ok, stride_qb, stride_qn, stride_qh)
    do = _load_row_tile(DO, b, h, rows, offs_d, m_ok, stride_db, stride_dn, stride_dh)
    lse = tl.load(LSE + bh.to(tl.int64) * N_Q + offs_m, mask=m_ok, other=float("inf"))
    # rows that saw no key (lse = -inf) get p = exp2(s - inf) = 0: zero gradient, never NaN
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
    # delta = rowsum(out * dout), computed here (each row belongs to exactly one dq program) and
    # stored for the dk/dv kernel, which runs after this one: no separate pass over out and dout
    o = _load_row_tile(O, b, h, rows, offs_d, m_ok, stride_ob, stride_on, stride_oh)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    tl.store(DELTA + bh.to(tl.int64) * N_Q + offs_m, delta, mask=m_ok)
    K_src, V_src = _head_sources(K, V, b, hk, stride_kb, stride_kh, stride_vb, stride_vh, TMA)

    n_full, n_use = _row_tiles(COL, start, end, m_start, N_Q, N_K, BLOCK_M, LAYOUT_BK, IS_CAUSAL)

    dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    dq = _dq_inner(
        dq, q, do, lse2, delta, K_src, V_src, b, hk, COL, start * SUB, (start + n_full) * SUB, offs_m, N_K,
        stride_kn, stride_vn, qk_scale, HEAD_DIM, BLOCK_N, LAYOUT_BK, False, IS_CAUSAL, TMA,
    )  # fmt: skip
    dq = _dq_inner(
        dq, q, do, lse2, delta, K_src, V_src, b, hk, COL, (start + n_full) * SUB, (start + n_use) * SUB, offs_m,
        N_K, stride_kn, stride_vn, qk_scale, HEAD_DIM, BLOCK_N, LAYOUT_BK, True, IS_CAUSAL, TMA,
    )  # fmt: skip
    dq = dq * sm_scale
    tl.store(
        _row_tile_ptrs(DQ, b, h, rows, offs_d, stride_gb, stride_gn, stride_gh),
        dq.to(DQ.dtype.element_ty),
        mask=m_ok[:, None],
    )


@triton.jit
def _dkv_inner(
    dk,
    dv,
    k,
    v,
    Q_src,
    DO_src,
    b,
    h,
    LSE_head,
    DELTA_head,
    ROW,
    it_lo,
    it_hi,
    offs_n,
    N_Q,
    stride_qn,
    stride_dn,
    qk_scale,
    DS_tile,
    ds_row0,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    LAYOUT_BQ: tl.constexpr,
    LAYOUT_BK: tl.constexpr,
    MASKED: tl.constexpr,
    TMA: tl.constexpr,
    STORE_DS: tl.constexpr,
    DS_TMA: tl.constexpr,
):
    """dk/dv over query tiles it_lo..it_hi of one head; with STORE_DS, dS of every tile is also
    written to the scratch: DS_tile is this program's key rows of slot 0 (pointers), or with DS_TMA
    a descriptor over the scratch as (slots * LAYOUT_BK, LAYOUT_BQ) with those rows from ds_row0."""
    SUB: tl.constexpr = LAYOUT_BQ // BLOCK_M
    offs_mb = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    for it in range(it_lo, it_hi):
        r = tl.load(ROW + it // SUB)
        m0 = r * LAYOUT_BQ + (it % SUB) * BLOCK_M
        offs_m = m0 + offs_mb
        m_ok = offs_m < N_Q
        # rows past N_Q load q = do = 0 and lse = +inf, so they contribute p = 0: no mask needed
        if TMA:
            q_t = tl.trans(Q_src.load([b, m0, h, 0]).reshape(BLOCK_M, HEAD_DIM))
            do = DO_src.load([b, m0, h, 0]).reshape(BLOCK_M, HEAD_DIM)
        else:
            q_t = tl.load(
                Q_src + m0.to(tl.int64) * stride_qn + offs_mb[None, :] * stride_qn + offs_d[:, None],
                mask=m_ok[None, :],
                other=0.0,
            )
            do = tl.load(
                DO_src + m0.to(tl.int64) * stride_dn + offs_mb[:, None] * stride_dn + offs_d[None, :],
                mask=m_ok[:, None],
                other=0.0,
            )
        lse = tl.load(LSE_head + offs_m, mask=m_ok, other=float("inf"))
        lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
        delta = tl.load(DELTA_head + offs_m, mask=m_ok, other=0.0)
        qk_t = tl.dot(k, q_t) * qk_scale  # (BLOCK_N, BLOCK_M)
        p_t = tl.math.exp2(qk_t - lse2[None, :])
        if MASKED:
            p_t = tl.where(offs_m[None, :] >= offs_n[:, None], p_t, 0.0)
        dv += tl.dot(p_t.to(do.dtype), do)
        dp_t = tl.dot(v, tl.trans(do))
        ds_t = (p_t * (dp_t - delta[None, :])).to(q_t.dtype)
        if STORE_DS:
            # tile slot it // SUB holds (LAYOUT_BK, LAYOUT_BQ) key-major; these are its query
            # columns (it % SUB) * BLOCK_M.. (the dq-from-dS kernel reads the same values)
            if DS_TMA:
                DS_tile.store([ds_row0 + (it // SUB) * LAYOUT_BK, (it % SUB) * BLOCK_M], ds_t)
            else:
                ds_ptrs = DS_tile + tl.cast(it // SUB, tl.int64) * (LAYOUT_BQ * LAYOUT_BK) + (it % SUB) * BLOCK_M
                tl.store(ds_ptrs + offs_mb[None, :], ds_t)
        dk += tl.dot(ds_t, tl.trans(q_t))
    return dk, dv


@triton.jit(
    do_not_specialize=["N_Q", "N_K", "NUM_KB", "LAYOUT_HEAD_COLS", "UNIT0", "SLOT_HEADS", "SLOT_STRIDE", "SLOT_BASE"]
)
def _dkv_kernel(
    Q,
    K,
    V,
    DO,
    DK,
    DV,
    LSE,
    DELTA,
    CCOL,
    ROW,
    ORDER,
    DS,
    stride_qb,
    stride_qn,
    stride_qh,
    stride_kb,
    stride_kn,
    stride_kh,
    stride_vb,
    stride_vn,
    stride_vh,
    stride_db,
    stride_dn,
    stride_dh,
    stride_gkb,
    stride_gkn,
    stride_gkh,
    stride_gvb,
    stride_gvn,
    stride_gvh,
    N_Q,
    N_K,
    H,
    HKV,
    GROUP,
    NUM_KB,
    LAYOUT_HEAD_COLS,
    UNIT0,
    SLOT_HEADS,
    SLOT_STRIDE,
    SLOT_BASE,
    qk_scale,
    sm_scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    LAYOUT_BQ: tl.constexpr,
    LAYOUT_BK: tl.constexpr,
    IS_CAUSAL: tl.constexpr,
    TMA: tl.constexpr,
    STORE_DS: tl.constexpr,
    DS_TMA: tl.constexpr,
):
    """dk, dv of BLOCK_N keys of one (batch, kv head): UNIT0 + the launch-order entry's unit.

    With STORE_DS, dS of each tile goes to the scratch DS at slot (q_unit // SLOT_HEADS) *
    SLOT_STRIDE + (the tile's transposed-CSR position) - SLOT_BASE, q_unit = the (batch, query
    head) index counted from this launch's first (SLOT_BASE: the position of the launch's first
    key block, when it covers a range of them); a slot holds (LAYOUT_BK, LAYOUT_BQ) values,
    key-major.
    """
    SUB: tl.constexpr = LAYOUT_BQ // BLOCK_M
    local_bhk, n_start, _ = _ordered_tile(ORDER, NUM_KB, BLOCK_N, LAYOUT_BK, 1)
    bhk = UNIT0 + local_bhk
    b = bhk // HKV
    hk = bhk % HKV
    if n_start >= N_K:
        return
    offs_n = n_start + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    n_ok = offs_n < N_K
    keys = n_start.to(tl.int64) + tl.arange(0, BLOCK_N)[:, None]
    k = _load_row_tile(K, b, hk, keys, offs_d, n_ok, stride_kb, stride_kn, stride_kh)
    v = _load_row_tile(V, b, hk, keys, offs_d, n_ok, stride_vb, stride_vn, stride_vh)
    # query blocks below r_skip lie entirely before these keys (causal: nothing to do); those below
    # r_full cross the diagonal and need the mask; the rest are unmasked
    r_skip = 0
    r_full = 0
    if IS_CAUSAL:
        r_skip = n_start // LAYOUT_BQ
        r_full = (n_start + BLOCK_N - 1 + LAYOUT_BQ - 1) // LAYOUT_BQ
    dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    for g in range(0, GROUP):
        h = hk * GROUP + g
        lcol = h * LAYOUT_HEAD_COLS + n_start // LAYOUT_BK
        start = tl.load(CCOL + lcol)
        end = tl.load(CCOL + lcol + 1)
        n_skip = 0
        n_mask = 0
        if IS_CAUSAL:  # without a causal mask no tile is masked: skip the scan (a dependent load)
            n_skip, n_mask = _count_below(ROW, start, end, r_skip, r_full, COUNT_CHUNK)
        Q_src, DO_src = _head_sources(Q, DO, b, h, stride_qb, stride_qh, stride_db, stride_dh, TMA)
        bh = b * H + h
        LSE_head = LSE + bh.to(tl.int64) * N_Q
        DELTA_head = DELTA + bh.to(tl.int64) * N_Q
        DS_tile = DS
        ds_row0 = 0
        if STORE_DS:
            slot0 = ((local_bhk * GROUP + g) // SLOT_HEADS).to(tl.int64) * SLOT_STRIDE - SLOT_BASE
            if DS_TMA:
                ds_row0 = (slot0 * LAYOUT_BK + n_start % LAYOUT_BK).to(tl.int32)
            else:
                rows_in_slot = n_start % LAYOUT_BK + tl.arange(0, BLOCK_N)
                DS_tile = DS + slot0 * (LAYOUT_BQ * LAYOUT_BK) + rows_in_slot[:, None] * LAYOUT_BQ
        dk, dv = _dkv_inner(
            dk, dv, k, v, Q_src, DO_src, b, h, LSE_head, DELTA_head, ROW, (start + n_skip) * SUB,
            (start + n_mask) * SUB, offs_n, N_Q, stride_qn, stride_dn, qk_scale, DS_tile, ds_row0, HEAD_DIM,
            BLOCK_M, LAYOUT_BQ, LAYOUT_BK, True, TMA, STORE_DS, DS_TMA,
        )  # fmt: skip
        dk, dv = _dkv_inner(
            dk, dv, k, v, Q_src, DO_src, b, h, LSE_head, DELTA_head, ROW, (start + n_mask) * SUB, end * SUB,
            offs_n, N_Q, stride_qn, stride_dn, qk_scale, DS_tile, ds_row0, HEAD_DIM, BLOCK_M, LAYOUT_BQ, LAYOUT_BK,
            False, TMA, STORE_DS, DS_TMA,
        )  # fmt: skip
    dk = dk * sm_scale
    tl.store(
        _row_tile_ptrs(DK, b, hk, keys, offs_d, stride_gkb, stride_gkn, stride_gkh),
        dk.to(DK.dtype.element_ty),
        mask=n_ok[:, None],
    )
    tl.store(
        _row_tile_ptrs(DV, b, hk, keys, offs_d, stride_gvb, stride_gvn, stride_gvh),
        dv.to(DV.dtype.element_ty),
        mask=n_ok[:, None],
    )


@triton.jit(do_not_specialize=["N_Q"])
def _delta_kernel(
    O, DO, DELTA, stride_ob, stride_on, stride_oh, stride_db, stride_dn, stride_dh, N_Q, H,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
):  # fmt: skip
    """delta = rowsum(out * dout) (B, H, N_Q) fp32, for the stored-dS backward (whose dk/dv kernel
    runs first; the recompute backward's dq kernel computes delta itself)."""
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    m_ok = offs_m < N_Q
    rows = offs_m.to(tl.int64)[:, None]
    o = _load_row_tile(O, b, h, rows, offs_d, m_ok, stride_ob, stride_on, stride_oh)
    do = _load_row_tile(DO, b, h, rows, offs_d, m_ok, stride_db, stride_dn, stride_dh)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    tl.store(DELTA + bh.to(tl.int64) * N_Q + offs_m, delta, mask=m_ok)


@triton.jit
def _dq_ds_inner(
    dq,
    K_src,
    DS_rows,
    ds_row0,
    ds_col0,
    b,
    hk,
    COL,
    TSLOT,
    it_lo,
    it_hi,
    offs_m,
    N_K,
    stride_kn,
    HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr,
    LAYOUT_BQ: tl.constexpr,
    LAYOUT_BK: tl.constexpr,
    MASKED: tl.constexpr,
    IS_CAUSAL: tl.constexpr,
    TMA: tl.constexpr,
    DS_TMA: tl.constexpr,
):
    """dq += dS @ K over key tiles it_lo..it_hi, dS read from the scratch (DS_rows: this program's
    query columns of slot 0). MASKED tiles (causal diagonal, partial last key block) hold values
    the dk/dv kernel did not write (key tiles past N_K, query blocks it skipped as wholly above the
    diagonal), so their masked entries are not read."""
    SUB: tl.constexpr = LAYOUT_BK // BLOCK_N
    offs_nb = tl.arange(0, BLOCK_N)
    for it in range(it_lo, it_hi):
        col = tl.load(COL + it // SUB)
        slot = tl.load(TSLOT + it // SUB)
        n0 = col * LAYOUT_BK + (it % SUB) * BLOCK_N
        k = _key_tile(K_src, b, hk, n0, N_K, stride_kn, HEAD_DIM, BLOCK_N, MASKED, TMA, False)
        if MASKED:  # (BLOCK_N keys, BLOCK_M queries), as the scratch holds dS
            keep = ((n0 + offs_nb) < N_K)[:, None]
            if IS_CAUSAL:
                keep = keep & ((n0 + offs_nb)[:, None] <= offs_m[None, :])
        if DS_TMA:
            ds_t = DS_rows.load([ds_row0 + slot * LAYOUT_BK + (it % SUB) * BLOCK_N, ds_col0])
            if MASKED:
                ds_t = tl.where(keep, ds_t, 0.0)
        else:
            ds_ptrs = DS_rows + slot.to(tl.int64) * (LAYOUT_BQ * LAYOUT_BK)
            ds_ptrs += ((it % SUB) * BLOCK_N + offs_nb)[:, None] * LAYOUT_BQ
            if MASKED:
                ds_t = tl.load(ds_ptrs, mask=keep, other=0.0)
            else:
                ds_t = tl.load(ds_ptrs)
        dq = tl.dot(tl.trans(ds_t), k, dq)
    return dq


@triton.jit(do_not_specialize=["N_Q", "N_K", "NUM_QB", "UNIT0", "SLOT_HEADS", "SLOT_STRIDE", "SLOT_BASE", "DQ_H0"])
def _dq_ds_kernel(
    K,
    DS,
    DQ,
    COL,
    TSLOT,
    TABLE,
    stride_kb,
    stride_kn,
    stride_kh,
    stride_gb,
    stride_gn,
    stride_gh,
    N_Q,
    N_K,
    H,
    GROUP,
    NUM_QB,
    UNIT0,
    SLOT_HEADS,
    SLOT_STRIDE,
    SLOT_BASE,
    DQ_H0,
    sm_scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    LAYOUT_BQ: tl.constexpr,
    LAYOUT_BK: tl.constexpr,
    IS_CAUSAL: tl.constexpr,
    TMA: tl.constexpr,
    DS_TMA: tl.constexpr,
    ACCUMULATE: tl.constexpr,
):
    """dq of BLOCK_M queries of one (batch, query head) = UNIT0 + the launch-order entry's unit,
    from the dS the dk/dv kernel stored (slot layout as in _dkv_kernel), over the key blocks of
    the table's row bounds; with ACCUMULATE (a range of key blocks per launch) added to DQ (fp32).
    DQ is addressed at head h - DQ_H0 (a buffer of one unit's heads; 0 for the whole dq)."""
    SUB: tl.constexpr = LAYOUT_BK // BLOCK_N
    local_bh, m_start, start, end = _ordered_row(TABLE, NUM_QB, BLOCK_M, LAYOUT_BQ)
    bh = UNIT0 + local_bh
    b = bh // H
    h = bh % H
    hk = h // GROUP
    if m_start >= N_Q:
        return
    offs_m = m_start + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    slot0 = (local_bh // SLOT_HEADS).to(tl.int64) * SLOT_STRIDE - SLOT_BASE
    if DS_TMA:  # a descriptor over the scratch as (slots * LAYOUT_BK, LAYOUT_BQ)
        DS_rows = DS
        ds_row0 = (slot0 * LAYOUT_BK).to(tl.int32)
    else:
        DS_rows = DS + slot0 * (LAYOUT_BQ * LAYOUT_BK) + (m_start % LAYOUT_BQ + tl.arange(0, BLOCK_M))[None, :]
        ds_row0 = 0
    K_src = _head_source(K, b, hk, stride_kb, stride_kh, TMA)
    n_full, n_use = _row_tiles(COL, start, end, m_start, N_Q, N_K, BLOCK_M, LAYOUT_BK, IS_CAUSAL)
    dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    dq = _dq_ds_inner(
        dq, K_src, DS_rows, ds_row0, m_start % LAYOUT_BQ, b, hk, COL, TSLOT, start * SUB, (start + n_full) * SUB,
        offs_m, N_K, stride_kn, HEAD_DIM, BLOCK_N, LAYOUT_BQ, LAYOUT_BK, False, IS_CAUSAL, TMA, DS_TMA,
    )  # fmt: skip
    dq = _dq_ds_inner(
        dq, K_src, DS_rows, ds_row0, m_start % LAYOUT_BQ, b, hk, COL, TSLOT, (start + n_full) * SUB,
        (start + n_use) * SUB, offs_m, N_K, stride_kn, HEAD_DIM, BLOCK_N, LAYOUT_BQ, LAYOUT_BK, True, IS_CAUSAL,
        TMA, DS_TMA,
    )  # fmt: skip
    rows = m_start.to(tl.int64) + tl.arange(0, BLOCK_M)[:, None]
    dq_ptrs = _row_tile_ptrs(DQ, b, h - DQ_H0, rows, offs_d, stride_gb, stride_gn, stride_gh)
    m_ok = (offs_m < N_Q)[:, None]
    dq = dq * sm_scale
    if ACCUMULATE:
        dq += tl.load(dq_ptrs, mask=m_ok, other=0.0)
    tl.store(dq_ptrs, dq.to(DQ.dtype.element_ty), mask=m_ok)


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


def default_config(block_size: tuple[int, int]) -> KernelConfig:
    """Tiles for a layout block size: the measured H100 choice, each tile clipped to the block.

    Clipping (tile = min(preferred, block)) lets 16x16 / 32x32 layouts (CPU tests) run too.
    """
    bq, bk = block_size
    base = _CONFIG_BK64 if bk == 64 else KernelConfig()
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
    # (key, build) -> value: where derived per-layout data (launch orders) is memoised; the layout's
    # bounded cache when built from a BlockLayout, none for raw tensors.
    cache: Callable[[Any, Callable[[], Any]], Any] | None = field(default=None, compare=False, repr=False)

    @classmethod
    def from_layout(cls, layout: Any) -> CSR:
        """The raw tensors of an :class:`attn_sparse.layout.BlockLayout` (its transposed CSR is cached there)."""
        ccol, row = layout.transposed_csr()
        return cls(
            crow=layout.crow_indices.contiguous(),
            col=layout.col_indices.contiguous(),
            ccol=ccol.contiguous(),
            row=row.contiguous(),
            num_heads=int(layout.num_heads),
            num_query_blocks=int(layout.num_query_blocks),
            num_key_blocks=int(layout.num_key_blocks),
            block_size=(int(layout.block_size[0]), int(layout.block_size[1])),
            cache=layout._cached,
        )

    def _memo(self, key: tuple[Any, ...], build: Callable[[], Any]) -> Any:
        """build(), memoised under ``key`` in the layout's cache (built every call without one)."""
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
        as one entry (dense 128K runs 64 chunks: one entry each would overflow the layout's cache)."""

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
    bucket = torch.where(counts > 0, torch.log2(counts.clamp(min=1).double()).floor().long(), -1)
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


def _last_contig(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def block_sparse_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, csr: CSR, is_causal: bool, scale: float, cfg: KernelConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """out (B, Nq, H, D) in q.dtype and lse (B, H, Nq) fp32 (natural log, -inf for empty rows)."""
    B, Nq, H, D = q.shape
    Nk, Hkv = k.shape[1], k.shape[2]
    q, k, v = _last_contig(q), _last_contig(k), _last_contig(v)
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = torch.empty(B, H, Nq, device=q.device, dtype=torch.float32)
    bq, bk = csr.block_size
    table = csr.row_table(B, H)
    grid = (B * H * csr.num_query_blocks * (bq // cfg.fwd_m),)
    use_tma = cfg.tma and _has_tma(k, v)
    k_src = _tile_descriptor(k, cfg.fwd_n) if use_tma else k
    v_src = _tile_descriptor(v, cfg.fwd_n) if use_tma else v
    _fwd_kernel[grid](
        q, k_src, v_src, out, lse, csr.col, table,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        Nq, Nk, H, H // Hkv, csr.num_query_blocks,
        scale * LOG2E,
        HEAD_DIM=D, BLOCK_M=cfg.fwd_m, BLOCK_N=cfg.fwd_n, LAYOUT_BQ=bq, LAYOUT_BK=bk, IS_CAUSAL=is_causal,
        TMA=use_tma, num_warps=cfg.fwd_warps, num_stages=cfg.fwd_stages,
    )  # fmt: skip
    return out, lse


def _has_tma(*tensors: torch.Tensor) -> bool:
    """TMA tensor descriptors can load these: CUDA tensors on sm90+ (or Triton's interpreter, which
    emulates descriptors) with the 16-byte aligned base and strides TMA requires."""
    if _TensorDescriptor is None:
        return False
    t0 = tensors[0]
    if not interpret_mode() and not (t0.is_cuda and torch.cuda.get_device_capability(t0.device)[0] >= 9):
        return False
    return all(
        t.data_ptr() % 16 == 0 and all(st * t.element_size() % 16 == 0 for st in t.stride()[:-1]) for t in tensors
    )


def _tile_descriptor(t: torch.Tensor, rows: int) -> Any:
    """A 4-D (B, N, heads, D) descriptor loading (1, rows, 1, D) tiles; rows past N read as zeros."""
    return _TensorDescriptor(t, list(t.shape), list(t.stride()), [1, rows, 1, t.shape[3]])


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
        least = min(_chunk_slots(c, per_head_layout, kv_heads, group) for c in chunks)
        chunk_work = least * sub_tiles / (DKV_PROGRAMS_PER_SM * _sm_count(csr.col.device))
        if csr.max_tiles_per_column() * group * (bq // cfg.dkv_m) > chunk_work:
            return []
    return chunks


def _chunk_slots(chunk: DsChunk, per_head_layout: bool, kv_heads: int, group: int) -> int:
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


def block_sparse_backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    csr: CSR,
    is_causal: bool,
    scale: float,
    cfg: KernelConfig,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) shaped and typed like (q, k, v), from the forward's out and lse.

    Stored dS (when :func:`stored_ds_chunks` gives chunks): delta = rowsum(out * dout), then per
    chunk of (batch, kv head) units the column-parallel dk/dv kernel, which also writes dS, and the
    row-parallel dq = dS @ K kernel. Otherwise (recompute): the row-parallel dq kernel, which
    recomputes P and dP and stores delta, then the dk/dv kernel.
    """
    B, Nq, H, D = q.shape
    Nk, Hkv = k.shape[1], k.shape[2]
    group = H // Hkv
    q, k, v, out, dout = (_last_contig(t) for t in (q, k, v, out, dout))
    delta = torch.empty(B, H, Nq, device=q.device, dtype=torch.float32)
    dq = torch.empty_like(q, memory_format=torch.contiguous_format)
    dk = torch.empty_like(k, memory_format=torch.contiguous_format)
    dv = torch.empty_like(v, memory_format=torch.contiguous_format)
    tma_kv = cfg.tma and _has_tma(k, v)
    chunks = stored_ds_chunks(csr, B, Hkv, group, q.element_size(), cfg)

    if not chunks:
        _dq_kernel[(B * H * csr.num_query_blocks * (csr.block_size[0] // cfg.dq_m),)](
            q,
            _tile_descriptor(k, cfg.dq_n) if tma_kv else k,
            _tile_descriptor(v, cfg.dq_n) if tma_kv else v,
            out, dout, dq, lse, delta, csr.col, csr.row_table(B, H),
            q.stride(0), q.stride(1), q.stride(2),
            k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2),
            out.stride(0), out.stride(1), out.stride(2),
            dout.stride(0), dout.stride(1), dout.stride(2),
            dq.stride(0), dq.stride(1), dq.stride(2),
            Nq, Nk, H, group, csr.num_query_blocks, scale * LOG2E, scale,
            HEAD_DIM=D, BLOCK_M=cfg.dq_m, BLOCK_N=cfg.dq_n, LAYOUT_BQ=csr.block_size[0],
            LAYOUT_BK=csr.block_size[1], IS_CAUSAL=is_causal, TMA=tma_kv, num_warps=cfg.dq_warps,
            num_stages=cfg.dq_stages,
        )  # fmt: skip
        everything = DsChunk(0, B * Hkv, 0, csr.num_key_blocks, 0, 0)
        order = csr.column_order(*csr.unit_grid(B * Hkv, Hkv), group)
        _launch_dkv(q, k, v, dout, dk, dv, lse, delta, None, csr, everything, order, is_causal, scale, cfg)
        return dq, dk, dv

    _delta_kernel[(triton.cdiv(Nq, DELTA_ROWS), B * H)](
        out, dout, delta, out.stride(0), out.stride(1), out.stride(2), dout.stride(0), dout.stride(1),
        dout.stride(2), Nq, H, HEAD_DIM=D, BLOCK_M=DELTA_ROWS,
    )  # fmt: skip
    bq, bk = csr.block_size
    per_head_layout = csr.num_heads > 1
    # key-block ranges (one (batch, kv head) unit per chunk, its ranges in order): the unit's dq
    # adds up over them in an fp32 buffer of its query heads only, (Nq, group, D), copied into dq
    # after its last range (a whole fp32 dq would be 8 GiB more at 1M tokens x 16 heads)
    accumulate = chunks[0].c1 - chunks[0].c0 < csr.num_key_blocks
    dq_acc = torch.empty(Nq, group, D, device=q.device, dtype=torch.float32) if accumulate else dq
    tslot = csr.transposed_slots()
    slots = max(_chunk_slots(c, per_head_layout, Hkv, group) for c in chunks)
    ds = _scratch(slots * bq * bk, q)
    ds_tma = cfg.tma and _has_tma(ds)
    ds_src = _scratch_descriptor(ds, bq, cfg.dqs_n, cfg.dqs_m) if ds_tma else ds
    k_src = _tile_descriptor(k, cfg.dqs_n) if tma_kv else k
    for c, (order, table) in zip(chunks, csr.chunk_tables(chunks, B, Hkv, group)):
        _launch_dkv(q, k, v, dout, dk, dv, lse, delta, ds, csr, c, order, is_causal, scale, cfg)
        b, hk = divmod(c.u0, Hkv)
        if accumulate and c.c0 == 0:
            dq_acc.zero_()
        # the buffer holds one unit: batch stride 0, its heads counted from the unit's first
        dq_strides = (0, dq_acc.stride(0), dq_acc.stride(1)) if accumulate else dq.stride()[:3]
        _dq_ds_kernel[((c.u1 - c.u0) * group * csr.num_query_blocks * (bq // cfg.dqs_m),)](
            k_src, ds_src, dq_acc, csr.col, tslot, table,
            k.stride(0), k.stride(1), k.stride(2),
            *dq_strides,
            Nq, Nk, H, group, csr.num_query_blocks, c.u0 * group, H if per_head_layout else 1, c.p1 - c.p0,
            c.p0, hk * group if accumulate else 0, scale,
            HEAD_DIM=D, BLOCK_M=cfg.dqs_m, BLOCK_N=cfg.dqs_n, LAYOUT_BQ=bq, LAYOUT_BK=bk, IS_CAUSAL=is_causal,
            TMA=tma_kv, DS_TMA=ds_tma, ACCUMULATE=accumulate, num_warps=cfg.dqs_warps, num_stages=cfg.dqs_stages,
        )  # fmt: skip
        if accumulate and c.c1 == csr.num_key_blocks:
            dq[b, :, hk * group : (hk + 1) * group].copy_(dq_acc)
    return dq, dk, dv


# Rows per program of the delta kernel.
DELTA_ROWS = 64


def _scratch_descriptor(ds: torch.Tensor, bq: int, rows: int, cols: int) -> Any:
    """A descriptor over the scratch as (slots * Bk, Bq), moving (rows, cols) tiles."""
    ds2 = ds.view(-1, bq)
    return _TensorDescriptor(ds2, list(ds2.shape), list(ds2.stride()), [rows, cols])


def _scratch(numel: int, like: torch.Tensor) -> torch.Tensor:
    """The dS scratch: uninitialised (every value read was written first; tests fill it with NaN)."""
    return torch.empty(numel, device=like.device, dtype=like.dtype)


def _launch_dkv(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    dout: torch.Tensor,
    dk: torch.Tensor,
    dv: torch.Tensor,
    lse: torch.Tensor,
    delta: torch.Tensor,
    ds: torch.Tensor | None,
    csr: CSR,
    chunk: DsChunk,
    order: torch.Tensor,
    is_causal: bool,
    scale: float,
    cfg: KernelConfig,
) -> None:
    """The dk/dv kernel over the chunk's (batch, kv head) units and key blocks, taken in ``order``
    (:meth:`CSR.column_order` of them); writes dS into ``ds`` (at the chunk's slots) unless it is None."""
    _, Nq, H, D = q.shape
    Nk, Hkv = k.shape[1], k.shape[2]
    group = H // Hkv
    bq, bk = csr.block_size
    per_head_layout = csr.num_heads > 1
    units = chunk.u1 - chunk.u0
    tma = cfg.tma and _has_tma(q, dout)
    # Without dS storage the pointer is never read (STORE_DS=False); delta stands in for it.
    ds_src: object = delta
    ds_tma = False
    if ds is not None:
        ds_tma = cfg.tma and _has_tma(ds)
        ds_src = _scratch_descriptor(ds, bq, cfg.dkv_n, cfg.dkv_m) if ds_tma else ds
    _dkv_kernel[(units * (chunk.c1 - chunk.c0) * (bk // cfg.dkv_n),)](
        _tile_descriptor(q, cfg.dkv_m) if tma else q,
        k, v,
        _tile_descriptor(dout, cfg.dkv_m) if tma else dout,
        dk, dv, lse, delta, csr.ccol, csr.row, order, ds_src,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        dout.stride(0), dout.stride(1), dout.stride(2),
        dk.stride(0), dk.stride(1), dk.stride(2),
        dv.stride(0), dv.stride(1), dv.stride(2),
        Nq, Nk, H, Hkv, group, csr.num_key_blocks, csr.num_key_blocks if per_head_layout else 0,
        chunk.u0, H if per_head_layout else 1, chunk.p1 - chunk.p0, chunk.p0, scale * LOG2E, scale,
        HEAD_DIM=D, BLOCK_M=cfg.dkv_m, BLOCK_N=cfg.dkv_n, LAYOUT_BQ=bq, LAYOUT_BK=bk, IS_CAUSAL=is_causal,
        TMA=tma, STORE_DS=ds is not None, DS_TMA=ds_tma, num_warps=cfg.dkv_warps, num_stages=cfg.dkv_stages,
    )  # fmt: skip


# Under torch.compile the kernels run as torch.library custom ops with a registered autograd
# formula, so the compiler traces them (opaque ops with fake implementations) without graph breaks;
# eager calls take a plain autograd.Function around the same two functions (less dispatch overhead).
# CSR geometry and tile configs travel as int lists (custom op schemas take no dataclasses).
_CFG_FIELDS = tuple(f.name for f in fields(KernelConfig))


def _config_from_ints(values: list[int]) -> KernelConfig:
    kwargs: dict[str, Any] = {
        f.name: bool(v) if f.type in (bool, "bool") else v for f, v in zip(fields(KernelConfig), values)
    }
    return KernelConfig(**kwargs)


def _csr_from_args(
    crow: torch.Tensor, col: torch.Tensor, ccol: torch.Tensor, row: torch.Tensor, tslot: torch.Tensor, dims: list[int]
) -> CSR:
    heads, nqb, nkb, bq, bk = dims
    # an empty tslot (the forward ran without grad) is derived again if a backward needs it
    return CSR(
        crow, col, ccol, row, heads, nqb, nkb, (bq, bk), tslot=tslot if tslot.numel() == col.numel() else None,
        cache=_RAW_CSR_MEMO.memo_for((crow, col, ccol, row), tuple(dims)),
    )  # fmt: skip


class _RawCSRMemo:
    """Derived launch data (launch tables, chunk plans) of the CSR tensors the custom ops receive.

    Under torch.compile the ops get raw tensors, not the layout (whose cache holds this data in
    eager calls), and would rebuild every table (and read chunk plans back from the GPU) on every
    call. Entries are keyed by the tensors' storage and view geometry, not by tensor objects: the
    compiled backward receives the saved CSR tensors as new tensor objects on every call, over
    the same storage. An entry is valid only while those storages are alive (weak references, so
    memory a freed layout leaves to another never hits a stale entry) and unmodified (version
    counters, which views share). At most RAW_CSR_ENTRIES layouts, each a :class:`BoundedMemo`
    of RAW_CSR_DERIVED entries, least recently used dropped first.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: OrderedDict[tuple[Any, ...], tuple[tuple[Any, ...], tuple[int, ...], BoundedMemo]]
        self._entries = OrderedDict()

    def memo_for(
        self, tensors: tuple[torch.Tensor, ...], dims: tuple[int, ...]
    ) -> Callable[[Any, Callable[[], Any]], Any] | None:
        """A (key, build) -> value memo for these CSR tensors, or None when they cannot be tracked."""
        try:
            versions = tuple(t._version for t in tensors)
        except RuntimeError:  # inference tensors keep no version counter: no memo
            return None
        refs = tuple(StorageWeakRef(t.untyped_storage()) for t in tensors)
        views = tuple((r.cdata, t.storage_offset(), tuple(t.shape), t.stride(), t.dtype) for r, t in zip(refs, tensors))
        key = (*views, dims)
        with self._lock:
            entry = self._entries.get(key)
            # a live weak reference pins its storage's address, so a matching key is that storage
            if entry is None or entry[1] != versions or any(r.expired() for r in entry[0]):
                entry = (refs, versions, BoundedMemo(RAW_CSR_DERIVED))
                self._entries[key] = entry
            self._entries.move_to_end(key)
            while len(self._entries) > RAW_CSR_ENTRIES:
                self._entries.popitem(last=False)
        return entry[2].get


RAW_CSR_ENTRIES = 8
RAW_CSR_DERIVED = 16
_RAW_CSR_MEMO = _RawCSRMemo()

# The ops keep what they derive from the CSR tensors (the memo above): tensors that a CUDA graph
# pool must not hold past a call, and plans read back from the GPU, which a capture cannot do. So
# they are tagged cudagraph_unsafe: torch.compile(mode="reduce-overhead") runs them between CUDA
# graphs (Inductor partitions the graph around them) instead of failing its pool check.
_OP_TAGS = (torch.Tag.cudagraph_unsafe,) if hasattr(torch.Tag, "cudagraph_unsafe") else ()


@torch.library.custom_op("attn_sparse::block_sparse_fwd", mutates_args=(), tags=_OP_TAGS)
def _fwd_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    crow: torch.Tensor,
    col: torch.Tensor,
    ccol: torch.Tensor,
    row: torch.Tensor,
    tslot: torch.Tensor,
    dims: list[int],
    is_causal: bool,
    scale: float,
    cfg: list[int],
) -> tuple[torch.Tensor, torch.Tensor]:
    with device_guard(q.device):
        return block_sparse_forward(
            q, k, v, _csr_from_args(crow, col, ccol, row, tslot, dims), is_causal, scale, _config_from_ints(cfg)
        )


@_fwd_op.register_fake
def _fwd_fake(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    crow: torch.Tensor,
    col: torch.Tensor,
    ccol: torch.Tensor,
    row: torch.Tensor,
    tslot: torch.Tensor,
    dims: list[int],
    is_causal: bool,
    scale: float,
    cfg: list[int],
) -> tuple[torch.Tensor, torch.Tensor]:
    B, Nq, H, _ = q.shape
    return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty((B, H, Nq), dtype=torch.float32)


@torch.library.custom_op("attn_sparse::block_sparse_bwd", mutates_args=(), tags=_OP_TAGS)
def _bwd_op(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    crow: torch.Tensor,
    col: torch.Tensor,
    ccol: torch.Tensor,
    row: torch.Tensor,
    tslot: torch.Tensor,
    dims: list[int],
    is_causal: bool,
    scale: float,
    cfg: list[int],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    with device_guard(q.device):
        return block_sparse_backward(
            dout,
            q,
            k,
            v,
            out,
            lse,
            _csr_from_args(crow, col, ccol, row, tslot, dims),
            is_causal,
            scale,
            _config_from_ints(cfg),
        )


@_bwd_op.register_fake
def _bwd_fake(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    crow: torch.Tensor,
    col: torch.Tensor,
    ccol: torch.Tensor,
    row: torch.Tensor,
    tslot: torch.Tensor,
    dims: list[int],
    is_causal: bool,
    scale: float,
    cfg: list[int],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v))  # type: ignore[return-value]


def _fwd_setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[torch.Tensor, torch.Tensor]) -> None:
    q, k, v, crow, col, ccol, row, tslot, dims, is_causal, scale, cfg = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, crow, col, ccol, row, tslot)
    ctx.args = (dims, is_causal, scale, cfg)


def _fwd_backward(ctx: Any, dout: torch.Tensor, _dlse: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
    # lse is an auxiliary output (not exposed): its incoming gradient is ignored
    q, k, v, out, lse, crow, col, ccol, row, tslot = ctx.saved_tensors
    dq, dk, dv = _bwd_op(dout, q, k, v, out, lse, crow, col, ccol, row, tslot, *ctx.args)
    return (dq, dk, dv) + (None,) * 9


torch.library.register_autograd("attn_sparse::block_sparse_fwd", _fwd_backward, setup_context=_fwd_setup_context)


def block_sparse_attention_csr(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    csr: CSR,
    *,
    is_causal: bool = False,
    softmax_scale: float | None = None,
    config: KernelConfig | None = None,
) -> torch.Tensor:
    """Differentiable block-sparse attention over raw CSR tensors; out (B, Nq, H, D) in q.dtype.

    Inputs are not validated here (:func:`attn_sparse.block_sparse_attention` validates); ``config`` defaults to
    :func:`default_config` for the layout's block size.
    """
    D = q.shape[-1]
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(D)
    cfg = config if config is not None else default_config(csr.block_size)
    bad = cfg.check(csr.block_size)
    if bad:
        raise ValueError("kernel config does not fit the layout: " + "; ".join(bad))
    if not torch.compiler.is_compiling():
        # eager: the plain autograd.Function skips the custom-op dispatcher (~0.1-0.3 ms per call)
        with device_guard(q.device):
            out: torch.Tensor = _EagerFn.apply(q, k, v, csr, bool(is_causal), float(scale), cfg)
        return out
    dims = [csr.num_heads, csr.num_query_blocks, csr.num_key_blocks, csr.block_size[0], csr.block_size[1]]
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    tslot = csr.transposed_slots() if needs_grad else csr.col.new_empty(0)
    out, _ = _fwd_op(
        q, k, v, csr.crow, csr.col, csr.ccol, csr.row, tslot, dims, bool(is_causal), float(scale),
        [int(getattr(cfg, f)) for f in _CFG_FIELDS],
    )  # fmt: skip
    return out


class _EagerFn(torch.autograd.Function):
    """Eager-mode wrapper of the same forward/backward the custom ops run."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, csr: CSR, is_causal: bool, scale: float,
        cfg: KernelConfig,
    ) -> torch.Tensor:  # fmt: skip
        out, lse = block_sparse_forward(q, k, v, csr, is_causal, scale, cfg)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.args = (csr, is_causal, scale, cfg)
        return out

    @staticmethod
    def backward(ctx: Any, dout: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        q, k, v, out, lse = ctx.saved_tensors
        with device_guard(q.device):
            dq, dk, dv = block_sparse_backward(dout, q, k, v, out, lse, *ctx.args)
        return dq, dk, dv, None, None, None, None
