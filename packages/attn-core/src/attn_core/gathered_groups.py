"""Dilated attention for small problems: one gathered attention call per dilated group.

The strided executor (:mod:`attn_core.views`) runs a group (w, r) as one kernel call per offset
and head run, on in-place views: r calls per group, 15 for LongNet's rates [1, 2, 4, 8]. On short
sequences those calls are small, and each costs the host more time than the device spends on it.
This executor runs each group's full segments (S = N // w of them, T = w // r rows each) as ONE
call, with a fixed number of operations per group whatever r is:

* **gather** (one indexing op per tensor): x (B, N, Hx, D) is read as the view
  (B, S, r, Hx, T, D), element [b, s, o, j, t] at position s*w + t*r + o of head j, and indexed
  at each gathered head's (offset, head) pair: (B, S, n, T, D), contiguous. Query head h of the
  group reads offset h mod r_g (:meth:`attn_core.config.DilatedConfig.heads_by_offset`); k and v
  are gathered per *slot*, an (offset, kv head) pair, and the c query heads that share a slot are
  the call's heads for it (GQA without repeating K/V). When the pairs are shared by unequal
  numbers of query heads, c is their gcd and a pair gets several slots.
* **one attention call** (:mod:`attn_core.sdpa_ops`: cuDNN on CUDA, the CPU flash op on CPU) on
  q (B*S*slots, c, T, D) and k, v (B*S*slots, 1, T, D); a key padding mask becomes a
  (B*S*slots, T) key bias, gathered the same way from one (B, N) bias per step. ``is_causal`` is
  causal within each dilated segment (rows are in segment order).
* **store or merge** (one ``index_copy_`` per accumulator): the (B, S, T, r*Hx, D) view of a
  dense (B, N, Hx, D) buffer has one column per (offset, head), so a group's rows are
  ``index_copy_`` / ``index_add_`` targets along one dim. The first group touching a head stores
  its (out, lse); a later one gathers the accumulator's rows, LSE-merges them in fp32
  (:func:`attn_core.sdpa_ops.merge_views_`, exact) and copies them back.
* **backward** from the merged out and lse (exact, as :func:`attn_core.views.backward_pieces`):
  gathers of dout, q, k, v, out, lse, one attention backward, one ``index_add_`` into dq and one
  per *layer* into dk and dv (slots are layered so that each ``index_add_`` adds to distinct rows:
  no two additions race, and the result does not depend on the order of atomics).

Per group that is 6 operations forward for the first group (9 for a merged one) and
6 + 1 + 1 + 2 * layers backward, against 2r and 4r on strided views. Groups that are one strided
call anyway (r = 1 with one head run: no offsets to gather) and every group's short last segment
(N not a multiple of w: rows of unequal count per offset) run as strided pieces
(:func:`attn_core.views.forward_pieces`) inside the same plan, in group order.

Which executor: :func:`gathered_plan` returns a plan when the largest group's query elements
(B*N*heads of the group*D) are between 1 and :data:`GATHER_MAX_ELEMS`
(the gathered copies are a few times q; on larger problems the strided calls are big enough to
keep the device busy, and copy nothing); None sends the call to the strided executor.

Capture safety (torch.compile, CUDA graphs): plans hold their index tables on the device, built
from shapes alone (one host-to-device copy per plan, :func:`attn_core.packing.host_to_device`) and
cached (:data:`attn_core.views.PLAN_CACHE_SIZE` plans, least recently used dropped). No operation
reads a device value on the host or has a value-dependent shape. A plan missing from the cache
while the stream is being captured is not built (its table would hold its values only once the
graph replays): that call takes the strided executor. Warm-up runs before capture, as CUDA graphs
require anyway, fill the cache.
"""

from __future__ import annotations

import itertools
import math
import sys
from dataclasses import dataclass

import torch

from . import sdpa_ops, views
from .config import DilatedConfig
from .memo import BoundedMemo
from .packing import host_to_device
from .views import Piece

__all__ = [
    "GATHER_MAX_ELEMS",
    "GatheredGroup",
    "GatheredPlan",
    "GroupStep",
    "backward_gathered",
    "executor_choice",
    "forward_gathered",
    "gathered_plan",
    "stream_capturing",
]

