"""Probe: dense cuDNN causal attention's rate against sequence length at a fixed token count.

LongNet's causal groups are batches of short causal attentions (every segment selects 2048 rows
in the default config). This measures the ceiling such batches have on cuDNN itself: SDPA pinned
to cuDNN, causal, bf16, B = --tokens / L sequences of length L (heads H, K/V repeated to H as the
dilated benchmark's dense baseline does), forward and forward+backward, effective TFLOP/s over the
attended pairs (L (L + 1) / 2 per sequence and head; fwd+bwd counted 3.5x the forward), and each
L's rate as a fraction of the longest L's (64K by default: dense causal attention's rate is about
flat beyond it, so this is the "dense causal" bar of tools/bench_dilated.py). --non-causal adds
the non-causal rates of the same shapes. One GPU; writes JSON to --out.

    source tools/srcpath.sh && python tools/probe_causal_ceiling.py --out bench-output
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_env import cuda_median_ms, gpu_env


def point(tokens: int, seq_len: int, heads: int, head_dim: int, causal: bool, reps: int) -> dict[str, Any]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    batch = tokens // seq_len
    q, k, v, go = (torch.randn(batch, heads, seq_len, head_dim, device="cuda", dtype=torch.bfloat16) for _ in range(4))
    for t in (q, k, v):
        t.requires_grad_()

    def fwd() -> torch.Tensor:
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)

    def fb() -> None:
        torch.autograd.grad(fwd(), (q, k, v), go)

    pairs = batch * heads * (seq_len * (seq_len + 1) // 2 if causal else seq_len * seq_len)
    flop = 4.0 * head_dim * pairs
    with torch.no_grad():
        fwd_ms = cuda_median_ms(fwd, reps, warmup=2)
    fb_ms = cuda_median_ms(fb, reps, warmup=2)
    return dict(
        seq_len=seq_len, batch=batch, causal=causal, fwd_ms=fwd_ms, fb_ms=fb_ms,
        fwd_tflops=flop / fwd_ms / 1e9, fb_tflops=3.5 * flop / fb_ms / 1e9,
    )  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=262144)
    ap.add_argument("--seq-lens", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384, 65536])
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--head-dims", type=int, nargs="+", default=[128, 64])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--non-causal", action="store_true", help="also the non-causal rates of the same shapes")
    ap.add_argument("--out", type=Path, default=Path("bench-output"))
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    rows = []
    for d in args.head_dims:
        for causal in (True, False) if args.non_causal else (True,):
            part = [point(args.tokens, n, args.heads, d, causal, args.reps) for n in args.seq_lens]
            top = part[-1]
            for r in part:
                r.update(head_dim=d, fwd_vs_longest=r["fwd_tflops"] / top["fwd_tflops"])
                r["fb_vs_longest"] = r["fb_tflops"] / top["fb_tflops"]
            rows += part
            torch.cuda.empty_cache()
    print("| D | causal | L | batch | fwd ms | fwd TF/s | x longest | f+b ms | f+b TF/s | x longest |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['head_dim']} | {'yes' if r['causal'] else 'no'} | {r['seq_len']} | {r['batch']} | {r['fwd_ms']:.2f} "
            f"| {r['fwd_tflops']:.0f} | {r['fwd_vs_longest']:.2f} | {r['fb_ms']:.2f} | {r['fb_tflops']:.0f} "
            f"| {r['fb_vs_longest']:.2f} |"
        )
    args.out.mkdir(parents=True, exist_ok=True)
    env = gpu_env(dtype="bfloat16", heads=args.heads, tokens=args.tokens)
    (args.out / "causal_ceiling.json").write_text(json.dumps(dict(env=env, rows=rows), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
