"""Ring attention: exact dense attention over a sequence sharded across the ranks of a group.

Each rank holds a shard of q, k, v along the sequence (layout "contiguous" or "zigzag", see
:mod:`attn_ring.sharding`). K/V blocks travel the ring (:class:`attn_ring.comm.RingComm`): at
step s rank r computes its queries against the block of rank (r - s) mod W while the next block
is already in flight, and merges the partial (out, lse) by LSE in fp32 (attn_core.merge).

Which (query rows, key rows) a step computes: :func:`attn_ring.ring_schedule.ring_step_blocks`
(causal: blocks after the queries are skipped; zigzag's steps are all n*c pairs, so the causal
work is balanced).

Packed documents (``cu_seqlens`` of the whole sequence, B == 1): a query sees only keys of its own
document. Each step's pieces are cut into the documents their rows share
(:mod:`attn_ring.ring_packed`) and run as one :func:`attn_core.varlen.varlen_forward` call per
piece; a step whose rows share no document makes no call (its K/V still travel on). Load balance
with documents: zigzag balances the causal triangle of the *whole* sequence, which is the work
when documents are long; with many short documents the work is each document's own triangle,
spread over the sequence, and is already roughly even across ranks in either layout (zigzag
then gains little; its steps share fewer documents and skip more).

Backward (exact): a second ring pass. K/V travel again and a dK/dV accumulator travels with its
block (fp32), one hop behind it so the transfer overlaps the next step's compute; after W steps
every accumulator is one hop from its owner, and a last hop delivers it. Every block's backward
uses the *final* out and lse of the rows (attn_core.blocks.block_backward), so the per-block
gradients sum exactly to the gradient of the merged output.

The per-step kernels are attn_core.blocks.block_forward / block_backward: the cuDNN path on CUDA
where it takes the block, the portable math path otherwise (attn_core.blocks.explain_block says
which); with documents attn_core.varlen.varlen_forward / varlen_backward (flash varlen on CUDA
fp16/bf16 where it takes the call, else bucketed; attn_core.varlen.explain_varlen). Double
backward is not supported: it raises a RuntimeError saying so.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from attn_core.blocks import acc_dtype, block_backward, block_forward
from attn_core.first_order import first_order_only, second_order_error
from attn_core.merge import merge_into_
from attn_core.validation import check_bool, check_cu_seqlens, check_qkv, cu_seqlens_on_host, resolve_softmax_scale

from .comm import DEFAULT_TIMEOUT_S, BufferProvider, RingComm, check_timeout, config_hash, dtype_code
from .ring_packed import PackedBlock, packed_backward, packed_forward, packed_ring_plan
from .ring_schedule import StepBlock, ring_step_blocks  # StepBlock: re-exported
from .sharding import check_layout, check_shard_len
from .ulysses import packed_documents_code

__all__ = ["StepBlock", "ring_attention", "ring_step_blocks"]

LAYOUT_CODES = {"contiguous": 1, "zigzag": 2}


@dataclass(frozen=True)
class _Call:
    group: dist.ProcessGroup | None
    layout: str
    causal: bool
    scale: float
    timeout_s: float
    overlap: bool
    buffers: BufferProvider | None
    # with cu_seqlens: per step, this rank's varlen calls (attn_ring.ring_packed); None: dense
    plan: tuple[tuple[PackedBlock, ...], ...] | None = None


def _to_wire(t: torch.Tensor, comm: RingComm) -> torch.Tensor:
    return t.to(comm.device).contiguous()


class _RingAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, call: _Call
    ) -> torch.Tensor:
        B, n, H, D = q.shape
        ad = acc_dtype(q.dtype)
        out_acc = torch.zeros(B, n, H, D, dtype=ad, device=q.device)
        lse_acc = torch.full((B, H, n), float("-inf"), dtype=ad, device=q.device)
        with RingComm(call.group, timeout_s=call.timeout_s, buffers=call.buffers) as comm:
            W, r = comm.world_size, comm.rank
            kv = _to_wire(torch.stack([k.detach(), v.detach()]), comm)  # one message per step: (2, B, n, Hkv, D)
            for step in range(W):
                pending = comm.send_recv([kv], channel="kv") if step + 1 < W else None
                if pending is not None and not call.overlap:
                    pending.wait()  # serialized mode: the transfer finishes before the compute starts
                blk = kv.to(q.device)
                if call.plan is not None:
                    for block in call.plan[step]:  # none: the rows share no document, nothing to compute
                        packed_forward(q, blk, block, call.scale, out_acc, lse_acc)
                else:
                    for (q0, q1), (k0, k1), causal in ring_step_blocks(
                        r, (r - step) % W, W, n, call.layout, call.causal
                    ):
                        o, lse = block_forward(
                            q[:, q0:q1], blk[0, :, k0:k1], blk[1, :, k0:k1], is_causal=causal, softmax_scale=call.scale
                        )
                        merge_into_(out_acc[:, q0:q1], lse_acc[:, :, q0:q1], o, lse)
                if pending is not None:
                    kv = pending.wait()[0]
        out = out_acc.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse_acc)
        ctx.call = call
        return out

    @staticmethod
    def backward(ctx: Any, dout: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        q, k, v, out, lse = ctx.saved_tensors
        with torch.no_grad():  # the block kernels and the ring transfers have no derivative of their own
            grads = _backward(dout, q, k, v, out, lse, ctx.call)
        return (*first_order_only(grads, (dout, q, k, v), SECOND_ORDER_ERROR), None)


SECOND_ORDER_ERROR = second_order_error(
    "ring attention", "use attn_core.reference.dense_attention (plain autograd) on the gathered sequence"
)


def _backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    call: _Call,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The second ring pass (see the module docstring): (dq, dk, dv) in the inputs' dtypes."""
    n = q.shape[1]
    ad = acc_dtype(q.dtype)
    dout = dout.contiguous()
    dq = torch.zeros(q.shape, dtype=ad, device=q.device)
    with RingComm(call.group, timeout_s=call.timeout_s, buffers=call.buffers) as comm:
        W, r = comm.world_size, comm.rank
        kv = _to_wire(torch.stack([k, v]), comm)
        pending_dkv = None
        dkv = torch.zeros(0)
        for step in range(W):
            pending_kv = comm.send_recv([kv], channel="kv") if step + 1 < W else None
            if pending_kv is not None and not call.overlap:
                pending_kv.wait()
            blk = kv.to(q.device)
            # this step's contribution to the travelling block's dK/dV, accumulated in fp32
            dkv = torch.zeros((2, *k.shape), dtype=ad, device=q.device)
            if call.plan is not None:
                for block in call.plan[step]:  # none: the rows share no document, nothing to compute
                    packed_backward(dout, q, blk, out, lse, block, call.scale, dq, dkv)
            else:
                for (q0, q1), (k0, k1), causal in ring_step_blocks(r, (r - step) % W, W, n, call.layout, call.causal):
                    dq_b, dk_b, dv_b = block_backward(
                        dout[:, q0:q1],
                        q[:, q0:q1],
                        blk[0, :, k0:k1],
                        blk[1, :, k0:k1],
                        out[:, q0:q1],
                        lse[:, :, q0:q1],
                        is_causal=causal,
                        softmax_scale=call.scale,
                    )
                    dq[:, q0:q1] += dq_b
                    dkv[0, :, k0:k1] += dk_b
                    dkv[1, :, k0:k1] += dv_b
            if pending_dkv is not None:
                # what the previous ranks accumulated for this block (sent one hop behind it)
                dkv += pending_dkv.wait()[0].to(q.device)
            if W > 1:
                # after the last step the accumulator is one hop from its owner: this send delivers it
                pending_dkv = comm.send_recv([_to_wire(dkv, comm)], channel="dkv")
                if not call.overlap:
                    pending_dkv.wait()
            if pending_kv is not None:
                kv = pending_kv.wait()[0]
        if pending_dkv is not None:
            # copy out of the comm's receive buffer before it goes back to the provider
            dkv = pending_dkv.wait()[0].to(q.device, copy=True)
    return dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype)


