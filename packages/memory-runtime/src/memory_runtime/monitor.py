"""Per-GPU and per-NUMA-node memory monitor (NVML via nvidia-ml-py, psutil, sysfs).

``python -m memory_runtime monitor [--once] [--json] [--interval S] [--duration S] [--plot out.png]``

JSON schema (``SCHEMA`` = "memory_runtime.monitor/1"), one object per sample; with ``--json`` and
several samples, one object per line::

    {
      "schema": "memory_runtime.monitor/1",
      "time_unix": float,
      "hostname": str,
      "host": {"total_bytes": int, "available_bytes": int, "used_bytes": int, "percent": float},
      "numa": {"numa": bool, "reason": str,
               "nodes": [{"node": int, "cpus": int, "total_bytes": int|null, "free_bytes": int|null,
                          "used_bytes": int|null}]},
      "gpu_status": "ok" | "no GPU: <reason>",
      "gpus": [{"index": int, "name": str, "pci_address": str, "numa_node": int|null,
                "memory_total_bytes": int, "memory_used_bytes": int, "memory_free_bytes": int,
                "utilization_gpu_percent": int|null, "utilization_memory_percent": int|null}]
    }

Keys are only ever added to this schema, never renamed or removed, within version 1.

"Used" means one thing for the host and for each node: ``MemTotal - MemFree - FilePages -
SReclaimable`` (page cache and reclaimable slab count as free; :func:`memory_runtime.numa.used_bytes`),
from /proc/meminfo and each node's meminfo, so on a one-node machine host and node agree. Where
/proc/meminfo is absent (not Linux), the host's used is ``total - available`` from psutil.
``percent`` is used / total; ``available_bytes`` is the kernel's MemAvailable; a node's
``free_bytes`` is its MemFree (the machine's, for the one pseudo-node of a kernel without NUMA).
"""

from __future__ import annotations

import json
import math
import socket
import sys
import time
from pathlib import Path
from typing import Any, TextIO

import psutil

from .numa import read_host_meminfo, read_topology, used_bytes

__all__ = ["SCHEMA", "Monitor", "main", "plot_timeline"]

SCHEMA = "memory_runtime.monitor/1"
# One day: longer sleeps overflow time.sleep on some platforms and are not a monitor's job.
MAX_INTERVAL_S = 86400.0


