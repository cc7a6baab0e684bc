"""Triton kernels of attention over strided-row sequences, in place (imports triton: see
:mod:`attn_core.strided_varlen`, the only importer, for the launchers and the contract).

A sequence s is the rows START[s] + t * STRIDE (t < LEN[s]) of packed (N, H, D) tensors, with
query heads QH0[s] + i * q_hs (i < q_hn) and kv heads KH0[s] + (i // GQA) * kv_hs. A tile table
(TILE_SEQ, TILE_M0) lists BLOCK rows of one sequence per program. Every (row, head) a launch
touches belongs to one sequence and one program, so the results are read-modified-written in
place without atomics. Softmax in base 2, fp32 accumulation; LSE in natural log, -inf for a row
that sees no key (its output is 0).

TMA: with descriptors (``TMA`` true) the forward's K/V tiles that lie wholly inside a sequence load
through tensor descriptors over the packed tensor viewed as (ceil(N / STRIDE), STRIDE, H, D), where
row t of a sequence starting at a * STRIDE + b is (a + t, b); tiles at a sequence's end keep the
masked pointer loads, so a descriptor never reads past a sequence (nor past N). The descriptors'
block shapes are (BLOCK_N, 1, 1, BLOCK_D). The backward kernels take pointer loads: descriptors
there (dkdv's Q/dO tiles, dq's K/V tiles) timed no faster on an H100.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .online_softmax import online_softmax_step

__all__ = ["delta_kernel", "dkdv_kernel", "dq_kernel", "fwd_kernel"]


@triton.jit
def _sequence(TILE_SEQ, TILE_M0, START, LEN, tile):
    s = tl.load(TILE_SEQ + tile)
    return s, tl.load(TILE_M0 + tile), tl.load(START + s).to(tl.int64), tl.load(LEN + s)


@triton.jit
def _query_tile(TILE_SEQ, TILE_M0, START, LEN, QH0, KH0, q_hs, kv_hs, GQA, STRIDE, BLOCK_M: tl.constexpr):
    """This program's sequence (start, length), first row m0, query head qh (program axis 1), the kv
    head it reads, and its BLOCK_M rows (sequence-local index, in range, packed position)."""
    s, m0, start, n = _sequence(TILE_SEQ, TILE_M0, START, LEN, tl.program_id(0))
    i = tl.program_id(1)
    qh = (tl.load(QH0 + s) + i * q_hs).to(tl.int64)
    kh = (tl.load(KH0 + s) + (i // GQA) * kv_hs).to(tl.int64)
    rows = m0 + tl.arange(0, BLOCK_M)
    return start, n, m0, qh, kh, rows, rows < n, start + rows.to(tl.int64) * STRIDE


@triton.jit
def _load_rows(X, pos, h, s_n, s_h, d, mask):
    """X at packed positions ``pos`` (R,), head h, columns d: (R, BLOCK_D), 0 where masked."""
    return tl.load(X + (pos * s_n + h * s_h)[:, None] + d[None, :], mask=mask, other=0.0)


@triton.jit
def _key_end(n, m0, BLOCK_M: tl.constexpr, IS_CAUSAL: tl.constexpr):
    """One past the last key a query tile starting at m0 reads."""
    end = n
    if IS_CAUSAL:  # keys up to the tile's last row
        end = tl.minimum(n, m0 + BLOCK_M)
    return end


@triton.jit
def _unmasked_key_end(n, m0, BLOCK_N: tl.constexpr, IS_CAUSAL: tl.constexpr):
    """Key tiles below this (a multiple of BLOCK_N) lie inside the sequence and, causal, at or before
    the query tile's first row m0: every pair of theirs attends, so they skip the bounds and causal
    masks (the tiles from here to :func:`_key_end` take them)."""
    end = n
    if IS_CAUSAL:
        end = tl.minimum(n, m0 + 1)
    return (end // BLOCK_N) * BLOCK_N


@triton.jit
def _key_tile(
    K, V, KD, VD, start, n, j0, kh, STRIDE, s_kn, s_kh, s_vn, s_vh, d, d_ok,
    BLOCK_N: tl.constexpr, BOUNDS: tl.constexpr, TMA: tl.constexpr,
):  # fmt: skip
    """Keys j0 .. j0 + BLOCK_N of the sequence: local index, packed position, K and V (0 past n;
    BOUNDS False: the caller knows the tile is inside the sequence, and with TMA it loads through
    the descriptors KD, VD)."""
    cols = j0 + tl.arange(0, BLOCK_N)
    kpos = start + cols.to(tl.int64) * STRIDE
    if TMA and not BOUNDS:
        k = _tile_of(KD, start, j0, kh, STRIDE, BLOCK_N)
        v = _tile_of(VD, start, j0, kh, STRIDE, BLOCK_N)
    else:
        mask = ((cols < n) if BOUNDS else (cols >= 0))[:, None] & d_ok[None, :]
        k = _load_rows(K, kpos, kh, s_kn, s_kh, d, mask)
        v = _load_rows(V, kpos, kh, s_vn, s_vh, d, mask)
    return cols, kpos, k, v


@triton.jit
def _tile_of(XD, start, t0, h, STRIDE, ROWS: tl.constexpr):
    """Rows t0 .. t0 + ROWS of the sequence starting at ``start``, head h, through descriptor XD
    (block (ROWS, 1, 1, BLOCK_D)): (ROWS, BLOCK_D). The caller knows they lie inside the sequence."""
    a = (start // STRIDE).to(tl.int32) + t0
    b = (start % STRIDE).to(tl.int32)
    x = XD.load([a, b, h.to(tl.int32), 0])
    return tl.reshape(x, [ROWS, x.shape[3]])


@triton.jit
def _row_stats(LSE, DELTA, qpos, qh, row_ok, s_ln, s_lh, H):
    """The final LSE in base 2 (+inf for rows that see no key, so P = 0 there) and rowsum(dout * out)."""
    lse = tl.load(LSE + qpos * s_ln + qh * s_lh, mask=row_ok, other=float("inf"))
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
    return lse2, tl.load(DELTA + qpos * H + qh, mask=row_ok, other=0.0)


@triton.jit
def _unpadded(KPAD, kpos, cols, n):
    """Whether each key column is a real key (not padding; False past the sequence)."""
    return tl.load(KPAD + kpos, mask=cols < n, other=1) == 0


@triton.jit
def _keep(rows, cols, n, KPAD, kpos, BOUNDS: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_PAD: tl.constexpr):
    """(rows, cols) pairs that attend: key inside the sequence (checked when BOUNDS), causal within
    it (IS_CAUSAL), key not padding (HAS_PAD)."""
    keep = ((cols < n) if BOUNDS else (cols >= 0))[None, :] & (rows >= 0)[:, None]
    if IS_CAUSAL:
        keep = keep & (cols[None, :] <= rows[:, None])
    if HAS_PAD:
        keep = keep & _unpadded(KPAD, kpos, cols, n)[None, :]
    return keep


@triton.jit
def _fwd_step(
    q, acc, m_i, l_i, j0, K, V, KD, VD, KPAD, start, n, rows, kh, STRIDE, s_kn, s_kh, s_vn, s_vh, d, d_ok, qk_scale,
    BLOCK_N: tl.constexpr, BOUNDS: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_PAD: tl.constexpr, TMA: tl.constexpr,
):  # fmt: skip
    """The online softmax over key tile j0: (acc, m_i, l_i) updated (masks as in :func:`_keep`)."""
    cols, kpos, k, v = _key_tile(
        K, V, KD, VD, start, n, j0, kh, STRIDE, s_kn, s_kh, s_vn, s_vh, d, d_ok, BLOCK_N, BOUNDS, TMA
    )
    qk = tl.dot(q, tl.trans(k))
    if BOUNDS or IS_CAUSAL or HAS_PAD:
        keep = _keep(rows, cols, n, KPAD, kpos, BOUNDS, IS_CAUSAL, HAS_PAD)
        acc, l_i, m_i = online_softmax_step(qk, keep, m_i, l_i, acc, v, qk_scale, True)
    else:
        acc, l_i, m_i = online_softmax_step(qk, None, m_i, l_i, acc, v, qk_scale, False)
    return acc, m_i, l_i


@triton.jit(do_not_specialize=["STRIDE", "q_hs", "kv_hs", "GQA"])
def fwd_kernel(
    Q, K, V, KD, VD, O, LSE, KPAD,
    TILE_SEQ, TILE_M0, START, LEN, QH0, KH0,
    s_qn, s_qh, s_kn, s_kh, s_vn, s_vh, s_on, s_oh, s_ln, s_lh,
    STRIDE, q_hs, kv_hs, GQA, qk_scale,
    D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IS_CAUSAL: tl.constexpr, HAS_PAD: tl.constexpr, FIRST: tl.constexpr, TMA: tl.constexpr,
):  # fmt: skip
    """Out and LSE of BLOCK_M query rows of one sequence and head, stored (FIRST) or LSE-merged into O,
    LSE. KD, VD: K, V's descriptors (block (BLOCK_N, 1, 1, BLOCK_D)) when TMA, else unused."""
    start, n, m0, qh, kh, rows, row_ok, qpos = _query_tile(
        TILE_SEQ, TILE_M0, START, LEN, QH0, KH0, q_hs, kv_hs, GQA, STRIDE, BLOCK_M
    )
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    q = _load_rows(Q, qpos, qh, s_qn, s_qh, d, row_ok[:, None] & d_ok[None, :])
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    unmasked_end = _unmasked_key_end(n, m0, BLOCK_N, IS_CAUSAL)
    for j0 in range(0, unmasked_end, BLOCK_N):
        acc, m_i, l_i = _fwd_step(
            q, acc, m_i, l_i, j0, K, V, KD, VD, KPAD, start, n, rows, kh, STRIDE, s_kn, s_kh, s_vn, s_vh, d, d_ok,
            qk_scale, BLOCK_N, False, False, HAS_PAD, TMA,
        )  # fmt: skip
    for j0 in range(unmasked_end, _key_end(n, m0, BLOCK_M, IS_CAUSAL), BLOCK_N):
        acc, m_i, l_i = _fwd_step(
            q, acc, m_i, l_i, j0, K, V, KD, VD, KPAD, start, n, rows, kh, STRIDE, s_kn, s_kh, s_vn, s_vh, d, d_ok,
            qk_scale, BLOCK_N, True, IS_CAUSAL, HAS_PAD, TMA,
        )  # fmt: skip
    empty = l_i == 0.0
    out = acc * (1.0 / tl.where(empty, 1.0, l_i))[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(tl.where(empty, 1.0, l_i))) / 1.4426950408889634)
    o_ptr = O + (qpos * s_on + qh * s_oh)[:, None] + d[None, :]
    l_ptr = LSE + qpos * s_ln + qh * s_lh
    o_mask = row_ok[:, None] & d_ok[None, :]
    if not FIRST:  # merge with what earlier groups left at these rows (weights exp(lse - total))
        l_acc = tl.load(l_ptr, mask=row_ok, other=float("-inf"))
        o_acc = tl.load(o_ptr, mask=o_mask, other=0.0).to(tl.float32)
        mx = tl.maximum(l_acc, lse)
        mx_safe = tl.where(mx == float("-inf"), 0.0, mx)
        e_acc = tl.exp(l_acc - mx_safe)
        e_new = tl.exp(lse - mx_safe)
        tot = tl.maximum(e_acc + e_new, 1.0)  # >= 1 when either side is finite
        out = (o_acc * (e_acc / tot)[:, None]) + (out * (e_new / tot)[:, None])
        lse = tl.where(mx == float("-inf"), float("-inf"), mx_safe + tl.log(tot))
    tl.store(o_ptr, out.to(O.dtype.element_ty), mask=o_mask)
    tl.store(l_ptr, lse, mask=row_ok)


