"""Ring attention over packed documents (cu_seqlens) across real processes vs the float64 dense
reference with the same cu_seqlens on the gathered sequence.

Every rank builds the same global inputs and offsets from a shared seed, runs ring_attention on
its shard and compares its output and q/k/v gradient shards with float64 autograd through
attn_core.reference.dense_attention(..., cu_seqlens=). Documents cross shard boundaries (one
spans three ranks when W >= 3), some have length 1, some are empty. Both layouts, causal and
not, GQA; on CUDA also bf16 shapes the flash varlen path takes. Steps whose blocks share no
document make no kernel call (counted). Offsets that differ between ranks, or that are invalid,
raise ValueError on every rank. Under gloo the ranks use the CPU; under NCCL
(integration_tests/run_nccl.py) each rank uses its GPU.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
from harness import expect_value_error, rank_device

import attn_ring.ring_packed as packed_mod
from attn_core import reference
from attn_core.testing import assert_close_to_reference
from attn_ring import HybridAttention, RingAttention, hybrid_mesh, ring_attention, shard_sequence


def documents(lengths: list[int], device: torch.device) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)


def mixed_documents(seq_len: int, shard: int, world_size: int, pattern: tuple[int, ...]) -> list[int]:
    """Lengths summing to seq_len: a document of length 1, an empty one, a long one (spanning
    three shards when W >= 3, else most of the sequence), then ``pattern`` repeated, an empty
    document at the end."""
    long = min(2 * shard + 1, seq_len - 2) if world_size >= 3 else max(seq_len - 3, 0)
    lengths = [1, 0, long]
    rest = seq_len - sum(lengths)
    i = 0
    while rest > 0:
        lengths.append(min(pattern[i % len(pattern)], rest))
        rest -= lengths[-1]
        i += 1
    return [*lengths, 0]


@dataclass(frozen=True)
class Case:
    name: str
    shard: int  # tokens per rank
    layout: str = "contiguous"
    causal: bool = False
    heads: int = 4
    kv_heads: int = 4
    dtype: torch.dtype = torch.float64
    head_dim: int = 8
    pattern: tuple[int, ...] = (2, 5, 1, 1, 3)


def cases(device: torch.device) -> list[Case]:
    out = [
        Case("contiguous", 6),
        Case("contiguous causal gqa", 6, causal=True, heads=4, kv_heads=2),
        Case("zigzag gqa mqa", 6, layout="zigzag", heads=3, kv_heads=1),
        Case("zigzag causal gqa", 8, layout="zigzag", causal=True, heads=4, kv_heads=2),
        Case("contiguous odd shard causal", 5, causal=True),
    ]
    if device.type == "cuda":  # documents long enough (and bf16, d64) for the flash varlen kernels
        for causal in (False, True):
            out.append(
                Case(
                    f"zigzag{' causal' if causal else ''} bf16 d64 long documents", 128, layout="zigzag",
                    causal=causal, kv_heads=2, dtype=torch.bfloat16, head_dim=64, pattern=(100, 70, 1, 0, 150),
                )
            )  # fmt: skip
    return out


def _global_inputs(case: Case, world_size: int, seed: int, device: torch.device) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    N = case.shard * world_size
    shapes = [(1, N, case.heads, case.head_dim), *[(1, N, case.kv_heads, case.head_dim)] * 2]
    return [torch.randn(s, generator=g, dtype=torch.float64).to(device) for s in [*shapes, shapes[0]]]


def _reference(inputs: list[torch.Tensor], cu: torch.Tensor, causal: bool, dtype: torch.dtype) -> list[torch.Tensor]:
    q, k, v = (t.to(dtype).detach().requires_grad_(True) for t in inputs[:3])
    out, _ = reference.dense_attention(q, k, v, is_causal=causal, cu_seqlens=cu, dtype=dtype)
    grads = torch.autograd.grad(out, (q, k, v), inputs[3].to(dtype))
    return [out.detach(), *grads]


def run_case(rank: int, world_size: int, case: Case, seed: int, device: torch.device, module: bool = False) -> None:
    N = case.shard * world_size
    cu = documents(mixed_documents(N, case.shard, world_size, case.pattern), device)
    inputs = _global_inputs(case, world_size, seed, device)
    ref = _reference(inputs, cu, case.causal, torch.float64)
    base = _reference(inputs, cu, case.causal, case.dtype) if case.dtype != torch.float64 else None

    def mine(t: torch.Tensor) -> torch.Tensor:
        return shard_sequence(t, world_size, rank, layout=case.layout)

    q, k, v, dout = (mine(t).to(case.dtype).contiguous() for t in inputs)
    q, k, v = (t.requires_grad_(True) for t in (q, k, v))
    if module:
        out = RingAttention(layout=case.layout, timeout_s=60)(q, k, v, is_causal=case.causal, cu_seqlens=cu)
    else:
        out = ring_attention(q, k, v, is_causal=case.causal, layout=case.layout, cu_seqlens=cu, timeout_s=60)
    got = [out, *torch.autograd.grad(out, (q, k, v), dout)]
    for i, what in enumerate(("out", "dq", "dk", "dv")):
        assert_close_to_reference(
            f"{case.name} (W={world_size}, rank {rank}) {what}",
            got[i],
            mine(ref[i]),
            mine(base[i]) if base is not None else None,
        )


def check_packed_cases(rank: int, world_size: int) -> list[str]:
    """Every case's output and gradients on this rank vs the float64 reference; returns what ran."""
    device = rank_device()
    names = []
    for i, case in enumerate(cases(device)):
        run_case(rank, world_size, case, seed=2000 + 10 * world_size + i, device=device)
        names.append(case.name)
    run_case(rank, world_size, Case("module zigzag causal", 4, layout="zigzag", causal=True), 9, device, module=True)
    names.append("module")
    names.append(_check_skipped_steps(rank, world_size, device))
    if world_size >= 4 and world_size % 2 == 0:
        _check_hybrid(rank, world_size, device)
        names.append("hybrid dense")
    return names


