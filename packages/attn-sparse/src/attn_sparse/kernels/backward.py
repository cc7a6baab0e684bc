"""The backward Triton kernels: dq (recompute), dk/dv (optionally storing dS), delta, dq from stored dS.

Recompute form: :func:`dq_kernel` (row-parallel; recomputes P and dP and writes delta) then
:func:`dkv_kernel` (column-parallel: BLOCK_N keys of one kv head over the active query blocks of
that key block for every query head of its GQA group, so dk/dv are written once, no atomics):
7 matmuls per tile. Stored-dS form: :func:`delta_kernel`, then per chunk :func:`dkv_kernel` with
STORE_DS (it writes dS, q.dtype, into a scratch slot per tile) and :func:`dq_ds_kernel`
(dq = dS @ K): 5 matmuls per tile. Both forms cast dS to q.dtype before its matmuls, so they
give the same dq, dk and dv. The launchers are in :mod:`.launch`.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .tiles import (
    band_bounds,
    band_tiles,
    head_source,
    head_sources,
    key_tile,
    load_row_tile,
    ordered_row,
    ordered_tile,
    row_band,
    row_tile_ptrs,
)

__all__ = ["delta_kernel", "dkv_kernel", "dq_ds_kernel", "dq_kernel"]


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
    lo,
    hi,
    N_K,
    stride_kn,
    stride_vn,
    qk_scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr,
    LAYOUT_BK: tl.constexpr,
    MASKED: tl.constexpr,
    TMA: tl.constexpr,
):
    """dq over key tiles it_lo..it_hi; MASKED: row i keeps keys lo[i] <= j <= hi[i]."""
    SUB: tl.constexpr = LAYOUT_BK // BLOCK_N
    offs_n = tl.arange(0, BLOCK_N)
    for it in range(it_lo, it_hi):
        col = tl.load(COL + it // SUB)
        n0 = col * LAYOUT_BK + (it % SUB) * BLOCK_N
        k_t = key_tile(K_src, b, hk, n0, N_K, stride_kn, HEAD_DIM, BLOCK_N, MASKED, TMA, True)
        v_t = key_tile(V_src, b, hk, n0, N_K, stride_vn, HEAD_DIM, BLOCK_N, MASKED, TMA, True)
        p = tl.math.exp2(tl.dot(q, k_t) * qk_scale - lse2[:, None])
        if MASKED:
            cols = (n0 + offs_n)[None, :]
            p = tl.where((cols >= lo[:, None]) & (cols <= hi[:, None]), p, 0.0)
        dp = tl.dot(do, v_t)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k_t.dtype), tl.trans(k_t))
    return dq


@triton.jit(do_not_specialize=["N_Q", "N_K", "NUM_QB", "win_left", "win_right"])
def dq_kernel(
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
    DOCS,
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
    win_left,
    win_right,
    qk_scale,
    sm_scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    LAYOUT_BQ: tl.constexpr,
    LAYOUT_BK: tl.constexpr,
    BANDED: tl.constexpr,
    HAS_DOCS: tl.constexpr,
    TMA: tl.constexpr,
):
    """dq of BLOCK_M query rows, recomputing P and dP (and writing delta); masks as in fwd_kernel."""
    SUB: tl.constexpr = LAYOUT_BK // BLOCK_N
    bh, m_start, start, end = ordered_row(TABLE, NUM_QB, BLOCK_M, LAYOUT_BQ)
    b = bh // H
    h = bh % H
    hk = h // GROUP
    if m_start >= N_Q:
        return
    offs_m = m_start + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    m_ok = offs_m < N_Q
    rows = m_start.to(tl.int64) + tl.arange(0, BLOCK_M)[:, None]

    q = load_row_tile(Q, b, h, rows, offs_d, m_ok, stride_qb, stride_qn, stride_qh)
    do = load_row_tile(DO, b, h, rows, offs_d, m_ok, stride_db, stride_dn, stride_dh)
    lse = tl.load(LSE + bh.to(tl.int64) * N_Q + offs_m, mask=m_ok, other=float("inf"))
    # rows that saw no key (lse = -inf) get p = exp2(s - inf) = 0: zero gradient, never NaN
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
    # delta = rowsum(out * dout), computed here (each row belongs to exactly one dq program) and
    # stored for the dk/dv kernel, which runs after this one: no separate pass over out and dout
    o = load_row_tile(O, b, h, rows, offs_d, m_ok, stride_ob, stride_on, stride_oh)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    tl.store(DELTA + bh.to(tl.int64) * N_Q + offs_m, delta, mask=m_ok)
    K_src, V_src = head_sources(K, V, b, hk, stride_kb, stride_kh, stride_vb, stride_vh, TMA)

    lo, hi, p_a, p_b, p_c, p_d = row_band(
        COL, start, end, offs_m, m_ok, N_Q, N_K, win_left, win_right, DOCS, BANDED, HAS_DOCS, BLOCK_M, LAYOUT_BK
    )

    dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    if BANDED:
        dq = _dq_inner(
            dq, q, do, lse2, delta, K_src, V_src, b, hk, COL, p_a * SUB, p_b * SUB, lo, hi, N_K,
            stride_kn, stride_vn, qk_scale, HEAD_DIM, BLOCK_N, LAYOUT_BK, True, TMA,
        )  # fmt: skip
    dq = _dq_inner(
        dq, q, do, lse2, delta, K_src, V_src, b, hk, COL, p_b * SUB, p_c * SUB, lo, hi, N_K,
        stride_kn, stride_vn, qk_scale, HEAD_DIM, BLOCK_N, LAYOUT_BK, False, TMA,
    )  # fmt: skip
    dq = _dq_inner(
        dq, q, do, lse2, delta, K_src, V_src, b, hk, COL, p_c * SUB, p_d * SUB, lo, hi, N_K,
        stride_kn, stride_vn, qk_scale, HEAD_DIM, BLOCK_N, LAYOUT_BK, True, TMA,
    )  # fmt: skip
    dq = dq * sm_scale
    tl.store(
        row_tile_ptrs(DQ, b, h, rows, offs_d, stride_gb, stride_gn, stride_gh),
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
    lo,
    hi,
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
    a descriptor over the scratch as (slots * LAYOUT_BK, LAYOUT_BQ) with those rows from ds_row0.
    MASKED: key j keeps queries lo[j] <= i <= hi[j]."""
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
            p_t = tl.where((offs_m[None, :] >= lo[:, None]) & (offs_m[None, :] <= hi[:, None]), p_t, 0.0)
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
    do_not_specialize=[
        "N_Q", "N_K", "NUM_KB", "LAYOUT_HEAD_COLS", "UNIT0", "SLOT_HEADS", "SLOT_STRIDE", "SLOT_BASE", "win_left",
        "win_right",
    ]
)  # fmt: skip
def dkv_kernel(
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
    DOCS,
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
    win_left,
    win_right,
    qk_scale,
    sm_scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    LAYOUT_BQ: tl.constexpr,
    LAYOUT_BK: tl.constexpr,
    BANDED: tl.constexpr,
    HAS_DOCS: tl.constexpr,
    TMA: tl.constexpr,
    STORE_DS: tl.constexpr,
    DS_TMA: tl.constexpr,
):
    """dk, dv of BLOCK_N keys of one (batch, kv head): UNIT0 + the launch-order entry's unit.

    With STORE_DS, dS of each tile goes to the scratch DS at slot (q_unit // SLOT_HEADS) *
    SLOT_STRIDE + (the tile's transposed-CSR position) - SLOT_BASE, q_unit = the (batch, query
    head) index counted from this launch's first (SLOT_BASE: the position of the launch's first
    key block, when it covers a range of them); a slot holds (LAYOUT_BK, LAYOUT_BQ) values,
    key-major. BANDED: the token masks as in fwd_kernel, seen from the keys (:func:`.tiles.band_bounds`).
    """
    SUB: tl.constexpr = LAYOUT_BQ // BLOCK_M
    local_bhk, n_start, _ = ordered_tile(ORDER, NUM_KB, BLOCK_N, LAYOUT_BK, 1)
    bhk = UNIT0 + local_bhk
    b = bhk // HKV
    hk = bhk % HKV
    if n_start >= N_K:
        return
    offs_n = n_start + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    n_ok = offs_n < N_K
    keys = n_start.to(tl.int64) + tl.arange(0, BLOCK_N)[:, None]
    k = load_row_tile(K, b, hk, keys, offs_d, n_ok, stride_kb, stride_kn, stride_kh)
    v = load_row_tile(V, b, hk, keys, offs_d, n_ok, stride_vb, stride_vn, stride_vh)
    # Without token masks no tile needs a mask (rows past N_Q load lse = +inf: p = 0). With them,
    # each key's queries form an interval: query blocks outside every key's are skipped, those
    # at the band's edges are masked per element.
    if BANDED:
        lo, hi = band_bounds(offs_n, N_K, N_Q, win_right, win_left, DOCS, HAS_DOCS)
    else:
        lo = tl.zeros([BLOCK_N], tl.int32)
        hi = tl.full([BLOCK_N], N_Q - 1, tl.int32)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    for g in range(0, GROUP):
        h = hk * GROUP + g
        lcol = h * LAYOUT_HEAD_COLS + n_start // LAYOUT_BK
        start = tl.load(CCOL + lcol)
        end = tl.load(CCOL + lcol + 1)
        if BANDED:
            p_a, p_b, p_c, p_d = band_tiles(ROW, start, end, lo, hi, n_ok, LAYOUT_BQ)
        else:  # no scan (a chain of dependent loads): every tile is unmasked
            p_a, p_b, p_c, p_d = start, start, end, end
        Q_src, DO_src = head_sources(Q, DO, b, h, stride_qb, stride_qh, stride_db, stride_dh, TMA)
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
        if BANDED:
            dk, dv = _dkv_inner(
                dk, dv, k, v, Q_src, DO_src, b, h, LSE_head, DELTA_head, ROW, p_a * SUB, p_b * SUB, lo, hi, N_Q,
                stride_qn, stride_dn, qk_scale, DS_tile, ds_row0, HEAD_DIM, BLOCK_M, LAYOUT_BQ, LAYOUT_BK, True, TMA,
                STORE_DS, DS_TMA,
            )  # fmt: skip
        dk, dv = _dkv_inner(
            dk, dv, k, v, Q_src, DO_src, b, h, LSE_head, DELTA_head, ROW, p_b * SUB, p_c * SUB, lo, hi, N_Q,
            stride_qn, stride_dn, qk_scale, DS_tile, ds_row0, HEAD_DIM, BLOCK_M, LAYOUT_BQ, LAYOUT_BK, False, TMA,
            STORE_DS, DS_TMA,
        )  # fmt: skip
        if BANDED:
            dk, dv = _dkv_inner(
                dk, dv, k, v, Q_src, DO_src, b, h, LSE_head, DELTA_head, ROW, p_c * SUB, p_d * SUB, lo, hi, N_Q,
                stride_qn, stride_dn, qk_scale, DS_tile, ds_row0, HEAD_DIM, BLOCK_M, LAYOUT_BQ, LAYOUT_BK, True, TMA,
                STORE_DS, DS_TMA,
            )  # fmt: skip
    dk = dk * sm_scale
    tl.store(
        row_tile_ptrs(DK, b, hk, keys, offs_d, stride_gkb, stride_gkn, stride_gkh),
        dk.to(DK.dtype.element_ty),
        mask=n_ok[:, None],
    )
    tl.store(
        row_tile_ptrs(DV, b, hk, keys, offs_d, stride_gvb, stride_gvn, stride_gvh),
        dv.to(DV.dtype.element_ty),
        mask=n_ok[:, None],
    )


