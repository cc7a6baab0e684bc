"""memory-runtime benchmark: pinned host arenas vs torch pinned memory; device pool vs the caching allocator.

In one process, side by side, on one GPU (H100):
  A. pinned host memory
     - bytes pinned / bytes requested over odd sizes: PinnedHostArena vs torch.empty(pin_memory=True)
       (torch's CachingHostAllocator rounds to powers of two; read from torch.cuda.host_memory_stats()
       when this torch has it, else derived from that documented rounding and marked so)
     - time to pin --pin-gib GiB (default 8): arena (mmap + bind + pre-touch + cudaHostRegister) vs
       torch.empty(pin_memory=True); also the arena without pre-touch
     - H2D bandwidth (CUDA events, median) from the arena vs from torch pinned memory
  B. device buffers on a variable-length attention workload trace
     per step: q, k, v, out (1, N, H, D) bf16 and lse (1, H, N) fp32 for a random N; half the steps
     also dq, dk, dv; the previous step's out lives until the next step's out exists.
     The same trace runs through torch.empty/del (caching allocator) and DeviceBufferPool:
     new device allocations after a warm-up pass (cudaMalloc count = memory_stats
     "segment.all.allocated" delta; pool: new slab reservations), alloc+release latency from
     Python (p50/p99 us, per buffer), peak reserved / peak requested. Pool variants: grown on
     demand; + long_lived hint on each step's out (two-ended placement); + consolidate(headroom)
     after the warm-up pass (the documented warm-up-then-consolidate step).
  B2. device buffers on a packed variable-length training trace (tools/packed_memory_trace.py):
     each step packs log-normal document lengths into --packed-tokens tokens; the buffers follow
     attn-core's packed plan for those documents (strided pieces of long documents, the
     strided-kernel tables' index tensors, rowsum(dout * out), cu_seqlens change size every step; q/k/v and activations keep
     N). One pass of --packed-steps steps through torch.empty/del and DeviceBufferPool: new device
     allocations per step after --packed-warmup steps, peak reserved / peak allocated, and
     fragmentation at the largest live set.
  C. checks: pool buffers stamped and verified on the GPU; cross-stream reuse waits for the
     releasing stream; arena placement (move_pages); the monitor's JSON on this machine.
Writes JSON + markdown + PNG to --out and prints the table last.

    source tools/srcpath.sh && python tools/bench_memory.py --out bench-output/memory
    python tools/bench_memory.py --quick          # small sizes (works on CPU too: parts B, B2 + arena sizing)

On CPU, parts B and B2 run through the pool (CPU slabs: its new device allocations are new slabs);
torch has no caching allocator to count there (part B still times torch.empty, B2 skips torch).
Pinned memory (part A beyond arena sizing) and the stream check need CUDA.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import platform
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_env import source_revision
from packed_memory_trace import (
    OneStreamOps,
    add_packed_arguments,
    apply_packed_quick,
    bench_packed,
    check_packed_arguments,
    packed_description,
    packed_table_rows,
    plot_packed,
    stamp_buffer,
    stamp_intact,
)

from memory_runtime import (
    DeviceBufferPool,
    FragmentationReport,
    PinnedHostArena,
    fragmentation_report,
    load_libnuma,
    native_status,
    read_topology,
)

GIB = 2**30
MIB = 2**20


# ----------------------------------------------------------------------------------------- helpers
def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    if not xs:
        return float("nan")
    i = min(len(xs) - 1, max(0, math.ceil(q / 100 * len(xs)) - 1))
    return xs[i]


def host_cache_empty() -> None:
    fn = getattr(torch._C, "_host_emptyCache", None)
    if fn is not None:
        fn()


def host_stats() -> dict[str, Any] | None:
    fn = getattr(torch.cuda, "host_memory_stats", None)
    if fn is None:
        return None
    try:
        return dict(fn())
    except Exception:
        return None


def torch_pinned_bytes(nbytes: int) -> tuple[int, str]:
    """Bytes torch's pinned allocator reserves for one request of nbytes."""
    host_cache_empty()
    before = host_stats()
    t = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    after = host_stats()
    del t
    host_cache_empty()
    if before is not None and after is not None:
        for key in ("reserved_bytes.current", "allocated_bytes.current"):
            if key in after:
                return int(after[key] - before.get(key, 0)), f"host_memory_stats[{key}]"
    return 1 << (nbytes - 1).bit_length(), "derived (next power of two)"


