"""Part B2 of tools/bench_memory.py: packed variable-length training through the device pool and torch.

Each training step packs documents into a fixed token budget N (--packed-tokens, default 256K):
lengths from tools/bench_varlen.py's ``document_lengths`` (log-normal, mean 8K, sigma 1, clipped
to [256, 128K], the last document cut to fill N exactly; seed --seed + step for each step). The
buffers a step asks for follow the plan attn-core's sdpa backend runs for those documents
(:func:`attn_core.packed_views.plan_packed`, LongNet segments [2048, 4096, 8192, 16384], rates
[1, 2, 4, 8], head mode "all"), so the sizes that depend on the document mix change every step
while q/k/v and the activations keep the packed size N:

* per step: cu_seqlens (docs + 1,) int32, freed at the end of the step; the index tensors of the
  step's two plans, the forward's and the backward's (per strided-kernel table: sequence starts,
  lengths and head bases (S,), tile tables (T,)), held as attn-core's plan cache holds them:
  until PLAN_CACHE_SIZE newer plans were built;
* forward, per layer: the input x (N, H*D) and q, k, v, out (1, N, H, D) bf16, lse (1, N, H) fp32,
  all kept for the backward; per strided piece (a long document's full segments) its out
  (nseg, h, rows, D) and lse (nseg, h, rows) fp32, freed after the piece (the strided-rows kernels
  that take every other segment write in place); then the layer's output (N, H*D), the next
  layer's input;
* backward, last layer first: the output's gradient (N, H*D) at the top, per layer dout, dq, dk, dv
  (1, N, H, D), rowsum(dout * out) (N, H) fp32 for the kernels, per piece its dq/dk/dv, the
  input's gradient (N, H*D); then the layer's saved tensors and gradients are freed.
Kernel-internal scratch (cuDNN workspaces) is not modelled: torch allocates it, not a pool.

The trace runs once, steps in order, through torch.empty / del (CUDA: the caching allocator) and
through fresh DeviceBufferPools, counting per step the new device allocations (CUDA: cudaMalloc
calls = memory_stats "segment.all.allocated"; pool: new slab reservations), with peaks over the
steps after the warm-up and a fragmentation report at the trace's largest live set after it.
No consolidate() variant: it needs every buffer released, and the plan cache keeps index tensors
of the last plans alive across every step boundary.
"""

from __future__ import annotations

import argparse
import collections
import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from bench_varlen import document_lengths, offsets, parse_tokens

from memory_runtime import DeviceBufferPool, FragmentationReport, fragmentation_report

MIB = 2**20
GIB = 2**30
# The LongNet configuration tools/bench_varlen.py measures on the same document mix.
PACKED_SEGMENTS = (2048, 4096, 8192, 16384)
PACKED_RATES = (1, 2, 4, 8)
PACKED_HEAD_MODE = "all"
# (result key, long_lived hint on the plan's index tensors, slabs the size of one (1, N, H, D)
# buffer instead of --slab-mib), with table labels
PACKED_POOL_VARIANTS = (
    ("device_buffer_pool", False, False),
    ("device_buffer_pool_hints", True, False),
    ("device_buffer_pool_hints_buffer_slabs", True, True),
)
PACKED_LABELS = {
    "device_buffer_pool": "pool",
    "device_buffer_pool_hints": "pool+long_lived",
    "device_buffer_pool_hints_buffer_slabs": "pool+long_lived, N-sized slabs",
}


# ------------------------------------------------------------------------ shared with part B
def stamp_buffer(t: torch.Tensor, i: int) -> None:
    """Write buffer i's mark into its first elements (checked when it is freed: no overlap)."""
    t.view(-1)[:4096].fill_(i % 251)


def stamp_intact(t: torch.Tensor, i: int) -> bool:
    return bool(torch.all(t.view(-1)[:4096] == i % 251))


