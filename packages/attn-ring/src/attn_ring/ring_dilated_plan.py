"""Ring dilated attention's plan: which rows each rank computes, receives and sends (pure geometry).

Geometry is global: group g = (w, r) cuts the *global* sequence into segments [s*w, (s+1)*w);
head j selects positions p with p mod r == j mod r (j the global head index: a plan may cover a
range of the global heads, see ``head_base``); with packed documents (cu_seqlens) each
document is cut from its own start instead (:func:`group_segments`). A rank's work for group g is a list of
*items* (:class:`RingItem`), one per (segment run, offset o): the rank's own selected rows of
that segment are the queries, and the same rows are the local keys. Segments wholly inside the
shard form one strided run needing no communication; a segment crossing a shard boundary also
needs the selected rows of that segment held by the other ranks it spans (causal: only the
earlier ones). Every rank derives from the global geometry which (position, kv head) rows every
other rank needs, so the exchange moves exactly that union, deduplicated across groups and heads.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from attn_core.config import DilatedConfig
from attn_core.packing import document_segments, host_offsets, offsets_from_key
from attn_core.validation import check_bool, check_cu_seqlens

from .head_range import check_head_range, head_range_config

__all__ = ["RingDilatedPlan", "RingDilatedRankPlan", "RingItem", "group_segments", "plan_ring_dilated", "rank_items"]


@dataclass(frozen=True)
class RingItem:
    """One unit of work: ``count`` segments x ``rows`` selected rows, for the heads sharing one offset.

    Query (and local key) rows, as local row indices: base + m * seg_stride + t * row_stride for
    m < count, t < rows. ``remote`` lists the other ranks' selected rows of the segment as
    arithmetic runs (first global position, length) with step ``row_stride``; only single
    segments (count == 1) that cross a shard boundary have any. ``segment_start``: the global
    position where the item's (first) segment starts.
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
    segment_start: int = 0

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
    items: tuple[RingItem, ...]
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
    """The exchange and work plan of every rank for one (N, W, heads, config, causal, documents) geometry.

    cu_seqlens: the packed documents' int64 CPU offsets (num_docs + 1,), or None (unpacked).
    """

    seq_len: int
    world_size: int
    num_heads: int
    num_kv_heads: int
    config: DilatedConfig
    is_causal: bool
    ranks: tuple[RingDilatedRankPlan, ...]
    cu_seqlens: torch.Tensor | None = None

    @property
    def shard_len(self) -> int:
        return self.seq_len // self.world_size

    def communicating_segments(self, rank: int) -> list[tuple[int, int]]:
        """(group, segment start) pairs, the start a global position, of the segments for which
        ``rank`` receives rows from other ranks."""
        return sorted({(it.group, it.segment_start) for it in self.ranks[rank].items if it.remote})

    def bytes_received(self, rank: int, *, batch: int, head_dim: int, element_size: int) -> int:
        """Forward K/V payload bytes ``rank`` receives: rows x 2 (K and V) x B x D x element size."""
        return self.ranks[rank].rows_received * 2 * batch * head_dim * element_size

    def bytes_sent(self, rank: int, *, batch: int, head_dim: int, element_size: int) -> int:
        return self.ranks[rank].rows_sent * 2 * batch * head_dim * element_size


