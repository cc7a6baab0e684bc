"""Ring dilated attention: LongNet dilated attention over a sequence sharded across ranks.

Each rank of ``group`` (W ranks) holds a contiguous shard of n = N / W tokens: rank b holds the
global positions [b*n, (b+1)*n). The result on every rank equals
``attn_core.dilated_attention`` on the gathered sequence, sharded the same way, with exact
gradients.

Algorithm (see docs/ring_dilated.md for the derivation of the communicated bytes):

- Geometry is global: group g = (w, r) cuts the *global* sequence into segments [s*w, (s+1)*w);
  head j selects positions p with p mod r == j mod r. A rank's work for group g is a list of
  *items*, one per (segment run, offset o): the rank's own selected rows of that segment are the
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

Kernels: the *view path* (every CPU call; bf16/fp16 CUDA calls that cuDNN takes) reads an item's
rows in place as strided views through :mod:`attn_core.sdpa_ops` (no copies of q, k, v; native
GQA when the kv heads form a strided set) and adds gradients into strided views; the remote keys
of crossing segments go through :mod:`attn_core.blocks`. The *gather path* (other CUDA dtypes or
head dims) gathers the rows and runs :mod:`attn_core.blocks` throughout.

Shapes: q (B, n, H, D) and k, v (B, n, Hkv, D) per rank, H % Hkv == 0; key_padding_mask (B, n)
bool, True = padding. Works on gloo (CPU) and NCCL (CUDA).
"""

from __future__ import annotations

import functools
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.distributed as dist

from attn_core import sdpa_ops
from attn_core.blocks import acc_dtype, block_backward, block_forward
from attn_core.config import DilatedConfig
from attn_core.merge import merge_into_
from attn_core.validation import check_bool, check_qkv, resolve_softmax_scale

from .comm import check_timeout, config_hash, dtype_code
from .exchange import DEFAULT_TIMEOUT_S, comm_device, group_rank_and_size, handshake, is_nccl, post_exchange, wait_all

__all__ = ["RingDilatedPlan", "RingDilatedRankPlan", "plan_ring_dilated", "ring_dilated_attention"]

# Runs of local segments are processed in chunks: on the gather path one block call may
# materialise B * segments * heads * T * T logits (math path), bounded by MAX_BLOCK_LOGITS; a
# view-path call reads at most MAX_GATHER_ELEMENTS query elements (bounding its temporaries).
MAX_BLOCK_LOGITS = 1 << 26
MAX_GATHER_ELEMENTS = 1 << 28


@dataclass(frozen=True)
class _Item:
    """One unit of work: ``count`` segments x ``rows`` selected rows, for the heads sharing one offset.

    Query (and local key) rows, as local row indices: base + m * seg_stride + t * row_stride for
    m < count, t < rows. ``remote`` lists the other ranks' selected rows of the segment as
    arithmetic runs (first global position, length) with step ``row_stride``; only single
    segments (count == 1) that cross a shard boundary have any.
    """

    group: int
    heads: tuple[int, ...]
    kv_heads: tuple[int, ...]
    base: int
    count: int
    seg_stride: int
    rows: int
    row_stride: int
    remote: tuple[tuple[int, int], ...] = ()

    def remote_positions(self) -> torch.Tensor:
        """(Tk,) int64 global positions of the remote rows, ascending."""
        runs = [torch.arange(length, dtype=torch.int64) * self.row_stride + start for start, length in self.remote]
        return torch.cat(runs) if runs else torch.empty(0, dtype=torch.int64)