class OneStreamOps:
    """CPU stand-in for one CUDA stream (a non-None stream key, fences always complete), so the
    pool's per-stream free ranges behave on CPU as they do on a GPU's default stream."""

    def current_key(self):
        return 0x5EED  # an int, like the raw stream handle the pool keys CUDA streams by

    def fence(self, key):
        return None

    def done(self, fence) -> bool:
        return True

    def wait(self, fence) -> None:
        return None


# ------------------------------------------------------------------------ the trace
@dataclass
class PackedTrace:
    """Ops per step, ("a", id, shape, dtype, long_lived) / ("f", id) as in part B's trace, plus
    ``drain``: the frees of the plan tensors still cached after the last step."""

    steps: list[list[tuple]] = field(default_factory=list)
    drain: list[tuple] = field(default_factory=list)
    docs: list[int] = field(default_factory=list)
    longest: list[int] = field(default_factory=list)
    step_peak_bytes: list[int] = field(default_factory=list)
    step_peak_op: list[int] = field(default_factory=list)
    plan_bytes: list[int] = field(default_factory=list)

    def peak_after(self, warmup: int) -> tuple[int, int, int]:
        """(requested bytes, step, op index) of the largest live set in steps >= warmup."""
        return max((self.step_peak_bytes[s], s, self.step_peak_op[s]) for s in range(warmup, len(self.steps)))


class TraceBuilder:
    """Records allocs and frees with exact requested bytes, tracking each step's peak live set."""

    def __init__(self) -> None:
        self.trace = PackedTrace()
        self.nid = 0
        self.size: dict[int, int] = {}
        self.live = 0

    def begin_step(self) -> None:
        self.trace.steps.append([])
        self.trace.step_peak_bytes.append(self.live)
        self.trace.step_peak_op.append(-1)

    def alloc(self, shape: tuple[int, ...], dtype: torch.dtype, long_lived: bool = False) -> int:
        self.nid += 1
        ops = self.trace.steps[-1]
        ops.append(("a", self.nid, tuple(int(x) for x in shape), dtype, long_lived))
        self.size[self.nid] = math.prod(shape) * dtype.itemsize
        self.live += self.size[self.nid]
        if self.live > self.trace.step_peak_bytes[-1]:
            self.trace.step_peak_bytes[-1] = self.live
            self.trace.step_peak_op[-1] = len(ops) - 1
        return self.nid

    def free(self, *ids: int, into: list[tuple] | None = None) -> None:
        for i in ids:
            (self.trace.steps[-1] if into is None else into).append(("f", i))
            self.live -= self.size.pop(i)


def plan_index_tensors(plan: Any) -> list[tuple[tuple[int, ...], torch.dtype]]:
    """Device tensors a packed plan holds: per strided-kernel table its starts (S,) int64, lengths
    and head bases (S,) int32, and its forward and backward tile tables (T,) int32 pairs."""
    out: list[tuple[tuple[int, ...], torch.dtype]] = []
    for group in plan:
        for seqs in group.sequences:
            out.append((tuple(seqs.starts.shape), torch.int64))
            out += [(tuple(t.shape), torch.int32) for t in (seqs.lengths, seqs.q_head0, seqs.kv_head0)]
            out += [(tuple(t.shape), torch.int32) for t in (*seqs.fwd_tiles, *seqs.bwd_tiles)]
    return out


def attention_forward_buffers(b: TraceBuilder, plan: Any, n: int, dim: int, dtype: torch.dtype) -> None:
    """The temporaries of attn_core.packed_views.forward_packed over one layer (each freed after use):
    the strided pieces' out and lse (the kernel tables write in place)."""
    f32 = torch.float32
    for group in plan:
        for p in group.pieces:
            b.free(b.alloc((p.nseg, p.q_hn, p.rows, dim), dtype), b.alloc((p.nseg, p.q_hn, p.rows), f32))


