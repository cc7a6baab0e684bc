"""Dilated attention on torch's fused SDPA ops, reading dilated rows in place through strides.

For every group g = (w, r) and offset o, the heads of the group that share offset o read the
positions s + o + t*r of every segment as one strided view (no gathered copies of q, k, v):

    view of x (B, N, Hx, D):  (segments, heads, rows, D) with strides (w*sN, r*sH, r*sN, 1)

(:func:`piece_view`). Each such batch runs one fused attention call
(:mod:`attn_core.sdpa_ops`: cuDNN on CUDA, the CPU flash kernel on CPU) returning (out_g, lse_g).
Segment batches are cut into calls of bounded size so temporaries stay a small fraction of q.
The short last segment (N not a multiple of w) is its own call per offset, never padded.

Forward merges the groups into the output in place by their LSE in fp32 arithmetic, on strided
views of the output and of a (B, N, H) fp32 LSE buffer: the first group touching a head is stored,
later ones merged (:func:`attn_core.sdpa_ops.merge_strided_`, one fused Triton pass, on CUDA;
:func:`attn_core.merge.merge_into_` on CPU). Backward is exact through the merge: every call's attention backward runs with the
*merged* output and *merged* LSE (the rows' final softmax statistics) and adds its dq, dk, dv
straight into strided views of the gradient buffers.

GQA without repeating K/V: the kv heads of a call are themselves a strided set of heads
(1:1 with stride r*Hkv/H, or shared by consecutive query heads); other mappings fall back to one
call per kv head. Key padding: an additive (segments, rows) bias per call, built from a strided
view of the mask only when a mask is given; fully padded rows give 0. With a mask, k and v are
first copied with padded keys zeroed (their values, even NaN, are never read); without one,
nothing is copied. Dropout is not supported (-> the reference backend takes it), nor is double
backward (a clear error; the reference backend is plain autograd). Group geometry is clamped to N
(:meth:`attn_core.config.DilatedConfig.group_extent`): planning follows N and H, not w or r.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .. import sdpa_ops
from ..blocks import drop_padded_keys
from ..config import DilatedCall, DilatedConfig
from ..custom_op import DifferentiableOp

NAME = "sdpa"


# Upper bound on the query elements one kernel call reads, as a fraction of q: bounds the call's
# temporaries (its out in forward; dq, dk, dv in backward) to a few percent of the inputs.
CALL_FRACTION = 16
# ...but never split calls below this many query elements (small problems run as one call).
MIN_CALL_ELEMS = 1 << 25


def unsupported_reasons(call: DilatedCall) -> list[str]:
    """Why the sdpa backend cannot take ``call`` (empty: it can)."""
    q = call.q
    reasons = sdpa_ops.unsupported_reasons(q.device, q.dtype, q.shape[-1], dropout_p=call.dropout_p)
    for name, t in (("q", q), ("k", call.k), ("v", call.v)):
        if t.stride(-1) != 1:
            reasons.append(f"{name} must have a contiguous last dim (stride 1), got strides {t.stride()}")
    return reasons


@dataclass(frozen=True)
class Piece:
    """One kernel call: segments [seg0, seg0 + nseg) of length ``seglen`` of group (w, r), offset o,
    for batch rows ``batch`` (None: all B merged into the call's batch dim), query heads
    q_h0 + i*q_hs (i < q_hn) and kv heads kv_h0 + j*kv_hs (j < kv_hn). ``first``: no group
    before this one touches these heads, so its result is stored rather than merged."""

    w: int
    r: int
    o: int
    seg0: int
    nseg: int
    seglen: int
    batch: int | None
    q_h0: int
    q_hs: int
    q_hn: int
    kv_h0: int
    kv_hs: int
    kv_hn: int
    first: bool

    @property
    def rows(self) -> int:
        return -(-(self.seglen - self.o) // self.r)


def piece_view(x: torch.Tensor, p: Piece, h0: int, hs: int, hn: int) -> torch.Tensor:
    """Strided view (batch*segments, hn, rows, D) of x (B, N, Hx, D) for piece p (no copy)."""
    B, _, _, D = x.shape
    sB, sN, sH, sD = x.stride()
    base = x.storage_offset() + (p.seg0 * p.w + p.o) * sN + h0 * sH
    if p.batch is None:
        # all batch rows in one dim: plan_pieces only does this when sB == nseg * w * sN (or nseg == 1)
        size = (B * p.nseg, hn, p.rows, D)
        stride = (sB if p.nseg == 1 else p.w * sN, hs * sH, p.r * sN, sD)
    else:
        base += p.batch * sB
        size = (p.nseg, hn, p.rows, D)
        stride = (p.w * sN, hs * sH, p.r * sN, sD)
    return x.as_strided(size, stride, base)


def _lse_view(lse: torch.Tensor, p: Piece) -> torch.Tensor:
    """(batch*segments, q heads, rows) view of an LSE buffer laid out (B, N, H)."""
    return piece_view(lse.unsqueeze(-1), p, p.q_h0, p.q_hs, p.q_hn)[..., 0]


def _kv_sets(q_heads: Sequence[int], heads_per_kv: int) -> list[tuple[int, int, int, int, int, int]]:
    """Split a strided query-head set into calls (q_h0, q_hs, q_hn, kv_h0, kv_hs, kv_hn) whose kv heads are strided."""
    return sdpa_ops.strided_head_calls(q_heads, [j // heads_per_kv for j in q_heads])


def batch_mergeable(*tensors: torch.Tensor) -> bool:
    """True when every (B, N, ...) tensor has stride(0) == N * stride(1), so batch and segments fold into one dim."""
    return all(t.shape[0] == 1 or t.stride(0) == t.shape[1] * t.stride(1) for t in tensors)


def plan_pieces(shape: tuple[int, int, int, int, int], config: DilatedConfig, mergeable: bool) -> tuple[Piece, ...]:
    """Every kernel call of a dilated attention over q (B, N, H, D) with Hkv kv heads.

    shape: (B, N, H, Hkv, D); mergeable: :func:`batch_mergeable` of every tensor the calls view.
    Groups run in order of increasing dilation rate; a piece is ``first`` when no earlier group
    shares a head with it (its result is stored, not merged). Calls over full segments are cut so
    each reads at most max(q elements / CALL_FRACTION, MIN_CALL_ELEMS) query elements; the short
    last segment of each group is one call per offset (all batch rows).

    Plans are cached (PLAN_CACHE_SIZE, least recently used dropped), keyed on the shape, config,
    mergeability and that call budget: a step's forward and backward, and every layer of a model,
    plan the same calls.
    """
    B, N, H, Hkv, D = shape
    budget = max(B * N * H * D // CALL_FRACTION, MIN_CALL_ELEMS)
    return _plan_pieces((B, N, H, Hkv, D), config, mergeable, budget)


# Distinct (shape, config) plans kept; a model has a handful (one per sequence length and config).
PLAN_CACHE_SIZE = 64


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
            for q_h0, q_hs, q_hn, kv_h0, kv_hs, kv_hn in _kv_sets(q_heads, H // Hkv):
                hk = (q_h0, q_hs, q_hn, kv_h0, kv_hs, kv_hn, first)
                if full:
                    per_seg = q_hn * (w // r) * D
                    chunk = max(1, min(full, budget // max(per_seg * B, 1)))
                    if chunk == full and (B == 1 or (mergeable and full * w == N)):
                        pieces.append(Piece(w, r, o, 0, full, w, None, *hk))
                    else:
                        chunk = max(1, min(full, budget // max(per_seg, 1)))
                        for b in range(B):
                            for s0 in range(0, full, chunk):
                                pieces.append(Piece(w, r, o, s0, min(chunk, full - s0), w, b, *hk))
                if tail > o:
                    pieces.append(Piece(w, r, o, full, 1, tail, None, *hk))
    return tuple(pieces)


def _key_bias(mask: torch.Tensor | None, p: Piece, dtype: torch.dtype) -> torch.Tensor | None:
    """(batch*segments, rows) additive bias (-inf at padding keys) from a strided view of the (B, N) mask."""
    if mask is None:
        return None
    return sdpa_ops.key_bias_from_mask(piece_view(mask[:, :, None, None], p, 0, 1, 1)[:, 0, :, 0], dtype)


def _forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    config: DilatedConfig,
    is_causal: bool,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out (B, N, H, D) in q.dtype, lse (B, N, H) fp32, fp64 for fp64) over every piece."""
    B, N, H, D = q.shape
    Hkv = k.shape[2]
    if mask is not None:  # padded keys' values are never read (a NaN there would pass the -inf bias)
        k, v = drop_padded_keys(k, v, mask)
    views = [q, k, v] if mask is None else [q, k, v, mask]
    pieces = plan_pieces((B, N, H, Hkv, D), config, batch_mergeable(*views))
    # out accumulates in q's dtype, lse in fp32 (fp64 for fp64), both merged in fp32 arithmetic
    out = torch.zeros(B, N, H, D, dtype=q.dtype, device=q.device)
    lse = torch.full((B, N, H), float("-inf"), dtype=sdpa_ops._lse_dtype(q.dtype), device=q.device)
    for p in pieces:
        qv = piece_view(q, p, p.q_h0, p.q_hs, p.q_hn)
        kv = piece_view(k, p, p.kv_h0, p.kv_hs, p.kv_hn)
        vv = piece_view(v, p, p.kv_h0, p.kv_hs, p.kv_hn)
        o_c, l_c = sdpa_ops.attention_forward(
            qv, kv, vv, is_causal=is_causal, scale=scale, key_bias=_key_bias(mask, p, q.dtype)
        )
        o_v = piece_view(out, p, p.q_h0, p.q_hs, p.q_hn)
        l_v = _lse_view(lse, p)
        if p.first:
            o_v.copy_(o_c)
            l_v.copy_(l_c)
        else:
            sdpa_ops.merge_views_(o_v, l_v, o_c, l_c)  # fused on CUDA: one pass, no fp32 temporaries
    return out, lse


def _backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    mask: torch.Tensor | None,
    config: DilatedConfig,
    is_causal: bool,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv), contiguous, shaped like (q, k, v)."""
    B, N, H, D = q.shape
    Hkv = k.shape[2]
    if dout.stride(-1) != 1 or dout.stride(1) == 0:
        dout = dout.contiguous()
    dq = torch.zeros_like(q, memory_format=torch.contiguous_format)
    dk = torch.zeros_like(k, memory_format=torch.contiguous_format)
    dv = torch.zeros_like(v, memory_format=torch.contiguous_format)
    if mask is not None:  # as in _forward; the kernels give dk = dv = 0 at padded keys
        k, v = drop_padded_keys(k, v, mask)
    views = [q, k, v, dout] if mask is None else [q, k, v, dout, mask]
    for p in plan_pieces((B, N, H, Hkv, D), config, batch_mergeable(*views)):
        qv = piece_view(q, p, p.q_h0, p.q_hs, p.q_hn)
        kv = piece_view(k, p, p.kv_h0, p.kv_hs, p.kv_hn)
        vv = piece_view(v, p, p.kv_h0, p.kv_hs, p.kv_hn)
        dq_c, dk_c, dv_c = sdpa_ops.attention_backward(
            piece_view(dout, p, p.q_h0, p.q_hs, p.q_hn),
            qv,
            kv,
            vv,
            piece_view(out, p, p.q_h0, p.q_hs, p.q_hn),
            _lse_view(lse, p),
            is_causal=is_causal,
            scale=scale,
            key_bias=_key_bias(mask, p, q.dtype),
        )
        piece_view(dq, p, p.q_h0, p.q_hs, p.q_hn).add_(dq_c)
        piece_view(dk, p, p.kv_h0, p.kv_hs, p.kv_hn).add_(dk_c)
        piece_view(dv, p, p.kv_h0, p.kv_hs, p.kv_hn).add_(dv_c)
    return dq, dk, dv


SECOND_ORDER_ERROR = (
    "double backward (second-order gradients through create_graph=True) is not supported by the "
    "sdpa backend: its fused kernels have no derivative of their backward; use backend='reference' "
    "(plain autograd, supports higher-order gradients)"
)


def _encode(mask: torch.Tensor | None, config: DilatedConfig, is_causal: bool, scale: float) -> tuple[Any, ...]:
    # op schemas take no objects: the config travels as its segment lengths, rates and head mode
    return (
        mask,
        list(config.segment_lengths),
        list(config.dilation_rates),
        config.head_mode,
        bool(is_causal),
        float(scale),
    )


def _decode(
    mask: torch.Tensor | None,
    segment_lengths: list[int],
    dilation_rates: list[int],
    head_mode: str,
    is_causal: bool,
    scale: float,
) -> tuple[Any, ...]:
    return mask, DilatedConfig(segment_lengths, dilation_rates, head_mode), is_causal, scale


def _fake(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, *config_args: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    B, N, H, _ = q.shape
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    return out, q.new_empty((B, N, H), dtype=sdpa_ops._lse_dtype(q.dtype))


# attn_core::dilated_sdpa_fwd / _bwd: the strided views of the pieces cannot be traced by the
# compiler (storage offsets are not tensors: one graph break per piece), so they run opaque.
DILATED_SDPA = DifferentiableOp(
    "attn_core::dilated_sdpa",
    inputs=("q", "k", "v"),
    outputs=("out", "lse"),
    args_schema=(
        "Tensor? mask, int[] segment_lengths, int[] dilation_rates, str head_mode, bool is_causal, float scale"
    ),
    forward=_forward,
    backward=_backward,
    encode=_encode,
    decode=_decode,
    fake=_fake,
    second_order_error=SECOND_ORDER_ERROR,
)


def dilated_attention(call: DilatedCall) -> torch.Tensor:
    """out (B, N, H, D) in q's dtype; see the module docstring."""
    return DILATED_SDPA(call.q, call.k, call.v, call.key_padding_mask, call.config, call.is_causal, call.softmax_scale)
