"""Probe: the packed sdpa backend's two routes for segments off the strided pieces, and the
strided-rows kernels' tile sizes.

On bench_varlen.py's batch (256K tokens, 41 log-normal documents, mean 8K, LongNet segments
2048-16384, rates 1-8, D=128, bf16), per point, forward+backward ms (median of --reps, CUDA
events) of: one unpacked sequence of the same length; packed with the other segments as gathered
varlen calls (``packed_views.uses_strided_kernel`` forced off); packed on the strided-rows kernels
(attn_core.strided_varlen, the default); the same with no strided pieces (every segment on the
kernels); and forward-only times of packed and unpacked. Then a sweep of the kernels' launch
settings (tile sizes and pipelining depth, :data:`SETTINGS`; and the forward's TMA descriptors
off, every tile on pointer loads) at 16/16 "all", causal and not, with
the kernels alone timed on the batch's tables (TFLOP/s of the pairs they compute; no cuDNN pieces).
One GPU; prints tables and writes JSON to --out.

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
# Overrides of attn_core.strided_varlen's launch constants, each against the defaults (first row);
# DESCRIPTORS 0: the kernels told that no view takes a TMA descriptor (pointer loads everywhere).
DESCRIPTORS = "descriptors"
SETTINGS: list[dict[str, int]] = [
    {},
    dict(FWD_STAGES=3),
    dict(FWD_BLOCK_N=128),
    dict(FWD_BLOCK_N=128, FWD_STAGES=3),
    dict(FWD_BLOCK_M=64, FWD_STAGES=3),
    dict(BWD_STAGES=3),
    dict(BWD_BLOCK=128, BWD_STEP=32),
    dict(BWD_BLOCK=128, BWD_STEP=32, BWD_STAGES=3),
    dict(BWD_BLOCK=128, BWD_STEP=64),
    dict(BWD_BLOCK=64, BWD_STEP=32, BWD_STAGES=3),
    {DESCRIPTORS: 0},
]


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


def _kernel_steps(lengths: list[int], leaves: list[torch.Tensor], go: torch.Tensor, causal: bool) -> tuple:
    """(fwd(), bwd(), pairs): the strided-rows kernels alone over every table of the 16/16 "all"
    backward's plan (in plan order, as the packed call runs them; the forward's plan has fewer
    pieces, so more rows in its tables), and the (query, key, head) pairs they compute."""
    from attn_core import packed_views, strided_varlen
    from attn_core.config import DilatedConfig

    q, k, v = (t.detach()[0] for t in leaves)
    n, h, d = q.shape
    config = DilatedConfig(CFG["segments"], CFG["rates"], head_mode="all")
    cu = bench_varlen.offsets(lengths, q.device)
    plan = packed_views.plan_packed(cu, (n, h, k.shape[1], d), config, q.device, kernel=True, backward=True)
    tables = [(group.first, seqs) for group in plan for seqs in group.sequences]
    out, lse = torch.zeros_like(q), torch.full((n, h), float("-inf"), device=q.device)
    grads = tuple(torch.zeros_like(t) for t in (q, k, v))
    scale = d**-0.5
    common = dict(key_padding_mask=None, is_causal=causal, scale=scale)

    def fwd() -> None:
        for first, seqs in tables:
            strided_varlen.forward_(q, k, v, seqs, out, lse, first=first, **common)

    def bwd() -> None:
        delta = strided_varlen.row_delta(go[0], out)
        for _, seqs in tables:
            strided_varlen.backward_(go[0], q, k, v, lse, delta, seqs, grads, **common)

    lens = [seqs.lengths.long() for _, seqs in tables]
    per = [(n * (n + 1) // 2 if causal else n * n).sum() * seqs.q_hn for n, (_, seqs) in zip(lens, tables)]
    return fwd, bwd, int(sum(per))


def settings(lengths: list[int], reps: int) -> list[dict[str, Any]]:
    from attn_core import strided_varlen

    dev = torch.device("cuda")
    cu = bench_varlen.offsets(lengths, dev)
    bounds = list(itertools.pairwise([0, *itertools.accumulate(lengths)]))
    names = sorted({name for setting in SETTINGS for name in setting} - {DESCRIPTORS})
    defaults = {name: getattr(strided_varlen, name) for name in names}
    real_reasons = strided_varlen.descriptor_reasons
    rows = []
    print(
        f"\n| causal | setting (defaults {defaults}) | fwd ms | fwd+bwd ms | kernels fwd ms (TFLOP/s) "
        "| kernels bwd ms (TFLOP/s) |\n|---|---|---|---|---|---|"
    )
    d = CFG["D"]
    for causal in (False, True):
        leaves, go = _tensors(sum(lengths), 16, 16)
        packed = bench_varlen.runners(CFG, cu, bounds, "all", causal)["packed"]
        for setting in SETTINGS:
            try:
                for name, value in setting.items():
                    if name == DESCRIPTORS:
                        strided_varlen.descriptor_reasons = lambda *xs, on=value: (
                            real_reasons(*xs) if on else ["off in this probe"]
                        )
                    else:
                        setattr(strided_varlen, name, value)
                f = cuda_median_ms(lambda p=packed, x=leaves: p(*(t.detach() for t in x)), reps)
                fb = cuda_median_ms(lambda p=packed, x=leaves, g=go: bench_varlen.fwd_bwd(p, x, g), reps)
                kfwd, kbwd, pairs = _kernel_steps(lengths, leaves, go, causal)
                kf, kb = cuda_median_ms(kfwd, reps), cuda_median_ms(kbwd, reps)
            except Exception as err:  # a setting that does not compile (shared memory) is reported, not fatal
                print(f"| {'yes' if causal else 'no'} | {setting} | failed: {type(err).__name__} | | | |", flush=True)
                continue
            finally:
                strided_varlen.descriptor_reasons = real_reasons
                for name, value in defaults.items():
                    setattr(strided_varlen, name, value)
            # 2*D flops per pair and matmul, counted as usual: 2 matmuls forward, 5 backward (the
            # kernels run 7: QK^T and dP again in the dq kernel)
            tf_f, tf_b = 4 * d * pairs / kf / 1e9, 10 * d * pairs / kb / 1e9
            rows.append(dict(causal=causal, setting=setting, fwd=f, fwd_bwd=fb, kernel_fwd=kf, kernel_bwd=kb,
                             kernel_pairs=pairs, kernel_fwd_tflops=tf_f, kernel_bwd_tflops=tf_b))  # fmt: skip
            print(
                f"| {'yes' if causal else 'no'} | {setting or 'defaults'} | {f:.1f} | {fb:.1f} "
                f"| {kf:.2f} ({tf_f:.0f}) | {kb:.2f} ({tf_b:.0f}) |",
                flush=True,
            )
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
    result = dict(env=gpu_env(), routes=routes(lengths, args.reps), settings=settings(lengths, args.reps))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "packed_route.json").write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