def attention_backward_buffers(b: TraceBuilder, plan: Any, n: int, heads: int, dim: int, dtype: torch.dtype) -> None:
    """The temporaries of attn_core.packed_views.backward_packed over one layer: the strided pieces'
    gradients, and rowsum(dout * out) (n, heads) fp32 for the kernel tables (freed with the layer)."""
    delta = b.alloc((n, heads), torch.float32) if any(group.sequences for group in plan) else None
    for group in plan:
        for p in group.pieces:
            b.free(
                b.alloc((p.nseg, p.q_hn, p.rows, dim), dtype),
                b.alloc((p.nseg, p.kv_hn, p.rows, dim), dtype),
                b.alloc((p.nseg, p.kv_hn, p.rows, dim), dtype),
            )
    if delta is not None:
        b.free(delta)


def packed_training_trace(
    *,
    tokens: int,
    steps: int,
    layers: int,
    heads: int,
    dim: int,
    mean: float,
    sigma: float,
    min_len: int,
    max_len: int,
    seed: int,
    dtype: torch.dtype = torch.bfloat16,
) -> PackedTrace:
    """The ops of ``steps`` packed training steps (see the module doc); H = Hkv = ``heads``."""
    from attn_core.config import DilatedConfig
    from attn_core.packed_views import PLAN_CACHE_SIZE, plan_packed

    config = DilatedConfig(PACKED_SEGMENTS, PACKED_RATES, PACKED_HEAD_MODE)
    n, h = tokens, heads
    b = TraceBuilder()
    cached_plans: collections.deque[list[int]] = collections.deque()
    big, hidden, lse_shape = (1, n, h, dim), (n, h * dim), (1, n, h)
    for step in range(steps):
        b.begin_step()
        lengths = document_lengths(n, mean, sigma, min_len, max_len, seed + step)
        b.trace.docs.append(len(lengths))
        b.trace.longest.append(max(lengths))
        cu = b.alloc((len(lengths) + 1,), torch.int32)
        cpu = torch.device("cpu")
        plans = {
            backward: plan_packed(offsets(lengths, cpu), (n, h, h, dim), config, cpu, kernel=True, backward=backward)
            for backward in (False, True)
        }
        index_bytes = sum(
            math.prod(shape) * dt.itemsize for plan in plans.values() for shape, dt in plan_index_tensors(plan)
        )
        b.trace.plan_bytes.append(index_bytes)

        def enter_cache(plan: Any) -> None:
            # the forward's plan is built by the first layer's forward, the backward's by the last
            # layer's backward; each is shared by every layer, and the cache drops its oldest plan
            cached_plans.append([b.alloc(shape, dt, long_lived=True) for shape, dt in plan_index_tensors(plan)])
            if len(cached_plans) > PLAN_CACHE_SIZE:
                b.free(*cached_plans.popleft())

        enter_cache(plans[False])
        x = b.alloc(hidden, dtype)  # the embedding output
        saved: list[list[int]] = []
        for _ in range(layers):
            q, k, v = (b.alloc(big, dtype) for _ in range(3))
            out, lse = b.alloc(big, dtype), b.alloc(lse_shape, torch.float32)
            attention_forward_buffers(b, plans[False], n, dim, dtype)
            saved.append([x, q, k, v, out, lse])
            x = b.alloc(hidden, dtype)  # the layer's output, the next layer's input
        grad = b.alloc(hidden, dtype)  # of the last output, from the loss
        b.free(x)
        enter_cache(plans[True])
        for layer in reversed(saved):
            dout = b.alloc(big, dtype)
            dq, dk, dv = (b.alloc(big, dtype) for _ in range(3))
            attention_backward_buffers(b, plans[True], n, h, dim, dtype)
            grad_in = b.alloc(hidden, dtype)
            b.free(grad, dout, dq, dk, dv, *layer)
            grad = grad_in
        b.free(grad, cu)
    while cached_plans:
        b.free(*cached_plans.popleft(), into=b.trace.drain)
    return b.trace


