"""The online-softmax step of the Triton forward kernels (imports triton: imported only by kernel
modules, :mod:`attn_core.strided_kernels` and attn-sparse's forward kernel)."""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["online_softmax_step"]


@triton.jit
def online_softmax_step(qk, keep, m_i, l_i, acc, v, qk_scale, MASKED: tl.constexpr):
    """One key tile of an online softmax in base 2 with fp32 accumulation: (acc, l_i, m_i) updated.

    qk: (M, N) unscaled scores q @ k^T; keep: (M, N) bool, the pairs that attend (read only when
    MASKED; None otherwise); m_i, l_i: (M,) running maximum (scaled, base 2) and sum; acc: (M, D)
    fp32; v: (N, D); qk_scale: softmax scale * log2(e), > 0. An unmasked tile folds the scale into
    the exponent (one fused multiply-add). A row every key of which is masked so far keeps m = -inf
    and weight 0 (0 is its reference point).
    """
    if MASKED:
        qk = tl.where(keep, qk * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(qk - m_ref[:, None])
    else:
        m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        m_ref = m_new
        p = tl.math.exp2(qk * qk_scale - m_ref[:, None])
    alpha = tl.math.exp2(m_i - m_ref)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
    return acc, l_i, m_new
