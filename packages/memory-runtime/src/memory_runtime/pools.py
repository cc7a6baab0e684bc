"""Device buffer pools: size-bucketed, slab-carved, stream-aware, thread-safe, bounded.

A :class:`DeviceBufferPool` hands out tensors that are views into a few large reservations
("slabs": ``torch.empty(n, dtype=torch.uint8)`` on the pool's device), so a workload whose shapes
vary from step to step stops asking the device allocator for memory once it is warm.

How a request is served (bookkeeping under one lock):

1. Requested bytes are rounded up to a size class: multiples of ``2**(floor(log2 n) - 6)``
   (at least 512 bytes), so rounding waste is below 1/64 of the request (or 512 bytes).
2. Address-ordered first fit over the free byte ranges of the slabs (split on allocation,
   coalesced with free neighbours on release), with a two-ended placement (below).
3. Otherwise a new slab is reserved (bounded by ``max_bytes``; fully free slabs are trimmed first).
4. The block is returned as a plain tensor on the slab's storage (not an autograd view of the
   slab), a new tensor object each time.

Native hot path. Where a C++ compiler and ninja are present, acquire/release of the common case
(a tuple shape, a fit in the current stream's free ranges, the lock free) run in a small torch
C++ extension built on first use (``memory_runtime._native``), several times faster than the same
steps in Python (tools/bench_memory.py measures both paths beside torch's allocator).
It works on the same state as the Python methods, which handle everything else; ``native=False``
selects the Python path, and tests run both.

Placement. Free space stays in one piece when buffers that live long are kept apart from the
short-lived ones around them. ``acquire(..., long_lived=True)`` marks a buffer that outlives the
buffers acquired after it (e.g. a layer output kept until the next step's output exists). Each
long-lived buffer goes to the end of the address space opposite the previous long-lived buffer,
and short-lived buffers are carved next to the latest long-lived one, growing toward the middle.
In a step of a variable-length attention workload -- the previous output at one end, this step's
q/k/v/lse/grads beside it, this step's output at the other end -- freeing the step's buffers and
the previous output leaves one contiguous free range, so a slab the size of the peak suffices
(first fit without hints strands 5-13 % of such a slab between outputs). Without hints every
buffer is short-lived: first fit from the top.

Warm-up then :meth:`consolidate`: after a warm-up pass of a repeating workload, ``consolidate()``
replaces the slabs the warm-up grew by one reservation of the observed peak times
``1 + headroom``; later passes run without new device allocations and with reserved memory close
to their peak (measured by tools/bench_memory.py).

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

import itertools
import threading
from collections.abc import Callable, Hashable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from .checks import (
    MAX_DIM,
    check_count,
    check_dtype,
    contiguous_strides,
    normalize_shape,
    request_nbytes,
    resolve_device,
)
from .ranges import ALIGNMENT, OFFSET_MASK, REGION_SHIFT, RangeAllocator, round_size
from .streams import CudaStreams, NoStreams, StreamOps, cuda_current_device

__all__ = [
    "ALIGNMENT",
    "DeviceBufferPool",
    "PoolExhaustedError",
    "PoolStats",
    "round_size",
]

# Large CUDA reservations are rounded like the caching allocator rounds them, so none is wasted
# (on CPU to ALIGNMENT).
SLAB_GRANULE = 2 << 20
# Validated (shape, dtype) -> (requested bytes, rounded bytes, strides, itemsize), per pool.
META_CACHE_ENTRIES = 4096


class PoolExhaustedError(MemoryError):
    """The pool's byte bound (``max_bytes``) does not admit the request."""


class _Counters:
    """The counters a pool's Python and native paths share (the native build has its own type
    with these fields, so both update one object)."""

    __slots__ = ("hits", "in_use", "long_top", "misses", "peak_in_use", "peak_requested", "requested")

    def __init__(self) -> None:
        self.hits = self.misses = 0
        self.in_use = self.requested = self.peak_in_use = self.peak_requested = 0
        self.long_top = True


def _resolve_native(native: bool | None) -> tuple[Any, str]:
    """(extension module or None, reason) for a pool's ``native`` argument."""
    if native is not None and not isinstance(native, bool):
        raise TypeError(f"native must be True, False or None, got {native!r}")
    if native is False:
        return None, "native=False: Python path requested"
    from ._native import load

    module, reason = load()
    if module is None and native:
        raise RuntimeError(f"DeviceBufferPool(native=True): the native hot path is unavailable: {reason}")
    return module, reason