def ring_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    group: dist.ProcessGroup | None = None,
    is_causal: bool = False,
    layout: str = "contiguous",
    softmax_scale: float | None = None,
    cu_seqlens: torch.Tensor | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    overlap: bool = True,
    buffers: BufferProvider | None = None,
) -> torch.Tensor:
    """Dense attention over the sequence sharded across ``group``; returns this rank's output shard.

    Every rank passes its shard (see :func:`attn_ring.shard_sequence`): q (B, n, H, D), k and v
    (B, n, Hkv, D) with H % Hkv == 0 (GQA: only the Hkv heads travel). The result (B, n, H, D)
    equals ``softmax(q k^T * scale) v`` over the whole N = n * W token sequence (causal: top-left
    aligned in global positions), sharded the same way, with exact gradients for q, k and v.

    layout: "contiguous" (any n >= 1) or "zigzag" (n even; balances causal work).
    cu_seqlens: int32 (num_docs + 1,) offsets of documents packed along the *whole* sequence
    (B == 1, 0 = c[0] <= ... <= c[-1] = N; the same values on every rank, checked; on q's device
    or the CPU). A query then sees only keys of its own document (causal: from the document's
    start), as ``attn_core.reference.dense_attention(..., cu_seqlens=)`` on the gathered
    sequence. Documents may cross shard boundaries; key blocks sharing no document with the
    queries are skipped, not computed and masked (see the module docstring for load balance).
    group: the process group (None = world); gloo (CPU tensors) or NCCL (CUDA tensors).
    timeout_s: bound on every wait (gloo); NCCL relies on the process group's timeout.
    overlap: False waits for each transfer before computing (to measure what overlap hides).
    buffers: optional receive-buffer provider (``acquire(shape, dtype, device)``/``release(t)``).

    Every rank must call with the same shapes, dtype and options: a mismatch raises ValueError on
    every rank (handshake); a peer that exits or never calls gives a TimeoutError/RuntimeError.
    """
    B, n, H, Hkv, D = check_qkv(q, k, v)
    causal = check_bool("is_causal", is_causal)
    ov = check_bool("overlap", overlap)
    check_layout(layout)
    scale = resolve_softmax_scale(softmax_scale, D)
    timeout = check_timeout(timeout_s)
    # one host copy of the offsets serves the handshake's hash and the plan
    offsets_on_host = cu_seqlens_on_host(cu_seqlens) if isinstance(cu_seqlens, torch.Tensor) else cu_seqlens
    documents = packed_documents_code(offsets_on_host)
    comm = RingComm(group, timeout_s=timeout)
    wants_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    comm.handshake(
        {
            "batch": B,
            "shard_len": n,
            "heads": H,
            "kv_heads": Hkv,
            "head_dim": D,
            "dtype": dtype_code(q.dtype),
            "is_causal": int(causal),
            "layout": LAYOUT_CODES[layout],
            "softmax_scale": config_hash(float(scale).hex()),
            "cu_seqlens": documents,
            "needs_grad": int(wants_grad),
        }
    )
    # after the handshake every rank has the same n and cu_seqlens, so every rank raises the same error here
    check_shard_len(n, layout)
    plan = None
    if offsets_on_host is not None:
        W = comm.world_size
        check_cu_seqlens(cu_seqlens, batch=B, seq_len=n * W, device=q.device)
        plan = packed_ring_plan(offsets_on_host, comm.rank, W, n, layout, causal, q.device)
    if comm.backend == "nccl" and q.device.type != "cuda":
        raise ValueError(f"an NCCL group needs CUDA tensors, got q on {q.device}")
    call = _Call(group, layout, causal, scale, timeout, ov, buffers, plan)
    out: torch.Tensor = _RingAttentionFunction.apply(q, k, v, call)
    return out
