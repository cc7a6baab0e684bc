"""Ring attention across real processes vs attn_core.reference.dense_attention on the gathered sequence.

Every rank builds the same global inputs from a shared seed, runs ring_attention on its shard and
compares its output shard and its q/k/v gradient shards with float64 autograd through the
dense reference. Cases: causal and not, both layouts, GQA, odd shard lengths (contiguous),
float64 (exact up to rounding) and float32/bf16 (project tolerance rule against a plain PyTorch
computation in the same dtype). Under gloo the ranks use the CPU; under NCCL
(integration_tests/run_nccl.py) each rank uses its GPU.

Failure behaviour: mismatched shapes/dtypes/options raise ValueError on every rank (handshake);
a zigzag shard of odd length raises ValueError naming n on every rank; a rank that leaves in the
middle (after the forward, before the backward) makes the others raise within a bounded time.
"""

from __future__ import annotations

import importlib.util
import time
from dataclasses import dataclass
from typing import Any

import torch
from harness import expect_value_error, rank_device

from attn_core import reference
from attn_core.testing import assert_close_to_reference
from attn_ring import RingAttention, ring_attention, shard_sequence


@dataclass(frozen=True)
class Case:
    name: str
    shard: int  # tokens per rank
    layout: str = "contiguous"
    causal: bool = False
    heads: int = 4
    kv_heads: int = 4
    dtype: torch.dtype = torch.float64
    batch: int = 2
    head_dim: int = 8
    scale: float | None = None


def cases(world_size: int, device: torch.device) -> list[Case]:
    low = torch.bfloat16 if device.type == "cuda" else torch.float32
    out = [
        Case("contiguous", 4),
        Case("contiguous causal", 4, causal=True),
        Case("zigzag", 4, layout="zigzag"),
        Case("zigzag causal", 6, layout="zigzag", causal=True),
        Case("contiguous odd shard causal gqa", 5, causal=True, heads=6, kv_heads=2),
        Case("zigzag causal gqa mqa", 2, layout="zigzag", causal=True, heads=3, kv_heads=1, scale=0.3),
        Case("single token per rank", 1, causal=True, batch=1),
        Case("zigzag causal low precision", 8, layout="zigzag", causal=True, heads=4, kv_heads=2, dtype=low),
        Case("contiguous low precision", 6, dtype=low, head_dim=16),
    ]
    if device.type == "cuda":  # a shape the fast cuDNN/flash block path takes
        out.append(
            Case(
                "zigzag causal bf16 d64", 64, layout="zigzag", causal=True, heads=4, kv_heads=2, dtype=low, head_dim=64
            )
        )
    return out


def _global_inputs(case: Case, world_size: int, seed: int, device: torch.device) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    N = case.shard * world_size
    shapes = [
        (case.batch, N, case.heads, case.head_dim),
        (case.batch, N, case.kv_heads, case.head_dim),
        (case.batch, N, case.kv_heads, case.head_dim),
        (case.batch, N, case.heads, case.head_dim),  # dout
    ]
    return [torch.randn(s, generator=g, dtype=torch.float64).to(device) for s in shapes]


def _dense(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, case: Case, dtype: torch.dtype) -> torch.Tensor:
    out, _ = reference.dense_attention(q, k, v, is_causal=case.causal, softmax_scale=case.scale, dtype=dtype)
    return out


