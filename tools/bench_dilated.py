"""Benchmark: attn_core dilated attention ("sdpa" backend) vs the common algorithm vs dense cuDNN (GPU only).

LongNet config segments [2048, 4096, 8192, 16384], rates [1, 2, 4, 8], H=16, bf16, B=1. For each
D, head_mode and N: ours forward / forward+backward (median of --reps after a warm-up, CUDA
events), the common open-source algorithm (tools/dilated_baselines.py) and dense SDPA pinned to
cuDNN, all in this process on this GPU. Effective TFLOP/s = 4 * D * attended (query, key) pairs
(fwd; fwd+bwd counts 3.5x), pairs counted per group as computed; dense counts N^2 per head.
Peak extra memory = torch.cuda.max_memory_allocated minus inputs, outputs and gradients.
First a bf16/fp16 correctness check on fresh random inputs against the float64 reference
(the 2x rule of attn_core.testing) on a scaled-down config with odd N, GQA and padding.

    source tools/srcpath.sh && python tools/bench_dilated.py [--quick] [--out docs/benchmarks]
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dilated_baselines import LABEL as COMMON_LABEL
from dilated_baselines import common_attended_pairs, common_dilated_attention

SEGMENTS = [2048, 4096, 8192, 16384]
RATES = [1, 2, 4, 8]
H = 16
GIB = 1024**3


def parse_n(text: str) -> list[int]:
    out = []
    for tok in text.split(","):
        tok = tok.strip().upper()
        mult = 1024 * 1024 if tok.endswith("M") else 1024 if tok.endswith("K") else 1
        out.append(int(tok.rstrip("KM")) * mult)
    return out


def fmt_n(n: int) -> str:
    return f"{n // (1024 * 1024)}M" if n % (1024 * 1024) == 0 else f"{n // 1024}K"


def our_pairs(n: int, h: int, mode: str, causal: bool = False) -> int:
    """(query, key) pairs the sdpa backend computes, summed over groups (per batch row)."""
    from attn_core.config import DilatedConfig

    cfg = DilatedConfig(SEGMENTS, RATES, mode)
    total = 0
    for g, (w, r) in enumerate(zip(SEGMENTS, RATES)):
        full, tail = divmod(n, w)
        for j in cfg.heads_for_group(g, h):
            o = cfg.head_offset(g, j)
            for seglen, count in ((w, full), (tail, 1 if tail else 0)):
                rows = max(0, -(-(seglen - o) // r))
                total += count * (rows * (rows + 1) // 2 if causal else rows * rows)
    return total


def cuda_time(fn: Any, reps: int) -> float:
    """Median ms of fn() over reps runs after one warm-up (CUDA events)."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def peak_extra(fn: Any, known_bytes: int) -> float:
    """GiB allocated at peak during fn() beyond what was allocated before and the ``known_bytes`` it returns."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    res = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    del res
    return (peak - before - known_bytes) / GIB


def correctness(dev: str) -> list[dict[str, Any]]:
    from attn_core import reference
    from attn_core.api import dilated_attention, explain
    from attn_core.testing import assert_close_to_reference, max_abs_error

    seg, rates, n = [256, 512, 1024, 2048], [1, 2, 4, 8], 3000  # odd N: short last segments everywhere
    rows = []
    cases = []
    for d in (64, 128):
        for mode in ("all", "split"):
            for causal in (False, True):
                cases.append((torch.bfloat16, d, 4 if causal else 16, mode, causal, False))  # GQA 4:1 when causal
    cases += [(torch.float16, 128, 4, "all", True, True), (torch.bfloat16, 64, 8, "split", False, True)]
    for dtype, d, hkv, mode, causal, pad in cases:
        g = torch.Generator(device=dev).manual_seed(len(rows) + 1)
        q = torch.randn(1, n, H, d, device=dev, generator=g).to(dtype).requires_grad_()
        k = torch.randn(1, n, hkv, d, device=dev, generator=g).to(dtype).requires_grad_()
        v = torch.randn(1, n, hkv, d, device=dev, generator=g).to(dtype).requires_grad_()
        mask = None
        if pad:
            mask = torch.rand(1, n, device=dev, generator=g) < 0.25
            mask[:, :300] = True
        go = torch.randn(1, n, H, d, device=dev, generator=g)
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


def profile_split(dev: str, n: int, d: int, mode: str) -> dict[str, float]:
    """Share of GPU kernel time in attention kernels vs merge vs copies/adds/fills for one fwd+bwd."""
    from torch.profiler import ProfilerActivity, profile

    from attn_core.api import dilated_attention

    q, k, v = (torch.randn(1, n, H, d, device=dev, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    go = torch.randn_like(q)

    def run() -> None:
        out = dilated_attention(q, k, v, SEGMENTS, RATES, head_mode=mode, backend="sdpa")
        torch.autograd.grad(out, (q, k, v), go)

    run()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        run()
        torch.cuda.synchronize()
    cats: dict[str, float] = {"attention": 0.0, "merge": 0.0, "copy/add/fill": 0.0, "other": 0.0}
    for ev in prof.key_averages():
        t = float(getattr(ev, "self_device_time_total", 0.0) or getattr(ev, "self_cuda_time_total", 0.0))
        name = ev.key.lower()
        if "_merge" in name:
            cats["merge"] += t
        elif any(s in name for s in ("cudnn", "fmha", "flash", "sm90", "sm80", "attn", "sdpa")):
            cats["attention"] += t
        elif any(s in name for s in ("copy", "elementwise", "fill", "add", "vectorized", "where")):
            cats["copy/add/fill"] += t
        else:
            cats["other"] += t
    total = sum(cats.values()) or 1.0
    return {k: v / total for k, v in cats.items()} | {"total_ms": total / 1e3}


def _ours(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mode: str, go: torch.Tensor | None) -> Any:
    from attn_core.api import dilated_attention

    if go is None:
        with torch.no_grad():
            return dilated_attention(q, k, v, SEGMENTS, RATES, head_mode=mode, backend="sdpa")
    out = dilated_attention(q, k, v, SEGMENTS, RATES, head_mode=mode, backend="sdpa")
    return (out, *torch.autograd.grad(out, (q, k, v), go))


def _common(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, go: torch.Tensor | None) -> Any:
    if go is None:
        with torch.no_grad():
            return common_dilated_attention(q, k, v, SEGMENTS, RATES)
    out = common_dilated_attention(q, k, v, SEGMENTS, RATES)
    return (out, *torch.autograd.grad(out, (q, k, v), go))


def _dense(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, go: torch.Tensor | None) -> Any:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        if go is None:
            with torch.no_grad():
                return torch.nn.functional.scaled_dot_product_attention(q, k, v)
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        return (out, *torch.autograd.grad(out, (q, k, v), go))


def sweep_point(
    d: int,
    mode: str,
    n: int,
    reps: int,
    run_common: bool,
    run_dense: bool,
    common: dict[tuple[int, int], dict[str, Any]],
    dense: dict[tuple[int, int], dict[str, float]],
) -> dict[str, Any]:
    """One (D, mode, N) point: ours, the common algorithm (cached per (D, N)) and dense cuDNN (cached per (D, N))."""
    from functools import partial

    from attn_core.api import explain

    dev = "cuda"
    row: dict[str, Any] = dict(D=d, mode=mode, N=n)
    q, k, v = (torch.randn(1, n, H, d, device=dev, dtype=torch.bfloat16) for _ in range(3))
    go = torch.randn_like(q)
    tensor_bytes = q.numel() * q.element_size()
    row["allowed_tensors_gib"] = 8 * tensor_bytes / GIB  # q, k, v, o and their gradients
    grads = [t.detach().requires_grad_() for t in (q, k, v)]
    try:
        row["backend"] = explain(q, k, v, SEGMENTS, RATES, head_mode=mode).backend
        fl = 4.0 * d * our_pairs(n, H, mode)
        fwd, fb = partial(_ours, q, k, v, mode, None), partial(_ours, *grads, mode, go)
        row["ours_fwd_ms"] = cuda_time(fwd, reps)
        row["ours_fb_ms"] = cuda_time(fb, reps)
        row["ours_fwd_tflops"] = fl / row["ours_fwd_ms"] / 1e9
        row["ours_fb_tflops"] = 3.5 * fl / row["ours_fb_ms"] / 1e9
        row["ours_fwd_extra_gib"] = peak_extra(fwd, tensor_bytes)
        row["ours_fb_extra_gib"] = peak_extra(fb, 4 * tensor_bytes)
    except torch.cuda.OutOfMemoryError:
        row["ours_error"] = "OOM"
    torch.cuda.empty_cache()
    if run_common and "ours_error" not in row and (d, n) not in common:
        # the common algorithm has one form (heads split over groups): measured once per (D, N)
        rec: dict[str, Any] = {}
        try:
            cfl = 4.0 * d * common_attended_pairs(n, H, SEGMENTS, RATES)
            fwd, fb = partial(_common, q, k, v, None), partial(_common, *grads, go)
            rec["common_fwd_ms"] = cuda_time(fwd, reps)
            rec["common_fb_ms"] = cuda_time(fb, reps)
            rec["common_fwd_tflops"] = cfl / rec["common_fwd_ms"] / 1e9
            rec["common_fb_tflops"] = 3.5 * cfl / rec["common_fb_ms"] / 1e9
            rec["common_fb_extra_gib"] = peak_extra(fb, 4 * tensor_bytes)
        except torch.cuda.OutOfMemoryError:
            rec = {"common_error": "OOM"}
        common[(d, n)] = rec
        torch.cuda.empty_cache()
    row.update(common.get((d, n), {}))
    if run_dense and (d, n) not in dense:
        qd, kd, vd = (t.detach().transpose(1, 2).contiguous().requires_grad_() for t in (q, k, v))
        god = go.transpose(1, 2).contiguous()
        dfl = 4.0 * d * n * n * H
        tf = cuda_time(partial(_dense, qd, kd, vd, None), reps)
        tfb = cuda_time(partial(_dense, qd, kd, vd, god), reps)
        dense[(d, n)] = dict(fwd_ms=tf, fb_ms=tfb, fwd_tflops=dfl / tf / 1e9, fb_tflops=3.5 * dfl / tfb / 1e9)
    # dense reference rate: same N when measured, else the largest dense N measured for this D
    dn = [m for (dd, m) in dense if dd == d]
    if dn:
        ref_n = n if (d, n) in dense else max(dn)
        row["dense_n"] = ref_n
        row["dense_fwd_tflops"] = dense[(d, ref_n)]["fwd_tflops"]
        row["dense_fb_tflops"] = dense[(d, ref_n)]["fb_tflops"]
        if "ours_fb_tflops" in row:
            row["ours_vs_dense_fb"] = row["ours_fb_tflops"] / row["dense_fb_tflops"]
    if "common_fb_ms" in row and "ours_fb_ms" in row:
        row["speedup_fwd"] = row["ours_fwd_tflops"] / row["common_fwd_tflops"]
        row["speedup_fb"] = row["ours_fb_tflops"] / row["common_fb_tflops"]
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", default="16K,32K,64K,128K,256K,512K,1M,2M")
    ap.add_argument("--d", default="64,128")
    ap.add_argument("--modes", default="split,all")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--dense-max-n", default="128K", help="largest N for dense cuDNN")
    ap.add_argument("--common-max-n", default="2M", help="largest N for the common algorithm")
    ap.add_argument("--fit", action="store_true", help="also check N=2M fwd+bwd and N=4M fwd-only fit (D=128)")
    ap.add_argument("--profile", action="store_true", help="kernel-time split at N=256K, D=128, both modes")
    ap.add_argument("--no-check", action="store_true")
    ap.add_argument("--quick", action="store_true", help="N=16K,64K, D=128, 1 rep")
    ap.add_argument("--out", type=Path, default=Path("docs/benchmarks"))
    ap.add_argument("--name", default="dilated_h100")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench_dilated.py needs a CUDA GPU; none is visible")
        return 1
    if args.quick:
        args.n, args.d, args.reps = "16K,64K", "128", 1
    import triton
    from tqdm import tqdm

    from attn_core.api import dilated_attention

    dev = "cuda"
    args.out.mkdir(parents=True, exist_ok=True)
    env = dict(
        gpu=torch.cuda.get_device_name(), torch=torch.__version__, cuda=torch.version.cuda,
        cudnn=torch.backends.cudnn.version(), triton=triton.__version__, python=platform.python_version(),
        date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    )  # fmt: skip
    print(env)
    result: dict[str, Any] = dict(env=env, config=dict(segments=SEGMENTS, rates=RATES, H=H, B=1, dtype="bfloat16"))
    result["common_label"] = COMMON_LABEL

    if not args.no_check:
        checks = correctness(dev)
        result["correctness"] = checks
        bad = [c for c in checks if not c["ok"]]
        print(f"correctness: {len(checks) - len(bad)}/{len(checks)} pass (bf16/fp16 vs float64, 2x rule)")
        for c in bad:
            print("  FAIL", c)

    if args.fit:
        fit = []
        for mode in ("split", "all"):
            for n, fwd_only in ((2 * 1024 * 1024, False), (4 * 1024 * 1024, True)):
                torch.cuda.empty_cache()
                rec: dict[str, Any] = dict(mode=mode, N=n, D=128, fwd_only=fwd_only)
                try:
                    q, k, v = (torch.randn(1, n, H, 128, device=dev, dtype=torch.bfloat16) for _ in range(3))
                    tb = q.numel() * q.element_size()
                    if fwd_only:
                        with torch.no_grad():
                            torch.cuda.reset_peak_memory_stats()
                            t0 = time.perf_counter()
                            out = dilated_attention(q, k, v, SEGMENTS, RATES, head_mode=mode, backend="sdpa")
                            torch.cuda.synchronize()
                            rec["ms"] = (time.perf_counter() - t0) * 1e3
                            del out
                    else:
                        for t in (q, k, v):
                            t.requires_grad_()
                        torch.cuda.reset_peak_memory_stats()
                        t0 = time.perf_counter()
                        out = dilated_attention(q, k, v, SEGMENTS, RATES, head_mode=mode, backend="sdpa")
                        gr = torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
                        torch.cuda.synchronize()
                        rec["ms"] = (time.perf_counter() - t0) * 1e3
                        del out, gr
                    rec["peak_gib"] = torch.cuda.max_memory_allocated() / GIB
                    rec["tensor_gib"] = tb / GIB
                    rec["ok"] = True
                    del q, k, v
                except torch.cuda.OutOfMemoryError:
                    rec["ok"] = False
                    rec["error"] = "OOM"
                fit.append(rec)
                print("fit", rec)
        result["fit"] = fit

    if args.profile:
        result["profile"] = {}
        for mode in ("split", "all"):
            torch.cuda.empty_cache()
            result["profile"][mode] = profile_split(dev, 256 * 1024, 128, mode)
            print("profile N=256K D=128", mode, result["profile"][mode])

    ns, ds, modes = parse_n(args.n), [int(x) for x in args.d.split(",")], args.modes.split(",")
    dense_max, common_max = parse_n(args.dense_max_n)[0], parse_n(args.common_max_n)[0]
    rows: list[dict[str, Any]] = []
    dense: dict[tuple[int, int], dict[str, float]] = {}
    common: dict[tuple[int, int], dict[str, Any]] = {}
    jobs = [(d, mode, n) for d in ds for mode in modes for n in ns]
    for d, mode, n in tqdm(jobs, desc="dilated sweep", file=sys.stderr):
        torch.cuda.empty_cache()
        rows.append(sweep_point(d, mode, n, args.reps, n <= common_max, n <= dense_max, common, dense))
        result["rows"] = rows  # saved after every point: a late failure keeps what was measured
        (args.out / f"{args.name}.json").write_text(json.dumps(result, indent=1))
    result["rows"] = rows
    result["dense"] = [dict(D=d, N=n, **v) for (d, n), v in sorted(dense.items())]

    (args.out / f"{args.name}.json").write_text(json.dumps(result, indent=1))
    md = render_markdown(result)
    (args.out / f"{args.name}.md").write_text(md)
    plot(result, args.out / f"{args.name}.png")
    print(md)
    return 0


def _f(x: Any, spec: str = ".1f") -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def render_markdown(res: dict[str, Any]) -> str:
    env = res["env"]
    lines = [
        f"# Dilated attention, {env['gpu']}",
        "",
        f"torch {env['torch']} (CUDA {env['cuda']}, cuDNN {env['cudnn']}), triton {env['triton']}, "
        f"python {env['python']}, {env['date']}. Config segments {SEGMENTS}, rates {RATES}, H={H}, B=1, bf16.",
        'Ours = attn_core backend "sdpa" (cuDNN on strided views, fused LSE merge, exact backward). '
        f"Common = {res['common_label']}. Dense = SDPA pinned to cuDNN (rate taken at N or the largest dense N run).",
        "Eff. TFLOP/s = 4*D*pairs (fwd), 3.5x for fwd+bwd; pairs counted per group as computed. "
        "Extra = peak allocated beyond q, k, v, o (+ their grads for fwd+bwd).",
        "",
        "| D | mode | N | ours fwd ms (TF/s) | ours fwd+bwd ms (TF/s) | common fwd ms (TF/s) | common fwd+bwd ms (TF/s) "
        "| fwd x | fwd+bwd x | ours/dense fwd+bwd | ours extra fwd / fwd+bwd GiB (% of q,k,v,o+grads) | common extra GiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in res["rows"]:
        if "ours_error" in r:
            lines.append(f"| {r['D']} | {r['mode']} | {fmt_n(r['N'])} | {r['ours_error']} |||||||||")
            continue
        common_fwd = (
            f"{_f(r.get('common_fwd_ms'))} ({_f(r.get('common_fwd_tflops'), '.0f')})"
            if "common_fwd_ms" in r
            else r.get("common_error", "-")
        )
        common_fb = (
            f"{_f(r.get('common_fb_ms'))} ({_f(r.get('common_fb_tflops'), '.0f')})"
            if "common_fb_ms" in r
            else r.get("common_error", "-")
        )
        pct = 100 * r["ours_fb_extra_gib"] / r["allowed_tensors_gib"]
        lines.append(
            f"| {r['D']} | {r['mode']} | {fmt_n(r['N'])} | {_f(r['ours_fwd_ms'], '.2f')} ({_f(r['ours_fwd_tflops'], '.0f')}) "
            f"| {_f(r['ours_fb_ms'], '.2f')} ({_f(r['ours_fb_tflops'], '.0f')}) | {common_fwd} | {common_fb} "
            f"| {_f(r.get('speedup_fwd'), '.2f')} | {_f(r.get('speedup_fb'), '.2f')} | {_f(r.get('ours_vs_dense_fb'), '.2f')} "
            f"| {_f(r['ours_fwd_extra_gib'], '.2f')} / {_f(r['ours_fb_extra_gib'], '.2f')} ({pct:.1f}%) "
            f"| {_f(r.get('common_fb_extra_gib'), '.1f')} |"
        )
    lines += ["", "Dense cuDNN (same run):", "", "| D | N | fwd TF/s | fwd+bwd TF/s |", "|---|---|---|---|"]
    for dn in res["dense"]:
        lines.append(f"| {dn['D']} | {fmt_n(dn['N'])} | {dn['fwd_tflops']:.0f} | {dn['fb_tflops']:.0f} |")
    if res.get("fit"):
        lines += [
            "",
            "Fit on the card (D=128):",
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
        lines += ["", "GPU kernel time split, one fwd+bwd, N=256K, D=128:", ""]
        for mode, p in res["profile"].items():
            parts = ", ".join(f"{k} {100 * v:.1f}%" for k, v in p.items() if k != "total_ms")
            lines.append(f"- {mode}: {parts} (total {p['total_ms']:.1f} ms)")
    if res.get("correctness"):
        ok = sum(c["ok"] for c in res["correctness"])
        worst = max(res["correctness"], key=lambda c: c["dq_err"] / max(c["dq_plain_err"], 1e-30))
        lines += [
            "",
            f"Correctness on the GPU: {ok}/{len(res['correctness'])} cases pass the 2x rule (bf16/fp16 outputs and "
            "dq/dk/dv vs float64 reference; N=3000, segments [256..2048], GQA, causal, padding, both modes). "
            f"Worst dq error ratio vs plain PyTorch: {worst['dq_err'] / max(worst['dq_plain_err'], 1e-30):.2f}.",
        ]
    return "\n".join(lines) + "\n"


def plot(res: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted({(r["D"], r["mode"]) for r in res["rows"]})
    fig, axes = plt.subplots(1, max(len(keys), 1), figsize=(5 * max(len(keys), 1), 4), squeeze=False)
    for ax, (d, mode) in zip(axes[0], keys):
        rs = [r for r in res["rows"] if r["D"] == d and r["mode"] == mode and "ours_fb_tflops" in r]
        ns = [r["N"] for r in rs]
        ax.plot(ns, [r["ours_fb_tflops"] for r in rs], "o-", label="ours fwd+bwd")
        ax.plot(ns, [r["ours_fwd_tflops"] for r in rs], "o--", label="ours fwd")
        cs = [r for r in rs if "common_fb_tflops" in r]
        ax.plot([r["N"] for r in cs], [r["common_fb_tflops"] for r in cs], "s-", label="common fwd+bwd")
        ax.plot([r["N"] for r in cs], [r["common_fwd_tflops"] for r in cs], "s--", label="common fwd")
        dn = [x for x in res["dense"] if x["D"] == d]
        if dn:
            ax.axhline(max(x["fb_tflops"] for x in dn), color="gray", ls=":", label="dense cuDNN fwd+bwd")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("N")
        ax.set_ylabel("effective TFLOP/s")
        ax.set_title(f"D={d}, head_mode={mode}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"Dilated attention, {res['env']['gpu']}, bf16, H={H}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    raise SystemExit(main())
