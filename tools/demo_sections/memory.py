"""Demo section: memory-runtime (pool on a small attention trace, fragmentation report, NUMA, pinned arena).

Rows are non-numeric checks (max_error/tolerance None): ok only when the check passed.
"""

from __future__ import annotations

import math
import random
import time

import torch
from demo import DemoContext, DemoRow

from memory_runtime import DeviceBufferPool, FragmentationReport, PinnedHostArena, fragmentation_report, read_topology


def _trace(
    device: str, pool: DeviceBufferPool, steps: int, seed: int, timeline: list[tuple[int, int, int]] | None = None
) -> tuple[int, int, int]:
    """Variable-length q/k/v/out/lse buffers per step; owners stamp and verify their buffers.
    Returns (buffers, stamp failures, overlapping live ranges seen); appends (requested, in use,
    reserved) bytes at each step's peak to ``timeline``."""
    rng = random.Random(seed)
    live: dict[int, tuple[torch.Tensor, int]] = {}
    bad = overlaps = count = 0
    prev = None
    for step in range(steps):
        n = rng.choice(range(64, 1025, 64))
        ids = []
        for j, shape in enumerate([(1, n, 4, 32)] * 4 + [(1, 4, n)]):
            t = pool.acquire(shape, torch.float32, device)
            key = step * 8 + j + 1
            lo, hi = t.data_ptr(), t.data_ptr() + t.numel() * 4
            for other, _ in live.values():
                olo = other.data_ptr()
                if lo < olo + other.numel() * 4 and olo < hi:
                    overlaps += 1
            t.fill_(float(key))
            live[key] = (t, key)
            ids.append(key)
            count += 1
        if timeline is not None:
            st = pool.stats()
            timeline.append((st.bytes_requested, st.bytes_in_use, st.bytes_reserved))
        out_id = ids[3]
        for key in ids:
            if key != out_id:
                t, stamp = live.pop(key)
                bad += int(not bool(torch.all(t == stamp)))
                pool.release(t)
        if prev is not None:
            t, stamp = live.pop(prev)
            bad += int(not bool(torch.all(t == stamp)))
            pool.release(t)
        prev = out_id
    for t, stamp in live.values():
        bad += int(not bool(torch.all(t == stamp)))
        pool.release(t)
    return count, bad, overlaps


def _plot_timeline(ctx: DemoContext, timeline: list[tuple[int, int, int]]) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3))
    steps = range(len(timeline))
    mib = [[t[i] / 2**20 for t in timeline] for i in range(3)]
    # requested and in use differ by the size-class rounding only (< 1/64), so the lines nearly
    # coincide: in use is drawn wide and pale underneath, requested thin and dashed on top
    ax.plot(steps, mib[2], label="reserved (slabs)", color="tab:green")
    ax.plot(steps, mib[1], label="in use (size classes)", color="tab:orange", linewidth=5, alpha=0.45)
    ax.plot(steps, mib[0], label="requested", color="tab:blue", linewidth=1.2, linestyle="--")
    ax.set_xlabel("step (after warm-up)")
    ax.set_ylabel("MiB at the step's peak")
    ax.set_title("DeviceBufferPool on a variable-length attention trace")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside: the curves fill the axes
    ctx.save_plot(fig, "memory_pool_trace")
    plt.close(fig)


