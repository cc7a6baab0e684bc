"""Ring dilated attention's execution: one rank's items on its local and received K/V rows.

Two paths compute the same thing (see :mod:`attn_ring.ring_dilated` for the algorithm):

- The *view path* (every CPU call; bf16/fp16 CUDA calls that cuDNN takes) reads an item's rows
  in place: its local keys are :class:`attn_core.views.Piece` calls run by
  :func:`attn_core.views.forward_pieces` / :func:`attn_core.views.backward_pieces` (no copies of
  q, k, v; native GQA when the kv heads form a strided set); the received keys of crossing
  segments go through :mod:`attn_core.blocks` on strided views of q and the accumulators.
  With packed documents (B == 1) where :mod:`attn_core.strided_varlen`'s kernels run (CUDA
  fp16/bf16 with Triton, or the CPU interpreter), the local keys run as :func:`local_groups`
  instead: per group, the items with the most work (as :mod:`attn_core.packed_views` picks its
  strided pieces per direction: ``strided_min_work``, ``STRIDED_MAX_PIECES``) stay pieces on the fused kernels,
  and every other item's segments are sequences of strided rows on those kernels, one table per
  (row stride, head-call shape), read and merged in place (packing makes many small items, which
  as separate pieces would cost a kernel call each). A group's pieces and tables touch disjoint
  rows and run on side CUDA streams beside each other (``PACKED_STREAMS``); groups run in order.
- The *gather path* (other CUDA dtypes or head dims) gathers the rows and runs
  :mod:`attn_core.blocks` throughout.

Each phase (``recv`` None: local keys; else the received keys) merges straight into the
accumulators: one item per (position, head) per group, so this is the LSE merge of the groups.
The local keys of a group whose heads no earlier group touches (:func:`storing_groups`) are
stored instead (merging into empty rows would only cost a pass).
Backward uses the final out and LSE of the rows, which makes the per-item gradients sum exactly.
Shapes: q (B, n, H, D), k, v (B, n, Hkv, D); the LSE accumulator is (B, n, H) token-major
storage (public primitives see its (B, H, n) transposed view).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from attn_core import packed_views, sdpa_ops, side_streams, strided_varlen, views
from attn_core.blocks import block_backward, block_forward, drop_padded_keys
from attn_core.memo import BoundedMemo
from attn_core.merge import merge_into_
from attn_core.strided_varlen import StridedSequences, stacked_sequences
from attn_core.triton_env import triton_installed

from .comm import RingComm
from .ring_dilated_plan import RingDilatedRankPlan, RingItem

__all__ = [
    "MAX_BLOCK_LOGITS",
    "MAX_GATHER_ELEMENTS",
    "LocalGroup",
    "RingDilatedCall",
    "backward_gather",
    "backward_views",
    "forward_gather",
    "forward_views",
    "item_chunks",
    "local_groups",
    "local_pieces",
    "remote_kv",
    "storing_groups",
    "view_path_available",
]

# Runs of local segments are processed in chunks: on the gather path one block call may
# materialise B * segments * heads * T * T logits (math path), bounded by MAX_BLOCK_LOGITS; a
# view-path call reads at most MAX_GATHER_ELEMENTS query elements (bounding its temporaries).
MAX_BLOCK_LOGITS = 1 << 26
MAX_GATHER_ELEMENTS = 1 << 28


@dataclass
class RingDilatedCall:
    """What one rank's forward and backward need besides the tensors."""

    plan: RingDilatedRankPlan
    views: bool  # the view path (attn_core.views on strided views) takes this call
    comm: RingComm
    scale: float
    causal: bool
    # view path, packed: the local keys per group (local_groups), of the forward and of the backward
    local: tuple[LocalGroup, ...] | None = None
    local_backward: tuple[LocalGroup, ...] | None = None


@dataclass(frozen=True)
class LocalGroup:
    """One group's local keys: long items as strided pieces on the fused kernels, split into
    ``lanes`` that may run concurrently (:func:`attn_core.packed_views.piece_lanes`), and the other
    items as strided-rows kernel ``tables``; the two touch disjoint (row, head) sets. ``first``: the
    results are stored, not merged (:func:`storing_groups`)."""

    tables: tuple[StridedSequences, ...]
    lanes: tuple[tuple[views.Piece, ...], ...]
    first: bool


