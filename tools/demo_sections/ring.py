"""Demo section: ring attention in real processes against the float64 reference.

CPU: a two-process gloo ring. GPUs: one process per GPU with NCCL (all GPUs of the machine).
Each rank runs attn_ring.ring_attention forward + backward on its shard of a shared random
sequence (contiguous and zigzag layouts, causal and not, GQA), and ring_block_sparse_attention with
a causal sliding window over packed documents that cross the shards (tiles derived from the masks),
and checks out, dq, dk, dv against attn_core.reference.dense_attention with the same masks on the
gathered sequence with the project's rule (error <= 2x plain PyTorch in the same dtype). The table row reports the worst rank. Also plots how much causal
work each rank does under both layouts (zigzag balances it).
"""

from __future__ import annotations

import os
import queue
import socket
import time
import traceback
from datetime import timedelta
from typing import Any

import torch
from demo import DemoRow

# name, layout ("sparse": ring_block_sparse_attention, contiguous shards), causal, (B, n per rank, H, Hkv, D),
# token masks (window_size; cu_seqlens as document lengths, the last one filling N)
CASES = [
    ("ring contiguous causal GQA", "contiguous", True, (1, 64, 4, 2, 32), {}),
    ("ring zigzag causal GQA", "zigzag", True, (1, 64, 4, 2, 32), {}),
    ("ring zigzag non-causal", "zigzag", False, (2, 48, 4, 4, 32), {}),
    (
        "ring block-sparse window 24 + packed docs",
        "sparse",
        True,
        (1, 64, 4, 2, 32),
        {"window_size": (23, 0), "doc_lengths": (1, 50, 37)},
    ),
]


def _masks(spec: dict[str, Any], N: int, dev: torch.device) -> dict[str, Any]:
    """The call's token masks: window_size as given, cu_seqlens from the document lengths (the last
    document takes the rest of the N tokens)."""
    out: dict[str, Any] = {}
    if "window_size" in spec:
        out["window_size"] = spec["window_size"]
    if "doc_lengths" in spec:
        lengths = [*spec["doc_lengths"], N - sum(spec["doc_lengths"])]
        offsets = torch.tensor([0, *lengths], dtype=torch.int32).cumsum(0, dtype=torch.int32)
        out["cu_seqlens"] = offsets.to(dev)
    return out


TIMEOUT_S = 120.0


def _fwd_bwd(fn: Any, leaves: list[torch.Tensor], dout: torch.Tensor) -> list[torch.Tensor]:
    xs = [t.detach().clone().requires_grad_(True) for t in leaves]
    out = fn(*xs)
    return [out.detach(), *torch.autograd.grad(out, xs, dout.to(out.dtype))]


def _rank_main(rank: int, world: int, port: int, backend: str, results: Any) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    import torch.distributed as dist

    from attn_core import reference
    from attn_core.testing import max_abs_error, tolerance
    from attn_ring import ring_attention, ring_block_sparse_attention, shard_sequence

    try:
        if backend == "nccl":
            torch.cuda.set_device(rank)
        dev = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
        dtype = torch.bfloat16 if backend == "nccl" else torch.float32
        dist.init_process_group(backend, rank=rank, world_size=world, timeout=timedelta(seconds=TIMEOUT_S))
        rows = []
        for i, (name, layout, causal, (B, n, H, Hkv, D), spec) in enumerate(CASES):
            g = torch.Generator().manual_seed(100 + i)
            N = n * world
            masks = _masks(spec, N, dev)
            full = [torch.randn(B, N, h, D, generator=g, dtype=torch.float64).to(dev) for h in (H, Hkv, Hkv, H)]
            ref = _fwd_bwd(
                lambda a, b, c, causal=causal, m=masks: reference.dense_attention(a, b, c, is_causal=causal, **m)[0],
                full[:3],
                full[3],
            )
            base = _fwd_bwd(
                lambda a, b, c, causal=causal, m=masks: reference.dense_attention(
                    a, b, c, is_causal=causal, dtype=dtype, **m
                )[0],
                [t.to(dtype) for t in full[:3]],
                full[3],
            )
            shard_layout = "contiguous" if layout == "sparse" else layout
            mine = [shard_sequence(t, world, rank, layout=shard_layout).to(dtype).contiguous() for t in full]

            def ring(
                a: torch.Tensor,
                b: torch.Tensor,
                c: torch.Tensor,
                layout: str = layout,
                causal: bool = causal,
                m: dict[str, Any] = masks,
            ) -> torch.Tensor:
                if layout == "sparse":  # tiles derived from the masks (layout=None), global positions
                    return ring_block_sparse_attention(a, b, c, None, is_causal=causal, timeout_s=TIMEOUT_S, **m)
                return ring_attention(a, b, c, is_causal=causal, layout=layout, timeout_s=TIMEOUT_S)

            _fwd_bwd(ring, mine[:3], mine[3])  # warm-up; time the second call
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            got = _fwd_bwd(ring, mine[:3], mine[3])
            if dev.type == "cuda":
                torch.cuda.synchronize()
            ms = (time.perf_counter() - t0) * 1e3
            errs, tols = [], []
            for j in range(4):
                r_shard = shard_sequence(ref[j], world, rank, layout=shard_layout)
                b_shard = shard_sequence(base[j], world, rank, layout=shard_layout)
                errs.append(max_abs_error(got[j], r_shard))
                tols.append(tolerance(got[j], r_shard, b_shard))
            rows.append({"name": name, "errs": errs, "tols": tols, "ms": ms, "dtype": str(dtype).replace("torch.", "")})
        dist.destroy_process_group()
        results.put((rank, True, rows))
    except BaseException as exc:
        results.put((rank, False, f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _spawn(world: int, backend: str) -> list[list[dict[str, Any]]]:
    ctx = torch.multiprocessing.get_context("spawn")
    results = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_rank_main, args=(r, world, port, backend, results), daemon=True) for r in range(world)]
    for p in procs:
        p.start()
    got: dict[int, Any] = {}
    deadline = time.monotonic() + TIMEOUT_S + 60
    try:
        while len(got) < world and time.monotonic() < deadline:
            try:
                rank, ok, value = results.get(timeout=1.0)
            except queue.Empty:
                if any(p.exitcode not in (None, 0) for p in procs):
                    break
                continue
            if not ok:
                raise RuntimeError(f"ring demo rank {rank} failed: {value}")
            got[rank] = value
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
    if len(got) < world:
        raise RuntimeError(f"ring demo: only ranks {sorted(got)} of {world} reported within the time limit")
    return [got[r] for r in range(world)]


