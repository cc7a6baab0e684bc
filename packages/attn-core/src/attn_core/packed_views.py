"""Dilated attention over packed documents (cu_seqlens): the planner and executor of the sdpa backend.

The contract: the result equals dilated attention run on each document alone, concatenated, so
segments start at each document's start and a document's last segment may be short. Per group
g = (w, r) (clamped to N, :meth:`attn_core.config.DilatedConfig.group_extent`, in order of
increasing rate as in :func:`attn_core.views.plan_pieces`) and per offset o with the strided head
runs that share it (:func:`attn_core.views.head_calls`), segment s of document i contributes the
rows c[i] + s*w + o + t*r inside it. Those rows take one of two routes:

* **strided**: the full segments of a long document are one :class:`attn_core.views.Piece`
  (start c[i] + o, stride w) run by :func:`attn_core.views.forward_pieces` / ``backward_pieces``:
  the fused kernels on strided views, no copies. A document takes it when its full segments give
  a call of at least :func:`strided_min_work` query-key products per head run, and at most
  :data:`STRIDED_MAX_PIECES` pieces per group go this way (the documents with the most full
  segments first), so the number of calls is bounded however many documents there are.
* **kernel** (:func:`uses_strided_kernel`: CUDA fp16/bf16 with Triton, or the CPU interpreter):
  every other segment (short documents, last partial segments, full segments of short documents)
  of every offset, as sequences of rows c[i] + s*w + o + t*r in one
  :class:`attn_core.strided_varlen.StridedSequences` table per group and head-call shape: the
  kernels read those rows in place and store or LSE-merge out and LSE there, and the backward
  adds dq, dk, dv there (one forward and two backward launches per table, no copies);
* **gathered** (where the kernels cannot run): those segments of an (offset, head run): their
  rows in one ``index_select`` into a packed (rows, heads, D) tensor and one
  :func:`attn_core.varlen.varlen_forward` call over all those segments (flash on CUDA, the
  bucketed path elsewhere), the result stored with ``index_copy_`` or LSE-merged in place at
  those rows (:func:`attn_core.sdpa_ops.merge_views_` with ``rows``). When the segments are short on average (below the flash path's
  :data:`attn_core.varlen_impls.flash.MIN_MEAN_SEQLEN` rows) the long and the short ones are two
  calls, so the long ones keep the fused kernel. For r == 1 with every position gathered, the
  rows are the packed tensors themselves (no gather).

Geometry is computed vectorised over documents and segments (:func:`attn_core.packing.document_segments`,
:func:`attn_core.packing.strided_rows`) on the host from the offsets read once; plans are cached
(:data:`PLAN_CACHE_SIZE`) per (offsets, shape, config, device): a step's forward and backward and
every layer share one per direction. The backward runs its plan's pieces and calls with the merged
out and LSE (exact: the contract of :mod:`attn_core.varlen` and :mod:`attn_core.sdpa_ops`; the
forward's pieces may be fewer, :func:`strided_min_work`) and adds the gradients into strided views
(``add_``) or at the gathered rows (``index_add_``).

LSE layout as in :mod:`attn_core.views`: (B, H, N) views of (B, N, H) storage.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from . import sdpa_ops, side_streams, strided_varlen, varlen, views
from .config import DilatedConfig
from .packing import document_segments, host_offsets, host_to_device, offsets_from_key, strided_rows
from .strided_varlen import StridedSequences, stacked_sequences
from .varlen_impls.flash import MIN_MEAN_SEQLEN
from .views import Piece

__all__ = [
    "PACKED_STREAMS",
    "PLAN_CACHE_SIZE",
    "STRIDED_MAX_PIECES",
    "STRIDED_MIN_WORK",
    "STRIDED_MIN_WORK_KERNEL_FORWARD",
    "GatheredCall",
    "GroupPlan",
    "backward_packed",
    "forward_packed",
    "plan_packed",
    "segment_route",
    "strided_min_work",
    "uses_strided_kernel",
]

# A document's full segments run as a strided piece when the piece has at least this many
# query-key products times heads (one 2048-row segment with 8 heads): smaller pieces cost about
# as much host time as kernel time and are gathered into the group's varlen call instead.
STRIDED_MIN_WORK = 1 << 25
# The same threshold for the forward on the strided-rows kernels (:func:`uses_strided_kernel`):
# their forward runs a pair about as fast as cuDNN's, while a piece costs ~0.2 ms of host time,
# so with 1 << 25 a packed forward waits on the host (the backward, where cuDNN is faster and
# the kernels leave host time to spare, keeps STRIDED_MIN_WORK). Both directions use the final
# out and LSE, so their pieces need not match. (docs/benchmarks/packed_pieces_h100.md)
STRIDED_MIN_WORK_KERNEL_FORWARD = 1 << 27
# At most this many strided pieces per group: each costs ~0.1-0.2 ms of host time per pass, which must
# stay below the kernel time it overlaps (the gathered calls cost a fixed few per group).
STRIDED_MAX_PIECES = 16
# One group's work runs on up to this many CUDA streams (:func:`attn_core.side_streams.fork_join`):
# the kernel tables or gathered calls on one, the strided pieces spread over the others by
# document (they touch disjoint (position, head) sets). A piece of one short document on one or
# two heads fills a few SMs; beside others and beside the tables it does not idle the rest.
# 1: everything in order on the current stream.
PACKED_STREAMS = 4
# Plans kept (a forward and a backward per (offsets, shape, config, device)); each holds index
# tensors on the device.
PLAN_CACHE_SIZE = 8


@dataclass(frozen=True)
class GatheredCall:
    """One varlen call: the query heads q_h0 + i*q_hs (i < q_hn) and kv heads kv_h0 + j*kv_hs
    (j < kv_hn) at ``rows`` (int64 (R,) packed positions on the device; None: every position in
    order), sequences given by ``cu_seqlens`` (int32 (S + 1,); on the CPU for calls the bucketed
    path takes) of at most ``max_seqlen`` rows. ``first``: no earlier group touches these heads."""

    q_h0: int
    q_hs: int
    q_hn: int
    kv_h0: int
    kv_hs: int
    kv_hn: int
    rows: torch.Tensor | None
    cu_seqlens: torch.Tensor
    max_seqlen: int
    first: bool


@dataclass(frozen=True)
class GroupPlan:
    """One group's strided pieces and the rest as gathered calls or kernel sequences (disjoint
    (position, head) sets; a plan has calls or sequences, see :func:`plan_packed`).

    ``lanes``: the pieces split into sets that can run concurrently with each other and with the
    calls or sequences (the pieces of one document and offset, which share rows, in one lane).
    """

    pieces: tuple[Piece, ...]
    calls: tuple[GatheredCall, ...]
    sequences: tuple[StridedSequences, ...]
    first: bool  # no earlier group touches this group's heads: its results are stored, not merged
    lanes: tuple[tuple[Piece, ...], ...]


def uses_strided_kernel(q: torch.Tensor) -> bool:
    """Whether segments off the strided pieces run on :mod:`attn_core.strided_varlen`'s kernels
    (in place, no gathers) for q; else they run as gathered varlen calls."""
    return not strided_varlen.unsupported_reasons(q)


def segment_route(q: torch.Tensor) -> str:
    """Which route the segments off the strided pieces take for q, and why (for ``explain``)."""
    reasons = strided_varlen.unsupported_reasons(q)
    if not reasons:
        return "other segments on the strided-rows kernels (attn_core.strided_varlen)"
    return f"other segments as gathered varlen calls (the strided-rows kernels: {'; '.join(reasons)})"


def strided_min_work(*, kernel: bool, backward: bool) -> int:
    """The work (query-key products times heads) a strided piece needs: :data:`STRIDED_MIN_WORK_KERNEL_FORWARD`
    for a forward whose other segments run on the strided-rows kernels, else :data:`STRIDED_MIN_WORK`."""
    return STRIDED_MIN_WORK_KERNEL_FORWARD if kernel and not backward else STRIDED_MIN_WORK


def plan_packed(
    cu_seqlens: torch.Tensor,
    shape: tuple[int, int, int, int],
    config: DilatedConfig,
    device: torch.device,
    *,
    kernel: bool,
    backward: bool,
) -> tuple[GroupPlan, ...]:
    """Every piece and call of a packed dilated attention over q (1, N, H, D) with Hkv kv heads.

    cu_seqlens: valid int32 offsets (num_docs + 1,) (read to the host once); shape: (N, H, Hkv, D);
    kernel: the segments off the strided pieces as :class:`StridedSequences` (one per group and
    head-call shape, every offset stacked) instead of gathered calls (:func:`uses_strided_kernel`);
    backward: the plan of the backward pass (its pieces may differ, :func:`strided_min_work`).
    Groups in order of increasing rate; cached per (offsets, shape, config, device, kernel tile
    sizes, thresholds, streams).
    """
    tiles = (strided_varlen.FWD_BLOCK_M, strided_varlen.BWD_BLOCK) if kernel else None  # the tables' tile sizes
    limits = (strided_min_work(kernel=kernel, backward=backward), STRIDED_MAX_PIECES, PACKED_STREAMS)
    return _plan_packed(host_offsets(cu_seqlens), shape, config, device, tiles, *limits)


def _strided_documents(
    full: torch.Tensor, rows: int, heads: int, calls: int, min_work: int, max_pieces: int
) -> list[int]:
    """Documents (ascending) whose full segments run as strided pieces: enough work per piece,
    at most max_pieces pieces (``calls`` per document), the most full segments first."""
    # in float64: rows^2 * heads can pass int64 for lengths near 2^31
    chosen = torch.nonzero(full.double() * (float(rows) ** 2 * heads) >= max(min_work, 1)).squeeze(1)
    cap = max_pieces // max(calls, 1)
    if chosen.numel() > cap:
        chosen = chosen[torch.topk(full[chosen], cap).indices]
    return sorted(chosen.tolist())


def _sequence_classes(counts: torch.Tensor) -> list[torch.Tensor]:
    """Boolean selections of the sequences per call: all of them when their mean length suits the
    flash path, else the long ones and the short ones apart (each non-empty)."""
    if int(counts.sum()) >= MIN_MEAN_SEQLEN * counts.numel():
        return [torch.ones_like(counts, dtype=torch.bool)]
    long = counts >= MIN_MEAN_SEQLEN
    return [sel for sel in (long, ~long) if bool(sel.any())]


@functools.lru_cache(maxsize=PLAN_CACHE_SIZE)
def _plan_packed(
    offsets: bytes,
    shape: tuple[int, int, int, int],
    config: DilatedConfig,
    device: torch.device,
    tiles: tuple[int, int] | None,
    min_work: int,
    max_pieces: int,
    streams: int,
) -> tuple[GroupPlan, ...]:
    cu = offsets_from_key(offsets)
    N, H, Hkv, _ = shape
    doc_start, doc_len = cu[:-1], cu[1:] - cu[:-1]
    groups: list[GroupPlan] = []
    touched: set[int] = set()
    for g in sorted(range(config.num_groups), key=lambda g: config.dilation_rates[g]):
        # clamped to N: the same selection in every document (none is longer than N)
        w, r = config.group_extent(g, N)
        heads = config.heads_for_group(g, H)
        if len(heads) == 0:
            continue
        first = touched.isdisjoint(heads)
        touched.update(heads)
        runs = [(o, views.head_calls(q_heads, H // Hkv)) for o, q_heads in config.heads_by_offset(g, H, N)]
        n_calls = sum(len(hc) for _, hc in runs)
        mean_heads = sum(hk[2] for _, hc in runs for hk in hc) // max(n_calls, 1)
        full = doc_len // w
        strided = _strided_documents(full, w // r, mean_heads, n_calls, min_work, max_pieces)
        pieces = [
            Piece(g, int(doc_start[d]) + o, int(full[d]), w, w // r, r, 0, *hk, first)
            for o, hc in runs
            for d in strided
            for hk in hc  # the head runs of one (document, offset) read the same rows: adjacent
        ]
        docs, seg_start, seg_len = document_segments(cu, w)
        on_strided = torch.zeros(doc_len.numel(), dtype=torch.bool)
        on_strided[strided] = True
        keep = ~(on_strided[docs] & (seg_len == w))
        seg_start, seg_len = seg_start[keep], seg_len[keep]
        if tiles is not None:
            sequences = _kernel_sequences(runs, seg_start, seg_len, r, device)
            lanes = piece_lanes(pieces, streams - 1 if sequences else streams)
            groups.append(GroupPlan(tuple(pieces), (), sequences, first, lanes))
            continue
        calls: list[GatheredCall] = []
        for o, hc in runs:
            counts = torch.clamp(-(-(seg_len - o) // r), min=0)  # rows o, o + r, ... below the segment's end
            some = counts > 0
            starts, counts = seg_start[some] + o, counts[some]
            for sel in _sequence_classes(counts) if counts.numel() else []:
                c = counts[sel]
                total = int(c.sum())
                # r == 1 rows are ascending and distinct: all N of them are the positions in order
                rows = None if r == 1 and total == N else host_to_device(strided_rows(starts[sel], c, r), device)
                cu_rows = torch.zeros(c.numel() + 1, dtype=torch.int32)
                cu_rows[1:] = torch.cumsum(c, 0)
                if total >= MIN_MEAN_SEQLEN * c.numel():  # a flash-sized call reads its offsets on the device
                    cu_rows = host_to_device(cu_rows, device)
                longest = int(c.max())
                calls.extend(GatheredCall(*hk, rows, cu_rows, longest, first) for hk in hc)
        groups.append(
            GroupPlan(tuple(pieces), tuple(calls), (), first, piece_lanes(pieces, streams - 1 if calls else streams))
        )
    return tuple(groups)


def piece_lanes(pieces: Sequence[Piece], lanes: int) -> tuple[tuple[Piece, ...], ...]:
    """``pieces`` in at most max(lanes, 1) non-empty lanes of about equal work (query-key products
    times heads), pieces of one start (one document and offset: the same rows) in one lane, each
    lane in the pieces' order. Pieces of different starts in one group touch disjoint rows."""
    by_start: dict[int, list[Piece]] = {}
    for p in pieces:
        by_start.setdefault(p.start, []).append(p)
    load = [0] * max(lanes, 1)
    lane_of: dict[int, int] = {}
    for start, ps in sorted(by_start.items(), key=lambda item: -sum(_work(p) for p in item[1])):
        lane_of[start] = min(range(len(load)), key=load.__getitem__)  # the least loaded, largest first
        load[lane_of[start]] += sum(_work(p) for p in ps)
    out: list[list[Piece]] = [[] for _ in load]
    for p in pieces:
        out[lane_of[p.start]].append(p)
    return tuple(tuple(lane) for lane in out if lane)


