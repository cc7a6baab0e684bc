"""NUMA topology from sysfs and the system libnuma through ctypes.

Topology is read from a sysfs tree whose root is configurable (``sysfs_root``), so tests use
synthetic trees: ``devices/system/node/node<N>/{cpulist,meminfo,distance}`` and each GPU's node
from ``bus/pci/devices/<pci address>/numa_node``. GPU PCI addresses come from NVML when it is
present, else from ``class/drm/card*/device`` (NVIDIA vendor id 0x10de), or are given.

libnuma is bound with ctypes (the published ``numa`` package does not build on current Python
and exposes neither mbind nor move_pages). Where libnuma or NUMA is absent, :func:`load_libnuma`
returns None and a reason string, and callers fall back to unbound memory.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import re
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "GpuPlacement",
    "LibNuma",
    "NumaNode",
    "NumaTopology",
    "load_libnuma",
    "normalize_pci_address",
    "parse_cpulist",
    "read_host_meminfo",
    "read_topology",
    "used_bytes",
]

NVIDIA_VENDOR_ID = "0x10de"
# mbind(2) policy and flags (linux/mempolicy.h)
MPOL_BIND = 2
MPOL_MF_STRICT = 1 << 0
MPOL_MF_MOVE = 1 << 1


# Linux supports at most 8192 CPUs (CONFIG_NR_CPUS); larger ids are malformed input, and the
# bound keeps a cpulist like "0-99999999999" from building a list of that length.
MAX_CPU_ID = 1 << 16


def parse_cpulist(text: str) -> list[int]:
    """Parse a kernel cpulist such as ``"0-3,8-11,16"`` (empty -> []).

    TypeError for a non-str; ValueError for a malformed list or CPU ids of ``MAX_CPU_ID`` and above.
    """
    if not isinstance(text, str):
        raise TypeError(f"cpulist must be a str such as '0-3,8', got {type(text).__name__} {text!r}")
    out: list[int] = []
    text = text.strip()
    if not text:
        return out
    for part in text.split(","):
        part = part.strip()
        m = re.fullmatch(r"(\d+)(?:-(\d+))?(?::(\d+))?", part)
        if not m:
            raise ValueError(f"malformed cpulist entry {part!r} in {text!r} (expected forms like '0-3,8,10-15')")
        lo = int(m.group(1))
        hi = int(m.group(2)) if m.group(2) else lo
        step = int(m.group(3)) if m.group(3) else 1
        if hi < lo or step == 0:
            raise ValueError(f"malformed cpulist range {part!r} in {text!r}: end before start or zero stride")
        if hi >= MAX_CPU_ID:
            raise ValueError(f"cpulist entry {part!r} in {text!r} names CPU {hi}; CPU ids must be < {MAX_CPU_ID}")
        out.extend(range(lo, hi + 1, step))
    return out


def used_bytes(meminfo: dict[str, int]) -> int | None:
    """Memory in use by a node or the host, by one definition for both:
    ``MemTotal - MemFree - FilePages - SReclaimable``.

    Page cache (FilePages) and reclaimable kernel slab count as free, as the kernel hands them
    back on demand -- the per-node counterpart of ``MemTotal - MemAvailable``, which nodes do not
    report. ``meminfo`` is a node's meminfo or the host's /proc/meminfo as parsed here (the host's
    FilePages is Buffers + Cached + SwapCached). None when a field is missing.
    """
    try:
        used = meminfo["MemTotal"] - meminfo["MemFree"] - meminfo["FilePages"] - meminfo["SReclaimable"]
    except KeyError:
        return None
    return max(used, 0)


def read_host_meminfo(proc_root: str | os.PathLike[str] = "/proc") -> dict[str, int]:
    """``<proc_root>/meminfo`` as {field: bytes}, with FilePages added (Buffers + Cached + SwapCached,
    the host-wide sum of the nodes' FilePages). Empty where the file is absent (not Linux)."""
    text = _read(Path(proc_root) / "meminfo")
    out = _parse_meminfo(text or "", r"\s*(\w+):\s+(\d+)(\s*kB)?")
    if "Cached" in out and "FilePages" not in out:
        out["FilePages"] = out["Cached"] + out.get("Buffers", 0) + out.get("SwapCached", 0)
    return out


def normalize_pci_address(addr: str) -> str:
    """``"00000000:17:00.0"`` (NVML) or ``"0000:17:00.0"`` (sysfs) -> ``"0000:17:00.0"`` (lower case)."""
    if not isinstance(addr, str):
        raise TypeError(f"PCI address must be a str such as '0000:17:00.0', got {type(addr).__name__} {addr!r}")
    m = re.fullmatch(r"(?:([0-9a-fA-F]+):)?([0-9a-fA-F]{2}):([0-9a-fA-F]{2})\.([0-7])", addr.strip())
    if not m:
        raise ValueError(f"not a PCI address: {addr!r} (expected domain:bus:device.function, e.g. 0000:17:00.0)")
    domain = int(m.group(1) or "0", 16)
    return f"{domain:04x}:{m.group(2).lower()}:{m.group(3).lower()}.{m.group(4)}"


@dataclass(frozen=True)
class NumaNode:
    """One NUMA node: its CPUs and memory (bytes, from the node's meminfo).

    ``mem_free_bytes`` is MemFree (page cache not included); ``mem_used_bytes`` counts page cache
    and reclaimable slab as free (see :func:`used_bytes`), as the host-wide figures do.
    """

    id: int
    cpus: tuple[int, ...]
    mem_total_bytes: int | None
    mem_free_bytes: int | None
    distances: tuple[int, ...] = ()
    mem_used_bytes: int | None = None


@dataclass(frozen=True)
class GpuPlacement:
    """A GPU's PCI address and the NUMA node it hangs off (None: unknown / not reported)."""

    index: int
    pci_address: str
    numa_node: int | None
    source: str


@dataclass(frozen=True)
class NumaTopology:
    """Nodes and GPU placement read from one sysfs tree.

    ``numa`` is False when the tree has no node directories (a kernel without NUMA); ``nodes`` then
    holds one pseudo-node covering the machine and ``reason`` says so.
    """

    nodes: tuple[NumaNode, ...]
    gpus: tuple[GpuPlacement, ...]
    sysfs_root: str
    numa: bool
    reason: str = ""
    gpu_source: str = ""
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def node_ids(self) -> list[int]:
        return [n.id for n in self.nodes]

    def node(self, node_id: int) -> NumaNode:
        for n in self.nodes:
            if n.id == node_id:
                return n
        raise ValueError(f"NUMA node {node_id!r} does not exist; nodes present: {self.node_ids}")

    def gpu_node(self, gpu_index: int) -> int | None:
        for g in self.gpus:
            if g.index == gpu_index:
                return g.numa_node
        raise ValueError(f"GPU {gpu_index!r} not in the topology; GPUs: {[g.index for g in self.gpus]}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        lines = [
            f"NUMA: {'yes' if self.numa else 'no'} ({len(self.nodes)} node(s)){' - ' + self.reason if self.reason else ''}"
        ]
        for n in self.nodes:
            mem = f"{n.mem_total_bytes / 2**30:.1f} GiB" if n.mem_total_bytes is not None else "? GiB"
            lines.append(f"  node {n.id}: {len(n.cpus)} CPUs, {mem}")
        if self.gpus:
            for g in self.gpus:
                lines.append(f"  GPU {g.index} ({g.pci_address}) -> node {g.numa_node} [{g.source}]")
        else:
            lines.append(f"  no GPUs found ({self.gpu_source or 'none'})")
        return "\n".join(lines)


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def _parse_distances(text: str, path: Path) -> tuple[int, ...]:
    """A node's ``distance`` file: whitespace-separated ints (ValueError naming the file otherwise)."""
    try:
        return tuple(int(x) for x in text.split())
    except ValueError:
        raise ValueError(
            f"malformed NUMA distance file {path}: {text.strip()!r} (expected ints like '10 21')"
        ) from None


def _parse_meminfo(text: str, pattern: str) -> dict[str, int]:
    """meminfo lines -> {field: value}: values in kB become bytes, counts (HugePages_*) stay."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        m = re.match(pattern, line)
        if m:
            out[m.group(1)] = int(m.group(2)) * (1024 if m.group(3) else 1)
    return out


def _parse_node_meminfo(text: str) -> dict[str, int]:
    """``Node 0 MemTotal:  131072 kB`` lines -> {"MemTotal": bytes, ...}."""
    return _parse_meminfo(text, r"\s*Node\s+\d+\s+(\w+):\s+(\d+)(\s*kB)?")


def _nvml_pci_addresses() -> tuple[list[str] | None, str]:
    try:
        import pynvml
    except ImportError:
        return None, "nvidia-ml-py not installed"
    try:
        pynvml.nvmlInit()
    except Exception as exc:  # NVMLError_LibraryNotFound / DriverNotLoaded on machines without a GPU
        return None, f"NVML unavailable: {exc}"
    try:
        out = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            bus = pynvml.nvmlDeviceGetPciInfo(pynvml.nvmlDeviceGetHandleByIndex(i)).busId
            out.append(normalize_pci_address(bus.decode() if isinstance(bus, bytes) else bus))
        return out, "nvml"
    finally:
        with contextlib.suppress(Exception):
            pynvml.nvmlShutdown()


def _drm_pci_addresses(root: Path) -> list[str]:
    out: list[str] = []
    drm = root / "class" / "drm"
    if not drm.is_dir():
        return out
    for card in sorted(drm.iterdir(), key=lambda p: p.name):
        if not re.fullmatch(r"card\d+", card.name):
            continue
        vendor = _read(card / "device" / "vendor")
        if vendor is None or vendor.strip().lower() != NVIDIA_VENDOR_ID:
            continue
        try:
            addr = os.path.basename(os.path.realpath(card / "device"))
            out.append(normalize_pci_address(addr))
        except ValueError:
            continue
    return sorted(set(out))


def read_topology(
    sysfs_root: str | os.PathLike[str] = "/sys",
    *,
    gpu_pci_addresses: list[str] | None = None,
    use_nvml: bool = True,
) -> NumaTopology:
    """Read NUMA nodes and GPU -> node placement from ``sysfs_root``.

    GPU addresses: ``gpu_pci_addresses`` if given (index = position), else NVML (when
    ``use_nvml`` and a driver is present), else NVIDIA cards under ``class/drm``.
    """
    root = Path(sysfs_root)
    if not root.is_dir():
        raise ValueError(f"sysfs_root {str(root)!r} is not a directory")
    node_dir = root / "devices" / "system" / "node"
    nodes: list[NumaNode] = []
    notes: list[str] = []
    if node_dir.is_dir():
        for d in sorted(node_dir.iterdir(), key=lambda p: p.name):
            m = re.fullmatch(r"node(\d+)", d.name)
            if not m:
                continue
            cpus = parse_cpulist(_read(d / "cpulist") or "")
            meminfo = _parse_node_meminfo(_read(d / "meminfo") or "")
            dist_text = _read(d / "distance")
            distances = _parse_distances(dist_text or "", d / "distance")
            nodes.append(
                NumaNode(
                    int(m.group(1)),
                    tuple(cpus),
                    meminfo.get("MemTotal"),
                    meminfo.get("MemFree"),
                    distances,
                    used_bytes(meminfo),
                )
            )
        nodes.sort(key=lambda n: n.id)
    numa = bool(nodes)
    reason = ""
    if not numa:
        reason = f"no NUMA nodes under {node_dir} (kernel without NUMA, or not Linux): one pseudo-node"
        nodes = [NumaNode(0, tuple(range(os.cpu_count() or 1)), None, None)]

    addrs: list[str] | None = None
    if gpu_pci_addresses is not None:
        addrs, source = [normalize_pci_address(a) for a in gpu_pci_addresses], "given"
    elif use_nvml:
        addrs, source = _nvml_pci_addresses()
        if addrs is None:
            notes.append(source)
    if addrs is None:
        addrs, source = _drm_pci_addresses(root), "sysfs class/drm"
    gpus: list[GpuPlacement] = []
    for i, addr in enumerate(addrs):
        text = _read(root / "bus" / "pci" / "devices" / addr / "numa_node")
        node: int | None = None
        if text is not None and text.strip().lstrip("-").isdigit():
            value = int(text.strip())
            # -1: the platform does not report it; on a one-node machine the answer is still node 0.
            node = value if value >= 0 else (nodes[0].id if len(nodes) == 1 else None)
        elif len(nodes) == 1:
            node = nodes[0].id
        gpus.append(GpuPlacement(i, addr, node, source))
    return NumaTopology(tuple(nodes), tuple(gpus), str(root), numa, reason, source, tuple(notes))


class LibNuma:
    """The few libnuma calls the arenas need, bound with ctypes."""

    def __init__(self, lib: ctypes.CDLL, path: str) -> None:
        self._lib = lib
        self.path = path
        lib.numa_available.restype = ctypes.c_int
        lib.numa_max_node.restype = ctypes.c_int
        lib.mbind.restype = ctypes.c_long
        lib.mbind.argtypes = [
            ctypes.c_void_p,
            ctypes.c_ulong,
            ctypes.c_int,
            ctypes.POINTER(ctypes.c_ulong),
            ctypes.c_ulong,
            ctypes.c_uint,
        ]
        lib.move_pages.restype = ctypes.c_long
        lib.move_pages.argtypes = [
            ctypes.c_int,
            ctypes.c_ulong,
            ctypes.POINTER(ctypes.c_void_p),
            ctypes.POINTER(ctypes.c_int),
            ctypes.POINTER(ctypes.c_int),
            ctypes.c_int,
        ]

    def max_node(self) -> int:
        return int(self._lib.numa_max_node())

    def mbind(self, address: int, length: int, node: int, *, strict: bool = True) -> None:
        """Bind [address, address+length) to ``node`` (MPOL_BIND); pages already present are moved."""
        max_node = self.max_node()
        if not 0 <= node <= max_node:
            raise ValueError(f"NUMA node {node} does not exist (libnuma reports nodes 0..{max_node})")
        words = node // 64 + 1
        mask = (ctypes.c_ulong * words)()
        mask[node // 64] = 1 << (node % 64)
        flags = MPOL_MF_MOVE | (MPOL_MF_STRICT if strict else 0)
        # maxnode counts bits; the kernel reads maxnode - 1 of them.
        rc = self._lib.mbind(ctypes.c_void_p(address), length, MPOL_BIND, mask, words * 64 + 1, flags)
        if rc != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"mbind(node={node}) failed: {os.strerror(err) if err else 'unknown error'}")

    def page_nodes(self, addresses: list[int]) -> list[int]:
        """move_pages in query mode: the node of each page (negative errno if not resident)."""
        n = len(addresses)
        pages = (ctypes.c_void_p * n)(*addresses)
        status = (ctypes.c_int * n)()
        rc = self._lib.move_pages(0, n, pages, None, status, 0)
        if rc < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"move_pages query failed: {os.strerror(err) if err else 'unknown error'}")
        return list(status)


_LIBNUMA_LOCK = threading.Lock()
_LIBNUMA: tuple[LibNuma | None, str] | None = None


def load_libnuma() -> tuple[LibNuma | None, str]:
    """(LibNuma, "") when the system libnuma loads and reports NUMA, else (None, reason). Cached."""
    global _LIBNUMA
    with _LIBNUMA_LOCK:
        if _LIBNUMA is None:
            _LIBNUMA = _load_libnuma_uncached()
        return _LIBNUMA


def _load_libnuma_uncached() -> tuple[LibNuma | None, str]:
    candidates = [c for c in (ctypes.util.find_library("numa"), "libnuma.so.1", "libnuma.so") if c]
    errors = []
    for name in candidates:
        try:
            lib = ctypes.CDLL(name, use_errno=True)
        except OSError as exc:
            errors.append(f"{name}: {exc}")
            continue
        try:
            wrapped = LibNuma(lib, name)
        except AttributeError as exc:
            return None, f"{name} lacks a needed symbol ({exc})"
        if lib.numa_available() < 0:
            return None, f"{name} loaded but numa_available() < 0: the kernel reports no NUMA support"
        return wrapped, ""
    detail = "; ".join(errors) if errors else "not found by ctypes.util.find_library('numa')"
    return None, f"libnuma not available ({detail}); install the system package libnuma1 to bind memory to nodes"
