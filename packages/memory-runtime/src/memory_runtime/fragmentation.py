"""Fragmentation report for any torch process, from memory_stats() and memory_snapshot().

Metrics (all from torch's public allocator statistics; a stats dict and a snapshot list can be
passed in, so the arithmetic is testable without a GPU):

- internal fragmentation: 1 - requested / allocated (bytes lost to the allocator's rounding)
- external fragmentation: inactive_split_bytes / reserved (free bytes stranded inside split
  segments, which cannot serve a large request)
- largest-hole ratio: largest free block in any segment / total free bytes in segments (from a
  snapshot; 1.0 = all free memory is one hole, near 0 = shredded)
- peak inflation: peak reserved / peak requested
- alloc retries (cudaMalloc failed, cache flushed, retried) and OOMs

:func:`install_oom_hook` writes the report as JSON when the caching allocator hits an OOM.
"""

from __future__ import annotations

import json
import math
import numbers
import operator
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

__all__ = ["FragmentationReport", "OOMHook", "fragmentation_report", "install_oom_hook"]


def _byte_count(value: Any, what: str) -> int:
    """A count from allocator statistics: a finite, non-negative number (ints, or floats from JSON)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{what} must be a number, got {value!r}")
    if not isinstance(value, numbers.Integral) and not math.isfinite(value):
        raise ValueError(f"{what} must be finite, got {value!r}")
    if value < 0:
        raise ValueError(f"{what} must be >= 0, got {value!r}")
    return operator.index(value) if isinstance(value, numbers.Integral) else int(float(value))


def _ratio(num: float | None, den: float | None) -> float | None:
    if num is None or den is None or den <= 0:
        return None
    return num / den


@dataclass(frozen=True)
class FragmentationReport:
    """Where memory goes in one device's caching allocator. None = not measurable from the input."""

    available: bool
    reason: str
    device: str
    source: str
    allocated_bytes: int | None = None
    requested_bytes: int | None = None
    reserved_bytes: int | None = None
    inactive_split_bytes: int | None = None
    free_in_segments_bytes: int | None = None
    peak_allocated_bytes: int | None = None
    peak_requested_bytes: int | None = None
    peak_reserved_bytes: int | None = None
    internal_fragmentation: float | None = None
    external_fragmentation: float | None = None
    largest_hole_bytes: int | None = None
    largest_hole_ratio: float | None = None
    peak_inflation: float | None = None
    num_alloc_retries: int | None = None
    num_ooms: int | None = None
    num_segments: int | None = None
    segments_allocated_total: int | None = None

    @classmethod
    def unavailable(cls, reason: str, device: str = "cpu") -> FragmentationReport:
        return cls(available=False, reason=reason, device=device, source="none")

    @classmethod
    def from_stats(
        cls,
        stats: Mapping[str, Any],
        snapshot: Sequence[Mapping[str, Any]] | Mapping[str, Any] | None = None,
        *,
        device: str = "cuda",
    ) -> FragmentationReport:
        """Build from a ``torch.cuda.memory_stats()`` dict and optionally a ``memory_snapshot()``.

        ``snapshot`` is the list of segments (each with ``blocks`` holding ``size`` and ``state``)
        or a dict with a ``segments`` key (``torch.cuda.memory._snapshot()``).
        """
        if not isinstance(stats, Mapping):
            raise TypeError(f"stats must be a dict from torch.cuda.memory_stats(), got {type(stats).__name__}")

        def get(key: str) -> int | None:
            value = stats.get(key)
            return None if value is None else _byte_count(value, f"memory_stats entry {key!r}")

        allocated = get("allocated_bytes.all.current")
        requested = get("requested_bytes.all.current")
        reserved = get("reserved_bytes.all.current")
        inactive = get("inactive_split_bytes.all.current")
        peak_alloc = get("allocated_bytes.all.peak")
        peak_req = get("requested_bytes.all.peak")
        peak_res = get("reserved_bytes.all.peak")
        # Orders every allocator keeps (requested <= allocated <= reserved, free split bytes within
        # the free bytes, peaks >= currents): a violation means the numbers are not one allocator's.
        free_in_segments = None if reserved is None or allocated is None else reserved - allocated
        for small, big in (
            ("requested_bytes.all.current", "allocated_bytes.all.current"),
            ("allocated_bytes.all.current", "reserved_bytes.all.current"),
            ("requested_bytes.all.peak", "allocated_bytes.all.peak"),
            ("allocated_bytes.all.peak", "reserved_bytes.all.peak"),
            ("requested_bytes.all.current", "requested_bytes.all.peak"),
            ("allocated_bytes.all.current", "allocated_bytes.all.peak"),
            ("reserved_bytes.all.current", "reserved_bytes.all.peak"),
        ):
            lo, hi = get(small), get(big)
            if lo is not None and hi is not None and lo > hi:
                raise ValueError(
                    f"inconsistent memory_stats: {small!r} = {lo} exceeds {big!r} = {hi} (no allocator reports that)"
                )
        if inactive is not None and free_in_segments is not None and inactive > free_in_segments:
            raise ValueError(
                f"inconsistent memory_stats: 'inactive_split_bytes.all.current' = {inactive} exceeds the free "
                f"bytes in segments (reserved - allocated = {free_in_segments})"
            )
        largest = None
        hole_ratio = None
        source = "memory_stats"
        if snapshot is not None:
            segments = snapshot.get("segments") if isinstance(snapshot, Mapping) else snapshot
            if not isinstance(segments, Sequence):
                raise ValueError("snapshot must be a list of segments or a dict with a 'segments' list")
            total_free = 0
            largest = 0
            for seg in segments:
                if not isinstance(seg, Mapping) or not isinstance(seg.get("blocks", []), Sequence):
                    raise ValueError(f"snapshot segment must be a dict with a 'blocks' list, got {seg!r}")
                for blk in seg.get("blocks", []):
                    if not isinstance(blk, Mapping):
                        raise ValueError(f"snapshot block must be a dict with 'size' and 'state', got {blk!r}")
                    if blk.get("state") == "inactive":
                        size = _byte_count(blk.get("size", 0), "snapshot block 'size'")
                        total_free += size
                        largest = max(largest, size)
            hole_ratio = largest / total_free if total_free > 0 else 1.0
            source = "memory_stats+snapshot"
        internal = external = None
        if allocated is not None and requested is not None:
            internal = 1.0 - requested / allocated if allocated > 0 else 0.0
        if reserved is not None and inactive is not None:
            external = inactive / reserved if reserved > 0 else 0.0
        return cls(
            available=True,
            reason="",
            device=device,
            source=source,
            allocated_bytes=allocated,
            requested_bytes=requested,
            reserved_bytes=reserved,
            inactive_split_bytes=inactive,
            free_in_segments_bytes=free_in_segments,
            peak_allocated_bytes=peak_alloc,
            peak_requested_bytes=peak_req,
            peak_reserved_bytes=peak_res,
            internal_fragmentation=internal,
            external_fragmentation=external,
            largest_hole_bytes=largest,
            largest_hole_ratio=hole_ratio,
            peak_inflation=_ratio(peak_res, peak_req),
            num_alloc_retries=get("num_alloc_retries"),
            num_ooms=get("num_ooms"),
            num_segments=get("segment.all.current"),
            segments_allocated_total=get("segment.all.allocated"),
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def summary(self) -> str:
        if not self.available:
            return f"fragmentation report ({self.device}): not available - {self.reason}"

        def pct(x: float | None) -> str:
            return "n/a" if x is None else f"{100 * x:.1f}%"

        def gib(x: int | None) -> str:
            return "n/a" if x is None else f"{x / 2**30:.3f} GiB"

        inflation = "n/a" if self.peak_inflation is None else f"{self.peak_inflation:.3f}x"
        return (
            f"{self.device}: reserved {gib(self.reserved_bytes)}, allocated {gib(self.allocated_bytes)}; "
            f"internal {pct(self.internal_fragmentation)}, external {pct(self.external_fragmentation)}, "
            f"largest hole {pct(self.largest_hole_ratio)} of free, peak inflation {inflation}, "
            f"retries {self.num_alloc_retries}, OOMs {self.num_ooms}"
        )


def fragmentation_report(
    device: int | str | torch.device | None = None, *, snapshot: bool = True
) -> FragmentationReport:
    """The report for a CUDA device of this process (default: current). On a machine without
    CUDA, an unavailable report saying why (there is no caching device allocator to inspect)."""
    if isinstance(device, bool):
        raise TypeError(f"device must be a CUDA device index, name or torch.device, got {device!r}")
    if not torch.cuda.is_available():
        return FragmentationReport.unavailable(
            "CUDA is not available: torch's CUDA caching allocator (the subject of this report) is not in use"
        )
    dev = torch.device(device) if device is not None and not isinstance(device, int) else None
    index = device if isinstance(device, int) else (dev.index if dev is not None and dev.index is not None else None)
    if dev is not None and dev.type != "cuda":
        raise ValueError(f"fragmentation_report takes a CUDA device, got {device!r}")
    if index is None:
        index = torch.cuda.current_device()
    stats = torch.cuda.memory_stats(index)
    snap = None
    if snapshot:
        snap = [s for s in torch.cuda.memory_snapshot() if s.get("device", index) == index]
    return FragmentationReport.from_stats(stats, snap, device=f"cuda:{index}")


class OOMHook:
    """Writes a fragmentation report (JSON) to ``path`` each time it is called at an OOM.

    ``installed`` says whether the CUDA allocator will call it; ``reason`` explains when not.
    ``stats_fn`` / ``snapshot_fn`` default to torch's; tests pass synthetic ones and call the hook.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        stats_fn: Callable[[int], Mapping[str, Any]] | None = None,
        snapshot_fn: Callable[[], Sequence[Mapping[str, Any]]] | None = None,
    ) -> None:
        self.path = Path(path)
        self.installed = False
        self.reason = ""
        self.calls = 0
        self._stats_fn = stats_fn or (lambda d: torch.cuda.memory_stats(d))
        self._snapshot_fn = snapshot_fn or torch.cuda.memory_snapshot
        self._lock = threading.Lock()

    def __call__(self, device: int, alloc: int, device_allocated: int, device_free: int) -> None:
        """Signature of torch's OOM observer: (device, requested bytes, device total allocated, free)."""
        with self._lock:
            self.calls += 1
            try:
                snap = [s for s in self._snapshot_fn() if s.get("device", device) == device]
            except Exception as exc:  # a failing snapshot must not hide the stats
                snap = None
                snapshot_error = f"{type(exc).__name__}: {exc}"
            else:
                snapshot_error = ""
            try:
                report = FragmentationReport.from_stats(self._stats_fn(device), snap, device=f"cuda:{device}")
            except (TypeError, ValueError) as exc:  # the OOM record is still written, saying why
                report = FragmentationReport.unavailable(f"memory stats rejected: {exc}", device=f"cuda:{device}")
            doc = {
                "event": "cuda_out_of_memory",
                "time_unix": time.time(),
                "device": device,
                "requested_bytes": alloc,
                "device_allocated_bytes": device_allocated,
                "device_free_bytes": device_free,
                "snapshot_error": snapshot_error,
                "report": report.to_dict(),
            }
            tmp = self.path.with_suffix(self.path.suffix + ".tmp")
            tmp.write_text(json.dumps(doc, indent=2))
            os.replace(tmp, self.path)


def install_oom_hook(path: str | os.PathLike[str]) -> OOMHook:
    """Have the CUDA caching allocator write a fragmentation report to ``path`` at every OOM.

    Uses ``torch._C._cuda_attach_out_of_memory_observer`` (present in CUDA builds of torch; the
    allocator calls observers after releasing its lock, so the hook may read stats). Where CUDA
    or that hook is missing, returns an OOMHook with ``installed=False`` and the reason; callers
    can still call it themselves when they catch ``torch.OutOfMemoryError``.
    """
    hook = OOMHook(path)
    if not torch.cuda.is_available():
        hook.reason = "CUDA is not available: no device allocator to observe"
        return hook
    attach = getattr(torch._C, "_cuda_attach_out_of_memory_observer", None)
    if attach is None:
        hook.reason = "this torch build has no _cuda_attach_out_of_memory_observer; call the hook on OutOfMemoryError"
        return hook
    attach(hook)
    hook.installed = True
    return hook