# The gathered executor takes calls whose largest group has at most this many query elements
# (B * N * heads of the group * D). Measured on an H100 (bf16, causal and not, fwd+bwd, segments
# 2048-16384, rates 1-8; docs/benchmarks/dilated_gather_h100.md): at <= 2^24 gathering won every
# point (1.1-1.9x: the strided executor's calls are host-bound there); at 2^25 it won half and lost
# half by up to 12%; at 2^26 and up it lost up to 1.45x (the copies cost more than the launches saved).
# 2^24 is N = 4K at H = 32 "all", 16K at H = 32 "split" (8 heads per group), D = 128.
GATHER_MAX_ELEMS = 1 << 24
# The strided pieces of a gathered plan are never cut into chunks: the problem is small.
UNCUT_BUDGET = sys.maxsize

_ATEN = torch.ops.aten


@dataclass(frozen=True, eq=False)
class GatheredGroup:
    """One group's full segments as one call: ``segments`` segments of ``segment_length`` positions,
    rows t < segment_length // rate at position s*segment_length + t*rate + offset.

    Index tables (int64 on the plan's device, views of one tensor): q_offsets, q_heads (n,): the
    (offset, query head) of each gathered query head, slot after slot (``heads_per_slot``
    consecutive heads share a slot); q_columns = offset * H + head. kv_offsets, kv_heads,
    kv_columns (slots,): the same per slot, kv_columns = offset * Hkv + kv head. ``layers``:
    (start, stop) slot ranges with distinct kv_columns. ``first``: no earlier group touches these
    heads (store, not merge).
    """

    segments: int
    segment_length: int
    rate: int
    heads_per_slot: int
    q_offsets: torch.Tensor
    q_heads: torch.Tensor
    q_columns: torch.Tensor
    kv_offsets: torch.Tensor
    kv_heads: torch.Tensor
    kv_columns: torch.Tensor
    layers: tuple[tuple[int, int], ...]
    first: bool

    @property
    def rows(self) -> int:
        return self.segment_length // self.rate

    @property
    def num_heads(self) -> int:
        return int(self.q_columns.shape[0])

    @property
    def num_slots(self) -> int:
        return int(self.kv_columns.shape[0])


@dataclass(frozen=True)
class GroupStep:
    """One group, in execution order: its gathered call (None: the group runs strided) and its
    strided pieces (the whole group, or only its short last segment)."""

    gathered: GatheredGroup | None
    pieces: tuple[Piece, ...]


@dataclass(frozen=True)
class GatheredPlan:
    """Every step of a dilated attention on the gathered executor; ``pieces``: all strided pieces."""

    steps: tuple[GroupStep, ...]
    pieces: tuple[Piece, ...]

    @property
    def gathers(self) -> bool:
        """Whether any step has a gathered call."""
        return any(step.gathered is not None for step in self.steps)


_PLANS = BoundedMemo(views.PLAN_CACHE_SIZE)  # GatheredPlan per (shape, config, mergeable, device)


def executor_choice(shape: tuple[int, int, int, int, int], config: DilatedConfig) -> tuple[str, str]:
    """("gathered" | "strided", why) for q (B, N, H, D) with Hkv kv heads; shape (B, N, H, Hkv, D).

    The size rule of :func:`gathered_plan` on the largest group's query elements (a plan missing
    from the cache during CUDA graph capture also runs strided; this cannot know about that).
    """
    B, N, H, _, D = shape
    heads = max(len(config.heads_for_group(g, H)) for g in range(config.num_groups))
    elems = B * N * heads * D
    if elems == 0:
        return "strided", "empty input (nothing to gather)"
    if elems > GATHER_MAX_ELEMS:
        return "strided", (
            f"largest group B*N*heads*D = {elems} > GATHER_MAX_ELEMS = {GATHER_MAX_ELEMS}: one call per "
            "(group, offset) on strided views, no copies (calls this large keep the device busy)"
        )
    return "gathered", (
        f"largest group B*N*heads*D = {elems} <= GATHER_MAX_ELEMS = {GATHER_MAX_ELEMS}: one gathered "
        "call per dilated group (calls per (group, offset) this small are bound by host time)"
    )


