"""Probe: causal sliding windows as dense causal calls on chunks (attn_sparse's "sdpa" backend)
against the Triton block-sparse kernel, by window length: where the sdpa backend's MIN_WINDOW lies.

One GPU, bf16, B=1, causal with window_size=(W - 1, 0) for W in --windows (and fully causal), per
(H, Hkv, D) of --configs and N of --seq-lens: forward and forward+backward (median of
triton.testing.do_bench) of block_sparse_attention(q, k, v, None, ...) pinned to "sdpa" (its
MIN_WINDOW lowered for the probe) and to "triton". Effective TFLOP/s count 4 * D * H per attended
pair (x3.5 for fwd+bwd). First a bf16 correctness check of the sdpa path against float64 (out and
grads, the 2x rule). Writes window_chunks_<gpu>.{json,md} to --out.

    source tools/srcpath.sh && python tools/probe_window_chunks.py --out docs/benchmarks
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_env import gpu_env, gpu_tag
from bench_sparse_masks import attended_pairs, bench_ms, grads_of


def check(device: str) -> bool:
    from attn_core.reference import dense_attention
    from attn_core.testing import assert_close_to_reference
    from attn_sparse import block_sparse_attention

    g = torch.Generator(device=device).manual_seed(0)
    n, h, hkv, d = 3000, 8, 2, 128
    q, k, v = (torch.randn(1, n, x, d, device=device, dtype=torch.bfloat16, generator=g) for x in (h, hkv, hkv))
    do = torch.randn(1, n, h, d, device=device, dtype=torch.bfloat16, generator=g)
    ok = True
    for args in ({"is_causal": True}, {"is_causal": True, "window_size": (700, 0)}):
        ours = grads_of(lambda *t, a=args: block_sparse_attention(*t, None, backend="sdpa", **a), (q, k, v), do)
        ref = grads_of(
            lambda *t, a=args: dense_attention(*t, dtype=torch.float64, **a)[0],
            (q.double(), k.double(), v.double()),
            do,
        )
        base = grads_of(lambda *t, a=args: dense_attention(*t, dtype=torch.bfloat16, **a)[0], (q, k, v), do)
        for what, a, r, b in zip(("out", "dq", "dk", "dv"), ours, ref, base):
            try:
                assert_close_to_reference(f"sdpa {args} {what}", a, r, b)
            except AssertionError as e:
                ok = False
                print(f"correctness FAILED: {e}")
    return ok


def measure(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, do: torch.Tensor, w: int, warmup: int, rep: int) -> dict:
    """sdpa vs triton, fwd and fwd+bwd, causal with window_size=(w - 1, 0) (w = 0: fully causal)."""
    from attn_sparse import block_sparse_attention

    _, n, h, d = q.shape
    mask = {"is_causal": True} if w == 0 else {"is_causal": True, "window_size": (w - 1, 0)}
    flop = 4.0 * d * h * attended_pairs(mask, n)
    row: dict = dict(n=n, heads=h, kv_heads=k.shape[2], head_dim=d, window=w or "causal")
    for backend in ("sdpa", "triton"):

        def run(b: str = backend) -> torch.Tensor:
            return block_sparse_attention(q, k, v, None, backend=b, **mask)

        row[f"{backend}_fwd_ms"] = bench_ms(run, warmup, rep)
        row[f"{backend}_fb_ms"] = bench_ms(lambda r=run: r().backward(do), warmup, rep, [q, k, v])
        row[f"{backend}_fb_tflops"] = 3.5 * flop / row[f"{backend}_fb_ms"] / 1e9
    row["fwd_speedup"] = row["triton_fwd_ms"] / row["sdpa_fwd_ms"]
    row["fb_speedup"] = row["triton_fb_ms"] / row["sdpa_fb_ms"]
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("bench-output"))
    ap.add_argument("--seq-lens", type=int, nargs="+", default=[32768, 131072])
    ap.add_argument("--configs", nargs="+", default=["32/8/128", "16/16/64"], help="H/Hkv/D")
    ap.add_argument("--windows", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--rep", type=int, default=20)
    args = ap.parse_args()

    from attn_sparse.backends import sdpa

    sdpa.MIN_WINDOW = 1  # the probe decides where the threshold should be
    passed = check("cuda")
    rows = []
    for n in args.seq_lens:
        for cfg in args.configs:
            h, hkv, d = (int(x) for x in cfg.split("/"))
            g = torch.Generator(device="cuda").manual_seed(n + h)
            q = torch.randn(1, n, h, d, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
            k = torch.randn(1, n, hkv, d, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
            v = torch.randn(1, n, hkv, d, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
            do = torch.randn(1, n, h, d, device="cuda", dtype=torch.bfloat16, generator=g)
            for w in [*args.windows, 0]:
                row = measure(q, k, v, do, w, args.warmup, args.rep)
                rows.append(row)
                print(row, flush=True)
    env = gpu_env()
    head = "| N | H/Hkv/D | window | sdpa fwd ms | triton fwd ms | x | sdpa f+b ms | triton f+b ms | x | sdpa f+b TFLOP/s |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        lines.append(
            f"| {r['n'] // 1024}K | {r['heads']}/{r['kv_heads']}/{r['head_dim']} | {r['window']} | "
            f"{r['sdpa_fwd_ms']:.2f} | {r['triton_fwd_ms']:.2f} | {r['fwd_speedup']:.2f} | {r['sdpa_fb_ms']:.2f} | "
            f"{r['triton_fb_ms']:.2f} | {r['fb_speedup']:.2f} | {r['sdpa_fb_tflops']:.0f} |"
        )
    md = [
        f"# Causal windows as dense causal chunks vs the Triton kernel ({env['gpu']})",
        "",
        f"torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']}, source {env.get('git_commit')}; bf16, "
        "B=1, window_size=(W - 1, 0). Produced by `tools/probe_window_chunks.py`. x > 1: sdpa is faster.",
        "",
        *lines,
        "",
        f"Correctness of the sdpa path (bf16 vs float64, out and grads, 2x rule): {'ok' if passed else 'FAIL'}",
    ]
    print("\n".join(lines))
    args.out.mkdir(parents=True, exist_ok=True)
    name = f"window_chunks_{gpu_tag(env['gpu'])}"
    (args.out / f"{name}.json").write_text(json.dumps(dict(env=env, rows=rows, correctness=passed), indent=1))
    (args.out / f"{name}.md").write_text("\n".join(md) + "\n")
    return 0 if passed else 1


if __name__ == "__main__":
    raise SystemExit(main())
