"""A contiguous range of a call's global heads, run as local heads 0..h-1 with the global geometry.

Head-parallel layouts (Ulysses, the hybrid) give each rank the heads [head_base, head_base + h)
of a call with ``total_heads`` heads. Dilated attention's geometry depends on the *global* head
index: head j uses offset j mod r_g, and head_mode="split" cuts the groups from the global heads.
:class:`HeadRangeConfig` gives every local head its global head's group membership and offset, so
any code that takes its geometry from a :class:`attn_core.config.DilatedConfig`
(``heads_for_group``, ``head_offset``, ``heads_by_offset``: attn_core's backends, ring dilated
attention's plan) computes exactly the global heads' attention on the local ones.
"""

from __future__ import annotations

from dataclasses import dataclass

from attn_core.config import DilatedConfig

__all__ = ["HeadRangeConfig", "check_head_range", "head_range_config"]


@dataclass(frozen=True, init=False)
class HeadRangeConfig(DilatedConfig):
    """A dilated config for the heads [head_base, head_base + h) of a call with ``total_heads`` heads.

    Local head j is global head head_base + j: its offset in group g is (head_base + j) mod r_g,
    and with head_mode="split" it runs the group its global head belongs to (the local range may
    straddle groups, or hold no head of some group).
    """

    head_base: int = 0
    total_heads: int = 1

    def __init__(self, config: DilatedConfig, head_base: int, total_heads: int) -> None:
        super().__init__(config.segment_lengths, config.dilation_rates, config.head_mode)
        if not 0 <= head_base < total_heads:
            raise ValueError(f"head_base must be in [0, total_heads={total_heads}), got {head_base}")
        object.__setattr__(self, "head_base", int(head_base))
        object.__setattr__(self, "total_heads", int(total_heads))

    def heads_for_group(self, group: int, num_heads: int) -> range:
        glob = DilatedConfig.heads_for_group(self, group, self.total_heads)
        lo, hi = max(glob.start, self.head_base), min(glob.stop, self.head_base + num_heads)
        return range(lo - self.head_base, max(hi, lo) - self.head_base)

    def head_offset(self, group: int, head: int) -> int:
        return (self.head_base + head) % self.dilation_rates[group]


def check_head_range(head_base: object, total_heads: object, num_heads: int) -> tuple[int, int]:
    """Validate that a call's ``num_heads`` heads are the global heads [head_base, head_base + num_heads)
    of ``total_heads``; returns (head_base, total_heads). total_heads None means num_heads (head_base 0)."""
    if isinstance(head_base, bool) or not isinstance(head_base, int) or head_base < 0:
        raise ValueError(
            f"head_base must be a non-negative int (the first local head's global index), got {head_base!r}"
        )
    if total_heads is None:
        if head_base != 0:
            raise ValueError(
                f"head_base={head_base} needs total_heads (the number of global heads the local heads belong to)"
            )
        return 0, num_heads
    if isinstance(total_heads, bool) or not isinstance(total_heads, int) or total_heads < head_base + num_heads:
        raise ValueError(
            f"total_heads must be an int >= head_base + H = {head_base} + {num_heads} (the local heads are global "
            f"heads [{head_base}, {head_base + num_heads})), got {total_heads!r}"
        )
    return head_base, total_heads


def head_range_config(config: DilatedConfig, head_base: int, num_heads: int, total_heads: int) -> DilatedConfig:
    """The config that runs global heads [head_base, head_base + num_heads) as local heads 0..num_heads-1.

    ``config`` itself when its own geometry on ``num_heads`` heads already matches (e.g. head_mode
    "all" and a head_base that is a multiple of every rate: callers keep the plain config's
    paths), else a :class:`HeadRangeConfig`.
    """
    if head_base == 0 and total_heads == num_heads:
        return config
    shifted = HeadRangeConfig(config, head_base, total_heads)
    same = all(
        config.heads_for_group(g, num_heads) == shifted.heads_for_group(g, num_heads)
        and all(config.head_offset(g, j) == shifted.head_offset(g, j) for j in range(num_heads))
        for g in range(config.num_groups)
    )
    return config if same else shifted