def run(ctx: DemoContext) -> list[DemoRow]:
    rows: list[DemoRow] = []
    device = ctx.device
    why_dev = "CUDA device present" if device == "cuda" else "CPU (no CUDA device)"

    # 1. pool on a variable-length trace: no overlap, balanced stats, no growth after warm-up
    pool = DeviceBufferPool(device, slab_bytes=4 << 20)
    t0 = time.perf_counter()
    n1, bad1, ov1 = _trace(device, pool, steps=40, seed=0)
    after_warm = pool.stats().reservations
    timeline: list[tuple[int, int, int]] = []
    n2, bad2, ov2 = _trace(device, pool, steps=40, seed=0, timeline=timeline)
    ms = (time.perf_counter() - t0) * 1e3
    s = pool.stats()
    balanced = s.live_blocks == 0 and s.bytes_in_use == 0 and s.acquires == s.releases == n1 + n2
    ok = bad1 + bad2 == 0 and ov1 + ov2 == 0 and balanced and s.reservations == after_warm
    rows.append(
        DemoRow(
            "memory: buffer pool trace",
            "DeviceBufferPool (native hot path)" if pool.native else "DeviceBufferPool (Python path)",
            f"{why_dev}; {pool.native_reason.split(' (after')[0]}",
            None,
            None,
            ms,
            ok,
            f"{n1 + n2} buffers, stamp failures {bad1 + bad2}, overlaps {ov1 + ov2}, balanced={balanced}, "
            f"slabs {s.reservations} (none after warm-up: {s.reservations == after_warm}), "
            f"peak reserved/in-use {s.peak_bytes_reserved / max(1, s.peak_bytes_in_use):.2f}",
        )
    )
    # the same fragmentation report as for torch's allocator, for the pool (mid-trace state)
    held = [pool.acquire((1, n, 4, 32), torch.float32, device) for n in (960, 64, 512)]
    pool.release(held[1])
    prep = FragmentationReport.from_stats(pool.memory_stats(), pool.memory_snapshot(), device=f"pool:{device}")
    ok = (
        prep.available
        and prep.largest_hole_ratio is not None
        and 0.0 < prep.largest_hole_ratio <= 1.0
        and prep.internal_fragmentation is not None
        and 0.0 <= prep.internal_fragmentation < 1 / 16
    )
    rows.append(
        DemoRow(
            "memory: pool fragmentation report",
            "DeviceBufferPool",
            "pool stats in torch's format",
            None,
            None,
            None,
            ok,
            prep.summary(),
        )
    )
    for t in (held[0], held[2]):
        pool.release(t)
    pool.trim()
    _plot_timeline(ctx, timeline)

    # 2. fragmentation report of this process
    t0 = time.perf_counter()
    rep = fragmentation_report()
    ms = (time.perf_counter() - t0) * 1e3
    if rep.available:
        ok = rep.reserved_bytes is not None and rep.largest_hole_ratio is not None
        rows.append(
            DemoRow("memory: fragmentation report", "memory_stats+snapshot", why_dev, None, None, ms, ok, rep.summary())
        )
    else:
        ok = "CUDA" in rep.reason
        rows.append(
            DemoRow("memory: fragmentation report", "none", rep.reason, None, None, ms, ok, "explained: no CUDA")
        )
    ctx.notes.append(f"fragmentation: {rep.summary()}")

    # 3. NUMA topology
    t0 = time.perf_counter()
    topo = read_topology()
    ms = (time.perf_counter() - t0) * 1e3
    ok = len(topo.nodes) >= 1 and all(len(n.cpus) >= 1 for n in topo.nodes)
    summary = topo.summary()
    rows.append(
        DemoRow(
            "memory: NUMA topology",
            "sysfs" + (" + NVML" if topo.gpu_source == "nvml" else ""),
            topo.reason or f"{len(topo.nodes)} node(s) under /sys",
            None,
            None,
            ms,
            ok,
            summary.splitlines()[0],
        )
    )
    ctx.notes.append("NUMA: " + summary.replace("\n", "; "))

    # 4. exact-size pinned arena
    nbytes = 10_000_019
    t0 = time.perf_counter()
    arena = PinnedHostArena(nbytes, node=topo.nodes[0].id if topo.numa else None)
    x = arena.acquire((1000, 7), torch.float32)
    x.copy_(torch.arange(7000, dtype=torch.float32).view(1000, 7))
    data_ok = bool(torch.equal(x.sum(0), torch.arange(7000, dtype=torch.float32).view(1000, 7).sum(0)))
    placed, detail = arena.verify_placement()
    st = arena.stats()
    arena.release(x)
    del x
    arena.close()
    ms = (time.perf_counter() - t0) * 1e3
    ratio = st.bytes_reserved / nbytes
    ok = data_ok and ratio <= 1.01 and placed is not False and math.isfinite(ratio)
    rows.append(
        DemoRow(
            "memory: pinned host arena",
            "PinnedHostArena",
            ("pinned via cudaHostRegister" if st.bytes_pinned else "; ".join(arena.notes) or "not pinned"),
            None,
            None,
            ms,
            ok,
            f"reserved/requested {ratio:.4f}, placement: {detail}",
        )
    )
    return rows
