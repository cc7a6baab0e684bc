"""Dilated attention as kernel calls on strided views: the piece planner and executor.

A *piece* is one kernel call: ``nseg`` runs ("segments") of ``rows`` positions each, the rows of
segment m at ``start + m * seg_stride + t * row_stride`` (t < rows), for a strided run of query
heads and the strided run of kv heads they read. For a dilated group (w, r) and offset o the
segments are the sequence's w-long segments and row_stride is r; ring attention (attn_ring)
plans its shard's pieces the same way. :func:`piece_view` reads a piece's rows in place:

    view of x (B, N, Hx, D):  (batch * segments, heads, rows, D) with strides (seg_stride*sN, hs*sH, row_stride*sN, 1)

so no gathered copies of q, k, v are made. :func:`forward_pieces` runs each piece through
:mod:`attn_core.sdpa_ops` (cuDNN on CUDA, the CPU flash kernel on CPU) and merges its (out, lse)
into strided views of the accumulators; :func:`backward_pieces` adds each piece's (dq, dk, dv),
computed with the rows' *final* out and lse, into strided views of the gradient buffers.

LSE layout: every public primitive of attn_core (:mod:`attn_core.blocks`, :mod:`attn_core.merge`
and this module) takes and returns lse as (B, H, N). The accumulators of this module are stored
token-major, (B, N, H) in memory (:func:`new_lse`), and handed around as their (B, H, N)
transposed view: a piece then addresses the LSE with the same strides as q, and the transposes
are views, never copies.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from . import sdpa_ops
from .config import DilatedConfig

__all__ = [
    "CALL_FRACTION",
    "MIN_CALL_ELEMS",
    "PLAN_CACHE_SIZE",
    "Piece",
    "backward_pieces",
    "batch_mergeable",
    "forward_pieces",
    "head_calls",
    "new_lse",
    "piece_key_bias",
    "piece_lse_view",
    "piece_view",
    "plan_pieces",
]

# Upper bound on the query elements one kernel call reads, as a fraction of q: bounds the call's
# temporaries (its out in forward; dq, dk, dv in backward) to a few percent of the inputs.
CALL_FRACTION = 16
# ...but never split calls below this many query elements (small problems run as one call).
MIN_CALL_ELEMS = 1 << 25
# Distinct (shape, config) plans kept; a model has a handful (one per sequence length and config).
PLAN_CACHE_SIZE = 64


@dataclass(frozen=True)
class Piece:
    """One kernel call of group ``group``: segments m < nseg of ``rows`` positions each, row t of
    segment m at position start + m * seg_stride + t * row_stride, for batch row ``batch`` (None:
    all B folded into the call's batch dim), query heads q_h0 + i*q_hs (i < q_hn) and kv heads
    kv_h0 + j*kv_hs (j < kv_hn); query head i reads kv head i // (q_hn // kv_hn). ``first``: no
    earlier piece touches these (position, head) rows, so the result is stored rather than merged."""

    group: int
    start: int
    nseg: int
    seg_stride: int
    rows: int
    row_stride: int
    batch: int | None
    q_h0: int
    q_hs: int
    q_hn: int
    kv_h0: int
    kv_hs: int
    kv_hn: int
    first: bool


def _segments_dim(p: Piece, batch: int, s_batch: int, s_seq: int) -> tuple[int, int, int]:
    """(size, stride, extra storage offset) of a piece view's first dim: batch rows and segments."""
    if p.batch is None:
        return batch * p.nseg, (s_batch if p.nseg == 1 else p.seg_stride * s_seq), 0
    return p.nseg, p.seg_stride * s_seq, p.batch * s_batch


def piece_view(x: torch.Tensor, p: Piece, h0: int, hs: int, hn: int) -> torch.Tensor:
    """Strided view (batch*segments, hn, rows, D) of x (B, N, Hx, D) at p's rows and heads h0 + i*hs (no copy).

    With batch None all B rows fold into dim 0: callers only plan that for one batch row, one
    segment, or when stride(0) == nseg * seg_stride * stride(1) (:func:`batch_mergeable`).
    """
    sB, sN, sH, sD = x.stride()
    size0, stride0, extra = _segments_dim(p, x.shape[0], sB, sN)
    base = x.storage_offset() + p.start * sN + h0 * sH + extra
    return x.as_strided((size0, hn, p.rows, x.shape[3]), (stride0, hs * sH, p.row_stride * sN, sD), base)


def piece_lse_view(lse: torch.Tensor, p: Piece) -> torch.Tensor:
    """(batch*segments, q heads, rows) view of an LSE (B, H, N) (any strides) at p's query rows and heads."""
    sB, sH, sN = lse.stride()
    size0, stride0, extra = _segments_dim(p, lse.shape[0], sB, sN)
    base = lse.storage_offset() + p.start * sN + p.q_h0 * sH + extra
    return lse.as_strided((size0, p.q_hn, p.rows), (stride0, p.q_hs * sH, p.row_stride * sN), base)


def piece_key_bias(mask: torch.Tensor | None, p: Piece, dtype: torch.dtype) -> torch.Tensor | None:
    """(batch*segments, rows) additive key bias (-inf at padding keys) from a strided view of the (B, N) mask."""
    if mask is None:
        return None
    return sdpa_ops.key_bias_from_mask(piece_view(mask[:, :, None, None], p, 0, 1, 1)[:, 0, :, 0], dtype)


def new_lse(batch: int, seq_len: int, num_heads: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An empty-rows LSE accumulator: -inf, (B, H, N) as the transposed view of (B, N, H) storage."""
    return torch.full((batch, seq_len, num_heads), float("-inf"), dtype=dtype, device=device).transpose(1, 2)


def head_calls(q_heads: Sequence[int], heads_per_kv: int) -> list[tuple[int, int, int, int, int, int]]:
    """Split a strided query-head run into calls (q_h0, q_hs, q_hn, kv_h0, kv_hs, kv_hn) whose kv heads are strided."""
    return sdpa_ops.strided_head_calls(q_heads, [j // heads_per_kv for j in q_heads])


def batch_mergeable(*tensors: torch.Tensor) -> bool:
    """True when every (B, N, ...) tensor has stride(0) == N * stride(1), so batch and segments fold into one dim."""
    return all(t.shape[0] == 1 or t.stride(0) == t.shape[1] * t.stride(1) for t in tensors)


def plan_pieces(
    shape: tuple[int, int, int, int, int],
    config: DilatedConfig,
    mergeable: bool,
    *,
    call_budget: int | None = None,
) -> tuple[Piece, ...]:
    """Every kernel call of a dilated attention over q (B, N, H, D) with Hkv kv heads.

    shape: (B, N, H, Hkv, D); mergeable: :func:`batch_mergeable` of every tensor the calls view.
    Groups run in order of increasing dilation rate; a piece is ``first`` when no earlier group
    shares a head with it (its result is stored, not merged). Group geometry is clamped to N
    (:meth:`DilatedConfig.group_extent`). Calls over full segments are cut so each reads at most
    ``call_budget`` query elements (None: max(q elements / CALL_FRACTION, MIN_CALL_ELEMS)); the
    short last segment of each group is one call per offset (all batch rows).

    Plans are cached (PLAN_CACHE_SIZE, least recently used dropped), keyed on the shape, config,
    mergeability and that call budget: a step's forward and backward, and every layer of a model,
    plan the same calls.
    """
    B, N, H, Hkv, D = shape
    budget = max(B * N * H * D // CALL_FRACTION, MIN_CALL_ELEMS) if call_budget is None else call_budget
    if budget < 1:
        raise ValueError(f"call_budget must be a positive number of query elements, got {call_budget}")
    return _plan_pieces((B, N, H, Hkv, D), config, mergeable, budget)


@functools.lru_cache(maxsize=PLAN_CACHE_SIZE)
def _plan_pieces(
    shape: tuple[int, int, int, int, int], config: DilatedConfig, mergeable: bool, budget: int
) -> tuple[Piece, ...]:
    B, N, H, Hkv, D = shape
    pieces: list[Piece] = []
    touched: set[int] = set()
    order = sorted(range(config.num_groups), key=lambda g: config.dilation_rates[g])
    for g in order:
        # clamped to N (same selection): the loops below follow N and H, never the configured w, r
        w, r = config.group_extent(g, N)
        heads = config.heads_for_group(g, H)
        if len(heads) == 0:
            continue
        first = touched.isdisjoint(heads)
        touched.update(heads)
        full, tail = divmod(N, w)
        for o, q_heads in config.heads_by_offset(g, H, N):
            for hk in head_calls(q_heads, H // Hkv):
                if full:
                    per_seg = hk[2] * (w // r) * D
                    chunk = max(1, min(full, budget // max(per_seg * B, 1)))
                    if chunk == full and (B == 1 or (mergeable and full * w == N)):
                        pieces.append(Piece(g, o, full, w, w // r, r, None, *hk, first))
                    else:
                        chunk = max(1, min(full, budget // max(per_seg, 1)))
                        for b in range(B):
                            for s0 in range(0, full, chunk):
                                n = min(chunk, full - s0)
                                pieces.append(Piece(g, s0 * w + o, n, w, w // r, r, b, *hk, first))
                if tail > o:
                    pieces.append(Piece(g, full * w + o, 1, w, -(-(tail - o) // r), r, None, *hk, first))
    return tuple(pieces)


def _same_rows(a: Piece | None, b: Piece) -> bool:
    """Whether two pieces read the same positions (so they share a key bias)."""
    return a is not None and (a.start, a.nseg, a.seg_stride, a.rows, a.row_stride, a.batch) == (
        b.start,
        b.nseg,
        b.seg_stride,
        b.rows,
        b.row_stride,
        b.batch,
    )


def forward_pieces(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pieces: Sequence[Piece],
    out: torch.Tensor,
    lse: torch.Tensor,
    *,
    key_padding_mask: torch.Tensor | None,
    is_causal: bool,
    scale: float,
) -> None:
    """Run every piece and store (``first``) or LSE-merge its result into out and lse, in place.

    q: (B, N, H, D); k, v: (B, N, Hkv, D), last dims contiguous, padded keys' rows already zero
    (:func:`attn_core.blocks.drop_padded_keys`: the -inf bias masks a key's logit, not its value);
    key_padding_mask: (B, N) bool or None. out: (B, N, H, D) in q's dtype; lse: (B, H, N) fp32
    (fp64 for fp64), e.g. :func:`new_lse`. ``is_causal`` is top-left aligned within each piece.
    Merges run in fp32 arithmetic (:func:`attn_core.sdpa_ops.merge_views_`).
    """
    bias, bias_rows = None, None
    for p in pieces:
        if not _same_rows(bias_rows, p):
            bias, bias_rows = piece_key_bias(key_padding_mask, p, q.dtype), p
        o_c, l_c = sdpa_ops.attention_forward(
            piece_view(q, p, p.q_h0, p.q_hs, p.q_hn),
            piece_view(k, p, p.kv_h0, p.kv_hs, p.kv_hn),
            piece_view(v, p, p.kv_h0, p.kv_hs, p.kv_hn),
            is_causal=is_causal,
            scale=scale,
            key_bias=bias,
        )
        o_v = piece_view(out, p, p.q_h0, p.q_hs, p.q_hn)
        l_v = piece_lse_view(lse, p)
        if p.first:
            o_v.copy_(o_c)
            l_v.copy_(l_c)
        else:
            sdpa_ops.merge_views_(o_v, l_v, o_c, l_c)  # fused on CUDA: one pass, no fp32 temporaries


def backward_pieces(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    pieces: Sequence[Piece],
    grads: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    *,
    key_padding_mask: torch.Tensor | None,
    is_causal: bool,
    scale: float,
) -> None:
    """Add every piece's (dq, dk, dv) into grads = (dq (B, N, H, D), dk, dv (B, N, Hkv, D)), in place.

    out, lse: the rows' final output (B, N, H, D) and LSE (B, H, N) (after every merge), which
    makes the sum of the per-piece gradients exact. dout: (B, N, H, D), last dim contiguous.
    Other arguments as in :func:`forward_pieces`; padded keys get dk = dv = 0.
    """
    dq, dk, dv = grads
    bias, bias_rows = None, None
    for p in pieces:
        if not _same_rows(bias_rows, p):
            bias, bias_rows = piece_key_bias(key_padding_mask, p, q.dtype), p
        dq_c, dk_c, dv_c = sdpa_ops.attention_backward(
            piece_view(dout, p, p.q_h0, p.q_hs, p.q_hn),
            piece_view(q, p, p.q_h0, p.q_hs, p.q_hn),
            piece_view(k, p, p.kv_h0, p.kv_hs, p.kv_hn),
            piece_view(v, p, p.kv_h0, p.kv_hs, p.kv_hn),
            piece_view(out, p, p.q_h0, p.q_hs, p.q_hn),
            piece_lse_view(lse, p),
            is_causal=is_causal,
            scale=scale,
            key_bias=bias,
        )
        piece_view(dq, p, p.q_h0, p.q_hs, p.q_hn).add_(dq_c)
        piece_view(dk, p, p.kv_h0, p.kv_hs, p.kv_hn).add_(dk_c)
        piece_view(dv, p, p.kv_h0, p.kv_hs, p.kv_hn).add_(dv_c)