# ------------------------------------------------------------------------ replay and measure
def replay(
    trace: PackedTrace,
    acquire: Callable[[tuple, torch.dtype, bool], torch.Tensor],
    release: Callable[[torch.Tensor], None],
    *,
    stamped: bool,
    step_end: Callable[[int], None],
    at_peak: tuple[int, int],
    peak: Callable[[], None],
) -> dict[str, int]:
    """Run every step's ops (calling ``step_end(step)`` after each and ``peak()`` right after op
    at_peak = (step, op index)), then the drain. Buffers are stamped and checked when freed."""
    live: dict[int, torch.Tensor] = {}
    bad = checked = 0

    def run(ops: list[tuple], peak_op: int) -> None:
        nonlocal bad, checked
        for j, op in enumerate(ops):
            if op[0] == "a":
                t = acquire(op[2], op[3], op[4])
                live[op[1]] = t
                if stamped:
                    stamp_buffer(t, op[1])
            else:
                t = live.pop(op[1])
                if stamped:
                    checked += 1
                    bad += int(not stamp_intact(t, op[1]))
                release(t)
            del t  # torch.empty's buffer goes back to the caching allocator here
            if j == peak_op:
                peak()

    for s, ops in enumerate(trace.steps):
        run(ops, at_peak[1] if s == at_peak[0] else -1)
        step_end(s)
    run(trace.drain, -1)
    if live:
        raise RuntimeError(f"packed trace left {len(live)} buffers live")
    return {"stamp_checked": checked, "stamp_bad": bad}


def allocation_summary(per_step: list[int], warmup: int) -> dict[str, Any]:
    """New device allocations per step: totals before / after the warm-up and where growth stopped."""
    after = per_step[warmup:]
    grew = [s for s, x in enumerate(per_step) if x]
    return {
        "new_device_allocs_per_step": per_step,
        "new_device_allocs_in_warmup": sum(per_step[:warmup]),
        "new_device_allocs_after_warmup": sum(after),
        "max_new_device_allocs_per_step_after_warmup": max(after, default=0),
        "steps_with_new_device_allocs_after_warmup": sum(1 for x in after if x),
        "last_step_with_new_device_alloc": grew[-1] if grew else None,
    }


