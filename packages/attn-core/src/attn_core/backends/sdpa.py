"""Dilated attention on torch's fused SDPA ops, reading dilated rows in place through strides.

For every group g = (w, r) and offset o, the heads of the group that share offset o read the
positions s + o + t*r of every segment as one strided view (no gathered copies of q, k, v):

    view of x (B, N, Hx, D):  (segments, heads, rows, D) with strides (w*sN, r*sH, r*sN, 1)

(:func:`attn_core.views.piece_view`). Each such batch runs one fused attention call
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

from typing import Any

import torch

from .. import sdpa_ops, views
from ..blocks import acc_dtype, drop_padded_keys
from ..config import DilatedCall, DilatedConfig

NAME = "sdpa"


def unsupported_reasons(call: DilatedCall) -> list[str]:
    """Why the sdpa backend cannot take ``call`` (empty: it can)."""
    q = call.q
    reasons = sdpa_ops.unsupported_reasons(q.device, q.dtype, q.shape[-1], dropout_p=call.dropout_p)
    for name, t in (("q", q), ("k", call.k), ("v", call.v)):
        if t.stride(-1) != 1:
            reasons.append(f"{name} must have a contiguous last dim (stride 1), got strides {t.stride()}")
    if call.cu_seqlens is not None:
        reasons.append("cu_seqlens (packed documents) is not supported by the sdpa backend yet")
    return reasons


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
    tensors = [q, k, v] if mask is None else [q, k, v, mask]
    pieces = views.plan_pieces((B, N, H, Hkv, D), config, views.batch_mergeable(*tensors))
    # out accumulates in q's dtype, lse in fp32 (fp64 for fp64), both merged in fp32 arithmetic
    out = torch.zeros(B, N, H, D, dtype=q.dtype, device=q.device)
    lse = views.new_lse(B, N, H, acc_dtype(q.dtype), q.device)
    views.forward_pieces(q, k, v, pieces, out, lse, key_padding_mask=mask, is_causal=is_causal, scale=scale)
    return out, lse.transpose(1, 2)  # (B, N, H): the storage order, saved and passed back to _backward


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
    """(dq, dk, dv), contiguous, shaped like (q, k, v); lse (B, N, H) as _forward returns it."""
    B, N, H, D = q.shape
    Hkv = k.shape[2]
    if dout.stride(-1) != 1 or dout.stride(1) == 0:
        dout = dout.contiguous()
    dq = torch.zeros_like(q, memory_format=torch.contiguous_format)
    dk = torch.zeros_like(k, memory_format=torch.contiguous_format)
    dv = torch.zeros_like(v, memory_format=torch.contiguous_format)
    if mask is not None:  # as in _forward; the kernels give dk = dv = 0 at padded keys
        k, v = drop_padded_keys(k, v, mask)
    tensors = [q, k, v, dout] if mask is None else [q, k, v, dout, mask]
    pieces = views.plan_pieces((B, N, H, Hkv, D), config, views.batch_mergeable(*tensors))
    views.backward_pieces(
        dout, q, k, v, out, lse.transpose(1, 2), pieces, (dq, dk, dv),
        key_padding_mask=mask, is_causal=is_causal, scale=scale,
    )  # fmt: skip
    return dq, dk, dv


class _DilatedSDPA(torch.autograd.Function):
    """Eager calls: the plain autograd.Function (no custom-op dispatch per call)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        config: DilatedConfig,
        is_causal: bool,
        mask: torch.Tensor | None,
        scale: float,
    ) -> torch.Tensor:
        out, lse = _forward(q, k, v, mask, config, is_causal, scale)
        ctx.save_for_backward(q, k, v, out, lse, mask)
        ctx.config, ctx.is_causal, ctx.scale = config, is_causal, scale
        return out

    @staticmethod
    def backward(ctx: Any, dout: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        q, k, v, out, lse, mask = ctx.saved_tensors
        with torch.no_grad():  # the kernels' backward ops have no derivative of their own
            dq, dk, dv = _backward(dout, q, k, v, out, lse, mask, ctx.config, ctx.is_causal, ctx.scale)
        if torch.is_grad_enabled() and any(t.requires_grad for t in (dout, q, k, v)):
            # create_graph=True: the gradients are part of a graph; differentiating them raises
            dq, dk, dv = _FirstOrderOnly.apply(dq, dk, dv, dout, q, k, v)
        return dq, dk, dv, None, None, None, None


SECOND_ORDER_ERROR = (
    "double backward (second-order gradients through create_graph=True) is not supported by the "
    "sdpa backend: its fused kernels have no derivative of their backward; use backend='reference' "
    "(plain autograd, supports higher-order gradients)"
)


class _FirstOrderOnly(torch.autograd.Function):
    """Passes the sdpa backend's (dq, dk, dv) through; differentiating them raises SECOND_ORDER_ERROR.

    The inputs after the gradients are what they depend on (dout, q, k, v): they put the result in
    the graph, so a second-order backward reaches this node instead of a kernel without a derivative.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor, *depends_on: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return dq, dk, dv

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        raise RuntimeError(SECOND_ORDER_ERROR)


# Under torch.compile the same forward/backward run as torch.library custom ops with a registered
# autograd formula: the compiler cannot trace the pieces' strided views (storage offsets are not
# tensors: one graph break per piece), so they run opaque, with fake implementations for tracing.
# The config travels as its segment lengths, dilation rates and head mode (schemas take no objects).


@torch.library.custom_op("attn_core::dilated_sdpa_fwd", mutates_args=())
def _fwd_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    segment_lengths: list[int],
    dilation_rates: list[int],
    head_mode: str,
    is_causal: bool,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    config = DilatedConfig(segment_lengths, dilation_rates, head_mode)
    return _forward(q, k, v, mask, config, is_causal, scale)


@_fwd_op.register_fake
def _fwd_fake(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    segment_lengths: list[int],
    dilation_rates: list[int],
    head_mode: str,
    is_causal: bool,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    B, N, H, _ = q.shape
    return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty((B, N, H), dtype=acc_dtype(q.dtype))


@torch.library.custom_op("attn_core::dilated_sdpa_bwd", mutates_args=())
def _bwd_op(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    mask: torch.Tensor | None,
    segment_lengths: list[int],
    dilation_rates: list[int],
    head_mode: str,
    is_causal: bool,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    config = DilatedConfig(segment_lengths, dilation_rates, head_mode)
    return _backward(dout, q, k, v, out, lse, mask, config, is_causal, scale)


@_bwd_op.register_fake
def _bwd_fake(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    mask: torch.Tensor | None,
    segment_lengths: list[int],
    dilation_rates: list[int],
    head_mode: str,
    is_causal: bool,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dq, dk, dv = (torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v))
    return dq, dk, dv


def _op_setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[torch.Tensor, torch.Tensor]) -> None:
    q, k, v, mask, *args = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, mask)
    ctx.args = args


def _op_backward(ctx: Any, dout: torch.Tensor, _dlse: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
    # lse is an auxiliary output (not exposed): its incoming gradient is ignored
    q, k, v, out, lse, mask = ctx.saved_tensors
    dq, dk, dv = _bwd_op(dout, q, k, v, out, lse, mask, *ctx.args)
    return (dq, dk, dv) + (None,) * 6


torch.library.register_autograd("attn_core::dilated_sdpa_fwd", _op_backward, setup_context=_op_setup_context)


def dilated_attention(call: DilatedCall) -> torch.Tensor:
    """out (B, N, H, D) in q's dtype; see the module docstring."""
    c = call.config
    if torch.compiler.is_compiling():
        out, _ = _fwd_op(
            call.q, call.k, call.v, call.key_padding_mask, list(c.segment_lengths), list(c.dilation_rates),
            c.head_mode, bool(call.is_causal), float(call.softmax_scale),
        )  # fmt: skip
        return out
    result: torch.Tensor = _DilatedSDPA.apply(
        call.q, call.k, call.v, c, call.is_causal, call.key_padding_mask, call.softmax_scale
    )
    return result
