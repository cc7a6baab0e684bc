"""Ring dilated attention: LongNet dilated attention over a sequence sharded across ranks.

Each rank of ``group`` (W ranks) holds a contiguous shard of n = N / W tokens: rank b holds the
global positions [b*n, (b+1)*n). The result on every rank equals
``attn_core.dilated_attention`` on the gathered sequence, sharded the same way, with exact
gradients.

Algorithm (see docs/ring_dilated.md for the derivation of the communicated bytes):

- Geometry is global (:mod:`attn_ring.ring_dilated_plan`): group g = (w, r) cuts the *global*
  sequence into segments [s*w, (s+1)*w); head j selects positions p with p mod r == j mod r
  (j the global head index: a call may run a range of the global heads, see ``head_base``).
  With packed documents (``cu_seqlens``) each document is cut into segments from its own start
  instead; the plan takes each group's list of segments, the regular tiling being the packing of
  one document, and everything below is the same.
  A rank's work for group g is a list of *items*, one per (segment run, offset o): the rank's own selected rows of that segment are the
  queries, and the same rows are the local keys (so ``is_causal`` inside the shard is the
  top-left aligned causal of :func:`attn_core.blocks.block_forward`).
- Segments wholly inside the shard are batched (a strided run of equal segments) and need no
  communication. A segment that crosses a shard boundary (w > n, or shards not aligned with
  segments) also needs the selected rows of that segment held by the other ranks it spans
  (causal: only the earlier ones). Those rows are the only K/V that travels: every rank
  derives from the global geometry which (position, kv head) rows every other rank needs, and
  one batched point-to-point exchange (:mod:`attn_ring.exchange`) moves exactly that union,
  deduplicated across groups and heads.
- Per item, local and remote keys give two partial results merged by LSE straight into the
  accumulators (one item per (position, head) per group, so this is the LSE merge of the groups).
- Backward: every item's backward uses the final out and L, which makes the sum of the per-item
  gradients exact, including through the group merge. The gradients of received K/V rows are
  accumulated in fp32 and sent back to their owners in the reverse exchange.

Kernels (:mod:`attn_ring.ring_dilated_exec`): the *view path* (every CPU call; bf16/fp16 CUDA
calls that cuDNN takes) runs an item's local keys as :mod:`attn_core.views` pieces on strided
views (no copies of q, k, v; native GQA when the kv heads form a strided set) and adds gradients
into strided views (with packed documents and B == 1, where Triton runs, on
:mod:`attn_core.strided_varlen`'s kernels instead: one launch per group and head-call shape
rather than one call per small item); the remote keys of crossing segments go through
:mod:`attn_core.blocks`. The
*gather path* (other CUDA dtypes or head dims) gathers the rows and runs :mod:`attn_core.blocks`
throughout. Padded keys' values are never read on either path.

Shapes: q (B, n, H, D) and k, v (B, n, Hkv, D) per rank, H % Hkv == 0; key_padding_mask (B, n)
bool, True = padding. Works on gloo (CPU) and NCCL (CUDA).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

from attn_core import strided_varlen
from attn_core.blocks import acc_dtype
from attn_core.config import DilatedConfig
from attn_core.first_order import first_order_only, second_order_error
from attn_core.validation import check_bool, check_cu_seqlens, check_qkv, cu_seqlens_on_host, resolve_softmax_scale

from .comm import DEFAULT_TIMEOUT_S, RingComm, check_timeout, config_hash, dtype_code
from .head_range import check_head_range
from .ring_dilated_exchange import finish_kv, finish_kv_grads, gather_mask, post_kv, post_kv_grads
from .ring_dilated_exec import (
    RingDilatedCall,
    backward_gather,
    backward_views,
    forward_gather,
    forward_views,
    local_groups,
    view_path_available,
)
from .ring_dilated_plan import RingDilatedPlan, RingDilatedRankPlan, plan_ring_dilated
from .ulysses import packed_documents_code

__all__ = ["RingDilatedPlan", "RingDilatedRankPlan", "plan_ring_dilated", "ring_dilated_attention"]


class _RingDilatedFunction(torch.autograd.Function):
    """Forward: post the K/V exchange, compute every item's local keys while the rows travel, then
    the remote keys. Backward: remote keys first, post the dK/dV return, local keys meanwhile."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        local_mask: torch.Tensor | None,
        global_mask: torch.Tensor | None,
        call: RingDilatedCall,
    ) -> torch.Tensor:
        B, n, H, D = q.shape
        pending = post_kv(k, v, call.plan, call.comm)
        path = forward_views if call.views else forward_gather
        acc_out = q.dtype if call.views else acc_dtype(q.dtype)  # the view path merges in place in q's dtype
        out = torch.zeros(B, n, H, D, dtype=acc_out, device=q.device)
        lse = torch.full((B, n, H), float("-inf"), dtype=acc_dtype(q.dtype), device=q.device)
        path(q, k, v, local_mask, global_mask, None, (out, lse), call)  # overlaps the exchange
        recv = finish_kv(pending, k)
        if recv.shape[2] > 0:
            path(q, k, v, local_mask, global_mask, recv, (out, lse), call)
        result = out.to(q.dtype)
        # backward needs the final out (in q's dtype, as flash attention keeps it) and the merged L
        ctx.save_for_backward(q, k, v, result, lse, recv, local_mask, global_mask)
        ctx.call = call
        return result

    @staticmethod
    def backward(ctx: Any, dout: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        q, k, v, out, lse, recv, local_mask, global_mask = ctx.saved_tensors
        call: RingDilatedCall = ctx.call
        with torch.no_grad():  # the kernels and the exchange have no derivative of their own
            dq, dk, dv = _backward(dout, q, k, v, out, lse, recv, local_mask, global_mask, call)
        return (*first_order_only((dq, dk, dv), (dout, q, k, v), SECOND_ORDER_ERROR), None, None, None)


SECOND_ORDER_ERROR = second_order_error(
    "ring dilated attention", "use attn_core.dilated_attention(backend='reference') on the gathered sequence"
)


def _backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    recv: torch.Tensor,
    local_mask: torch.Tensor | None,
    global_mask: torch.Tensor | None,
    call: RingDilatedCall,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Remote keys first, post the dK/dV return, local keys meanwhile; (dq, dk, dv) in the inputs' dtypes."""
    ad = acc_dtype(q.dtype)
    # the view path adds each call's gradients in place in the inputs' dtype (as attn_core's sdpa
    # backend does): fp32 buffers cost a fill and adds twice as wide, and a conversion pass
    gd = q.dtype if call.views else ad
    grads = (
        torch.zeros(q.shape, dtype=gd, device=q.device),
        torch.zeros(k.shape, dtype=gd, device=q.device),
        torch.zeros(v.shape, dtype=gd, device=q.device),
        torch.zeros(recv.shape, dtype=ad, device=q.device),  # fp32 across items and on the wire
    )
    dq, dk, dv, drecv = grads
    B, n, Hkv, D = k.shape
    path = backward_views if call.views else backward_gather
    dout = dout.contiguous()
    if recv.shape[2] > 0:
        path(dout, q, k, v, out, lse, local_mask, global_mask, recv, grads, call)
    pending = post_kv_grads(drecv, dk.view(B, n * Hkv, D), call.plan, call.comm)
    path(dout, q, k, v, out, lse, local_mask, global_mask, None, grads, call)  # overlaps the return
    finish_kv_grads(pending, dk.view(B, n * Hkv, D), dv.view(B, n * Hkv, D), call.plan)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


_SIGNATURE_NAMES = (
    "batch",
    "shard_len",
    "num_heads",
    "num_kv_heads",
    "head_dim",
    "dtype",
    "is_causal",
    "key_padding_mask",
    "config",
    "softmax_scale",
    "head_base",
    "total_heads",
    "cu_seqlens",
)


def _signature(
    q: torch.Tensor,
    k: torch.Tensor,
    cfg: DilatedConfig,
    causal: bool,
    has_mask: bool,
    scale: float,
    head_range: tuple[int, int],
    documents: int,
) -> list[int]:
    B, n, H, D = q.shape
    cfg_code = config_hash((cfg.segment_lengths, cfg.dilation_rates, cfg.head_mode))
    scale_bits = struct.unpack("<q", struct.pack("<d", scale))[0]
    flags = [int(causal), int(has_mask), cfg_code, scale_bits, *head_range, documents]
    return [B, n, H, k.shape[2], D, dtype_code(q.dtype), *flags]


def ring_dilated_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    segment_lengths: Sequence[int],
    dilation_rates: Sequence[int],
    *,
    group: dist.ProcessGroup | None = None,
    is_causal: bool = False,
    key_padding_mask: torch.Tensor | None = None,
    softmax_scale: float | None = None,
    head_mode: str = "all",
    head_base: int = 0,
    total_heads: int | None = None,
    cu_seqlens: torch.Tensor | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> torch.Tensor:
    """LongNet dilated attention over a sequence sharded contiguously across the ranks of ``group``.

    Every rank passes its shard: q (B, n, H, D), k and v (B, n, Hkv, D) with H % Hkv == 0, and
    key_padding_mask (B, n) bool (True = padding) or None; rank b holds global positions
    [b*n, (b+1)*n) of the N = n * W token sequence. Returns this rank's shard (B, n, H, D) of
    ``attn_core.dilated_attention`` on the gathered sequence (same segments, rates, head_mode,
    causal flag and padding), differentiable with exact gradients for q, k and v.

    head_base, total_heads: the H heads of the call are the global heads [head_base,
    head_base + H) of an attention with ``total_heads`` heads (default: head_base 0,
    total_heads H). Local head j then takes global head head_base + j's offset
    ((head_base + j) mod r_g) and, with head_mode "split", its group (cut from the
    ``total_heads`` heads; the range may straddle groups), so the result is those heads of
    ``attn_core.dilated_attention`` over all ``total_heads`` heads. Local GQA is unchanged (local
    head j reads local kv head j // (H // Hkv)). Head-parallel callers (the hybrid layout) pass
    their rank's range; total_heads is required when head_base > 0.

    cu_seqlens: int32 (num_docs + 1,) offsets of documents packed along the *whole* sequence of
    N = n * W tokens (B == 1), the same on every rank (checked); documents may cross any shard
    boundary. Each document is cut into segments from its own start (its last segment cut at its
    end) and a query sees only keys of its own segment, as ``attn_core.dilated_attention(...,
    cu_seqlens=)`` on the gathered sequence; with is_causal, causal within each segment.

    Segments wholly inside a shard are computed with no communication; segments crossing shard
    boundaries exchange only their selected (dilated) K/V rows with the ranks they span. Every
    rank must call with the same configuration and shard shape (checked: ValueError on all ranks
    otherwise); a peer that never answers gives TimeoutError after ``timeout_s`` seconds.
    """
    check_qkv(q, k, v, key_padding_mask=key_padding_mask)
    _, n, H, D = q.shape
    Hkv = k.shape[2]
    if n == 0:
        raise ValueError("each rank's shard must hold at least one token, got q with sequence length 0")
    cfg = DilatedConfig(segment_lengths, dilation_rates, head_mode)
    head_range = check_head_range(head_base, total_heads, H)
    causal = check_bool("is_causal", is_causal)
    scale = resolve_softmax_scale(softmax_scale, D)
    timeout_s = check_timeout(timeout_s)
    # one host copy of the offsets serves the handshake's hash and the plan
    offsets_on_host = cu_seqlens_on_host(cu_seqlens) if isinstance(cu_seqlens, torch.Tensor) else cu_seqlens
    documents = packed_documents_code(offsets_on_host)
    comm = RingComm(group, timeout_s=timeout_s)
    comm.handshake(
        dict(
            zip(
                _SIGNATURE_NAMES,
                _signature(q, k, cfg, causal, key_padding_mask is not None, scale, head_range, documents),
            )
        ),
        "ring dilated attention",
    )
    world = comm.world_size
    if cu_seqlens is not None:  # after the handshake: every rank holds the same offsets and raises the same error
        check_cu_seqlens(cu_seqlens, batch=q.shape[0], seq_len=n * world, device=q.device)
    plan = plan_ring_dilated(
        n * world,
        world,
        H,
        Hkv,
        cfg.segment_lengths,
        cfg.dilation_rates,
        is_causal=causal,
        head_mode=cfg.head_mode,
        head_base=head_range[0],
        total_heads=head_range[1],
        cu_seqlens=offsets_on_host,
    )
    global_mask = None
    if key_padding_mask is not None and world > 1 and any(r.needed.numel() for r in plan.ranks):
        global_mask = gather_mask(key_padding_mask, comm)
    # the kernels read rows through strides but need a contiguous head dim
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    rank_plan, on_views = plan.ranks[comm.rank], view_path_available(q)
    # packed documents make many small items: their local keys run on the strided-rows kernels
    on_kernels = on_views and cu_seqlens is not None and q.shape[0] == 1 and not strided_varlen.unsupported_reasons(q)
    local = local_backward = None
    if on_kernels:  # the passes pick their pieces apart (attn_core.packed_views.strided_min_work)
        local, local_backward = (local_groups(rank_plan, q.device, q.shape[-1], backward=b) for b in (False, True))
    call = RingDilatedCall(rank_plan, on_views, comm, scale, causal, local, local_backward)
    out: torch.Tensor = _RingDilatedFunction.apply(q, k, v, key_padding_mask, global_mask, call)
    return out
