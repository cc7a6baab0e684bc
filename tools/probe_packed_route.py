"""Probe: the packed sdpa backend's two routes for segments off the strided pieces, and the
strided-rows kernels' tile sizes.

On bench_varlen.py's batch (256K tokens, 41 log-normal documents, mean 8K, LongNet segments
2048-16384, rates 1-8, D=128, bf16), per point, forward+backward ms (median of --reps, CUDA
events) of: one unpacked sequence of the same length; packed with the other segments as gathered
varlen calls (``packed_views.uses_strided_kernel`` forced off); packed on the strided-rows kernels
(attn_core.strided_varlen, the default); the same with no strided pieces (every segment on the
kernels); and forward-only times of packed and unpacked. Then a sweep of the kernels' tile sizes
(FWD_BLOCK_M, FWD_BLOCK_N, BWD_BLOCK) at 16/16 "all", causal and not. One GPU; prints tables and
writes JSON to --out.

    source tools/srcpath.sh && python tools/probe_packed_route.py --out bench-output
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

CFG: dict[str, Any] = dict(segments=[2048, 4096, 8192, 16384], rates=[1, 2, 4, 8], D=128, dtype=torch.bfloat16)
POINTS = [
    ((16, 16), "all", False),
    ((16, 16), "all", True),
    ((16, 16), "split", False),
    ((32, 8), "all", True),
    ((32, 8), "split", True),
]
# (FWD_BLOCK_M, FWD_BLOCK_N, BWD_BLOCK)
BLOCKS = [(128, 64, 64), (128, 32, 64), (64, 64, 64), (128, 128, 64), (128, 64, 32), (128, 64, 128)]


def _tensors(n: int, h: int, hkv: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    dev, d, dt = torch.device("cuda"), CFG["D"], CFG["dtype"]
    q = torch.randn(1, n, h, d, device=dev, dtype=dt, requires_grad=True)
    k, v = (torch.randn(1, n, hkv, d, device=dev, dtype=dt, requires_grad=True) for _ in range(2))
    return [q, k, v], torch.randn_like(q)


def routes(lengths: list[int], reps: int) -> list[dict[str, Any]]:
    from attn_core import packed_views

    dev = torch.device("cuda")
    cu = bench_varlen.offsets(lengths, dev)
    bounds = list(itertools.pairwise([0, *itertools.accumulate(lengths)]))
    rows = []
    print("| H/Hkv | mode | causal | unpacked | gathered | kernels | kernels, no pieces | kernels / unpacked "
          "| fwd kernels | fwd unpacked |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|")
    for (h, hkv), mode, causal in POINTS:
        leaves, go = _tensors(sum(lengths), h, hkv)
        forms = bench_varlen.runners(CFG, cu, bounds, mode, causal)

        def step(name: str, forms: dict = forms, leaves: list = leaves, go: torch.Tensor = go) -> float:
            return cuda_median_ms(lambda: bench_varlen.fwd_bwd(forms[name], leaves, go), reps)

        def fwd(name: str, forms: dict = forms, leaves: list = leaves) -> float:
            return cuda_median_ms(lambda: forms[name](*(t.detach() for t in leaves)), reps)

        row: dict[str, Any] = dict(H=h, Hkv=hkv, mode=mode, causal=causal, unpacked=step("unpacked"))
        row["fwd_unpacked"] = fwd("unpacked")
        real_route, real_cap = packed_views.uses_strided_kernel, packed_views.STRIDED_MAX_PIECES
        try:
            packed_views.uses_strided_kernel = lambda q: False
            row["gathered"] = step("packed")
            packed_views.uses_strided_kernel = real_route
            row["kernels"] = step("packed")
            row["fwd_kernels"] = fwd("packed")
            packed_views.STRIDED_MAX_PIECES = 0
            row["kernels_no_pieces"] = step("packed")
        finally:
            packed_views.uses_strided_kernel, packed_views.STRIDED_MAX_PIECES = real_route, real_cap
        rows.append(row)
        print(
            f"| {h}/{hkv} | {mode} | {'yes' if causal else 'no'} | {row['unpacked']:.1f} | {row['gathered']:.1f} "
            f"| {row['kernels']:.1f} | {row['kernels_no_pieces']:.1f} | {row['kernels'] / row['unpacked']:.2f} "
            f"| {row['fwd_kernels']:.1f} | {row['fwd_unpacked']:.1f} |",
            flush=True,
        )
    return rows


def blocks(lengths: list[int], reps: int) -> list[dict[str, Any]]:
    from attn_core import strided_varlen

    dev = torch.device("cuda")
    cu = bench_varlen.offsets(lengths, dev)
    bounds = list(itertools.pairwise([0, *itertools.accumulate(lengths)]))
    defaults = (strided_varlen.FWD_BLOCK_M, strided_varlen.FWD_BLOCK_N, strided_varlen.BWD_BLOCK)
    rows = []
    print("\n| causal | FWD_BLOCK_M, FWD_BLOCK_N, BWD_BLOCK | fwd ms | fwd+bwd ms |\n|---|---|---|---|")
    try:
        for causal in (False, True):
            leaves, go = _tensors(sum(lengths), 16, 16)
            packed = bench_varlen.runners(CFG, cu, bounds, "all", causal)["packed"]
            for sizes in BLOCKS:
                strided_varlen.FWD_BLOCK_M, strided_varlen.FWD_BLOCK_N, strided_varlen.BWD_BLOCK = sizes
                f = cuda_median_ms(lambda p=packed, x=leaves: p(*(t.detach() for t in x)), reps)
                fb = cuda_median_ms(lambda p=packed, x=leaves, g=go: bench_varlen.fwd_bwd(p, x, g), reps)
                rows.append(dict(causal=causal, blocks=sizes, fwd=f, fwd_bwd=fb))
                print(f"| {'yes' if causal else 'no'} | {sizes} | {f:.1f} | {fb:.1f} |", flush=True)
    finally:
        strided_varlen.FWD_BLOCK_M, strided_varlen.FWD_BLOCK_N, strided_varlen.BWD_BLOCK = defaults
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path("bench-output"))
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("probe_packed_route.py needs a CUDA GPU")
        return 1
    lengths = bench_varlen.default_lengths()
    result = dict(env=gpu_env(), routes=routes(lengths, args.reps), blocks=blocks(lengths, args.reps))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "packed_route.json").write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
