"""Block-sparse attention benchmark: our Triton kernel vs compiled FlexAttention vs dense SDPA cuDNN.

One GPU, bf16, (B=1, H=16, D=128 by default). For each N, pattern (local_window, bigbird) and
density, in one process side by side:
  - ours: attn_sparse.kernels (Triton), forward and forward+backward;
  - FlexAttention (the anchor), torch.compile'd, with a BlockMask holding the same tiles;
  - dense SDPA with the cuDNN backend (the baseline every speedup is measured against).
Effective TFLOP/s count 4*Nq*Nk*D per (batch, head) over the attended pairs only (fwd), 3.5x that
for fwd+bwd. Also: layout build time (N=1M and as % of attention time at each N), recompilation
checks (Triton kernel cache sizes, dynamo counters for flex) and bf16 correctness against the
float64 reference at small N. Writes JSON + markdown + PNG to --out.

    source tools/srcpath.sh && python tools/bench_sparse.py --out docs/benchmarks
    python tools/bench_sparse.py --quick          # N=8K only, two densities
    python tools/bench_sparse.py --tune           # tile-config sweep for the kernels (prints a table)
    python tools/bench_sparse.py --tune --tune-mask causal --heads 32 --tune-kv-heads 8 --head-dim 64
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_env import SMClockSampler, gpu_env, gpu_tag

# --------------------------------------------------------------------------------------------- layouts


def make_layout(pattern: str, n: int, density: float, block: tuple[int, int], *, device: str = "cpu") -> Any:
    """An attn_sparse pattern sized so about ``density`` of the tiles are active (actual density reported),
    built on ``device`` (the patterns' ``device=``, as a user would).

    local_window: window = half the tile budget each side. bigbird: a window of ~1/3 of the budget,
    global tokens ~1/6, seeded random blocks for the rest.
    """
    from attn_sparse import patterns

    bk = block[1]
    nk = math.ceil(n / bk)
    per_row = max(1, round(density * nk))
    if per_row >= nk:
        return patterns.local_window(n, n, block_size=block, device=device)
    if pattern == "local_window":
        return patterns.local_window(n, max(0, (per_row - 1) * bk // 2), block_size=block, device=device)
    if pattern == "bigbird":
        window = max(0, (per_row // 3 - 1) * bk // 2)
        glob = max(1, per_row // 6) * bk
        rnd = max(0, per_row - per_row // 3 - max(1, per_row // 6))
        return patterns.bigbird(n, window, glob, rnd, seed=n, block_size=block, device=device)
    raise ValueError(f"unknown pattern {pattern!r}; allowed: local_window, bigbird")


def attended_pairs(layout: Any, n: int) -> float:
    """Exact count of attended (query, key) pairs per head (partial last blocks counted exactly)."""
    bq, bk = layout.block_size
    crow = layout.crow_indices.long()
    rows = torch.repeat_interleave(
        torch.arange(layout.num_query_blocks, device=crow.device).repeat(layout.num_heads), crow[1:] - crow[:-1]
    )
    rlen = torch.clamp(n - rows * bq, max=bq).double()
    clen = torch.clamp(n - layout.col_indices.long() * bk, max=bk).double()
    return float((rlen * clen).sum()) / layout.num_heads


# --------------------------------------------------------------------------------------------- timing


def bench_ms(fn: Callable[[], object], warmup: int, rep: int) -> float:
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))


def kernel_cache_entries(which: str = "attention") -> int:
    """Compiled variants held by our Triton kernels (grows by one per recompilation): the attention
    kernels, or (``which="build"``) the pattern-build kernels (bigbird's, local_window's, run expansion)."""
    from attn_sparse.kernels import backward as bwd
    from attn_sparse.kernels import forward as fwd
    from attn_sparse.kernels import pattern_build as pb

    kernels = {
        "attention": (fwd.fwd_kernel, bwd.dq_kernel, bwd.dkv_kernel, bwd.delta_kernel, bwd.dq_ds_kernel),
        "build": (pb._count_kernel, pb._expand_kernel, pb._transpose_kernel, pb._window_kernel, pb._runs_kernel),
    }
    if which not in kernels:
        raise ValueError(f"which={which!r}; allowed: {sorted(kernels)}")
    fns = kernels[which]
    total = 0
    for fn in fns:
        for entry in getattr(fn, "device_caches", {}).values():
            total += len(entry[0])
    return total


# --------------------------------------------------------------------------------------------- checks


def correctness(device: str) -> list[dict]:
    """bf16 on the GPU vs the float64 reference (outputs and grads), within 2x plain-PyTorch bf16 error."""
    from attn_core.reference import block_sparse_attention as ref_attn
    from attn_core.testing import assert_close_to_reference, max_abs_error
    from attn_sparse.api import block_sparse_attention

    results = []
    cases = [
        dict(n=1000, h=4, hkv=2, d=128, block=(128, 128), causal=False, pattern="bigbird", density=0.4),
        dict(n=777, h=4, hkv=1, d=64, block=(128, 64), causal=True, pattern="local_window", density=0.5),
        dict(n=1024, h=2, hkv=2, d=128, block=(64, 64), causal=True, pattern="bigbird", density=0.3),
    ]
    for c in cases:
        g = torch.Generator(device=device).manual_seed(7)
        n, h, hkv, d = c["n"], c["h"], c["hkv"], c["d"]
        layout = make_layout(c["pattern"], n, c["density"], c["block"])
        q = torch.randn(1, n, h, d, device=device, generator=g).bfloat16().requires_grad_()
        k = torch.randn(1, n, hkv, d, device=device, generator=g).bfloat16().requires_grad_()
        v = torch.randn(1, n, hkv, d, device=device, generator=g).bfloat16().requires_grad_()
        do = torch.randn(1, n, h, d, device=device, generator=g).bfloat16()
        out = block_sparse_attention(q, k, v, layout, is_causal=c["causal"], backend="triton")
        grads = torch.autograd.grad(out, (q, k, v), do)
        dense = layout.to_dense()

        def ref(
            dt: torch.dtype, dense: torch.Tensor = dense, c: dict = c, qkv: tuple = (q, k, v), do: torch.Tensor = do
        ) -> tuple[torch.Tensor, ...]:
            qr, kr, vr = (t.detach().to(dt).requires_grad_() for t in qkv)
            o, _ = ref_attn(qr, kr, vr, dense, c["block"], is_causal=c["causal"], dtype=dt)
            return (o.detach(), *torch.autograd.grad(o, (qr, kr, vr), do.to(dt)))

        r64, rbf = ref(torch.float64), ref(torch.bfloat16)
        row = {k2: (list(v2) if isinstance(v2, tuple) else v2) for k2, v2 in c.items()}
        ok = True
        for name, got, r, b in zip(("out", "dq", "dk", "dv"), (out, *grads), r64, rbf):
            row[f"{name}_err"] = max_abs_error(got, r)
            row[f"{name}_baseline_err"] = max_abs_error(b, r)
            try:
                assert_close_to_reference(name, got, r, b)
            except AssertionError as exc:
                ok = False
                row[f"{name}_failure"] = str(exc)
        row["ok"] = ok
        results.append(row)
    return results


# --------------------------------------------------------------------------------------------- main sweep


def run_sweep(args: argparse.Namespace, env: dict, partial: Path | None = None) -> dict:
    """Every (N, pattern, density) point; after each one the rows so far go to ``partial`` (JSON)."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.flex_attention import flex_attention
    from tqdm import tqdm

    device = "cuda"
    H, D, B = args.heads, args.head_dim, 1
    block = (args.block_q, args.block_k)
    flex = torch.compile(flex_attention, dynamic=False)
    try:
        import torch._dynamo.utils as dyn_utils

        counters: object = dyn_utils.counters
    except ImportError:  # dynamo internals moved: report no count
        counters = None
    rows = []
    clock = SMClockSampler(torch.cuda.current_device())
    points = [(p, d) for p in args.patterns for d in args.densities]
    bar = tqdm(total=len(points) * len(args.seq_lens), desc="sparse sweep", file=sys.stderr)
    for n in args.seq_lens:
        g = torch.Generator(device=device).manual_seed(n)
        q, k, v, do = (
            torch.randn(B, n, H, D, device=device, dtype=torch.bfloat16, generator=g).requires_grad_() for _ in range(4)
        )
        qt, kt, vt = (t.detach().transpose(1, 2).requires_grad_() for t in (q, k, v))
        dot = do.detach().transpose(1, 2)
        # do_bench budgets in ms: several timed calls even for the slowest 32K point (30 ms budgets
        # timed it from one or two calls); 128K calls are long and steady
        warm, rep = (50, 300) if n <= 32768 else (100, 600)

        def dense_fwd(qt: torch.Tensor = qt, kt: torch.Tensor = kt, vt: torch.Tensor = vt) -> torch.Tensor:
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                return F.scaled_dot_product_attention(qt, kt, vt)

        def dense_fb(
            qt: torch.Tensor = qt, kt: torch.Tensor = kt, vt: torch.Tensor = vt, dot: torch.Tensor = dot
        ) -> None:
            torch.autograd.grad(dense_fwd(qt, kt, vt), (qt, kt, vt), dot)

        for pattern, density in points:
            rows.append(
                measure_point(
                    flex,
                    counters,
                    q,
                    k,
                    v,
                    do,
                    qt,
                    kt,
                    vt,
                    dot,
                    pattern,
                    density,
                    block,
                    warm,
                    rep,
                    dense_fwd,
                    dense_fb,
                    clock,
                )
            )
            bar.update()
            if partial is not None:  # what a run cut short (time limit, lost machine) still leaves
                partial.write_text(json.dumps({"env": env, "rows": rows}, indent=1))
        del q, k, v, do, qt, kt, vt, dot
        torch.cuda.empty_cache()
    bar.close()
    clock.close()
    return {"rows": rows}


BUILD_REPS = 15
BUILD_ROUNDS = 3


def timed_builds(build: Callable[[], Any], count: int) -> tuple[Any, list[float]]:
    """(last layout, sorted wall times in ms) of ``count`` calls of ``build`` plus the layout's
    transposed CSR (everything a first attention call pays), each between device syncs."""
    ts, layout = [], None
    for _ in range(count):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        layout = build()
        layout.transposed_csr()
        torch.cuda.synchronize()
        ts.append((time.perf_counter() - t0) * 1e3)
    return layout, sorted(ts)


def measure_point(
    flex: Callable,
    counters: object,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    do: torch.Tensor,
    qt: torch.Tensor,
    kt: torch.Tensor,
    vt: torch.Tensor,
    dot: torch.Tensor,
    pattern: str,
    density: float,
    block: tuple[int, int],
    warm: int,
    rep: int,
    dense_fwd: Callable[[], object],
    dense_fb: Callable[[], object],
    clock: SMClockSampler,
) -> dict:
    """One (N, pattern, density) point: dense cuDNN, ours and flex, fwd and fwd+bwd.

    The dense anchor is timed at every point, right before ours and flex (fwd: cuDNN, ours, flex; then
    fwd+bwd in that order), each in its own block of calls: the GPU's clock drifts by several percent
    over a sweep, so an anchor timed once per N tilts later ratios; interleaving the calls one by one
    is not neutral either (the clock a kernel gets depends on the power draw of the kernel before it:
    docs/benchmarks/sparse_timing_methods/). The mean SM clock of each block is recorded. Layout
    build = pattern construction on the GPU (device=) + transposed CSR (everything a first call pays).
    """
    from attn_sparse.api import block_sparse_attention

    B, n, H, D = q.shape
    device = str(q.device)
    # one untimed build first: CUDA loads kernel modules lazily, once per process, not per layout;
    # then the median of BUILD_REPS builds, timed in BUILD_ROUNDS rounds spread over the point
    # (before, between and after the attention timings): a build is ~0.1-0.5 ms of host work, so a
    # host hiccup lasting a few ms would otherwise set the whole median of back-to-back builds
    build_before = kernel_cache_entries("build")
    make_layout(pattern, n, density, block, device=device).transposed_csr()

    def build_round() -> tuple[Any, list[float]]:
        return timed_builds(lambda: make_layout(pattern, n, density, block, device=device), BUILD_REPS // BUILD_ROUNDS)

    layout, builds = build_round()
    build_variants = kernel_cache_entries("build") - build_before
    dens = layout.density
    flops_f = 4.0 * attended_pairs(layout, n) * D * H * B
    bwd_form = backward_form(layout, B, k.shape[2], H // k.shape[2], q.element_size())

    def ours_fwd() -> torch.Tensor:
        return block_sparse_attention(q, k, v, layout, backend="triton")

    def ours_fb() -> None:
        torch.autograd.grad(block_sparse_attention(q, k, v, layout, backend="triton"), (q, k, v), do)

    torch.cuda.synchronize()
    t0 = time.perf_counter()
    bm = layout.to_flex_block_mask(n, n)
    torch.cuda.synchronize()
    flex_conv_ms = (time.perf_counter() - t0) * 1e3
    stats = counters["stats"] if counters is not None else None  # type: ignore[index]
    graphs_before = stats.get("unique_graphs", 0) if stats is not None else 0

    def flex_fwd() -> torch.Tensor:
        return flex(qt, kt, vt, block_mask=bm)

    def flex_fb() -> None:
        torch.autograd.grad(flex(qt, kt, vt, block_mask=bm), (qt, kt, vt), dot)

    before = kernel_cache_entries()
    ms, mhz = {}, {}
    for name, fn in (
        ("dense_fwd", dense_fwd), ("ours_fwd", ours_fwd), ("flex_fwd", flex_fwd),
        ("dense_fb", dense_fb), ("ours_fb", ours_fb), ("flex_fb", flex_fb),
    ):  # fmt: skip
        ms[name], mhz[name] = clock.measure(bench_ms, fn, warm, rep)
        if name == "flex_fwd":
            builds += build_round()[1]
    new_variants = kernel_cache_entries() - before
    flex_graphs = (stats.get("unique_graphs", 0) - graphs_before) if stats is not None else None
    builds += build_round()[1]
    dense_f, ours_f, fl_f = ms["dense_fwd"], ms["ours_fwd"], ms["flex_fwd"]
    dense_fb_ms, ours_fbm, fl_fb = ms["dense_fb"], ms["ours_fb"], ms["flex_fb"]
    build_ms = statistics.median(builds)
    return dict(
        n=n,
        pattern=pattern,
        density_target=density,
        density=dens,
        ours_fwd_ms=ours_f,
        ours_fwdbwd_ms=ours_fbm,
        flex_fwd_ms=fl_f,
        flex_fwdbwd_ms=fl_fb,
        dense_fwd_ms=dense_f,
        dense_fwdbwd_ms=dense_fb_ms,
        ours_fwd_tflops=flops_f / ours_f * 1e-9,
        ours_fwdbwd_tflops=3.5 * flops_f / ours_fbm * 1e-9,
        flex_fwd_tflops=flops_f / fl_f * 1e-9,
        dense_fwd_tflops=4.0 * n * n * D * H * B / dense_f * 1e-9,
        speedup_fwd=dense_f / ours_f,
        speedup_fwdbwd=dense_fb_ms / ours_fbm,
        target_fwd=0.8 / dens,
        target_fwdbwd=0.7 / dens,
        vs_flex_fwd=fl_f / ours_f,
        vs_flex_fwdbwd=fl_fb / ours_fbm,
        layout_build_ms=build_ms,
        layout_build_pct_of_fwd=100.0 * build_ms / ours_f,
        flex_blockmask_conversion_ms=flex_conv_ms,
        triton_new_variants=new_variants,
        build_new_variants=build_variants,
        flex_new_graphs=flex_graphs,
        sm_clock_mhz=mhz,
        backward_form=bwd_form,
    )


def backward_form(layout: Any, batch: int, kv_heads: int, group: int, elem_size: int) -> str:
    """Which backward the Triton kernels run for this call: 'stored dS (k chunks)' or 'recompute'."""
    from attn_sparse.kernels import CSR, default_config, stored_ds_chunks

    chunks = stored_ds_chunks(
        CSR.from_layout(layout), batch, kv_heads, group, elem_size, default_config(layout.block_size)
    )
    n = len(chunks)
    return f"stored dS ({n} chunk{'s' if n > 1 else ''})" if chunks else "recompute"


def layout_build_times(device: str, sizes: tuple[int, ...] = (131072, 1 << 20), reps: int = 7) -> list[dict]:
    """Median time to build each attn_sparse pattern on ``device`` (device=), N=128K and 1M.

    Timed = everything a first call pays: pattern construction on the device + transposed CSR
    (the backward's). Each layout is checked equal (CSR and transposed CSR) to the same pattern
    built on the CPU; ``cpu_then_copy_ms`` is the build on the CPU + copy + transposed CSR (the
    default device="cpu" path) for comparison.
    """
    from attn_sparse import patterns

    def builders(n: int, dev: str) -> dict[str, Callable[[], Any]]:
        return {
            "local_window": lambda: patterns.local_window(n, 4096, device=dev),
            "bigbird": lambda: patterns.bigbird(n, 2048, 512, 8, seed=1, device=dev),
            "global_local": lambda: patterns.global_local(n, 4096, 512, device=dev),
            "dilated": lambda: patterns.dilated(n, 16, device=dev),
            "hierarchical": lambda: patterns.hierarchical(n, [2048, 32768, n], [1, 8, 64], device=dev),
            "causal": lambda: patterns.causal(n, device=dev),
            "longnet": lambda: patterns.longnet(n, [2048, 8192, 65536], [1, 4, 16], num_heads=16, device=dev),
        }

    def timed(build: Callable[[], Any], count: int) -> tuple[Any, list[float]]:
        return timed_builds(lambda: build().to(device), count)

    out = []
    for n in sizes:
        for name, build in builders(n, device).items():
            timed(build, 1)  # warm-up: CUDA loads kernel modules lazily, once per process
            lay, ts = timed(build, reps)
            ref, cpu_ts = timed(builders(n, "cpu")[name], 3)
            same = lay == ref and all(
                torch.equal(a.cpu(), b.cpu()) for a, b in zip(lay.transposed_csr(), ref.transposed_csr())
            )
            out.append(
                dict(
                    pattern=name,
                    n=n,
                    density=lay.density,
                    nnz=lay.nnz,
                    build_ms=ts[len(ts) // 2],
                    build_ms_min=ts[0],
                    cpu_then_copy_ms=cpu_ts[len(cpu_ts) // 2],
                    equal_to_cpu_build=bool(same),
                )
            )
    return out


def flex_create_block_mask_cost(n: int, device: str) -> float:
    """Time of torch's own create_block_mask (compiled) for a banded mask: the anchor's build cost."""
    from torch.nn.attention.flex_attention import create_block_mask

    w = max(1, int(0.1 * n) // 2)

    def band(b, h, qi, ki):
        return (qi - ki).abs() <= w

    create_block_mask(band, None, None, n, n, device=device, _compile=True)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    create_block_mask(band, None, None, n, n, device=device, _compile=True)
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1e3


TUNE_MASKS = ("none", "causal", "causal+win4096", "causal+win1024")


def tune_cases(args: argparse.Namespace) -> list[tuple[str, Any, Any, float]]:
    """(label, layout, KernelMask, density) per tuned case: local_window layouts of --tune-densities
    (no token mask) for --tune-mask none, else the tiles derived from that token mask (layout=None)."""
    from attn_sparse.kernels import KernelMask
    from attn_sparse.masks import TokenMask

    n = args.tune_n
    if args.tune_mask == "none":
        return [
            (
                f"local_window {b[0]}x{b[1]}",
                make_layout("local_window", n, d, b).to("cuda"),
                KernelMask.causal(False, n, n),
                d,
            )
            for b in ((128, 128), (128, 64))
            for d in args.tune_densities
        ]
    window = None if args.tune_mask == "causal" else (int(args.tune_mask.split("win")[1]) - 1, 0)
    mask = TokenMask.build(is_causal=True, window_size=window, batch=1, seq_len_q=n, seq_len_k=n, device="cuda")
    layout = mask.layout(n, n, (128, 128), torch.device("cuda"))
    left, right = mask.kernel_sides(n, n)
    return [(args.tune_mask, layout, KernelMask(True, left, right, None), layout.density)]


TUNE_KERNELS = ("fwd", "dq", "dkv", "dqs")


def tune(args: argparse.Namespace) -> list[dict]:
    """Time tile configs for fwd, dq and dk/dv (H/Hkv from --heads/--tune-kv-heads, D from --head-dim)
    on --tune-mask's tiles; print the table."""
    from attn_sparse.kernels import CSR, block_sparse_backward, block_sparse_forward, default_config

    H, Hkv, D, n = args.heads, args.tune_kv_heads or args.heads, args.head_dim, args.tune_n
    # (BLOCK_M, BLOCK_N, warps, stages); the session's probes (docs/benchmarks/sparse_h100.md) also
    # found 32x128 dk/dv tiles with 4 warps and 3-stage dq loops 2-3x slower (register spills).
    fwd_cands = [
        (128, 128, 8, 3), (128, 64, 8, 3), (128, 64, 4, 3), (64, 64, 4, 3), (128, 128, 8, 2), (128, 128, 4, 3),
        (64, 128, 4, 3), (128, 32, 4, 3),
    ]  # fmt: skip
    dq_cands = [
        (64, 64, 4, 2),
        (64, 32, 4, 2),
        (128, 64, 8, 2),
        (64, 64, 4, 3),
        (128, 128, 8, 2),
        (128, 64, 4, 2),
        (64, 128, 4, 2),
    ]
    dkv_cands = [
        (64, 64, 4, 3), (64, 64, 4, 2), (64, 128, 8, 2), (64, 128, 8, 3), (128, 128, 8, 2), (32, 64, 4, 3),
        (64, 128, 4, 3), (32, 128, 4, 3), (128, 64, 8, 2),
    ]  # fmt: skip
    # dq from stored dS (the stored-dS backward); dq_* tiles are timed on the recompute backward
    dqs_cands = [(128, 64, 4, 3), (64, 64, 4, 3), (64, 64, 4, 2), (128, 128, 8, 2), (64, 128, 4, 2)]
    res = []
    g = torch.Generator(device="cuda").manual_seed(0)
    q, do = (torch.randn(1, n, H, D, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(2))
    k, v = (torch.randn(1, n, Hkv, D, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(2))
    scale = D**-0.5
    tmas = (True, False) if args.tune_mask == "none" else (True,)  # masked cases: the default TMA loads only
    for (label, layout, kmask, density), tma in ((c, t) for c in tune_cases(args) for t in tmas):
        csr = CSR.from_layout(layout)
        block = layout.block_size
        base = replace(default_config(block, head_dim=D, banded=kmask.banded), tma=tma)
        out, lse = block_sparse_forward(q, k, v, csr, kmask, scale, base)
        if kmask.banded:  # attended pairs of the token mask (exact), not of the tiles
            flops = 4.0 * D * H * float(mask_pairs(kmask, n))
        else:
            flops = 4.0 * attended_pairs(layout, n) * D * H
        point = dict(case=label, block=block, density=density, tma=tma, heads=H, kv_heads=Hkv, head_dim=D)
        base_grads = block_sparse_backward(do, q, k, v, out, lse, csr, kmask, scale, base)
        for bm, bn, w, s in fwd_cands if "fwd" in args.tune_kernels else []:
            cfg = replace(base, fwd_m=bm, fwd_n=bn, fwd_warps=w, fwd_stages=s)
            if cfg.check(block):
                continue
            fn = lambda cfg=cfg, csr=csr, km=kmask: block_sparse_forward(q, k, v, csr, km, scale, cfg)  # noqa: E731
            ms, err = _time_or_error(fn)
            diff = _rel_diff(fn()[0], out) if not err else float("nan")
            res.append(
                dict(point, kernel="fwd", cfg=(bm, bn, w, s), ms=ms, tflops=flops / ms * 1e-9, err=err, diff=diff)
            )
            _print_tune_row(res[-1])
        for kind, cands in (("dq", dq_cands), ("dkv", dkv_cands), ("dqs", dqs_cands)):
            for bm, bn, w, s in cands if kind in args.tune_kernels else []:
                cfg = replace(base, **{f"{kind}_m": bm, f"{kind}_n": bn, f"{kind}_warps": w, f"{kind}_stages": s})
                if kind == "dq":
                    cfg = replace(cfg, ds_scratch_bytes=0)  # the recompute backward's dq kernel
                elif kind == "dqs" and kmask.banded:
                    continue  # token masks run the recompute backward: no dq from stored dS
                if cfg.check(block):
                    continue
                fn = lambda cfg=cfg, csr=csr, o=out, lse=lse, km=kmask: block_sparse_backward(  # noqa: E731
                    do, q, k, v, o, lse, csr, km, scale, cfg
                )
                ms, err = _time_or_error(fn)
                diff = max(_rel_diff(a, b) for a, b in zip(fn(), base_grads)) if not err else float("nan")
                res.append(
                    dict(
                        point,
                        kernel=f"bwd({kind} varied)",
                        cfg=(bm, bn, w, s),
                        ms=ms,
                        tflops=2.5 * flops / ms * 1e-9,
                        err=err,
                        diff=diff,
                    )
                )
                _print_tune_row(res[-1])
    return res


def _print_tune_row(r: dict) -> None:
    """One line of the --tune table (printed as it is measured: a sweep cut short keeps its lines).
    diff: max |result - default config's result| / max |default's|, over out or dq, dk, dv."""
    print(
        f"{r['kernel']:<18}{r['case']:<16}{r['heads']}/{r['kv_heads']}/{r['head_dim']:<8}{r['density']:>5.2f} "
        f"{r['tma']!s:<6} {r['cfg']!s:<20}{r['ms']:>9.3f}{r['tflops']:>9.1f} diff {r['diff']:.1e} {r['err']}",
        flush=True,
    )


def _rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp(min=1e-30))


def mask_pairs(kmask: Any, n: int) -> int:
    """Attended (query, key) pairs of a banded KernelMask without documents over N = Nq = Nk tokens."""
    i = torch.arange(n, dtype=torch.int64)
    lo = (i - kmask.left).clamp(min=0)
    hi = (i + kmask.right).clamp(max=n - 1)
    return int((hi - lo + 1).clamp(min=0).sum())


def _time_or_error(fn: Callable[[], Any]) -> tuple[float, str]:
    try:
        return bench_ms(fn, 10, 50), ""
    except Exception as exc:  # a config that does not compile or launch is a result of the sweep
        return float("nan"), str(exc)[:80]


def _clocks(row: dict) -> str:
    """Mean SM clocks (MHz) while cuDNN, ours and flex forward were timed ('-' where not recorded)."""
    mhz = row.get("sm_clock_mhz") or {}
    return " / ".join(f"{mhz[k]:.0f}" if mhz.get(k) else "-" for k in ("dense_fwd", "ours_fwd", "flex_fwd"))


def _timing_text(result: dict) -> str:
    if result.get("timing") == "per-point":
        return (
            "Median times (triton.testing.do_bench, budgets 50/300 ms warm-up/timed at 32K, 100/600 ms at 128K); "
            "cuDNN is timed at every point, right before ours and flex (fwd: cuDNN, ours, flex; then fwd+bwd), "
            "and speedups are vs that point's dense SDPA cuDNN; "
        )
    # earlier sweeps timed cuDNN once per N (their JSON has no "timing" key)
    return (
        "Median times (triton.testing.do_bench, budgets 50/300 ms warm-up/timed at 32K, 100/600 ms at 128K). "
        "Speedups are vs dense SDPA cuDNN measured in the same run; "
    )


def _report_suffix(value: str) -> str:
    """--suffix: letters, digits, '-' and '_' only (it becomes part of file names)."""
    if not re.fullmatch(r"[A-Za-z0-9_-]*", value):
        raise argparse.ArgumentTypeError(f"--suffix {value!r}: use letters, digits, '-' and '_' only")
    return value


def report_name(result: dict) -> str:
    """File stem of a sweep's report: sparse_<gpu> (sparse_h100, sparse_h200, ...), with the
    --suffix of a partial sweep (sparse_h200_<suffix>) so that it does not replace the full one."""
    suffix = result.get("report_suffix")
    return f"sparse_{gpu_tag(result['env']['gpu'])}" + (f"_{suffix}" if suffix else "")


def write_report(result: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    name = report_name(result)
    (out / f"{name}.json").write_text(json.dumps(result, indent=1))
    rows = result["rows"]
    env = result["env"]
    lines = [
        "# Block-sparse attention: Triton kernel vs FlexAttention vs dense cuDNN",
        "",
        f"GPU: {env['gpu']}; torch {env['torch']}; triton {env['triton']}; CUDA {env['cuda']}; "
        f"source {env.get('git_commit')}; bf16, B=1, H={env['heads']}, D={env['head_dim']}, layout blocks {env['block']}, non-causal. "
        + _timing_text(result)
        + "targets: fwd >= 0.8/density, fwd+bwd >= 0.7/density; 'vs flex' > 1 means faster than compiled "
        "FlexAttention (same tiles as full blocks).",
        "",
        "| N | pattern | density | ours fwd ms | flex fwd ms | cuDNN fwd ms | fwd speedup (target) | "
        "ours fwd+bwd ms | flex fwd+bwd ms | cuDNN fwd+bwd ms | fwd+bwd speedup (target) | vs flex fwd | "
        "vs flex fwd+bwd | ours fwd / fwd+bwd TF/s | layout build ms (% of fwd / of fwd+bwd) | "
        "flex BlockMask conv. ms | SM MHz fwd cuDNN / ours / flex | backward |",
        "|" + "---|" * 18,
    ]
    for r in rows:
        lines.append(
            f"| {r['n'] // 1024}K | {r['pattern']} | {r['density']:.3f} | {r['ours_fwd_ms']:.2f} | "
            f"{r['flex_fwd_ms']:.2f} | {r['dense_fwd_ms']:.2f} | {r['speedup_fwd']:.2f} ({r['target_fwd']:.2f}) | "
            f"{r['ours_fwdbwd_ms']:.2f} | {r['flex_fwdbwd_ms']:.2f} | {r['dense_fwdbwd_ms']:.2f} | "
            f"{r['speedup_fwdbwd']:.2f} ({r['target_fwdbwd']:.2f}) | {r['vs_flex_fwd']:.2f} | "
            f"{r['vs_flex_fwdbwd']:.2f} | {r['ours_fwd_tflops']:.0f} / {r['ours_fwdbwd_tflops']:.0f} | "
            f"{r['layout_build_ms']:.1f} ({r['layout_build_pct_of_fwd']:.1f}% / "
            f"{100 * r['layout_build_ms'] / r['ours_fwdbwd_ms']:.1f}%) | "
            f"{r['flex_blockmask_conversion_ms']:.1f} | {_clocks(r)} | {r.get('backward_form', '-')} |"
        )
    met = {
        "fwd speedup >= 0.8/density": sum(r["speedup_fwd"] >= r["target_fwd"] for r in rows),
        "fwd+bwd speedup >= 0.7/density": sum(r["speedup_fwdbwd"] >= r["target_fwdbwd"] for r in rows),
        "faster than flex (fwd)": sum(r["vs_flex_fwd"] > 1 for r in rows),
        "faster than flex (fwd+bwd)": sum(r["vs_flex_fwdbwd"] > 1 for r in rows),
    }
    big = [r for r in rows if r["n"] >= 131072]
    if big:
        met[f"128K layout build <= 2% of fwd (of {len(big)})"] = sum(r["layout_build_pct_of_fwd"] <= 2 for r in big)
        met[f"128K layout build <= 2% of fwd+bwd (of {len(big)})"] = sum(
            r["layout_build_ms"] <= 0.02 * r["ours_fwdbwd_ms"] for r in big
        )
    lines += [
        "",
        "Targets met (points out of " + str(len(rows)) + "): " + "; ".join(f"{k}: {v}" for k, v in met.items()),
    ]
    n_rounds = result.get("build_rounds", 1)
    rounds = f" in {n_rounds} rounds (before, between and after the attention timings)" if n_rounds > 1 else ""
    lines += [
        "",
        "Layout build in the table = pattern construction on the GPU (attn_sparse.patterns, device='cuda') + "
        f"transposed CSR, median of {result.get('build_reps', 5)} builds{rounds}: a one-time cost per layout (layouts are "
        "reused across calls and layers).",
        "",
        "## Layout build per pattern (built on the GPU with device= + transposed CSR; median of 7)",
        "",
        "| pattern | N | density | GPU build ms | CPU build + copy ms | equal to the CPU build |",
        "|---|---|---|---|---|---|",
    ]
    for b in result.get("layout_build", []):
        lines.append(
            f"| {b['pattern']} | {b['n']} | {b.get('density', float('nan')):.4f} | {b['build_ms']:.2f} | "
            f"{b.get('cpu_then_copy_ms', float('nan')):.2f} | {b.get('equal_to_cpu_build', '')} |"
        )
    if "flex_create_block_mask_ms" in result:
        lines += ["", f"FlexAttention create_block_mask (compiled, banded): {result['flex_create_block_mask_ms']}"]
    lines += ["", "## Recompilation", "", result.get("recompile_note", ""), "", "## bf16 correctness vs float64"]
    lines += ["", "| case | out err (baseline) | dq err | dk err | dv err | ok |", "|---|---|---|---|---|---|"]
    for c in result.get("correctness", []):
        lines.append(
            f"| N={c['n']} H={c['h']}/{c['hkv']} D={c['d']} {c['block']} causal={c['causal']} | "
            f"{c['out_err']:.2e} ({c['out_baseline_err']:.2e}) | {c['dq_err']:.2e} ({c['dq_baseline_err']:.2e}) | "
            f"{c['dk_err']:.2e} ({c['dk_baseline_err']:.2e}) | {c['dv_err']:.2e} ({c['dv_baseline_err']:.2e}) | "
            f"{c['ok']} |"
        )
    if result.get("notes"):
        lines += ["", "## Notes", ""] + [f"- {n}" for n in result["notes"]]
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, key, title in (
        (axes[0], "speedup_fwd", "forward"),
        (axes[1], "speedup_fwdbwd", "forward+backward"),
    ):
        for n in sorted({r["n"] for r in rows}):
            for pat, mk in (("local_window", "o"), ("bigbird", "s")):
                sel = sorted((r for r in rows if r["n"] == n and r["pattern"] == pat), key=lambda r: r["density"])
                if not sel:
                    continue
                x = [1 / r["density"] for r in sel]
                ax.plot(x, [r[key] for r in sel], marker=mk, label=f"ours {pat} {n // 1024}K")
                flex_key = "flex_fwd_ms" if key == "speedup_fwd" else "flex_fwdbwd_ms"
                dense_key = "dense_fwd_ms" if key == "speedup_fwd" else "dense_fwdbwd_ms"
                ax.plot(
                    x, [r[dense_key] / r[flex_key] for r in sel], marker=mk, ls=":", label=f"flex {pat} {n // 1024}K"
                )
        xs = sorted({1 / r["density"] for r in rows})
        ax.plot(xs, [x * (0.8 if key == "speedup_fwd" else 0.7) for x in xs], "k--", label="target")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("1 / density")
        ax.set_ylabel("speedup vs dense cuDNN")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
    axes[1].legend(fontsize=7)
    fig.suptitle(f"block-sparse attention, {env['gpu']}, bf16 H={env['heads']} D={env['head_dim']}")
    fig.savefig(out / f"{name}.png", dpi=110, bbox_inches="tight")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("bench-output"))
    ap.add_argument("--seq-lens", type=int, nargs="+", default=[32768, 131072])
    ap.add_argument("--densities", type=float, nargs="+", default=[1.0, 0.5, 0.25, 0.1, 0.05])
    ap.add_argument("--patterns", nargs="+", default=["local_window", "bigbird"])
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--block-q", type=int, default=128)
    ap.add_argument("--block-k", type=int, default=128)
    ap.add_argument("--quick", action="store_true", help="N=8K, densities 1.0 and 0.1")
    ap.add_argument(
        "--suffix",
        type=_report_suffix,
        default="",
        help="report file stem sparse_<gpu>_<suffix>, for a partial sweep (e.g. --seq-lens 32768 --densities 0.05)",
    )
    ap.add_argument("--tune", action="store_true", help="sweep kernel tile configs instead of the comparison")
    ap.add_argument("--tune-n", type=int, default=32768)
    ap.add_argument("--tune-densities", type=float, nargs="+", default=[1.0, 0.1])
    ap.add_argument("--tune-mask", choices=TUNE_MASKS, default="none", help="token mask of the tuned tiles")
    ap.add_argument("--tune-kv-heads", type=int, default=None, help="Hkv of the tuned case (default: --heads)")
    ap.add_argument(
        "--tune-kernels",
        nargs="+",
        choices=TUNE_KERNELS,
        default=list(TUNE_KERNELS),
        help="kernels whose tiles --tune varies: fwd, dq (recompute backward), dkv, dqs (dq from stored dS)",
    )
    ap.add_argument("--skip-correctness", action="store_true")
    ap.add_argument(
        "--render",
        type=Path,
        help="re-render the report (md, PNG) into --out from a saved JSON, e.g. after adding notes",
    )
    args = ap.parse_args()
    if args.render:
        write_report(json.loads(args.render.read_text()), args.out)
        return 0
    if not torch.cuda.is_available():
        print("bench_sparse.py needs a CUDA GPU", file=sys.stderr)
        return 2
    if args.quick:
        args.seq_lens, args.densities = [8192], [1.0, 0.1]
    env = gpu_env(heads=args.heads, head_dim=args.head_dim, block=[args.block_q, args.block_k])
    result: dict = {"env": env}
    if args.suffix:
        result["report_suffix"] = args.suffix
    if not args.skip_correctness:
        result["correctness"] = correctness("cuda")
        for c in result["correctness"]:
            print("correctness", {k: v for k, v in c.items() if k.endswith("err") or k == "ok"})
    if args.tune:
        result["tune"] = tune(args)
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "sparse_tune.json").write_text(json.dumps(result, indent=1))
        return 0
    before = kernel_cache_entries()
    result["timing"] = "per-point"
    result["build_reps"] = BUILD_REPS
    result["build_rounds"] = BUILD_ROUNDS
    args.out.mkdir(parents=True, exist_ok=True)
    partial = args.out / f"{report_name(result)}.partial.json"
    result.update(run_sweep(args, env, partial))
    grown = kernel_cache_entries() - before
    result["layout_build"] = layout_build_times("cuda")
    try:
        result["flex_create_block_mask_ms"] = {
            str(n): flex_create_block_mask_cost(n, "cuda") for n in sorted(set(args.seq_lens))
        }
    except Exception as exc:
        result["flex_create_block_mask_ms"] = f"failed: {type(exc).__name__}: {str(exc)[:200]}"
    variants = [r["triton_new_variants"] for r in result["rows"]]
    result["recompile_note"] = (
        f"Triton kernel variants compiled over the whole sweep: {grown} (per point: {variants}); "
        "after the first point, a changed pattern, density or N compiles nothing new when this is all zeros, "
        "except at the first point that uses the other backward form (stored dS / recompute: column 'backward'). "
        "Pattern-build kernels (bigbird's three, local_window's, the run expansion) compiled per point (each "
        f"compiles once, at the first build that uses it): {[r.get('build_new_variants', 0) for r in result['rows']]}. "
        f"Flex new dynamo graphs per point: {[r['flex_new_graphs'] for r in result['rows']]}."
    )
    write_report(result, args.out)
    partial.unlink(missing_ok=True)
    print((args.out / f"{report_name(result)}.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