def _work(p: Piece) -> int:
    return p.nseg * p.rows * p.rows * p.q_hn


def _kernel_sequences(
    runs: list[tuple[int, list[tuple[int, int, int, int, int, int]]]],
    seg_start: torch.Tensor,
    seg_len: torch.Tensor,
    r: int,
    device: torch.device,
) -> tuple[StridedSequences, ...]:
    """The segments (seg_start, seg_len) of every offset and head run as kernel sequences: one
    table per head-call shape (q_hs, q_hn, kv_hs, kv_hn), every offset's rows stacked in it."""
    parts: dict[tuple[int, int, int, int], list[tuple[torch.Tensor, torch.Tensor, int, int]]] = {}
    for o, hc in runs:
        counts = torch.clamp(-(-(seg_len - o) // r), min=0)  # rows o, o + r, ... below the segment's end
        for q_h0, q_hs, q_hn, kv_h0, kv_hs, kv_hn in hc:
            parts.setdefault((q_hs, q_hn, kv_hs, kv_hn), []).append((seg_start + o, counts, q_h0, kv_h0))
    tables = (stacked_sequences(items, r, heads, device) for heads, items in parts.items())
    return tuple(t for t in tables if t is not None)


def _head_view(x: torch.Tensor, h0: int, hs: int, hn: int) -> torch.Tensor:
    """x (N, Hx, ...) at heads h0 + i*hs, i < hn: a view (N, hn, ...)."""
    return x[:, h0 : h0 + (hn - 1) * hs + 1 : hs]


def _gather(x: torch.Tensor, rows: torch.Tensor | None, h0: int, hs: int, hn: int) -> torch.Tensor:
    """x (N, Hx, ...) at ``rows`` and heads h0 + i*hs: (R, hn, ...), a copy (a view for rows None)."""
    view = _head_view(x, h0, hs, hn)
    return view if rows is None else view.index_select(0, rows)


def _store(
    out: torch.Tensor,
    lse: torch.Tensor,
    rows: torch.Tensor | None,
    out_c: torch.Tensor,
    lse_c: torch.Tensor,
    first: bool,
) -> None:
    """Store (first) or LSE-merge a call's out_c (R, h, D) and lse_c (h, R) into the views out (N, h, D)
    and lse (N, h) at ``rows`` (every position for None)."""
    if first:
        if rows is None:
            out.copy_(out_c)
            lse.copy_(lse_c.t())
        else:
            out.index_copy_(0, rows, out_c)
            lse.index_copy_(0, rows, lse_c.t())
        return
    # fused on CUDA: one pass in fp32 that reads and writes the accumulators at ``rows`` in place
    sdpa_ops.merge_views_(out.transpose(0, 1)[None], lse.t()[None], out_c.transpose(0, 1)[None], lse_c[None], rows)


def _add(grad: torch.Tensor, rows: torch.Tensor | None, part: torch.Tensor) -> None:
    if rows is None:
        grad.add_(part)
    else:  # a position appears once per call: no two rows of part add into the same place
        grad.index_add_(0, rows, part)


def forward_packed(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    plan: Sequence[GroupPlan],
    out: torch.Tensor,
    lse: torch.Tensor,
    *,
    key_padding_mask: torch.Tensor | None,
    is_causal: bool,
    scale: float,
) -> None:
    """Run every group's pieces and calls, storing or LSE-merging into out and lse in place.

    q: (1, N, H, D); k, v: (1, N, Hkv, D), last dims contiguous, padded keys' rows already zero
    (:func:`attn_core.blocks.drop_padded_keys`); key_padding_mask (1, N) bool or None; out (1, N, H, D)
    in q's dtype, zeros; lse (1, H, N) -inf (:func:`attn_core.views.new_lse`). ``is_causal`` counts
    within each segment (each document's segments start at its start).
    """
    lse_rows = lse.transpose(1, 2)[0]  # (N, H)
    mask = None if key_padding_mask is None else key_padding_mask[0]

    def rest(group: GroupPlan) -> None:  # a group has sequences or calls
        for seqs in group.sequences:
            strided_varlen.forward_(
                q[0], k[0], v[0], seqs, out[0], lse_rows,
                key_padding_mask=mask, is_causal=is_causal, scale=scale, first=group.first,
            )  # fmt: skip
        for c in group.calls:
            kv_heads = (c.kv_h0, c.kv_hs, c.kv_hn)
            out_c, lse_c = varlen.varlen_forward(
                _gather(q[0], c.rows, c.q_h0, c.q_hs, c.q_hn),
                _gather(k[0], c.rows, *kv_heads),
                _gather(v[0], c.rows, *kv_heads),
                c.cu_seqlens, c.cu_seqlens, c.max_seqlen, c.max_seqlen,
                softmax_scale=scale, is_causal=is_causal, key_padding_mask=_rows_of(mask, c.rows), check_offsets=False,
            )  # fmt: skip
            _store(
                _head_view(out[0], c.q_h0, c.q_hs, c.q_hn),
                _head_view(lse_rows, c.q_h0, c.q_hs, c.q_hn),
                c.rows,
                out_c,
                lse_c,
                c.first,
            )

    pieces = functools.partial(
        views.forward_pieces, q, k, v, out=out, lse=lse,
        key_padding_mask=key_padding_mask, is_causal=is_causal, scale=scale,
    )  # fmt: skip
    for group in plan:  # one group after another: a later group merges into the earlier ones' rows
        work: list[Callable[[], None]] = [functools.partial(rest, group)] if group.sequences or group.calls else []
        work += [functools.partial(pieces, pieces=lane) for lane in group.lanes]
        side_streams.fork_join(work, q.device, PACKED_STREAMS)


def backward_packed(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    plan: Sequence[GroupPlan],
    grads: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    *,
    key_padding_mask: torch.Tensor | None,
    is_causal: bool,
    scale: float,
) -> None:
    """Add every piece's and call's (dq, dk, dv) into grads = (dq (1, N, H, D), dk, dv (1, N, Hkv, D)).

    out, lse: the rows' final output (1, N, H, D) and LSE (1, H, N); dout (1, N, H, D), last dim
    contiguous. Other arguments as in :func:`forward_packed`.
    """
    dq, dk, dv = grads
    lse_rows = lse.transpose(1, 2)[0]
    mask = None if key_padding_mask is None else key_padding_mask[0]

    def tables(group: GroupPlan, delta: torch.Tensor) -> None:
        for seqs in group.sequences:
            strided_varlen.backward_(
                dout[0], q[0], k[0], v[0], lse_rows, delta, seqs, (dq[0], dk[0], dv[0]),
                key_padding_mask=mask, is_causal=is_causal, scale=scale,
            )  # fmt: skip

    def calls(group: GroupPlan) -> None:
        for c in group.calls:
            q_heads, kv_heads = (c.q_h0, c.q_hs, c.q_hn), (c.kv_h0, c.kv_hs, c.kv_hn)
            dq_c, dk_c, dv_c = varlen.varlen_backward(
                _gather(dout[0], c.rows, *q_heads),
                _gather(q[0], c.rows, *q_heads),
                _gather(k[0], c.rows, *kv_heads),
                _gather(v[0], c.rows, *kv_heads),
                _gather(out[0], c.rows, *q_heads),
                _gather(lse_rows, c.rows, *q_heads).t(),
                c.cu_seqlens, c.cu_seqlens, c.max_seqlen, c.max_seqlen,
                softmax_scale=scale, is_causal=is_causal,
                key_padding_mask=_rows_of(mask, c.rows), check_offsets=False,
            )  # fmt: skip
            _add(_head_view(dq[0], *q_heads), c.rows, dq_c)
            _add(_head_view(dk[0], *kv_heads), c.rows, dk_c)
            _add(_head_view(dv[0], *kv_heads), c.rows, dv_c)

    pieces = functools.partial(
        views.backward_pieces, dout, q, k, v, out, lse, grads=grads,
        key_padding_mask=key_padding_mask, is_causal=is_causal, scale=scale,
    )  # fmt: skip
    delta: torch.Tensor | None = None  # rowsum(dout * out) of the final out: one for every group's sequences
    for group in plan:  # groups in order: two groups may add into the same gradient rows
        work: list[Callable[[], None]] = [functools.partial(calls, group)] if group.calls else []
        if group.sequences:
            if delta is None:  # on the current stream, before the fork
                delta = strided_varlen.row_delta(dout[0], out[0])
            work.append(functools.partial(tables, group, delta))
        work += [functools.partial(pieces, pieces=lane) for lane in group.lanes]
        side_streams.fork_join(work, q.device, PACKED_STREAMS)


def _rows_of(mask: torch.Tensor | None, rows: torch.Tensor | None) -> torch.Tensor | None:
    """The (N,) padding mask at ``rows`` (all of it for rows None)."""
    if mask is None or rows is None:
        return mask
    return mask.index_select(0, rows)