def cuda_time_ms(fn, reps: int) -> list[float]:
    start = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    end = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for i in range(reps):
        start[i].record()
        fn()
        end[i].record()
    torch.cuda.synchronize()
    return [s.elapsed_time(e) for s, e in zip(start, end)]


# ----------------------------------------------------------------------------------------- part A
def bench_pinned(args) -> dict[str, Any]:
    res: dict[str, Any] = {}
    cuda = torch.cuda.is_available()
    # exactness over odd sizes
    rows = []
    for nbytes in args.odd_sizes:
        arena = PinnedHostArena(nbytes, pretouch=False)
        a_res = arena.stats().bytes_pinned if arena.pinned else arena.stats().bytes_reserved
        arena.close()
        row = {"requested": nbytes, "arena_bytes": a_res, "arena_ratio": a_res / nbytes, "arena_pinned": cuda}
        if cuda:
            t_bytes, how = torch_pinned_bytes(nbytes)
            row.update(torch_bytes=t_bytes, torch_ratio=t_bytes / nbytes, torch_source=how)
        rows.append(row)
    res["exactness"] = rows
    if not cuda:
        return res
    # time to pin
    nbytes = int(args.pin_gib * GIB)
    host_cache_empty()
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    t = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    timings["torch_pin_s"] = time.perf_counter() - t0
    assert t.is_pinned()
    t0 = time.perf_counter()
    del t
    host_cache_empty()
    timings["torch_free_s"] = time.perf_counter() - t0
    for pretouch, huge in ((True, False), (False, False), (True, True), (False, True)):
        suffix = ("" if pretouch else "_no_pretouch") + ("_hugepages" if huge else "")
        t0 = time.perf_counter()
        arena = PinnedHostArena(
            nbytes, node=None if args.numa_node < 0 else args.numa_node, pretouch=pretouch, hugepages=huge
        )
        dt = time.perf_counter() - t0
        timings[f"arena_pin_s{suffix}"] = dt
        if pretouch and not huge:
            res["arena_notes"] = list(arena.notes)
            res["arena_placement"] = arena.verify_placement()
            probe = arena.acquire((1024,), torch.float32)
            res["arena_tensor_is_pinned"] = bool(probe.is_pinned())
            arena.release(probe)
            del probe
        t0 = time.perf_counter()
        arena.close()
        timings[f"arena_close_s{suffix}"] = time.perf_counter() - t0
    res["pin"] = {"gib": args.pin_gib, **timings, "arena_over_torch": timings["arena_pin_s"] / timings["torch_pin_s"]}

    # H2D bandwidth
    nb = int(args.h2d_gib * GIB)
    dev = torch.empty(nb, dtype=torch.uint8, device="cuda")
    arena = PinnedHostArena(nb)
    src_a = arena.acquire((nb,), torch.uint8)
    src_a.random_(0, 255)
    src_t = torch.empty(nb, dtype=torch.uint8, pin_memory=True)
    src_t.copy_(src_a)
    bw = {}
    for name, src in (("torch_pinned", src_t), ("arena", src_a), ("torch_pinned_2", src_t), ("arena_2", src_a)):
        for _ in range(2):
            dev.copy_(src, non_blocking=True)
        ms = cuda_time_ms(lambda src=src, dev=dev: dev.copy_(src, non_blocking=True), args.reps)
        bw[name] = nb / (statistics.median(ms) / 1e3) / 1e9
    ok = bool(torch.equal(dev[: 1 << 20].cpu(), src_t[: 1 << 20]))
    # each source measured twice (interleaved); keep the better of the two runs per source
    res["h2d"] = {
        "gib": args.h2d_gib,
        "torch_pinned_GBps": max(bw["torch_pinned"], bw["torch_pinned_2"]),
        "arena_GBps": max(bw["arena"], bw["arena_2"]),
        "raw": bw,
        "copy_ok": ok,
    }
    res["h2d"]["arena_over_torch"] = res["h2d"]["arena_GBps"] / res["h2d"]["torch_pinned_GBps"]
    arena.release(src_a)
    del src_a, src_t, dev
    arena.close()
    host_cache_empty()
    torch.cuda.empty_cache()
    return res


