"""Block-sparse attention on the shapes LLMs train with: causal, GQA, head dim 64/128, exact token masks.

The LLM-shaped companion of tools/bench_sparse.py (which sweeps the non-causal local_window /
bigbird patterns). One GPU, bf16, B=1; for each N, (H, Hkv, D) and mask, in one process side by side:
  - ours: attn_sparse.block_sparse_attention(q, k, v, None, is_causal=..., window_size=...,
    cu_seqlens=...) with backend="auto" (tiles derived from the masks); the backend it picked is
    recorded, and where that is not "triton" the Triton kernel is timed too (columns "triton");
  - FlexAttention (the anchor): flex_attention compiled, with a BlockMask from create_block_mask
    (compiled) of the EXACT mask_mod (causal & window & same document);
  - dense SDPA cuDNN, causal (on the fully causal points: the bar for "fully causal").
Masks: causal; causal + window 4096; causal + window 1024; causal packed documents (lengths from a
fixed-seed log-normal, mean 4K, clipped to 64..32K). Effective TFLOP/s count 4 * D * H per attended
(query, key) pair (exact token pairs) for the forward, 3.5x that for forward+backward. Also: the
tile derivation time of layout=None (uncached) as % of our forward, and bf16 correctness at small N
against the float64 reference. Writes JSON + markdown + PNG to --out.
The tile derivation (derive_times): uncached ms (the first layer of a packed-documents step),
cached ms (the later layers) and the device syncs of one uncached derivation; --derive-only
times it alone, on the CPU too (a stand-in for the host work), for the first --configs entry.

    source tools/srcpath.sh && python tools/bench_sparse_masks.py --out docs/benchmarks
    python tools/bench_sparse_masks.py --quick      # N=8K, two configs, two masks
    python tools/bench_sparse_masks.py --derive-only --device cpu
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_env import gpu_env, gpu_tag

CONFIGS = ((32, 8, 128), (16, 16, 64), (64, 8, 128))
MASKS = ("causal", "causal+win4096", "causal+win1024", "causal+docs")
DOC_MEAN, DOC_MIN, DOC_MAX = 4096, 64, 32768


def document_offsets(n: int, seed: int = 0) -> torch.Tensor:
    """cu_seqlens (int32) of documents filling n tokens: log-normal lengths (mean DOC_MEAN), clipped."""
    g = torch.Generator().manual_seed(seed)
    sigma = 1.0
    mu = math.log(DOC_MEAN) - sigma**2 / 2
    lengths: list[int] = []
    while sum(lengths) < n:
        x = float(torch.empty(1).log_normal_(mu, sigma, generator=g))
        lengths.append(int(min(max(x, DOC_MIN), DOC_MAX)))
    lengths[-1] -= sum(lengths) - n
    if lengths[-1] <= 0:
        lengths.pop()
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)


def mask_args(name: str, n: int) -> dict[str, Any]:
    """Keyword arguments of block_sparse_attention for a mask name."""
    args: dict[str, Any] = {"is_causal": True}
    if name.startswith("causal+win"):
        args["window_size"] = (int(name.removeprefix("causal+win")) - 1, 0)  # the query and W - 1 keys before it
    elif name == "causal+docs":
        args["cu_seqlens"] = document_offsets(n)
    elif name != "causal":
        raise ValueError(f"mask {name!r}; allowed: {MASKS}")
    return args


def flex_mask_mod(args: dict[str, Any], n: int, device: str) -> Callable[..., Any]:
    """The exact mask_mod of a mask: causal & window & same document."""
    left = args.get("window_size", (-1, 0))[0]
    cu = args.get("cu_seqlens")
    doc = None
    if cu is not None:
        cu = cu.cpu()
        doc = torch.repeat_interleave(torch.arange(cu.numel() - 1), (cu[1:] - cu[:-1]).long()).to(device)

    def mask_mod(b: Any, h: Any, q_idx: Any, kv_idx: Any) -> Any:
        keep = kv_idx <= q_idx
        if left >= 0:
            keep = keep & (q_idx - kv_idx <= left)
        if doc is not None:
            keep = keep & (doc[q_idx] == doc[kv_idx])
        return keep

    return mask_mod


def attended_pairs(args: dict[str, Any], n: int) -> int:
    from attn_sparse.masks import TokenMask

    mask = TokenMask.build(
        is_causal=args["is_causal"], window_size=args.get("window_size"), cu_seqlens=args.get("cu_seqlens"),
        batch=1, seq_len_q=n, seq_len_k=n, device=torch.device("cpu"),
    )  # fmt: skip
    lo, hi = mask.key_intervals(n, n)
    return int((hi - lo + 1).clamp(min=0).sum())


def bench_ms(fn: Callable[[], object], warmup: int, rep: int, grads: list[torch.Tensor] | None = None) -> float:
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=warmup, rep=rep, grad_to_none=grads, return_mode="median"))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _derive(args: dict[str, Any], n: int, heads: int, kv_heads: int, device: torch.device) -> None:
    """What a layout=None call derives from its masks before its kernels launch: the validated mask,
    the layout (with its transposed CSR), the launch tables of the forward / dq kernels (rows) and
    of the dk/dv kernel (columns; masked calls take the recompute backward: no dS chunk plan), and
    the per-token document bounds."""
    from attn_sparse.api import DERIVED_BLOCK_SIZE
    from attn_sparse.kernels import CSR
    from attn_sparse.masks import TokenMask

    mask = TokenMask.build(
        is_causal=args["is_causal"], window_size=args.get("window_size"), cu_seqlens=args.get("cu_seqlens"),
        batch=1, seq_len_q=n, seq_len_k=n, device=device,
    )  # fmt: skip
    csr = CSR.from_layout(mask.layout(n, n, DERIVED_BLOCK_SIZE, device))
    csr.row_table(1, heads)
    csr.column_order(1, kv_heads, heads // kv_heads)
    mask.document_bounds(n)


def derive_times(
    args: dict[str, Any], n: int, heads: int, kv_heads: int, device: torch.device, reps: int = 20
) -> dict[str, Any]:
    """Host time of the tile derivation of a layout=None call (:func:`_derive`), median ms over reps:

    - derive_ms: uncached (caches cleared and a new cu_seqlens tensor each rep, as at the first
      layer of a packed-documents step, or the first call with a window);
    - derive_cached_ms: again with the same arguments (what the later layers of a step pay);
    - derive_syncs (CUDA): device synchronisations of one uncached derivation, counted by
      torch.cuda's sync debug mode (each waits for all the work queued before it).
    """
    from attn_sparse import masks as masks_mod

    def timed(fresh: bool) -> float:
        call = {**args, "cu_seqlens": args["cu_seqlens"].clone()} if fresh and "cu_seqlens" in args else args
        if fresh:
            masks_mod.clear_derived_layouts()
        _sync(device)
        t0 = time.perf_counter()
        _derive(call, n, heads, kv_heads, device)
        _sync(device)
        return (time.perf_counter() - t0) * 1e3

    def median(values: list[float]) -> float:
        return sorted(values)[len(values) // 2]

    timed(True)  # imports, first allocations
    out: dict[str, Any] = {"derive_ms": median([timed(True) for _ in range(reps)])}
    out["derive_cached_ms"] = median([timed(False) for _ in range(reps)])
    if device.type == "cuda":
        masks_mod.clear_derived_layouts()
        call = {**args, "cu_seqlens": args["cu_seqlens"].clone()} if "cu_seqlens" in args else args
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                _derive(call, n, heads, kv_heads, device)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        out["derive_syncs"] = sum("synchroniz" in str(w.message) for w in caught)
    return out


def derive_table(rows: list[dict]) -> str:
    head = "| N | H/Hkv | mask | device | nnz tiles | derive ms (uncached) | derive ms (cached) | device syncs |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        lines.append(
            f"| {r['n'] // 1024}K | {r['heads']}/{r['kv_heads']} | {r['mask']} | {r['device']} | {r['nnz']} | "
            f"{r['derive_ms']:.3f} | {r['derive_cached_ms']:.3f} | {r.get('derive_syncs', '')} |"
        )
    return "\n".join(lines)


def derive_only(seq_lens: list[int], configs: list[tuple[int, ...]], names: list[str], device: torch.device) -> int:
    """--derive-only: the derivation timings alone, on any device (the CPU stands in for the host)."""
    from attn_sparse.api import DERIVED_BLOCK_SIZE
    from attn_sparse.masks import TokenMask

    rows = []
    for n in seq_lens:
        for h, hkv, _ in configs:
            for name in names:
                args = mask_args(name, n)
                if "cu_seqlens" in args:
                    args["cu_seqlens"] = args["cu_seqlens"].to(device)
                mask = TokenMask.build(**args, batch=1, seq_len_q=n, seq_len_k=n, device=device)
                nnz = mask.layout(n, n, DERIVED_BLOCK_SIZE, device).nnz
                row = dict(n=n, heads=h, kv_heads=hkv, mask=name, device=str(device), nnz=nnz)
                row.update(derive_times(args, n, h, hkv, device))
                rows.append(row)
                print(derive_table([row]).splitlines()[-1], flush=True)
    print(derive_table(rows))
    return 0


def grads_of(fn: Callable[..., torch.Tensor], inputs: tuple[torch.Tensor, ...], do: torch.Tensor) -> list[torch.Tensor]:
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*leaves)
    out.backward(do.to(out.dtype))
    return [out.detach(), *(t.grad for t in leaves)]  # type: ignore[misc]


def correctness() -> list[dict]:
    """bf16 on the GPU vs float64 (out and grads) under the 2x-of-plain-PyTorch rule, every mask."""
    from functools import partial

    from attn_core.reference import dense_attention
    from attn_core.testing import assert_close_to_reference
    from attn_sparse import block_sparse_attention

    rows = []
    # every mask on the triton backend (small windows), then fully causal calls on the sdpa backend
    cases = [(cfg, name.replace("4096", "300").replace("1024", "100"), 1000, "triton")
             for cfg, name in zip(CONFIGS + CONFIGS[:1], MASKS)]  # fmt: skip
    cases += [(CONFIGS[0], "causal", 1000, "sdpa"), (CONFIGS[2], "causal", 3001, "sdpa")]
    for (h, hkv, d), name, n, backend in cases:
        args = mask_args(name, n)
        if "cu_seqlens" in args:  # a 1-token document, one longer than a tile, an odd tail
            args["cu_seqlens"] = torch.tensor([0, 1, 130, 131, 600, n], dtype=torch.int32, device="cuda")
        g = torch.Generator(device="cuda").manual_seed(len(rows))
        q = torch.randn(1, n, h, d, device="cuda", generator=g, dtype=torch.bfloat16)
        k = torch.randn(1, n, hkv, d, device="cuda", generator=g, dtype=torch.bfloat16)
        v = torch.randn(1, n, hkv, d, device="cuda", generator=g, dtype=torch.bfloat16)
        do = torch.randn(1, n, h, d, device="cuda", generator=g, dtype=torch.bfloat16)
        ours = grads_of(partial(block_sparse_attention, layout=None, backend=backend, **args), (q, k, v), do)
        ref = grads_of(
            lambda *t, a=args: dense_attention(*t, dtype=torch.float64, **a)[0],
            (q.double(), k.double(), v.double()),
            do,
        )
        base = grads_of(lambda *t, a=args: dense_attention(*t, dtype=torch.bfloat16, **a)[0], (q, k, v), do)
        ok = True
        for what, a, r, b in zip(("out", "dq", "dk", "dv"), ours, ref, base):
            try:
                assert_close_to_reference(f"{name} {what}", a, r, b)
            except AssertionError as e:
                ok = False
                print(f"correctness FAILED H={h}/{hkv} D={d}: {e}")
        rows.append(dict(mask=name, n=n, backend=backend, heads=h, kv_heads=hkv, head_dim=d, passed=ok))
    return rows


def measure_point(n: int, cfg: tuple[int, int, int], name: str, warmup: int, rep: int) -> dict:
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    from attn_sparse import block_sparse_attention, explain

    h, hkv, d = cfg
    args = mask_args(name, n)
    if "cu_seqlens" in args:
        args["cu_seqlens"] = args["cu_seqlens"].cuda()
    g = torch.Generator(device="cuda").manual_seed(n + h + d)
    q = torch.randn(1, n, h, d, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
    k = torch.randn(1, n, hkv, d, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
    v = torch.randn(1, n, hkv, d, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
    do = torch.randn(1, n, h, d, device="cuda", dtype=torch.bfloat16, generator=g)
    pairs = attended_pairs({**args, "cu_seqlens": args["cu_seqlens"].cpu()} if "cu_seqlens" in args else args, n)
    fwd_flop = 4.0 * d * h * pairs

    picked = explain(q, k, v, None, **args).backend
    row: dict[str, Any] = dict(n=n, heads=h, kv_heads=hkv, head_dim=d, mask=name, pairs=pairs, backend=picked)
    timed = [("ours", "auto")] + ([("triton", "triton")] if picked != "triton" else [])
    for who, backend in timed:

        def run(backend: str = backend) -> torch.Tensor:
            return block_sparse_attention(q, k, v, None, backend=backend, **args)

        row[f"{who}_fwd_ms"] = bench_ms(run, warmup, rep)
        row[f"{who}_fb_ms"] = bench_ms(lambda run=run: run().backward(do), warmup, rep, [q, k, v])

    qt, kt, vt = (t.detach().transpose(1, 2).contiguous().requires_grad_() for t in (q, k, v))
    dot = do.transpose(1, 2).contiguous()
    t0 = time.perf_counter()
    block_mask = create_block_mask(flex_mask_mod(args, n, "cuda"), 1, 1, n, n, device="cuda", _compile=True)
    torch.cuda.synchronize()
    row["flex_mask_first_ms"] = (time.perf_counter() - t0) * 1e3
    # a fresh compile per point: flex_attention's compiled code is cached per function, and past
    # dynamo's recompile limit a new shape would run flex eagerly (the dense math, N^2 memory)
    torch._dynamo.reset()
    flex = torch.compile(flex_attention, dynamic=False)

    def flex_fwd() -> torch.Tensor:
        return flex(qt, kt, vt, block_mask=block_mask, enable_gqa=hkv != h)

    row["flex_fwd_ms"] = bench_ms(flex_fwd, warmup, rep)
    row["flex_fb_ms"] = bench_ms(lambda: flex_fwd().backward(dot), warmup, rep, [qt, kt, vt])
    row["flex_mask_ms"] = bench_ms(
        lambda: create_block_mask(flex_mask_mod(args, n, "cuda"), 1, 1, n, n, device="cuda", _compile=True), 1, 5
    )
    if name == "causal":  # dense cuDNN causal: K/V repeated to H heads outside the timing
        kr = kt.detach().repeat_interleave(h // hkv, 1).requires_grad_()
        vr = vt.detach().repeat_interleave(h // hkv, 1).requires_grad_()

        def cudnn_fwd() -> torch.Tensor:
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                return torch.nn.functional.scaled_dot_product_attention(qt, kr, vr, is_causal=True)

        row["cudnn_fwd_ms"] = bench_ms(cudnn_fwd, warmup, rep)
        row["cudnn_fb_ms"] = bench_ms(lambda: cudnn_fwd().backward(dot), warmup, rep, [qt, kr, vr])
    row.update(derive_times(args, n, h, hkv, torch.device("cuda")))
    for who in ("ours", "triton", "flex", "cudnn"):
        if f"{who}_fwd_ms" in row:
            row[f"{who}_fwd_tflops"] = fwd_flop / row[f"{who}_fwd_ms"] / 1e9
            row[f"{who}_fb_tflops"] = 3.5 * fwd_flop / row[f"{who}_fb_ms"] / 1e9
    row["vs_flex_fwd"] = row["flex_fwd_ms"] / row["ours_fwd_ms"]
    row["vs_flex_fb"] = row["flex_fb_ms"] / row["ours_fb_ms"]
    if "cudnn_fwd_ms" in row:
        row["vs_cudnn_fwd"] = row["cudnn_fwd_ms"] / row["ours_fwd_ms"]
        row["vs_cudnn_fb"] = row["cudnn_fb_ms"] / row["ours_fb_ms"]
    row["derive_pct_of_fwd"] = 100.0 * row["derive_ms"] / row["ours_fwd_ms"]
    row["derive_cached_pct_of_fwd"] = 100.0 * row["derive_cached_ms"] / row["ours_fwd_ms"]
    return row


def table(rows: list[dict]) -> str:
    head = (
        "| N | H/Hkv | D | mask | backend | ours fwd ms | flex fwd ms | x flex | ours f+b ms | flex f+b ms | x flex | "
        "ours f+b TFLOP/s | x cuDNN fwd | x cuDNN f+b | triton fwd / f+b ms | derive % fwd |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        cf = f"{r['vs_cudnn_fwd']:.2f}" if "vs_cudnn_fwd" in r else ""
        cb = f"{r['vs_cudnn_fb']:.2f}" if "vs_cudnn_fb" in r else ""
        tri = f"{r['triton_fwd_ms']:.2f} / {r['triton_fb_ms']:.2f}" if "triton_fwd_ms" in r else ""
        lines.append(
            f"| {r['n'] // 1024}K | {r['heads']}/{r['kv_heads']} | {r['head_dim']} | {r['mask']} | "
            f"{r.get('backend', 'triton')} | "
            f"{r['ours_fwd_ms']:.2f} | {r['flex_fwd_ms']:.2f} | {r['vs_flex_fwd']:.2f} | {r['ours_fb_ms']:.2f} | "
            f"{r['flex_fb_ms']:.2f} | {r['vs_flex_fb']:.2f} | {r['ours_fb_tflops']:.0f} | {cf} | {cb} | {tri} | "
            f"{r['derive_pct_of_fwd']:.2f} |"
        )
    return "\n".join(lines)


def summary(rows: list[dict]) -> dict:
    import statistics

    fwd = [r["vs_flex_fwd"] for r in rows]
    fb = [r["vs_flex_fb"] for r in rows]
    out = dict(
        median_vs_flex_fwd=statistics.median(fwd),
        median_vs_flex_fb=statistics.median(fb),
        min_vs_flex_fwd=min(fwd),
        min_vs_flex_fb=min(fb),
        max_derive_pct_of_fwd=max(r["derive_pct_of_fwd"] for r in rows),
        max_derive_cached_pct_of_fwd=max(r.get("derive_cached_pct_of_fwd", 0.0) for r in rows),
    )
    causal = [r for r in rows if "vs_cudnn_fwd" in r]
    if causal:
        out["min_vs_cudnn_causal_fwd"] = min(r["vs_cudnn_fwd"] for r in causal)
        out["min_vs_cudnn_causal_fb"] = min(r["vs_cudnn_fb"] for r in causal)
    return out


def write_report(result: dict, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    name = f"sparse_masks_{gpu_tag(result['env']['gpu'])}"
    (out / f"{name}.json").write_text(json.dumps(result, indent=1))
    env = result["env"]
    md = [
        f"# Block-sparse attention on LLM shapes ({env['gpu']})",
        "",
        f"torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']}, source {env.get('git_commit')}; "
        f"bf16, B=1. Produced by `tools/bench_sparse_masks.py`. Ratios > 1: ours is faster.",
        "",
        table(result["rows"]),
        "",
        "Summary: " + ", ".join(f"{k} {v:.2f}" for k, v in result["summary"].items()),
        "",
        "Correctness (bf16 vs float64, out and grads, 2x rule): "
        + ", ".join(f"{c['mask']} {c['heads']}/{c['kv_heads']}/{c['head_dim']} {c.get('backend', 'triton')}: "
                    f"{'ok' if c['passed'] else 'FAIL'}"
                    for c in result["correctness"]),
    ]  # fmt: skip
    (out / f"{name}.md").write_text("\n".join(md) + "\n")
    rows = result["rows"]
    fig, axes = plt.subplots(1, 2, figsize=(14, 5))
    labels = [f"{r['n'] // 1024}K {r['heads']}/{r['kv_heads']}/{r['head_dim']}\n{r['mask']}" for r in rows]
    x = range(len(rows))
    for ax, key, title in ((axes[0], "fwd", "forward"), (axes[1], "fb", "forward + backward")):
        ax.bar([i - 0.2 for i in x], [r[f"ours_{key}_tflops"] for r in rows], 0.4, label="ours (auto)")
        ax.bar([i + 0.2 for i in x], [r[f"flex_{key}_tflops"] for r in rows], 0.4, label="FlexAttention")
        ax.set_xticks(list(x), labels, rotation=90, fontsize=6)
        ax.set_ylabel("effective TFLOP/s (attended pairs)")
        ax.set_title(title)
        ax.legend()
    fig.suptitle(f"{env['gpu']} | torch {env['torch']} | triton {env['triton']}")
    fig.tight_layout()
    fig.savefig(out / f"{name}.png", dpi=120)
    return out / f"{name}.md"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("bench-output"))
    ap.add_argument("--seq-lens", type=int, nargs="+", default=[32768, 131072])
    ap.add_argument("--configs", nargs="+", default=[f"{h}/{hkv}/{d}" for h, hkv, d in CONFIGS], help="H/Hkv/D")
    ap.add_argument("--masks", nargs="+", default=list(MASKS), choices=MASKS)
    ap.add_argument("--quick", action="store_true", help="N=8K, two configs, two masks")
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--rep", type=int, default=50)
    ap.add_argument("--skip-correctness", action="store_true")
    ap.add_argument(
        "--resume",
        type=Path,
        default=None,
        help="a JSON of an earlier run on the same GPU: keep its rows, run the rest",
    )
    ap.add_argument(
        "--derive-only", action="store_true", help="only the tile derivation timings (runs on the CPU without a GPU)"
    )
    ap.add_argument("--device", default=None, help="--derive-only: device (default cuda if available, else cpu)")
    args = ap.parse_args()
    if args.derive_only:
        dev = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        cfgs = [tuple(int(x) for x in c.split("/")) for c in args.configs[:1]]
        return derive_only(args.seq_lens, cfgs, args.masks, dev)
    if not torch.cuda.is_available():
        print("needs a CUDA GPU")
        return 2
    if args.quick:
        args.seq_lens, args.configs, args.masks = [8192], ["32/8/128", "16/16/64"], ["causal", "causal+win1024"]
    configs = [tuple(int(x) for x in c.split("/")) for c in args.configs]
    result: dict[str, Any] = dict(env=gpu_env(dtype="bfloat16", batch=1), rows=[], correctness=[])
    if args.resume is not None:
        earlier = json.loads(args.resume.read_text())
        if earlier["env"]["gpu"] != result["env"]["gpu"]:
            raise ValueError(f"--resume {args.resume} ran on {earlier['env']['gpu']}, not {result['env']['gpu']}")
        result["rows"], result["correctness"] = earlier["rows"], earlier["correctness"]
    if not (args.skip_correctness or result["correctness"]):  # a resumed run keeps the earlier checks
        result["correctness"] = correctness()
    done = {(r["n"], (r["heads"], r["kv_heads"], r["head_dim"]), r["mask"]) for r in result["rows"]}
    points = [(n, c, m) for n in args.seq_lens for c in configs for m in args.masks if (n, c, m) not in done]
    try:
        from tqdm import tqdm

        it: Any = tqdm(points, desc="points")
    except ImportError:
        it = points
    for n, c, m in it:
        row = measure_point(n, c, m, args.warmup, args.rep)  # type: ignore[arg-type]
        result["rows"].append(row)
        print(table([row]).splitlines()[-1], flush=True)
        args.out.mkdir(parents=True, exist_ok=True)  # partial JSON: a run cut short can be resumed
        (args.out / "sparse_masks_partial.json").write_text(json.dumps(result, indent=1))
        torch.cuda.empty_cache()
    result["summary"] = summary(result["rows"])
    md = write_report(result, args.out)
    print(md.read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
