"""Device buffer pools: size-bucketed, slab-carved, stream-aware, thread-safe, bounded.

A :class:`DeviceBufferPool` hands out tensors that are views into a few large reservations
("slabs": ``torch.empty(n, dtype=torch.uint8)`` on the pool's device), so a workload whose shapes
vary from step to step stops asking the device allocator for memory once it is warm.

How a request is served (all under one lock; tensor views are made outside it):

1. Requested bytes are rounded up to a size class: multiples of ``2**(floor(log2 n) - 4)``
   (at least 512 bytes), so rounding waste is below 1/16 of the request (or 512 bytes).
2. Fast path ("quick list"): a block released recently with the same (stream, shape, dtype) is
   handed back as the very same tensor object -- a dict lookup, no tensor creation.
3. Best fit over the free byte ranges of the slabs (split on allocation, coalesced with free
   neighbours on release).
4. Otherwise a new slab is reserved (bounded by ``max_bytes``; fully free slabs are trimmed first).

Stream awareness (CUDA): a released block goes back to the free ranges of the stream it was
released on and is reused at once by that stream (stream order makes this safe). Another stream
may reuse it only after an event, recorded on the releasing stream after the release, completed.
Events are recorded lazily -- only when another stream actually needs the memory -- so the
single-stream hot path records none. On CPU every request is immediate.

The pool implements the buffer-provider protocol that attn-ring accepts::

    acquire(shape, dtype, device) -> Tensor
    release(tensor) -> None
"""

from __future__ import annotations

import bisect
import math
import threading
from collections.abc import Hashable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Protocol, cast

import torch

__all__ = [
    "ALIGNMENT",
    "DeviceBufferPool",
    "PoolExhaustedError",
    "PoolStats",
    "round_size",
]

# Every block starts on this byte boundary (covers every dtype and vectorised kernels' needs).
ALIGNMENT = 512
# 2**SUBCLASS_BITS size classes per power of two: rounding waste < 2**-SUBCLASS_BITS (1.6 %).
SUBCLASS_BITS = 6
# Recently released blocks kept per (stream, shape, dtype) for the no-allocation fast path.
QUICK_LIST_DEPTH = 4
# ... for at most this many keys (oldest key evicted first): bounds memory held outside the free ranges.
QUICK_LIST_KEYS = 16
# Only blocks up to this size are quick-listed: a held-back large block splits the free ranges
# around it (fragmentation), while for large buffers a view costs little next to their use.
QUICK_LIST_MAX_BLOCK = 4 << 20
# Large reservations are rounded like the CUDA caching allocator rounds them, so none is wasted.
SLAB_GRANULE = 2 << 20


class PoolExhaustedError(MemoryError):
    """The pool's byte bound (``max_bytes``) does not admit the request."""


def round_size(nbytes: int) -> int:
    """Size class of a request: a multiple of ALIGNMENT, waste < max(n / 2**SUBCLASS_BITS, ALIGNMENT)."""
    if nbytes <= ALIGNMENT:
        return ALIGNMENT
    step = max(ALIGNMENT, 1 << (nbytes.bit_length() - 1 - SUBCLASS_BITS))
    return (nbytes + step - 1) // step * step


