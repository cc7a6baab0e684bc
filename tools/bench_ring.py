"""Ring attention benchmark (torchrun): per-GPU TFLOP/s vs single-GPU SDPA cuDNN, weak scaling, overlap.

    torchrun --standalone --nproc-per-node=4 tools/bench_ring.py --out bench-output/ring
    python tools/bench_ring.py --quick            # one process (a ring of one), small sizes
    python tools/bench_ring.py --simulate 2,4,8,16,64 --out bench-output/scaleout   # one GPU: predictions
    python tools/bench_ring.py --simulate 2,4 --smoke --device cpu                  # tiny CPU smoke run
    torchrun --nproc-per-node=2 tools/bench_ring.py --device cpu --quick   # gloo smoke test

In one process group, side by side (bf16 on CUDA, B=1, H=16, D=128 by default):
1. correctness: ring_attention fwd+bwd on fresh random inputs vs the float64 reference on the
   gathered sequence (project rule: error <= 2x plain PyTorch bf16), zigzag causal and non-causal;
2. anchor: single-GPU SDPA with the cuDNN backend, fwd+bwd, measured on rank 0 (N capped by
   --anchor-max-n: its TFLOP/s is flat at these sizes);
3. ring: fwd+bwd TFLOP/s per GPU at each --sizes total N, causal zigzag and non-causal;
4. torch native context_parallel beside it (causal with load balancing; non-causal with load
   balancing is refused by torch: the refusal is recorded);
5. weak scaling at --weak tokens per GPU over subgroups of 1, 2, 4, ... ranks;
6. overlap: the same ring with every transfer waited for before its step computes (overlap=False).
Effective FLOPs: 4*N*N*D*H*B over attended pairs (causal: N(N+1)/2), fwd+bwd = 3.5x fwd. Time:
CUDA events (or perf_counter on CPU), median of --reps after a warm-up, max over ranks.
Writes ring_bench.json, ring_bench.md and ring_bench.png to --out.

--simulate W1,W2,... (one process, no process group): predicted per-GPU efficiency of ring, Ulysses
and hybrid (all-to-all inside a node of --gpus-per-node, ring across nodes), dense and dilated,
causal and not, at --tokens-per-gpu tokens per GPU. Compute is measured on this device at each
W's shard shapes through the real per-step code (ring: attn_core.blocks kernels and LSE merges per
ring step, K/V copied into double buffers on a side stream; Ulysses: the real packing, inner
attention and unpacking with the all-to-alls replaced by side-stream copies; ring dilated: its
even share of the whole dilated attention, its exchange bytes from plan_ring_dilated). Transfer
times are bytes / link speed (--nvlink-gbps inside a node, --ib-gbps per GPU across nodes);
ring steps overlap transfer and compute, all-to-alls and dilated exchanges do not. Predicted
efficiency = compute / (compute + exposed transfer) per GPU (the kernels' own efficiency at the
shard shapes is in the compute times). The results are predictions, not measurements of a
multi-node run. Writes scaleout_simulation.json/.png.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist


def fwd_flops(n: int, causal: bool, b: int, h: int, d: int) -> float:
    pairs = n * (n + 1) / 2 if causal else float(n) * n
    return 4.0 * pairs * d * h * b


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def time_ms(fn: Callable[[], Any], dev: torch.device, reps: int, group: Any = None) -> float:
    """Median wall time of fn over reps after one warm-up, max over the ranks of ``group``."""
    fn()
    _sync(dev)
    times = []
    for _ in range(reps):
        if group is not None or dist.get_world_size() > 1:
            dist.barrier(group=group)
        _sync(dev)
        t0 = time.perf_counter()
        fn()
        _sync(dev)
        times.append((time.perf_counter() - t0) * 1e3)
    t = torch.tensor([statistics.median(times)], dtype=torch.float64, device=dev if dev.type == "cuda" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return float(t.item())


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


def check_correctness(rank: int, world: int, dev: torch.device, dtype: torch.dtype) -> list[dict[str, Any]]:
    from attn_core import reference
    from attn_core.testing import assert_close_to_reference, max_abs_error
    from attn_ring import ring_attention, shard_sequence

    rows = []
    for causal in (True, False):
        n_total = 1024 * world
        full = [t.double() for t in make_qkv(1, n_total, 4, 2, 128, torch.float32, dev, seed=11 + causal)]
        results = {}
        for label, dt in (("ref", torch.float64), ("base", dtype)):
            leaves = [t.to(dt).requires_grad_(True) for t in full[:3]]
            out = reference.dense_attention(*leaves, is_causal=causal, dtype=dt)[0]
            results[label] = [out.detach(), *torch.autograd.grad(out, leaves, full[3].to(dt))]
        mine = [
            shard_sequence(t, world, rank, layout="zigzag").to(dtype).contiguous().requires_grad_(True)
            for t in full[:3]
        ]
        out = ring_attention(*mine, is_causal=causal, layout="zigzag")
        got = [
            out.detach(),
            *torch.autograd.grad(out, mine, shard_sequence(full[3], world, rank, layout="zigzag").to(dtype)),
        ]
        ok, errs = True, {}
        for i, name in enumerate(("out", "dq", "dk", "dv")):
            ref = shard_sequence(results["ref"][i], world, rank, layout="zigzag")
            base = shard_sequence(results["base"][i], world, rank, layout="zigzag")
            errs[name] = max_abs_error(got[i], ref)
            try:
                assert_close_to_reference(name, got[i], ref, base)
            except AssertionError as exc:
                ok = False
                errs[name + "_msg"] = str(exc)
        flag = torch.tensor([0 if ok else 1], device=dev if dev.type == "cuda" else "cpu")
        dist.all_reduce(flag)
        rows.append(
            {
                "case": f"zigzag {'causal' if causal else 'non-causal'} N={n_total}",
                "ok": flag.item() == 0,
                "errors_rank0": errs,
            }
        )
    return rows


def sdpa_cudnn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    if kt.shape[1] != qt.shape[1]:
        kt = kt.repeat_interleave(qt.shape[1] // kt.shape[1], dim=1)
        vt = vt.repeat_interleave(qt.shape[1] // vt.shape[1], dim=1)
    backend = SDPBackend.CUDNN_ATTENTION if q.is_cuda else SDPBackend.MATH
    with sdpa_kernel([backend]):
        return torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=causal).transpose(1, 2)


def native_context_parallel(
    n_total: int, causal: bool, args: argparse.Namespace, dev: torch.device, world: int, reps: int
) -> dict[str, Any]:
    """torch's context_parallel around SDPA (load balancing on, its default); records a refusal as such."""
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor.experimental import context_parallel
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError as exc:
        return {"status": f"unavailable: {exc}"}
    if dev.type != "cuda":
        return {"status": "not available on CPU"}
    try:
        mesh = init_device_mesh("cuda", (world,))
        q, k, v, dout = (
            t.transpose(1, 2).contiguous()
            for t in make_qkv(1, n_total, args.heads, args.heads, args.head_dim, torch.bfloat16, dev, seed=5)
        )

        def run() -> None:
            # context_parallel shards the full buffers in place and restores them on exit; the
            # autograd leaves are made from the shards inside (a leaf that requires grad cannot be resized)
            with (
                context_parallel(mesh, buffers=[q, k, v, dout], buffer_seq_dims=[2, 2, 2, 2]),
                sdpa_kernel([SDPBackend.CUDNN_ATTENTION]),
            ):
                leaves = [t.detach().requires_grad_(True) for t in (q, k, v)]
                out = torch.nn.functional.scaled_dot_product_attention(
                    leaves[0], leaves[1], leaves[2], is_causal=causal
                )
                out.backward(dout)

        ms = time_ms(run, dev, reps)
        tf = 3.5 * fwd_flops(n_total, causal, 1, args.heads, args.head_dim) / world / (ms * 1e-3) / 1e12
        return {"status": "ok", "ms": ms, "tflops_per_gpu": tf}
    except Exception as exc:  # recorded: torch refuses non-causal with load balancing
        return {"status": f"refused/failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="262144,1048576", help="total sequence lengths (comma-separated)")
    ap.add_argument("--weak", type=int, default=65536, help="tokens per GPU for weak scaling")
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--anchor-max-n", type=int, default=262144)
    ap.add_argument("--no-native", action="store_true", help="skip torch's context_parallel")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="small sizes for a smoke test")
    ap.add_argument("--out", type=Path, default=Path("bench-output/ring"))
    ap.add_argument("--simulate", default="", help="predict scale-out at these GPU counts (e.g. 2,4,8,16,64)")
    ap.add_argument("--tokens-per-gpu", type=int, default=8192, help="--simulate: tokens each GPU holds")
    ap.add_argument("--kv-heads", type=int, default=0, help="--simulate: kv heads (0 = --heads)")
    ap.add_argument("--segments", default="2048,8192,32768", help="--simulate: dilated segment lengths")
    ap.add_argument("--rates", default="1,2,4", help="--simulate: dilated dilation rates")
    ap.add_argument("--gpus-per-node", type=int, default=8, help="--simulate: GPUs joined by NVLink")
    ap.add_argument("--nvlink-gbps", type=float, default=450.0, help="--simulate: NVLink GB/s per direction")
    ap.add_argument("--ib-gbps", type=float, default=50.0, help="--simulate: InfiniBand GB/s per GPU")
    ap.add_argument("--smoke", action="store_true", help="--simulate: tiny shapes (CPU smoke test)")
    args = ap.parse_args()
    if args.simulate:
        if args.smoke:
            args.tokens_per_gpu, args.head_dim, args.reps = 32, 16, 1
            args.segments, args.rates = "16,64", "1,2"
        return simulate(args)
    if args.quick:
        args.sizes, args.weak, args.anchor_max_n, args.reps = (
            ("4096" if args.device == "cuda" else "256"),
            (2048 if args.device == "cuda" else 128),
            8192,
            2,
        )
        if args.device == "cpu":
            args.heads, args.head_dim = 2, 16

    if "RANK" not in os.environ:  # a ring of one, without torchrun
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="29517")
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if args.device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
        dev = torch.device("cuda", torch.cuda.current_device())
    else:
        dev = torch.device("cpu")
    dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", timeout=timedelta(seconds=300))
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32

    from attn_ring import ring_attention, shard_sequence  # noqa: F401  (imports attn_core's fast block path)

    def log(msg: str) -> None:
        if rank == 0:
            print(msg, flush=True)

    H, D = args.heads, args.head_dim
    res: dict[str, Any] = {
        "env": {
            "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu",
            "device": dev.type,
            "world_size": world,
            "torch": torch.__version__,
            "triton": _triton_version(),
            "cuda": torch.version.cuda,
            "dtype": str(dtype),
            "B": 1,
            "H": H,
            "D": D,
        }
    }
    log(f"ring bench: {res['env']}")
    res["correctness"] = check_correctness(rank, world, dev, dtype)
    log(f"correctness: {[(r['case'], r['ok']) for r in res['correctness']]}")

    # anchor: single-GPU SDPA cuDNN fwd+bwd (rank 0 only; the others wait)
    sizes = [int(s) for s in args.sizes.split(",") if s]
    anchor: dict[str, Any] = {}
    for causal in (True, False):
        n_a = min(max(sizes), args.anchor_max_n)
        ms = float("nan")
        if rank == 0:
            q, k, v, dout = make_qkv(1, n_a, H, H, D, dtype, dev, seed=3)
            fn = fwd_bwd(lambda a, b, c, causal=causal: sdpa_cudnn(a, b, c, causal), q, k, v, dout)
            fn()
            _sync(dev)
            ts = []
            for _ in range(args.reps):
                t0 = time.perf_counter()
                fn()
                _sync(dev)
                ts.append((time.perf_counter() - t0) * 1e3)
            ms = statistics.median(ts)
            del q, k, v, dout, fn
        dist.barrier()
        anchor["causal" if causal else "non-causal"] = {
            "N": n_a,
            "ms": ms,
            "tflops": 3.5 * fwd_flops(n_a, causal, 1, H, D) / (ms * 1e-3) / 1e12 if rank == 0 else None,
        }
    res["anchor_sdpa_cudnn_1gpu"] = anchor
    log(f"anchor: {anchor}")

    # ring at each total N, causal zigzag and non-causal; and the serialized schedule
    ring_rows = []
    for n_total in sizes:
        for causal, layout in ((True, "zigzag"), (False, "zigzag")):
            n = n_total // world
            q, k, v, dout = make_qkv(1, n, H, H, D, dtype, dev, seed=rank + 17)
            row: dict[str, Any] = {"N": n_total, "causal": causal, "layout": layout}
            for overlap in (True, False):
                fn = fwd_bwd(
                    lambda a, b, c, causal=causal, overlap=overlap, layout=layout: ring_attention(
                        a, b, c, is_causal=causal, layout=layout, overlap=overlap
                    ),
                    q,
                    k,
                    v,
                    dout,
                )
                ms = time_ms(fn, dev, args.reps)
                key = "overlap" if overlap else "serialized"
                row[f"{key}_ms"] = ms
                row[f"{key}_tflops_per_gpu"] = 3.5 * fwd_flops(n_total, causal, 1, H, D) / world / (ms * 1e-3) / 1e12
                if world == 1:
                    break  # a ring of one has no transfers: nothing to serialize
            a = anchor["causal" if causal else "non-causal"]["tflops"]
            row["vs_anchor"] = row["overlap_tflops_per_gpu"] / a if a else None
            if not args.no_native:
                row["native_context_parallel"] = native_context_parallel(n_total, causal, args, dev, world, args.reps)
            ring_rows.append(row)
            log(f"ring: {row}")
            del q, k, v, dout
    res["ring"] = ring_rows

    # weak scaling over subgroups of 1, 2, 4, ... ranks at args.weak tokens per GPU (zigzag causal)
    weak = []
    w = 1
    while w <= world:
        members = list(range(w))
        group = dist.new_group(members)
        ms = float("nan")
        if rank in members:
            q, k, v, dout = make_qkv(1, args.weak, H, H, D, dtype, dev, seed=rank + 29)
            fn = fwd_bwd(
                lambda a, b, c, group=group: ring_attention(a, b, c, group=group, is_causal=True, layout="zigzag"),
                q,
                k,
                v,
                dout,
            )
            ms = time_ms(fn, dev, args.reps, group=group)
            del q, k, v, dout
        dist.barrier()
        t = torch.tensor([ms], dtype=torch.float64, device=dev if dev.type == "cuda" else "cpu")
        dist.broadcast(t, src=0)
        ms = float(t.item())
        tf = 3.5 * fwd_flops(args.weak * w, True, 1, H, D) / w / (ms * 1e-3) / 1e12
        weak.append({"gpus": w, "N": args.weak * w, "ms": ms, "tflops_per_gpu": tf})
        w *= 2
    for r in weak:
        r["efficiency"] = r["tflops_per_gpu"] / weak[0]["tflops_per_gpu"]
    res["weak_scaling"] = weak
    log(f"weak: {weak}")

    if rank == 0:
        _write(res, args.out)
    dist.destroy_process_group()
    return 0 if all(r["ok"] for r in res["correctness"]) else 1


