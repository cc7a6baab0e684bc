"""Ring attention's step schedule: which (query rows, key rows, causal) pieces rank r computes
against the block of rank src, and which global chunks a rank's rows are.

Which (query rows, key rows) a step computes (c = n / 2 for zigzag; src = the block's owner):
- not causal: everything, either layout.
- contiguous, causal: src < r all x all; src == r causal; src > r nothing (the block is passed on).
- zigzag, causal: rank r holds chunks r and 2W-1-r. src == r: causal over the shard (its two
  chunks are in order); src < r: all queries x the block's first chunk; src > r: the shard's
  second chunk x the whole block. Every step is n*c pairs: the causal work is balanced.
"""

from __future__ import annotations

__all__ = ["StepBlock", "ring_step_blocks", "shard_chunks"]

# (query rows, key rows, causal) with rows as half-open ranges into the local shard / the block
StepBlock = tuple[tuple[int, int], tuple[int, int], bool]


def ring_step_blocks(
    rank: int, src: int, world_size: int, shard_len: int, layout: str, is_causal: bool
) -> list[StepBlock]:
    """The (query rows, key rows, causal) pieces rank ``rank`` computes against the block of rank ``src``."""
    n = shard_len
    if not is_causal:
        return [((0, n), (0, n), False)]
    if src == rank:
        return [((0, n), (0, n), True)]
    if layout == "contiguous":
        return [((0, n), (0, n), False)] if src < rank else []
    c = n // 2
    if src < rank:
        return [((0, n), (0, c), False)]  # both local chunks come after the block's early chunk only
    return [((c, n), (0, n), False)]  # only the late local chunk sees this block, and all of it


def shard_chunks(rank: int, world_size: int, shard_len: int, layout: str) -> list[tuple[int, int]]:
    """(global start, length) of each chunk rank ``rank`` holds, in local row order (global
    positions increase with the local row in both layouts)."""
    if layout == "contiguous":
        return [(rank * shard_len, shard_len)]
    c = shard_len // 2
    return [(rank * c, c), ((2 * world_size - 1 - rank) * c, c)]
