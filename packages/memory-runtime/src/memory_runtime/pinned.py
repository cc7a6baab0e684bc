"""Exact-size, NUMA-bound, page-locked host arenas.

torch's pinned allocator (CachingHostAllocator) rounds every request up to a power of two, so a
20.4 GiB pinned buffer locks 32 GiB. A :class:`PinnedHostArena` maps exactly the requested bytes
(rounded to the page size), binds them to a NUMA node with mbind (libnuma, when present),
touches them so they are placed, registers them with CUDA once (cudaHostRegister), and then
sub-allocates tensors from them with size classes -- no further pinning calls.

Fallbacks, each stated in :attr:`PinnedHostArena.notes`: no libnuma or no NUMA -> memory is not
bound; no CUDA -> memory is not registered (plain, page-aligned host memory).
"""

from __future__ import annotations

import ctypes
import mmap
import os
import threading
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from .checks import MAX_DIM, check_count, check_dtype, contiguous_strides, normalize_shape, request_nbytes
from .numa import load_libnuma, read_topology
from .ranges import RangeAllocator, round_size

__all__ = ["ArenaStats", "PinnedHostArena"]

# cudaHostRegisterPortable: the memory counts as pinned for every CUDA context of the process.
CUDA_HOST_REGISTER_PORTABLE = 1
# Pages sampled by placement() (move_pages in query mode) -- enough to catch a misplaced arena.
PLACEMENT_SAMPLE_PAGES = 256
# Pre-touch threads (page faults are per-thread work) and the smallest chunk worth a thread.
PRETOUCH_THREADS = 8
PRETOUCH_MIN_CHUNK = 64 << 20
# Transparent huge pages only pay off for large arenas.
HUGEPAGE_MIN_BYTES = 64 << 20


@dataclass(frozen=True)
class ArenaStats:
    """bytes_requested: the size asked for; bytes_reserved: mapped (page-rounded);
    bytes_pinned: page-locked through CUDA (0 when not registered); in_use: sub-allocated."""

    bytes_requested: int
    bytes_reserved: int
    bytes_pinned: int
    bytes_in_use: int
    peak_bytes_in_use: int
    live_blocks: int
    acquires: int
    releases: int

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