class _RangeAllocator:
    """Best fit over free byte ranges of numbered regions, with split on alloc and coalescing on free.

    Free ranges live in a list sorted by (size, region, offset) (bisect: best fit, lowest address on
    ties) plus two dicts from (region, start) and (region, end) for O(1) neighbour lookup.
    Not thread-safe: the owner holds its lock.
    """

    def __init__(self) -> None:
        self._sorted: list[tuple[int, int, int]] = []
        self._by_start: dict[tuple[int, int], int] = {}
        self._by_end: dict[tuple[int, int], int] = {}
        self.free_bytes = 0

    def __len__(self) -> int:
        return len(self._sorted)

    def _insert(self, region: int, offset: int, size: int) -> None:
        bisect.insort(self._sorted, (size, region, offset))
        self._by_start[(region, offset)] = size
        self._by_end[(region, offset + size)] = offset

    def _remove(self, region: int, offset: int, size: int) -> None:
        i = bisect.bisect_left(self._sorted, (size, region, offset))
        del self._sorted[i]
        del self._by_start[(region, offset)]
        del self._by_end[(region, offset + size)]

    def alloc(self, size: int) -> tuple[int, int] | None:
        """Take ``size`` bytes from the smallest free range that fits; None if none fits."""
        i = bisect.bisect_left(self._sorted, (size, -1, -1))
        if i == len(self._sorted):
            return None
        fsize, region, offset = self._sorted[i]
        rest = fsize - size
        if rest and (i == 0 or self._sorted[i - 1] <= (rest, region, offset + size)):
            # The remainder keeps this entry's place in the sorted order: update it in place
            # (the common case when carving from a slab's large tail).
            self._sorted[i] = (rest, region, offset + size)
            del self._by_start[(region, offset)]
            self._by_start[(region, offset + size)] = rest
            self._by_end[(region, offset + fsize)] = offset + size
        else:
            self._remove(region, offset, fsize)
            if rest:
                self._insert(region, offset + size, rest)
        self.free_bytes -= size
        return region, offset

    def free(self, region: int, offset: int, size: int) -> None:
        """Return a range, merging it with free neighbours in the same region."""
        self.free_bytes += size
        end = offset + size
        nxt = self._by_start.get((region, end))
        if nxt is not None:
            self._remove(region, end, nxt)
            size += nxt
        prv = self._by_end.get((region, offset))
        if prv is not None:
            self._remove(region, prv, offset - prv)
            size += offset - prv
            offset = prv
        self._insert(region, offset, size)

    def take_all(self) -> list[tuple[int, int, int]]:
        """Remove and return every free range as (region, offset, size)."""
        out = [(r, o, s) for s, r, o in self._sorted]
        self._sorted.clear()
        self._by_start.clear()
        self._by_end.clear()
        self.free_bytes = 0
        return out

    def whole_region_free(self, region: int, region_size: int) -> bool:
        return self._by_start.get((region, 0)) == region_size

    def drop_region(self, region: int, region_size: int) -> None:
        self._remove(region, 0, region_size)
        self.free_bytes -= region_size

    def largest(self) -> int:
        return self._sorted[-1][0] if self._sorted else 0


class StreamOps(Protocol):
    """How the pool sees streams: a hashable key per stream and fences (events) on them."""

    def current_key(self) -> Hashable: ...

    def fence(self, key: Hashable) -> Any: ...

    def done(self, fence: Any) -> bool: ...

    def wait(self, fence: Any) -> None: ...


class _NoStreams:
    """CPU: no asynchrony, every block is reusable the moment it is released."""

    def current_key(self) -> Hashable:
        return None

    def fence(self, key: Hashable) -> Any:
        return None

    def done(self, fence: Any) -> bool:
        return True

    def wait(self, fence: Any) -> None:
        return None


class _CudaStreams:
    """CUDA streams keyed by their id; fences are events recorded on the releasing stream."""

    def __init__(self, device: torch.device) -> None:
        self._index = device.index if device.index is not None else torch.cuda.current_device()
        # torch._C._cuda_getCurrentStream returns (stream_id, device_index, device_type) without
        # building a Stream object: ~4x cheaper on the hot path. Guarded: private API.
        self._raw = getattr(torch._C, "_cuda_getCurrentStream", None)
        self._streams: dict[Hashable, torch.cuda.Stream] = {}

    def current_key(self) -> Hashable:
        if self._raw is not None:
            sid, dev, dtype = self._raw(self._index)
            key = (sid, dev, dtype)
        else:
            s = torch.cuda.current_stream(self._index)
            key = (s.stream_id, s.device_index, s.device_type)
        return key

    def fence(self, key: Hashable) -> Any:
        sid, dev, dev_type = cast(tuple[int, int, int], key)
        stream = torch.cuda.Stream(stream_id=sid, device_index=dev, device_type=dev_type)
        event = torch.cuda.Event()
        event.record(stream)
        return event

    def done(self, fence: Any) -> bool:
        return bool(fence.query())

    def wait(self, fence: Any) -> None:
        fence.synchronize()


class _Block:
    __slots__ = ("nbytes", "offset", "region", "requested", "shape", "stream", "tensor")

    def __init__(self, region: int, offset: int, nbytes: int) -> None:
        self.region = region
        self.offset = offset
        self.nbytes = nbytes
        self.requested = 0
        self.shape: tuple[int, ...] = ()
        self.stream: Hashable = None
        self.tensor: torch.Tensor | None = None