# ----------------------------------------------------------------------------------------- part B
def make_trace(steps: int, n_min: int, n_max: int, heads: int, dim: int, seed: int) -> tuple[list[tuple], int]:
    """Ops ("a", id, shape, dtype, long_lived) / ("f", id) of a variable-length attention workload;
    returns (ops, peak bytes). long_lived marks each step's out (it outlives the step's other buffers);
    the pool may take it as a placement hint, torch.empty has no such input."""
    rng = random.Random(seed)
    ops: list[tuple] = []
    nid = 0
    live: dict[int, int] = {}
    cur = peak = 0

    def alloc(shape: tuple[int, ...], dtype: torch.dtype, long_lived: bool = False) -> int:
        nonlocal nid, cur, peak
        nid += 1
        size = math.prod(shape) * dtype.itemsize
        ops.append(("a", nid, shape, dtype, long_lived))
        live[nid] = size
        cur += size
        peak = max(peak, cur)
        return nid

    def free(i: int) -> None:
        nonlocal cur
        ops.append(("f", i))
        cur -= live.pop(i)

    prev_out = None
    for _ in range(steps):
        # lengths log-uniform in [n_min, n_max], padded to multiples of 64 as varlen batching does
        n = int(math.exp(rng.uniform(math.log(n_min), math.log(n_max))))
        n = max(64, (n + 63) // 64 * 64)
        big = (1, n, heads, dim)
        q, k, v = (alloc(big, torch.bfloat16) for _ in range(3))
        lse = alloc((1, heads, n), torch.float32)
        out = alloc(big, torch.bfloat16, True)  # lives until the next step's out exists
        if rng.random() < 0.5:  # a training step: gradients of q, k, v
            grads = [alloc(big, torch.bfloat16) for _ in range(3)]
            for g in grads:
                free(g)
        for i in (q, k, v, lse):
            free(i)
        if prev_out is not None:
            free(prev_out)
        prev_out = out
    if prev_out is not None:
        free(prev_out)
    return ops, peak


def run_trace_torch(ops: list[tuple], device: str, stamp: bool) -> dict[str, Any]:
    """The trace through torch.empty / del, with the same stamps and checks around the timed calls
    as the pool's run (so both allocators are timed in the same surroundings)."""
    live: dict[int, torch.Tensor] = {}
    a_ns: dict[int, int] = {}
    pairs: list[float] = []
    bad = 0
    pc = time.perf_counter_ns
    for op in ops:
        if op[0] == "a":
            t0 = pc()
            t = torch.empty(op[2], dtype=op[3], device=device)
            a_ns[op[1]] = pc() - t0
            live[op[1]] = t
            if stamp:
                stamp_buffer(t, op[1])
        else:
            if stamp:
                bad += int(not stamp_intact(live[op[1]], op[1]))
            t0 = pc()
            del live[op[1]]
            pairs.append((a_ns.pop(op[1]) + pc() - t0) / 1e3)
    return {"alloc_release_us": pairs, "stamp_bad": bad}


def run_trace_pool(ops: list[tuple], pool: DeviceBufferPool, device: str, stamp: bool, hints: bool) -> dict[str, Any]:
    """The trace through pool.acquire / release; with ``hints`` each step's out is acquired long_lived."""
    live: dict[int, torch.Tensor] = {}
    a_ns: dict[int, int] = {}
    pairs: list[float] = []
    acq: list[float] = []
    rel: list[float] = []
    bad = 0
    checked = 0
    pc = time.perf_counter_ns
    for op in ops:
        if op[0] == "a":
            long_lived = hints and op[4]
            t0 = pc()
            t = pool.acquire(op[2], op[3], device, long_lived=long_lived)
            a_ns[op[1]] = pc() - t0
            live[op[1]] = t
            if stamp:
                stamp_buffer(t, op[1])
        else:
            t = live.pop(op[1])
            if stamp:
                checked += 1
                bad += int(not stamp_intact(t, op[1]))
            t0 = pc()
            pool.release(t)
            r_ns = pc() - t0
            a = a_ns.pop(op[1])
            pairs.append((a + r_ns) / 1e3)
            acq.append(a / 1e3)
            rel.append(r_ns / 1e3)
            del t
    return {"alloc_release_us": pairs, "acquire_us": acq, "release_us": rel, "stamp_checked": checked, "stamp_bad": bad}


def _replayed(run: Callable[[], dict[str, Any]], replays: int) -> dict[str, Any]:
    """The measured trace replayed ``replays`` times: latency lists joined, counts summed (a p50
    over several passes spread in time is less at the mercy of a noisy host than one pass)."""
    out = run()
    for _ in range(replays - 1):
        more = run()
        for k, v in more.items():
            out[k] = out[k] + v
    return out


def mem_stats(device: str) -> dict[str, Any]:
    return torch.cuda.memory_stats(device) if device.startswith("cuda") else {}


def bench_pool(
    ops_warm, ops, peak_req: int, device: str, args, consolidate: bool, hints: bool, native: bool | None
) -> dict[str, Any]:
    """DeviceBufferPool, fresh: warm-up trace, optionally consolidate() to its peak, measured trace.
    ``hints``: each step's out is acquired with long_lived=True (the pool's two-ended placement).
    ``native``: the pool's native argument (None: the native hot path where it builds)."""
    cuda = device == "cuda"
    fake = OneStreamOps() if (args.cuda_like_stream and not cuda) else None
    pool = DeviceBufferPool(device, slab_bytes=args.slab_mib * MIB, stream_ops=fake, native=native)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        base_reserved = torch.cuda.memory_reserved()
    warm = run_trace_pool(ops_warm, pool, device, stamp=args.stamp, hints=hints)
    warm_stats = pool.stats()
    if consolidate:
        pool.consolidate(headroom=args.headroom)
        if cuda and args.stamp:
            # consolidate() empties torch's cache, which also dropped the small blocks torch keeps
            # for this benchmark's own stamp checks (torch.all temporaries): re-warm those, so the
            # device-allocation count below sees only what the measured pass itself needs.
            scratch = torch.ones(4096, dtype=torch.uint8, device=device)
            stamp_intact(scratch, 1)
            del scratch
    pool.reset_peak_stats()
    r0 = pool.stats().reservations
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    seg0 = torch.cuda.memory_stats()["segment.all.allocated"] if cuda else 0
    measured = _replayed(
        functools.partial(run_trace_pool, ops, pool, device, stamp=args.stamp, hints=hints), args.replays
    )
    st = pool.stats()
    s1 = mem_stats(device)
    lat = measured["alloc_release_us"]
    row = {
        "slab_mib": args.slab_mib,
        "consolidate": consolidate,
        "long_lived_hints": hints,
        "headroom": args.headroom if consolidate else None,
        "p50_us": pct(lat, 50),
        "p99_us": pct(lat, 99),
        "acquire_p50_us": pct(measured["acquire_us"], 50),
        "release_p50_us": pct(measured["release_us"], 50),
        "new_reservations_after_warmup": st.reservations - r0,
        "new_device_allocs_after_warmup": (s1["segment.all.allocated"] - seg0) if cuda else st.reservations - r0,
        "warmup_reservations": warm_stats.reservations,
        "warmup_peak_reserved_over_requested": warm_stats.peak_bytes_reserved / warm_stats.peak_bytes_requested,
        "warmup_peak_requested_bytes": warm_stats.peak_bytes_requested,
        "peak_reserved_bytes": st.peak_bytes_reserved,
        "peak_requested_bytes": st.peak_bytes_requested,
        "peak_reserved_over_requested": st.peak_bytes_reserved / peak_req,
        "device_peak_reserved_over_requested": ((s1["reserved_bytes.all.peak"] - base_reserved) / peak_req)
        if cuda
        else None,
        "native": pool.native,
        "stamp_checked": warm["stamp_checked"] + measured["stamp_checked"],
        "stamp_bad": warm["stamp_bad"] + measured["stamp_bad"],
        "stats": st.to_dict(),
        "fragmentation_at_end": FragmentationReport.from_stats(
            pool.memory_stats(), pool.memory_snapshot(), device=f"pool:{device}"
        ).to_dict(),
        "balanced": st.live_blocks == 0 and st.bytes_in_use == 0 and st.acquires == st.releases,
    }
    pool.trim()
    del pool
    if cuda:
        torch.cuda.empty_cache()
    return row


def bench_repeated(device: str, args, reps: int = 5000) -> dict[str, Any]:
    """Alloc+release of one fixed small shape (a decode-style loop), and what its parts cost."""
    shape = (1, 512, args.heads, args.dim)
    pool = DeviceBufferPool(device, slab_bytes=args.slab_mib * MIB)
    pc = time.perf_counter_ns
    out: dict[str, Any] = {"shape": list(shape), "native": pool.native}
    for name in ("torch", "pool"):
        lat = []
        for _ in range(reps):
            t0 = pc()
            if name == "pool":
                t = pool.acquire(shape, torch.bfloat16, device)
                pool.release(t)
            else:
                t = torch.empty(shape, dtype=torch.bfloat16, device=device)
            del t
            lat.append((pc() - t0) / 1e3)
        out[name] = {"p50_us": pct(lat[100:], 50), "p99_us": pct(lat[100:], 99)}
    # where the time goes (median us per call)
    slab = torch.empty(64 * MIB, dtype=torch.uint8, device=device).view(torch.bfloat16)
    comps = {
        "stream_key": lambda: pool._streams.current_key(),
        "as_strided": lambda: torch.as_strided(
            slab, shape, (shape[1] * shape[2] * shape[3], shape[2] * shape[3], shape[3], 1), 0
        ),
        "torch_empty_del": lambda: torch.empty(shape, dtype=torch.bfloat16, device=device),
    }
    out["components_us"] = {}
    for name, fn in comps.items():
        lat = []
        for _ in range(2000):
            t0 = pc()
            fn()
            lat.append((pc() - t0) / 1e3)
        out["components_us"][name] = pct(lat[100:], 50)
    pool.trim()
    return out


# (result key, consolidate after warm-up, long_lived hint on each step's out, native), with table labels
POOL_VARIANTS = (
    ("device_buffer_pool", False, False, None),
    ("device_buffer_pool_hints", False, True, None),
    ("device_buffer_pool_consolidated", True, True, None),
    ("device_buffer_pool_consolidated_python", True, True, False),
)
POOL_LABELS = {
    "device_buffer_pool": "pool",
    "device_buffer_pool_hints": "pool+long_lived",
    "device_buffer_pool_consolidated": "pool+long_lived+consolidate",
    "device_buffer_pool_consolidated_python": "same, Python path (native=False)",
}


def bench_trace(args) -> dict[str, Any]:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    # warm-up and measured passes replay two different traces drawn from the same distribution
    ops_warm, _ = make_trace(args.steps, args.n_min, args.n_max, args.heads, args.dim, args.seed)
    ops, peak_req = make_trace(args.steps, args.n_min, args.n_max, args.heads, args.dim, args.seed + 1)
    res: dict[str, Any] = {
        "device": device,
        "steps": args.steps,
        "n_range": [args.n_min, args.n_max],
        "heads": args.heads,
        "dim": args.dim,
        "buffers": sum(1 for o in ops if o[0] == "a"),
        "trace_peak_requested_bytes": peak_req,
    }
    cuda = device == "cuda"
    # torch caching allocator, from an empty cache; peaks over the measured (second) pass
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        base_reserved = torch.cuda.memory_reserved()
    run_trace_torch(ops_warm, device, args.stamp)  # warm-up pass
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    s0 = mem_stats(device)
    measured = _replayed(functools.partial(run_trace_torch, ops, device, args.stamp), args.replays)
    s1 = mem_stats(device)
    lat = measured["alloc_release_us"]
    t_row: dict[str, Any] = {"p50_us": pct(lat, 50), "p99_us": pct(lat, 99)}
    if cuda:
        t_row.update(
            new_device_allocs_after_warmup=s1["segment.all.allocated"] - s0["segment.all.allocated"],
            segments_total=s1["segment.all.allocated"],
            peak_reserved_bytes=s1["reserved_bytes.all.peak"] - base_reserved,
            peak_requested_bytes=s1["requested_bytes.all.peak"],
            num_alloc_retries=s1["num_alloc_retries"],
        )
        t_row["peak_reserved_over_requested"] = t_row["peak_reserved_bytes"] / peak_req
        t_row["fragmentation"] = fragmentation_report().to_dict()
        torch.cuda.empty_cache()
    res["torch_caching_allocator"] = t_row

    res["repeated_shape"] = bench_repeated(device, args)
    for key, consolidate, hints, native in POOL_VARIANTS:
        res[key] = bench_pool(
            ops_warm, ops, peak_req, device, args, consolidate=consolidate, hints=hints, native=native
        )
    return res


# ----------------------------------------------------------------------------------------- part C
def check_streams() -> dict[str, Any]:
    """Cross-stream reuse must wait for the releasing stream; same-stream reuse is immediate."""
    pool = DeviceBufferPool("cuda", slab_bytes=64 * MIB)
    s1, s2 = torch.cuda.Stream(), torch.cuda.Stream()
    a = torch.randn(4096, 4096, device="cuda")
    with torch.cuda.stream(s1):
        buf = pool.acquire((4096, 4096), torch.float32, "cuda")
        for _ in range(20):  # keep s1 busy writing into buf
            torch.mm(a, a, out=buf)
        ptr = buf.data_ptr()
        pool.release(buf)
        del buf
    with torch.cuda.stream(s2):
        other = pool.acquire((4096, 4096), torch.float32, "cuda")
        cross_while_busy = other.data_ptr() == ptr
        busy = not s1.query()
        pool.release(other)
        del other
    with torch.cuda.stream(s1):
        same = pool.acquire((4096, 4096), torch.float32, "cuda")
        same_stream_reuse = same.data_ptr() == ptr
        pool.release(same)
        del same
    torch.cuda.synchronize()
    stats = pool.stats()
    return {
        "s1_busy_when_s2_acquired": busy,
        "s2_reused_s1_block_while_busy": cross_while_busy,
        "same_stream_reuse": same_stream_reuse,
        "fences_recorded": stats.cross_stream_fences,
        "ok": (not cross_while_busy) and same_stream_reuse,
    }


def monitor_json() -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, "-m", "memory_runtime", "monitor", "--once", "--json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    if proc.returncode != 0:
        return {"ok": False, "stderr": proc.stderr[-2000:]}
    doc = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"ok": True, "sample": doc}