def _plot_balance(ctx: Any, world: int) -> None:
    import matplotlib.pyplot as plt

    from attn_ring.ring import ring_step_blocks

    n = 64
    fig, ax = plt.subplots(figsize=(6, 3.2))
    width = 0.38
    for i, layout in enumerate(("contiguous", "zigzag")):
        pairs = [
            sum(
                (q1 - q0) * (k1 - k0) * (0.5 if c else 1.0)
                for src in range(world)
                for (q0, q1), (k0, k1), c in ring_step_blocks(r, src, world, n, layout, True)
            )
            for r in range(world)
        ]
        ax.bar([r + (i - 0.5) * width for r in range(world)], pairs, width, label=layout)
    ax.set_xticks(range(world))  # ranks are whole numbers
    ax.set_xlabel("rank")
    ax.set_ylabel("attended (q, k) pairs, causal")
    ax.set_title(f"Causal work per rank, W={world}, {n} tokens/rank")
    ax.legend()
    ctx.save_plot(fig, "ring_balance")
    plt.close(fig)


def run(ctx: Any) -> list[DemoRow]:
    gpus = torch.cuda.device_count() if ctx.device == "cuda" else 0
    world, backend = (gpus, "nccl") if gpus else (2, "gloo")
    per_rank = _spawn(world, backend)
    rows = []
    for i, (name, layout, _causal, _shape, _masks_spec) in enumerate(CASES):
        case = [r[i] for r in per_rank]
        for label, idx in (("fwd", [0]), ("bwd", [1, 2, 3])):
            ratios = [c["errs"][j] / c["tols"][j] if c["tols"][j] > 0 else float("inf") for c in case for j in idx]
            worst = max(range(len(ratios)), key=lambda t: ratios[t])
            c, j = case[worst // len(idx)], idx[worst % len(idx)]
            rows.append(
                DemoRow(
                    kind=f"{name} {label}",
                    backend=f"ring/{backend}",
                    why=(
                        f"{world} ranks, contiguous, {c['dtype']}; tiles derived from the masks, per-step "
                        "key intervals into attn_sparse.blocks"
                        if layout == "sparse"
                        else f"{world} ranks, {layout}, {c['dtype']}; per-step blocks from attn_core.blocks"
                    ),
                    max_error=c["errs"][j],
                    tolerance=c["tols"][j],
                    time_ms=max(cc["ms"] for cc in case) if label == "bwd" else None,
                    ok=all(r <= 1.0 for r in ratios),
                    note="worst rank; time = fwd+bwd" if label == "bwd" else "worst rank",
                )
            )
    _plot_balance(ctx, max(world, 4))
    ctx.notes.append(
        f"ring: {world}-rank {backend} ring; rows report the worst rank's error against float64 dense attention "
        "on the gathered sequence; ring_balance.png shows zigzag equalising causal work across ranks."
    )
    return rows