@dataclass(frozen=True)
class PoolStats:
    """A consistent snapshot of a pool's counters (bytes are device bytes).

    hits: acquires served from cached memory; misses: acquires that reserved a new slab.
    quick_hits: the subset of hits served by the same-shape quick list.
    bytes_in_use: rounded bytes of live blocks; bytes_requested: exact bytes asked for by them.
    bytes_cached: reserved but not in use. reservations: slabs ever reserved;
    reservations_released: slabs given back by trim(). peak_*: high-water marks.
    """

    acquires: int
    releases: int
    hits: int
    misses: int
    quick_hits: int
    live_blocks: int
    bytes_in_use: int
    bytes_requested: int
    bytes_reserved: int
    bytes_cached: int
    peak_bytes_in_use: int
    peak_bytes_requested: int
    peak_bytes_reserved: int
    reservations: int
    reservations_released: int
    num_slabs: int
    cross_stream_fences: int

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


def _as_shape(shape: Any) -> tuple[int, ...]:
    if type(shape) is tuple:  # fast path: a tuple of non-negative Python ints
        for d in shape:
            if type(d) is not int or d < 0:
                break
        else:
            return shape
    if isinstance(shape, int) and not isinstance(shape, bool):
        shape = (shape,)
    if not isinstance(shape, (tuple, list, torch.Size)):
        raise TypeError(f"shape must be an int or a sequence of ints, got {type(shape).__name__} {shape!r}")
    out = tuple(shape)
    for d in out:
        if isinstance(d, bool) or not isinstance(d, int):
            raise TypeError(f"shape entries must be ints, got {d!r} in shape {out!r}")
        if d < 0:
            raise ValueError(f"shape entries must be >= 0, got {d} in shape {out!r}")
    return out


_STRIDES: dict[tuple[int, ...], tuple[int, ...]] = {}
# Bounded: cleared when full (dict get/set are atomic under the GIL, so no lock is needed).
STRIDE_CACHE_ENTRIES = 4096


def _contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    out = _STRIDES.get(shape)
    if out is not None:
        return out
    strides = [1] * len(shape)
    acc = 1
    for i in range(len(shape) - 1, -1, -1):
        strides[i] = acc
        acc *= max(shape[i], 1)
    if len(_STRIDES) >= STRIDE_CACHE_ENTRIES:
        _STRIDES.clear()
    out = _STRIDES[shape] = tuple(strides)
    return out


def _check_dtype(dtype: Any) -> torch.dtype:
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype (e.g. torch.bfloat16), got {dtype!r}")
    return dtype


