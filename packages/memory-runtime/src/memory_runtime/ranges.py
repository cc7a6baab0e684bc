"""Byte ranges: size classes and an address-ordered free-range allocator.

:func:`round_size` maps a request to its size class; :class:`RangeAllocator` keeps free byte
ranges of one or more regions (slabs, arenas) and serves first fit from either end. The pools'
native hot path has a C++ allocator with the same methods and answers (csrc/pool_fast_path.cpp);
its constants must match the ones here.
"""

from __future__ import annotations

import bisect

__all__ = ["ALIGNMENT", "OFFSET_MASK", "REGION_SHIFT", "SUBCLASS_BITS", "RangeAllocator", "round_size"]

# Every block starts on this byte boundary (covers every dtype and vectorised kernels' needs).
ALIGNMENT = 512
# 2**SUBCLASS_BITS size classes per power of two: rounding waste < 2**-SUBCLASS_BITS (1.6 %).
SUBCLASS_BITS = 6
# Free ranges are keyed by ``region << REGION_SHIFT | offset``: one sorted int order over all
# slabs in which ranges of different slabs can never touch (no slab reaches 2**48 bytes).
REGION_SHIFT = 48
OFFSET_MASK = (1 << REGION_SHIFT) - 1


def round_size(nbytes: int) -> int:
    """Size class of a request: a multiple of ALIGNMENT, waste < max(n / 2**SUBCLASS_BITS, ALIGNMENT)."""
    if nbytes <= ALIGNMENT:
        return ALIGNMENT
    step = max(ALIGNMENT, 1 << (nbytes.bit_length() - 1 - SUBCLASS_BITS))
    return (nbytes + step - 1) // step * step


class RangeAllocator:
    """Address-ordered free ranges with first fit from either end, split on alloc, coalescing on free.

    Ranges are kept as two parallel lists sorted by start key (``region << REGION_SHIFT | offset``):
    first fit scans from the bottom or the top, and a freed range finds both neighbours with one
    bisect. Not thread-safe: the owner holds its lock.
    """

    __slots__ = ("_sizes", "_starts", "free_bytes")

    def __init__(self) -> None:
        self._starts: list[int] = []
        self._sizes: list[int] = []
        self.free_bytes = 0

    def __len__(self) -> int:
        return len(self._starts)

    def alloc(self, size: int, from_top: bool = False) -> int | None:
        """Take ``size`` bytes from the first range that fits, scanning from the lowest address (or
        the highest with ``from_top``, carving the block from that range's top). None if none fits."""
        if size > self.free_bytes:
            return None
        sizes = self._sizes
        if from_top:
            i = len(sizes) - 1
            while i >= 0 and sizes[i] < size:
                i -= 1
            if i < 0:
                return None
            start = self._starts[i]
            rest = sizes[i] - size
            if rest:
                sizes[i] = rest
            else:
                del sizes[i], self._starts[i]
            self.free_bytes -= size
            return start + rest
        i = 0
        n = len(sizes)
        while i < n and sizes[i] < size:
            i += 1
        if i == n:
            return None
        start = self._starts[i]
        rest = sizes[i] - size
        if rest:
            self._starts[i] = start + size
            sizes[i] = rest
        else:
            del sizes[i], self._starts[i]
        self.free_bytes -= size
        return start

    def free(self, start: int, size: int) -> None:
        """Return a range, merging it with free neighbours (never across slabs: see REGION_SHIFT)."""
        starts, sizes = self._starts, self._sizes
        self.free_bytes += size
        i = bisect.bisect_left(starts, start)
        left = i > 0 and starts[i - 1] + sizes[i - 1] == start
        if i < len(starts) and starts[i] == start + size:
            if left:
                sizes[i - 1] += size + sizes[i]
                del starts[i], sizes[i]
            else:
                starts[i] = start
                sizes[i] += size
        elif left:
            sizes[i - 1] += size
        else:
            starts.insert(i, start)
            sizes.insert(i, size)

    def ranges(self) -> list[tuple[int, int]]:
        """Every free range as (start key, size), in address order."""
        return list(zip(self._starts, self._sizes))

    def take_all(self) -> list[tuple[int, int]]:
        """Remove and return every free range as (start key, size)."""
        out = self.ranges()
        self._starts.clear()
        self._sizes.clear()
        self.free_bytes = 0
        return out

    def whole_region_free(self, region: int, region_size: int) -> bool:
        """Whether region's ``region_size`` bytes form one free range."""
        key = region << REGION_SHIFT
        i = bisect.bisect_left(self._starts, key)
        return i < len(self._starts) and self._starts[i] == key and self._sizes[i] == region_size

    def drop_region(self, region: int, region_size: int) -> None:
        """Remove a wholly free region's range (its memory leaves the allocator)."""
        i = bisect.bisect_left(self._starts, region << REGION_SHIFT)
        del self._starts[i], self._sizes[i]
        self.free_bytes -= region_size

    def largest(self) -> int:
        """Size of the largest free range (0 if none)."""
        return max(self._sizes, default=0)