class Monitor:
    """Takes samples; holds NVML open between them. Use as a context manager or call close()."""

    def __init__(self, *, sysfs_root: str = "/sys", proc_root: str = "/proc", use_nvml: bool = True) -> None:
        self.sysfs_root = sysfs_root
        self.proc_root = proc_root
        self._nvml: Any = None
        self.gpu_status = "ok"
        if not use_nvml:
            self.gpu_status = "no GPU: NVML disabled"
            return
        try:
            import pynvml
        except ImportError:
            self.gpu_status = "no GPU: nvidia-ml-py (pynvml) is not installed"
            return
        try:
            pynvml.nvmlInit()
        except Exception as exc:  # no driver / no library: a machine without an NVIDIA GPU
            self.gpu_status = f"no GPU: NVML could not start ({exc})"
            return
        if pynvml.nvmlDeviceGetCount() == 0:
            self.gpu_status = "no GPU: NVML reports 0 devices"
            pynvml.nvmlShutdown()
            return
        self._nvml = pynvml

    def _gpus(self) -> list[dict[str, Any]]:
        nv = self._nvml
        if nv is None:
            return []
        out = []
        for i in range(nv.nvmlDeviceGetCount()):
            h = nv.nvmlDeviceGetHandleByIndex(i)
            mem = nv.nvmlDeviceGetMemoryInfo(h)
            name = nv.nvmlDeviceGetName(h)
            bus = nv.nvmlDeviceGetPciInfo(h).busId
            try:
                util = nv.nvmlDeviceGetUtilizationRates(h)
                gpu_util: int | None = int(util.gpu)
                mem_util: int | None = int(util.memory)
            except Exception:  # not supported on some devices / MIG
                gpu_util = mem_util = None
            out.append(
                {
                    "index": i,
                    "name": name.decode() if isinstance(name, bytes) else str(name),
                    "pci_address": bus.decode() if isinstance(bus, bytes) else str(bus),
                    "numa_node": None,
                    "memory_total_bytes": int(mem.total),
                    "memory_used_bytes": int(mem.used),
                    "memory_free_bytes": int(mem.free),
                    "utilization_gpu_percent": gpu_util,
                    "utilization_memory_percent": mem_util,
                }
            )
        return out

    def sample(self) -> dict[str, Any]:
        """One sample in the documented schema."""
        gpus = self._gpus()
        topo = read_topology(self.sysfs_root, gpu_pci_addresses=[g["pci_address"] for g in gpus])
        for g, placed in zip(gpus, topo.gpus):
            g["pci_address"] = placed.pci_address
            g["numa_node"] = placed.numa_node
        vm = psutil.virtual_memory()
        meminfo = read_host_meminfo(self.proc_root)
        host_used = used_bytes(meminfo)
        if host_used is None:  # no /proc/meminfo: psutil's total - available
            host_used = int(vm.total) - int(vm.available)
        host_total = meminfo.get("MemTotal", int(vm.total))
        nodes = []
        for n in topo.nodes:
            total, free, used = n.mem_total_bytes, n.mem_free_bytes, n.mem_used_bytes
            if not topo.numa:  # one pseudo-node: the whole machine
                total, free, used = host_total, meminfo.get("MemFree", int(vm.free)), host_used
            nodes.append(
                {"node": n.id, "cpus": len(n.cpus), "total_bytes": total, "free_bytes": free, "used_bytes": used}
            )
        return {
            "schema": SCHEMA,
            "time_unix": time.time(),
            "hostname": socket.gethostname(),
            "host": {
                "total_bytes": host_total,
                "available_bytes": meminfo.get("MemAvailable", int(vm.available)),
                "used_bytes": host_used,
                "percent": 100.0 * host_used / host_total if host_total else 0.0,
            },
            "numa": {"numa": topo.numa, "reason": topo.reason, "nodes": nodes},
            "gpu_status": self.gpu_status,
            "gpus": gpus,
        }

    def close(self) -> None:
        if self._nvml is not None:
            try:
                self._nvml.nvmlShutdown()
            finally:
                self._nvml = None

    def __enter__(self) -> Monitor:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def format_sample(s: dict[str, Any]) -> str:
    gib = 2**30
    h = s["host"]
    lines = [
        f"{time.strftime('%H:%M:%S', time.localtime(s['time_unix']))}  {s['hostname']}  host: "
        f"{h['used_bytes'] / gib:.1f}/{h['total_bytes'] / gib:.1f} GiB used ({h['percent']:.0f}%)"
    ]
    for n in s["numa"]["nodes"]:
        if n["total_bytes"] is not None and n.get("used_bytes") is not None:
            mem = f"{n['used_bytes'] / gib:.1f}/{n['total_bytes'] / gib:.1f} GiB used"
        else:
            mem = "memory n/a"
        lines.append(f"  node {n['node']}: {n['cpus']} CPUs, {mem}")
    if not s["gpus"]:
        lines.append(f"  {s['gpu_status']}")
    for g in s["gpus"]:
        util = "n/a" if g["utilization_gpu_percent"] is None else f"{g['utilization_gpu_percent']}%"
        lines.append(
            f"  GPU {g['index']} {g['name']} [{g['pci_address']}, node {g['numa_node']}]: "
            f"{g['memory_used_bytes'] / gib:.2f}/{g['memory_total_bytes'] / gib:.2f} GiB, util {util}"
        )
    return "\n".join(lines)


def _pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend; RuntimeError saying how to get it where it is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise RuntimeError("--plot needs matplotlib: pip install 'memory-runtime[plot]'") from exc
    return plt


def _gib_or_nan(value: int | None) -> float:
    return float("nan") if value is None else value / 2**30


def samples_path(plot_path: str) -> Path:
    """Where ``--plot out.png`` keeps its samples (JSON lines): ``out.samples.jsonl``."""
    return Path(plot_path).with_suffix(".samples.jsonl")