def resolve_device(device: torch.device | str | int | None) -> torch.device:
    """A concrete CUDA device (with index) or the CPU; None picks CUDA when present. ValueError otherwise."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device must name a torch device such as 'cuda:0' or 'cpu', got {device!r}") from exc
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} requested but CUDA is not available; use device='cpu'")
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        if dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s) present")
    elif dev.type != "cpu":
        raise ValueError(f"device must be a CUDA device or 'cpu', got {device!r}")
    return dev


class DeviceBufferPool:
    """Size-bucketed buffers carved from a few large slabs on one device.

    Args:
        device: the pool's device (``"cuda"``, ``"cuda:1"``, ``"cpu"``); default: current CUDA
            device if available, else CPU.
        slab_bytes: size of one reservation; a request larger than this gets a slab of its own,
            rounded to 2 MiB. Default 256 MiB on CUDA, 16 MiB on CPU.
        max_bytes: bound on reserved bytes (None: unbounded). Requests that would exceed it first
            trim free slabs, then raise :class:`PoolExhaustedError`.
        stream_ops: how streams and fences are observed (tests inject a fake); default per device.

    Thread-safe: one lock guards the bookkeeping.
    """

    def __init__(
        self,
        device: str | torch.device | None = None,
        *,
        slab_bytes: int | None = None,
        max_bytes: int | None = None,
        stream_ops: StreamOps | None = None,
    ) -> None:
        dev = resolve_device(device)
        default_slab = (256 << 20) if dev.type == "cuda" else (16 << 20)
        slab = default_slab if slab_bytes is None else slab_bytes
        if isinstance(slab, bool) or not isinstance(slab, int) or slab < ALIGNMENT:
            raise ValueError(f"slab_bytes must be an int >= {ALIGNMENT}, got {slab_bytes!r}")
        if max_bytes is not None and (isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes <= 0):
            raise ValueError(f"max_bytes must be a positive int or None, got {max_bytes!r}")
        self.device = dev
        self._device_str = str(dev)
        self.slab_bytes = (slab + ALIGNMENT - 1) // ALIGNMENT * ALIGNMENT
        self.max_bytes = max_bytes
        self._streams: StreamOps = stream_ops or (_CudaStreams(dev) if dev.type == "cuda" else _NoStreams())
        self._lock = threading.Lock()
        self._slabs: dict[int, torch.Tensor] = {}
        self._typed: dict[tuple[int, torch.dtype], torch.Tensor] = {}
        self._slab_base: dict[int, int] = {}
        self._next_region = 0
        # Free ranges per stream key; key None = usable by any stream (fresh or fenced memory).
        self._free: dict[Hashable, _RangeAllocator] = {None: _RangeAllocator()}
        self._quick: dict[tuple[Hashable, tuple[int, ...], torch.dtype], list[_Block]] = {}
        self._quick_bytes = 0
        # (stream the ranges were released on, fence recorded on it, ranges)
        self._fenced: list[tuple[Hashable, Any, list[tuple[int, int, int]]]] = []
        self._live: dict[int, _Block] = {}
        self._empty_live: dict[int, torch.Tensor] = {}
        # counters
        self._acquires = self._releases = self._hits = self._misses = self._quick_hits = 0
        self._in_use = self._requested = self._reserved = 0
        self._peak_in_use = self._peak_requested = self._peak_reserved = 0
        self._reservations = self._reservations_released = self._fences = self._exhausted = 0

    # ------------------------------------------------------------------ public API
    def acquire(
        self, shape: Sequence[int] | int, dtype: torch.dtype, device: str | torch.device | None = None
    ) -> torch.Tensor:
        """A contiguous tensor of ``shape`` and ``dtype`` on the pool's device (contents undefined).

        ``device`` (optional) must be the pool's device; it is part of the provider protocol.
        """
        if device is not None and device != self.device and device != self._device_str:
            self._check_device(device)
        stream = self._streams.current_key()
        if type(shape) is tuple:
            # Quick path: a key only exists for a shape and dtype that were validated before
            # (an equal-hashing (2.0, True) must not match (2, 1): its types are checked on a hit).
            hit = self._quick_take((stream, shape, dtype), shape)
            if hit is not None:
                return hit
        shape_t = _as_shape(shape)
        if type(dtype) is not torch.dtype:
            dtype = _check_dtype(dtype)
        numel = math.prod(shape_t)
        if numel == 0:
            # Zero-element tensors own no memory (their data_ptr is 0): tracked by identity.
            t = torch.empty(shape_t, dtype=dtype, device=self.device)
            with self._lock:
                self._empty_live[id(t)] = t
                self._acquires += 1
                self._hits += 1
            return t
        if type(shape) is not tuple:
            hit = self._quick_take((stream, shape_t, dtype), shape_t)
            if hit is not None:
                return hit
        requested = numel * dtype.itemsize
        nbytes = round_size(requested)
        with self._lock:
            # Common case inline: a fit in this stream's free ranges; else the full search.
            alloc = self._free.get(stream)
            got = alloc.alloc(nbytes) if alloc is not None and alloc.free_bytes >= nbytes else None
            if got is not None:
                self._hits += 1
                blk = _Block(got[0], got[1], nbytes)
            else:
                blk = self._alloc_locked(nbytes, stream)
            blk.shape = shape_t
            self._acquires += 1
            self._take(blk, requested)
            typed = self._typed.get((blk.region, dtype))
            if typed is None:
                typed = self._typed[(blk.region, dtype)] = self._slabs[blk.region].view(dtype)
        # as_strided on a per-(slab, dtype) typed view: one torch call instead of slice+view+view.
        t = torch.as_strided(typed, shape_t, _contiguous_strides(shape_t), blk.offset // dtype.itemsize)
        blk.tensor = t
        return t

    def release(self, tensor: torch.Tensor) -> None:
        """Give a tensor obtained from :meth:`acquire` back to the pool.

        Raises ValueError for a tensor this pool did not hand out or that was already released.
        The memory is reused by the releasing stream at once and by other streams only after the
        work queued on the releasing stream up to this call has finished.
        """
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"release() takes a torch.Tensor from this pool, got {type(tensor).__name__}")
        if tensor.numel() == 0:
            with self._lock:
                if self._empty_live.pop(id(tensor), None) is None:
                    raise ValueError(
                        "release(): this zero-element tensor was not acquired from this pool or was already released"
                    )
                self._releases += 1
            return
        ptr = tensor.data_ptr()
        stream = self._streams.current_key()
        with self._lock:
            blk = self._live.pop(ptr, None)
            if blk is None:
                raise ValueError(self._explain_unknown(tensor, ptr))
            self._releases += 1
            self._in_use -= blk.nbytes
            self._requested -= blk.requested
            blk.stream = stream
            t = blk.tensor
            # Quick-list only the untouched tensor object we handed out (a caller may have
            # reshaped it in place or turned on requires_grad; such a block takes the slow path).
            if (
                blk.nbytes <= QUICK_LIST_MAX_BLOCK
                and tensor is t
                and t.shape == blk.shape
                and not t.requires_grad
                and t.is_contiguous()
            ):
                key = (stream, blk.shape, t.dtype)
                quick = self._quick.get(key)
                if quick is None:
                    if len(self._quick) >= QUICK_LIST_KEYS:
                        # Bounded: the oldest key's blocks go back to the free ranges.
                        old_key = next(iter(self._quick))
                        for old in self._quick.pop(old_key):
                            self._unquick(old_key[0], old)
                    quick = self._quick[key] = []
                if len(quick) < QUICK_LIST_DEPTH:
                    quick.append(blk)
                    self._quick_bytes += blk.nbytes
                    return
            blk.tensor = None
            self._free_range(stream, blk.region, blk.offset, blk.nbytes)

    def reserve(self, nbytes: int) -> None:
        """Reserve one slab of at least ``nbytes`` now (e.g. the known peak of a workload)."""
        if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes <= 0:
            raise ValueError(f"reserve(nbytes): nbytes must be a positive int, got {nbytes!r}")
        stream = self._streams.current_key()
        with self._lock:
            self._new_slab_locked(round_size(nbytes), exact=True, stream=stream)

    def trim(self) -> int:
        """Give fully free slabs back to torch's allocator; returns the bytes given back.

        Waits for the fences of blocks released on other streams (this is the one call that may
        block on the device). On CUDA follow with torch.cuda.empty_cache() to return the memory
        to the driver.
        """
        with self._lock:
            self._flush_quick_locked()
            self._settle_all_locked()
            return self._trim_free_slabs_locked()

    def consolidate(self, *, headroom: float = 0.05, release_cached: bool = True) -> int:
        """Replace every slab by one slab sized to the observed peak in use (times 1 + headroom).

        Call it between iterations of a repeating workload (no buffer may be live), e.g. after a
        warm-up iteration: later iterations then run from one reservation close to their real peak
        instead of the several slabs the warm-up grew. Resets the high-water marks. On CUDA,
        ``release_cached`` also empties torch's cache so the dropped slabs leave the device.
        Returns the new reserved bytes.
        """
        if not isinstance(headroom, (int, float)) or isinstance(headroom, bool) or not 0 <= headroom <= 4:
            raise ValueError(f"headroom must be a number in [0, 4], got {headroom!r}")
        with self._lock:
            if self._live or self._empty_live:
                raise ValueError(
                    f"consolidate() needs every buffer released; {len(self._live) + len(self._empty_live)} are live"
                )
            target = self._peak_in_use
        self.trim()
        if release_cached and self.device.type == "cuda":
            torch.cuda.empty_cache()
        stream = self._streams.current_key()
        with self._lock:
            if target > 0:
                size = (int(target * (1 + headroom)) + SLAB_GRANULE - 1) // SLAB_GRANULE * SLAB_GRANULE
                self._new_slab_locked(size, exact=True, stream=stream)
            self._peak_in_use = self._in_use
            self._peak_requested = self._requested
            self._peak_reserved = self._reserved
            return self._reserved

    def stats(self) -> PoolStats:
        """Counters and high-water marks, read consistently under the lock."""
        with self._lock:
            return PoolStats(
                acquires=self._acquires,
                releases=self._releases,
                hits=self._hits,
                misses=self._misses,
                quick_hits=self._quick_hits,
                live_blocks=len(self._live) + len(self._empty_live),
                bytes_in_use=self._in_use,
                bytes_requested=self._requested,
                bytes_reserved=self._reserved,
                bytes_cached=self._reserved - self._in_use,
                peak_bytes_in_use=self._peak_in_use,
                peak_bytes_requested=self._peak_requested,
                peak_bytes_reserved=self._peak_reserved,
                reservations=self._reservations,
                reservations_released=self._reservations_released,
                num_slabs=len(self._slabs),
                cross_stream_fences=self._fences,
            )

    def memory_stats(self) -> dict[str, int]:
        """This pool's counters under the keys of ``torch.cuda.memory_stats()`` (slabs = segments).

        Feed it (with :meth:`memory_snapshot`) to ``FragmentationReport.from_stats`` to get the same
        fragmentation report for the pool as for torch's caching allocator.
        """
        with self._lock:
            split_free = 0
            for segment in self._segments_locked().values():
                if any(state == "active_allocated" for _, _, state, _ in segment):
                    split_free += sum(size for _, size, state, _ in segment if state == "inactive")
            return {
                "allocated_bytes.all.current": self._in_use,
                "allocated_bytes.all.peak": self._peak_in_use,
                "requested_bytes.all.current": self._requested,
                "requested_bytes.all.peak": self._peak_requested,
                "reserved_bytes.all.current": self._reserved,
                "reserved_bytes.all.peak": self._peak_reserved,
                "inactive_split_bytes.all.current": split_free,
                "segment.all.current": len(self._slabs),
                "segment.all.allocated": self._reservations,
                "segment.all.freed": self._reservations_released,
                "num_alloc_retries": 0,
                "num_ooms": self._exhausted,
            }

    def memory_snapshot(self) -> list[dict[str, Any]]:
        """One entry per slab in the format of ``torch.cuda.memory_snapshot()``: blocks in address
        order with size, requested_size and state ("active_allocated" or "inactive")."""
        with self._lock:
            out = []
            for region, segment in sorted(self._segments_locked().items()):
                blocks: list[dict[str, Any]] = [
                    {"size": size, "requested_size": req, "state": state} for _, size, state, req in segment
                ]
                out.append(
                    {
                        "device": self.device.index if self.device.index is not None else -1,
                        "address": self._slab_base[region],
                        "total_size": self._slabs[region].numel(),
                        "allocated_size": sum(size for _, size, state, _ in segment if state == "active_allocated"),
                        "requested_size": sum(req for _, _, _, req in segment),
                        "blocks": blocks,
                    }
                )
            return out

    def _segments_locked(self) -> dict[int, list[tuple[int, int, str, int]]]:
        """region -> [(offset, size, state, requested)] sorted by offset; free = free ranges of any
        stream, fenced ranges and quick-listed blocks (all cached, not in use)."""
        segs: dict[int, list[tuple[int, int, str, int]]] = {r: [] for r in self._slabs}
        for blk in self._live.values():
            segs[blk.region].append((blk.offset, blk.nbytes, "active_allocated", blk.requested))
        free: list[tuple[int, int, int]] = []
        for alloc in self._free.values():
            free.extend((r, o, sz) for sz, r, o in alloc._sorted)
        for _, _, ranges in self._fenced:
            free.extend(ranges)
        for blocks in self._quick.values():
            free.extend((b.region, b.offset, b.nbytes) for b in blocks)
        for r, o, sz in free:
            segs[r].append((o, sz, "inactive", 0))
        for seg in segs.values():
            seg.sort()
        return segs

    def reset_peak_stats(self) -> None:
        """Set the high-water marks to the current values."""
        with self._lock:
            self._peak_in_use = self._in_use
            self._peak_requested = self._requested
            self._peak_reserved = self._reserved

    def __repr__(self) -> str:
        s = self.stats()
        return (
            f"DeviceBufferPool(device={self.device}, reserved={s.bytes_reserved}, in_use={s.bytes_in_use}, "
            f"slabs={s.num_slabs}, live={s.live_blocks})"
        )

    # ------------------------------------------------------------------ internals (lock held)
    def _quick_take(
        self, key: tuple[Hashable, tuple[int, ...], torch.dtype], shape: tuple[Any, ...]
    ) -> torch.Tensor | None:
        if key not in self._quick:  # lock-free miss (a dict lookup is atomic); re-checked under the lock
            return None
        for d in shape:
            if type(d) is not int:
                return None  # not a valid shape: the full validation path raises
        with self._lock:
            quick = self._quick.get(key)
            if not quick:
                return None
            blk = quick.pop()
            if not quick:
                del self._quick[key]
            self._quick_bytes -= blk.nbytes
            self._quick_hits += 1
            self._hits += 1
            self._acquires += 1
            self._take(blk, blk.requested)
            return blk.tensor

    def _check_device(self, device: Any) -> None:
        bare_cuda = device == "cuda" or (
            isinstance(device, torch.device) and device.type == "cuda" and device.index is None
        )
        if bare_cuda and self.device.type == "cuda":
            # "cuda" means the current device: cheap to check (no torch.device parse, no is_available).
            if torch.cuda.current_device() == self.device.index:
                return
            raise ValueError(
                f"this pool serves {self.device}, got device='cuda' while the current device is "
                f"cuda:{torch.cuda.current_device()}"
            )
        try:
            dev = torch.device(device)
        except (RuntimeError, TypeError) as exc:
            raise ValueError(f"device must name a torch device, got {device!r}") from exc
        if dev.type == "cuda" and dev.index is None and torch.cuda.is_available():
            dev = torch.device("cuda", torch.cuda.current_device())
        if dev != self.device:
            raise ValueError(f"this pool serves {self.device}, got a request for device {device!r}")

    def _take(self, blk: _Block, requested: int) -> None:
        blk.requested = requested
        self._live[self._slab_base[blk.region] + blk.offset] = blk
        self._in_use += blk.nbytes
        self._requested += requested
        if self._in_use > self._peak_in_use:
            self._peak_in_use = self._in_use
        if self._requested > self._peak_requested:
            self._peak_requested = self._requested

    def _free_range(self, stream: Hashable, region: int, offset: int, nbytes: int) -> None:
        alloc = self._free.get(stream)
        if alloc is None:
            alloc = self._free[stream] = _RangeAllocator()
        alloc.free(region, offset, nbytes)

    def _try_alloc(self, nbytes: int, stream: Hashable) -> _Block | None:
        for key in (stream, None) if stream is not None else (None,):
            alloc = self._free.get(key)
            if alloc is not None and alloc.free_bytes >= nbytes:
                got = alloc.alloc(nbytes)
                if got is not None:
                    return _Block(got[0], got[1], nbytes)
        return None

    def _alloc_locked(self, nbytes: int, stream: Hashable) -> _Block:
        blk = self._try_alloc(nbytes, stream)
        if blk is None:
            # Return quick-listed blocks to the free ranges (they may coalesce into a fit).
            self._flush_quick_locked()
            blk = self._try_alloc(nbytes, stream)
        if blk is None and self._reclaim_other_streams_locked(stream, wait=False):
            blk = self._try_alloc(nbytes, stream)
        if blk is not None:
            self._hits += 1
            return blk
        over = self.max_bytes is not None and self._reserved + self._new_slab_size(nbytes) > self.max_bytes
        if over:
            # Bounded: wait for other streams' blocks, then drop free slabs before growing.
            if self._reclaim_other_streams_locked(stream, wait=True):
                blk = self._try_alloc(nbytes, stream)
                if blk is not None:
                    self._hits += 1
                    return blk
            # Still no fit: wait for every stream (this one included) and drop fully free slabs.
            self._settle_all_locked()
            self._trim_free_slabs_locked()
        self._misses += 1
        region = self._new_slab_locked(nbytes, exact=False, stream=stream)
        got = self._free[stream].alloc(nbytes)
        if got is None or got[0] != region:  # cannot happen: the new slab holds nbytes
            raise RuntimeError("DeviceBufferPool internal error: new slab does not fit the request")
        return _Block(got[0], got[1], nbytes)

    def _new_slab_size(self, nbytes: int) -> int:
        if nbytes <= self.slab_bytes:
            size = self.slab_bytes
        else:
            size = (nbytes + SLAB_GRANULE - 1) // SLAB_GRANULE * SLAB_GRANULE
        if self.max_bytes is not None:
            # Near the bound, a smaller slab that still holds the request is better than failing.
            size = max(nbytes, min(size, self.max_bytes - self._reserved))
        return size

    def _new_slab_locked(self, nbytes: int, *, exact: bool, stream: Hashable) -> int:
        size = nbytes if exact else self._new_slab_size(nbytes)
        if self.max_bytes is not None and self._reserved + size > self.max_bytes:
            self._exhausted += 1
            raise PoolExhaustedError(
                f"DeviceBufferPool on {self.device}: a block of {nbytes} bytes needs a reservation of {size} bytes, "
                f"but {self._reserved} of max_bytes={self.max_bytes} are reserved "
                f"({self._in_use} in use); release buffers or raise max_bytes"
            )
        slab = torch.empty(size, dtype=torch.uint8, device=self.device)
        region = self._next_region
        self._next_region += 1
        self._slabs[region] = slab
        self._slab_base[region] = slab.data_ptr()
        # Fresh memory goes to the requesting stream's free ranges, so it coalesces with the blocks
        # that stream releases (free ranges of different streams never merge).
        self._free_range(stream, region, 0, size)
        self._reserved += size
        self._reservations += 1
        if self._reserved > self._peak_reserved:
            self._peak_reserved = self._reserved
        return region

    def _unquick(self, stream: Hashable, blk: _Block) -> None:
        blk.tensor = None
        self._quick_bytes -= blk.nbytes
        self._free_range(stream, blk.region, blk.offset, blk.nbytes)

    def _flush_quick_locked(self) -> None:
        for (stream, _, _), blocks in self._quick.items():
            for blk in blocks:
                self._unquick(stream, blk)
        self._quick.clear()

    def _fence_stream_locked(self, key: Hashable) -> None:
        alloc = self._free.get(key)
        if alloc is None or not len(alloc):
            return
        fence = self._streams.fence(key)
        self._fences += 1
        self._fenced.append((key, fence, alloc.take_all()))

    def _reclaim_other_streams_locked(self, stream: Hashable, *, wait: bool) -> bool:
        """Move other streams' free ranges whose fences completed into the shared pool.

        Ranges free on another stream get a fence (an event recorded on that stream now: it
        completes after every use queued there before the release). Ranges fenced earlier from
        ``stream`` itself go straight back to it (stream order suffices). Returns True if any moved.
        """
        for key in [k for k in self._free if k is not None and k != stream]:
            self._fence_stream_locked(key)
        moved = False
        still: list[tuple[Hashable, Any, list[tuple[int, int, int]]]] = []
        for key, fence, ranges in self._fenced:
            if key == stream:
                dest = stream
            else:
                if wait:
                    self._streams.wait(fence)
                if not self._streams.done(fence):
                    still.append((key, fence, ranges))
                    continue
                dest = None
            for r, o, sz in ranges:
                self._free_range(dest, r, o, sz)
            moved = True
        self._fenced = still
        return moved

    def _settle_all_locked(self) -> None:
        """Wait for every stream's fence and put all free ranges in the shared pool (trim, bounds)."""
        for key in [k for k in self._free if k is not None]:
            self._fence_stream_locked(key)
        for _, fence, ranges in self._fenced:
            self._streams.wait(fence)
            for r, o, sz in ranges:
                self._free[None].free(r, o, sz)
        self._fenced.clear()

    def _trim_free_slabs_locked(self) -> int:
        shared = self._free[None]
        freed = 0
        for region in list(self._slabs):
            size = self._slabs[region].numel()
            if shared.whole_region_free(region, size):
                shared.drop_region(region, size)
                del self._slabs[region]
                for key in [k for k in self._typed if k[0] == region]:
                    del self._typed[key]
                del self._slab_base[region]
                self._reserved -= size
                self._reservations_released += 1
                freed += size
        return freed

    def _explain_unknown(self, tensor: torch.Tensor, ptr: int) -> str:
        if tensor.device != self.device:
            return f"release(): tensor on {tensor.device} was not acquired from this pool (pool device {self.device})"
        for region, slab in self._slabs.items():
            base = self._slab_base[region]
            if base <= ptr < base + slab.numel():
                return (
                    f"release(): tensor at offset {ptr - base} of slab {region} is not currently acquired "
                    "(double release, or a view that does not start at an acquired buffer)"
                )
        return "release(): tensor was not acquired from this pool (foreign tensor)"