def _check_skipped_steps(rank: int, world_size: int, device: torch.device) -> str:
    """One document per shard: every rank makes one varlen call forward and one backward (its
    own block); the W - 1 other steps share no document and make none, while the K/V still
    travel (the result is still exact)."""
    calls = {"forward": 0, "backward": 0}
    orig_fwd, orig_bwd = packed_mod.varlen_forward, packed_mod.varlen_backward

    def fwd(*a: Any, **kw: Any) -> Any:
        calls["forward"] += 1
        return orig_fwd(*a, **kw)

    def bwd(*a: Any, **kw: Any) -> Any:
        calls["backward"] += 1
        return orig_bwd(*a, **kw)

    n = 4
    cu = documents([n] * world_size, device)
    inputs = _global_inputs(Case("shards", n), world_size, 11, device)
    q, k, v, dout = (shard_sequence(t, world_size, rank) for t in inputs)
    q, k, v = (t.requires_grad_(True) for t in (q, k, v))
    packed_mod.varlen_forward, packed_mod.varlen_backward = fwd, bwd  # type: ignore[assignment]
    try:
        out = ring_attention(q, k, v, cu_seqlens=cu, timeout_s=60)
        grads = torch.autograd.grad(out, (q, k, v), dout)
    finally:
        packed_mod.varlen_forward, packed_mod.varlen_backward = orig_fwd, orig_bwd  # type: ignore[assignment]
    if calls != {"forward": 1, "backward": 1}:
        raise AssertionError(f"{world_size} ring steps made {calls} varlen calls, expected one each way")
    ref = _reference(inputs, cu, False, torch.float64)
    for what, got, want in zip(("out", "dq", "dk", "dv"), (out, *grads), ref):
        assert_close_to_reference(f"skipped steps {what}", got, shard_sequence(want, world_size, rank))
    return "steps sharing no document make no call"


def _check_hybrid(rank: int, world_size: int, device: torch.device) -> None:
    """hybrid_attention(attention="dense", cu_seqlens=) on a 2 x (W/2) grid, zigzag causal."""
    mesh = hybrid_mesh(2, use_device_mesh=False)
    N = 4 * world_size
    cu = documents(mixed_documents(N, 4, world_size, (3, 1, 6)), device)
    inputs = _global_inputs(Case("hybrid", 4, heads=4, kv_heads=2), world_size, 13, device)
    q, k, v, dout = (mesh.shard(t, layout="zigzag") for t in inputs)
    q, k, v = (t.requires_grad_(True) for t in (q, k, v))
    module = HybridAttention(a2a_group=mesh.a2a_group, ring_group=mesh.ring_group, layout="zigzag", timeout_s=60)
    out = module(q, k, v, is_causal=True, cu_seqlens=cu)
    got = [out, *torch.autograd.grad(out, (q, k, v), dout)]
    ref = _reference(inputs, cu, True, torch.float64)
    for what, a, b in zip(("out", "dq", "dk", "dv"), got, ref):
        assert_close_to_reference(f"hybrid {what} (rank {rank})", a, mesh.shard(b, layout="zigzag"))


def check_packed_errors(rank: int, world_size: int) -> list[str]:
    """Offsets that differ on one rank, and invalid offsets on all: ValueError on every rank, fast."""
    device = rank_device()
    t0 = time.monotonic()
    done = []
    n = 4
    N = n * world_size
    q, k, v = (torch.randn(1, n, 2, 4, device=device) for _ in range(3))
    if world_size > 1:
        cu = documents([1, N - 1] if rank == world_size - 1 else [2, N - 2], device)
        expect_value_error(lambda: ring_attention(q, k, v, cu_seqlens=cu, timeout_s=30), "cu_seqlens")
        done.append("offsets differ")
        cu = None if rank == 0 else documents([N], device)
        expect_value_error(lambda: ring_attention(q, k, v, cu_seqlens=cu, timeout_s=30), "cu_seqlens")
        done.append("offsets on some ranks only")
    bad = documents([2, N - 1], device)  # ends at N + 1
    expect_value_error(lambda: ring_attention(q, k, v, cu_seqlens=bad, timeout_s=30), f"cu_seqlens[-1] = {N + 1}")
    done.append("offsets past the sequence")
    wrong = torch.tensor([0, N], dtype=torch.int64, device=device)
    expect_value_error(lambda: ring_attention(q, k, v, cu_seqlens=wrong, timeout_s=30), "torch.int64")
    done.append("offsets not int32")
    out = ring_attention(q, k, v, cu_seqlens=documents([N], device), timeout_s=30)
    if not torch.isfinite(out).all():
        raise AssertionError("ring produced non-finite values after the error cases")
    done.append("still works")
    if time.monotonic() - t0 > 60:
        raise AssertionError(f"error cases took {time.monotonic() - t0:.0f} s: a mismatch must fail fast")
    return done


NCCL_CHECKS = [check_packed_cases, check_packed_errors]