def gathered_plan(
    shape: tuple[int, int, int, int, int], config: DilatedConfig, mergeable: bool, device: torch.device
) -> GatheredPlan | None:
    """The gathered plan of q (B, N, H, D) with Hkv kv heads (shape (B, N, H, Hkv, D)) on ``device``,
    or None when the call takes the strided executor (:func:`executor_choice`; or the plan is not
    cached and the current CUDA stream is being captured).

    mergeable: :func:`attn_core.views.batch_mergeable` of every tensor the strided pieces view.
    """
    if executor_choice(shape, config)[0] != "gathered":
        return None
    key = (shape, config, mergeable, device)
    if key not in _PLANS and stream_capturing(device):
        return None
    return _PLANS.get(key, lambda: _build_plan(shape, config, mergeable, device))


def stream_capturing(device: torch.device) -> bool:
    """Whether the current stream of ``device`` is being captured into a CUDA graph."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _group_slots(
    config: DilatedConfig, group: int, num_heads: int, num_kv_heads: int, seq_len: int
) -> tuple[list[tuple[int, int]], list[tuple[int, int]], int, list[tuple[int, int]]]:
    """(query (offset, head) pairs, slots (offset, kv head), heads per slot, layers) of one group.

    Query heads sharing an (offset, kv head) pair read the same keys: c = the gcd of the pairs'
    head counts of them form one slot; a pair with m heads has m / c slots, its j-th in layer j,
    so the slots of one layer are distinct pairs.
    """
    per_kv = num_heads // num_kv_heads
    by_pair: dict[tuple[int, int], list[int]] = {}
    for o, offset_heads in config.heads_by_offset(group, num_heads, seq_len):
        for h in offset_heads:
            by_pair.setdefault((o, h // per_kv), []).append(h)
    c = math.gcd(*(len(hs) for hs in by_pair.values()))
    depth = max(len(hs) for hs in by_pair.values()) // c
    q_pairs: list[tuple[int, int]] = []
    slots: list[tuple[int, int]] = []
    layers: list[tuple[int, int]] = []
    for layer in range(depth):
        start = len(slots)
        for pair in sorted(by_pair):
            slot_heads = by_pair[pair][layer * c : (layer + 1) * c]
            if slot_heads:
                slots.append(pair)
                q_pairs.extend((pair[0], h) for h in slot_heads)
        layers.append((start, len(slots)))
    return q_pairs, slots, c, layers


def _build_plan(
    shape: tuple[int, int, int, int, int], config: DilatedConfig, mergeable: bool, device: torch.device
) -> GatheredPlan:
    _, N, H, Hkv, _ = shape
    pieces = views.plan_pieces(shape, config, mergeable, call_budget=UNCUT_BUDGET)
    by_group: dict[int, list[Piece]] = {}
    for p in pieces:  # the pieces of a group are adjacent, groups in order of increasing rate
        by_group.setdefault(p.group, []).append(p)
    # each gathered group: (group, w, r, c, layers, first, table offsets); one host table for all of them
    table: list[int] = []
    gathered: list[tuple[int, int, int, int, list[tuple[int, int]], bool, int, int, int]] = []
    for g, group_pieces in by_group.items():
        w, r = config.group_extent(g, N)
        full = [p for p in group_pieces if p.start < (N // w) * w]
        if len(full) <= 1:  # no full segment, or one strided call without copies
            continue
        q_pairs, slots, c, layers = _group_slots(config, g, H, Hkv, N)
        start = len(table)
        table += [o for o, _ in q_pairs] + [h for _, h in q_pairs] + [o * H + h for o, h in q_pairs]
        table += [o for o, _ in slots] + [j for _, j in slots] + [o * Hkv + j for o, j in slots]
        gathered.append((g, w, r, c, layers, group_pieces[0].first, start, len(q_pairs), len(slots)))
    groups: dict[int, GatheredGroup] = {}
    if gathered:
        device_table = host_to_device(torch.tensor(table, dtype=torch.int64), device)
        for g, w, r, c, layers, first, start, n, ns in gathered:
            cut = [start + i * n for i in range(4)] + [start + 3 * n + i * ns for i in range(1, 4)]
            q_off, q_head, q_col, kv_off, kv_head, kv_col = (device_table[a:b] for a, b in itertools.pairwise(cut))
            groups[g] = GatheredGroup(
                N // w, w, r, c, q_off, q_head, q_col, kv_off, kv_head, kv_col, tuple(layers), first
            )
    steps: list[GroupStep] = []
    strided: list[Piece] = []
    for g, group_pieces in by_group.items():
        grp = groups.get(g)
        run = group_pieces if grp is None else [p for p in group_pieces if p.start >= grp.segments * grp.segment_length]
        steps.append(GroupStep(grp, tuple(run)))
        strided += run
    return GatheredPlan(tuple(steps), tuple(strided))


def _gather(x: torch.Tensor, grp: GatheredGroup, offsets: torch.Tensor, heads: torch.Tensor) -> torch.Tensor:
    """x (B, N, Hx, *rest) (any strides) at the group's full-segment rows: (B, S, len(offsets), T, *rest),
    contiguous; entry i holds positions s*w + t*r + offsets[i] of head heads[i]."""
    sB, sN, sH = x.stride()[:3]
    w, r = grp.segment_length, grp.rate
    rows = x.as_strided(
        (x.shape[0], grp.segments, r, x.shape[2], grp.rows, *x.shape[3:]),
        (sB, w * sN, sN, sH, r * sN, *x.stride()[3:]),
        x.storage_offset(),
    )
    return _ATEN.index.Tensor(rows, [None, None, offsets, heads]).contiguous()


def _gather_keys(bias: torch.Tensor, grp: GatheredGroup) -> torch.Tensor:
    """(B*S*slots, T) key bias of the group's slots from a (B, N) bias (any strides), contiguous."""
    sB, sN = bias.stride()
    w, r = grp.segment_length, grp.rate
    rows = bias.as_strided((bias.shape[0], grp.segments, r, grp.rows), (sB, w * sN, sN, r * sN), bias.storage_offset())
    return _ATEN.index.Tensor(rows, [None, None, grp.kv_offsets]).reshape(-1, grp.rows)


