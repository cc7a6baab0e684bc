"""Benchmark: attn_core dilated attention ("sdpa" backend) vs the common algorithm vs dense cuDNN (GPU only).

LongNet config segments [2048, 4096, 8192, 16384], rates [1, 2, 4, 8], bf16, B=1. The sweep is the product
of --heads (H/Hkv pairs; Hkv < H is GQA: k, v carry Hkv heads), --d, --causal, --modes and --n. Per point,
all in this process on this GPU: ours forward / forward+backward (median of --reps after a warm-up, CUDA
events); the common open-source algorithm (tools/dilated_baselines.py, same causal and GQA settings; one
head layout, so once per (H, Hkv, D, causal, N)); dense SDPA pinned to cuDNN, causal where causal, its K/V
repeated to H heads outside the timing under GQA (MHA with the same FLOPs).
Effective TFLOP/s = 4 * D * attended (query, key) pairs summed over query heads (fwd; fwd+bwd counts 3.5x);
dilated pairs per group as computed (causal: selected key <= selected query in a segment), dense N^2 per
head, causal N(N+1)/2. "eff vs cuDNN" = our rate / dense cuDNN's at the same H, D, causal setting and N;
past --dense-max-n (or a dense OOM) the rate at the largest N dense ran at is used, marked "*" (dense
attention's rate is flat in N at these sizes).
Host time (at --host-n, ours and the common algorithm), per call: host = CPU time issuing HOST_CALLS calls
with no sync in the loop; wall = that loop to its closing sync; device = GPU time of one call queued behind
a matmul hold, so it runs back to back (CUDA events). host > device: the call is host-bound.
Peak extra memory = torch.cuda.max_memory_allocated minus inputs, outputs and gradients, also as % of q, k,
v, o and their gradients. First a bf16/fp16 correctness check against the float64 reference (2x rule of
attn_core.testing; odd N, GQA, padding); --quick also runs the common algorithm's CPU self-check. Last, one
line per target of "Causal LongNet at the speed of dense attention" (TARGET_SHAPES, TARGET_NS, ...).

    source tools/srcpath.sh && python tools/bench_dilated.py [--quick] [--out docs/benchmarks]
    python tools/bench_dilated.py --name dilated_causal_h100  # the defaults are the targets' full sweep
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_env import cuda_median_ms
from dilated_baselines import LABEL as COMMON_LABEL
from dilated_baselines import common_attended_pairs, common_dilated_attention, self_check
from dilated_targets import (
    CAUSAL_CHOICES,
    CHECK_H,
    GIB,
    HOST_CALLS,
    KI,
    MODES,
    RATES,
    SEGMENTS,
    add_efficiency,
    dense_pairs,
    evaluate_targets,
    fmt_n,
    io_bytes,
    our_pairs,
    parse_heads,
    parse_n,
    point_label,
)


def peak_extra(fn: Callable[[], Any], known_bytes: int) -> float:
    """GiB allocated at peak during fn() beyond what was allocated before and the ``known_bytes`` it returns."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    res = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    del res
    return (peak - before - known_bytes) / GIB


class DeviceHold:
    """Back-to-back 8192 x 8192 bf16 matmuls that keep the GPU busy for a chosen time, so that work
    queued behind them runs back to back whatever the host's pace."""

    def __init__(self) -> None:
        self.a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
        self.c = torch.empty_like(self.a)
        self.ms_each = cuda_median_ms(lambda: torch.mm(self.a, self.a, out=self.c), 3)

    def hold(self, ms: float) -> torch.cuda.Event:
        """Queue about ``ms`` of matmuls; returns an event recorded after them."""
        for _ in range(max(1, math.ceil(ms / self.ms_each))):
            torch.mm(self.a, self.a, out=self.c)
        done = torch.cuda.Event()
        done.record()
        return done


def host_timing(fn: Callable[[], Any], hold: DeviceHold, calls: int = HOST_CALLS) -> dict[str, Any]:
    """Per call ms: host (issuing ``calls`` calls, no sync inside the loop), wall (that loop to its closing sync),
    device (one call behind a hold, median of ``calls``; device_clean: every hold outlasted its call's issue)."""
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    t2 = time.perf_counter()
    host_ms, wall_ms = (t1 - t0) * 1e3 / calls, (t2 - t0) * 1e3 / calls
    device, clean = [], True
    for _ in range(calls):
        done = hold.hold(2 * host_ms + 2.0)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        clean &= not done.query()  # the GPU was still in the hold when the whole call had been issued
        end.synchronize()
        device.append(start.elapsed_time(end))
    device_ms = statistics.median(device)
    return dict(
        host_ms=host_ms, wall_ms=wall_ms, device_ms=device_ms, device_clean=clean,
        bound="host" if host_ms > device_ms else "device",
    )  # fmt: skip


