"""Ring block-sparse attention with tiles derived from the token masks (``layout=None``) in real gloo
worlds of 1-4 processes: outputs and q/k/v gradients against the float64 reference on the gathered
sequence, only the needed key blocks on the wire, and option mismatches raising ValueError on every rank.

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
from attn_ring.exchange import last_stats, reset_stats
from attn_ring.ring_sparse import derived_block_size, plan_ring_sparse, ring_block_sparse_attention
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


def _inputs(n_total: int, batch: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, n_total, h, D, generator=g, dtype=torch.float64) for h in (H, HKV, HKV, H)]


def _check_against_reference(
    rank: int, world: int, n: int, batch: int, layout: BlockLayout | None, block_mask: torch.Tensor, bs: int, seed: int
) -> None:
    """This rank's output and gradients against the float64 reference on the gathered sequence, and
    the bytes received against the plan of the layout the call used."""
    N = n * world
    q, k, v, dout = _inputs(N, batch, seed)
    lo, hi = rank * n, (rank + 1) * n
    qr, kr, vr = (t.clone().requires_grad_() for t in (q, k, v))
    ref, _ = reference.block_sparse_attention(qr, kr, vr, block_mask, (bs, bs), is_causal=True)
    ref.backward(dout)
    shard = [t[:, lo:hi].contiguous().requires_grad_() for t in (q, k, v)]
    reset_stats()
    out = ring_block_sparse_attention(*shard, layout, is_causal=True, timeout_s=60)
    stats = last_stats()  # counts the forward's K/V and the backward's dK/dV
    out.backward(dout[:, lo:hi])
    received = stats.bytes_received
    for label, actual, want in zip(
        ("out", "dq", "dk", "dv"), (out, *(s.grad for s in shard)), (ref, *(t.grad for t in (qr, kr, vr)))
    ):
        assert_close_to_reference(f"[W={world} rank {rank} n={n}] {label}", actual, want[:, lo:hi])
    used = layout if layout is not None else TokenMask.causal_only(True).layout(N, N, derived_block_size(n), q.device)
    plan = plan_ring_sparse(used, N, world, is_causal=True)
    kv_bytes = plan.bytes_received(rank, batch=batch, num_kv_heads=HKV, head_dim=D, element_size=8)
    sent = sum(int(t.numel()) for (a, _), t in plan.blocks.items() if a == rank)
    returned = sent * plan.block_size[1] * 2 * batch * HKV * D * 8  # dK/dV of our blocks, back from their users
    if received != kv_bytes + returned:
        raise AssertionError(f"rank {rank}: received {received} bytes, the plan says {kv_bytes} + {returned}")
    if layout is None and plan.skipped_steps(rank) != world - 1 - rank:  # causal: only earlier ranks' keys
        raise AssertionError(f"rank {rank}: skipped {plan.skipped_steps(rank)} of {world - 1} ring steps")


def run_rank(rank: int, world: int) -> list[str]:
    """Every case on this rank of an initialised gloo world; returns the names of the cases passed."""
    done = []
    n = 32
    x = torch.randn(B, n, H, D, dtype=torch.float64)
    kx = torch.randn(B, n, HKV, D, dtype=torch.float64)
    given = BlockLayout.from_dense(torch.ones(1, n * world // 16, n * world // 16, dtype=torch.bool), block_size=16)
    short, short_kv = torch.randn(B, 24, H, D, dtype=torch.float64), torch.randn(B, 24, HKV, D, dtype=torch.float64)
    errors: list[tuple[str, str, Callable[[], object]]] = [
        ("no mask", "derives the tiles from the token masks", lambda: ring_block_sparse_attention(x, kx, kx)),
        (
            "shard of 24 tokens",
            "shard length 24 must be a multiple of 16",
            lambda: ring_block_sparse_attention(short, short_kv, short_kv, is_causal=True),
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
    return done


def _expected(world: int) -> list[str]:
    mismatches = ["is_causal differs", "layout given on one rank only"] if world > 1 else []
    return ["no mask", "shard of 24 tokens", *mismatches, "derived n=48", "derived n=64", "given layout, causal"]


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
