"""Dilated attention on torch's fused SDPA ops: dilated rows read in place through strides, or
gathered into one batch per group on small problems (see "Two executors" below).

For every group g = (w, r) and offset o, the heads of the group that share offset o read the
positions s + o + t*r of every segment as one strided view (no gathered copies of q, k, v):

    view of x (B, N, Hx, D):  (segments, heads, rows, D) with strides (w*sN, r*sH, r*sN, 1)

(:func:`attn_core.views.piece_view`). Each such batch runs one fused attention call
(:mod:`attn_core.sdpa_ops`: cuDNN on CUDA, the CPU flash kernel on CPU) returning (out_g, lse_g).
Segment batches are cut into calls of bounded size so temporaries stay a small fraction of q.
The short last segment (N not a multiple of w) is its own call per offset, never padded.

Two executors run those calls (:func:`executor` says which one a call takes, and why):

* **strided** (:mod:`attn_core.views`, described above and below): one call per (group, offset,
  head run) on in-place views, no copies. Calls whose largest group has more than
  :data:`attn_core.gathered_groups.GATHER_MAX_ELEMS` query elements (B*N*heads*D) take it.
* **gathered** (:mod:`attn_core.gathered_groups`), for smaller problems, whose per-(group, offset)
  calls are bound by host time per call: each group's full segments are gathered with one
  indexing op per tensor into one contiguous batch, run as ONE attention call (query heads sharing
  an (offset, kv head) pair are its GQA heads) and stored or LSE-merged back with one
  ``index_copy_`` per accumulator; the backward gathers again and adds with one ``index_add_`` per
  gradient. Short last segments, and groups that are one strided call anyway (r = 1), run as
  strided pieces inside it. Same results (exact merge, exact backward from the merged statistics).
  During CUDA graph capture a plan not built before (its device index tables) is not built: that
  call runs strided.

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

Packed documents (``cu_seqlens``, B == 1): :mod:`attn_core.packed_views` plans the same groups per
document (segments start at each document's start): long documents' full segments as strided
pieces through the same executor, every other segment gathered into one varlen call per
(group, offset, head run) (:mod:`attn_core.varlen`: flash varlen on CUDA), merged by LSE the same
way; the backward again from the merged statistics.
"""

from __future__ import annotations

from typing import Any

import torch

from .. import gathered_groups, packed_views, sdpa_ops, views
from ..blocks import acc_dtype, drop_padded_keys
from ..config import DilatedCall, DilatedConfig
from ..custom_op import DifferentiableOp

NAME = "sdpa"


def unsupported_reasons(call: DilatedCall) -> list[str]:
    """Why the sdpa backend cannot take ``call`` (empty: it can)."""
    q = call.q
    reasons = sdpa_ops.unsupported_reasons(q.device, q.dtype, q.shape[-1], dropout_p=call.dropout_p)
    for name, t in (("q", q), ("k", call.k), ("v", call.v)):
        if t.stride(-1) != 1:
            reasons.append(f"{name} must have a contiguous last dim (stride 1), got strides {t.stride()}")
    return reasons


def executor(call: DilatedCall) -> tuple[str, str]:
    """(executor, why) this backend runs ``call`` with: "packed" (cu_seqlens), "gathered" (one call
    per dilated group, :mod:`attn_core.gathered_groups`) or "strided" (one call per group and offset
    on strided views, :mod:`attn_core.views`), by the rule of
    :func:`attn_core.gathered_groups.executor_choice`."""
    if call.cu_seqlens is not None:
        route = packed_views.segment_route(call.q)
        return "packed", f"cu_seqlens given: packed documents (attn_core.packed_views); {route}"
    return gathered_groups.executor_choice(call.shape, call.config)


