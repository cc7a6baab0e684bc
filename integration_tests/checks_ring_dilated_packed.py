"""Ring dilated attention over packed documents (cu_seqlens) in real processes vs
attn_core.reference.dilated_attention(..., cu_seqlens=) on the gathered sequence, in float64
(and float32 and float16 on the strided-rows kernels, under the 2x rule, where Triton's
interpreter runs).

Every rank builds the same global inputs and offsets from a shared seed, runs
ring_dilated_attention on its shard and compares its output and q/k/v gradient shards. The
documents cross shard boundaries: one spans three ranks (W >= 3), and there are documents of
length 1, empty ones, ones shorter than the smallest segment and longer than the largest.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from harness import rank_device

from attn_core import packed_views, reference, strided_varlen
from attn_core.testing import assert_close_to_reference
from attn_ring.hybrid import hybrid_attention, hybrid_mesh
from attn_ring.modules_dilated import RingDilatedAttention
from attn_ring.ring_dilated import ring_dilated_attention

SHARD = 8  # tokens per rank


@dataclass(frozen=True)
class PackedCase:
    name: str
    segments: tuple[int, ...]
    rates: tuple[int, ...]
    heads: int = 4
    kv_heads: int = 4
    causal: bool = False
    head_mode: str = "all"
    padding: bool = False
    random_documents: bool = False


CASES = [
    PackedCase("packed", (3, 6, 16), (1, 2, 4)),
    PackedCase("packed causal gqa", (3, 6, 16), (1, 2, 4), heads=6, kv_heads=2, causal=True),
    PackedCase("packed split heads", (2, 4, 12), (1, 2, 3), heads=5, kv_heads=1, head_mode="split"),
    PackedCase("packed split causal padded", (3, 6, 16), (1, 3, 2), head_mode="split", causal=True, padding=True),
    PackedCase("random documents", (3, 5, 10), (1, 5, 2), heads=4, kv_heads=2, random_documents=True),
    PackedCase("random documents causal", (4, 8), (2, 4), causal=True, random_documents=True),
]


def document_offsets(world_size: int, seed: int, random_documents: bool) -> torch.Tensor:
    """int32 cu_seqlens of N = SHARD * world_size tokens: length 1, empty, short (2 < every segment),
    one long document (N - 8 tokens from position 3: more than two shards for W >= 3, longer than the
    largest segment for W >= 3), then short ones; or random cuts (duplicates: empty documents)."""
    N = SHARD * world_size
    if random_documents:
        g = torch.Generator().manual_seed(seed)
        cuts = torch.randint(0, N + 1, (world_size + 2,), generator=g).sort().values
        offsets = [0, *cuts.tolist(), N]
    else:
        long_doc = N - 8
        offsets = [0, 1, 1, 3, 3 + long_doc, 3 + long_doc + 2, N - 1, N]
    return torch.tensor(offsets, dtype=torch.int32)


def _inputs(case: PackedCase, world_size: int, seed: int):
    N = SHARD * world_size
    g = torch.Generator().manual_seed(seed)
    H, Hkv, D = case.heads, case.kv_heads, 8
    q = torch.randn(1, N, H, D, generator=g, dtype=torch.float64)
    k = torch.randn(1, N, Hkv, D, generator=g, dtype=torch.float64)
    v = torch.randn(1, N, Hkv, D, generator=g, dtype=torch.float64)
    dout = torch.randn(1, N, H, D, generator=g, dtype=torch.float64)
    mask = (torch.rand(1, N, generator=g) < 0.3) if case.padding else None
    return q, k, v, dout, mask


def _reference(case: PackedCase, q, k, v, dout, mask, cu, dtype=torch.float64):
    qr, kr, vr = (t.detach().to(dtype).requires_grad_() for t in (q, k, v))
    out, _ = reference.dilated_attention(
        qr, kr, vr, case.segments, case.rates,
        is_causal=case.causal, key_padding_mask=mask, head_mode=case.head_mode, cu_seqlens=cu, dtype=dtype,
    )  # fmt: skip
    out.backward(dout.to(dtype))
    return out.detach(), qr.grad, kr.grad, vr.grad


def _compare(label: str, got, ref, lo: int, hi: int, baseline=(None, None, None, None)) -> None:
    for name, actual, want, base in zip(("out", "dq", "dk", "dv"), got, ref, baseline):
        if actual is None:
            raise AssertionError(f"{label}: no gradient for {name}")
        assert_close_to_reference(f"{label} {name}", actual, want[:, lo:hi], None if base is None else base[:, lo:hi])


def run_case(case: PackedCase, rank: int, world_size: int, seed: int, dtype: torch.dtype = torch.float64) -> None:
    device = rank_device()
    cu = document_offsets(world_size, seed, case.random_documents)
    q, k, v, dout, mask = _inputs(case, world_size, seed)
    lo, hi = rank * SHARD, (rank + 1) * SHARD
    shard = [t[:, lo:hi].to(device, dtype).contiguous().requires_grad_() for t in (q, k, v)]
    out = ring_dilated_attention(
        *shard, case.segments, case.rates,
        is_causal=case.causal, head_mode=case.head_mode, cu_seqlens=cu.to(device),
        key_padding_mask=None if mask is None else mask[:, lo:hi].to(device),
    )  # fmt: skip
    out.backward(dout[:, lo:hi].to(device, dtype))
    got = tuple(None if t is None else t.cpu() for t in (out, shard[0].grad, shard[1].grad, shard[2].grad))
    _compare(
        f"[{case.name}, {dtype}, W={world_size}, rank {rank}, cu={cu.tolist()}]",
        got,
        _reference(case, q, k, v, dout, mask, cu),
        lo,
        hi,
        (None,) * 4 if dtype == torch.float64 else _reference(case, q, k, v, dout, mask, cu, dtype),
    )


def check_packed_cases(rank: int, world_size: int) -> list[str]:
    import attn_ring.ring_dilated as rd

    done = []
    for i, case in enumerate(CASES):
        run_case(case, rank, world_size, seed=100 * world_size + i)
        done.append(case.name)
    view_path = rd.view_path_available
    rd.view_path_available = lambda q: False  # the gather path on the same cases
    try:
        for i, case in enumerate(CASES[:4]):
            run_case(case, rank, world_size, seed=200 * world_size + i)
            done.append(f"{case.name} (gather path)")
    finally:
        rd.view_path_available = view_path
    probe = torch.empty(1, 1, 1, 8, device=rank_device())
    if not strided_varlen.unsupported_reasons(probe[0]):  # float32 on the strided-rows kernels
        built = []
        groups = rd.local_groups
        rd.local_groups = lambda plan, device, head_dim, **kw: built.append(1) or groups(plan, device, head_dim, **kw)
        names = ("STRIDED_MIN_WORK", "STRIDED_MIN_WORK_KERNEL_FORWARD", "STRIDED_MAX_PIECES")
        limits = {name: getattr(packed_views, name) for name in names}
        try:
            for i, case in enumerate(CASES):
                run_case(case, rank, world_size, seed=300 * world_size + i, dtype=torch.float32)
                done.append(f"{case.name} (strided kernels)")
            # the items with the most work as pieces beside the other items' tables (at most 3 pieces
            # per group: both kinds in one group); W 2 and 3 (documents crossing one and two shard
            # boundaries) keep CI's time in bounds
            packed_views.STRIDED_MIN_WORK, packed_views.STRIDED_MAX_PIECES = 0, 3
            packed_views.STRIDED_MIN_WORK_KERNEL_FORWARD = 0
            for i, case in enumerate(CASES[:4] if world_size in (2, 3) else []):
                run_case(case, rank, world_size, seed=400 * world_size + i, dtype=torch.float32)
                done.append(f"{case.name} (kernels and pieces)")
            # float16: gradients added in the inputs' dtype by the kernels and the pieces, received
            # rows' dK/dV back in fp32; the forward on the kernels alone (the passes' pieces differ)
            packed_views.STRIDED_MIN_WORK_KERNEL_FORWARD = 1 << 62
            for i, case in enumerate(CASES[:4] if world_size in (2, 3) else []):
                run_case(case, rank, world_size, seed=500 * world_size + i, dtype=torch.float16)
                done.append(f"{case.name} (kernels and pieces, float16)")
        finally:
            rd.local_groups = groups
            for name, value in limits.items():
                setattr(packed_views, name, value)
        expected = 2 * (len(CASES) + (8 if world_size in (2, 3) else 0))  # a forward's and a backward's
        if len(built) != expected:
            raise AssertionError(f"the strided kernels' groups were built {len(built)} times, not {expected}")
    return done


def check_bad_offsets_raise(rank: int, world_size: int) -> list[str]:
    """Invalid offsets (identical on every rank) raise ValueError on every rank; offsets that differ
    between ranks raise the handshake's mismatch error on every rank."""
    q = torch.randn(1, SHARD, 2, 8, dtype=torch.float64)
    N = SHARD * world_size
    bad = {
        "last offset != N": torch.tensor([0, N - 1], dtype=torch.int32),
        "decreasing": torch.tensor([0, 5, 3, N], dtype=torch.int32),
        "int64": torch.tensor([0, N], dtype=torch.int64),
    }
    done = []
    for name, cu in bad.items():
        try:
            ring_dilated_attention(q, q, q, (4,), (1,), cu_seqlens=cu, timeout_s=60)
        except ValueError as exc:
            if "cu_seqlens" not in str(exc):
                raise
            done.append(name)
        else:
            raise AssertionError(f"bad cu_seqlens ({name}) was accepted")
    if world_size > 1:
        mine = torch.tensor([0, 1 + rank, N], dtype=torch.int32)
        try:
            ring_dilated_attention(q, q, q, (4,), (1,), cu_seqlens=mine, timeout_s=60)
        except ValueError as exc:
            if "mismatched" not in str(exc):
                raise
            done.append("differs between ranks")
        else:
            raise AssertionError("cu_seqlens differing between ranks was accepted")
    return done