def run_torch(trace: PackedTrace, device: str, warmup: int, stamped: bool) -> dict[str, Any]:
    """The trace through torch.empty / del on CUDA (torch's caching allocator)."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_stats()
    base_reserved, base_allocated = base["reserved_bytes.all.current"], base["allocated_bytes.all.current"]
    seg = [base["segment.all.allocated"]]
    reserved_end: list[int] = []
    frag: dict[str, Any] = {}

    def step_end(s: int) -> None:
        st = torch.cuda.memory_stats()
        seg.append(st["segment.all.allocated"])
        reserved_end.append(st["reserved_bytes.all.current"] - base_reserved)
        if s == warmup - 1:
            torch.cuda.reset_peak_memory_stats()

    def at_peak() -> None:
        frag.update(fragmentation_report().to_dict())

    _, peak_step, peak_op = trace.peak_after(warmup)
    checks = replay(
        trace,
        lambda shape, dtype, _long: torch.empty(shape, dtype=dtype, device=device),
        lambda t: None,
        stamped=stamped,
        step_end=step_end,
        at_peak=(peak_step, peak_op),
        peak=at_peak,
    )
    st = torch.cuda.memory_stats()
    per_step = [b - a for a, b in itertools.pairwise(seg)]
    row: dict[str, Any] = allocation_summary(per_step, warmup)
    row.update(
        peak_reserved_bytes=st["reserved_bytes.all.peak"] - base_reserved,
        peak_allocated_bytes=st["allocated_bytes.all.peak"] - base_allocated,
        peak_requested_bytes=st["requested_bytes.all.peak"] - base["requested_bytes.all.current"],
        reserved_bytes_at_step_end=reserved_end,
        num_alloc_retries=st["num_alloc_retries"] - base["num_alloc_retries"],
        fragmentation_at_peak=frag,
        **checks,
    )
    row["peak_reserved_over_allocated"] = row["peak_reserved_bytes"] / row["peak_allocated_bytes"]
    row["peak_reserved_over_requested"] = row["peak_reserved_bytes"] / row["peak_requested_bytes"]
    torch.cuda.empty_cache()
    return row


def run_pool(
    trace: PackedTrace, device: str, warmup: int, args: argparse.Namespace, *, hints: bool, slab_bytes: int
) -> dict[str, Any]:
    """The trace through a fresh DeviceBufferPool of ``slab_bytes`` slabs (native hot path where it
    builds); ``hints``: the plan's index tensors are acquired long_lived (they outlive the steps
    that follow them)."""
    cuda = device == "cuda"
    fake = OneStreamOps() if (args.cuda_like_stream and not cuda) else None
    pool = DeviceBufferPool(device, slab_bytes=slab_bytes, stream_ops=fake)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
    seg = [torch.cuda.memory_stats()["segment.all.allocated"] if cuda else 0]
    slabs = [0]
    reserved_end: list[int] = []
    frag: dict[str, Any] = {}
    growth: list[dict[str, Any]] = []
    step = 0
    known_slabs: set[int] = set()

    def step_end(s: int) -> None:
        nonlocal step
        st = pool.stats()
        slabs.append(st.reservations)
        if cuda:
            seg.append(torch.cuda.memory_stats()["segment.all.allocated"])
        reserved_end.append(st.bytes_reserved)
        step = s + 1
        if s == warmup - 1:
            pool.reset_peak_stats()
            known_slabs.update(segment["address"] for segment in pool.memory_snapshot())

    def acquire(shape: tuple, dtype: torch.dtype, long: bool) -> torch.Tensor:
        if step < warmup:
            return pool.acquire(shape, dtype, device, long_lived=hints and long)
        before = pool.stats()
        t = pool.acquire(shape, dtype, device, long_lived=hints and long)
        after = pool.stats()
        if after.reservations != before.reservations:
            growth.append(
                growth_event(pool, known_slabs, step, math.prod(shape) * dtype.itemsize, before, after, trace)
            )
        return t

    def at_peak() -> None:
        report = FragmentationReport.from_stats(pool.memory_stats(), pool.memory_snapshot(), device=f"pool:{device}")
        frag.update(report.to_dict())

    _, peak_step, peak_op = trace.peak_after(warmup)
    checks = replay(
        trace,
        acquire,
        pool.release,
        stamped=args.stamp,
        step_end=step_end,
        at_peak=(peak_step, peak_op),
        peak=at_peak,
    )
    st = pool.stats()
    new_slabs = [b - a for a, b in itertools.pairwise(slabs)]
    # CUDA: cudaMalloc calls in the process (the pool's slabs and anything else torch allocated);
    # CPU: the pool's slab reservations are its device allocations
    per_step = [b - a for a, b in itertools.pairwise(seg)] if cuda else new_slabs
    row: dict[str, Any] = allocation_summary(per_step, warmup)
    row.update(
        long_lived_hints=hints,
        slab_mib=slab_bytes / MIB,
        native=pool.native,
        new_slabs_per_step=new_slabs,
        new_slabs_after_warmup=sum(new_slabs[warmup:]),
        growth_after_warmup=growth,
        slabs_at_end=st.num_slabs,
        peak_reserved_bytes=st.peak_bytes_reserved,
        peak_allocated_bytes=st.peak_bytes_in_use,
        peak_requested_bytes=st.peak_bytes_requested,
        reserved_bytes_at_step_end=reserved_end,
        fragmentation_at_peak=frag,
        balanced=st.live_blocks == 0 and st.bytes_in_use == 0 and st.acquires == st.releases,
        stats=st.to_dict(),
        **checks,
    )
    row["peak_reserved_over_allocated"] = row["peak_reserved_bytes"] / row["peak_allocated_bytes"]
    row["peak_reserved_over_requested"] = row["peak_reserved_bytes"] / row["peak_requested_bytes"]
    pool.trim()  # every slab is free: all go back (the closures above still hold the pool)
    if cuda:
        torch.cuda.empty_cache()
    return row


def growth_event(
    pool: DeviceBufferPool, known_slabs: set[int], step: int, request: int, before: Any, after: Any, trace: PackedTrace
) -> dict[str, Any]:
    """Why a request after the warm-up reserved a new slab: the free bytes it did not fit in, the
    largest free range of the slabs reserved before it, and whether the live set then exceeded
    every earlier step's peak (more memory than ever before) or not (free memory in pieces)."""
    # the free ranges of the slabs known before this acquire are as they were: it went to a new slab
    snapshot = pool.memory_snapshot()
    largest = 0
    for segment in snapshot:
        if segment["address"] in known_slabs:
            largest = max([largest] + [b["size"] for b in segment["blocks"] if b["state"] == "inactive"])
    known_slabs.update(segment["address"] for segment in snapshot)
    return {
        "step": step,
        "request_bytes": request,
        "free_bytes_before": before.bytes_reserved - before.bytes_in_use,
        "largest_free_range_before": largest,
        "new_slab_bytes": after.bytes_reserved - before.bytes_reserved,
        "live_requested_bytes": after.bytes_requested,
        "above_every_earlier_step_peak": after.bytes_requested > max(trace.step_peak_bytes[:step]),
    }