def _forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
    config: DilatedConfig,
    is_causal: bool,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out (B, N, H, D) in q.dtype, lse (B, N, H) fp32, fp64 for fp64) over every piece (and packed call)."""
    B, N, H, D = q.shape
    Hkv = k.shape[2]
    if mask is not None:  # padded keys' values are never read (a NaN there would pass the -inf bias)
        k, v = drop_padded_keys(k, v, mask)
    # out accumulates in q's dtype, lse in fp32 (fp64 for fp64), both merged in fp32 arithmetic
    out = torch.zeros(B, N, H, D, dtype=q.dtype, device=q.device)
    lse = views.new_lse(B, N, H, acc_dtype(q.dtype), q.device)
    if cu_seqlens is not None:
        plan = packed_views.plan_packed(
            cu_seqlens, (N, H, Hkv, D), config, q.device, kernel=packed_views.uses_strided_kernel(q), backward=False
        )
        packed_views.forward_packed(q, k, v, plan, out, lse, key_padding_mask=mask, is_causal=is_causal, scale=scale)
    else:
        tensors = [q, k, v] if mask is None else [q, k, v, mask]
        mergeable = views.batch_mergeable(*tensors)
        gathered = gathered_groups.gathered_plan((B, N, H, Hkv, D), config, mergeable, q.device)
        if gathered is not None:
            gathered_groups.forward_gathered(
                q, k, v, gathered, out, lse, key_padding_mask=mask, is_causal=is_causal, scale=scale
            )
        else:
            pieces = views.plan_pieces((B, N, H, Hkv, D), config, mergeable)
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
    cu_seqlens: torch.Tensor | None,
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
    if cu_seqlens is not None:
        plan = packed_views.plan_packed(
            cu_seqlens, (N, H, Hkv, D), config, q.device, kernel=packed_views.uses_strided_kernel(q), backward=True
        )
        packed_views.backward_packed(
            dout, q, k, v, out, lse.transpose(1, 2), plan, (dq, dk, dv),
            key_padding_mask=mask, is_causal=is_causal, scale=scale,
        )  # fmt: skip
        return dq, dk, dv
    tensors = [q, k, v, dout] if mask is None else [q, k, v, dout, mask]
    mergeable = views.batch_mergeable(*tensors)
    gathered = gathered_groups.gathered_plan((B, N, H, Hkv, D), config, mergeable, q.device)
    if gathered is not None:
        gathered_groups.backward_gathered(
            dout, q, k, v, out, lse.transpose(1, 2), gathered, (dq, dk, dv),
            key_padding_mask=mask, is_causal=is_causal, scale=scale,
        )  # fmt: skip
        return dq, dk, dv
    pieces = views.plan_pieces((B, N, H, Hkv, D), config, mergeable)
    views.backward_pieces(
        dout, q, k, v, out, lse.transpose(1, 2), pieces, (dq, dk, dv),
        key_padding_mask=mask, is_causal=is_causal, scale=scale,
    )  # fmt: skip
    return dq, dk, dv


SECOND_ORDER_ERROR = (
    "double backward (second-order gradients through create_graph=True) is not supported by the "
    "sdpa backend: its fused kernels have no derivative of their backward; use backend='reference' "
    "(plain autograd, supports higher-order gradients)"
)


def _encode(
    mask: torch.Tensor | None, cu_seqlens: torch.Tensor | None, config: DilatedConfig, is_causal: bool, scale: float
) -> tuple[Any, ...]:
    # op schemas take no objects: the config travels as its segment lengths, rates and head mode
    return (
        mask,
        cu_seqlens,
        list(config.segment_lengths),
        list(config.dilation_rates),
        config.head_mode,
        bool(is_causal),
        float(scale),
    )


def _decode(
    mask: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
    segment_lengths: list[int],
    dilation_rates: list[int],
    head_mode: str,
    is_causal: bool,
    scale: float,
) -> tuple[Any, ...]:
    return mask, cu_seqlens, DilatedConfig(segment_lengths, dilation_rates, head_mode), is_causal, scale


def _fake(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, *config_args: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    B, N, H, _ = q.shape
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    return out, q.new_empty((B, N, H), dtype=acc_dtype(q.dtype))


# attn_core::dilated_sdpa_fwd / _bwd: the strided views of the pieces cannot be traced by the
# compiler (storage offsets are not tensors: one graph break per piece), so they run opaque.
DILATED_SDPA = DifferentiableOp(
    "attn_core::dilated_sdpa",
    inputs=("q", "k", "v"),
    outputs=("out", "lse"),
    args_schema=(
        "Tensor? mask, Tensor? cu_seqlens, int[] segment_lengths, int[] dilation_rates, str head_mode, bool is_causal, float scale"
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
    return DILATED_SDPA(
        call.q, call.k, call.v, call.key_padding_mask, call.cu_seqlens, call.config, call.is_causal, call.softmax_scale
    )