def _columns(buf: torch.Tensor, grp: GatheredGroup) -> torch.Tensor:
    """(B, S, T, r*Hx, *rest) view of a buffer (B, N, Hx, *rest) with dense (N, Hx) dims: the
    group's full-segment rows of (offset o, head j) are column o*Hx + j (``index_copy_`` / ``index_add_`` dim 3)."""
    sB, sN, sH = buf.stride()[:3]
    Hx = buf.shape[2]
    if sN != Hx * sH:
        raise ValueError(f"gathered executor: buffer strides {buf.stride()} do not have dense (N, H) dims")
    w, r = grp.segment_length, grp.rate
    return buf.as_strided(
        (buf.shape[0], grp.segments, grp.rows, r * Hx, *buf.shape[3:]),
        (sB, w * sN, r * sN, sH, *buf.stride()[3:]),
        buf.storage_offset(),
    )


def _forward_group(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    grp: GatheredGroup,
    out: torch.Tensor,
    lse_rows: torch.Tensor,
    bias: torch.Tensor | None,
    is_causal: bool,
    scale: float,
) -> None:
    B, D = q.shape[0], q.shape[3]
    S, T, c, n = grp.segments, grp.rows, grp.heads_per_slot, grp.num_heads
    calls = B * S * grp.num_slots
    o_c, l_c = sdpa_ops.attention_forward(
        _gather(q, grp, grp.q_offsets, grp.q_heads).view(calls, c, T, D),
        _gather(k, grp, grp.kv_offsets, grp.kv_heads).view(calls, 1, T, D),
        _gather(v, grp, grp.kv_offsets, grp.kv_heads).view(calls, 1, T, D),
        is_causal=is_causal,
        scale=scale,
        key_bias=None if bias is None else _gather_keys(bias, grp),
    )
    o_c = o_c.reshape(B, S, n, T, D)
    l_c = l_c.reshape(B, S, n, T)
    if not grp.first:  # merge with what earlier groups left in these rows, in fp32, then store
        acc_o = _gather(out, grp, grp.q_offsets, grp.q_heads)
        acc_l = _gather(lse_rows, grp, grp.q_offsets, grp.q_heads)
        sdpa_ops.merge_views_(
            acc_o.view(B * S, n, T, D), acc_l.view(B * S, n, T), o_c.view(B * S, n, T, D), l_c.view(B * S, n, T)
        )
        o_c, l_c = acc_o, acc_l
    _columns(out, grp).index_copy_(3, grp.q_columns, o_c.transpose(2, 3))
    _columns(lse_rows, grp).index_copy_(3, grp.q_columns, l_c.transpose(2, 3))


