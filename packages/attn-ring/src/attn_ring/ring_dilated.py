"""Ring dilated attention: LongNet dilated attention over a sequence sharded across ranks.

Each rank of ``group`` (W ranks) holds a contiguous shard of n = N / W tokens: rank b holds the
global positions [b*n, (b+1)*n). The result on every rank equals
``attn_core.dilated_attention`` on the gathered sequence, sharded the same way, with exact
gradients.

Algorithm (see docs/ring_dilated.md for the derivation of the communicated bytes):

- Geometry is global (:mod:`attn_ring.ring_dilated_plan`): group g = (w, r) cuts the *global*
  sequence into segments [s*w, (s+1)*w); head j selects positions p with p mod r == j mod r.
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
into strided views; the remote keys of crossing segments go through :mod:`attn_core.blocks`. The
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

from attn_core.blocks import acc_dtype
from attn_core.config import DilatedConfig
from attn_core.validation import check_bool, check_qkv, resolve_softmax_scale

from .comm import check_timeout, config_hash, dtype_code
from .exchange import DEFAULT_TIMEOUT_S, comm_device, group_rank_and_size, handshake, is_nccl, post_exchange, wait_all
from .ring_dilated_exec import (
    RingDilatedCall,
    backward_gather,
    backward_views,
    forward_gather,
    forward_views,
    view_path_available,
)
from .ring_dilated_plan import RingDilatedPlan, RingDilatedRankPlan, plan_ring_dilated

__all__ = ["RingDilatedPlan", "RingDilatedRankPlan", "plan_ring_dilated", "ring_dilated_attention"]


def _post_kv(k: torch.Tensor, v: torch.Tensor, call: RingDilatedCall) -> tuple[list[Any], dict[int, torch.Tensor]]:
    """Post the exchange: send the K/V rows others need, receive ours (pending until _finish_kv)."""
    B, n, Hkv, D = k.shape
    plan = call.plan
    dev = comm_device(call.group, k.device)
    kf, vf = k.reshape(B, n * Hkv, D), v.reshape(B, n * Hkv, D)
    sends = {}
    for dst, idx in plan.send_index.items():
        i = idx.to(k.device)
        sends[dst] = torch.stack([kf.index_select(1, i), vf.index_select(1, i)]).to(dev).contiguous()
    recvs = {
        a: torch.empty(2, B, cnt, D, dtype=k.dtype, device=dev) for a, cnt in enumerate(plan.recv_counts) if cnt > 0
    }
    works = post_exchange(sends, recvs, call.group) if sends or recvs else []
    return works, recvs


def _finish_kv(
    pending: tuple[list[Any], dict[int, torch.Tensor]], k: torch.Tensor, call: RingDilatedCall
) -> torch.Tensor:
    """Wait for the exchange; the received rows (2, B, R, D) in ``needed`` order."""
    works, recvs = pending
    wait_all(works, call.timeout_s, f"ring dilated K/V exchange of rank {dist.get_rank(call.group)}",
             stream_only=is_nccl(call.group))  # fmt: skip
    B, D = k.shape[0], k.shape[-1]
    if not recvs:
        return torch.empty(2, B, 0, D, dtype=k.dtype, device=k.device)
    return torch.cat([recvs[a] for a in sorted(recvs)], dim=2).to(k.device)


def _post_kv_grads(
    drecv: torch.Tensor, dk: torch.Tensor, call: RingDilatedCall
) -> tuple[list[Any], dict[int, torch.Tensor]]:
    """Post the reverse exchange: gradients of received rows go back to their owners (fp32)."""
    plan = call.plan
    dev = comm_device(call.group, dk.device)
    sends, start = {}, 0
    for a, cnt in enumerate(plan.recv_counts):
        if cnt > 0:
            sends[a] = drecv[:, :, start : start + cnt].to(dev).contiguous()
            start += cnt
    B, D = dk.shape[0], dk.shape[-1]
    recvs = {b: torch.empty(2, B, idx.numel(), D, dtype=dk.dtype, device=dev) for b, idx in plan.send_index.items()}
    works = post_exchange(sends, recvs, call.group) if sends or recvs else []
    return works, recvs


def _finish_kv_grads(
    pending: tuple[list[Any], dict[int, torch.Tensor]], dk: torch.Tensor, dv: torch.Tensor, call: RingDilatedCall
) -> None:
    """Wait for the reverse exchange and add the returned gradients into dk, dv (B, n*Hkv, D)."""
    works, recvs = pending
    wait_all(works, call.timeout_s, f"ring dilated dK/dV exchange of rank {dist.get_rank(call.group)}",
             stream_only=is_nccl(call.group))  # fmt: skip
    for b, buf in recvs.items():
        i = call.plan.send_index[b].to(dk.device)
        dk.index_add_(1, i, buf[0].to(dk.device))
        dv.index_add_(1, i, buf[1].to(dk.device))


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
        pending = _post_kv(k, v, call)
        path = forward_views if call.views else forward_gather
        acc_out = q.dtype if call.views else acc_dtype(q.dtype)  # the view path merges in place in q's dtype
        out = torch.zeros(B, n, H, D, dtype=acc_out, device=q.device)
        lse = torch.full((B, n, H), float("-inf"), dtype=acc_dtype(q.dtype), device=q.device)
        path(q, k, v, local_mask, global_mask, None, (out, lse), call)  # overlaps the exchange
        recv = _finish_kv(pending, k, call)
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
        ad = acc_dtype(q.dtype)
        grads = (
            torch.zeros(q.shape, dtype=ad, device=q.device),
            torch.zeros(k.shape, dtype=ad, device=q.device),
            torch.zeros(v.shape, dtype=ad, device=q.device),
            torch.zeros(recv.shape, dtype=ad, device=q.device),
        )
        dq, dk, dv, drecv = grads
        B, n, Hkv, D = k.shape
        path = backward_views if call.views else backward_gather
        dout = dout.contiguous()
        if recv.shape[2] > 0:
            path(dout, q, k, v, out, lse, local_mask, global_mask, recv, grads, call)
        pending = _post_kv_grads(drecv, dk.view(B, n * Hkv, D), call)
        path(dout, q, k, v, out, lse, local_mask, global_mask, None, grads, call)  # overlaps the return
        _finish_kv_grads(pending, dk.view(B, n * Hkv, D), dv.view(B, n * Hkv, D), call)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None


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
)


def _signature(
    q: torch.Tensor, k: torch.Tensor, cfg: DilatedConfig, causal: bool, has_mask: bool, scale: float
) -> list[int]:
    B, n, H, D = q.shape
    cfg_code = config_hash((cfg.segment_lengths, cfg.dilation_rates, cfg.head_mode))
    scale_bits = struct.unpack("<q", struct.pack("<d", scale))[0]
    return [B, n, H, k.shape[2], D, dtype_code(q.dtype), int(causal), int(has_mask), cfg_code, scale_bits]


def _gather_mask(mask: torch.Tensor, group: Any, world: int, timeout_s: float) -> torch.Tensor:
    """All-gather the (B, n) padding masks into (B, N): B * N bytes, tiny next to the K/V rows."""
    dev = comm_device(group, mask.device)
    mine = mask.to(device=dev, dtype=torch.uint8).contiguous()
    parts = [torch.empty_like(mine) for _ in range(world)]
    work = dist.all_gather(parts, mine, group=group, async_op=True)
    if work is None:
        raise RuntimeError("all_gather(async_op=True) returned no work handle")
    wait_all([work], timeout_s, "all_gather of key_padding_mask", stream_only=is_nccl(group))
    return torch.cat(parts, dim=1).to(device=mask.device, dtype=torch.bool)


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
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> torch.Tensor:
    """LongNet dilated attention over a sequence sharded contiguously across the ranks of ``group``.

    Every rank passes its shard: q (B, n, H, D), k and v (B, n, Hkv, D) with H % Hkv == 0, and
    key_padding_mask (B, n) bool (True = padding) or None; rank b holds global positions
    [b*n, (b+1)*n) of the N = n * W token sequence. Returns this rank's shard (B, n, H, D) of
    ``attn_core.dilated_attention`` on the gathered sequence (same segments, rates, head_mode,
    causal flag and padding), differentiable with exact gradients for q, k and v.

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
    causal = check_bool("is_causal", is_causal)
    scale = resolve_softmax_scale(softmax_scale, D)
    timeout_s = check_timeout(timeout_s)
    rank, world = group_rank_and_size(group)
    handshake(
        _signature(q, k, cfg, causal, key_padding_mask is not None, scale),
        _SIGNATURE_NAMES,
        group,
        timeout_s,
        "ring dilated attention",
    )
    plan = plan_ring_dilated(
        n * world, world, H, Hkv, cfg.segment_lengths, cfg.dilation_rates, is_causal=causal, head_mode=cfg.head_mode
    )
    global_mask = None
    if key_padding_mask is not None and world > 1 and any(r.needed.numel() for r in plan.ranks):
        global_mask = _gather_mask(key_padding_mask, group, world, float(timeout_s))
    # the kernels read rows through strides but need a contiguous head dim
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    call = RingDilatedCall(
        plan.ranks[rank],
        world,
        view_path_available(q),
        group,
        scale,
        causal,
        Hkv,
        float(timeout_s),
    )
    out: torch.Tensor = _RingDilatedFunction.apply(q, k, v, key_padding_mask, global_mask, call)
    return out