def check_module_and_hybrid(rank: int, world_size: int) -> list[str]:
    """RingDilatedAttention forwards cu_seqlens; hybrid_attention(attention='dilated') takes it (on an
    R x 2 grid for even W, so the ring runs head ranges; W x 1 otherwise)."""
    case = PackedCase("module", (3, 6, 16), (1, 2, 4), heads=4, kv_heads=2, causal=True)
    seed = 300 + world_size
    cu = document_offsets(world_size, seed, False)
    q, k, v, dout, _ = _inputs(case, world_size, seed)
    ref = _reference(case, q, k, v, dout, None, cu)
    lo, hi = rank * SHARD, (rank + 1) * SHARD
    shard = [t[:, lo:hi].contiguous().requires_grad_() for t in (q, k, v)]
    module = RingDilatedAttention(case.segments, case.rates)
    out = module(*shard, is_causal=True, cu_seqlens=cu)
    out.backward(dout[:, lo:hi])
    _compare(f"[module, W={world_size}, rank {rank}]", (out, *(t.grad for t in shard)), ref, lo, hi)
    done = ["module"]
    A = 2 if world_size % 2 == 0 else 1  # W = 2, 4: head ranges of the all-to-all group
    mesh = hybrid_mesh(A, use_device_mesh=False)
    pos = mesh.positions(SHARD * world_size)
    shard = [t[:, pos].contiguous().requires_grad_() for t in (q, k, v)]
    out = hybrid_attention(
        *shard, a2a_group=mesh.a2a_group, ring_group=mesh.ring_group, attention="dilated", is_causal=True,
        segment_lengths=case.segments, dilation_rates=case.rates, cu_seqlens=cu,
    )  # fmt: skip
    out.backward(dout[:, pos])
    label = f"[hybrid {mesh.ring_size}x{A}, rank {rank}]"
    for name, actual, want in zip(("out", "dq", "dk", "dv"), (out, *(t.grad for t in shard)), ref):
        assert_close_to_reference(f"{label} {name}", actual, want[:, pos], None)
    done.append("hybrid")
    dist.barrier()
    return done


# run on GPUs by run_nccl.py (float64: the gather path; the CPU run covers the view path too)
NCCL_CHECKS = [check_packed_cases]