def group_segments(seq_len: int, w: int, offsets: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(starts, lengths), int64 (segments,): the segments of length w a group cuts, in order.

    Unpacked (offsets None): the regular tiling [s*w, (s+1)*w) of the sequence, the last one cut
    at N. Packed: every document's own tiling from its start (its last segment cut at its end,
    empty documents have none): :func:`attn_core.packing.document_segments`. The unpacked tiling
    is the packing of one document [0, N).
    """
    cu = torch.tensor([0, seq_len], dtype=torch.int64) if offsets is None else offsets
    _, starts, lengths = document_segments(cu, w)
    return starts, lengths


def rank_items(
    seq_len: int,
    world: int,
    rank: int,
    cfg: DilatedConfig,
    num_heads: int,
    num_kv_heads: int,
    causal: bool,
    offsets: torch.Tensor | None = None,
) -> list[RingItem]:
    """The work items of ``rank`` (see :class:`RingItem`), group by group, offsets ascending.

    Group geometry is clamped to the global length N (:meth:`DilatedConfig.group_extent`) and heads
    come grouped by offset (:meth:`DilatedConfig.heads_by_offset`), as the sdpa backend plans:
    the work follows N and the heads, never the configured w or r. offsets: int64 CPU cu_seqlens of
    packed documents (segments start at each document's start, :func:`group_segments`) or None.
    """
    n = seq_len // world
    lo, hi = rank * n, (rank + 1) * n
    per_kv = num_heads // num_kv_heads
    items: list[RingItem] = []
    for g in range(cfg.num_groups):
        w, r = cfg.group_extent(g, seq_len)
        by_offset = cfg.heads_by_offset(g, num_heads, seq_len)
        if not by_offset:
            continue
        starts, lengths = group_segments(seq_len, w, offsets)
        ends = starts + lengths
        touching = (starts < hi) & (ends > lo)
        # Full-length segments wholly inside [lo, hi): strided runs (consecutive segments w apart:
        # one run unpacked, one per document packed) with no communication.
        inside = touching & (starts >= lo) & (ends <= hi) & (lengths == w)
        run_starts, run_counts = _runs(starts[inside], w)
        others = torch.nonzero(touching & ~inside).squeeze(1)
        single_lo, single_hi = starts[others].tolist(), ends[others].tolist()
        for o, heads in by_offset:
            kv = tuple(j // per_kv for j in heads)
            for s0, cnt in zip(run_starts, run_counts):
                items.append(RingItem(g, heads, kv, s0 + o - lo, cnt, w, w // r, r, segment_start=s0))
            for seg_lo, seg_hi in zip(single_lo, single_hi):
                mine_lo, mine_hi = max(seg_lo, lo), min(seg_hi, hi)
                first = mine_lo + (seg_lo + o - mine_lo) % r  # the segment's rows are seg_lo + o + t*r
                if first >= mine_hi:
                    continue  # this offset selects none of our rows of the segment
                count = (mine_hi - 1 - first) // r + 1
                remote = []
                if seg_lo + o < mine_lo:  # earlier ranks' rows of the segment
                    remote.append((seg_lo + o, (mine_lo - 1 - seg_lo - o) // r + 1))
                after = mine_hi + (seg_lo + o - mine_hi) % r
                if not causal and after < seg_hi:  # later ranks' rows: invisible under causal masking
                    remote.append((after, (seg_hi - 1 - after) // r + 1))
                items.append(RingItem(g, heads, kv, first - lo, 1, w, count, r, tuple(remote), seg_lo))
    return items


def _runs(starts: torch.Tensor, w: int) -> tuple[list[int], list[int]]:
    """Ascending segment starts cut into runs of consecutive segments (w apart): (run starts, counts)."""
    if starts.numel() == 0:
        return [], []
    breaks = torch.ones(starts.numel(), dtype=torch.bool)
    breaks[1:] = starts[1:] != starts[:-1] + w
    first = torch.nonzero(breaks).squeeze(1)
    counts = torch.diff(first, append=torch.tensor([starts.numel()]))
    return starts[first].tolist(), counts.tolist()


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
    head_base: int,
    total_heads: int,
    offsets_key: bytes | None,
) -> RingDilatedPlan:
    offsets = None if offsets_key is None else offsets_from_key(offsets_key)
    cfg = head_range_config(
        DilatedConfig(segment_lengths, dilation_rates, head_mode), head_base, num_heads, total_heads
    )
    n = seq_len // world
    per_rank_items = [
        rank_items(seq_len, world, b, cfg, num_heads, num_kv_heads, causal, offsets) for b in range(world)
    ]
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
    return RingDilatedPlan(seq_len, world, num_heads, num_kv_heads, cfg, causal, tuple(ranks), offsets)


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
    head_base: int = 0,
    total_heads: int | None = None,
    cu_seqlens: torch.Tensor | None = None,
) -> RingDilatedPlan:
    """The work and exchange plan of every rank (pure geometry: no process group needed).

    The num_heads heads are the global heads [head_base, head_base + num_heads) of a call with
    total_heads heads (default: all of them, head_base 0); see :func:`ring_dilated_attention`.
    cu_seqlens: int32 (num_docs + 1,) offsets of documents packed along the whole sequence (each
    document cut into segments from its own start; read to the host once) or None.
    Raises ValueError for a sequence length not divisible by the world size, or invalid
    heads / head range / configuration / offsets.
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
    if cu_seqlens is not None:
        check_cu_seqlens(
            cu_seqlens, batch=1, seq_len=seq_len, device=getattr(cu_seqlens, "device", torch.device("cpu"))
        )
    base, total = check_head_range(head_base, total_heads, num_heads)
    if head_range_config(cfg, base, num_heads, total) is cfg:
        base, total = 0, num_heads  # the same geometry as heads [0, H): one cache entry
    return _plan_cached(
        seq_len,
        world_size,
        num_heads,
        num_kv_heads,
        cfg.segment_lengths,
        cfg.dilation_rates,
        cfg.head_mode,
        check_bool("is_causal", is_causal),
        base,
        total,
        None if cu_seqlens is None else host_offsets(cu_seqlens),
    )