def bench_packed(args: argparse.Namespace) -> dict[str, Any]:
    """Part B2: the packed trace through torch (CUDA only) and each pool variant."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokens, max_len = parse_tokens(args.packed_tokens), parse_tokens(args.packed_max_len)
    warmup = args.packed_warmup
    trace = packed_training_trace(
        tokens=tokens, steps=args.packed_steps, layers=args.packed_layers, heads=args.heads, dim=args.dim,
        mean=args.packed_mean, sigma=args.packed_sigma, min_len=args.packed_min_len, max_len=max_len, seed=args.seed,
    )  # fmt: skip
    peak_bytes, peak_step, _ = trace.peak_after(warmup)
    shapes = {op[2:4] for ops in trace.steps for op in ops if op[0] == "a"}
    res: dict[str, Any] = {
        "device": device,
        "tokens": tokens,
        "steps": args.packed_steps,
        "warmup_steps": warmup,
        "layers": args.packed_layers,
        "heads": args.heads,
        "dim": args.dim,
        "lengths": {"mean": args.packed_mean, "sigma": args.packed_sigma, "min": args.packed_min_len, "max": max_len},
        "segments": list(PACKED_SEGMENTS),
        "rates": list(PACKED_RATES),
        "head_mode": PACKED_HEAD_MODE,
        "docs_per_step": trace.docs,
        "longest_doc_per_step": trace.longest,
        "plan_index_bytes_per_step": trace.plan_bytes,
        "requested_peak_bytes_per_step": trace.step_peak_bytes,
        "buffers_per_step": [sum(1 for op in ops if op[0] == "a") for ops in trace.steps],
        "distinct_shapes": len(shapes),
        "trace_peak_requested_bytes_after_warmup": peak_bytes,
        "trace_peak_step": peak_step,
        "trace_peak_requested_bytes_in_warmup": max(trace.step_peak_bytes[:warmup]),
    }
    if device == "cuda":
        res["torch_caching_allocator"] = run_torch(trace, device, warmup, args.stamp)
    else:
        res["torch_caching_allocator"] = {"available": False, "reason": "CPU: torch.empty has no caching allocator"}
    buffer_mib = math.ceil(tokens * args.heads * args.dim * torch.bfloat16.itemsize / MIB)
    for key, hints, buffer_slabs in PACKED_POOL_VARIANTS:
        slab_mib = buffer_mib if buffer_slabs else args.slab_mib
        res[key] = run_pool(trace, device, warmup, args, hints=hints, slab_bytes=slab_mib * MIB)
    return res


# ------------------------------------------------------------------------ options and report
def add_packed_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--packed-tokens", default="256K", help="packed trace: tokens per step (the batch's budget)")
    ap.add_argument("--packed-steps", type=int, default=40, help="packed trace: training steps, warm-up included")
    ap.add_argument("--packed-warmup", type=int, default=10, help="packed trace: steps before counting allocations")
    ap.add_argument("--packed-layers", type=int, default=2, help="packed trace: attention layers per step")
    ap.add_argument("--packed-mean", type=float, default=8192.0, help="packed trace: mean document length")
    ap.add_argument("--packed-sigma", type=float, default=1.0, help="packed trace: log-normal sigma")
    ap.add_argument("--packed-min-len", type=int, default=256, help="packed trace: shortest document")
    ap.add_argument("--packed-max-len", default="128K", help="packed trace: longest document")


def check_packed_arguments(ap: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse packed-trace options that cannot describe a trace (before any part runs)."""
    if args.packed_steps < 2 or not 0 < args.packed_warmup < args.packed_steps:
        ap.error(
            f"--packed-warmup must be in [1, --packed-steps - 1] with --packed-steps >= 2, got "
            f"--packed-warmup {args.packed_warmup} and --packed-steps {args.packed_steps}"
        )
    if args.packed_layers < 1:
        ap.error(f"--packed-layers must be >= 1, got {args.packed_layers}")
    try:
        tokens, longest = parse_tokens(args.packed_tokens), parse_tokens(args.packed_max_len)
    except ValueError:
        ap.error(
            f"--packed-tokens / --packed-max-len take counts like 256K or 1M, got {args.packed_tokens!r}, {args.packed_max_len!r}"
        )
    if tokens < 1 or not 1 <= args.packed_min_len <= longest:
        ap.error(
            f"need --packed-tokens >= 1 and 1 <= --packed-min-len <= --packed-max-len, got {tokens}, "
            f"{args.packed_min_len}, {longest}"
        )
    if not (args.packed_mean > 0 and args.packed_sigma >= 0):
        ap.error(f"need --packed-mean > 0 and --packed-sigma >= 0, got {args.packed_mean}, {args.packed_sigma}")