def forward_gathered(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    plan: GatheredPlan,
    out: torch.Tensor,
    lse: torch.Tensor,
    *,
    key_padding_mask: torch.Tensor | None,
    is_causal: bool,
    scale: float,
) -> None:
    """Run every step of ``plan``, storing or LSE-merging into out and lse in place.

    Arguments as :func:`attn_core.views.forward_pieces`: q (B, N, H, D); k, v (B, N, Hkv, D) with
    padded keys' rows zero; out (B, N, H, D) dense in q's dtype; lse (B, H, N), the transposed view
    of dense (B, N, H) storage (:func:`attn_core.views.new_lse`).
    """
    lse_rows = lse.transpose(1, 2)
    bias = sdpa_ops.key_bias_from_mask(key_padding_mask, q.dtype) if plan.gathers else None
    for step in plan.steps:  # in group order: a group's store must precede later groups' merges
        if step.gathered is not None:
            _forward_group(q, k, v, step.gathered, out, lse_rows, bias, is_causal, scale)
        if step.pieces:
            views.forward_pieces(
                q, k, v, step.pieces, out, lse, key_padding_mask=key_padding_mask, is_causal=is_causal, scale=scale
            )


def _backward_group(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse_rows: torch.Tensor,
    grp: GatheredGroup,
    grads: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    bias: torch.Tensor | None,
    is_causal: bool,
    scale: float,
) -> None:
    B, D = q.shape[0], q.shape[3]
    S, T, c, n, ns = grp.segments, grp.rows, grp.heads_per_slot, grp.num_heads, grp.num_slots
    calls = B * S * ns
    qo, qh, ko, kh = grp.q_offsets, grp.q_heads, grp.kv_offsets, grp.kv_heads
    dq_c, dk_c, dv_c = sdpa_ops.attention_backward(
        _gather(dout, grp, qo, qh).view(calls, c, T, D),
        _gather(q, grp, qo, qh).view(calls, c, T, D),
        _gather(k, grp, ko, kh).view(calls, 1, T, D),
        _gather(v, grp, ko, kh).view(calls, 1, T, D),
        _gather(out, grp, qo, qh).view(calls, c, T, D),
        _gather(lse_rows, grp, qo, qh).view(calls, c, T),
        is_causal=is_causal,
        scale=scale,
        key_bias=None if bias is None else _gather_keys(bias, grp),
    )
    dq, dk, dv = grads
    _columns(dq, grp).index_add_(3, grp.q_columns, dq_c.reshape(B, S, n, T, D).transpose(2, 3))
    dk_c = dk_c.reshape(B, S, ns, T, D)
    dv_c = dv_c.reshape(B, S, ns, T, D)
    dk_cols, dv_cols = _columns(dk, grp), _columns(dv, grp)
    for start, stop in grp.layers:  # distinct rows per index_add_: no racing additions
        if (start, stop) == (0, ns):
            cols, dk_l, dv_l = grp.kv_columns, dk_c, dv_c
        else:
            cols, dk_l, dv_l = grp.kv_columns[start:stop], dk_c[:, :, start:stop], dv_c[:, :, start:stop]
        dk_cols.index_add_(3, cols, dk_l.transpose(2, 3))
        dv_cols.index_add_(3, cols, dv_l.transpose(2, 3))


def backward_gathered(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    plan: GatheredPlan,
    grads: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    *,
    key_padding_mask: torch.Tensor | None,
    is_causal: bool,
    scale: float,
) -> None:
    """Add every step's (dq, dk, dv) into grads = (dq (B, N, H, D), dk, dv (B, N, Hkv, D)), dense, in place.

    Arguments as :func:`attn_core.views.backward_pieces`: out, lse the rows' final output and
    (B, H, N) LSE (any strides), dout (B, N, H, D) with a contiguous last dim.
    """
    lse_rows = lse.transpose(1, 2)
    bias = sdpa_ops.key_bias_from_mask(key_padding_mask, q.dtype) if plan.gathers else None
    for step in plan.steps:
        if step.gathered is not None:
            _backward_group(dout, q, k, v, out, lse_rows, step.gathered, grads, bias, is_causal, scale)
    if plan.pieces:  # additions commute: the strided pieces of every group in one pass
        views.backward_pieces(
            dout, q, k, v, out, lse, plan.pieces, grads,
            key_padding_mask=key_padding_mask, is_causal=is_causal, scale=scale,
        )  # fmt: skip