@triton.jit(do_not_specialize=["N_Q"])
def delta_kernel(
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
    o = load_row_tile(O, b, h, rows, offs_d, m_ok, stride_ob, stride_on, stride_oh)
    do = load_row_tile(DO, b, h, rows, offs_d, m_ok, stride_db, stride_dn, stride_dh)
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
    lo,
    hi,
    N_K,
    stride_kn,
    HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr,
    LAYOUT_BQ: tl.constexpr,
    LAYOUT_BK: tl.constexpr,
    MASKED: tl.constexpr,
    TMA: tl.constexpr,
    DS_TMA: tl.constexpr,
):
    """dq += dS @ K over key tiles it_lo..it_hi, dS read from the scratch (DS_rows: this program's
    query columns of slot 0). MASKED tiles (the band's edges, the partial last key block) hold
    values the dk/dv kernel did not write (key tiles past N_K, query blocks it skipped as wholly
    outside the band), so only the entries row i keeps (lo[i] <= j <= hi[i]) are read."""
    SUB: tl.constexpr = LAYOUT_BK // BLOCK_N
    offs_nb = tl.arange(0, BLOCK_N)
    for it in range(it_lo, it_hi):
        col = tl.load(COL + it // SUB)
        slot = tl.load(TSLOT + it // SUB)
        n0 = col * LAYOUT_BK + (it % SUB) * BLOCK_N
        k = key_tile(K_src, b, hk, n0, N_K, stride_kn, HEAD_DIM, BLOCK_N, MASKED, TMA, False)
        if MASKED:  # (BLOCK_N keys, BLOCK_M queries), as the scratch holds dS
            keys = (n0 + offs_nb)[:, None]
            keep = (keys >= lo[None, :]) & (keys <= hi[None, :])
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


@triton.jit(
    do_not_specialize=[
        "N_Q", "N_K", "NUM_QB", "UNIT0", "SLOT_HEADS", "SLOT_STRIDE", "SLOT_BASE", "DQ_H0", "win_left", "win_right",
    ]
)  # fmt: skip
def dq_ds_kernel(
    K,
    DS,
    DQ,
    COL,
    TSLOT,
    TABLE,
    DOCS,
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
    win_left,
    win_right,
    sm_scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    LAYOUT_BQ: tl.constexpr,
    LAYOUT_BK: tl.constexpr,
    BANDED: tl.constexpr,
    HAS_DOCS: tl.constexpr,
    TMA: tl.constexpr,
    DS_TMA: tl.constexpr,
    ACCUMULATE: tl.constexpr,
):
    """dq of BLOCK_M queries of one (batch, query head) = UNIT0 + the launch-order entry's unit,
    from the dS the dk/dv kernel stored (slot layout as in dkv_kernel), over the key blocks of
    the table's row bounds; with ACCUMULATE (a range of key blocks per launch) added to DQ (fp32).
    DQ is addressed at head h - DQ_H0 (a buffer of one unit's heads; 0 for the whole dq)."""
    SUB: tl.constexpr = LAYOUT_BK // BLOCK_N
    local_bh, m_start, start, end = ordered_row(TABLE, NUM_QB, BLOCK_M, LAYOUT_BQ)
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
    K_src = head_source(K, b, hk, stride_kb, stride_kh, TMA)
    m_ok = offs_m < N_Q
    lo, hi, p_a, p_b, p_c, p_d = row_band(
        COL, start, end, offs_m, m_ok, N_Q, N_K, win_left, win_right, DOCS, BANDED, HAS_DOCS, BLOCK_M, LAYOUT_BK
    )
    dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    if BANDED:
        dq = _dq_ds_inner(
            dq, K_src, DS_rows, ds_row0, m_start % LAYOUT_BQ, b, hk, COL, TSLOT, p_a * SUB, p_b * SUB, lo, hi, N_K,
            stride_kn, HEAD_DIM, BLOCK_N, LAYOUT_BQ, LAYOUT_BK, True, TMA, DS_TMA,
        )  # fmt: skip
    dq = _dq_ds_inner(
        dq, K_src, DS_rows, ds_row0, m_start % LAYOUT_BQ, b, hk, COL, TSLOT, p_b * SUB, p_c * SUB, lo, hi, N_K,
        stride_kn, HEAD_DIM, BLOCK_N, LAYOUT_BQ, LAYOUT_BK, False, TMA, DS_TMA,
    )  # fmt: skip
    dq = _dq_ds_inner(
        dq, K_src, DS_rows, ds_row0, m_start % LAYOUT_BQ, b, hk, COL, TSLOT, p_c * SUB, p_d * SUB, lo, hi, N_K,
        stride_kn, HEAD_DIM, BLOCK_N, LAYOUT_BQ, LAYOUT_BK, True, TMA, DS_TMA,
    )  # fmt: skip
    rows = m_start.to(tl.int64) + tl.arange(0, BLOCK_M)[:, None]
    dq_ptrs = row_tile_ptrs(DQ, b, h - DQ_H0, rows, offs_d, stride_gb, stride_gn, stride_gh)
    dq = dq * sm_scale
    if ACCUMULATE:
        dq += tl.load(dq_ptrs, mask=m_ok[:, None], other=0.0)
    tl.store(dq_ptrs, dq.to(DQ.dtype.element_ty), mask=m_ok[:, None])