def apply_packed_quick(args: argparse.Namespace) -> None:
    """--quick: 32K tokens per step, documents 256..16K (mean 2K), 12 steps of which 4 warm-up."""
    args.packed_tokens, args.packed_max_len, args.packed_mean = "32K", "16K", 2048.0
    args.packed_steps, args.packed_warmup = 12, 4


def packed_table_rows(p: dict[str, Any]) -> list[str]:
    """Rows of bench_memory's table (| metric | memory_runtime | torch | ratio / target |)."""
    tc = p["torch_caching_allocator"]
    w, s = p["warmup_steps"], p["steps"]
    rows = []
    for key, label in PACKED_LABELS.items():
        pool = p[key]
        name = f"{label} ({pool['slab_mib']:g} MiB slabs)"
        torch_allocs = (
            f"{tc['new_device_allocs_after_warmup']} (max {tc['max_new_device_allocs_per_step_after_warmup']}/step)"
            if "new_device_allocs_after_warmup" in tc
            else "-"
        )
        growth = pool["growth_after_warmup"]
        why = ""
        if growth:
            big = max(growth, key=lambda g: g["request_bytes"])
            why = (
                f"; {sum(g['above_every_earlier_step_peak'] for g in growth)} with the live set above every earlier "
                f"step's peak; largest request {big['request_bytes'] / MIB:.1f} MiB with "
                f"{big['free_bytes_before'] / MIB:.1f} MiB free, largest free range {big['largest_free_range_before'] / MIB:.1f} MiB"
            )
        rows.append(
            f"| packed, {name}: new device allocs in steps {w}..{s - 1} (warm-up {w}) | "
            f"{pool['new_device_allocs_after_warmup']} (slabs {pool['new_slabs_after_warmup']}{why}; last growth at "
            f"step {pool['last_step_with_new_device_alloc']}) | {torch_allocs} | target 0 |"
        )
        tr = tc.get("peak_reserved_over_allocated")
        rows.append(
            f"| packed, {name}: peak reserved / peak allocated (GiB) | {pool['peak_reserved_over_allocated']:.3f} "
            f"({pool['peak_reserved_bytes'] / GIB:.2f} / {pool['peak_allocated_bytes'] / GIB:.2f}) | "
            + (
                "-"
                if tr is None
                else f"{tr:.3f} ({tc['peak_reserved_bytes'] / GIB:.2f} / {tc['peak_allocated_bytes'] / GIB:.2f})"
            )
            + " | lower is better |"
        )
        pf, tf = pool["fragmentation_at_peak"], tc.get("fragmentation_at_peak", {})
        rows.append(
            f"| packed, {name}: at the peak: external fragmentation / largest hole ratio | "
            f"{_num(pf.get('external_fragmentation'))} / {_num(pf.get('largest_hole_ratio'))} | "
            f"{_num(tf.get('external_fragmentation'))} / {_num(tf.get('largest_hole_ratio'))} | - |"
        )
    return rows


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def packed_description(p: dict[str, Any]) -> str:
    """The markdown paragraph that says what the packed rows measured."""
    docs = p["docs_per_step"]
    lens = p["lengths"]
    return (
        f"Packed trace (part B2): {p['steps']} training steps of {p['tokens']} tokens, each packing documents of "
        f"log-normal lengths (mean {lens['mean']:g}, sigma {lens['sigma']:g}, clipped to [{lens['min']}, "
        f"{lens['max']}], seed per step; {min(docs)}-{max(docs)} documents per step), {p['layers']} attention "
        f"layers, H={p['heads']}, D={p['dim']}, bf16. Buffer sizes follow attn-core's packed plan (segments "
        f"{p['segments']}, rates {p['rates']}, head mode {p['head_mode']}): strided pieces (long documents' "
        f"full segments), the plan's index tensors (kept as the plan cache keeps them) and cu_seqlens "
        f"change size every step ({p['distinct_shapes']} distinct shapes); q/k/v, out, lse and the hidden states "
        f"keep N. Warm-up: the first {p['warmup_steps']} steps; allocations counted per step after them, peaks "
        f"over them (largest live set {p['trace_peak_requested_bytes_after_warmup'] / GIB:.2f} GiB requested, at step "
        f"{p['trace_peak_step']}; warm-up's largest {p['trace_peak_requested_bytes_in_warmup'] / GIB:.2f} GiB); "
        f"fragmentation read at that largest live set. New device allocations: on CUDA cudaMalloc calls "
        f"(memory_stats segment.all.allocated) in the process, on CPU the pool's new slabs. pool+long_lived: the "
        f"plan's index tensors (they outlive the steps after theirs) acquired long_lived; N-sized slabs: slab_bytes = "
        f"one (1, N, H, D) buffer (a request above slab_bytes gets an exact-size slab of its own, and free ranges "
        f"never merge across slabs). Each slab reserved after the warm-up is recorded in the JSON "
        f"(growth_after_warmup: the request, the pool's free bytes and largest free range before it, and whether "
        f"the live set then exceeded every earlier step's peak). No consolidate() variant: it needs every buffer "
        f"released, and cached plans keep index tensors live across every step boundary."
    )


def plot_packed(ax: Any, p: dict[str, Any]) -> None:
    """Reserved GiB at each step's end for torch and each pool variant, warm-up shaded; the legend
    gives each one's new device allocations after the warm-up."""
    w = p["warmup_steps"]
    ax.axvspan(-0.5, w - 0.5, color="0.9", label=f"warm-up ({w} steps)")
    series = [(PACKED_LABELS[k], p[k]) for k in PACKED_LABELS]
    if "new_device_allocs_per_step" in p["torch_caching_allocator"]:
        series.append(("torch", p["torch_caching_allocator"]))
    for name, row in series:
        ys = [b / GIB for b in row["reserved_bytes_at_step_end"]]
        ax.plot(range(len(ys)), ys, ".-", label=f"{name}: {row['new_device_allocs_after_warmup']} new after warm-up")
    ax.set_xlabel("packed training step")
    ax.set_ylabel("reserved GiB at step end")
    ax.legend(fontsize="small")
