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

from ._version import __version__
from .buffers import BufferProvider, KVCacheBlocks, KVCacheFullError, RingDoubleBuffers, TorchProvider, Workspace
from .fragmentation import FragmentationReport, OOMHook, fragmentation_report, install_oom_hook
from .numa import GpuPlacement, LibNuma, NumaNode, NumaTopology, load_libnuma, parse_cpulist, read_topology
from .pinned import ArenaStats, PinnedHostArena
from .pools import DeviceBufferPool, PoolExhaustedError, PoolStats, round_size

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
    "parse_cpulist",
    "read_topology",
    "round_size",
]