def graph_replay_ms(fn: Callable[[], Any], reps: int = HOST_CALLS) -> dict[str, Any]:
    """fn() captured once in a CUDA graph (after warm-up on a side stream, as torch.cuda.graphs asks),
    then the median ms of a replay: a graphed step's cost with no host issue time. {"error": ...} when
    the capture fails (an op that syncs or is not capture-safe)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    try:
        with torch.cuda.stream(side):
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        ms = cuda_median_ms(graph.replay, reps)
    except RuntimeError as exc:  # capture refused: report why instead of a figure
        torch.cuda.synchronize()
        return {"error": str(exc).splitlines()[0][:160]}
    del graph
    return {"replay_ms": ms}


def correctness(dev: str) -> list[dict[str, Any]]:
    from attn_core import reference
    from attn_core.api import dilated_attention, explain
    from attn_core.testing import assert_close_to_reference, max_abs_error

    seg, rates, n = [256, 512, 1024, 2048], [1, 2, 4, 8], 3000  # odd N: short last segments everywhere
    rows = []
    cases = []
    for d in (64, 128):
        for mode in MODES:
            for causal in (False, True):
                cases.append((torch.bfloat16, d, 4 if causal else 16, mode, causal, False))  # GQA 4:1 when causal
    cases += [(torch.float16, 128, 4, "all", True, True), (torch.bfloat16, 64, 8, "split", False, True)]
    for dtype, d, hkv, mode, causal, pad in cases:
        g = torch.Generator(device=dev).manual_seed(len(rows) + 1)
        q = torch.randn(1, n, CHECK_H, d, device=dev, generator=g).to(dtype).requires_grad_()
        k = torch.randn(1, n, hkv, d, device=dev, generator=g).to(dtype).requires_grad_()
        v = torch.randn(1, n, hkv, d, device=dev, generator=g).to(dtype).requires_grad_()
        mask = None
        if pad:
            mask = torch.rand(1, n, device=dev, generator=g) < 0.25
            mask[:, :300] = True
        go = torch.randn(1, n, CHECK_H, d, device=dev, generator=g)
        choice = explain(q, k, v, seg, rates, is_causal=causal, key_padding_mask=mask, head_mode=mode)
        out = dilated_attention(q, k, v, seg, rates, is_causal=causal, key_padding_mask=mask, head_mode=mode)
        grads = torch.autograd.grad(out, (q, k, v), go.to(dtype))
        res: dict[str, Any] = dict(
            dtype=str(dtype).replace("torch.", ""), D=d, Hkv=hkv, mode=mode, causal=causal, padding=pad,
            backend=choice.backend, ok=True,
        )  # fmt: skip
        refs = {}
        for cdt in (torch.float64, dtype):
            leaves = [t.detach().to(cdt).requires_grad_() for t in (q, k, v)]
            o, _ = reference.dilated_attention(
                *leaves, seg, rates, is_causal=causal, key_padding_mask=mask, head_mode=mode, dtype=cdt
            )
            refs[cdt] = (o, *torch.autograd.grad(o, leaves, go.to(o.dtype)))
            del o, leaves
        for i, name in enumerate(("out", "dq", "dk", "dv")):
            mine = (out, *grads)[i]
            res[f"{name}_err"] = max_abs_error(mine, refs[torch.float64][i])
            res[f"{name}_plain_err"] = max_abs_error(refs[dtype][i], refs[torch.float64][i])
            try:
                assert_close_to_reference(name, mine, refs[torch.float64][i], refs[dtype][i])
            except AssertionError as exc:
                res["ok"] = False
                res.setdefault("fail", []).append(str(exc))
        rows.append(res)
        del refs, out, grads
        torch.cuda.empty_cache()
    return rows


def kernel_category(name: str) -> str:
    """Which share of the profile a CUDA kernel's time goes to, by its name."""
    name = name.lower()
    if "_merge" in name:
        return "merge"
    if any(s in name for s in ("cudnn", "fmha", "flash", "sm90", "sm80", "attn", "sdpa")):
        return "attention"
    if any(s in name for s in ("copy", "elementwise", "fill", "add", "vectorized", "where")):
        return "copy/add/fill"
    return "other"


