"""Ring block-sparse attention with token masks (causal, windows, packed documents) in real gloo worlds
of 1-4 processes, with tiles derived from the masks (``layout=None``) or a given layout intersected
with them: outputs and q/k/v gradients against the float64 reference on the gathered sequence, only
key blocks that a receiver's queries see (through an active tile) on the wire, and option mismatches
(window, documents included) raising ValueError on every rank.

Each rank is this file run as a script (``python test_ring_sparse_masks.py RANK WORLD STORE``): the
tests import in importlib mode, so spawned children could not import a function from here by name.
A rank prints the names of the cases it passed as JSON; the parent kills every rank after a bound.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

pytest.importorskip("attn_sparse.layout", reason="attn-sparse (attn-ring[sparse]) is not installed")

from attn_core import reference
from attn_core.testing import assert_close_to_reference
from attn_core.triton_env import interpret_mode, triton_installed
from attn_ring.exchange import last_stats, reset_stats
from attn_ring.ring_sparse import RingSparsePlan, derived_block_size, plan_ring_sparse, ring_block_sparse_attention
from attn_sparse.layout import BlockLayout
from attn_sparse.masks import TokenMask

B, H, HKV, D = 1, 4, 2, 8  # GQA: two query heads per kv head
RANK_TIMEOUT_S = 150


def test_derived_block_size() -> None:
    assert derived_block_size(1024) == (128, 128)
    assert derived_block_size(64) == (64, 64)
    assert derived_block_size(48) == (16, 16)
    for bad in (24, 8):
        with pytest.raises(ValueError, match=f"shard length {bad} must be a multiple of 16"):
            derived_block_size(bad)
    with pytest.raises(ValueError, match="positive int"):
        derived_block_size(0)


def _expect_value_error(match: str, call: Callable[[], object]) -> None:
    try:
        call()
    except ValueError as exc:
        if match not in str(exc):
            raise AssertionError(f"ValueError without {match!r}: {exc}") from exc
        return
    raise AssertionError(f"no ValueError (expected one mentioning {match!r})")


def _inputs(n_total: int, batch: int, seed: int, head_dim: int = D) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, n_total, h, head_dim, generator=g, dtype=torch.float64) for h in (H, HKV, HKV, H)]


def _triton_runs_here() -> bool:
    """attn_sparse's Triton kernels take fp32 CPU tensors of head dim 16 (installed, interpreter selected)."""
    return triton_installed() and interpret_mode()


def _documents(N: int) -> torch.Tensor:
    """cu_seqlens over N tokens: 1-token documents at 0, 1, 30 and 50, the others crossing shard boundaries."""
    cuts = [c for c in (0, 1, 2, 30, 31, 50, 51, 80, 130, 131) if c < N]
    return torch.tensor([*cuts, N], dtype=torch.int32)