@triton.jit
def delta_kernel(
    DO, O, DELTA, n_rows, H, s_dn, s_dh, s_on, s_oh,
    D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    """DELTA (N * H,) contiguous fp32 = rowsum(dout * out) over (N, H) rows of strided views."""
    r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    ok = r < n_rows
    pos, h = r // H, r % H
    d = tl.arange(0, BLOCK_D)
    m2 = ok[:, None] & (d < D)[None, :]
    do = tl.load(DO + (pos * s_dn + h * s_dh)[:, None] + d[None, :], mask=m2, other=0.0).to(tl.float32)
    o = tl.load(O + (pos * s_on + h * s_oh)[:, None] + d[None, :], mask=m2, other=0.0).to(tl.float32)
    tl.store(DELTA + r, tl.sum(do * o, 1), mask=ok)


@triton.jit
def _probs(
    q, k, rows, cols, n, lse2, KPAD, kpos, qk_scale,
    BOUNDS: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_PAD: tl.constexpr,
):  # fmt: skip
    """P (rows, cols) from the final LSE (base 2; +inf for rows that see no key or lie past the
    sequence, so P = 0 there), masked as in :func:`_keep`."""
    qk = tl.dot(q, tl.trans(k)) * qk_scale
    p = tl.math.exp2(qk - lse2[:, None])
    if BOUNDS or IS_CAUSAL or HAS_PAD:
        p = tl.where(_keep(rows, cols, n, KPAD, kpos, BOUNDS, IS_CAUSAL, HAS_PAD), p, 0.0)
    return p


@triton.jit
def _dkdv_step(
    dk, dv, k, v, cols, kpos, m0, Q, DO, LSE, DELTA, KPAD, start, n, qh, STRIDE,
    s_qn, s_qh, s_dn, s_dh, s_ln, s_lh, H, d, d_ok, qk_scale,
    BLOCK_M: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_PAD: tl.constexpr,
):  # fmt: skip
    """(dk, dv) of this program's key tile plus query tile m0's share. No bounds mask: query rows past
    the sequence have P = 0, and this tile's keys past it only reach their own dk, dv rows, which are
    not stored. (Query-major P: a key-major P^T = exp2(k q^T) form timed slower on an H100.)"""
    rows = m0 + tl.arange(0, BLOCK_M)
    row_ok = rows < n
    qpos = start + rows.to(tl.int64) * STRIDE
    q_mask = row_ok[:, None] & d_ok[None, :]
    q = _load_rows(Q, qpos, qh, s_qn, s_qh, d, q_mask)
    do = _load_rows(DO, qpos, qh, s_dn, s_dh, d, q_mask)
    lse2, delta = _row_stats(LSE, DELTA, qpos, qh, row_ok, s_ln, s_lh, H)
    p = _probs(q, k, rows, cols, n, lse2, KPAD, kpos, qk_scale, False, IS_CAUSAL, HAS_PAD)
    dv = tl.dot(tl.trans(p.to(do.dtype)), do, dv)
    dp = tl.dot(do, tl.trans(v))
    ds = p * (dp - delta[:, None])
    dk = tl.dot(tl.trans(ds.to(q.dtype)), q, dk)
    return dk, dv


@triton.jit
def _dq_step(
    dq, q, do, lse2, delta, rows, j0, K, V, KPAD, start, n, kh, STRIDE, s_kn, s_kh, s_vn, s_vh, d, d_ok, qk_scale,
    BLOCK_N: tl.constexpr, BOUNDS: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_PAD: tl.constexpr,
):  # fmt: skip
    """dq of this program's query tile plus key tile j0's share (keys past the sequence load as 0, but
    P there is masked: exp2(-lse) alone may overflow)."""
    cols, kpos, k, v = _key_tile(
        K, V, K, V, start, n, j0, kh, STRIDE, s_kn, s_kh, s_vn, s_vh, d, d_ok, BLOCK_N, BOUNDS, False
    )
    p = _probs(q, k, rows, cols, n, lse2, KPAD, kpos, qk_scale, BOUNDS, IS_CAUSAL, HAS_PAD)
    dp = tl.dot(do, tl.trans(v))
    ds = p * (dp - delta[:, None])
    return tl.dot(ds.to(k.dtype), k, dq)


@triton.jit(do_not_specialize=["STRIDE", "q_hs", "kv_hs", "GQA", "H"])
def dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, KPAD,
    TILE_SEQ, TILE_M0, START, LEN, QH0, KH0,
    s_qn, s_qh, s_kn, s_kh, s_vn, s_vh, s_dn, s_dh, s_ln, s_lh, s_dkn, s_dkh, s_dvn, s_dvh,
    STRIDE, q_hs, kv_hs, GQA, H, qk_scale, sm_scale,
    D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IS_CAUSAL: tl.constexpr, HAS_PAD: tl.constexpr,
):  # fmt: skip
    """dK, dV of BLOCK_N key rows of one sequence and kv head (over the GQA query heads that read it),
    added into DK, DV. LSE: natural log; DELTA (N * H,) fp32."""
    s, n0, start, n = _sequence(TILE_SEQ, TILE_M0, START, LEN, tl.program_id(0))
    jk = tl.program_id(1)
    kh = (tl.load(KH0 + s) + jk * kv_hs).to(tl.int64)
    cols = n0 + tl.arange(0, BLOCK_N)
    col_ok = cols < n
    kpos = start + cols.to(tl.int64) * STRIDE
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    kv_mask = col_ok[:, None] & d_ok[None, :]
    k = _load_rows(K, kpos, kh, s_kn, s_kh, d, kv_mask)
    v = _load_rows(V, kpos, kh, s_vn, s_vh, d, kv_mask)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    qh0 = tl.load(QH0 + s)
    lo = 0
    masked_end = 0
    if IS_CAUSAL:  # query tiles from the one holding the first key row; those before masked_end
        # hold a row before some key of this tile and take the causal mask
        lo = (n0 // BLOCK_M) * BLOCK_M
        masked_end = tl.minimum(n, tl.cdiv(n0 + BLOCK_N - 1, BLOCK_M) * BLOCK_M)
    for g in range(0, GQA):
        qh = (qh0 + (jk * GQA + g) * q_hs).to(tl.int64)
        for m0 in range(lo, masked_end, BLOCK_M):
            dk, dv = _dkdv_step(
                dk, dv, k, v, cols, kpos, m0, Q, DO, LSE, DELTA, KPAD, start, n, qh, STRIDE,
                s_qn, s_qh, s_dn, s_dh, s_ln, s_lh, H, d, d_ok, qk_scale, BLOCK_M, IS_CAUSAL, HAS_PAD,
            )  # fmt: skip
        for m0 in range(masked_end, n, BLOCK_M):
            dk, dv = _dkdv_step(
                dk, dv, k, v, cols, kpos, m0, Q, DO, LSE, DELTA, KPAD, start, n, qh, STRIDE,
                s_qn, s_qh, s_dn, s_dh, s_ln, s_lh, H, d, d_ok, qk_scale, BLOCK_M, False, HAS_PAD,
            )  # fmt: skip
    dk_ptr = DK + (kpos * s_dkn + kh * s_dkh)[:, None] + d[None, :]
    dv_ptr = DV + (kpos * s_dvn + kh * s_dvh)[:, None] + d[None, :]
    dk = dk * sm_scale + tl.load(dk_ptr, mask=kv_mask, other=0.0).to(tl.float32)
    dv += tl.load(dv_ptr, mask=kv_mask, other=0.0).to(tl.float32)
    tl.store(dk_ptr, dk.to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(dv_ptr, dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit(do_not_specialize=["STRIDE", "q_hs", "kv_hs", "GQA", "H"])
def dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, KPAD,
    TILE_SEQ, TILE_M0, START, LEN, QH0, KH0,
    s_qn, s_qh, s_kn, s_kh, s_vn, s_vh, s_dn, s_dh, s_ln, s_lh, s_dqn, s_dqh,
    STRIDE, q_hs, kv_hs, GQA, H, qk_scale, sm_scale,
    D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IS_CAUSAL: tl.constexpr, HAS_PAD: tl.constexpr,
):  # fmt: skip
    """dQ of BLOCK_M query rows of one sequence and head, added into DQ."""
    start, n, m0, qh, kh, rows, row_ok, qpos = _query_tile(
        TILE_SEQ, TILE_M0, START, LEN, QH0, KH0, q_hs, kv_hs, GQA, STRIDE, BLOCK_M
    )
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    q_mask = row_ok[:, None] & d_ok[None, :]
    q = _load_rows(Q, qpos, qh, s_qn, s_qh, d, q_mask)
    do = _load_rows(DO, qpos, qh, s_dn, s_dh, d, q_mask)
    lse2, delta = _row_stats(LSE, DELTA, qpos, qh, row_ok, s_ln, s_lh, H)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    unmasked_end = _unmasked_key_end(n, m0, BLOCK_N, IS_CAUSAL)
    for j0 in range(0, unmasked_end, BLOCK_N):
        dq = _dq_step(
            dq, q, do, lse2, delta, rows, j0, K, V, KPAD, start, n, kh, STRIDE, s_kn, s_kh, s_vn, s_vh, d, d_ok,
            qk_scale, BLOCK_N, False, False, HAS_PAD,
        )  # fmt: skip
    for j0 in range(unmasked_end, _key_end(n, m0, BLOCK_M, IS_CAUSAL), BLOCK_N):
        dq = _dq_step(
            dq, q, do, lse2, delta, rows, j0, K, V, KPAD, start, n, kh, STRIDE, s_kn, s_kh, s_vn, s_vh, d, d_ok,
            qk_scale, BLOCK_N, True, IS_CAUSAL, HAS_PAD,
        )  # fmt: skip
    dq_ptr = DQ + (qpos * s_dqn + qh * s_dqh)[:, None] + d[None, :]
    dq = dq * sm_scale + tl.load(dq_ptr, mask=q_mask, other=0.0).to(tl.float32)
    tl.store(dq_ptr, dq.to(DQ.dtype.element_ty), mask=q_mask)