def _triton_version() -> str | None:
    try:
        import triton

        return str(triton.__version__)
    except ImportError:
        return None


def _write(res: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "ring_bench.json").write_text(json.dumps(res, indent=2))
    env = res["env"]
    lines = [
        f"# Ring attention, {env['world_size']} x {env['gpu']}, torch {env['torch']}, triton {env['triton']}, {env['dtype']}, B=1 H={env['H']} D={env['D']}",
        "",
        "Correctness (fwd+bwd vs float64 reference, 2x plain-bf16 rule): "
        + ", ".join(f"{r['case']}: {'ok' if r['ok'] else 'FAIL'}" for r in res["correctness"]),
        "",
        "| N | causal | layout | ring ms | ring TFLOP/s/GPU | serialized ms | vs 1-device SDPA | torch context_parallel |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in res["ring"]:
        nat = r.get("native_context_parallel", {})
        nat_s = f"{nat['tflops_per_gpu']:.3g} TFLOP/s/GPU" if nat.get("status") == "ok" else nat.get("status", "-")
        ser = f"{r['serialized_ms']:.1f}" if "serialized_ms" in r else "- (W=1)"
        vs = f"{r['vs_anchor']:.2f}" if r.get("vs_anchor") else "-"
        lines.append(
            f"| {r['N']} | {r['causal']} | {r['layout']} | {r['overlap_ms']:.1f} | {r['overlap_tflops_per_gpu']:.3g} | {ser} | {vs} | {nat_s} |"
        )
    lines += ["", f"Anchor (one device, SDPA {'cuDNN' if env['device'] == 'cuda' else 'math'} fwd+bwd):"]
    for key, a in res["anchor_sdpa_cudnn_1gpu"].items():
        lines.append(
            f"- {key}: N={a['N']}, {a['ms']:.1f} ms, {a['tflops']:.3g} TFLOP/s" if a["tflops"] else f"- {key}: -"
        )
    lines += ["", "| weak scaling GPUs | N | ms | TFLOP/s/GPU | efficiency |", "|---|---|---|---|---|"]
    for r in res["weak_scaling"]:
        lines.append(f"| {r['gpus']} | {r['N']} | {r['ms']:.1f} | {r['tflops_per_gpu']:.3g} | {r['efficiency']:.2f} |")
    table = "\n".join(lines)
    (out / "ring_bench.md").write_text(table + "\n")
    print(table, flush=True)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
        for causal in (True, False):
            rows = [r for r in res["ring"] if r["causal"] == causal]
            a1.plot(
                [r["N"] for r in rows],
                [r["overlap_tflops_per_gpu"] for r in rows],
                "o-",
                label=f"ring {'causal zigzag' if causal else 'non-causal'}",
            )
            anc = res["anchor_sdpa_cudnn_1gpu"]["causal" if causal else "non-causal"]["tflops"]
            if anc:
                a1.axhline(
                    anc,
                    ls="--",
                    color="C0" if causal else "C1",
                    label=f"1-GPU cuDNN {'causal' if causal else 'non-causal'}",
                )
        a1.set_xscale("log", base=2)
        a1.set_xlabel("total N")
        a1.set_ylabel("fwd+bwd TFLOP/s per GPU")
        a1.legend(fontsize=8)
        a1.set_title(f"{env['world_size']} x {env['gpu']}")
        ws = res["weak_scaling"]
        a2.bar([str(r["gpus"]) for r in ws], [r["efficiency"] for r in ws])
        a2.axhline(0.95, ls="--", color="k")
        a2.set_xlabel("GPUs")
        a2.set_ylabel("per-GPU efficiency (weak, causal zigzag)")
        fig.tight_layout()
        fig.savefig(out / "ring_bench.png", dpi=110)
    except ImportError:
        pass


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
    _sync(dev)
    ts = []
    for _ in range(reps):
        _sync(dev)
        t0 = time.perf_counter()
        fn()
        _sync(dev)
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


def simulate(args: argparse.Namespace) -> int:
    """--simulate: predicted per-GPU efficiency of ring, Ulysses and hybrid at W GPUs, from one device."""
    from attn_core.config import DilatedConfig
    from attn_ring.ring_dilated import plan_ring_dilated
    from attn_ring.ulysses import kv_heads_on_wire

    dev = torch.device(args.device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    elem = torch.empty(0, dtype=dtype).element_size()
    worlds = [int(w) for w in args.simulate.split(",") if w]
    H, Hkv, D, n = args.heads, args.kv_heads or args.heads, args.head_dim, args.tokens_per_gpu
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
        N = n * W
        row: dict[str, Any] = {"W": W, "scheme": scheme, "attention": attn, "causal": causal, "a2a": A, "ring": R}
        if H % A:
            rows.append({**row, "status": f"not possible: H={H} heads do not split over {A} all-to-all ranks"})
            continue
        kvw = kv_heads_on_wire(H, Hkv, A) if A > 1 else Hkv
        # all-to-alls: q, k, v in and the output back (forward), their gradients (backward); per peer block
        a2a = 0.0
        if A > 1:
            per_peer_in, per_peer_out = n * (H + 2 * kvw) * D * elem / A, n * H * D * elem / A
            a2a = 2 * (_a2a_ms(per_peer_in, A, args) + _a2a_ms(per_peer_out, A, args))
        ring_gbps = args.nvlink_gbps if args.gpus_per_node >= W and scheme == "ring" else args.ib_gbps
        if attn == "dense":
            if R > 1:
                fwd, bwd = _ring_step_ms(R, n * A, H // A, kvw // A if A > 1 else Hkv, D, causal, dtype, dev, args.reps)
                kv_bytes = 2 * n * A * (kvw // A if A > 1 else Hkv) * D * elem
                step_x = _link_ms(kv_bytes, ring_gbps)
                step_xb = step_x + _link_ms(kv_bytes * 4 / elem, ring_gbps)  # + fp32 dK/dV one hop behind
                steps_f, steps_b = fwd / R, bwd / R
                ring_ms = (R - 1) * max(steps_f, step_x) + steps_f + R * max(steps_b, step_xb)
                compute = fwd + bwd
                transfer_step = (step_x, step_xb)
            else:
                compute, ring_ms, transfer_step = 0.0, 0.0, (0.0, 0.0)
            if A > 1:
                u = _ulysses_ms(A, n * R, H, Hkv, D, causal, dtype, dev, args.reps) if R == 1 else None
                if u is not None:
                    compute, ring_ms = u, u
        else:
            if A > 1 and R == 1:
                compute = _ulysses_ms(A, n, H, Hkv, D, causal, dtype, dev, args.reps, config)
                ring_ms, transfer_step = compute, (0.0, 0.0)
            else:
                compute = _dilated_share_ms(N, W, H, Hkv, D, causal, dtype, dev, args.reps, config)
                plan = plan_ring_dilated(
                    N,
                    R,
                    H // A,
                    (kvw // A) if A > 1 else Hkv,
                    config.segment_lengths,
                    config.dilation_rates,
                    is_causal=causal,
                )
                worst = max(range(R), key=lambda r: plan.ranks[r].rows_received)
                size = {"batch": 1, "head_dim": D}
                xf = _link_ms(plan.bytes_received(worst, **size, element_size=elem), ring_gbps)
                xb = _link_ms(plan.bytes_sent(worst, **size, element_size=4), ring_gbps)
                ring_ms, transfer_step = compute + xf + xb, (xf, xb)  # exchanges wait before compute
        total = ring_ms + a2a
        rows.append(
            {
                **row,
                "status": "ok",
                "N": N,
                "compute_ms": compute,
                "transfer_ms_per_step": transfer_step,
                "a2a_ms": a2a,
                "predicted_ms": total,
                "efficiency": compute / total if total else None,
            }
        )
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
            "tokens_per_gpu": n,
            "H": H,
            "Hkv": Hkv,
            "D": D,
            "segments": list(config.segment_lengths),
            "rates": list(config.dilation_rates),
            "nvlink_GBps": args.nvlink_gbps,
            "ib_GBps": args.ib_gbps,
            "gpus_per_node": args.gpus_per_node,
        },
        "rows": rows,
    }
    _write_simulation(res, args.out)
    return 0


def _write_simulation(res: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "scaleout_simulation.json").write_text(json.dumps(res, indent=2))
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
    table = "\n".join(lines)
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


if __name__ == "__main__":
    raise SystemExit(main())