# ----------------------------------------------------------------------------------------- report
def table(res: dict[str, Any]) -> str:
    lines = ["| metric | memory_runtime | torch | ratio / target |", "|---|---|---|---|"]
    p = res.get("pinned", {})
    for row in p.get("exactness", []):
        tr = row.get("torch_ratio")
        lines.append(
            f"| pinned bytes / requested @ {row['requested'] / MIB:.1f} MiB | {row['arena_ratio']:.4f} | "
            f"{'-' if tr is None else f'{tr:.3f}'} | target <= 1.01 |"
        )
    if "pin" in p:
        pin = p["pin"]
        lines.append(
            f"| time to pin {pin['gib']:g} GiB (s) | {pin['arena_pin_s']:.2f} (no pre-touch {pin['arena_pin_s_no_pretouch']:.2f}; "
            f"THP {pin['arena_pin_s_hugepages']:.2f}, THP no pre-touch {pin['arena_pin_s_no_pretouch_hugepages']:.2f}) | "
            f"{pin['torch_pin_s']:.2f} | {pin['arena_over_torch']:.2f}x (target <= 0.5x) |"
        )
    if "h2d" in p:
        h = p["h2d"]
        lines.append(
            f"| H2D {h['gib']:g} GiB (GB/s) | {h['arena_GBps']:.1f} | {h['torch_pinned_GBps']:.1f} | "
            f"{h['arena_over_torch']:.3f} (target >= 0.95) |"
        )
    t = res.get("trace", {})
    if t:
        rep = t["repeated_shape"]
        lines.append(
            f"| fixed shape {tuple(rep['shape'])}: alloc+release p50 / p99 (us) | {rep['pool']['p50_us']:.2f} / "
            f"{rep['pool']['p99_us']:.2f} | {rep['torch']['p50_us']:.2f} / {rep['torch']['p99_us']:.2f} | {'native' if rep['native'] else 'Python'} path |"
        )
        tc = t["torch_caching_allocator"]
        for key, name in POOL_LABELS.items():
            pool = t[key]
            lines.append(
                f"| {name}: new device allocs after warm-up | {pool['new_device_allocs_after_warmup']} "
                f"(slabs {pool['new_reservations_after_warmup']}) | {tc.get('new_device_allocs_after_warmup', '-')} | target 0 |"
            )
            lines.append(
                f"| {name}: alloc+release p50 / p99 (us) | {pool['p50_us']:.2f} / {pool['p99_us']:.2f} | "
                f"{tc['p50_us']:.2f} / {tc['p99_us']:.2f} | target p50 <= 2 |"
            )
            tcr = tc.get("peak_reserved_over_requested")
            lines.append(
                f"| {name}: peak reserved / peak requested | {pool['peak_reserved_over_requested']:.3f} | "
                f"{'-' if tcr is None else f'{tcr:.3f}'} | target <= 1.1 |"
            )
    if res.get("packed"):
        lines += packed_table_rows(res["packed"])
    return "\n".join(lines)


