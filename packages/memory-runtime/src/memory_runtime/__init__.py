"""memory-runtime: fragment-aware, NUMA-aware GPU and pinned host memory for PyTorch.

Standalone (depends on no attn-* package). Public names:

- :class:`DeviceBufferPool` -- size-bucketed, slab-carved, stream-aware, bounded device buffers
  (``acquire(shape, dtype, device)`` / ``release(tensor)``: the buffer-provider protocol)
- :class:`KVCacheBlocks`, :class:`RingDoubleBuffers`, :class:`Workspace` -- typed attention buffers
- :class:`FragmentationReport`, :func:`fragmentation_report`, :func:`install_oom_hook`
- :func:`read_topology` (NUMA nodes, GPU -> node), :func:`load_libnuma`
- :class:`PinnedHostArena` -- exact-size, NUMA-bound, CUDA-registered host memory
- ``python -m memory_runtime monitor`` -- see :mod:`memory_runtime.monitor`
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._version import __version__

# Public name -> submodule. Loaded on first use (PEP 562), so `python -m memory_runtime monitor`
# starts without importing torch (the monitor needs only psutil, NVML and sysfs).
_EXPORTS = {
    "BufferProvider": "buffers",
    "KVCacheBlocks": "buffers",
    "KVCacheFullError": "buffers",
    "RingDoubleBuffers": "buffers",
    "TorchProvider": "buffers",
    "Workspace": "buffers",
    "FragmentationReport": "fragmentation",
    "OOMHook": "fragmentation",
    "fragmentation_report": "fragmentation",
    "install_oom_hook": "fragmentation",
    "GpuPlacement": "numa",
    "LibNuma": "numa",
    "NumaNode": "numa",
    "NumaTopology": "numa",
    "load_libnuma": "numa",
    "parse_cpulist": "numa",
    "read_topology": "numa",
    "ArenaStats": "pinned",
    "PinnedHostArena": "pinned",
    "DeviceBufferPool": "pools",
    "PoolExhaustedError": "pools",
    "PoolStats": "pools",
    "round_size": "ranges",
    "native_status": "_native",
}

if TYPE_CHECKING:
    from ._native import native_status
    from .buffers import BufferProvider, KVCacheBlocks, KVCacheFullError, RingDoubleBuffers, TorchProvider, Workspace
    from .fragmentation import FragmentationReport, OOMHook, fragmentation_report, install_oom_hook
    from .numa import GpuPlacement, LibNuma, NumaNode, NumaTopology, load_libnuma, parse_cpulist, read_topology
    from .pinned import ArenaStats, PinnedHostArena
    from .pools import DeviceBufferPool, PoolExhaustedError, PoolStats
    from .ranges import round_size


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'memory_runtime' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


__all__ = [
    "ArenaStats",
    "BufferProvider",
    "DeviceBufferPool",
    "FragmentationReport",
    "GpuPlacement",
    "KVCacheBlocks",
    "KVCacheFullError",
    "LibNuma",
    "NumaNode",
    "NumaTopology",
    "OOMHook",
    "PinnedHostArena",
    "PoolExhaustedError",
    "PoolStats",
    "RingDoubleBuffers",
    "TorchProvider",
    "Workspace",
    "__version__",
    "fragmentation_report",
    "install_oom_hook",
    "load_libnuma",
    "native_status",
    "parse_cpulist",
    "read_topology",
    "round_size",
]
