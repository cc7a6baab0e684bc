"""Ring dilated attention across real processes vs attn_core.reference.dilated_attention on the gathered sequence.

Every rank builds the same global inputs from a shared seed, runs ring_dilated_attention on its
shard, and compares its output shard and its q/k/v gradient shards with float64 autograd through
the dense-masked reference. Cases cover segments shorter than, equal to and longer than a shard,
shards not aligned with segments, a short last segment, causal and not, GQA, padding (including
fully padded rows) and both head modes. Under gloo the ranks use the CPU; under NCCL
(integration_tests/run_nccl.py) each rank uses its GPU.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import torch
import torch.distributed as dist
from harness import rank_device

from attn_core import MultiheadDilatedAttention, reference
from attn_core.testing import assert_close_to_reference
from attn_ring.exchange import last_stats, reset_stats
from attn_ring.modules_dilated import RingMultiheadDilatedAttention
from attn_ring.ring_dilated import plan_ring_dilated, ring_dilated_attention


@dataclass(frozen=True)
class Case:
    name: str
    shard: int  # tokens per rank
    segments: tuple[int, ...]
    rates: tuple[int, ...]
    heads: int = 4
    kv_heads: int = 4
    causal: bool = False
    padding: bool = False
    head_mode: str = "all"
    dtype: torch.dtype = torch.float64
    batch: int = 2
    head_dim: int = 8


def cases(world_size: int) -> list[Case]:
    return fixed_cases(world_size) + random_cases(world_size)


def fixed_cases(world_size: int) -> list[Case]:
    W = world_size
    return [
        # segments shorter than / equal to a shard, aligned: no communication at all
        Case("short+equal segments", 8, (4, 8), (1, 2)),
        Case("short segments causal gqa", 8, (2, 4), (1, 2), heads=4, kv_heads=2, causal=True),
        # segments longer than a shard: spanning 2 ranks, and the whole sequence
        Case("long segments", 6, (4, 12, 6 * W), (1, 2, 3 if (6 * W) % 3 == 0 else 1)),
        Case("long segments causal", 6, (12, 6 * W), (2, 2 if (6 * W) % 2 == 0 else 1), causal=True),
        # shards not aligned with segments, short last segment, GQA with per-head offsets
        Case("unaligned gqa", 5, (3, 8), (1, 4), heads=6, kv_heads=3),
        Case("unaligned gqa causal padded", 5, (3, 8), (1, 4), heads=6, kv_heads=2, causal=True, padding=True),
        Case("padding", 7, (4, 9), (2, 3), padding=True),
        # head_mode="split" with H not a multiple of the group count
        Case("split heads", 6, (3, 8, 16), (1, 2, 4), heads=5, kv_heads=1, head_mode="split"),
        Case("split heads causal", 6, (4, 10), (2, 2), heads=3, kv_heads=3, causal=True, head_mode="split"),
        # a single token per rank
        Case("one token per rank", 1, (2, 4), (1, 2), heads=2, kv_heads=1),
        # float32 under the project's tolerance rule (2x plain PyTorch fp32 error)
        Case("float32 long segments", 8, (4, 16), (1, 4), heads=4, kv_heads=2, dtype=torch.float32),
        # bf16: the view path adds gradients in bf16; received rows' dK/dV come back in fp32
        Case(
            "bfloat16 long segments causal gqa",
            8,
            (4, 16),
            (1, 2),
            heads=4,
            kv_heads=2,
            causal=True,
            dtype=torch.bfloat16,
            head_dim=16,
        ),
        Case(
            "bfloat16 split heads",
            6,
            (3, 8, 6 * W),
            (1, 2, 2 if (6 * W) % 2 == 0 else 1),
            heads=6,
            kv_heads=3,
            head_mode="split",
            dtype=torch.bfloat16,
            head_dim=16,
        ),
    ]


def random_cases(world_size: int, count: int = 4) -> list[Case]:
    """Seeded random valid configurations (same on every rank): shard lengths, segment lengths and
    rates, heads, GQA, causal, padding and head mode drawn independently."""
    import random

    rng = random.Random(77 + world_size)
    out = []
    for i in range(count):
        shard = rng.randint(1, 9)
        N = shard * world_size
        groups = rng.randint(1, 3)
        segs, rates = [], []
        for _ in range(groups):
            r = rng.choice([1, 1, 2, 3, 4])
            w = r * rng.randint(1, max(1, (N + 3) // r))
            segs.append(w)
            rates.append(r)
        kv = rng.choice([1, 2, 3])
        heads = kv * rng.randint(1, 3)
        out.append(
            Case(
                f"random {i}",
                shard,
                tuple(segs),
                tuple(rates),
                heads=heads,
                kv_heads=kv,
                causal=rng.random() < 0.5,
                padding=rng.random() < 0.4,
                head_mode=rng.choice(["all", "split"]),
                batch=rng.randint(1, 2),
            )
        )
    return out


def _inputs(case: Case, world_size: int, device: torch.device, seed: int):
    N = case.shard * world_size
    g = torch.Generator().manual_seed(seed)
    B, H, Hkv, D = case.batch, case.heads, case.kv_heads, case.head_dim
    q = torch.randn(B, N, H, D, generator=g, dtype=torch.float64)
    k = torch.randn(B, N, Hkv, D, generator=g, dtype=torch.float64)
    v = torch.randn(B, N, Hkv, D, generator=g, dtype=torch.float64)
    dout = torch.randn(B, N, H, D, generator=g, dtype=torch.float64)
    mask = None
    if case.padding:
        mask = torch.rand(B, N, generator=g) < 0.3
        mask[0] = True  # a batch row whose keys are all padding: every output 0, never NaN
    return q, k, v, dout, mask


def _reference(case: Case, q, k, v, dout, mask, dtype):
    qr, kr, vr = (t.to(dtype).detach().requires_grad_() for t in (q, k, v))
    out, _ = reference.dilated_attention(
        qr,
        kr,
        vr,
        case.segments,
        case.rates,
        is_causal=case.causal,
        key_padding_mask=mask,
        head_mode=case.head_mode,
        dtype=dtype,
    )
    out.backward(dout.to(out.dtype))
    return out.detach(), qr.grad, kr.grad, vr.grad


def run_case(case: Case, rank: int, world_size: int, seed: int) -> int:
    device = rank_device()
    q, k, v, dout, mask = _inputs(case, world_size, device, seed)
    lo, hi = rank * case.shard, (rank + 1) * case.shard
    shard = [t[:, lo:hi].to(device=device, dtype=case.dtype).contiguous().requires_grad_() for t in (q, k, v)]
    local_mask = None if mask is None else mask[:, lo:hi].to(device)
    reset_stats()
    out = ring_dilated_attention(
        *shard,
        case.segments,
        case.rates,
        is_causal=case.causal,
        key_padding_mask=local_mask,
        head_mode=case.head_mode,
    )
    stats = last_stats()
    out.backward(dout[:, lo:hi].to(device=device, dtype=case.dtype))
    if torch.isnan(out).any():
        raise AssertionError(f"{case.name}: NaN in output")
    ref = _reference(case, q, k, v, dout, mask, torch.float64)
    base = _reference(case, q, k, v, dout, mask, case.dtype) if case.dtype != torch.float64 else None
    names = ("out", "dq", "dk", "dv")
    got = (out, shard[0].grad, shard[1].grad, shard[2].grad)
    for i, (name, actual) in enumerate(zip(names, got)):
        if actual is None:
            raise AssertionError(f"{case.name}: no gradient for {name}")
        assert_close_to_reference(
            f"[{case.name}, W={world_size}, rank {rank}] {name}",
            actual.cpu(),
            ref[i][:, lo:hi],
            None if base is None else base[i][:, lo:hi],
        )
    # Bytes on the wire equal the plan's dilated-row minimum (forward K/V + backward dK/dV in fp32).
    plan = plan_ring_dilated(
        case.shard * world_size,
        world_size,
        case.heads,
        case.kv_heads,
        case.segments,
        case.rates,
        is_causal=case.causal,
        head_mode=case.head_mode,
    )
    elem = torch.empty(0, dtype=case.dtype).element_size()
    acc = 8 if case.dtype == torch.float64 else 4  # dK/dV of received rows travel back in fp32 (fp64)
    size = {"batch": case.batch, "head_dim": case.head_dim}
    fwd = plan.bytes_received(rank, **size, element_size=elem)
    want_received = fwd + plan.bytes_sent(rank, **size, element_size=acc)
    want_sent = plan.bytes_sent(rank, **size, element_size=elem) + plan.bytes_received(rank, **size, element_size=acc)
    if (stats.bytes_received, stats.bytes_sent) != (want_received, want_sent):
        raise AssertionError(
            f"{case.name}: moved (received, sent) = {(stats.bytes_received, stats.bytes_sent)} bytes, "
            f"the plan's dilated-row minimum is {(want_received, want_sent)}"
        )
    return fwd


# Cases that also run on the portable gather path (the view path, attn_core.sdpa_ops on strided
# views, takes every CPU call and bf16/fp16 CUDA calls; the gather path takes the rest).
GATHER_PATH_CASES = ("long segments causal", "unaligned gqa causal padded", "split heads", "float32 long segments")


def check_all_cases(rank: int, world_size: int) -> list[str]:
    import attn_ring.ring_dilated as rd

    done = []
    for i, case in enumerate(cases(world_size)):
        run_case(case, rank, world_size, seed=1000 * world_size + i)
        done.append(case.name)
    view_path = rd.view_path_available
    rd.view_path_available = lambda q: False  # force the gather path for these cases
    try:
        for i, case in enumerate(cases(world_size)):
            if case.name in GATHER_PATH_CASES:
                run_case(case, rank, world_size, seed=2000 * world_size + i)
                done.append(f"{case.name} (gather path)")
    finally:
        rd.view_path_available = view_path
    done.append(check_multihead_module(rank, world_size))
    return done


def check_mismatched_config_raises(rank: int, world_size: int) -> str:
    """A rank with a different segment length makes every rank raise ValueError (no hang)."""
    if world_size == 1:
        return "needs two ranks"
    device = rank_device()
    q = torch.randn(1, 4, 2, 8, device=device)
    segs = (4, 8) if rank != world_size - 1 else (4, 16)
    try:
        ring_dilated_attention(q, q, q, segs, (1, 2), timeout_s=60)
    except ValueError as exc:
        if "mismatched" not in str(exc):
            raise
        return "raised"
    raise AssertionError("mismatched configuration was not detected")


def check_multihead_module(rank: int, world_size: int) -> str:
    """RingMultiheadDilatedAttention on shards == attn_core's module on the whole sequence: outputs,
    input gradients, and parameter gradients summed over ranks."""
    device = rank_device()
    n, E, H, Hkv, segs, rates = 6, 16, 4, 2, (4, 12), (1, 2)
    N = n * world_size
    torch.manual_seed(3)
    ref = MultiheadDilatedAttention(E, H, segs, rates, num_kv_heads=Hkv, backend="reference", dtype=torch.float64)
    ring = RingMultiheadDilatedAttention(E, H, segs, rates, num_kv_heads=Hkv, dtype=torch.float64)
    ring.load_state_dict(ref.state_dict())
    ring.to(device)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, N, E, generator=g, dtype=torch.float64, requires_grad=True)
    dout = torch.randn(2, N, E, generator=g, dtype=torch.float64)
    out_ref, _ = ref(x, x, x, is_causal=True)
    out_ref.backward(dout)
    lo, hi = rank * n, (rank + 1) * n
    xs = x.detach()[:, lo:hi].to(device).requires_grad_()
    out, _ = ring(xs, xs, xs, is_causal=True)
    out.backward(dout[:, lo:hi].to(device))
    assert_close_to_reference(f"module out rank {rank}", out.detach().cpu(), out_ref.detach()[:, lo:hi])
    assert_close_to_reference(f"module dx rank {rank}", xs.grad.cpu(), x.grad[:, lo:hi])
    for (name, p_ring), p_ref in zip(ring.named_parameters(), ref.parameters()):
        grad = p_ring.grad.detach().clone()
        dist.all_reduce(grad)  # per-rank parameter gradients sum to the full-sequence gradient
        assert_close_to_reference(f"module d{name}", grad.cpu(), p_ref.grad)
    return "multihead module"


# ----------------------------------------------------------------------------- ring block-sparse


def _sparse_layouts(world_size: int, nblocks: int, heads: int):
    """(name, block mask (Hl, nb, nb), causal) cases; block size 16."""
    g = torch.Generator().manual_seed(11 + world_size)
    idx = torch.arange(nblocks)
    band = (idx[:, None] - idx[None, :] >= 0) & (idx[:, None] - idx[None, :] <= 1)  # local window of 2 blocks
    rand = torch.rand(heads, nblocks, nblocks, generator=g) < 0.35
    holes = rand.clone()
    holes[:, 0] = False  # query block 0 sees no key at all: output 0, zero gradients
    return [
        ("random per-head", rand, False),
        ("random per-head causal", rand, True),
        ("local window shared causal", band[None], True),
        ("local window shared", band[None], False),
        ("empty rows", holes, False),
    ]


def check_ring_sparse(rank: int, world_size: int) -> list[str]:
    from attn_ring.ring_sparse import plan_ring_sparse, ring_block_sparse_attention
    from attn_sparse.layout import BlockLayout

    device = rank_device()
    B, H, Hkv, D, bs, per_rank_blocks = 2, 4, 2, 8, 16, 2
    n = bs * per_rank_blocks
    N = n * world_size
    lo, hi = rank * n, (rank + 1) * n
    done = []
    for i, (name, mask, causal) in enumerate(_sparse_layouts(world_size, N // bs, H)):
        layout = BlockLayout.from_dense(mask, block_size=bs)
        g = torch.Generator().manual_seed(500 + i)
        q = torch.randn(B, N, H, D, generator=g, dtype=torch.float64)
        k = torch.randn(B, N, Hkv, D, generator=g, dtype=torch.float64)
        v = torch.randn(B, N, Hkv, D, generator=g, dtype=torch.float64)
        dout = torch.randn(B, N, H, D, generator=g, dtype=torch.float64)
        qr, kr, vr = (t.clone().requires_grad_() for t in (q, k, v))
        ref, _ = reference.block_sparse_attention(qr, kr, vr, mask, (bs, bs), is_causal=causal)
        ref.backward(dout)
        shard = [t[:, lo:hi].to(device).contiguous().requires_grad_() for t in (q, k, v)]
        reset_stats()
        out = ring_block_sparse_attention(*shard, layout, is_causal=causal)
        stats = last_stats()
        out.backward(dout[:, lo:hi].to(device))
        for label, actual, want in zip(
            ("out", "dq", "dk", "dv"), (out, *(s.grad for s in shard)), (ref, qr.grad, kr.grad, vr.grad)
        ):
            assert_close_to_reference(
                f"[sparse {name}, W={world_size}, rank {rank}] {label}", actual.cpu(), want[:, lo:hi]
            )
        plan = plan_ring_sparse(layout, N, world_size, is_causal=causal)
        fwd = plan.bytes_received(rank, batch=B, num_kv_heads=Hkv, head_dim=D, element_size=8)
        sent_back = sum(int(t.numel()) for (a, _), t in plan.blocks.items() if a == rank) * bs * 2 * B * Hkv * D * 8
        if stats.bytes_received != fwd + sent_back:
            raise AssertionError(f"sparse {name}: received {stats.bytes_received} bytes, plan says {fwd} + {sent_back}")
        if name == "local window shared causal" and plan.skipped_steps(rank) != max(world_size - 2, 0) + (rank == 0) * (
            world_size > 1
        ):
            raise AssertionError(f"sparse {name}: rank {rank} skipped {plan.skipped_steps(rank)} ring steps")
        done.append(name)
    return done


def check_ring_sparse_triton(rank: int, world_size: int) -> list[str]:
    """Ring block-sparse through attn_sparse's Triton kernels (CPU interpreter, fp32): outputs and
    gradients within 2x the plain fp32 error of the float64 reference."""
    import os

    os.environ["TRITON_INTERPRET"] = "1"  # read when attn_sparse.kernels is first imported (not yet)
    import attn_ring.ring_sparse as rs
    from attn_sparse.layout import BlockLayout

    B, H, Hkv, D, bs = 1, 4, 2, 16, 16
    n = 2 * bs
    N = n * world_size
    lo, hi = rank * n, (rank + 1) * n
    done = []
    for i, (name, mask, causal) in enumerate(_sparse_layouts(world_size, N // bs, H)):
        if name not in ("random per-head", "local window shared causal", "empty rows"):
            continue
        layout = BlockLayout.from_dense(mask, block_size=bs)
        g = torch.Generator().manual_seed(900 + i)
        q, k, v = (torch.randn(B, N, h, D, generator=g, dtype=torch.float64) for h in (H, Hkv, Hkv))
        dout = torch.randn(B, N, H, D, generator=g, dtype=torch.float64)
        shard = [t[:, lo:hi].float().contiguous().requires_grad_() for t in (q, k, v)]
        if not rs._triton_available(shard[0], layout, causal):
            return ["triton unavailable"]
        out = rs.ring_block_sparse_attention(*shard, layout, is_causal=causal)
        out.backward(dout[:, lo:hi].float())
        results = {}
        for dt in (torch.float64, torch.float32):
            qr, kr, vr = (t.detach().to(dt).clone().requires_grad_() for t in (q, k, v))
            ref, _ = reference.block_sparse_attention(qr, kr, vr, mask, (bs, bs), is_causal=causal, dtype=dt)
            ref.backward(dout.to(dt))
            results[dt] = [x[:, lo:hi] for x in (ref.detach(), qr.grad, kr.grad, vr.grad)]
        for j, (label, actual) in enumerate(zip(("out", "dq", "dk", "dv"), (out, *(s.grad for s in shard)))):
            assert_close_to_reference(
                f"[sparse triton {name}, W={world_size}, rank {rank}] {label}",
                actual,
                results[torch.float64][j],
                results[torch.float32][j],
            )
        done.append(name)
    return done


def has_triton() -> bool:
    return importlib.util.find_spec("triton") is not None


def has_attn_sparse() -> bool:
    """attn-sparse is an optional dependency of attn-ring: the sparse checks need it installed."""
    return (
        importlib.util.find_spec("attn_sparse") is not None
        and importlib.util.find_spec("attn_sparse.layout") is not None
    )


NCCL_CHECKS = [check_all_cases, check_mismatched_config_raises] + ([check_ring_sparse] if has_attn_sparse() else [])


def check_missing_peer_times_out(rank: int, world_size: int) -> str:
    """The last rank never calls: the others raise (TimeoutError, or the transport's RuntimeError) quickly."""
    import time

    if rank == world_size - 1:
        return "absent"
    q = torch.randn(1, 4, 2, 8, device=rank_device())
    t0 = time.monotonic()
    try:
        ring_dilated_attention(q, q, q, (8,), (2,), timeout_s=5)
    except (TimeoutError, RuntimeError) as exc:
        elapsed = time.monotonic() - t0
        if elapsed > 30:
            raise AssertionError(f"took {elapsed:.0f} s to notice the missing peer") from exc
        return "raised"
    raise AssertionError("a call with a missing peer returned")