@dataclass(frozen=True)
class RingDilatedRankPlan:
    """What one rank computes, receives and sends.

    needed: sorted global keys p * Hkv + u of the (position, kv head) K/V rows it receives
    (exactly once each); recv_counts[a]: how many of them rank a sends; send_index[b]: local
    flat indices (row * Hkv + u) of this rank's K/V rows rank b needs, in b's receive order.
    """

    rank: int
    items: tuple[_Item, ...]
    needed: torch.Tensor
    recv_counts: tuple[int, ...]
    send_index: dict[int, torch.Tensor] = field(default_factory=dict)
    remote_index: dict[int, torch.Tensor] = field(default_factory=dict)  # item -> (Tk, h) into needed
    remote_pos: dict[int, torch.Tensor] = field(default_factory=dict)  # item -> (Tk,) global positions

    @property
    def rows_received(self) -> int:
        return int(self.needed.numel())

    @property
    def rows_sent(self) -> int:
        return sum(int(t.numel()) for t in self.send_index.values())


@dataclass(frozen=True)
class RingDilatedPlan:
    """The exchange and work plan of every rank for one (N, W, heads, config, causal) geometry."""

    seq_len: int
    world_size: int
    num_heads: int
    num_kv_heads: int
    config: DilatedConfig
    is_causal: bool
    ranks: tuple[RingDilatedRankPlan, ...]

    @property
    def shard_len(self) -> int:
        return self.seq_len // self.world_size

    def communicating_segments(self, rank: int) -> list[tuple[int, int]]:
        """(group, segment index) pairs for which ``rank`` receives rows from other ranks."""
        n = self.shard_len
        out = set()
        for it in self.ranks[rank].items:
            if it.remote:
                w = self.config.segment_lengths[it.group]
                out.add((it.group, (rank * n + it.base) // w))
        return sorted(out)

    def bytes_received(self, rank: int, *, batch: int, head_dim: int, element_size: int) -> int:
        """Forward K/V payload bytes ``rank`` receives: rows x 2 (K and V) x B x D x element size."""
        return self.ranks[rank].rows_received * 2 * batch * head_dim * element_size

    def bytes_sent(self, rank: int, *, batch: int, head_dim: int, element_size: int) -> int:
        return self.ranks[rank].rows_sent * 2 * batch * head_dim * element_size


def _rank_items(
    seq_len: int, world: int, rank: int, cfg: DilatedConfig, num_heads: int, num_kv_heads: int, causal: bool
) -> list[_Item]:
    n = seq_len // world
    lo, hi = rank * n, (rank + 1) * n
    per_kv = num_heads // num_kv_heads
    items: list[_Item] = []
    for g, (w, r) in enumerate(zip(cfg.segment_lengths, cfg.dilation_rates)):
        by_offset: dict[int, list[int]] = {}
        for j in cfg.heads_for_group(g, num_heads):
            by_offset.setdefault(cfg.head_offset(g, j), []).append(j)
        if not by_offset:
            continue
        # Segments wholly inside [lo, hi) and of full length: one strided run, no communication.
        full_a, full_b = -(-lo // w), hi // w
        others = [s for s in range(lo // w, (hi - 1) // w + 1) if not full_a <= s < full_b]
        for o, heads in sorted(by_offset.items()):
            kv = tuple(j // per_kv for j in heads)
            if full_b > full_a:
                items.append(_Item(g, tuple(heads), kv, full_a * w - lo + o, full_b - full_a, w, w // r, r))
            for s in others:
                seg_lo, seg_hi = s * w, min((s + 1) * w, seq_len)
                mine_lo, mine_hi = max(seg_lo, lo), min(seg_hi, hi)
                first = mine_lo + (o - mine_lo) % r  # segment starts are multiples of r (w % r == 0)
                if first >= mine_hi:
                    continue  # this offset selects none of our rows of the segment
                count = (mine_hi - 1 - first) // r + 1
                remote = []
                if seg_lo + o < mine_lo:  # earlier ranks' rows of the segment
                    remote.append((seg_lo + o, (mine_lo - 1 - seg_lo - o) // r + 1))
                after = mine_hi + (o - mine_hi) % r
                if not causal and after < seg_hi:  # later ranks' rows: invisible under causal masking
                    remote.append((after, (seg_hi - 1 - after) // r + 1))
                items.append(_Item(g, tuple(heads), kv, first - lo, 1, w, count, r, tuple(remote)))
    return items


@functools.lru_cache(maxsize=32)  # lru_cache is thread-safe; keyed on the whole geometry
def _plan_cached(
    seq_len: int,
    world: int,
    num_heads: int,
    num_kv_heads: int,
    segment_lengths: tuple[int, ...],
    dilation_rates: tuple[int, ...],
    head_mode: str,
    causal: bool,
) -> RingDilatedPlan:
    cfg = DilatedConfig(segment_lengths, dilation_rates, head_mode)
    n = seq_len // world
    per_rank_items = [_rank_items(seq_len, world, b, cfg, num_heads, num_kv_heads, causal) for b in range(world)]
    needed_all: list[torch.Tensor] = []
    remote_idx_all: list[dict[int, torch.Tensor]] = []
    remote_pos_all: list[dict[int, torch.Tensor]] = []
    for items in per_rank_items:
        keys: list[torch.Tensor] = []
        pos_of: dict[int, torch.Tensor] = {}
        for i, it in enumerate(items):
            if it.remote:
                pos = it.remote_positions()
                pos_of[i] = pos
                keys.append((pos[:, None] * num_kv_heads + torch.tensor(it.kv_heads)[None, :]).reshape(-1))
        # The union over groups, offsets and heads: a row two groups need travels once.
        needed = torch.unique(torch.cat(keys)) if keys else torch.empty(0, dtype=torch.int64)
        idx_of = {
            i: torch.searchsorted(needed, pos[:, None] * num_kv_heads + torch.tensor(items[i].kv_heads)[None, :])
            for i, pos in pos_of.items()
        }
        needed_all.append(needed)
        remote_idx_all.append(idx_of)
        remote_pos_all.append(pos_of)
    ranks = []
    block = n * num_kv_heads
    for b in range(world):
        owners = torch.div(needed_all[b], block, rounding_mode="floor")
        recv_counts = tuple(int((owners == a).sum()) for a in range(world))
        send_index = {}
        for dst in range(world):
            if dst == b:
                continue
            theirs = needed_all[dst]
            mine = theirs[torch.div(theirs, block, rounding_mode="floor") == b] - b * block
            if mine.numel():
                send_index[dst] = mine
        ranks.append(
            RingDilatedRankPlan(
                b,
                tuple(per_rank_items[b]),
                needed_all[b],
                recv_counts,
                send_index,
                remote_idx_all[b],
                remote_pos_all[b],
            )
        )
    return RingDilatedPlan(seq_len, world, num_heads, num_kv_heads, cfg, causal, tuple(ranks))


def plan_ring_dilated(
    seq_len: int,
    world_size: int,
    num_heads: int,
    num_kv_heads: int,
    segment_lengths: Sequence[int],
    dilation_rates: Sequence[int],
    *,
    is_causal: bool = False,
    head_mode: str = "all",
) -> RingDilatedPlan:
    """The work and exchange plan of every rank (pure geometry: no process group needed).

    Raises ValueError for a sequence length not divisible by the world size, or invalid
    heads / configuration.
    """
    for name, val in (
        ("seq_len", seq_len),
        ("world_size", world_size),
        ("num_heads", num_heads),
        ("num_kv_heads", num_kv_heads),
    ):
        if isinstance(val, bool) or not isinstance(val, int):
            raise TypeError(f"{name} must be an int, got {val!r}")
        if val <= 0:
            raise ValueError(f"{name} must be positive, got {val}")
    if seq_len % world_size != 0:
        raise ValueError(
            f"sequence length {seq_len} must be divisible by the world size {world_size} (contiguous equal shards)"
        )
    if num_heads % num_kv_heads != 0:
        raise ValueError(f"num_heads={num_heads} must be a multiple of num_kv_heads={num_kv_heads} (GQA)")
    cfg = DilatedConfig(segment_lengths, dilation_rates, head_mode)
    return _plan_cached(
        seq_len,
        world_size,
        num_heads,
        num_kv_heads,
        cfg.segment_lengths,
        cfg.dilation_rates,
        cfg.head_mode,
        check_bool("is_causal", is_causal),
    )


# ---------------------------------------------------------------------------------------------
# Index helpers: every gather/scatter goes through flat (row * heads + head) indices.


def _item_chunks(item: _Item, batch: int, head_dim: int, by_rows: bool) -> list[tuple[int, int]]:
    """Segment ranges [m0, m1) of the item per kernel call: by_rows bounds the query elements a call
    reads (fused kernels); otherwise the logits the math path materialises."""
    if by_rows:
        step = MAX_GATHER_ELEMENTS // max(batch * len(item.heads) * item.rows * head_dim, 1)
    else:
        step = MAX_BLOCK_LOGITS // max(batch * len(item.heads) * item.rows * item.rows, 1)
    step = max(step, 1)
    return [(m, min(m + step, item.count)) for m in range(0, item.count, step)]


def _view_path_available(q: torch.Tensor) -> bool:
    """Whether attn_core.sdpa_ops takes this device, dtype and head dim (it reads strided views in place)."""
    if q.device.type == "cuda":
        try:
            import triton  # noqa: F401  (the fused merge on strided views)
        except ImportError:
            return False
    return not sdpa_ops.unsupported_reasons(q.device, q.dtype, q.shape[-1])


def _rows(item: _Item, m0: int, m1: int, device: torch.device) -> torch.Tensor:
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


@dataclass
class _Call:
    plan: RingDilatedRankPlan
    world: int
    views: bool  # the view path (attn_core.sdpa_ops on strided views) takes this call
    group: Any
    scale: float
    causal: bool
    num_kv_heads: int
    timeout_s: float


def _post_kv(k: torch.Tensor, v: torch.Tensor, call: _Call) -> tuple[list[Any], dict[int, torch.Tensor]]:
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


def _finish_kv(pending: tuple[list[Any], dict[int, torch.Tensor]], k: torch.Tensor, call: _Call) -> torch.Tensor:
    """Wait for the exchange; the received rows (2, B, R, D) in ``needed`` order."""
    works, recvs = pending
    wait_all(works, call.timeout_s, f"ring dilated K/V exchange of rank {dist.get_rank(call.group)}",
             stream_only=is_nccl(call.group))  # fmt: skip
    B, D = k.shape[0], k.shape[-1]
    if not recvs:
        return torch.empty(2, B, 0, D, dtype=k.dtype, device=k.device)
    return torch.cat([recvs[a] for a in sorted(recvs)], dim=2).to(k.device)


def _post_kv_grads(drecv: torch.Tensor, dk: torch.Tensor, call: _Call) -> tuple[list[Any], dict[int, torch.Tensor]]:
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
    pending: tuple[list[Any], dict[int, torch.Tensor]], dk: torch.Tensor, dv: torch.Tensor, call: _Call
) -> None:
    """Wait for the reverse exchange and add the returned gradients into dk, dv (B, n*Hkv, D)."""
    works, recvs = pending
    wait_all(works, call.timeout_s, f"ring dilated dK/dV exchange of rank {dist.get_rank(call.group)}",
             stream_only=is_nccl(call.group))  # fmt: skip
    for b, buf in recvs.items():
        i = call.plan.send_index[b].to(dk.device)
        dk.index_add_(1, i, buf[0].to(dk.device))
        dv.index_add_(1, i, buf[1].to(dk.device))


def _forward_gather(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    local_mask: torch.Tensor | None,
    global_mask: torch.Tensor | None,
    recv: torch.Tensor | None,
    acc: tuple[torch.Tensor, torch.Tensor],
    call: _Call,
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
        for m0, m1 in _item_chunks(it, B, D, False):
            rows = _rows(it, m0, m1, q.device)
            qf = _flat(rows, it.heads, H)
            qi = _take(q, qf)
            if recv is None:
                kvf = _flat(rows, it.kv_heads, call.num_kv_heads)
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
                kr, vr, mr = _remote_kv(recv, global_mask, plan, i, it, q.device)
                o, l = block_forward(qi, kr, vr, is_causal=False, softmax_scale=call.scale, key_padding_mask=mr)
            # Each (position, head) is in one item per group: merging items straight into the
            # accumulators is the LSE merge of the groups.
            o_acc, l_acc = _take(out, qf), _lse_take(lse, qf)
            merge_into_(o_acc, l_acc, o, l)
            Mc, h = m1 - m0, len(it.heads)
            out_flat.index_copy_(1, qf.reshape(-1), o_acc.reshape(B, -1, D))
            lse_flat.index_copy_(1, qf.reshape(-1), l_acc.reshape(B, Mc, h, it.rows).transpose(2, 3).reshape(B, -1))


def _backward_gather(
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
    call: _Call,
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
        for m0, m1 in _item_chunks(it, B, D, False):
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
                kr, vr, mr = _remote_kv(recv, global_mask, plan, i, it, q.device)
                dq2, dk2, dv2 = block_backward(
                    doi, qi, kr, vr, oi, li, is_causal=False, softmax_scale=call.scale, key_padding_mask=mr
                )
                dq.index_add_(1, qf.reshape(-1), dq2.reshape(B, -1, D).to(dq.dtype))
                ridx = plan.remote_index[i].to(q.device).reshape(-1)
                drecv[0].index_add_(1, ridx, dk2.reshape(B, -1, D).to(drecv.dtype))
                drecv[1].index_add_(1, ridx, dv2.reshape(B, -1, D).to(drecv.dtype))


# ---------------------------------------------------------------------------------------------
# View path: the item's rows are read in place through strides (no gathered copies) by
# attn_core.sdpa_ops (cuDNN on CUDA, the CPU flash kernel on CPU); results merge into strided
# views of the accumulators and gradients are added straight into strided views.


def _kv_calls(heads: tuple[int, ...], kv_heads: tuple[int, ...]) -> list[tuple[int, int, int, int, int, int]]:
    """Kernel calls (q_h0, q_hs, q_hn, kv_h0, kv_hs, kv_hn) of an item's heads: see sdpa_ops.strided_head_calls."""
    return sdpa_ops.strided_head_calls(heads, kv_heads)


def _view_calls(item: _Item, batch: int, head_dim: int) -> list[tuple[_Item, int | None]]:
    """(run of segments, batch row) of each kernel call: runs are cut so a call reads at most
    MAX_GATHER_ELEMENTS query elements (bounding its out / dq, dk, dv temporaries); batch row
    None folds batch and segments into one strided dim (one batch row, or one segment)."""
    fold = batch == 1 or item.count == 1
    calls: list[tuple[_Item, int | None]] = []
    for m0, m1 in _item_chunks(item, batch if fold else 1, head_dim, True):
        run = replace(item, base=item.base + m0 * item.seg_stride, count=m1 - m0)
        calls.extend((run, b) for b in ([None] if fold else range(batch)))
    return calls


def _view(x: torch.Tensor, it: _Item, b: int | None, h0: int, hs: int, hn: int) -> torch.Tensor:
    """Strided view (batch', hn, rows, D) of x (B, n, Hx, D) at the item's rows and heads h0 + i*hs.

    x may also be (B, n, Hx) (LSE buffers, masks as (B, n, 1)): the view is then (batch', hn, rows).
    """
    squeeze = x.dim() == 3
    x4 = x.unsqueeze(-1) if squeeze else x
    B, D = x4.shape[0], x4.shape[-1]
    sB, sN, sH, sD = x4.stride()
    offset = x4.storage_offset() + it.base * sN + h0 * sH
    if b is None:
        size0, stride0 = (B, sB) if it.count == 1 else (it.count, it.seg_stride * sN)
    else:
        size0, stride0 = it.count, it.seg_stride * sN
        offset += b * sB
    view = x4.as_strided((size0, hn, it.rows, D), (stride0, hs * sH, it.row_stride * sN, sD), offset)
    return view[..., 0] if squeeze else view


def _forward_views(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    local_mask: torch.Tensor | None,
    global_mask: torch.Tensor | None,
    recv: torch.Tensor | None,
    acc: tuple[torch.Tensor, torch.Tensor],
    call: _Call,
) -> None:
    """View path, one phase (recv None: local keys; else remote keys), merged into acc = (out
    (B, n, H, D) in q's dtype, merged in fp32 arithmetic; lse (B, n, H) fp32, fp64 for fp64)."""
    from attn_core import sdpa_ops

    B, D = q.shape[0], q.shape[-1]
    out, lse = acc
    mask3 = None if local_mask is None else local_mask.unsqueeze(-1)
    for i, whole in enumerate(call.plan.items):
        if recv is not None and not whole.remote:
            continue
        h, hstep = len(whole.heads), (whole.heads[1] - whole.heads[0] if len(whole.heads) > 1 else 1)
        for it, b in _view_calls(whole, B, D):
            if recv is not None:  # single segment, b is None: all batch rows
                # remote keys: attn_core.blocks (cuDNN BlockImpl on CUDA without padding, math path otherwise)
                kr, vr, mr = _remote_kv(recv, global_mask, call.plan, i, it, q.device)
                qv = _view(q, it, b, it.heads[0], hstep, h).transpose(1, 2)  # (B, T, h, D)
                o, l = block_forward(qv, kr, vr, is_causal=False, softmax_scale=call.scale, key_padding_mask=mr)
                o_acc, l_acc = _view(out, it, b, it.heads[0], hstep, h), _view(lse, it, b, it.heads[0], hstep, h)
                sdpa_ops.merge_views_(o_acc, l_acc, o.transpose(1, 2), l)
                continue
            bias = None if mask3 is None else sdpa_ops.key_bias_from_mask(_view(mask3, it, b, 0, 1, 1)[:, 0], q.dtype)
            for qh0, qhs, qhn, kh0, khs, khn in _kv_calls(it.heads, it.kv_heads):
                o, l = sdpa_ops.attention_forward(
                    _view(q, it, b, qh0, qhs, qhn),
                    _view(k, it, b, kh0, khs, khn),
                    _view(v, it, b, kh0, khs, khn),
                    is_causal=call.causal,
                    scale=call.scale,
                    key_bias=bias,
                )
                sdpa_ops.merge_views_(_view(out, it, b, qh0, qhs, qhn), _view(lse, it, b, qh0, qhs, qhn), o, l)


def _backward_views(
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
    call: _Call,
) -> None:
    """View path, one phase: add every call's gradients (computed with the final out and lse)
    into strided views of the gradient buffers."""
    from attn_core import sdpa_ops

    B, D = q.shape[0], q.shape[-1]
    dq, dk, dv, drecv = grads
    mask3 = None if local_mask is None else local_mask.unsqueeze(-1)
    for i, whole in enumerate(call.plan.items):
        if recv is not None and not whole.remote:
            continue
        h, hstep = len(whole.heads), (whole.heads[1] - whole.heads[0] if len(whole.heads) > 1 else 1)
        for it, b in _view_calls(whole, B, D):
            if recv is not None:
                kr, vr, mr = _remote_kv(recv, global_mask, call.plan, i, it, q.device)
                hv = (it.heads[0], hstep, h)
                dq_c, dk_c, dv_c = block_backward(
                    _view(dout, it, b, *hv).transpose(1, 2),
                    _view(q, it, b, *hv).transpose(1, 2),
                    kr,
                    vr,
                    _view(out, it, b, *hv).transpose(1, 2),
                    _view(lse, it, b, *hv),
                    is_causal=False,
                    softmax_scale=call.scale,
                    key_padding_mask=mr,
                )
                _view(dq, it, b, *hv).add_(dq_c.transpose(1, 2))
                ridx = call.plan.remote_index[i].to(q.device).reshape(-1)
                drecv[0].index_add_(1, ridx, dk_c.reshape(B, -1, D).to(drecv.dtype))
                drecv[1].index_add_(1, ridx, dv_c.reshape(B, -1, D).to(drecv.dtype))
                continue
            bias = None if mask3 is None else sdpa_ops.key_bias_from_mask(_view(mask3, it, b, 0, 1, 1)[:, 0], q.dtype)
            for qh0, qhs, qhn, kh0, khs, khn in _kv_calls(it.heads, it.kv_heads):
                dq_c, dk_c, dv_c = sdpa_ops.attention_backward(
                    _view(dout, it, b, qh0, qhs, qhn),
                    _view(q, it, b, qh0, qhs, qhn),
                    _view(k, it, b, kh0, khs, khn),
                    _view(v, it, b, kh0, khs, khn),
                    _view(out, it, b, qh0, qhs, qhn),
                    _view(lse, it, b, qh0, qhs, qhn),
                    is_causal=call.causal,
                    scale=call.scale,
                    key_bias=bias,
                )
                _view(dq, it, b, qh0, qhs, qhn).add_(dq_c)
                _view(dk, it, b, kh0, khs, khn).add_(dk_c)
                _view(dv, it, b, kh0, khs, khn).add_(dv_c)


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
        call: _Call,
    ) -> torch.Tensor:
        B, n, H, D = q.shape
        pending = _post_kv(k, v, call)
        path = _forward_views if call.views else _forward_gather
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
        call: _Call = ctx.call
        ad = acc_dtype(q.dtype)
        grads = (
            torch.zeros(q.shape, dtype=ad, device=q.device),
            torch.zeros(k.shape, dtype=ad, device=q.device),
            torch.zeros(v.shape, dtype=ad, device=q.device),
            torch.zeros(recv.shape, dtype=ad, device=q.device),
        )
        dq, dk, dv, drecv = grads
        B, n, Hkv, D = k.shape
        path = _backward_views if call.views else _backward_gather
        dout = dout.contiguous()
        if recv.shape[2] > 0:
            path(dout, q, k, v, out, lse, local_mask, global_mask, recv, grads, call)
        pending = _post_kv_grads(drecv, dk.view(B, n * Hkv, D), call)
        path(dout, q, k, v, out, lse, local_mask, global_mask, None, grads, call)  # overlaps the return
        _finish_kv_grads(pending, dk.view(B, n * Hkv, D), dv.view(B, n * Hkv, D), call)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None


def _remote_kv(
    recv: torch.Tensor,
    global_mask: torch.Tensor | None,
    plan: RingDilatedRankPlan,
    i: int,
    it: _Item,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The received K, V rows of item i as (B, Tk, h, D) each, and their padding mask (B, Tk)."""
    idx = plan.remote_index[i].to(device)
    Tk, h = idx.shape
    B, D = recv.shape[1], recv.shape[-1]
    kv = recv.index_select(2, idx.reshape(-1)).reshape(2, B, Tk, h, D)
    mask = None if global_mask is None else global_mask[:, plan.remote_pos[i].to(device)]
    return kv[0], kv[1], mask


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
    call = _Call(
        plan.ranks[rank],
        world,
        _view_path_available(q),
        group,
        scale,
        causal,
        Hkv,
        float(timeout_s),
    )
    out: torch.Tensor = _RingDilatedFunction.apply(q, k, v, key_padding_mask, global_mask, call)
    return out
