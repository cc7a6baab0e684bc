"""Benchmark ring dilated attention: correctness on the device, per-GPU throughput beside the
single-GPU attn_core anchor, and communicated bytes against the dilated-row minimum.

    # one GPU (a one-rank NCCL group is created here), or a CPU smoke run (gloo)
    source tools/srcpath.sh && python tools/bench_ring_dilated.py --tokens-per-gpu 262144 1048576
    # W GPUs (weak scaling: the same tokens per GPU on every rank)
    torchrun --standalone --nproc-per-node=4 tools/bench_ring_dilated.py --tokens-per-gpu 1048576 2097152
    # communication only (CPU, no process group): bytes per rank vs minimum vs an all-gather
    python tools/bench_ring_dilated.py --plan-only --tokens-per-gpu 1048576 --worlds 2 4 8

Config (issue 6): segments [2048, 8192, 65536, 262144, N] with rates [1, 2, 8, 32, N/4096],
N = tokens per GPU x W. Effective FLOPs: 4 * D per attended (query, key) pair summed over the
groups (the multiset union), forward; forward+backward counts 3.5x. Minimum bytes: the count of
distinct (position, kv head) K/V rows outside a rank's shard that some query of the shard attends
to (docs/ring_dilated.md), counted here from the definition on a boolean mask, independent of the
plan code. Writes JSON, a markdown table and a PNG to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_env import cuda_median_ms

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def longnet_config(N: int) -> tuple[list[int], list[int]]:
    if N % 4096:
        raise SystemExit(f"global N={N} must be a multiple of 4096 (the last rate is N/4096)")
    return [2048, 8192, 65536, 262144, N], [1, 2, 8, 32, N // 4096]


def attended_pairs(N: int, H: int, segs: list[int], rates: list[int], causal: bool) -> int:
    """Sum over groups and heads of attended (query, key) pairs (head_mode 'all')."""
    total = 0
    for w, r in zip(segs, rates):
        for j in range(H):
            o = j % r
            for length, count in ((w, N // w), (N % w, 1)):
                if count == 0 or length == 0:
                    continue
                T = len(range(o, length, r))
                total += count * (T * (T + 1) // 2 if causal else T * T)
    return total


def minimum_rows(N: int, W: int, rank: int, H: int, Hkv: int, segs: list[int], rates: list[int], causal: bool) -> int:
    """Distinct (position, kv head) rows outside ``rank``'s shard that its queries attend to."""
    n = N // W
    lo, hi = rank * n, (rank + 1) * n
    need = torch.zeros(Hkv, N, dtype=torch.bool)
    pos = torch.arange(N)
    for w, r in zip(segs, rates):
        for s in range(lo // w, (hi - 1) // w + 1):
            seg_lo, seg_hi = s * w, min((s + 1) * w, N)
            if lo <= seg_lo and seg_hi <= hi:
                continue  # wholly local
            for j in range(H):
                o = j % r
                mine = pos[max(seg_lo, lo) : min(seg_hi, hi)]
                mine = mine[mine % r == o]
                if mine.numel() == 0:
                    continue
                cand = pos[seg_lo:seg_hi]
                cand = cand[(cand % r == o) & ((cand < lo) | (cand >= hi))]
                if causal:
                    cand = cand[cand <= mine.max()]
                need[j // (H // Hkv), cand] = True
    return int(need.sum())


def cpu_time_ms(fn, warmup: int, reps: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def init_group() -> tuple[int, int, torch.device]:
    if "RANK" not in os.environ:  # plain python: a one-rank group of our own
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="29533")
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
        dist.init_process_group("nccl", timeout=timedelta(seconds=300))
        return rank, world, torch.device("cuda", torch.cuda.current_device())
    dist.init_process_group("gloo", timeout=timedelta(seconds=300))
    return rank, world, torch.device("cpu")


def check_correctness(rank: int, world: int, device: torch.device, dtype: torch.dtype, H: int, D: int) -> dict:
    """bf16/fp16 ring output and grads vs float64 reference on the gathered sequence (tolerance rule)."""
    from attn_core import reference
    from attn_core.testing import assert_close_to_reference, max_abs_error
    from attn_ring.exchange import last_stats, reset_stats
    from attn_ring.ring_dilated import plan_ring_dilated, ring_dilated_attention

    n = 1024
    N = n * world
    segs, rates = [256, 512, 2048, N], [1, 2, 4, max(N // 256, 1)]
    rows = []
    for causal in (False, True):
        g = torch.Generator().manual_seed(1234 + int(causal))
        q, k, v, dout = (torch.randn(1, N, H, D, generator=g, dtype=torch.float64).to(device) for _ in range(4))
        lo, hi = rank * n, (rank + 1) * n
        shard = [t[:, lo:hi].to(dtype).contiguous().requires_grad_() for t in (q, k, v)]
        reset_stats()
        out = ring_dilated_attention(*shard, segs, rates, is_causal=causal)
        got_fwd = last_stats().bytes_received
        out.backward(dout[:, lo:hi].to(dtype))
        got_total = last_stats().bytes_received
        refs = []
        for cdt in (torch.float64, dtype):
            qr, kr, vr = (t.detach().to(cdt).clone().requires_grad_() for t in (q, k, v))
            o, _ = reference.dilated_attention(qr, kr, vr, segs, rates, is_causal=causal, dtype=cdt)
            o.backward(dout.to(o.dtype))
            refs.append([x[:, lo:hi].detach() for x in (o, qr.grad, kr.grad, vr.grad)])
            del qr, kr, vr, o
        errs = {}
        for name, actual, want, base in zip(("out", "dq", "dk", "dv"), (out, *(s.grad for s in shard)), *refs):
            assert_close_to_reference(f"{name} causal={causal} rank {rank}", actual, want, base)
            errs[name] = max_abs_error(actual, want)
        plan = plan_ring_dilated(N, world, H, H, segs, rates, is_causal=causal)
        want_fwd = plan.bytes_received(rank, batch=1, head_dim=D, element_size=shard[0].element_size())
        # forward K/V + the gradients of rows we sent, coming back in fp32
        want_total = want_fwd + plan.bytes_sent(rank, batch=1, head_dim=D, element_size=4)
        if (got_fwd, got_total) != (want_fwd, want_total):
            raise AssertionError(
                f"rank {rank}: received {got_fwd} bytes in forward, {got_total} in all; plan says {want_fwd}, {want_total}"
            )
        mins = minimum_rows(N, world, rank, H, H, segs, rates, causal)
        if plan.ranks[rank].rows_received != mins:
            raise AssertionError(f"rank {rank}: plan receives {plan.ranks[rank].rows_received} rows, minimum {mins}")
        rows.append({"causal": causal, "N": N, "max_abs_error": errs, "rows_received": mins})
    return {"ok": True, "cases": rows}


def bench_point(rank: int, world: int, device: torch.device, dtype: torch.dtype, n: int, H: int, D: int,
                causal: bool, reps: int, bytes_only: bool) -> dict:  # fmt: skip
    import attn_core
    from attn_ring.exchange import last_stats, reset_stats
    from attn_ring.ring_dilated import plan_ring_dilated, ring_dilated_attention

    N = n * world
    segs, rates = longnet_config(N)

    def cuda_timer(fn, warmup: int, reps: int) -> float:
        return cuda_median_ms(fn, reps, warmup=warmup)

    timer = cuda_timer if device.type == "cuda" else cpu_time_ms
    g = torch.Generator(device=device).manual_seed(rank)
    t = {name: torch.randn(1, n, H, D, generator=g, device=device, dtype=dtype) for name in ("q", "k", "v", "dout")}
    q, k, v = (t[name].requires_grad_() for name in ("q", "k", "v"))
    res: dict = {"tokens_per_gpu": n, "N": N, "world": world, "causal": causal, "segments": segs, "rates": rates}

    def ring_fwd():
        with torch.no_grad():
            ring_dilated_attention(t["q"], t["k"], t["v"], segs, rates, is_causal=causal)

    def ring_fwd_bwd():
        out = ring_dilated_attention(t["q"], t["k"], t["v"], segs, rates, is_causal=causal)
        out.backward(t["dout"])

    try:
        if not bytes_only:
            res["ring_fwd_ms"] = timer(ring_fwd, 1, reps)
            res["ring_fwd_bwd_ms"] = timer(ring_fwd_bwd, 1, reps)
        reset_stats()
        ring_fwd()
        res["bytes_received_fwd"] = last_stats().bytes_received
    except torch.OutOfMemoryError as exc:
        res["ring_error"] = f"OOM: {str(exc).splitlines()[0]}"
    q.grad = k.grad = v.grad = None
    if device.type == "cuda":
        torch.cuda.empty_cache()
        res["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
    plan = plan_ring_dilated(N, world, H, H, segs, rates, is_causal=causal)
    res["bytes_plan_fwd"] = plan.bytes_received(rank, batch=1, head_dim=D, element_size=q.element_size())
    res["rows_minimum"] = minimum_rows(N, world, rank, H, H, segs, rates, causal)
    res["bytes_minimum_fwd"] = res["rows_minimum"] * 2 * D * q.element_size()
    res["bytes_allgather_fwd"] = (world - 1) * n * H * D * 2 * q.element_size()
    pairs = attended_pairs(N, H, segs, rates, causal) / world  # per GPU (balanced shards)
    fwd_flop = 4 * D * pairs
    if "ring_fwd_ms" in res:
        res["ring_fwd_tflops_per_gpu"] = fwd_flop / res["ring_fwd_ms"] / 1e9
        res["ring_fwd_bwd_tflops_per_gpu"] = 3.5 * fwd_flop / res["ring_fwd_bwd_ms"] / 1e9
    # anchor: attn_core on one GPU with the single-GPU problem of the same tokens per GPU
    if rank == 0 and not bytes_only:
        a_segs, a_rates = longnet_config(n)
        a_fwd_flop = 4 * D * attended_pairs(n, H, a_segs, a_rates, causal)

        def core_fwd():
            with torch.no_grad():
                attn_core.dilated_attention(t["q"], t["k"], t["v"], a_segs, a_rates, is_causal=causal)

        def core_fwd_bwd():
            out = attn_core.dilated_attention(t["q"], t["k"], t["v"], a_segs, a_rates, is_causal=causal)
            out.backward(t["dout"])

        try:
            res["anchor_backend"] = attn_core.explain(q, k, v, a_segs, a_rates, is_causal=causal).backend
            res["anchor_fwd_ms"] = timer(core_fwd, 1, reps)
            res["anchor_fwd_bwd_ms"] = timer(core_fwd_bwd, 1, reps)
            res["anchor_fwd_tflops"] = a_fwd_flop / res["anchor_fwd_ms"] / 1e9
            res["anchor_fwd_bwd_tflops"] = 3.5 * a_fwd_flop / res["anchor_fwd_bwd_ms"] / 1e9
        except torch.OutOfMemoryError as exc:
            res["anchor_error"] = f"OOM: {str(exc).splitlines()[0]}"
        q.grad = k.grad = v.grad = None
    del q, k, v
    t.clear()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    return res


def plan_only(args) -> list[dict]:
    from attn_ring.ring_dilated import plan_ring_dilated

    rows = []
    elem = torch.empty(0, dtype=DTYPES[args.dtype]).element_size()
    for W in args.worlds:
        for n in args.tokens_per_gpu:
            N = n * W
            segs, rates = longnet_config(N)
            for causal in (False, True):
                plan = plan_ring_dilated(N, W, args.heads, args.heads, segs, rates, is_causal=causal)
                worst = max(range(W), key=lambda b: plan.ranks[b].rows_received)
                mins = minimum_rows(N, W, worst, args.heads, args.heads, segs, rates, causal)
                got = plan.bytes_received(worst, batch=1, head_dim=args.head_dim, element_size=elem)
                rows.append(
                    {
                        "world": W,
                        "tokens_per_gpu": n,
                        "N": N,
                        "causal": causal,
                        "rank": worst,
                        "bytes_plan_fwd": got,
                        "bytes_minimum_fwd": mins * 2 * args.head_dim * elem,
                        "bytes_allgather_fwd": (W - 1) * n * args.heads * args.head_dim * 2 * elem,
                    }
                )
    return rows


def fmt_bytes(x: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(x) < 1024:
            return f"{x:.1f} {unit}"
        x /= 1024
    return f"{x:.1f} TiB"


def write_outputs(out: Path, payload: dict, table: str, plot_rows: list[dict], mode: str) -> None:
    """mode: "plan" (bytes per W from the plan), "bytes" (bytes measured in this run) or "time"."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "ring_dilated.json").write_text(json.dumps(payload, indent=2))
    (out / "ring_dilated.md").write_text(table + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    if mode == "bytes":  # measured vs minimum vs all-gather
        sel = [r for r in plot_rows if not r["causal"]]
        xs = [r["tokens_per_gpu"] for r in sel]
        ax.plot(xs, [r["bytes_received_fwd"] for r in sel], "o-", label="measured (worst rank)")
        ax.plot(xs, [r["bytes_minimum_fwd"] for r in sel], "+:", label="dilated-row minimum")
        ax.plot(xs, [r["bytes_allgather_fwd"] for r in sel], "x--", label="all-gather K/V")
        ax.set_yscale("log")
        ax.set_ylabel("bytes received per rank (forward)")
    elif mode == "plan":
        for W in sorted({r["world"] for r in plot_rows}):
            sel = [r for r in plot_rows if r["world"] == W and not r["causal"]]
            xs = [r["tokens_per_gpu"] for r in sel]
            ax.plot(xs, [r["bytes_plan_fwd"] for r in sel], "o-", label=f"ring dilated, W={W}")
            ax.plot(xs, [r["bytes_allgather_fwd"] for r in sel], "x--", label=f"all-gather K/V, W={W}")
        ax.set_yscale("log")
        ax.set_ylabel("bytes received per rank (forward)")
    else:
        for key, label in (("ring_fwd_bwd_tflops_per_gpu", "ring dilated fwd+bwd"), ("anchor_fwd_bwd_tflops", "attn_core 1 GPU fwd+bwd"),
                           ("ring_fwd_tflops_per_gpu", "ring dilated fwd"), ("anchor_fwd_tflops", "attn_core 1 GPU fwd")):  # fmt: skip
            sel = [r for r in plot_rows if key in r and not r["causal"]]
            ax.plot([r["tokens_per_gpu"] for r in sel], [r[key] for r in sel], "o-", label=label)
        ax.set_ylabel("effective TFLOP/s per GPU")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("tokens per GPU")
    ax.legend(fontsize=8)
    ax.set_title(payload["env"].get("device", ""), fontsize=9)
    fig.savefig(out / "ring_dilated.png", dpi=110, bbox_inches="tight")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens-per-gpu", type=int, nargs="+", default=[262144, 1048576])
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--causal", choices=["no", "yes", "both"], default="both")
    ap.add_argument("--plan-only", action="store_true", help="bytes per rank from the plan, no process group")
    ap.add_argument("--worlds", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--skip-check", action="store_true")
    ap.add_argument("--bytes-only", action="store_true", help="one forward per point: bytes moved, no timing")
    ap.add_argument("--out", type=Path, default=Path("bench-output/ring_dilated"))
    args = ap.parse_args()
    env = {"python": platform.python_version(), "torch": torch.__version__}
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None

    if args.plan_only:
        rows = plan_only(args)
        lines = [
            f"Plan only (no device): {args.dtype}, B=1, H=Hkv={args.heads}, D={args.head_dim}, segments "
            "[2048, 8192, 65536, 262144, N], rates [1, 2, 8, 32, N/4096]; worst rank of each W",
            "",
            "| W | tokens/GPU | N | causal | bytes received (plan) | dilated-row minimum | plan / min | all-gather K/V |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in rows:
            ratio = r["bytes_plan_fwd"] / r["bytes_minimum_fwd"] if r["bytes_minimum_fwd"] else float("nan")
            lines.append(
                f"| {r['world']} | {r['tokens_per_gpu']} | {r['N']} | {r['causal']} | {fmt_bytes(r['bytes_plan_fwd'])} | "
                f"{fmt_bytes(r['bytes_minimum_fwd'])} | {ratio:.3f} | {fmt_bytes(r['bytes_allgather_fwd'])} |"
            )
        table = "\n".join(lines)
        print(table)
        env["device"] = "plan only (no device)"
        write_outputs(
            args.out, {"env": env, "args": vars(args) | {"out": str(args.out)}, "rows": rows}, table, rows, True
        )
        return 0

    rank, world, device = init_group()
    dtype = DTYPES[args.dtype]
    env |= {"world": world, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "backend": str(dist.get_backend())}  # fmt: skip
    if device.type == "cpu" and dtype != torch.float32:
        dtype = torch.float32  # CPU smoke runs
    payload: dict = {"env": env, "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}}
    if not args.skip_check:
        payload["check"] = check_correctness(rank, world, device, dtype, args.heads if device.type == "cuda" else 2,
                                             args.head_dim if device.type == "cuda" else 16)  # fmt: skip
        if rank == 0:
            print("correctness on the device vs float64 reference: ok", flush=True)
    rows = []
    causal_list = {"no": [False], "yes": [True], "both": [False, True]}[args.causal]
    points = [(n, c) for n in args.tokens_per_gpu for c in causal_list]
    try:
        from tqdm import tqdm

        it = tqdm(points, disable=rank != 0, desc="bench")
    except ImportError:
        it = points
    for n, causal in it:
        res = bench_point(rank, world, device, dtype, n, args.heads, args.head_dim, causal, args.reps, args.bytes_only)
        every: list = [None] * world
        dist.all_gather_object(every, res)  # bytes of every rank; the table shows the worst rank
        for key in ("bytes_received_fwd", "bytes_plan_fwd", "bytes_minimum_fwd"):
            res[f"{key}_per_rank"] = [r.get(key) for r in every]
        worst = max(range(world), key=lambda b: every[b].get("bytes_minimum_fwd", 0))
        for key in ("bytes_received_fwd", "bytes_plan_fwd", "bytes_minimum_fwd"):
            res[key] = every[worst].get(key, float("nan"))
        res["worst_rank"] = worst
        rows.append(res)
    payload["rows"] = rows
    if rank == 0:
        lines = [
            f"W={world}, {env['device']}, torch {env['torch']}, triton {env['triton']}, {dtype}, H={args.heads}, "
            f"D={args.head_dim}, segments [2048, 8192, 65536, 262144, N], rates [1, 2, 8, 32, N/4096]",
            "",
            "| tokens/GPU | causal | ring fwd ms (TF/s/GPU) | ring fwd+bwd ms (TF/s/GPU) | anchor 1-GPU fwd ms (TF/s) | "
            "anchor fwd+bwd ms (TF/s) | fwd+bwd ring/anchor | bytes recv fwd (measured, worst rank) | minimum | all-gather |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        if args.bytes_only:
            lines[2:] = [
                "| tokens/GPU | N | causal | bytes received fwd (measured, worst rank) | plan | dilated-row minimum | "
                "measured / min | all-gather K/V |",
                "|---|---|---|---|---|---|---|---|",
            ]
        for r in rows:

            def cell(ms: str, tf: str, r=r) -> str:
                return f"{r[ms]:.1f} ({r[tf]:.0f})" if ms in r else r.get("ring_error", r.get("anchor_error", "-"))

            if args.bytes_only:
                got, low = r["bytes_received_fwd"], r["bytes_minimum_fwd"]
                lines.append(
                    f"| {r['tokens_per_gpu']} | {r['N']} | {r['causal']} | {fmt_bytes(got)} | {fmt_bytes(r['bytes_plan_fwd'])} "
                    f"| {fmt_bytes(low)} | {got / low if low else float('nan'):.3f} | {fmt_bytes(r['bytes_allgather_fwd'])} |"
                )
                continue
            ratio = (
                f"{r['ring_fwd_bwd_tflops_per_gpu'] / r['anchor_fwd_bwd_tflops']:.2f}"
                if "ring_fwd_bwd_tflops_per_gpu" in r and "anchor_fwd_bwd_tflops" in r
                else "-"
            )
            lines.append(
                f"| {r['tokens_per_gpu']} | {r['causal']} | {cell('ring_fwd_ms', 'ring_fwd_tflops_per_gpu')} | "
                f"{cell('ring_fwd_bwd_ms', 'ring_fwd_bwd_tflops_per_gpu')} | {cell('anchor_fwd_ms', 'anchor_fwd_tflops')} | "
                f"{cell('anchor_fwd_bwd_ms', 'anchor_fwd_bwd_tflops')} | {ratio} | "
                f"{fmt_bytes(r.get('bytes_received_fwd', float('nan')))} | {fmt_bytes(r['bytes_minimum_fwd'])} | "
                f"{fmt_bytes(r['bytes_allgather_fwd'])} |"
            )
        table = "\n".join(lines)
        print(table, flush=True)
        write_outputs(args.out, payload, table, rows, "bytes" if args.bytes_only else "time")
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