def view_path_available(q: torch.Tensor) -> bool:
    """Whether attn_core.sdpa_ops takes this device, dtype and head dim (it reads strided views in place);
    on CUDA also Triton, for the fused merge on strided views."""
    if q.device.type == "cuda" and not triton_installed():
        return False
    return not sdpa_ops.unsupported_reasons(q.device, q.dtype, q.shape[-1])


# ---------------------------------------------------------------------------------------------
# Gather path: every gather/scatter goes through flat (row * heads + head) indices.


def item_chunks(item: RingItem, batch: int, head_dim: int, by_rows: bool) -> list[tuple[int, int]]:
    """Segment ranges [m0, m1) of the item per kernel call: by_rows bounds the query elements a call
    reads (fused kernels); otherwise the logits the math path materialises."""
    if by_rows:
        step = MAX_GATHER_ELEMENTS // max(batch * len(item.heads) * item.rows * head_dim, 1)
    else:
        step = MAX_BLOCK_LOGITS // max(batch * len(item.heads) * item.rows * item.rows, 1)
    step = max(step, 1)
    return [(m, min(m + step, item.count)) for m in range(0, item.count, step)]


def _rows(item: RingItem, m0: int, m1: int, device: torch.device) -> torch.Tensor:
    """(M, T) local row indices of segments m0..m1 of the item."""
    m = torch.arange(m0, m1, device=device)[:, None] * item.seg_stride
    t = torch.arange(item.rows, device=device)[None, :] * item.row_stride
    return item.base + m + t


def _flat(rows: torch.Tensor, heads: Sequence[int], num_heads: int) -> torch.Tensor:
    """(M, T, h) flat indices row * num_heads + head."""
    h = torch.tensor(list(heads), device=rows.device)
    return rows[..., None] * num_heads + h


