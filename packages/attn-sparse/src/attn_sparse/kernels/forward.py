"""The forward Triton kernel: out and LSE of BLOCK_M query rows over their layout row's key blocks.

Each program owns BLOCK_M query rows (inside one layout row block of Bq rows) and loops over that
row's active key blocks, BLOCK_N keys at a time, with an online softmax in base 2 and fp32
accumulation. The tiles that need a mask (the token masks' band edges, the partial last key
block) lie at the two ends of the row's tiles that are not skipped: counted first
(:func:`.tiles.band_tiles`, :func:`.tiles.row_tiles` without token masks) and run in separate
masked loops, so the bulk loop has no masking.
"""

from __future__ import annotations

import triton
import triton.language as tl

from attn_core.online_softmax import online_softmax_step

from .tiles import head_sources, key_tile, ordered_row, row_band

__all__ = ["fwd_kernel"]


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
    """Online softmax over key tiles it_lo..it_hi (<= row_end, the end of the row's tiles); K_src/V_src:
    head pointers, or TMA descriptors. MASKED: row i keeps keys lo[i] <= j <= hi[i] (hi < N_K)."""
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
        k_t = key_tile(K_src, b, hk, n0, N_K, stride_kn, HEAD_DIM, BLOCK_N, MASKED, TMA, True)
        v = key_tile(V_src, b, hk, n0, N_K, stride_vn, HEAD_DIM, BLOCK_N, MASKED, TMA, False)
        qk = tl.dot(q, k_t)
        if MASKED:
            cols = (n0 + offs_n)[None, :]
            keep = (cols >= lo[:, None]) & (cols <= hi[:, None])
            acc, l_i, m_i = online_softmax_step(qk, keep, m_i, l_i, acc, v, qk_scale, True)
        else:
            acc, l_i, m_i = online_softmax_step(qk, None, m_i, l_i, acc, v, qk_scale, False)
    return acc, l_i, m_i


# Lengths and layout sizes are not specialised on (divisibility by 16, == 1): a new N or pattern
# reuses the compiled kernels instead of compiling variants.
@triton.jit(do_not_specialize=["N_Q", "N_K", "NUM_QB", "win_left", "win_right"])
def fwd_kernel(
    Q,
    K,
    V,
    O,
    LSE,
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
    N_Q,
    N_K,
    H,
    GROUP,
    NUM_QB,
    win_left,
    win_right,
    qk_scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    LAYOUT_BQ: tl.constexpr,
    LAYOUT_BK: tl.constexpr,
    BANDED: tl.constexpr,
    HAS_DOCS: tl.constexpr,
    TMA: tl.constexpr,
):
    """out and LSE of BLOCK_M query rows. BANDED: the token masks of :class:`.planning.KernelMask`
    (win_left, win_right, DOCS with HAS_DOCS); otherwise only keys past N_K are masked."""
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

    Q_head = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    K_src, V_src = head_sources(K, V, b, hk, stride_kb, stride_kh, stride_vb, stride_vh, TMA)
    q_ptrs = Q_head + m_start.to(tl.int64) * stride_qn + tl.arange(0, BLOCK_M)[:, None] * stride_qn + offs_d[None, :]
    q = tl.load(q_ptrs, mask=m_ok[:, None], other=0.0)

    lo, hi, p_a, p_b, p_c, p_d = row_band(
        COL, start, end, offs_m, m_ok, N_Q, N_K, win_left, win_right, DOCS, BANDED, HAS_DOCS, BLOCK_M, LAYOUT_BK
    )

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    if BANDED:  # the band's leading edge (without token masks there is none)
        acc, l_i, m_i = _fwd_inner(
            acc, l_i, m_i, q, K_src, V_src, b, hk, COL, p_a * SUB, p_b * SUB, end * SUB, lo, hi, N_K,
            stride_kn, stride_vn, qk_scale, HEAD_DIM, BLOCK_N, LAYOUT_BK, True, TMA,
        )  # fmt: skip
    acc, l_i, m_i = _fwd_inner(
        acc, l_i, m_i, q, K_src, V_src, b, hk, COL, p_b * SUB, p_c * SUB, end * SUB, lo, hi, N_K,
        stride_kn, stride_vn, qk_scale, HEAD_DIM, BLOCK_N, LAYOUT_BK, False, TMA,
    )  # fmt: skip
    acc, l_i, m_i = _fwd_inner(
        acc, l_i, m_i, q, K_src, V_src, b, hk, COL, p_c * SUB, p_d * SUB, end * SUB, lo, hi, N_K,
        stride_kn, stride_vn, qk_scale, HEAD_DIM, BLOCK_N, LAYOUT_BK, True, TMA,
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
