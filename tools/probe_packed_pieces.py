"""Probe: how much of a packed batch's dilated attention should run as strided pieces.

The packed planner (attn_core.packed_views) runs a document's full segments as strided pieces on
the fused kernels (no copies) when the piece is large enough (query-key products times heads: the
backward's STRIDED_MIN_WORK, the forward's STRIDED_MIN_WORK_KERNEL_FORWARD where the strided-rows
kernels run) and at most STRIDED_MAX_PIECES pieces per group; everything else runs on the
strided-rows kernels (attn_core.strided_varlen; gathered varlen calls where they cannot run).
This times packed forward+backward and the forward alone (dilated_attention(..., cu_seqlens=cu),
sdpa backend) of bench_varlen.py's batch (256K tokens, 41 log-normal documents, mean 8K, LongNet
segments 2048-16384, rates 1-8, D=128, bf16) for several (max pieces, min work, forward min work,
streams) settings (PACKED_STREAMS: a group's tables and pieces on that many CUDA streams), beside
one unpacked sequence of the same length, and reports each plan (strided pieces of the forward /
of the backward / other calls per group) and the host time to queue a call: a forward whose host
time reaches its GPU time waits on the host. One GPU; prints a table and writes JSON to --out.

    source tools/srcpath.sh && python tools/probe_packed_pieces.py --out bench-output
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_varlen
from bench_env import cuda_median_ms, gpu_env
from probe_gather_executor import host_ms

CFG: dict[str, Any] = dict(segments=[2048, 4096, 8192, 16384], rates=[1, 2, 4, 8], D=128, dtype=torch.bfloat16)
# (STRIDED_MAX_PIECES, log2 STRIDED_MIN_WORK, log2 STRIDED_MIN_WORK_KERNEL_FORWARD, PACKED_STREAMS)
SETTINGS = [(16, 25, 25, 4), (16, 25, 27, 4), (16, 27, 27, 4), (16, 25, 29, 4)]
POINTS = [
    ((16, 16), "all", False),
    ((16, 16), "all", True),
    ((16, 16), "split", False),
    ((16, 16), "split", True),
    ((32, 8), "all", False),
    ((32, 8), "split", True),
]


def measure(heads: tuple[int, int], mode: str, causal: bool, lengths: list[int], reps: int) -> list[dict[str, Any]]:
    """One point: the unpacked sequence, then packed under every setting (the defaults restored after)."""
    dev = torch.device("cuda")
    (h, hkv), d, n = heads, CFG["D"], sum(lengths)
    cu = bench_varlen.offsets(lengths, dev)
    bounds = list(itertools.pairwise([0, *itertools.accumulate(lengths)]))
    g = torch.Generator(device=dev).manual_seed(0)
    q = torch.randn(1, n, h, d, device=dev, generator=g).to(CFG["dtype"]).requires_grad_()
    k, v = (torch.randn(1, n, hkv, d, device=dev, generator=g).to(CFG["dtype"]).requires_grad_() for _ in range(2))
    go = torch.randn(1, n, h, d, device=dev, generator=g).to(CFG["dtype"])
    forms = bench_varlen.runners(CFG, cu, bounds, mode, causal)

    def unpacked_step() -> None:
        bench_varlen.fwd_bwd(forms["unpacked"], [q, k, v], go)

    def packed_step() -> None:
        bench_varlen.fwd_bwd(forms["packed"], [q, k, v], go)

    def packed_forward() -> None:
        forms["packed"](q, k, v)

    unpacked = cuda_median_ms(unpacked_step, reps)
    rows = []
    for pieces, work, forward_work, streams in SETTINGS:
        settings = dict(
            STRIDED_MAX_PIECES=pieces,
            STRIDED_MIN_WORK=1 << work,
            STRIDED_MIN_WORK_KERNEL_FORWARD=1 << forward_work,
            PACKED_STREAMS=streams,
        )
        with bench_varlen.packed_settings(settings):
            ms = cuda_median_ms(packed_step, reps)
            plan = bench_varlen.plan_summary(cu, n, h, hkv, d, CFG, mode, dev)
            row = dict(
                H=h, Hkv=hkv, mode=mode, causal=causal, unpacked_ms=unpacked, max_pieces=pieces, log2_min_work=work,
                log2_min_work_kernel_forward=forward_work, streams=streams,
                packed_ms=ms, host_ms=host_ms(packed_step, 2),
                forward_ms=cuda_median_ms(packed_forward, reps), forward_host_ms=host_ms(packed_forward, 2),
                plan=[(p["forward_pieces"], p["strided_pieces"], p["gathered_calls"]) for p in plan],
            )  # fmt: skip
        rows.append(row)
        plan_text = ", ".join("/".join(map(str, p)) for p in row["plan"])
        print(
            f"| {h}/{hkv} | {mode} | {'yes' if causal else 'no'} | {unpacked:.1f} | {pieces} | 2^{work} "
            f"| 2^{forward_work} | {streams} | {ms:.1f} | {ms / unpacked:.2f} | {row['host_ms']:.1f} "
            f"| {row['forward_ms']:.1f} | {row['forward_host_ms']:.1f} | {plan_text} |",
            flush=True,
        )
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path("bench-output"))
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("probe_packed_pieces.py needs a CUDA GPU")
        return 1
    lengths = bench_varlen.default_lengths()
    print(
        "| H/Hkv | mode | causal | unpacked ms | max pieces | min work | forward min work | streams | packed ms "
        "| packed / unpacked | host ms | forward ms | forward host ms | plan |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    rows = [r for heads, mode, causal in POINTS for r in measure(heads, mode, causal, lengths, args.reps)]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "packed_pieces.json").write_text(json.dumps(dict(env=gpu_env(), rows=rows), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
