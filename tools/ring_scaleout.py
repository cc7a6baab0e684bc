"""Scale-out simulation behind ``python tools/bench_ring.py --simulate W1,W2,...`` (one process, no group).

Predicted per-GPU efficiency of ring, Ulysses and hybrid (all-to-all inside a node of --gpus-per-node,
ring across nodes), dense and dilated, causal and not, at --tokens-per-gpu tokens per GPU. Compute is
measured on this device at each W's shard shapes through the real per-step code (ring: attn_core.blocks
kernels and LSE merges per ring step, K/V copied into double buffers on a side stream; Ulysses: the
real packing, inner attention and unpacking with the all-to-alls replaced by side-stream copies; ring
dilated: its even share of the whole dilated attention, its exchange bytes from plan_ring_dilated).
Transfer times are bytes / link speed (--nvlink-gbps inside a node, --ib-gbps per GPU across nodes);
ring steps overlap transfer and compute, all-to-alls and dilated exchanges do not. Predicted
efficiency = compute / (compute + exposed transfer) per GPU (the kernels' own efficiency at the shard
shapes is in the compute times). The results are predictions, not measurements of a multi-node run.

Before a point allocates anything, its peak memory is estimated (estimate_point_bytes) and compared
with the device's free memory (or --memory-limit-gib): a point that does not fit is reported as a row
"does not fit on one device: needs X GiB" instead of running (the ring and hybrid dilated points
run the whole sequence's dilated attention, which outgrows one device first). A point that still runs
out of memory is reported the same way. Writes scaleout_simulation.json/.md/.png.

Also holds the tensor helpers bench_ring.py shares (sync_device, make_qkv, fwd_bwd).
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

GIB = 2**30


def sync_device(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def make_qkv(
    b: int, n: int, h: int, hkv: int, d: int, dtype: torch.dtype, dev: torch.device, seed: int
) -> list[torch.Tensor]:
    g = torch.Generator(device=dev).manual_seed(seed)
    return [torch.randn(b, n, hh, d, generator=g, device=dev, dtype=dtype) for hh in (h, hkv, hkv, h)]


def fwd_bwd(
    fn: Callable[..., torch.Tensor], q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dout: torch.Tensor
) -> Callable[[], None]:
    leaves = [t.detach().requires_grad_(True) for t in (q, k, v)]

    def run() -> None:
        for t in leaves:
            t.grad = None
        fn(*leaves).backward(dout)

    return run


# ----------------------------------------------------------------------------- --simulate W


class _CopyComm:
    """Stands in for AllToAllComm on one device: the exchange is a copy on a side stream (same buffers)."""

    def __init__(self, world_size: int, dev: torch.device) -> None:
        self.world_size, self.rank, self.device, self.backend = world_size, 0, dev, "simulated"
        self.stream = torch.cuda.Stream(dev) if dev.type == "cuda" else None

    def all_to_all(self, send: torch.Tensor, *, label: str = "") -> Any:
        send = send.contiguous()
        recv = torch.empty_like(send)
        if self.stream is None:
            recv.copy_(send)
        else:
            self.stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self.stream):
                recv.copy_(send)
            torch.cuda.current_stream(self.device).wait_stream(self.stream)

        class Done:
            def wait(self) -> torch.Tensor:
                return recv

        return Done()


def _time_local(fn: Callable[[], Any], dev: torch.device, reps: int) -> float:
    """Median wall ms of fn on this process after one warm-up (no collectives)."""
    fn()
    sync_device(dev)
    ts = []
    for _ in range(reps):
        sync_device(dev)
        t0 = time.perf_counter()
        fn()
        sync_device(dev)
        ts.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(ts)


def _ring_step_ms(
    W: int, n: int, H: int, Hkv: int, D: int, causal: bool, dtype: torch.dtype, dev: torch.device, reps: int
) -> tuple[float, float]:
    """(forward ms, backward ms) of the W steps of ring attention on one rank, at shard shape (1, n, H, D).

    Each distinct step (ring_step_blocks pieces) runs once with ring attention's kernels and merges
    (attn_core.blocks, attn_core.merge) while its K/V (backward: K/V and fp32 dK/dV) are copied into a
    double buffer on a side stream, as the transfer would land; counted as often as it occurs.
    """
    from attn_core.blocks import acc_dtype, block_backward, block_forward
    from attn_core.merge import merge_into_
    from attn_ring.ring import ring_step_blocks

    layout = "zigzag" if causal and n % 2 == 0 else "contiguous"
    q, k, v, dout = make_qkv(1, n, H, Hkv, D, dtype, dev, seed=41)
    scale = D**-0.5
    ad = acc_dtype(dtype)
    out = torch.zeros(1, n, H, D, dtype=ad, device=dev)
    lse = torch.full((1, H, n), float("-inf"), dtype=ad, device=dev)
    kv = torch.stack([k, v])
    bufs = [torch.empty_like(kv) for _ in range(2)]
    dkv = torch.zeros((2, *k.shape), dtype=ad, device=dev)
    dkv_buf = torch.empty_like(dkv)
    side = torch.cuda.Stream(dev) if dev.type == "cuda" else None
    rank = W // 2
    kinds: dict[str, list[Any]] = {}
    for s in range(W):
        pieces = ring_step_blocks(rank, (rank - s) % W, W, n, layout, causal)
        kinds.setdefault(repr(pieces), [pieces, 0])[1] += 1

    def copy(dst: torch.Tensor, src: torch.Tensor) -> None:
        if side is None:
            dst.copy_(src)
            return
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):
            dst.copy_(src, non_blocking=True)

    def join() -> None:
        if side is not None:
            torch.cuda.current_stream(dev).wait_stream(side)

    out_saved = out.to(dtype)  # ring attention saves its output in q's dtype for the backward
    fwd = bwd = 0.0
    for pieces, count in kinds.values():

        def step_fwd(pieces: Any = pieces) -> None:
            copy(bufs[0], kv)
            for (q0, q1), (k0, k1), c in pieces:
                o, ls = block_forward(q[:, q0:q1], kv[0, :, k0:k1], kv[1, :, k0:k1], is_causal=c, softmax_scale=scale)
                merge_into_(out[:, q0:q1], lse[:, :, q0:q1], o, ls)
            join()

        def step_bwd(pieces: Any = pieces) -> None:
            copy(bufs[1], kv)
            copy(dkv_buf, dkv)
            for (q0, q1), (k0, k1), c in pieces:
                block_backward(
                    dout[:, q0:q1],
                    q[:, q0:q1],
                    kv[0, :, k0:k1],
                    kv[1, :, k0:k1],
                    out_saved[:, q0:q1],
                    lse[:, :, q0:q1],
                    is_causal=c,
                    softmax_scale=scale,
                )
            join()

        lse.zero_()  # finite statistics for the backward
        fwd += count * _time_local(step_fwd, dev, reps)
        bwd += count * _time_local(step_bwd, dev, reps)
    return fwd, bwd


def _ulysses_ms(
    W: int,
    n: int,
    H: int,
    Hkv: int,
    D: int,
    causal: bool,
    dtype: torch.dtype,
    dev: torch.device,
    reps: int,
    config: Any = None,
) -> float:
    """fwd+bwd ms of one rank of Ulysses at shard shape (1, n, H, D): the real packing, inner attention
    (dense, or dilated with ``config``) and unpacking, the all-to-alls replaced by side-stream copies."""
    from attn_ring.ulysses import (
        InnerAttention,
        heads_to_sequence,
        kv_heads_on_wire,
        repeat_kv_heads,
        sequence_to_heads,
    )

    comm = _CopyComm(W, dev)
    inner = InnerAttention("dense") if config is None else InnerAttention("dilated", config=config)
    q, k, v, dout = make_qkv(1, n, H, Hkv, D, dtype, dev, seed=43)
    leaves = [t.requires_grad_(True) for t in (q, k, v)]

    def run() -> None:
        for t in leaves:
            t.grad = None
        kw, vw = repeat_kv_heads(leaves[1], leaves[2], kv_heads_on_wire(H, Hkv, W))
        qh, kh, vh = sequence_to_heads([leaves[0], kw, vw], comm)  # type: ignore[arg-type]
        o = inner(
            qh, kh, vh, head_base=0, total_heads=H, is_causal=causal, key_padding_mask=None, softmax_scale=D**-0.5
        )
        heads_to_sequence(o, comm).backward(dout)  # type: ignore[arg-type]

    return _time_local(run, dev, reps)


def _dilated_share_ms(
    N: int,
    share: int,
    H: int,
    Hkv: int,
    D: int,
    causal: bool,
    dtype: torch.dtype,
    dev: torch.device,
    reps: int,
    config: Any,
) -> float:
    """fwd+bwd ms of dilated attention over all N tokens and H heads, divided by ``share`` ranks (ring
    dilated splits the work evenly for segments aligned with shards)."""
    from attn_core import dilated_attention

    q, k, v, dout = make_qkv(1, N, H, Hkv, D, dtype, dev, seed=47)
    fn = fwd_bwd(
        lambda a, b, c: dilated_attention(a, b, c, config.segment_lengths, config.dilation_rates, is_causal=causal),
        q,
        k,
        v,
        dout,
    )
    return _time_local(fn, dev, reps) / share


def _link_ms(nbytes: float, gbps: float) -> float:
    return nbytes / (gbps * 1e9) * 1e3


def _a2a_ms(per_peer_bytes: float, W: int, args: argparse.Namespace) -> float:
    """One all-to-all: W-1 blocks leave each GPU; peers on the node over NVLink, the rest over InfiniBand
    (both links busy at once: the slower side sets the time)."""
    local = min(W, args.gpus_per_node) - 1
    remote = W - 1 - local
    return max(_link_ms(per_peer_bytes * local, args.nvlink_gbps), _link_ms(per_peer_bytes * remote, args.ib_gbps))


def estimate_point_bytes(
    measure: str, n: int, H: int, Hkv: int, D: int, element_size: int, kv_heads_sent: int = 0
) -> int:
    """Peak bytes one simulated point allocates, estimated from its shapes before anything is allocated.

    measure: "ring_steps" (_ring_step_ms at shard (1, n, H, D), Hkv kv heads), "ulysses" (_ulysses_ms
    at shard (1, n, H, D), kv_heads_sent kv heads on the wire) or "dilated_full" (_dilated_share_ms
    over the whole sequence, n = N tokens). Counts the tensors each function holds at once plus the
    kernels' per-piece working copies (an estimate with some margin; a point that still runs out
    of memory is reported as not fitting).
    """
    acc = max(element_size, 4)  # ring accumulators and dK/dV are fp32 (fp64 for fp64)
    q_e, kv_e = n * H * D * element_size, n * Hkv * D * element_size
    q_a, kv_a = n * H * D * acc, n * Hkv * D * acc
    if measure == "ring_steps":
        # q, dout, out_saved; k, v, their stack and two receive buffers; out fp32; dK/dV and its
        # buffer in fp32; a step's block outputs and backward gradients with their kernel workspace
        return 3 * q_e + 8 * kv_e + 3 * q_a + 8 * kv_a
    if measure == "ulysses":
        # one (q, k, v) set at the shard: leaves, gradients, repeated kv, all-to-all send and receive
        # both ways, the inner attention's inputs, output and gradients: about ten such sets at once
        qkv = n * (H + 2 * max(Hkv, kv_heads_sent)) * D * element_size
        return 10 * qkv
    if measure == "dilated_full":
        # q, dout, out, dq and k, v, dk, dv over the whole sequence and the fp32 lse, plus the
        # backend's per-piece temporaries: measured at 6.5% (N >= 256K) to 12.8% (128K) of those
        # eight tensors on one H100 (docs/benchmarks/dilated_h100.md); 15% allowed here
        return int(1.15 * (4 * q_e + 4 * kv_e)) + n * H * 4
    raise ValueError(f"measure must be 'ring_steps', 'ulysses' or 'dilated_full', got {measure!r}")


def memory_budget_bytes(dev: torch.device, limit_gib: float) -> float:
    """Bytes a point may use: the device's free memory (CUDA, after emptying the cache), capped by
    ``limit_gib`` when it is > 0; on CPU only the limit applies (infinite without one)."""
    budget = float("inf")
    if dev.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
        budget = float(torch.cuda.mem_get_info(dev)[0])
    if limit_gib > 0:
        budget = min(budget, limit_gib * GIB)
    return budget


def _does_not_fit(need: float, budget: float) -> str:
    return f"does not fit on one device: needs {need / GIB:.3g} GiB, {budget / GIB:.3g} GiB free"


def _measure_point(
    args: argparse.Namespace,
    W: int,
    A: int,
    R: int,
    attn: str,
    causal: bool,
    config: Any,
    dtype: torch.dtype,
    dev: torch.device,
) -> dict[str, Any]:
    """Compute and transfer times of one (W, A x R, attention, causal) point: the row's timing fields."""
    from attn_ring.ring_dilated import plan_ring_dilated
    from attn_ring.ulysses import kv_heads_on_wire

    elem = torch.empty(0, dtype=dtype).element_size()
    H, Hkv, D, n = args.heads, args.kv_heads or args.heads, args.head_dim, args.tokens_per_gpu
    N = n * W
    kvw = kv_heads_on_wire(H, Hkv, A) if A > 1 else Hkv
    # all-to-alls: q, k, v in and the output back (forward), their gradients (backward); per peer block
    a2a = 0.0
    if A > 1:
        per_peer_in, per_peer_out = n * (H + 2 * kvw) * D * elem / A, n * H * D * elem / A
        a2a = 2 * (_a2a_ms(per_peer_in, A, args) + _a2a_ms(per_peer_out, A, args))
    ring_gbps = args.nvlink_gbps if args.gpus_per_node >= W and A == 1 else args.ib_gbps
    transfer_step = (0.0, 0.0)
    if attn == "dense" and R > 1:
        fwd, bwd = _ring_step_ms(R, n * A, H // A, kvw // A if A > 1 else Hkv, D, causal, dtype, dev, args.reps)
        kv_bytes = 2 * n * A * (kvw // A if A > 1 else Hkv) * D * elem
        step_x = _link_ms(kv_bytes, ring_gbps)
        step_xb = step_x + _link_ms(kv_bytes * 4 / elem, ring_gbps)  # + fp32 dK/dV one hop behind
        steps_f, steps_b = fwd / R, bwd / R
        ring_ms = (R - 1) * max(steps_f, step_x) + steps_f + R * max(steps_b, step_xb)
        compute, transfer_step = fwd + bwd, (step_x, step_xb)
    elif attn == "dense" or (A > 1 and R == 1):
        # Ulysses alone (R == 1): the inner attention runs on every token of this rank's heads
        compute = _ulysses_ms(A, n, H, Hkv, D, causal, dtype, dev, args.reps, None if attn == "dense" else config)
        ring_ms = compute
    else:
        compute = _dilated_share_ms(N, W, H, Hkv, D, causal, dtype, dev, args.reps, config)
        plan = plan_ring_dilated(
            N, R, H // A, (kvw // A) if A > 1 else Hkv, config.segment_lengths, config.dilation_rates, is_causal=causal
        )
        worst = max(range(R), key=lambda r: plan.ranks[r].rows_received)
        size = {"batch": 1, "head_dim": D}
        xf = _link_ms(plan.bytes_received(worst, **size, element_size=elem), ring_gbps)
        xb = _link_ms(plan.bytes_sent(worst, **size, element_size=4), ring_gbps)
        ring_ms, transfer_step = compute + xf + xb, (xf, xb)  # exchanges wait before compute
    total = ring_ms + a2a
    return {
        "compute_ms": compute,
        "transfer_ms_per_step": transfer_step,
        "a2a_ms": a2a,
        "predicted_ms": total,
        "efficiency": compute / total if total else None,
    }


def point_memory_bytes(args: argparse.Namespace, W: int, A: int, R: int, attn: str, element_size: int) -> int:
    """estimate_point_bytes for the measurement _measure_point makes at this point."""
    from attn_ring.ulysses import kv_heads_on_wire

    H, Hkv, D, n = args.heads, args.kv_heads or args.heads, args.head_dim, args.tokens_per_gpu
    kvw = kv_heads_on_wire(H, Hkv, A) if A > 1 else Hkv
    if attn == "dense" and R > 1:
        return estimate_point_bytes("ring_steps", n * A, H // A, kvw // A if A > 1 else Hkv, D, element_size)
    if attn == "dense" or (A > 1 and R == 1):
        return estimate_point_bytes("ulysses", n, H, Hkv, D, element_size, kv_heads_sent=kvw)
    return estimate_point_bytes("dilated_full", n * W, H, Hkv, D, element_size)


def simulate(args: argparse.Namespace) -> int:
    """--simulate: predicted per-GPU efficiency of ring, Ulysses and hybrid at W GPUs, from one device."""
    from attn_core.config import DilatedConfig

    dev = torch.device(args.device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    elem = torch.empty(0, dtype=dtype).element_size()
    worlds = [int(w) for w in args.simulate.split(",") if w]
    config = DilatedConfig([int(s) for s in args.segments.split(",")], [int(r) for r in args.rates.split(",")], "all")
    jobs = [
        (W, s, a, c)
        for W in worlds
        for s in ("ring", "ulysses", "hybrid")
        for a in ("dense", "dilated")
        for c in (False, True)
    ]
    rows: list[dict[str, Any]] = []
    for i, (W, scheme, attn, causal) in enumerate(jobs):
        bar = "#" * (30 * i // len(jobs))
        print(
            f"\r[{bar:<30}] {i}/{len(jobs)} W={W} {scheme} {attn} causal={causal}   ",
            end="",
            file=sys.stderr,
            flush=True,
        )
        A = min(W, args.gpus_per_node) if scheme == "hybrid" else (W if scheme == "ulysses" else 1)
        R = W // A
        row: dict[str, Any] = {"W": W, "scheme": scheme, "attention": attn, "causal": causal, "a2a": A, "ring": R}
        if args.heads % A:
            rows.append({**row, "status": f"not possible: H={args.heads} heads do not split over {A} all-to-all ranks"})
            continue
        need = point_memory_bytes(args, W, A, R, attn, elem)
        budget = memory_budget_bytes(dev, args.memory_limit_gib)
        row["memory_estimate_GiB"] = need / GIB
        if need > budget:
            rows.append({**row, "status": _does_not_fit(need, budget)})
            continue
        try:
            rows.append(
                {
                    **row,
                    "status": "ok",
                    "N": args.tokens_per_gpu * W,
                    **_measure_point(args, W, A, R, attn, causal, config, dtype, dev),
                }
            )
        except torch.OutOfMemoryError:  # the estimate was short: report the point, keep going
            rows.append({**row, "status": _does_not_fit(need, budget) + " (ran out of memory)"})
            gc.collect()
            if dev.type == "cuda":
                torch.cuda.empty_cache()
    print(f"\r[{'#' * 30}] {len(jobs)}/{len(jobs)} done" + " " * 30, file=sys.stderr, flush=True)
    res = {
        "note": "PREDICTIONS from one device: compute measured at each W's shard shapes with transfers replaced by "
        "side-stream copies; transfer times from bytes / link speed, not measured on a network",
        "env": {
            "device": str(dev),
            "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
            "dtype": str(dtype),
            "torch": torch.__version__,
        },
        "model": {
            "tokens_per_gpu": args.tokens_per_gpu,
            "H": args.heads,
            "Hkv": args.kv_heads or args.heads,
            "D": args.head_dim,
            "segments": list(config.segment_lengths),
            "rates": list(config.dilation_rates),
            "nvlink_GBps": args.nvlink_gbps,
            "ib_GBps": args.ib_gbps,
            "gpus_per_node": args.gpus_per_node,
        },
        "rows": rows,
    }
    write_simulation(res, args.out)
    return 0


def simulation_table(res: dict[str, Any]) -> str:
    """The markdown table of a scaleout_simulation.json result."""
    m = res["model"]
    lines = [
        f"# Scale-out simulation ({res['env']['gpu']}, {res['env']['dtype']}): {res['note']}",
        f"# {m['tokens_per_gpu']} tokens/GPU, H={m['H']} Hkv={m['Hkv']} D={m['D']}, NVLink {m['nvlink_GBps']} GB/s, "
        f"InfiniBand {m['ib_GBps']} GB/s per GPU, {m['gpus_per_node']} GPUs/node; "
        "predicted efficiency = compute / (compute + exposed transfer)",
        "",
        "| W | scheme | attention | causal | A x R | compute ms | transfer ms per ring step, dilated: per exchange (fwd, bwd) | all-to-all ms | predicted ms | predicted efficiency |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in res["rows"]:
        head = f"| {r['W']} | {r['scheme']} | {r['attention']} | {r['causal']} | {r['a2a']}x{r['ring']} |"
        if r["status"] != "ok":
            lines.append(f"{head} {r['status']} | | | | |")
            continue
        xf, xb = r["transfer_ms_per_step"]
        lines.append(
            f"{head} {r['compute_ms']:.2f} | {xf:.3f}, {xb:.3f} | {r['a2a_ms']:.3f} | {r['predicted_ms']:.2f} | "
            f"{r['efficiency']:.2f} |"
        )
    return "\n".join(lines)


def write_simulation(res: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "scaleout_simulation.json").write_text(json.dumps(res, indent=2))
    table = simulation_table(res)
    (out / "scaleout_simulation.md").write_text(table + "\n")
    print(table, flush=True)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
        for ax, attn in zip(axes, ("dense", "dilated")):
            for scheme in ("ring", "ulysses", "hybrid"):
                for causal, style in ((False, "o-"), (True, "s--")):
                    pts = [
                        (r["W"], r["efficiency"])
                        for r in res["rows"]
                        if r["status"] == "ok" and (r["scheme"], r["attention"], r["causal"]) == (scheme, attn, causal)
                    ]
                    if pts:
                        ax.plot(*zip(*pts), style, label=f"{scheme}{' causal' if causal else ''}")
            ax.set_xscale("log", base=2)
            ax.set_xlabel("GPUs W")
            ax.set_title(f"{attn} (predicted)")
            ax.legend(fontsize=7)
        axes[0].set_ylabel("predicted per-GPU efficiency")
        fig.tight_layout()
        fig.savefig(out / "scaleout_simulation.png", dpi=110)
    except ImportError:
        pass