@dataclass(frozen=True)
class PoolStats:
    """A consistent snapshot of a pool's counters (bytes are device bytes).

    hits: acquires served from cached memory; misses: acquires that reserved a new slab.
    bytes_in_use: rounded bytes of live blocks; bytes_requested: exact bytes asked for by them.
    bytes_cached: reserved but not in use. reservations: slabs ever reserved;
    reservations_released: slabs given back by trim() / consolidate(). peak_*: high-water marks.
    """

    acquires: int
    releases: int
    hits: int
    misses: int
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


class DeviceBufferPool:
    """Size-bucketed buffers carved from a few large slabs on one device.

    Args:
        device: the pool's device (``"cuda"``, ``"cuda:1"``, ``"cpu"``); default: current CUDA
            device if available, else CPU.
        slab_bytes: size of one reservation; a request larger than this gets a slab of its own,
            rounded to 2 MiB on CUDA. Default 256 MiB on CUDA, 16 MiB on CPU.
        max_bytes: bound on reserved bytes (None: unbounded). Requests that would exceed it first
            trim free slabs, then raise :class:`PoolExhaustedError`.
        stream_ops: how streams and fences are observed (tests inject a fake); default per device.
        native: run acquire/release through the native hot path (``memory_runtime._native``):
            None (default) when it can be built here, True to require it (RuntimeError naming
            the reason otherwise), False for the pure-Python path. Both paths behave the same;
            ``pool.native`` and ``pool.native_reason`` say which one runs and why.

    Thread-safe: one lock guards the bookkeeping.
    """

    def __init__(
        self,
        device: str | torch.device | None = None,
        *,
        slab_bytes: int | None = None,
        max_bytes: int | None = None,
        stream_ops: StreamOps | None = None,
        native: bool | None = None,
    ) -> None:
        dev = resolve_device(device)
        default_slab = (256 << 20) if dev.type == "cuda" else (16 << 20)
        slab = default_slab if slab_bytes is None else check_count(slab_bytes, "slab_bytes", minimum=ALIGNMENT)
        if max_bytes is not None:
            max_bytes = check_count(max_bytes, "max_bytes (or None)", minimum=1, maximum=MAX_DIM)
        self.device = dev
        self._device_str = str(dev)
        self._cuda_index = dev.index if dev.type == "cuda" else None
        self.slab_bytes = (slab + ALIGNMENT - 1) // ALIGNMENT * ALIGNMENT
        self.max_bytes = max_bytes
        self._granule = SLAB_GRANULE if dev.type == "cuda" else ALIGNMENT
        self._streams: StreamOps = stream_ops or (CudaStreams(dev) if dev.type == "cuda" else NoStreams())
        self._current_key: Callable[[], Hashable] = self._streams.current_key
        self._note_stream: Callable[[Hashable], None] | None = getattr(self._streams, "note_stream", None)
        native_module, self.native_reason = _resolve_native(native)
        self.native = native_module is not None
        self._native_module = native_module
        # The native Lock is a mutex with threading.Lock's interface that the native path can take
        # without a Python call.
        self._lock = native_module.Lock() if native_module is not None else threading.Lock()
        self._range_cls: Callable[[], RangeAllocator] = (
            native_module.RangeAllocator if native_module is not None else RangeAllocator
        )
        self._slabs: dict[int, torch.Tensor] = {}
        # region -> {dtype: the slab viewed as that dtype} (the base of every view carved from it)
        self._typed: dict[int, dict[torch.dtype, torch.Tensor]] = {}
        self._slab_base: dict[int, int] = {}
        # Free ranges per stream key; key None = usable by any stream (fresh or fenced memory).
        self._free: dict[Hashable, RangeAllocator] = {None: self._range_cls()}
        # (stream the ranges were released on, fence recorded on it, ranges)
        self._fenced: list[tuple[Hashable, Any, list[tuple[int, int]]]] = []
        # data_ptr -> (start key, rounded bytes, requested bytes)
        self._live: dict[int, tuple[int, int, int]] = native_module.LiveMap() if native_module is not None else {}
        self._empty_live: dict[int, torch.Tensor] = {}
        self._meta: dict[tuple[tuple[int, ...], torch.dtype], tuple[int, int, tuple[int, ...], int]] = {}
        # Counters both paths update (acquires = hits + misses, releases = acquires - live blocks) and
        # the placement end (long_top: the latest long-lived block sits at the top; see module doc).
        self._n: _Counters = native_module.Counters() if native_module is not None else _Counters()
        self._reserved = self._peak_reserved = 0
        self._reservations = self._reservations_released = self._fences = self._exhausted = 0
        if native_module is not None:
            # The common case of acquire/release runs natively on the state above; everything else
            # (new slabs, other streams' memory, zero-size buffers, errors) calls the methods below.
            fast = native_module.FastPath(
                pool=self,
                py_acquire=type(self).acquire,
                py_release=type(self).release,
                free=self._free,
                live=self._live,
                typed=self._typed,
                lock=self._lock,
                **self._native_stream_key(),
                device=self.device,
                device_str=self._device_str,
                get_device=cuda_current_device,
                cuda_index=-1 if self._cuda_index is None else self._cuda_index,
                counters=self._n,
            )
            self.acquire = fast.acquire  # type: ignore[method-assign]
            self.release = fast.release  # type: ignore[method-assign]

    # ------------------------------------------------------------------ public API
    def acquire(
        self,
        shape: Sequence[int] | int,
        dtype: torch.dtype,
        device: str | torch.device | None = None,
        *,
        long_lived: bool = False,
    ) -> torch.Tensor:
        """A contiguous tensor of ``shape`` and ``dtype`` on the pool's device (contents undefined).

        ``device`` (optional) must be the pool's device; it is part of the provider protocol.
        ``long_lived``: a placement hint -- this buffer outlives buffers acquired after it (e.g. a
        step's output kept until the next step's output exists). It changes where the block is
        carved (see the module doc), never what is returned.
        """
        # "cuda" means the current device: one C call when that is this pool's device
        if (
            device is not None
            and device is not self.device
            and device != self._device_str
            and not (device == "cuda" and self._cuda_index is not None and cuda_current_device() == self._cuda_index)
        ):
            self._check_device(device)
        stream = self._current_key()
        # Every shape is normalised (numpy ints, tensors, lists -> a tuple of Python ints) before
        # the cache lookup, so an equal-hashing entry of another type (8.0 or True for 8/1) never
        # hits a valid pair's entry; the native path hands all but plain int tuples to this method.
        shape = normalize_shape(shape)
        if type(dtype) is not torch.dtype:
            dtype = check_dtype(dtype)
        meta = self._meta.get((shape, dtype))
        if meta is None:
            # First sight of this (shape, dtype): size it (bounded, before anything is allocated).
            requested = request_nbytes(shape, dtype)
            if requested == 0:
                return self._acquire_empty(shape, dtype)
            meta = (requested, round_size(requested), contiguous_strides(shape), dtype.itemsize)
            with self._lock:  # bounded: cleared when full
                if len(self._meta) >= META_CACHE_ENTRIES:
                    self._meta.clear()
                self._meta[(shape, dtype)] = meta
        requested, nbytes, strides, itemsize = meta
        lock = self._lock
        lock.acquire()
        try:
            # placement: long-lived blocks alternate ends, short-lived ones sit by the latest long one
            if long_lived:
                top = not self._n.long_top
                self._n.long_top = top
            else:
                top = self._n.long_top
            alloc = self._free.get(stream)
            key = alloc.alloc(nbytes, top) if alloc is not None else None
            if key is None:
                key = self._alloc_slow(nbytes, stream, top)
            else:
                self._n.hits += 1
            region = key >> REGION_SHIFT
            offset = key & OFFSET_MASK
            self._live[self._slab_base[region] + offset] = (key, nbytes, requested)
            in_use = self._n.in_use = self._n.in_use + nbytes
            if in_use > self._n.peak_in_use:
                self._n.peak_in_use = in_use
            req = self._n.requested = self._n.requested + requested
            if req > self._n.peak_requested:
                self._n.peak_requested = req
            typed = self._typed[region].get(dtype)
            if typed is None:
                typed = self._typed[region][dtype] = self._slabs[region].view(dtype)
        finally:
            lock.release()
        # Outside the lock: the block as a tensor of its own on the slab's storage. detach() makes
        # it a plain tensor rather than an autograd view of the slab, so an in-place op with
        # grad-requiring inputs on one buffer never pulls the slab (and every other buffer carved
        # from it) into the graph. The native path makes the same kind of tensor.
        return torch.as_strided(typed, shape, strides, offset // itemsize).detach()

    def release(self, tensor: torch.Tensor) -> None:
        """Give a tensor obtained from :meth:`acquire` back to the pool.

        Raises ValueError for a tensor this pool did not hand out or that was already released.
        The memory is reused by the releasing stream at once and by other streams only after the
        work queued on the releasing stream up to this call has finished. Do not use the tensor
        after releasing it: its memory may already belong to a later acquire.
        """
        if type(tensor) is not torch.Tensor and not isinstance(tensor, torch.Tensor):
            raise TypeError(f"release() takes a torch.Tensor from this pool, got {type(tensor).__name__}")
        ptr = tensor.data_ptr()
        stream = self._current_key()
        lock = self._lock
        lock.acquire()
        try:
            entry = self._live.pop(ptr, None)
            if entry is None:
                self._release_other_locked(tensor, ptr)  # zero-element tensors, or a clear error
                return
            key, nbytes, requested = entry
            self._n.in_use -= nbytes
            self._n.requested -= requested
            alloc = self._free.get(stream)
            if alloc is None:
                alloc = self._new_stream_locked(stream)
            alloc.free(key, nbytes)
        finally:
            lock.release()

    def reserve(self, nbytes: int) -> None:
        """Reserve one slab of at least ``nbytes`` now (e.g. the known peak of a workload)."""
        nbytes = check_count(nbytes, "reserve(nbytes): nbytes", minimum=1)
        stream = self._current_key()
        with self._lock:
            self._new_slab_locked(round_size(nbytes), exact=True, stream=stream)

    def trim(self) -> int:
        """Give fully free slabs back to torch's allocator; returns the bytes given back.

        Waits for the fences of blocks released on other streams (this is the one call that may
        block on the device). On CUDA follow with torch.cuda.empty_cache() to return the memory
        to the driver.
        """
        with self._lock:
            self._settle_all_locked()
            return self._trim_free_slabs_locked()

    def consolidate(self, *, headroom: float = 0.05, release_cached: bool = True) -> int:
        """Replace every slab by one slab sized to the observed peak in use (times 1 + headroom).

        The "warm-up, then consolidate" step of a repeating workload: call it between iterations
        (no buffer may be live), e.g. after a warm-up pass. Later passes then run from one
        reservation close to their real peak instead of the several slabs the warm-up grew, and
        reserve nothing new as long as their peak stays within the headroom (a pass that needs
        more still gets it: the pool grows and counts a miss). Resets the high-water marks. On
        CUDA, ``release_cached`` also empties torch's cache so the dropped slabs leave the device.
        Returns the new reserved bytes.
        """
        if not isinstance(headroom, (int, float)) or isinstance(headroom, bool) or not 0 <= headroom <= 4:
            raise ValueError(f"headroom must be a number in [0, 4], got {headroom!r}")
        with self._lock:
            if self._live or self._empty_live:
                raise ValueError(
                    f"consolidate() needs every buffer released; {len(self._live) + len(self._empty_live)} are live"
                )
            target = self._n.peak_in_use
        self.trim()
        if release_cached and self.device.type == "cuda":
            torch.cuda.empty_cache()
        stream = self._current_key()
        with self._lock:
            if target > 0:
                g = self._granule
                size = (int(target * (1 + headroom)) + g - 1) // g * g
                self._new_slab_locked(size, exact=True, stream=stream)
            self._n.long_top = True
            self._n.peak_in_use = self._n.in_use
            self._n.peak_requested = self._n.requested
            self._peak_reserved = self._reserved
            return self._reserved

    def stats(self) -> PoolStats:
        """Counters and high-water marks, read consistently under the lock."""
        with self._lock:
            acquires = self._n.hits + self._n.misses
            live = len(self._live) + len(self._empty_live)
            return PoolStats(
                acquires=acquires,
                releases=acquires - live,
                hits=self._n.hits,
                misses=self._n.misses,
                live_blocks=live,
                bytes_in_use=self._n.in_use,
                bytes_requested=self._n.requested,
                bytes_reserved=self._reserved,
                bytes_cached=self._reserved - self._n.in_use,
                peak_bytes_in_use=self._n.peak_in_use,
                peak_bytes_requested=self._n.peak_requested,
                peak_bytes_reserved=self._peak_reserved,
                reservations=self._reservations,
                reservations_released=self._reservations_released,
                num_slabs=len(self._slabs),
                cross_stream_fences=self._fences,
            )

    # ------------------------------------------------------------------ internals
    def _native_stream_key(self) -> dict[str, Any]:
        """How the native path reads the current stream's key: current_key(key_arg), current_key(),
        or None for "always None" (CPU)."""
        streams = self._streams
        if isinstance(streams, NoStreams):
            return {"current_key": None, "key_arg": None}
        if isinstance(streams, CudaStreams) and bool(getattr(self._native_module, "WITH_CUDA", False)):
            return {"current_key": True, "key_arg": None}  # read in C++ (c10::cuda)
        if isinstance(streams, CudaStreams) and streams.raw_current is not None:
            return {"current_key": streams.raw_current, "key_arg": streams.index}
        return {"current_key": self._current_key, "key_arg": None}

    def _acquire_empty(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        # Zero-element tensors own no memory (their data_ptr is 0): tracked by identity.
        t = torch.empty(shape, dtype=dtype, device=self.device)
        with self._lock:
            self._empty_live[id(t)] = t
            self._n.hits += 1
        return t

    def _release_other_locked(self, tensor: torch.Tensor, ptr: int) -> None:
        if tensor.numel() == 0:
            if self._empty_live.pop(id(tensor), None) is None:
                raise ValueError(
                    "release(): this zero-element tensor was not acquired from this pool or was already released"
                )
            return
        raise ValueError(self._explain_unknown(tensor, ptr))

    def _check_device(self, device: Any) -> None:
        bare_cuda = device == "cuda" or (
            isinstance(device, torch.device) and device.type == "cuda" and device.index is None
        )
        if bare_cuda and self.device.type == "cuda":
            # "cuda" means the current device: cheap to check (no torch.device parse, no is_available).
            current = cuda_current_device()
            if current == self.device.index:
                return
            raise ValueError(
                f"this pool serves {self.device}, got device='cuda' while the current device is cuda:{current}"
            )
        try:
            dev = resolve_device(device)
        except ValueError as exc:
            raise ValueError(f"this pool serves {self.device}, got a request for device {device!r}: {exc}") from None
        if dev != self.device:
            raise ValueError(f"this pool serves {self.device}, got a request for device {device!r}")

    def _new_stream_locked(self, stream: Hashable) -> RangeAllocator:
        """Free ranges for a stream seen for the first time (it is the current stream now)."""
        if self._note_stream is not None and stream is not None:
            self._note_stream(stream)
        alloc = self._free[stream] = self._range_cls()
        return alloc

    def _free_range(self, stream: Hashable, key: int, nbytes: int) -> None:
        alloc = self._free.get(stream)
        if alloc is None:
            alloc = self._new_stream_locked(stream)
        alloc.free(key, nbytes)

    def _try_alloc(self, nbytes: int, stream: Hashable, top: bool) -> int | None:
        for skey in (stream, None) if stream is not None else (None,):
            alloc = self._free.get(skey)
            if alloc is not None:
                key = alloc.alloc(nbytes, top)
                if key is not None:
                    return key
        return None

    def _alloc_slow(self, nbytes: int, stream: Hashable, top: bool) -> int:
        """No fit in this stream's free ranges: shared ranges, other streams'
        completed ranges, then (bounded) waiting and trimming, then a new slab."""
        key = self._try_alloc(nbytes, stream, top)
        if key is None and self._reclaim_other_streams_locked(stream, wait=False):
            key = self._try_alloc(nbytes, stream, top)
        if key is not None:
            self._n.hits += 1
            return key
        over = self.max_bytes is not None and self._reserved + self._new_slab_size(nbytes) > self.max_bytes
        if over:
            # Bounded: wait for other streams' blocks, then drop free slabs before growing.
            if self._reclaim_other_streams_locked(stream, wait=True):
                key = self._try_alloc(nbytes, stream, top)
                if key is not None:
                    self._n.hits += 1
                    return key
            # Still no fit: wait for every stream (this one included) and drop fully free slabs.
            self._settle_all_locked()
            self._trim_free_slabs_locked()
        region = self._new_slab_locked(nbytes, exact=False, stream=stream)
        key = self._free[stream].alloc(nbytes, top)
        if key is None or key >> REGION_SHIFT != region:  # cannot happen: the new slab holds nbytes
            raise RuntimeError("DeviceBufferPool internal error: new slab does not fit the request")
        self._n.misses += 1
        return key

    def _new_slab_size(self, nbytes: int) -> int:
        if nbytes <= self.slab_bytes:
            size = self.slab_bytes
        else:
            size = (nbytes + self._granule - 1) // self._granule * self._granule
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
                f"({self._n.in_use} in use); release buffers or raise max_bytes"
            )
        slab = torch.empty(size, dtype=torch.uint8, device=self.device)
        # the lowest free region number: keys (region << REGION_SHIFT) stay far below 2**64
        region = next(r for r in itertools.count() if r not in self._slabs)
        self._slabs[region] = slab
        self._typed[region] = {}
        self._slab_base[region] = slab.data_ptr()
        # Fresh memory goes to the requesting stream's free ranges, so it coalesces with the blocks
        # that stream releases (free ranges of different streams never merge).
        self._free_range(stream, region << REGION_SHIFT, size)
        self._reserved += size
        self._reservations += 1
        if self._reserved > self._peak_reserved:
            self._peak_reserved = self._reserved
        return region

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
        still: list[tuple[Hashable, Any, list[tuple[int, int]]]] = []
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
            for start, size in ranges:
                self._free_range(dest, start, size)
            moved = True
        self._fenced = still
        return moved

    def _settle_all_locked(self) -> None:
        """Wait for every stream's fence and put all free ranges in the shared pool (trim, bounds)."""
        for key in [k for k in self._free if k is not None]:
            self._fence_stream_locked(key)
        shared = self._free[None]
        for _, fence, ranges in self._fenced:
            self._streams.wait(fence)
            for start, size in ranges:
                shared.free(start, size)
        self._fenced.clear()

    def _trim_free_slabs_locked(self) -> int:
        shared = self._free[None]
        freed = 0
        for region in list(self._slabs):
            size = self._slabs[region].numel()
            if shared.whole_region_free(region, size):
                shared.drop_region(region, size)
                del self._slabs[region]
                del self._typed[region]
                del self._slab_base[region]
                self._reserved -= size
                self._reservations_released += 1
                freed += size
        return freed

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
                "allocated_bytes.all.current": self._n.in_use,
                "allocated_bytes.all.peak": self._n.peak_in_use,
                "requested_bytes.all.current": self._n.requested,
                "requested_bytes.all.peak": self._n.peak_requested,
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
        stream and fenced ranges (all cached, not in use)."""
        segs: dict[int, list[tuple[int, int, str, int]]] = {r: [] for r in self._slabs}
        for entry in self._live.values():
            key = entry[0]
            segs[key >> REGION_SHIFT].append((key & OFFSET_MASK, entry[1], "active_allocated", entry[2]))
        free: list[tuple[int, int]] = []
        for alloc in self._free.values():
            free.extend(alloc.ranges())
        for _, _, ranges in self._fenced:
            free.extend(ranges)
        for key, size in free:
            segs[key >> REGION_SHIFT].append((key & OFFSET_MASK, size, "inactive", 0))
        for seg in segs.values():
            seg.sort()
        return segs

    def reset_peak_stats(self) -> None:
        """Set the high-water marks to the current values."""
        with self._lock:
            self._n.peak_in_use = self._n.in_use
            self._n.peak_requested = self._n.requested
            self._peak_reserved = self._reserved

    def __repr__(self) -> str:
        s = self.stats()
        return (
            f"DeviceBufferPool(device={self.device}, reserved={s.bytes_reserved}, in_use={s.bytes_in_use}, "
            f"slabs={s.num_slabs}, live={s.live_blocks})"
        )

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