def plot(res: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(20, 4))
    ex = res.get("pinned", {}).get("exactness", [])
    if ex:
        x = [r["requested"] / MIB for r in ex]
        axes[0].plot(x, [r["arena_ratio"] for r in ex], "o-", label="PinnedHostArena")
        if "torch_ratio" in ex[0]:
            axes[0].plot(x, [r["torch_ratio"] for r in ex], "s-", label="torch pin_memory")
        axes[0].axhline(1.01, color="gray", ls="--", lw=0.8)
        axes[0].set_xscale("log")
        axes[0].set_xlabel("requested MiB")
        axes[0].set_ylabel("bytes pinned / requested")
        axes[0].legend()
    t = res.get("trace")
    if t:
        tc = t["torch_caching_allocator"]
        names = [POOL_LABELS[k].replace("+", "+\n") for k in POOL_LABELS] + ["torch"]
        rows = [t[k] for k in POOL_LABELS] + [tc]
        xs = list(range(len(rows)))
        axes[1].bar(xs, [r["p50_us"] for r in rows], width=0.35, label="p50", tick_label=names)
        axes[1].bar([x + 0.35 for x in xs], [r["p99_us"] for r in rows], width=0.35, label="p99", alpha=0.5)
        axes[1].axhline(2.0, color="gray", ls="--", lw=0.8)
        axes[1].set_ylabel("alloc+release from Python (us)")
        axes[1].legend()
        vals = [r.get("peak_reserved_over_requested") or 0 for r in rows]
        axes[2].bar(names, vals, color=["C0", "C2", "C3", "C1"])
        axes[2].axhline(1.1, color="gray", ls="--", lw=0.8)
        axes[2].set_ylabel("peak reserved / peak requested")
    if res.get("packed"):
        plot_packed(axes[3], res["packed"])
    env = res["env"]
    fig.suptitle(
        f"memory_runtime vs torch allocators ({env['device']}, torch {env['torch']}, CUDA {env['cuda']}, "
        f"source {env['git_commit']})"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("bench-output/memory"))
    ap.add_argument("--quick", action="store_true", help="small sizes, a few seconds")
    ap.add_argument("--pin-gib", type=float, default=8.0)
    ap.add_argument("--h2d-gib", type=float, default=1.0)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--replays", type=int, default=3, help="passes over the measured trace (latencies pooled)")
    ap.add_argument("--n-min", type=int, default=1024)
    ap.add_argument("--n-max", type=int, default=65536)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--slab-mib", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--headroom", type=float, default=0.05, help="consolidate() headroom over the warm-up peak")
    ap.add_argument("--no-stamp", dest="stamp", action="store_false", help="skip the GPU content checks")
    ap.add_argument("--numa-node", type=int, default=0, help="bind the 8 GiB arena to this node (-1: unbound)")
    ap.add_argument("--skip-pinned", action="store_true", help="device-pool trace only")
    ap.add_argument(
        "--cuda-like-stream",
        action="store_true",
        help="CPU only: give the pool a CUDA-like stream key (replays the GPU's free-range behaviour on CPU)",
    )
    add_packed_arguments(ap)
    ap.add_argument("--skip-packed", action="store_true", help="no packed variable-length trace (part B2)")
    args = ap.parse_args()
    if args.quick:
        args.pin_gib, args.h2d_gib, args.steps, args.n_max, args.reps = 0.25, 0.125, 60, 8192, 5
        args.slab_mib = min(args.slab_mib, 16)
        apply_packed_quick(args)
    if not args.skip_packed:
        check_packed_arguments(ap, args)
    args.odd_sizes = [
        int(x * MIB) + 4097 for x in ((1.3, 10.7, 100.3, 700.9) if args.quick else (1.3, 10.7, 100.3, 700.9, 2500.1))
    ]
    if args.quick and not torch.cuda.is_available():
        args.dim = min(args.dim, 16)  # CPU: same trace logic at an eighth of the bytes
    args.out.mkdir(parents=True, exist_ok=True)
    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else (platform.processor() or "cpu"),
        "host": platform.node(),
        "cpu_count": __import__("os").cpu_count(),
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    env["git_commit"] = source_revision()
    status = native_status()
    env["pool_native"] = f"{'yes' if status['available'] else 'no'} ({status['reason']})"
    lib, why = load_libnuma()
    env["libnuma"] = lib.path if lib else why
    env["numa"] = read_topology().summary()
    res: dict[str, Any] = {"env": env, "args": {k: v for k, v in vars(args).items() if k != "out"}}
    t0 = time.perf_counter()
    res["trace"] = bench_trace(args)
    print(f"trace done in {time.perf_counter() - t0:.1f} s", flush=True)
    if not args.skip_packed:
        res["packed"] = bench_packed(args)
        print(f"packed trace done in {time.perf_counter() - t0:.1f} s", flush=True)
    if torch.cuda.is_available():
        res["streams"] = check_streams()
        print(f"streams: {res['streams']}", flush=True)
    res["pinned"] = {} if args.skip_pinned else bench_pinned(args)
    print(f"pinned done in {time.perf_counter() - t0:.1f} s", flush=True)
    res["monitor"] = monitor_json()
    res["fragmentation_end"] = fragmentation_report().to_dict()
    tab = table(res)
    res["table_md"] = tab
    (args.out / "memory.json").write_text(json.dumps(res, indent=2, default=str))
    md = [
        "# memory-runtime benchmark",
        "",
        f"Environment: {env['device']}, torch {env['torch']} (CUDA {env['cuda']}), triton {env['triton']}, "
        f"python {env['python']}, libnuma: {env['libnuma']}",
        "",
        "```",
        env["numa"],
        "```",
        "",
        tab,
        "",
        f"Trace: {res['trace']['buffers']} buffers over {args.steps} steps, N log-uniform in "
        f"[{args.n_min}, {args.n_max}] (multiples of 64), H={args.heads}, D={args.dim}, bf16 q/k/v/out "
        f"(+ dq/dk/dv on half the steps), fp32 lse; peak requested "
        f"{res['trace']['trace_peak_requested_bytes'] / GIB:.2f} GiB. Warm-up and measured passes replay two different traces (seeds {args.seed}, {args.seed + 1}); "
        f"the measured trace is replayed {args.replays} times and latencies are pooled over the replays. "
        f"Pool slab {args.slab_mib} MiB. pool: grown on demand; pool+long_lived: each step's out acquired "
        f"with long_lived=True (two-ended placement); pool+long_lived+consolidate: in addition "
        f"consolidate(headroom={args.headroom}) after the warm-up pass (warm-up peak requested "
        f"{res['trace']['device_buffer_pool_consolidated']['warmup_peak_requested_bytes'] / GIB:.3f} GiB, measured pass "
        f"{res['trace']['trace_peak_requested_bytes'] / GIB:.3f} GiB). Both allocators run the same stamps and "
        f"checks around the timed calls. Pool paths: native hot path {env['pool_native']}. For scale, on this "
        f"host one torch.as_strided call from Python (how the Python path makes each buffer's tensor) takes "
        f"{res['trace']['repeated_shape']['components_us']['as_strided']:.2f} us and one torch.empty + del "
        f"{res['trace']['repeated_shape']['components_us']['torch_empty_del']:.2f} us.",
        "",
        *([packed_description(res["packed"]), ""] if res.get("packed") else []),
        "![memory](memory.png)",
    ]
    (args.out / "memory.md").write_text("\n".join(md) + "\n")
    plot(res, args.out / "memory.png")
    print(tab)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