def profile_split(dev: str, n: int, h: int, hkv: int, d: int, mode: str, causal: bool) -> dict[str, Any]:
    """Share of GPU kernel time in attention kernels vs merge vs copies/adds/fills for one fwd+bwd, and the top kernels."""
    from torch.profiler import ProfilerActivity, profile

    from attn_core.api import dilated_attention

    q = torch.randn(1, n, h, d, device=dev, dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(1, n, hkv, d, device=dev, dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    go = torch.randn_like(q)
    run = partial(
        _pass, partial(dilated_attention, q, k, v, SEGMENTS, RATES, is_causal=causal, head_mode=mode, backend="sdpa"),
        (q, k, v), go,
    )  # fmt: skip

    run()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        run()
        torch.cuda.synchronize()
    cats: dict[str, float] = {"attention": 0.0, "merge": 0.0, "copy/add/fill": 0.0, "other": 0.0}
    kernels: list[tuple[float, str]] = []
    for ev in prof.key_averages():
        t = float(getattr(ev, "self_device_time_total", 0.0) or getattr(ev, "self_cuda_time_total", 0.0))
        if t > 0:
            cats[kernel_category(ev.key)] += t
            kernels.append((t, ev.key))
    total = sum(cats.values()) or 1.0
    top = [[name[:90], t / 1e3] for t, name in sorted(kernels, reverse=True)[:5]]
    return {k: v / total for k, v in cats.items()} | {"total_ms": total / 1e3, "top_ms": top}


def _pass(attn: Callable[[], torch.Tensor], leaves: tuple[torch.Tensor, ...], go: torch.Tensor | None) -> Any:
    """attn() under no_grad when go is None, else attn() and the gradients of ``leaves`` for grad-output go."""
    if go is None:
        with torch.no_grad():
            return attn()
    out = attn()
    return (out, *torch.autograd.grad(out, leaves, go))


def dense_cudnn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
    """SDPA pinned to cuDNN. q, k, v: (B, H, N, D) (GQA k, v already repeated to H heads)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)


def sweep_point(
    point: tuple[int, int, int, bool, str, int],
    reps: int,
    run_common: bool,
    run_dense: bool,
    hold: DeviceHold | None,
    common: dict[tuple[int, int, int, bool, int], dict[str, Any]],
    dense: dict[tuple[int, int, bool, int], dict[str, float]],
) -> dict[str, Any]:
    """One (H, Hkv, D, causal, mode, N) point: ours, the common algorithm (cached per (H, Hkv, D, causal, N)) and
    dense cuDNN (cached per (H, D, causal, N)); host timings when ``hold`` is given."""
    from attn_core.api import dilated_attention, explain

    h, hkv, d, causal, mode, n = point
    dev = "cuda"
    row: dict[str, Any] = dict(H=h, Hkv=hkv, D=d, causal=causal, mode=mode, N=n)
    q = torch.randn(1, n, h, d, device=dev, dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(1, n, hkv, d, device=dev, dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    go = torch.randn_like(q)
    q_bytes, kv_bytes = q.numel() * q.element_size(), k.numel() * k.element_size()
    out_and_grads = 2 * q_bytes + 2 * kv_bytes  # o, dq, dk, dv
    row["io_gib"] = io_bytes(n, h, hkv, d) / GIB
    try:
        row["backend"] = explain(q, k, v, SEGMENTS, RATES, is_causal=causal, head_mode=mode).backend
        fl = 4.0 * d * our_pairs(n, h, mode, causal)
        ours = partial(dilated_attention, q, k, v, SEGMENTS, RATES, is_causal=causal, head_mode=mode, backend="sdpa")
        fwd, fb = partial(_pass, ours, (q, k, v), None), partial(_pass, ours, (q, k, v), go)
        row["ours_fwd_ms"] = cuda_median_ms(fwd, reps)
        row["ours_fb_ms"] = cuda_median_ms(fb, reps)
        row["ours_fwd_tflops"] = fl / row["ours_fwd_ms"] / 1e9
        row["ours_fb_tflops"] = 3.5 * fl / row["ours_fb_ms"] / 1e9
        row["ours_fwd_extra_gib"] = peak_extra(fwd, q_bytes)
        row["ours_fb_extra_gib"] = peak_extra(fb, out_and_grads)
        row["extra_pct_fb"] = 100 * row["ours_fb_extra_gib"] / row["io_gib"]
        if hold is not None:
            row["host"] = {"ours_fwd": host_timing(fwd, hold), "ours_fb": host_timing(fb, hold)}
            row["host"]["ours_fb_graph"] = graph_replay_ms(fb)
    except torch.cuda.OutOfMemoryError:
        row["ours_error"] = "OOM"
    torch.cuda.empty_cache()
    ckey = (h, hkv, d, causal, n)
    if run_common and "ours_error" not in row and ckey not in common:
        rec: dict[str, Any] = {}
        if n % max(SEGMENTS) != 0:
            rec["common_error"] = f"needs N % {fmt_n(max(SEGMENTS))} == 0"
        else:
            try:
                cfl = 4.0 * d * common_attended_pairs(n, h, SEGMENTS, RATES, is_causal=causal)
                attn = partial(common_dilated_attention, q, k, v, SEGMENTS, RATES, is_causal=causal)
                fwd, fb = partial(_pass, attn, (q, k, v), None), partial(_pass, attn, (q, k, v), go)
                rec["common_fwd_ms"] = cuda_median_ms(fwd, reps)
                rec["common_fb_ms"] = cuda_median_ms(fb, reps)
                rec["common_fwd_tflops"] = cfl / rec["common_fwd_ms"] / 1e9
                rec["common_fb_tflops"] = 3.5 * cfl / rec["common_fb_ms"] / 1e9
                rec["common_fb_extra_gib"] = peak_extra(fb, out_and_grads)
                if hold is not None:
                    rec["host"] = {"common_fwd": host_timing(fwd, hold), "common_fb": host_timing(fb, hold)}
                    rec["host"]["common_fb_graph"] = graph_replay_ms(fb)
            except torch.cuda.OutOfMemoryError:
                rec = {"common_error": "OOM"}
        common[ckey] = rec
        torch.cuda.empty_cache()
    rec = common.get(ckey, {})
    row.update({key: val for key, val in rec.items() if key != "host"})
    if "host" in rec and "host" in row:
        row["host"].update(rec["host"])
    dkey = (h, d, causal, n)
    if run_dense and dkey not in dense:
        try:
            # (B, H, N, D) copies; GQA: k, v repeated to H heads (kv head j // (H / Hkv)) outside the timing
            qd = q.detach().transpose(1, 2).contiguous().requires_grad_()
            kd, vd = (t.detach().transpose(1, 2).repeat_interleave(h // hkv, 1).requires_grad_() for t in (k, v))
            god = go.transpose(1, 2).contiguous()
            dfl = 4.0 * d * h * dense_pairs(n, causal)
            attn = partial(dense_cudnn, qd, kd, vd, causal)
            tf = cuda_median_ms(partial(_pass, attn, (qd, kd, vd), None), reps)
            tfb = cuda_median_ms(partial(_pass, attn, (qd, kd, vd), god), reps)
            dense[dkey] = dict(fwd_ms=tf, fb_ms=tfb, fwd_tflops=dfl / tf / 1e9, fb_tflops=3.5 * dfl / tfb / 1e9)
            del qd, kd, vd, god
        except torch.cuda.OutOfMemoryError:
            row["dense_error"] = "OOM"
        torch.cuda.empty_cache()
    add_efficiency(row, dense)
    if "common_fb_ms" in row and "ours_fb_ms" in row:
        row["speedup_fwd"] = row["ours_fwd_tflops"] / row["common_fwd_tflops"]
        row["speedup_fb"] = row["ours_fb_tflops"] / row["common_fb_tflops"]
    return row


def fit_check(dev: str, h: int, hkv: int) -> list[dict[str, Any]]:
    """N=2M fwd+bwd and N=4M fwd-only (D=128, non-causal, both modes): do they fit, and at what peak."""
    from attn_core.api import dilated_attention

    def one(mode: str, n: int, fwd_only: bool) -> dict[str, Any]:  # its tensors die with the call, OOM or not
        q = torch.randn(1, n, h, 128, device=dev, dtype=torch.bfloat16, requires_grad=not fwd_only)
        k, v = (
            torch.randn(1, n, hkv, 128, device=dev, dtype=torch.bfloat16, requires_grad=not fwd_only) for _ in range(2)
        )
        torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        with torch.set_grad_enabled(not fwd_only):
            out = dilated_attention(q, k, v, SEGMENTS, RATES, head_mode=mode, backend="sdpa")
            if not fwd_only:
                torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
        torch.cuda.synchronize()
        return dict(
            ms=(time.perf_counter() - t0) * 1e3, peak_gib=torch.cuda.max_memory_allocated() / GIB,
            tensor_gib=q.numel() * q.element_size() / GIB, ok=True,
        )  # fmt: skip

    fit = []
    for mode in MODES:
        for n, fwd_only in ((2 * KI * KI, False), (4 * KI * KI, True)):
            torch.cuda.empty_cache()
            rec: dict[str, Any] = dict(mode=mode, N=n, D=128, H=h, Hkv=hkv, fwd_only=fwd_only)
            try:
                rec.update(one(mode, n, fwd_only))
            except torch.cuda.OutOfMemoryError:
                rec.update(ok=False, error="OOM")
            fit.append(rec)
            print("fit", rec)
    return fit


def parse_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The sweep's settings from the command line; ValueError naming a bad value."""
    ns = parse_n(args.n)
    modes = [m.strip() for m in args.modes.split(",")]
    bad_modes = [m for m in modes if m not in MODES]
    if bad_modes:
        raise ValueError(f"--modes takes {', '.join(MODES)}, got {bad_modes}")
    ds = []
    for tok in args.d.split(","):
        if not tok.strip().isdigit() or int(tok) <= 0:
            raise ValueError(f"--d takes positive head dims, got {tok!r}")
        ds.append(int(tok))
    host_ns = parse_n(args.host_n) if args.host_n.strip() else []
    missing = [fmt_n(n) for n in host_ns if n not in ns]
    if missing:
        raise ValueError(f"--host-n must be sequence lengths of the sweep (--n {args.n}), got {missing} outside it")
    if args.reps < 1:
        raise ValueError(f"--reps must be at least 1, got {args.reps}")
    return dict(
        ns=ns, heads=parse_heads(args.heads), ds=ds, causals=CAUSAL_CHOICES[args.causal], modes=modes,
        host_ns=host_ns, dense_max=parse_n(args.dense_max_n)[0], common_max=parse_n(args.common_max_n)[0],
    )  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", default="16K,32K,64K,256K,1M", help="sequence lengths")
    ap.add_argument("--heads", default="32/8,16/16", help="H/Hkv pairs (Hkv < H: GQA)")
    ap.add_argument("--d", default="64,128", help="head dims")
    ap.add_argument("--causal", choices=tuple(CAUSAL_CHOICES), default="both")
    ap.add_argument("--modes", default="split,all", help="head modes")
    ap.add_argument("--host-n", default="16K,32K", help="sweep Ns where host time per call is measured ('' for none)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--dense-max-n", default="256K", help="largest N for dense cuDNN")
    ap.add_argument("--common-max-n", default="2M", help="largest N for the common algorithm")
    ap.add_argument("--fit", action="store_true", help="also check N=2M fwd+bwd and N=4M fwd-only fit (D=128)")
    ap.add_argument(
        "--profile", action="store_true", help="kernel-time split at N=256K per H/Hkv, D, causal setting and mode"
    )
    ap.add_argument("--no-check", action="store_true", help="skip the bf16/fp16 correctness check")
    ap.add_argument(
        "--quick",
        action="store_true",
        help="one causal GQA point (N=16K, H/Hkv 32/8, D=128, both modes, host time), 1 rep; "
        "also the common algorithm's CPU self-check",
    )
    ap.add_argument("--out", type=Path, default=Path("docs/benchmarks"))
    ap.add_argument("--name", default="dilated_h100")
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.quick:
        args.n, args.heads, args.d, args.causal, args.reps, args.host_n = "16K", "32/8", "128", "on", 1, "16K"
    try:
        cfg = parse_settings(args)
    except ValueError as exc:
        ap.error(str(exc))
    checked = None
    if args.quick:
        checked = self_check()
        print("common algorithm vs attn_core.reference (float64, CPU), relative errors:", checked)
    if not torch.cuda.is_available():
        print("bench_dilated.py needs a CUDA GPU; none is visible")
        return 1
    import triton
    from tqdm import tqdm

    dev = "cuda"
    args.out.mkdir(parents=True, exist_ok=True)
    env = dict(
        gpu=torch.cuda.get_device_name(), torch=torch.__version__, cuda=torch.version.cuda,
        cudnn=torch.backends.cudnn.version(), triton=triton.__version__, python=platform.python_version(),
        date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    )  # fmt: skip
    print(env)
    result: dict[str, Any] = dict(
        env=env,
        config=dict(
            segments=SEGMENTS, rates=RATES, heads=cfg["heads"], D=cfg["ds"], causal=cfg["causals"],
            modes=cfg["modes"], B=1, dtype="bfloat16", host_n=cfg["host_ns"], host_calls=HOST_CALLS,
            dense_max_n=cfg["dense_max"], common_max_n=cfg["common_max"], reps=args.reps,
        ),
        common_label=COMMON_LABEL,
    )  # fmt: skip
    if checked is not None:
        result["common_self_check"] = checked

    if not args.no_check:
        checks = correctness(dev)
        result["correctness"] = checks
        bad = [c for c in checks if not c["ok"]]
        print(f"correctness: {len(checks) - len(bad)}/{len(checks)} pass (bf16/fp16 vs float64, 2x rule)")
        for c in bad:
            print("  FAIL", c)

    if args.fit:
        result["fit"] = fit_check(dev, *cfg["heads"][0])

    settings = [
        (h, hkv, d, c, m) for h, hkv in cfg["heads"] for d in cfg["ds"] for c in cfg["causals"] for m in cfg["modes"]
    ]
    if args.profile:
        result["profile"] = {}
        for h, hkv, d, causal, mode in settings:
            torch.cuda.empty_cache()
            key = point_label((h, hkv, d, causal, mode, 256 * KI))
            result["profile"][key] = profile_split(dev, 256 * KI, h, hkv, d, mode, causal)
            print("profile", key, result["profile"][key])

    rows: list[dict[str, Any]] = []
    dense: dict[tuple[int, int, bool, int], dict[str, float]] = {}
    common: dict[tuple[int, int, int, bool, int], dict[str, Any]] = {}
    jobs = [(*s, n) for s in settings for n in cfg["ns"]]
    hold = DeviceHold() if cfg["host_ns"] else None
    for job in tqdm(jobs, desc="dilated sweep", file=sys.stderr):
        torch.cuda.empty_cache()
        n = job[-1]
        host = hold if n in cfg["host_ns"] else None
        rows.append(sweep_point(job, args.reps, n <= cfg["common_max"], n <= cfg["dense_max"], host, common, dense))
        result["rows"] = rows  # saved after every point: a late failure keeps what was measured
        (args.out / f"{args.name}.json").write_text(json.dumps(result, indent=1))
    result["rows"] = rows
    result["dense"] = [dict(H=h, D=d, causal=c, N=n, **v) for (h, d, c, n), v in sorted(dense.items())]
    result["targets"] = evaluate_targets(rows)

    (args.out / f"{args.name}.json").write_text(json.dumps(result, indent=1))
    md = render_markdown(result)
    (args.out / f"{args.name}.md").write_text(md)
    plot(result, args.out / f"{args.name}.png")
    print(md)
    print("\n".join(t["text"] for t in result["targets"]))
    return 0


def _f(x: Any, spec: str = ".1f") -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def _timed(r: dict[str, Any], who: str, what: str) -> str:
    """'ms (TF/s)' of one measurement of a row, or its error."""
    if f"{who}_{what}_ms" not in r:
        return r.get(f"{who}_error", "-")
    return f"{_f(r[f'{who}_{what}_ms'], '.2f')} ({_f(r[f'{who}_{what}_tflops'], '.0f')})"


def _host_cell(rec: dict[str, Any] | None) -> tuple[str, str]:
    if rec is None:
        return "-", "-"
    dev = _f(rec["device_ms"], ".2f") + ("" if rec["device_clean"] else "~")
    return f"{_f(rec['host_ms'], '.2f')} / {dev} / {_f(rec['wall_ms'], '.2f')}", rec["bound"]


def _graph_cell(rec: dict[str, Any] | None) -> str:
    if rec is None:
        return "-"
    return _f(rec["replay_ms"], ".2f") if "replay_ms" in rec else f"capture failed: {rec['error']}"


def render_markdown(res: dict[str, Any]) -> str:
    env, cfg = res["env"], res["config"]
    heads = ", ".join(f"{h}/{hkv}" for h, hkv in cfg["heads"])
    lines = [
        f"# Dilated attention, {env['gpu']}",
        "",
        f"torch {env['torch']} (CUDA {env['cuda']}, cuDNN {env['cudnn']}), triton {env['triton']}, "
        f"python {env['python']}, {env['date']}. Config segments {cfg['segments']}, rates {cfg['rates']}, "
        f"H/Hkv {heads}, B=1, bf16, {cfg['reps']} reps (median).",
        'Ours = attn_core backend "sdpa". '
        f"Common = {res['common_label']}, same causal and GQA settings. Dense = SDPA pinned to cuDNN, causal where "
        "causal, GQA K/V repeated to H heads outside the timing.",
        "Eff. TFLOP/s = 4*D*pairs attended, summed over query heads (fwd), 3.5x for fwd+bwd; dilated pairs counted per "
        "group as computed, dense N^2 per head (causal N(N+1)/2). fwd x / fwd+bwd x = our rate / the common "
        "algorithm's. eff vs cuDNN = our rate / dense cuDNN's (same H, D, causal). Extra = peak allocated beyond "
        "q, k, v, o (+ their grads for fwd+bwd); % of q, k, v, o and their grads.",
    ]
    if res.get("targets"):
        lines += ["", "Targets:", ""] + [f"- {t['text']}" for t in res["targets"]]
    lines += [
        "",
        "| H/Hkv | D | causal | mode | N | ours fwd ms (TF/s) | ours fwd+bwd ms (TF/s) | common fwd ms (TF/s) "
        "| common fwd+bwd ms (TF/s) | fwd x | fwd+bwd x | eff vs cuDNN fwd | eff vs cuDNN fwd+bwd "
        "| ours extra fwd / fwd+bwd GiB | extra % of q,k,v,o+grads | common extra GiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    starred = False
    for r in res["rows"]:
        lead = f"| {r['H']}/{r['Hkv']} | {r['D']} | {'yes' if r['causal'] else 'no'} | {r['mode']} | {fmt_n(r['N'])} |"
        if "ours_error" in r:
            lines.append(f"{lead} {r['ours_error']} ||||||||||")
            continue
        star = "*" if r.get("dense_other_n") else ""
        starred |= bool(star)
        lines.append(
            f"{lead} {_timed(r, 'ours', 'fwd')} | {_timed(r, 'ours', 'fb')} | {_timed(r, 'common', 'fwd')} "
            f"| {_timed(r, 'common', 'fb')} | {_f(r.get('speedup_fwd'), '.2f')} | {_f(r.get('speedup_fb'), '.2f')} "
            f"| {_f(r.get('eff_fwd'), '.2f')}{star} | {_f(r.get('eff_fb'), '.2f')}{star} "
            f"| {_f(r['ours_fwd_extra_gib'], '.2f')} / {_f(r['ours_fb_extra_gib'], '.2f')} "
            f"| {_f(r['extra_pct_fb'])}% | {_f(r.get('common_fb_extra_gib'))} |"
        )
    if starred:
        lines += [
            "",
            "\\* dense cuDNN did not run at this N (beyond --dense-max-n, or out of memory): its rate at the largest "
            "N it ran at for the same H, D and causal setting is used (see the dense table); dense attention's rate "
            "is flat in N at these sizes.",
        ]
    hosted = [r for r in res["rows"] if r.get("host")]
    if hosted:
        lines += [
            "",
            f"Host time per call ({cfg['host_calls']} calls): host = CPU time to issue a call (no sync in the loop), "
            "device = GPU time of a call queued behind a hold so it runs back to back (~: the hold ended before the "
            "call was issued), wall = the loop's time to its closing sync. Bound: host when host > device. "
            "graph = one fwd+bwd captured in a CUDA graph (torch.cuda.graph), median replay ms: the step with no "
            "host issue time.",
            "",
            "| H/Hkv | D | causal | mode | N | pass | ours host / device / wall ms | ours bound "
            "| common host / device / wall ms | common bound | ours graph ms | common graph ms |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in hosted:
            for what, label in (("fwd", "fwd"), ("fb", "fwd+bwd")):
                ours, ob = _host_cell(r["host"].get(f"ours_{what}"))
                com, cb = _host_cell(r["host"].get(f"common_{what}"))
                og, cg = (_graph_cell(r["host"].get(f"{who}_{what}_graph")) for who in ("ours", "common"))
                lines.append(
                    f"| {r['H']}/{r['Hkv']} | {r['D']} | {'yes' if r['causal'] else 'no'} | {r['mode']} "
                    f"| {fmt_n(r['N'])} | {label} | {ours} | {ob} | {com} | {cb} | {og} | {cg} |"
                )
    lines += [
        "",
        "Dense cuDNN (same run):",
        "",
        "| H | D | causal | N | fwd ms | fwd TF/s | fwd+bwd ms | fwd+bwd TF/s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for dn in res["dense"]:
        lines.append(
            f"| {dn['H']} | {dn['D']} | {'yes' if dn['causal'] else 'no'} | {fmt_n(dn['N'])} | {dn['fwd_ms']:.2f} "
            f"| {dn['fwd_tflops']:.0f} | {dn['fb_ms']:.2f} | {dn['fb_tflops']:.0f} |"
        )
    if res.get("fit"):
        f0 = res["fit"][0]
        lines += [
            "",
            f"Fit on the card (D=128, H/Hkv {f0['H']}/{f0['Hkv']}, non-causal):",
            "",
            "| mode | N | pass | peak GiB | q size GiB |",
            "|---|---|---|---|---|",
        ]
        for f in res["fit"]:
            what = "fwd" if f["fwd_only"] else "fwd+bwd"
            lines.append(
                f"| {f['mode']} | {fmt_n(f['N'])} {what} | {'ok' if f['ok'] else f.get('error')} "
                f"| {_f(f.get('peak_gib'))} | {_f(f.get('tensor_gib'))} |"
            )
    if res.get("profile"):
        lines += ["", "GPU kernel time split, one fwd+bwd, N=256K:", ""]
        for key, p in res["profile"].items():
            parts = ", ".join(f"{k} {100 * v:.1f}%" for k, v in p.items() if k not in ("total_ms", "top_ms"))
            top = "; ".join(f"{name} {ms:.2f} ms" for name, ms in p["top_ms"][:3])
            lines.append(f"- {key}: {parts} (total {p['total_ms']:.1f} ms). Top kernels: {top}")
    if res.get("correctness"):
        ok = sum(c["ok"] for c in res["correctness"])
        worst = max(res["correctness"], key=lambda c: c["dq_err"] / max(c["dq_plain_err"], 1e-30))
        lines += [
            "",
            f"Correctness on the GPU: {ok}/{len(res['correctness'])} cases pass the 2x rule (bf16/fp16 outputs and "
            "dq/dk/dv vs float64 reference; N=3000, segments [256..2048], GQA, causal, padding, both modes). "
            f"Worst dq error ratio vs plain PyTorch: {worst['dq_err'] / max(worst['dq_plain_err'], 1e-30):.2f}.",
        ]
    if res.get("common_self_check"):
        sc = res["common_self_check"]
        lines += [
            "",
            "Common algorithm vs attn_core.reference.dilated_attention (float64, CPU; causal, MHA and GQA): "
            f"relative error per group {sc['group']:.1e}, whole output {sc['output']:.1e}.",
        ]
    return "\n".join(lines) + "\n"


def plot(res: dict[str, Any], path: Path) -> None:
    """One panel per (H/Hkv, D, causal): ours per head mode, the common algorithm and dense cuDNN, fwd+bwd and fwd."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted({(r["H"], r["Hkv"], r["D"], r["causal"]) for r in res["rows"]})
    ncols = min(4, max(len(keys), 1))
    nrows = max(1, math.ceil(len(keys) / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(5 * ncols, 4 * nrows), squeeze=False)
    for ax, (h, hkv, d, causal) in zip(axes.flat, keys):
        panel = [r for r in res["rows"] if (r["H"], r["Hkv"], r["D"], r["causal"]) == (h, hkv, d, causal)]
        for mode in sorted({r["mode"] for r in panel}):
            rs = [r for r in panel if r["mode"] == mode and "ours_fb_tflops" in r]
            ns = [r["N"] for r in rs]
            ax.plot(ns, [r["ours_fb_tflops"] for r in rs], "o-", label=f"ours {mode} fwd+bwd")
            ax.plot(ns, [r["ours_fwd_tflops"] for r in rs], "o--", label=f"ours {mode} fwd")
        cs = sorted({r["N"]: r for r in panel if "common_fb_tflops" in r}.values(), key=lambda r: r["N"])
        ax.plot([r["N"] for r in cs], [r["common_fb_tflops"] for r in cs], "s-", label="common fwd+bwd")
        ax.plot([r["N"] for r in cs], [r["common_fwd_tflops"] for r in cs], "s--", label="common fwd")
        dn = [x for x in res["dense"] if (x["H"], x["D"], x["causal"]) == (h, d, causal)]
        if dn:
            ax.axhline(max(x["fb_tflops"] for x in dn), color="gray", ls=":", label="dense cuDNN fwd+bwd")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("N")
        ax.set_ylabel("effective TFLOP/s")
        ax.set_title(f"H/Hkv {h}/{hkv}, D={d}, {'causal' if causal else 'non-causal'}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(keys) :]:
        ax.set_visible(False)
    fig.suptitle(f"Dilated attention, {res['env']['gpu']}, bf16")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
