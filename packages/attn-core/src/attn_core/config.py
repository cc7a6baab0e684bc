"""Dilated attention configuration: the one place that fixes which (position, head) pairs a group selects.

Every backend and every reference derives its geometry from :class:`DilatedConfig`, so the
semantics (segments, per-head offsets ``j mod r``, head modes) live once.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

HEAD_MODES = ("all", "split")
# Segment lengths and dilation rates travel as int64 (torch.compile's op schemas); larger values
# select nothing more than N-sized ones do (see DilatedConfig.group_extent).
MAX_EXTENT = 2**63 - 1


def _as_int_tuple(name: str, values: object) -> tuple[int, ...]:
    """Integers from a list/tuple/range (or a 1-D integer array/tensor); bools and floats are rejected."""
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
        raise TypeError(f"{name} must be a sequence of positive ints, got {values!r}")
    try:
        items = list(values)
    except TypeError:  # e.g. a 0-d tensor
        raise TypeError(f"{name} must be a sequence of positive ints, got {values!r}") from None
    out = []
    for x in items:
        # bool is an int subclass; a flag passed as a length is a bug, not a length.
        if isinstance(x, bool):
            raise TypeError(f"{name} must contain ints, got {x!r} of type bool in {items!r}")
        try:
            out.append(operator.index(x))  # int, numpy integer, 0-d integer tensor; not 4.0
        except TypeError:
            raise TypeError(f"{name} must contain ints, got {x!r} of type {type(x).__name__} in {items!r}") from None
    return tuple(out)


@dataclass(frozen=True)
class DilatedConfig:
    """Validated LongNet configuration.

    segment_lengths: w_1..w_G; dilation_rates: r_1..r_G with w_g % r_g == 0.
    head_mode: "all" (every head runs every group) or "split" (heads partitioned into G
    contiguous groups, the first H % G groups one head larger).
    """

    segment_lengths: tuple[int, ...]
    dilation_rates: tuple[int, ...]
    head_mode: str = "all"

    def __init__(self, segment_lengths: Sequence[int], dilation_rates: Sequence[int], head_mode: str = "all") -> None:
        seg = _as_int_tuple("segment_lengths", segment_lengths)
        rates = _as_int_tuple("dilation_rates", dilation_rates)
        if len(seg) == 0:
            raise ValueError("segment_lengths must name at least one segment length, got an empty sequence")
        if len(seg) != len(rates):
            raise ValueError(
                f"segment_lengths and dilation_rates must have the same length, got {len(seg)} "
                f"({list(seg)}) and {len(rates)} ({list(rates)})"
            )
        for w, r in zip(seg, rates):
            if w <= 0:
                raise ValueError(f"segment lengths must be positive, got {w} in {list(seg)}")
            if r <= 0:
                raise ValueError(f"dilation rates must be positive, got {r} in {list(rates)}")
            if w > MAX_EXTENT:
                raise ValueError(f"segment lengths must be at most 2**63 - 1, got {w} in {list(seg)}")
            if w % r != 0:
                raise ValueError(
                    f"segment length {w} is not divisible by its dilation rate {r}; each w_g % r_g must be 0"
                )
        if head_mode not in HEAD_MODES:
            raise ValueError(f"head_mode must be one of {HEAD_MODES}, got {head_mode!r}")
        object.__setattr__(self, "segment_lengths", seg)
        object.__setattr__(self, "dilation_rates", rates)
        object.__setattr__(self, "head_mode", head_mode)

    @property
    def num_groups(self) -> int:
        return len(self.segment_lengths)

    def heads_for_group(self, group: int, num_heads: int) -> range:
        """Query heads that run group ``group`` (a contiguous range; empty if none)."""
        if self.head_mode == "all":
            return range(num_heads)
        groups = self.num_groups
        base, extra = divmod(num_heads, groups)
        start = group * base + min(group, extra)
        size = base + (1 if group < extra else 0)
        return range(start, start + size)

    def head_offset(self, group: int, head: int) -> int:
        """Offset o = j mod r_g of query head ``head`` (global head index) in group ``group``."""
        return head % self.dilation_rates[group]

    def group_extent(self, group: int, seq_len: int) -> tuple[int, int]:
        """(w, r) of group ``group`` clamped to a sequence of N = ``seq_len`` positions (r <= max(N, 1),
        w < 2 * max(N, 1)), selecting the same positions in the same segments as (w_g, r_g).

        A rate r_g >= N selects only position o for offset o < N, as r = N does; a segment
        w_g >= N is one segment, as the smallest multiple of r covering N is. Offsets are still
        j mod r_g (:meth:`heads_by_offset`). Every backend plans with these, so work and memory
        follow N however large the configured values are.
        """
        n = max(seq_len, 1)
        r = min(self.dilation_rates[group], n)
        w = min(self.segment_lengths[group], -(-n // r) * r)
        return w, r

    def heads_by_offset(self, group: int, num_heads: int, seq_len: int) -> tuple[tuple[int, tuple[int, ...]], ...]:
        """((o, heads), ...) in increasing o: the query heads of group ``group`` with offset o = j mod r_g,
        for the offsets that select a position (o < seq_len). At most num_heads entries."""
        by_offset: dict[int, list[int]] = {}
        for j in self.heads_for_group(group, num_heads):
            o = self.head_offset(group, j)  # the one offset rule (subclasses may shift head indices)
            if o < seq_len:
                by_offset.setdefault(o, []).append(j)
        return tuple((o, tuple(heads)) for o, heads in sorted(by_offset.items()))


@dataclass(frozen=True)
class DilatedCall:
    """A validated dilated-attention call, the one argument every backend receives.

    q: (B, N, H, D); k, v: (B, N, Hkv, D); key_padding_mask: (B, N) bool (True = padding) or None.
    softmax_scale is resolved (never None); dropout_p in [0, 1).
    """

    q: Any
    k: Any
    v: Any
    config: DilatedConfig
    is_causal: bool
    key_padding_mask: Any
    softmax_scale: float
    dropout_p: float

    @property
    def shape(self) -> tuple[int, int, int, int, int]:
        """(B, N, H, Hkv, D)."""
        B, N, H, D = self.q.shape
        return B, N, H, self.k.shape[2], D