class PinnedHostArena:
    """One mmap'ed host region of exactly ``nbytes`` (page-rounded), optionally NUMA-bound and pinned.

    Args:
        nbytes: bytes to map (> 0).
        node: NUMA node to bind to (None: no binding). Must exist in the topology read from
            ``sysfs_root``; binding needs libnuma (else a note explains why it is unbound).
        register: page-lock with cudaHostRegister when CUDA is available.
        pretouch: write every page once after binding, so pages are placed on ``node`` now
            rather than at first use (in parallel threads: ctypes.memset releases the GIL).
        hugepages: advise transparent huge pages for arenas of 64 MiB and more (off by default:
            where memory must be compacted first, huge pages make pinning slower, not faster).
        sysfs_root: where to read the NUMA topology (tests pass a synthetic tree).

    ``acquire(shape, dtype)`` returns a tensor viewing the arena; ``release(tensor)`` returns it.
    ``close()`` unregisters and unmaps; any use after it raises ValueError.
    """

    def __init__(
        self,
        nbytes: int,
        *,
        node: int | None = None,
        register: bool = True,
        pretouch: bool = True,
        hugepages: bool = False,
        sysfs_root: str = "/sys",
    ) -> None:
        nbytes = check_count(nbytes, "nbytes", minimum=1)
        if node is not None:
            node = check_count(node, "node (a NUMA node id, or None)", maximum=MAX_DIM)
            topo = read_topology(sysfs_root, use_nvml=False, gpu_pci_addresses=[])
            if node not in topo.node_ids:
                raise ValueError(f"NUMA node {node} does not exist; nodes present: {topo.node_ids}")
        page = mmap.PAGESIZE
        size = (nbytes + page - 1) // page * page
        self.node = node
        self.notes: list[str] = []
        self._lock = threading.Lock()
        self._closed = False
        self._requested = nbytes
        self._size = size
        self._mm = mmap.mmap(
            -1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, prot=mmap.PROT_READ | mmap.PROT_WRITE
        )
        # A ctypes array over the mapping holds a buffer export on it, and every tensor made from
        # it (torch.frombuffer keeps a reference to its buffer object) keeps that export alive:
        # mmap.close() then refuses to unmap while any tensor still views the arena.
        self._cbuf = (ctypes.c_char * size).from_buffer(self._mm)
        self._addr = ctypes.addressof(self._cbuf)
        self.bound = False
        if node is not None:
            lib, reason = load_libnuma()
            if lib is None:
                self.notes.append(f"not bound to node {node}: {reason}")
            else:
                try:
                    lib.mbind(self._addr, size, node)
                except (OSError, ValueError):
                    del self._cbuf  # drop the export, then unmap: nothing outlives a failed constructor
                    self._mm.close()
                    raise
                self.bound = True
        if hugepages and size >= HUGEPAGE_MIN_BYTES and hasattr(mmap, "MADV_HUGEPAGE"):
            # Transparent huge pages: 512x fewer page faults to touch and fewer pages to pin.
            try:
                self._mm.madvise(mmap.MADV_HUGEPAGE)
            except OSError as exc:
                self.notes.append(f"no transparent huge pages: {exc}")
        if pretouch:
            self._pretouch(size)
        self.pinned = False
        if register:
            self.pinned = self._register()
        else:
            self.notes.append("not registered with CUDA: register=False")
        self._base = torch.frombuffer(self._cbuf, dtype=torch.uint8)
        self._typed: dict[torch.dtype, torch.Tensor] = {torch.uint8: self._base}
        self._free = RangeAllocator()
        self._free.free(0, size)
        self._live: dict[int, tuple[torch.Tensor, int, int]] = {}
        self._in_use = self._peak = self._acquires = self._releases = 0

    # ------------------------------------------------------------------ public
    @property
    def address(self) -> int:
        self._check_open()
        return self._addr

    @property
    def closed(self) -> bool:
        return self._closed

    def acquire(
        self, shape: Sequence[int] | int, dtype: torch.dtype, device: str | torch.device | None = None
    ) -> torch.Tensor:
        """A contiguous CPU tensor of ``shape``/``dtype`` viewing the arena (pinned if registered)."""
        if device is not None and device != "cpu":
            try:
                is_cpu = torch.device(device).type == "cpu"
            except (RuntimeError, TypeError):
                is_cpu = False
            if not is_cpu:
                raise ValueError(f"a PinnedHostArena hands out host (cpu) tensors, got device={device!r}")
        shape_t = normalize_shape(shape)
        dtype = check_dtype(dtype)
        nbytes = round_size(max(request_nbytes(shape_t, dtype), 1))
        with self._lock:
            self._check_open()
            offset = self._free.alloc(nbytes)
            if offset is None:
                raise MemoryError(
                    f"PinnedHostArena: no free range of {nbytes} bytes for shape {shape_t} {dtype} "
                    f"({self._in_use} of {self._size} bytes in use, largest free range {self._free.largest()})"
                )
            typed = self._typed.get(dtype)
            if typed is None:
                typed = self._typed[dtype] = self._base.view(dtype)
            t = torch.as_strided(typed, shape_t, contiguous_strides(shape_t), offset // dtype.itemsize)
            # Keyed by identity (zero-element tensors report data_ptr 0); holding the tensor keeps
            # its id from being reused by another object before release.
            self._live[id(t)] = (t, offset, nbytes)
            self._in_use += nbytes
            self._peak = max(self._peak, self._in_use)
            self._acquires += 1
            return t

    def release(self, tensor: torch.Tensor) -> None:
        """Return a tensor from :meth:`acquire`; ValueError for foreign or already released tensors."""
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"release() takes a torch.Tensor from this arena, got {type(tensor).__name__}")
        with self._lock:
            self._check_open()
            entry = self._live.get(id(tensor))
            if entry is None or entry[0] is not tensor:
                raise ValueError(
                    "release(): tensor was not acquired from this arena or was already released "
                    "(pass the exact tensor object acquire() returned)"
                )
            del self._live[id(tensor)]
            _, offset, nbytes = entry
            self._free.free(offset, nbytes)
            self._in_use -= nbytes
            self._releases += 1

    def stats(self) -> ArenaStats:
        with self._lock:
            return ArenaStats(
                bytes_requested=self._requested,
                bytes_reserved=self._size,
                bytes_pinned=self._size if self.pinned else 0,
                bytes_in_use=self._in_use,
                peak_bytes_in_use=self._peak,
                live_blocks=len(self._live),
                acquires=self._acquires,
                releases=self._releases,
            )

    def placement(self, max_pages: int = PLACEMENT_SAMPLE_PAGES) -> tuple[dict[int, int] | None, str]:
        """Nodes of up to ``max_pages`` evenly spaced pages (move_pages query): ({node: count}, "")
        or (None, reason) where libnuma is absent. Negative keys are errnos (e.g. -2: not resident)."""
        self._check_open()
        lib, reason = load_libnuma()
        if lib is None:
            return None, reason
        page = mmap.PAGESIZE
        n_pages = self._size // page
        step = max(1, n_pages // max(1, max_pages))
        addrs = [self._addr + i * page for i in range(0, n_pages, step)][:max_pages]
        counts: dict[int, int] = {}
        for node in lib.page_nodes(addrs):
            counts[node] = counts.get(node, 0) + 1
        return counts, ""

    def verify_placement(self) -> tuple[bool | None, str]:
        """(True, detail) if every sampled page is on ``node``; (None, reason) if it cannot be checked."""
        if self.node is None:
            return None, "arena not bound to a node"
        counts, reason = self.placement()
        if counts is None:
            return None, reason
        ok = set(counts) == {self.node}
        return ok, f"sampled pages per node: {counts}"

    def close(self, *, force: bool = False) -> None:
        """Unregister from CUDA and unmap. Live sub-allocations make this raise unless ``force``."""
        with self._lock:
            if self._closed:
                return
            if self._live and not force:
                raise ValueError(
                    f"PinnedHostArena.close(): {len(self._live)} buffer(s) still acquired; release them "
                    "or call close(force=True)"
                )
            if self.pinned:
                # Pending async copies from this memory (on any device) must finish before it is unregistered.
                for index in range(torch.cuda.device_count()):
                    torch.cuda.synchronize(index)
                torch.cuda.cudart().cudaHostUnregister(self._addr)
                self.pinned = False
            self._closed = True
            self._live.clear()
            self._typed.clear()
            del self._base
            del self._cbuf
            try:
                self._mm.close()
            except BufferError:
                # Tensors a caller still holds export the buffer: the mapping is freed with the last one.
                self.notes.append("mapping outlives close(): tensors still reference it")

    def __enter__(self) -> PinnedHostArena:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close(force=True)

    def __del__(self) -> None:
        try:
            if not self._closed:
                self.close(force=True)
        except Exception:  # a finalizer must not raise (interpreter shutdown may have torn down CUDA)
            pass

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"{self._in_use}/{self._size} bytes in use"
        return f"PinnedHostArena({self._requested} bytes, node={self.node}, pinned={self.pinned}, {state})"

    # ------------------------------------------------------------------ internals
    def _check_open(self) -> None:
        if self._closed:
            raise ValueError("PinnedHostArena is closed; create a new arena")

    def _pretouch(self, size: int) -> None:
        threads = max(1, min(PRETOUCH_THREADS, os.cpu_count() or 1, size // PRETOUCH_MIN_CHUNK))
        if threads == 1:
            ctypes.memset(self._addr, 0, size)
            return
        chunk = (size // threads + mmap.PAGESIZE - 1) // mmap.PAGESIZE * mmap.PAGESIZE
        parts = [(self._addr + i * chunk, min(chunk, size - i * chunk)) for i in range(threads) if i * chunk < size]
        workers = [threading.Thread(target=ctypes.memset, args=(a, 0, n)) for a, n in parts]
        for w in workers:
            w.start()
        for w in workers:
            w.join()

    def _register(self) -> bool:
        if not torch.cuda.is_available():
            self.notes.append("not registered with CUDA: no CUDA device (plain page-aligned host memory)")
            return False
        try:
            cudart = torch.cuda.cudart()
            rc = cudart.cudaHostRegister(self._addr, self._size, CUDA_HOST_REGISTER_PORTABLE)
        except (AttributeError, RuntimeError) as exc:
            self.notes.append(f"not registered with CUDA: cudaHostRegister unavailable ({exc})")
            return False
        code = int(getattr(rc, "value", rc))
        if code != 0:
            self.notes.append(f"not registered with CUDA: cudaHostRegister returned error {code} ({rc})")
            return False
        return True