def _take(x: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
    """x (B, n, Hx, D) at flat (M, T, h) -> (B * M, T, h, D)."""
    B, D = x.shape[0], x.shape[-1]
    M, T, h = flat.shape
    return x.reshape(B, -1, D).index_select(1, flat.reshape(-1)).reshape(B * M, T, h, D)


def _lse_take(L: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
    """L (B, n, H) at flat (M, T, h) -> (B * M, h, T)."""
    B = L.shape[0]
    M, T, h = flat.shape
    Lf = L.reshape(B, -1)
    return Lf.index_select(1, flat.reshape(-1)).reshape(B, M, T, h).permute(0, 1, 3, 2).reshape(B * M, h, T)


def forward_gather(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    local_mask: torch.Tensor | None,
    global_mask: torch.Tensor | None,
    recv: torch.Tensor | None,
    acc: tuple[torch.Tensor, torch.Tensor],
    call: RingDilatedCall,
) -> None:
    """Gather path, one phase (recv None: the local keys of every item; else the remote keys of
    crossing segments), merged into acc = (out (B, n, H, D) fp32, lse (B, n, H) fp32)."""
    B, n, H, D = q.shape
    plan = call.plan
    out, lse = acc
    # lse kept (B, n, H) so that flat index row * H + head addresses both accumulators.
    out_flat, lse_flat = out.view(B, n * H, D), lse.view(B, n * H)
    for i, it in enumerate(plan.items):
        if recv is not None and not it.remote:
            continue
        for m0, m1 in item_chunks(it, B, D, False):
            rows = _rows(it, m0, m1, q.device)
            qf = _flat(rows, it.heads, H)
            qi = _take(q, qf)
            if recv is None:
                kvf = _flat(rows, it.kv_heads, k.shape[2])
                mi = None if local_mask is None else local_mask[:, rows].reshape(-1, it.rows)
                o, l = block_forward(
                    qi,
                    _take(k, kvf),
                    _take(v, kvf),
                    is_causal=call.causal,
                    softmax_scale=call.scale,
                    key_padding_mask=mi,
                )
            else:
                kr, vr, mr = remote_kv(recv, global_mask, plan, i, it, q.device)
                o, l = block_forward(qi, kr, vr, is_causal=False, softmax_scale=call.scale, key_padding_mask=mr)
            # Each (position, head) is in one item per group: merging items straight into the
            # accumulators is the LSE merge of the groups.
            o_acc, l_acc = _take(out, qf), _lse_take(lse, qf)
            merge_into_(o_acc, l_acc, o, l)
            Mc, h = m1 - m0, len(it.heads)
            out_flat.index_copy_(1, qf.reshape(-1), o_acc.reshape(B, -1, D))
            lse_flat.index_copy_(1, qf.reshape(-1), l_acc.reshape(B, Mc, h, it.rows).transpose(2, 3).reshape(B, -1))


def backward_gather(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    local_mask: torch.Tensor | None,
    global_mask: torch.Tensor | None,
    recv: torch.Tensor | None,
    grads: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
    call: RingDilatedCall,
) -> None:
    """Gather path, one phase (recv None: local keys; else remote keys): add the gradients into
    dq (B, n, H, D), dk, dv (B, n, Hkv, D) and drecv (2, B, R, D), fp32."""
    B, _, H, D = q.shape
    Hkv = k.shape[2]
    plan = call.plan
    dq, dk, dv = (g.view(B, -1, D) for g in grads[:3])  # flat (row * heads + head) views
    drecv = grads[3]
    for i, it in enumerate(plan.items):
        if recv is not None and not it.remote:
            continue
        for m0, m1 in item_chunks(it, B, D, False):
            rows = _rows(it, m0, m1, q.device)
            qf = _flat(rows, it.heads, H)
            qi, oi, doi, li = _take(q, qf), _take(out, qf), _take(dout, qf), _lse_take(lse, qf)
            if recv is None:
                kvf = _flat(rows, it.kv_heads, Hkv)
                mi = None if local_mask is None else local_mask[:, rows].reshape(-1, it.rows)
                dq1, dk1, dv1 = block_backward(
                    doi, qi, _take(k, kvf), _take(v, kvf), oi, li, is_causal=call.causal, softmax_scale=call.scale,
                    key_padding_mask=mi,
                )  # fmt: skip
                dq.index_add_(1, qf.reshape(-1), dq1.reshape(B, -1, D).to(dq.dtype))
                dk.index_add_(1, kvf.reshape(-1), dk1.reshape(B, -1, D).to(dk.dtype))
                dv.index_add_(1, kvf.reshape(-1), dv1.reshape(B, -1, D).to(dv.dtype))
            else:
                kr, vr, mr = remote_kv(recv, global_mask, plan, i, it, q.device)
                dq2, dk2, dv2 = block_backward(
                    doi, qi, kr, vr, oi, li, is_causal=False, softmax_scale=call.scale, key_padding_mask=mr
                )
                dq.index_add_(1, qf.reshape(-1), dq2.reshape(B, -1, D).to(dq.dtype))
                ridx = plan.remote_index[i].to(q.device).reshape(-1)
                drecv[0].index_add_(1, ridx, dk2.reshape(B, -1, D).to(drecv.dtype))
                drecv[1].index_add_(1, ridx, dv2.reshape(B, -1, D).to(drecv.dtype))


# ---------------------------------------------------------------------------------------------
# View path: rows read in place through strides (attn_core.views), results merged into strided
# views of the accumulators, gradients added straight into strided views.


def _head_run(item: RingItem) -> tuple[int, int, int]:
    """(first head, step, count) of the item's query heads (one offset's heads: an arithmetic run)."""
    heads = item.heads
    return heads[0], (heads[1] - heads[0] if len(heads) > 1 else 1), len(heads)


def storing_groups(items: Sequence[RingItem]) -> frozenset[int]:
    """The groups whose query heads no earlier group touches (items come group by group, ascending,
    and run in that order). Their local results are stored into the empty accumulators rather than
    LSE-merged: within a group each (position, head) is in one item. Head mode "split" stores every
    group; "all" stores the first."""
    touched: set[int] = set()
    first = set()
    for g in sorted({it.group for it in items}):
        heads = {h for it in items if it.group == g for h in it.heads}
        if touched.isdisjoint(heads):
            first.add(g)
        touched |= heads
    return frozenset(first)


def local_pieces(
    items: Sequence[RingItem], batch: int, head_dim: int, storing: frozenset[int] = frozenset()
) -> list[views.Piece]:
    """The kernel calls of the items' local keys: runs cut so a call reads at most MAX_GATHER_ELEMENTS
    query elements (bounding its out / dq, dk, dv temporaries); batch None folds batch and segments
    into one strided dim (one batch row, or one segment); one call per strided kv-head set.
    Pieces of the ``storing`` groups (:func:`storing_groups`) store their results; the others merge."""
    pieces = []
    for it in items:
        fold = batch == 1 or it.count == 1
        calls = sdpa_ops.strided_head_calls(it.heads, it.kv_heads)
        for m0, m1 in item_chunks(it, batch if fold else 1, head_dim, True):
            start = it.base + m0 * it.seg_stride
            for b in [None] if fold else range(batch):
                for hk in calls:
                    piece = views.Piece(
                        it.group, start, m1 - m0, it.seg_stride, it.rows, it.row_stride, b, *hk, it.group in storing
                    )
                    pieces.append(piece)
    return pieces


# Local work per (rank plan, device, head dim, launch and piece settings): a forward's and a
# backward's per plan; the rank plans are cached (ring_dilated_plan, 32), so these are too,
# bounded, each entry holding its plan so an id is never reused while cached.
TABLES_CACHE_SIZE = 64
_LOCAL = BoundedMemo(TABLES_CACHE_SIZE)


def local_groups(
    plan: RingDilatedRankPlan, device: torch.device, head_dim: int, *, backward: bool
) -> tuple[LocalGroup, ...]:
    """The items' local keys (B == 1) for the forward or the backward pass, per group in the order
    the plan lists them: the items with at least ``attn_core.packed_views.strided_min_work``
    query-key products times heads, the most first, up to ``STRIDED_MAX_PIECES`` pieces, as
    :func:`local_pieces`; every other item's segment m as the sequence of rows base + m * seg_stride
    + t * row_stride, t < rows, in one :class:`attn_core.strided_varlen.StridedSequences` table per
    (row stride, head-call shape). Cached per (plan, device, head dim, tile sizes, piece settings)."""
    min_work = packed_views.strided_min_work(kernel=True, backward=backward)
    settings = (min_work, packed_views.STRIDED_MAX_PIECES, packed_views.PACKED_STREAMS)
    key = (id(plan), device, head_dim, strided_varlen.FWD_BLOCK_M, strided_varlen.BWD_BLOCK, settings)
    hit = _LOCAL.get(key, lambda: (plan, _build_local(plan, device, head_dim, *settings)))
    if hit[0] is not plan:  # a dropped plan's id reused by a new one
        hit = (plan, _build_local(plan, device, head_dim, *settings))
        _LOCAL.put(key, hit)
    return hit[1]


def _item_work(it: RingItem) -> int:
    return it.count * it.rows * it.rows * len(it.heads)


def _build_local(
    plan: RingDilatedRankPlan, device: torch.device, head_dim: int, min_work: int, max_pieces: int, streams: int
) -> tuple[LocalGroup, ...]:
    by_group: dict[int, list[RingItem]] = {}
    for it in plan.items:
        by_group.setdefault(it.group, []).append(it)
    storing = storing_groups(plan.items)
    groups = []
    for g, items in by_group.items():
        pieces: list[views.Piece] = []
        on_pieces: set[int] = set()
        for i in sorted(range(len(items)), key=lambda i: -_item_work(items[i])):
            if _item_work(items[i]) < max(min_work, 1):
                break
            mine = local_pieces([items[i]], 1, head_dim, storing)
            if len(pieces) + len(mine) > max_pieces:
                break
            pieces += mine
            on_pieces.add(i)
        tables = _build_tables([it for i, it in enumerate(items) if i not in on_pieces], device)
        lanes = packed_views.piece_lanes(pieces, streams - 1 if tables else streams)
        groups.append(LocalGroup(tables, lanes, g in storing))
    return tuple(groups)


def _build_tables(items: Sequence[RingItem], device: torch.device) -> tuple[StridedSequences, ...]:
    parts: dict[tuple[int, tuple[int, int, int, int]], list[tuple[torch.Tensor, torch.Tensor, int, int]]] = {}
    for it in items:
        starts = it.base + it.seg_stride * torch.arange(it.count, dtype=torch.int64)
        rows = torch.tensor(it.rows, dtype=torch.int64)
        for q_h0, q_hs, q_hn, kv_h0, kv_hs, kv_hn in sdpa_ops.strided_head_calls(it.heads, it.kv_heads):
            shape = (it.row_stride, (q_hs, q_hn, kv_hs, kv_hn))
            parts.setdefault(shape, []).append((starts, rows, q_h0, kv_h0))
    tables = [stacked_sequences(runs, stride, heads, device) for (stride, heads), runs in parts.items()]
    return tuple(t for t in tables if t is not None)


def _remote_piece(it: RingItem) -> views.Piece:
    """The item's rows and all its query heads as one piece (a crossing segment: one segment, all batch
    rows); its kv heads are unused: the received keys come gathered (:func:`remote_kv`)."""
    h0, hs, hn = _head_run(it)
    return views.Piece(
        it.group, it.base, it.count, it.seg_stride, it.rows, it.row_stride, None, h0, hs, hn, h0, hs, hn, False
    )


def forward_views(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    local_mask: torch.Tensor | None,
    global_mask: torch.Tensor | None,
    recv: torch.Tensor | None,
    acc: tuple[torch.Tensor, torch.Tensor],
    call: RingDilatedCall,
) -> None:
    """View path, one phase (recv None: local keys; else remote keys), merged into acc = (out
    (B, n, H, D) in q's dtype, merged in fp32 arithmetic; lse (B, n, H) fp32, fp64 for fp64)."""
    B, D = q.shape[0], q.shape[-1]
    out, lse = acc
    lse_bhn = lse.transpose(1, 2)
    if recv is None:
        if local_mask is not None:  # padded keys' values are never read (the -inf bias masks logits only)
            k, v = drop_padded_keys(k, v, local_mask)
        if call.local is not None:  # B == 1
            mask = None if local_mask is None else local_mask[0]

            def tables_forward(tables: tuple[StridedSequences, ...], first: bool) -> None:
                for table in tables:
                    strided_varlen.forward_(
                        q[0], k[0], v[0], table, out[0], lse[0],
                        key_padding_mask=mask, is_causal=call.causal, scale=call.scale, first=first,
                    )  # fmt: skip

            pieces_forward = functools.partial(
                views.forward_pieces, q, k, v, out=out, lse=lse_bhn,
                key_padding_mask=local_mask, is_causal=call.causal, scale=call.scale,
            )  # fmt: skip
            for group in call.local:  # in order: two groups may merge into the same rows
                work: list[Callable[[], None]] = (
                    [functools.partial(tables_forward, group.tables, group.first)] if group.tables else []
                )
                work += [functools.partial(pieces_forward, pieces=lane) for lane in group.lanes]
                side_streams.fork_join(work, q.device, packed_views.PACKED_STREAMS)
            return
        pieces = local_pieces(call.plan.items, B, D, storing_groups(call.plan.items))
        views.forward_pieces(
            q, k, v, pieces, out, lse_bhn, key_padding_mask=local_mask, is_causal=call.causal, scale=call.scale
        )
        return
    for i, it in enumerate(call.plan.items):
        if not it.remote:
            continue
        # remote keys: attn_core.blocks (cuDNN BlockImpl on CUDA without padding, math path otherwise)
        p = _remote_piece(it)
        kr, vr, mr = remote_kv(recv, global_mask, call.plan, i, it, q.device)
        qv = views.piece_view(q, p, p.q_h0, p.q_hs, p.q_hn).transpose(1, 2)  # (B, T, h, D)
        o, l = block_forward(qv, kr, vr, is_causal=False, softmax_scale=call.scale, key_padding_mask=mr)
        o_acc = views.piece_view(out, p, p.q_h0, p.q_hs, p.q_hn)
        sdpa_ops.merge_views_(o_acc, views.piece_lse_view(lse_bhn, p), o.transpose(1, 2), l)


def backward_views(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    local_mask: torch.Tensor | None,
    global_mask: torch.Tensor | None,
    recv: torch.Tensor | None,
    grads: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
    call: RingDilatedCall,
) -> None:
    """View path, one phase: add every call's gradients (computed with the final out and lse)
    into strided views of the gradient buffers."""
    B, D = q.shape[0], q.shape[-1]
    dq, dk, dv, drecv = grads
    lse_bhn = lse.transpose(1, 2)
    if recv is None:
        if local_mask is not None:  # as in forward_views; the kernels give dk = dv = 0 at padded keys
            k, v = drop_padded_keys(k, v, local_mask)
        if call.local_backward is not None:
            mask = None if local_mask is None else local_mask[0]
            delta = strided_varlen.row_delta(dout[0], out[0])

            def tables_backward(tables: tuple[StridedSequences, ...]) -> None:
                for table in tables:
                    strided_varlen.backward_(
                        dout[0], q[0], k[0], v[0], lse[0], delta, table, (dq[0], dk[0], dv[0]),
                        key_padding_mask=mask, is_causal=call.causal, scale=call.scale,
                    )  # fmt: skip

            pieces_backward = functools.partial(
                views.backward_pieces, dout, q, k, v, out, lse_bhn, grads=(dq, dk, dv),
                key_padding_mask=local_mask, is_causal=call.causal, scale=call.scale,
            )  # fmt: skip
            for group in call.local_backward:  # in order: two groups may add into the same gradient rows
                work: list[Callable[[], None]] = (
                    [functools.partial(tables_backward, group.tables)] if group.tables else []
                )
                work += [functools.partial(pieces_backward, pieces=lane) for lane in group.lanes]
                side_streams.fork_join(work, q.device, packed_views.PACKED_STREAMS)
            return
        pieces = local_pieces(call.plan.items, B, D)
        views.backward_pieces(
            dout, q, k, v, out, lse_bhn, pieces, (dq, dk, dv),
            key_padding_mask=local_mask, is_causal=call.causal, scale=call.scale,
        )  # fmt: skip
        return
    for i, it in enumerate(call.plan.items):
        if not it.remote:
            continue
        p = _remote_piece(it)
        hv = (p.q_h0, p.q_hs, p.q_hn)
        kr, vr, mr = remote_kv(recv, global_mask, call.plan, i, it, q.device)
        dq_c, dk_c, dv_c = block_backward(
            views.piece_view(dout, p, *hv).transpose(1, 2),
            views.piece_view(q, p, *hv).transpose(1, 2),
            kr,
            vr,
            views.piece_view(out, p, *hv).transpose(1, 2),
            views.piece_lse_view(lse_bhn, p),
            is_causal=False,
            softmax_scale=call.scale,
            key_padding_mask=mr,
        )
        views.piece_view(dq, p, *hv).add_(dq_c.transpose(1, 2))
        ridx = call.plan.remote_index[i].to(q.device).reshape(-1)
        drecv[0].index_add_(1, ridx, dk_c.reshape(B, -1, D).to(drecv.dtype))
        drecv[1].index_add_(1, ridx, dv_c.reshape(B, -1, D).to(drecv.dtype))


def remote_kv(
    recv: torch.Tensor,
    global_mask: torch.Tensor | None,
    plan: RingDilatedRankPlan,
    i: int,
    it: RingItem,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The received K, V rows of item i as (B, Tk, h, D) each, and their padding mask (B, Tk)."""
    idx = plan.remote_index[i].to(device)
    Tk, h = idx.shape
    B, D = recv.shape[1], recv.shape[-1]
    kv = recv.index_select(2, idx.reshape(-1)).reshape(2, B, Tk, h, D)
    mask = None if global_mask is None else global_mask[:, plan.remote_pos[i].to(device)]
    return kv[0], kv[1], mask
