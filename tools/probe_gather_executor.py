"""Probe: the sdpa backend's two dilated executors (gathered: one call per group; strided: one call
per group and offset) against problem size, to place attn_core.gathered_groups.GATHER_MAX_ELEMS.

Each executor is forced by setting GATHER_MAX_ELEMS (2^40: every call gathers; 0: none does);
LongNet config segments 2048-16384, rates 1-8, bf16, B = 1, forward+backward. Reports the CUDA
time (median of --reps, CUDA events) and the host time per call (wall clock of back-to-back calls,
before the device catches up), and the largest group's query elements B*N*heads*D, which the
threshold is set on. One GPU; prints a table and writes JSON to --out.

    source tools/srcpath.sh && python tools/probe_gather_executor.py --out bench-output
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_env import cuda_median_ms, gpu_env

SEGMENTS, RATES = [2048, 4096, 8192, 16384], [1, 2, 4, 8]
FORCE = {"gathered": 1 << 40, "strided": 0}


def host_ms(fn: Callable[[], object], calls: int) -> float:
    """Host time per call: back-to-back calls timed on the wall clock, before synchronizing."""
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    elapsed = (time.perf_counter() - start) * 1e3 / calls
    torch.cuda.synchronize()
    return elapsed


def point(n: int, heads: int, kv_heads: int, head_dim: int, causal: bool, mode: str, reps: int) -> dict[str, Any]:
    from attn_core import dilated_attention, gathered_groups
    from attn_core.config import DilatedConfig

    q = torch.randn(1, n, heads, head_dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k, v = (
        torch.randn(1, n, kv_heads, head_dim, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(2)
    )
    go = torch.randn_like(q)
    config = DilatedConfig(SEGMENTS, RATES, mode)
    group_heads = max(len(config.heads_for_group(g, heads)) for g in range(config.num_groups))
    row: dict[str, Any] = dict(
        n=n, heads=heads, kv_heads=kv_heads, head_dim=head_dim, causal=causal, mode=mode,
        log2_group_elems=math.log2(n * group_heads * head_dim),
    )  # fmt: skip

    def step() -> None:
        out = dilated_attention(q, k, v, SEGMENTS, RATES, is_causal=causal, head_mode=mode, backend="sdpa")
        torch.autograd.grad(out, (q, k, v), go)

    default = gathered_groups.GATHER_MAX_ELEMS
    try:
        for name, limit in FORCE.items():
            gathered_groups.GATHER_MAX_ELEMS = limit
            row[f"{name}_ms"] = cuda_median_ms(step, reps, warmup=2)
            row[f"{name}_host_ms"] = host_ms(step, reps)
    finally:
        gathered_groups.GATHER_MAX_ELEMS = default
    row["strided_over_gathered"] = row["strided_ms"] / row["gathered_ms"]
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seq-lens", type=int, nargs="+", default=[4096, 8192, 16384, 32768])
    ap.add_argument("--configs", nargs="+", default=["32/8/128", "16/16/64"], help="H/Hkv/D")
    ap.add_argument("--reps", type=int, default=8)
    ap.add_argument("--out", type=Path, default=Path("bench-output"))
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    print(
        "| H/Hkv D | N | causal | mode | log2 group elems | gathered ms (host) | strided ms (host) | strided / gathered |"
    )
    print("|---|---|---|---|---|---|---|---|")
    rows = []
    for cfg in args.configs:
        h, hkv, d = (int(x) for x in cfg.split("/"))
        for n in args.seq_lens:
            for causal in (True, False):
                for mode in ("all", "split"):
                    r = point(n, h, hkv, d, causal, mode, args.reps)
                    rows.append(r)
                    print(
                        f"| {h}/{hkv} D{d} | {n // 1024}K | {'yes' if causal else 'no'} | {mode} | {r['log2_group_elems']:.0f} "
                        f"| {r['gathered_ms']:.2f} ({r['gathered_host_ms']:.2f}) | {r['strided_ms']:.2f} "
                        f"({r['strided_host_ms']:.2f}) | {r['strided_over_gathered']:.2f} |",
                        flush=True,
                    )
            torch.cuda.empty_cache()
    args.out.mkdir(parents=True, exist_ok=True)
    env = gpu_env(dtype="bfloat16", segments=SEGMENTS, rates=RATES)
    (args.out / "gather_executor.json").write_text(json.dumps(dict(env=env, rows=rows), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