def plot_timeline(samples: list[dict[str, Any]], path: str) -> None:
    """PNG timeline: GPU memory used per GPU and host memory used per node, in GiB."""
    plt = _pyplot()
    if not samples:
        raise ValueError("no samples to plot")
    t0 = samples[0]["time_unix"]
    ts = [s["time_unix"] - t0 for s in samples]
    fig, (ax_gpu, ax_host) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    n_gpus = len(samples[0]["gpus"])
    for i in range(n_gpus):
        ax_gpu.plot(ts, [s["gpus"][i]["memory_used_bytes"] / 2**30 for s in samples], label=f"GPU {i}")
    if n_gpus:
        ax_gpu.legend(fontsize=8)
    else:
        ax_gpu.text(0.5, 0.5, samples[0]["gpu_status"], ha="center", va="center", transform=ax_gpu.transAxes)
    ax_gpu.set_ylabel("GPU memory used (GiB)")
    for j, node in enumerate(samples[0]["numa"]["nodes"]):
        used = [_gib_or_nan(s["numa"]["nodes"][j].get("used_bytes")) for s in samples]
        ax_host.plot(ts, used, label=f"node {node['node']}")
    ax_host.legend(fontsize=8)
    ax_host.set_ylabel("host memory used (GiB)")
    ax_host.set_xlabel("seconds")
    fig.suptitle(f"memory_runtime monitor: {samples[0]['hostname']}")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def main(argv: list[str] | None = None, out: TextIO | None = None) -> int:
    import argparse

    out = out or sys.stdout
    ap = argparse.ArgumentParser(prog="python -m memory_runtime monitor", description="GPU and NUMA memory monitor")
    ap.add_argument("--once", action="store_true", help="take one sample and exit")
    ap.add_argument("--json", action="store_true", help="JSON output (one object per line)")
    ap.add_argument("--interval", type=float, default=1.0, help="seconds between samples (default 1)")
    ap.add_argument("--duration", type=float, default=None, help="stop after this many seconds (default: Ctrl-C)")
    ap.add_argument("--plot", default=None, help="write a PNG timeline of the samples here")
    ap.add_argument("--sysfs-root", default="/sys", help=argparse.SUPPRESS)
    ap.add_argument("--proc-root", default="/proc", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if not (math.isfinite(args.interval) and 0 < args.interval <= MAX_INTERVAL_S):
        ap.error(f"--interval must be in (0, {MAX_INTERVAL_S}] seconds, got {args.interval}")
    if args.duration is not None and not (math.isfinite(args.duration) and args.duration >= 0):
        ap.error(f"--duration must be >= 0, got {args.duration}")
    if args.plot:
        try:  # before sampling: a missing matplotlib must not cost the whole duration
            _pyplot()
        except RuntimeError as exc:
            print(f"error: {exc} (nothing was sampled)", file=sys.stderr)
            return 2
    samples: list[dict[str, Any]] = []
    live = not args.json and not args.once and out.isatty()
    with Monitor(sysfs_root=args.sysfs_root, proc_root=args.proc_root) as mon:
        start = time.monotonic()
        try:
            while True:
                s = mon.sample()
                samples.append(s)
                if args.json:
                    out.write(json.dumps(s) + "\n")
                else:
                    if live:
                        out.write("\x1b[2J\x1b[H")  # refresh in place
                    out.write(format_sample(s) + "\n")
                out.flush()
                if args.once or (
                    args.duration is not None and time.monotonic() - start + args.interval > args.duration
                ):
                    break
                time.sleep(args.interval)
        except KeyboardInterrupt:  # Ctrl-C is how a live monitor is meant to end: fall through to the summary
            pass
    if args.plot:
        return _write_plot(samples, args.plot, printed=args.json, out=out)
    return 0


def _write_plot(samples: list[dict[str, Any]], plot: str, *, printed: bool, out: TextIO) -> int:
    """Save the samples (JSON lines) next to the plot, then plot; a failing plot loses no samples."""
    saved: Path | None = samples_path(plot)
    try:
        samples_path(plot).write_text("".join(json.dumps(s) + "\n" for s in samples))
    except OSError as exc:
        print(f"warning: could not save the samples to {saved}: {exc}", file=sys.stderr)
        saved = None
    try:
        plot_timeline(samples, plot)
    except Exception as exc:  # matplotlib fails in many ways (path, backend, fonts): report, keep the samples
        kept = f"the samples are in {saved}" if saved is not None else "the samples follow on stdout"
        print(f"error: --plot {plot} failed ({type(exc).__name__}: {exc}); {kept}", file=sys.stderr)
        if saved is None and not printed:
            out.write("".join(json.dumps(s) + "\n" for s in samples))
        return 1
    if not printed:
        out.write(f"timeline written to {plot} (samples: {saved})\n")
    return 0