def _grads(
    inputs: list[torch.Tensor], case: Case, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    q, k, v, dout = (t.to(dtype) for t in inputs)
    q, k, v = (t.detach().requires_grad_(True) for t in (q, k, v))
    out = _dense(q, k, v, case, dtype)
    out.backward(dout)
    assert q.grad is not None and k.grad is not None and v.grad is not None
    return out.detach(), q.grad, k.grad, v.grad


def run_case(rank: int, world_size: int, case: Case, seed: int, device: torch.device) -> None:
    inputs = _global_inputs(case, world_size, seed, device)
    ref = _grads(inputs, case, torch.float64)
    base = _grads(inputs, case, case.dtype) if case.dtype != torch.float64 else None

    def mine(t: torch.Tensor) -> torch.Tensor:
        return shard_sequence(t, world_size, rank, layout=case.layout)

    q, k, v, dout = (mine(t).to(case.dtype).contiguous() for t in inputs)
    q, k, v = (t.requires_grad_(True) for t in (q, k, v))
    out = ring_attention(q, k, v, is_causal=case.causal, layout=case.layout, softmax_scale=case.scale, timeout_s=60)
    if out.shape != q.shape or out.dtype != q.dtype:
        raise AssertionError(f"{case.name}: output {tuple(out.shape)} {out.dtype}, expected {tuple(q.shape)} {q.dtype}")
    out.backward(dout)
    got = [out, q.grad, k.grad, v.grad]
    for i, what in enumerate(("out", "dq", "dk", "dv")):
        g = got[i]
        assert g is not None
        assert_close_to_reference(
            f"{case.name} (W={world_size}, rank {rank}) {what}",
            g,
            mine(ref[i]),
            mine(base[i]) if base is not None else None,
        )


def check_all_cases(rank: int, world_size: int, device_type: str | None = None) -> list[str]:
    """Every case's outputs and gradients on this rank vs the float64 reference; returns the case names.

    device_type="cuda" under gloo runs the ranks' compute on CUDA (all ranks may share one GPU)
    while the ring moves through host memory: the fast per-block kernels then see every piece
    of the multi-rank schedule even on a single-GPU machine.
    """
    device = (
        rank_device()
        if device_type is None
        else torch.device("cuda", 0)
        if device_type == "cuda"
        else torch.device(device_type)
    )
    names = []
    for i, case in enumerate(cases(world_size, device)):
        run_case(rank, world_size, case, seed=1000 + i, device=device)
        names.append(case.name)
    # the module with the serialized (no-overlap) schedule must give the same result
    case = Case("module serialized", 4, layout="zigzag", causal=True)
    inputs = _global_inputs(case, world_size, 7, device)
    q, k, v, _ = (shard_sequence(t, world_size, rank, layout="zigzag") for t in inputs)
    mod = RingAttention(layout="zigzag", timeout_s=60)
    a = mod(q, k, v, is_causal=True)
    b = ring_attention(q, k, v, is_causal=True, layout="zigzag", overlap=False, timeout_s=60)
    ref, _ = reference.dense_attention(*inputs[:3], is_causal=True)
    assert_close_to_reference("module", a, shard_sequence(ref, world_size, rank, layout="zigzag"))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    names.append(case.name)
    if world_size > 1:
        _check_schedule(rank, world_size, device)
        names.append("transfers overlap compute, double buffered")
    if has_memory_runtime():
        _check_pool_buffers(rank, world_size, device)
        names.append("memory_runtime buffer pool")
    return names


def _check_schedule(rank: int, world_size: int, device: torch.device) -> None:
    """The next block's transfer is posted before the current block is computed, and waited for after;
    a forward uses exactly two receive buffers (double buffering) whatever the ring size."""
    import attn_ring.comm as comm_mod
    import attn_ring.ring as ring_mod

    events: list[str] = []
    orig_fwd, orig_post, orig_wait = ring_mod.block_forward, comm_mod.RingComm.send_recv, comm_mod.PendingTransfer.wait

    def fwd(*a: Any, **kw: Any) -> Any:
        events.append("compute")
        return orig_fwd(*a, **kw)

    def post(self: Any, *a: Any, **kw: Any) -> Any:
        events.append("post")
        return orig_post(self, *a, **kw)

    def wait(self: Any) -> Any:
        events.append("wait")
        return orig_wait(self)

    class Counting:
        acquired = 0
        released = 0

        def acquire(self, shape: Any, dtype: torch.dtype, device: Any) -> torch.Tensor:
            Counting.acquired += 1
            return torch.empty(tuple(shape), dtype=dtype, device=device)

        def release(self, tensor: torch.Tensor) -> None:
            Counting.released += 1

    q, k, v = (torch.randn(1, 4, 2, 8, device=device) for _ in range(3))
    ring_mod.block_forward, comm_mod.RingComm.send_recv, comm_mod.PendingTransfer.wait = fwd, post, wait  # type: ignore[assignment,method-assign]
    try:
        ring_attention(q, k, v, buffers=Counting(), timeout_s=60)
        overlapped = list(events)
        events.clear()
        ring_attention(q, k, v, overlap=False, timeout_s=60)
        serialized = list(events)
    finally:
        ring_mod.block_forward, comm_mod.RingComm.send_recv, comm_mod.PendingTransfer.wait = (
            orig_fwd,
            orig_post,
            orig_wait,
        )  # type: ignore[method-assign]
    want = ["post", "compute", "wait"] * (world_size - 1) + ["compute"]
    if overlapped != want:
        raise AssertionError(f"overlapped schedule {overlapped}, expected {want}")
    if serialized[:3] != ["post", "wait", "compute"]:
        raise AssertionError(f"serialized schedule starts {serialized[:3]}, expected post, wait, compute")
    if (Counting.acquired, Counting.released) != (2, 2):
        raise AssertionError(
            f"forward acquired {Counting.acquired} / released {Counting.released} buffers, expected 2 / 2"
        )


def has_memory_runtime() -> bool:
    return importlib.util.find_spec("memory_runtime") is not None


def _check_pool_buffers(rank: int, world_size: int, device: torch.device) -> None:
    """Receive buffers from memory_runtime's DeviceBufferPool: same result, every buffer given back."""
    from memory_runtime import DeviceBufferPool

    pool = DeviceBufferPool(rank_device())  # receive buffers live where the wire is (CPU for gloo)
    inputs = _global_inputs(Case("pool", 4), world_size, 8, device)
    q, k, v = (shard_sequence(t, world_size, rank).requires_grad_(True) for t in inputs[:3])
    out = ring_attention(q, k, v, is_causal=True, buffers=pool, timeout_s=60)
    grads = torch.autograd.grad(out, (q, k, v), shard_sequence(inputs[3], world_size, rank))
    out2 = ring_attention(q, k, v, is_causal=True, timeout_s=60)
    grads2 = torch.autograd.grad(out2, (q, k, v), shard_sequence(inputs[3], world_size, rank))
    for a, b in zip((out, *grads), (out2, *grads2)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    stats = pool.stats()
    if stats.bytes_in_use != 0:
        raise AssertionError(f"ring attention left {stats.bytes_in_use} bytes of pool buffers unreleased")
    if world_size > 1 and stats.hits + stats.misses == 0:
        raise AssertionError("the ring never asked the pool for a receive buffer")


def check_errors_raise_on_every_rank(rank: int, world_size: int) -> list[str]:
    """Mismatched shape / dtype / option on one rank, and a zigzag shard of odd length: ValueError on every rank."""
    device = rank_device()
    t0 = time.monotonic()
    done = []

    def qkv(n: int, dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
        return [torch.randn(1, n, 2, 4, dtype=dtype, device=device) for _ in range(3)]

    last = world_size - 1
    if world_size > 1:  # a ring of one cannot disagree with itself
        expect_value_error(lambda: ring_attention(*qkv(6 if rank == last else 4), timeout_s=30), "shard_len")
        done.append("shape")
        expect_value_error(
            lambda: ring_attention(*qkv(4, torch.float64 if rank == last else torch.float32), timeout_s=30), "dtype"
        )
        done.append("dtype")
        expect_value_error(
            lambda: ring_attention(*qkv(4), is_causal=rank == last, layout="zigzag", timeout_s=30), "is_causal"
        )
        done.append("option")
    expect_value_error(lambda: ring_attention(*qkv(3), layout="zigzag", timeout_s=30), "n=3")
    done.append("zigzag odd shard")
    # the ring still works after all those errors
    q, k, v = qkv(4)
    out = ring_attention(q, k, v, timeout_s=30)
    if not torch.isfinite(out).all():
        raise AssertionError("ring produced non-finite values after the error cases")
    done.append("still works")
    if time.monotonic() - t0 > 60:
        raise AssertionError(f"error cases took {time.monotonic() - t0:.0f} s: a mismatch must fail fast")
    return done


def check_rank_leaving_is_an_error(rank: int, world_size: int, mode: str = "exit", timeout_s: float = 5.0) -> str:
    """The last rank runs the forward, then leaves (mode "exit") or stalls past the timeout (mode "stall");
    the others' backward must raise within a bounded time, naming the ranks involved."""
    q, k, v = (torch.randn(1, 4, 2, 4, requires_grad=True) for _ in range(3))
    out = ring_attention(q, k, v, is_causal=True, timeout_s=timeout_s)
    if rank == world_size - 1:
        if mode == "stall":
            time.sleep(2.5 * timeout_s)
        return "left"
    t0 = time.monotonic()
    try:
        out.sum().backward()
    except (TimeoutError, RuntimeError) as exc:
        elapsed = time.monotonic() - t0
        if elapsed > 3 * timeout_s:
            raise AssertionError(f"raised only after {elapsed:.0f} s (timeout {timeout_s} s)") from exc
        if mode == "stall" and not isinstance(exc, TimeoutError):
            raise AssertionError(f"a stalled peer should give TimeoutError, got {type(exc).__name__}: {exc}") from exc
        if "rank" not in str(exc):
            raise AssertionError(f"error does not name the ranks involved: {exc}") from exc
        return "raised"
    raise AssertionError("backward completed although a rank of the ring had left")


NCCL_CHECKS = [check_all_cases, check_errors_raise_on_every_rank]