def _check_against_reference(
    rank: int,
    world: int,
    n: int,
    batch: int,
    layout: BlockLayout | None,
    block_mask: torch.Tensor,
    bs: int,
    seed: int,
    *,
    causal: bool = True,
    window: tuple[int, int] | None = None,
    documents: bool = False,
    dtype: torch.dtype = torch.float64,
    head_dim: int = D,
) -> RingSparsePlan:
    """This rank's output and gradients against the float64 reference on the gathered sequence (in
    a lower ``dtype``: at most 2x the error of plain PyTorch in it), the bytes received against the
    plan of the layout the call used, and every block this rank received holding a key that one of
    its queries sees through an active tile. Returns that plan."""
    N = n * world
    q, k, v, dout = _inputs(N, batch, seed, head_dim)
    cu = _documents(N) if documents else None
    lo, hi = rank * n, (rank + 1) * n

    def gathered(dt: torch.dtype) -> list[torch.Tensor]:
        """out, dq, dk, dv of this rank's shard, from the whole sequence in ``dt``."""
        qr, kr, vr = (t.to(dt, copy=True).requires_grad_() for t in (q, k, v))
        ref, _ = reference.block_sparse_attention(
            qr, kr, vr, block_mask, (bs, bs), is_causal=causal, window_size=window, cu_seqlens=cu, dtype=dt
        )
        grads = torch.autograd.grad(ref, (qr, kr, vr), dout.to(dt))
        return [t.detach()[:, lo:hi] for t in (ref, *grads)]

    want = gathered(torch.float64)
    base = None if dtype == torch.float64 else gathered(dtype)
    shard = [t[:, lo:hi].to(dtype).contiguous().requires_grad_() for t in (q, k, v)]
    reset_stats()
    out = ring_block_sparse_attention(*shard, layout, is_causal=causal, window_size=window, cu_seqlens=cu, timeout_s=60)
    stats = last_stats()  # counts the forward's K/V and the backward's dK/dV
    out.backward(dout[:, lo:hi].to(dtype))
    received = stats.bytes_received
    case = f"[W={world} rank {rank} n={n} causal={causal} window={window} documents={documents} {dtype}]"
    for i, (label, actual) in enumerate(zip(("out", "dq", "dk", "dv"), (out, *(s.grad for s in shard)))):
        assert_close_to_reference(f"{case} {label}", actual, want[i], None if base is None else base[i])
    mask = TokenMask.build(
        is_causal=causal, window_size=window, cu_seqlens=cu, batch=batch, seq_len_q=N, seq_len_k=N, device=q.device
    )
    if layout is None:
        used = mask.layout(N, N, derived_block_size(n), q.device)
    else:
        used = layout & mask.layout(N, N, layout.block_size, q.device)
    plan = plan_ring_sparse(used, N, world, is_causal=causal)
    # a block travels only if some query of the receiver sees one of its keys through an active tile
    seen = reference.block_sparse_weights(block_mask, (bs, bs), N, N).any(0) & mask.dense(N, N)
    bk = plan.block_size[1]
    for (a, b), blocks in plan.blocks.items():
        if b == rank:
            for blk in (blocks + a * (n // bk)).tolist():
                if not bool(seen[lo:hi, blk * bk : (blk + 1) * bk].any()):
                    raise AssertionError(f"{case}: received key block {blk} from rank {a}, which no query here sees")
    size = q.new_empty((), dtype=dtype).element_size()
    kv_bytes = plan.bytes_received(rank, batch=batch, num_kv_heads=HKV, head_dim=head_dim, element_size=size)
    sent = sum(int(t.numel()) for (a, _), t in plan.blocks.items() if a == rank)
    # dK/dV of our blocks, back from their users (fp32 for fp32 inputs)
    returned = sent * plan.block_size[1] * 2 * batch * HKV * head_dim * size
    if received != kv_bytes + returned:
        raise AssertionError(f"rank {rank}: received {received} bytes, the plan says {kv_bytes} + {returned}")
    if layout is None and window is None and not documents and plan.skipped_steps(rank) != world - 1 - rank:
        # causal: only earlier ranks' keys
        raise AssertionError(f"rank {rank}: skipped {plan.skipped_steps(rank)} of {world - 1} ring steps")
    return plan


def run_rank(rank: int, world: int) -> list[str]:
    """Every case on this rank of an initialised gloo world; returns the names of the cases passed."""
    done = []
    n = 32
    x = torch.randn(B, n, H, D, dtype=torch.float64)
    kx = torch.randn(B, n, HKV, D, dtype=torch.float64)
    given = BlockLayout.from_dense(torch.ones(1, n * world // 16, n * world // 16, dtype=torch.bool), block_size=16)
    short, short_kv = torch.randn(B, 24, H, D, dtype=torch.float64), torch.randn(B, 24, HKV, D, dtype=torch.float64)
    N = n * world
    x1, kx1 = x[:1], kx[:1]  # documents need B == 1
    errors: list[tuple[str, str, Callable[[], object]]] = [
        ("no mask", "derives the tiles from the token masks", lambda: ring_block_sparse_attention(x, kx, kx)),
        (
            "shard of 24 tokens",
            "shard length 24 must be a multiple of 16",
            lambda: ring_block_sparse_attention(short, short_kv, short_kv, is_causal=True),
        ),
        (
            "bad window",
            "window_size sides must be >= -1",
            lambda: ring_block_sparse_attention(x, kx, kx, window_size=(4, -2)),
        ),
        (
            "documents short of N",
            f"must end at the sequence length N = {N}",
            lambda: ring_block_sparse_attention(
                x1, kx1, kx1, cu_seqlens=torch.tensor([0, 5, N - 1], dtype=torch.int32)
            ),
        ),
    ]
    if world > 1:
        errors += [
            (
                "is_causal differs",
                "is_causal=",
                lambda: ring_block_sparse_attention(x, kx, kx, given, is_causal=rank == 0),
            ),
            (
                "layout given on one rank only",
                "layout=",
                lambda: ring_block_sparse_attention(x, kx, kx, given if rank == 0 else None, is_causal=True),
            ),
            (
                "window differs",
                "window_left=",
                lambda: ring_block_sparse_attention(x, kx, kx, is_causal=True, window_size=(5 + (rank == 1), -1)),
            ),
            (
                "documents differ",
                "cu_seqlens=",
                lambda: ring_block_sparse_attention(
                    x1, kx1, kx1, cu_seqlens=torch.tensor([0, 3 + (rank == world - 1), N], dtype=torch.int32)
                ),
            ),
        ]
    # errors first: each is raised on every rank and leaves the group usable for the cases after it
    for name, match, call in errors:
        _expect_value_error(match, call)
        done.append(name)
    # derived tiles: 16-token tiles (48 is no multiple of 32), then 64-token tiles with a batch of 2
    for seed, (n, batch) in enumerate(((48, 1), (64, 2))):
        N = n * world
        _check_against_reference(
            rank, world, n, batch, None, torch.ones(1, N // 16, N // 16, dtype=torch.bool), 16, seed
        )
        done.append(f"derived n={n}")
    # a given per-head layout intersected with the causal mask
    N = 32 * world
    mask = torch.rand(H, N // 16, N // 16, generator=torch.Generator().manual_seed(7 + world)) < 0.45
    _check_against_reference(rank, world, 32, 1, BlockLayout.from_dense(mask, block_size=16), mask, 16, 10)
    done.append("given layout, causal")
    # windows and documents (n = 48: 16-token derived tiles, 3 per shard)
    n = 48
    N = n * world
    everything = torch.ones(1, N // 16, N // 16, dtype=torch.bool)
    plan = _check_against_reference(rank, world, n, 2, None, everything, 16, 20, window=(5, -1))
    if plan.skipped_steps(rank) != world - 1 - min(rank, 1):  # a window shorter than a shard: one ring step
        raise AssertionError(f"rank {rank}: window (5, -1) skipped {plan.skipped_steps(rank)} of {world - 1} steps")
    done.append("derived, causal window < tile")
    _check_against_reference(rank, world, n, 1, None, everything, 16, 21, window=(70, -1))
    done.append("derived, causal window > shard")
    _check_against_reference(rank, world, n, 1, None, everything, 16, 22, causal=False, documents=True)
    done.append("derived, documents")
    _check_against_reference(rank, world, n, 1, None, everything, 16, 23, causal=False, window=(20, 3), documents=True)
    done.append("derived, window + documents")
    per_head = torch.rand(H, N // 16, N // 16, generator=torch.Generator().manual_seed(30 + world)) < 0.6
    per_head[:, 1] = False  # a query block that sees no key: out 0, zero gradients
    given_per_head = BlockLayout.from_dense(per_head, block_size=16)
    _check_against_reference(rank, world, n, 1, given_per_head, per_head, 16, 24, window=(9, -1), documents=True)
    done.append("given layout, causal window + documents")
    _check_against_reference(rank, world, n, 2, given_per_head, per_head, 16, 25, causal=False, window=(30, 12))
    done.append("given layout, window")
    if _triton_runs_here():  # the kernels with per-row bounds, in Triton's interpreter (fp32, head dim 16)
        _check_against_reference(
            rank, world, 32, 1, None, torch.ones(1, 2 * world, 2 * world, dtype=torch.bool), 16, 26,
            window=(20, -1), documents=True, dtype=torch.float32, head_dim=16,
        )  # fmt: skip
        done.append("triton kernels, causal window + documents")
    return done


def _expected(world: int) -> list[str]:
    mismatches = (
        ["is_causal differs", "layout given on one rank only", "window differs", "documents differ"]
        if world > 1
        else []
    )
    masked = [
        "derived, causal window < tile",
        "derived, causal window > shard",
        "derived, documents",
        "derived, window + documents",
        "given layout, causal window + documents",
        "given layout, window",
    ]
    if _triton_runs_here():
        masked.append("triton kernels, causal window + documents")
    return [
        "no mask",
        "shard of 24 tokens",
        "bad window",
        "documents short of N",
        *mismatches,
        "derived n=48",
        "derived n=64",
        "given layout, causal",
        *masked,
    ]


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_derived_tiles_in_a_gloo_world(world: int, tmp_path: Path) -> None:
    store = tmp_path / "store"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ranks = [
        subprocess.Popen(
            [sys.executable, __file__, str(r), str(world), str(store)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for r in range(world)
    ]
    outputs = []
    try:
        for p in ranks:
            outputs.append(p.communicate(timeout=RANK_TIMEOUT_S))
    finally:
        for p in ranks:  # a hung rank fails the test instead of hanging it
            if p.poll() is None:
                p.kill()
                p.wait()
    for r, (p, (out, err)) in enumerate(zip(ranks, outputs)):
        assert p.returncode == 0, f"rank {r} of {world} failed:\n{err}"
        assert json.loads(out.strip().splitlines()[-1]) == _expected(world), f"rank {r}: {out}"


if __name__ == "__main__":  # one rank of test_derived_tiles_in_a_gloo_world
    rank_arg, world_arg, store_arg = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    torch.set_num_threads(1)  # the ranks share the machine's few cores
    dist.init_process_group(
        "gloo",
        store=dist.FileStore(store_arg, world_arg),
        rank=rank_arg,
        world_size=world_arg,
        timeout=timedelta(seconds=60),
    )
    try:
        print(json.dumps(run_rank(rank_arg, world_arg)))
    finally:
        dist.destroy_process_group()
