"""Single-process tests of packed documents in ring attention: the per-step varlen plan (every
document pair exactly once, steps sharing no document skipped), validation, and a 1-rank gloo ring."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

import attn_ring.ring as ring_mod
import attn_ring.ring_packed as packed_mod
from attn_core import MultiheadDilatedAttention, reference
from attn_core.testing import assert_close_to_reference
from attn_ring import (
    HybridAttention,
    RingAttention,
    RingDilatedAttention,
    RingMultiheadDilatedAttention,
    hybrid_attention,
    ring_attention,
    ring_dilated_attention,
    shard_positions,
)
from attn_ring.ring_packed import packed_ring_plan, packed_step_blocks


@pytest.fixture
def world1(tmp_path: Path) -> Iterator[None]:
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def documents(lengths: list[int]) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)


def document_sets(world: int, n: int) -> dict[str, torch.Tensor]:
    """Offsets for N = world * n tokens: one document; documents equal to the shards; a mix with a
    document spanning three shards (when world >= 3), documents of length 1 and empty documents."""
    N = world * n
    long = min(2 * n + 1, N - 2) if world >= 3 else max(N - 3, 0)
    mixed = [1, 0, long, 1, 0]
    rest = N - sum(mixed)
    pieces = []
    for length in [2, 5, 1, 3] * N:
        if rest <= 0:
            break
        pieces.append(min(length, rest))
        rest -= pieces[-1]
    return {
        "one document": documents([N]),
        "shards": documents([n] * world),
        "mixed": documents([*mixed, *pieces, 0]),
        "all length 1": documents([1] * N),
    }


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("world", [1, 2, 3, 4, 5])
def test_plan_covers_each_document_pair_exactly_once(layout: str, causal: bool, world: int) -> None:
    n = 6
    N = n * world
    for name, cu in document_sets(world, n).items():
        count = torch.zeros(N, N, dtype=torch.int64)
        for r in range(world):
            qpos = shard_positions(N, world, r, layout)
            for src in range(world):
                kpos = shard_positions(N, world, src, layout)
                for block in packed_step_blocks(cu, r, src, world, n, layout, causal):
                    cq, ck = block.cu_seqlens_q.long(), block.cu_seqlens_k.long()
                    assert cq.dtype == ck.dtype
                    assert block.q_rows[1] - block.q_rows[0] == int(cq[-1])
                    assert block.k_rows[1] - block.k_rows[0] == int(ck[-1])
                    assert block.max_seqlen_q == int((cq[1:] - cq[:-1]).max())
                    for s in range(cq.numel() - 1):
                        qi = qpos[block.q_rows[0] + cq[s] : block.q_rows[0] + cq[s + 1]]
                        ki = kpos[block.k_rows[0] + ck[s] : block.k_rows[0] + ck[s + 1]]
                        attend = torch.ones(len(qi), len(ki), dtype=torch.bool)
                        if block.causal:  # equal lengths, and local top-left causal is the global one
                            assert len(qi) == len(ki)
                            attend = attend.tril()
                            assert torch.equal(attend, qi[:, None] >= ki[None, :])
                        count[qi[:, None], ki[None, :]] += attend.long()
        want = reference.document_mask(N, N, cu_seqlens=cu, is_causal=causal).long()
        assert torch.equal(count, want), f"{name}: W={world} {layout} causal={causal}"


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
@pytest.mark.parametrize("causal", [False, True])
def test_steps_sharing_no_document_make_no_call(layout: str, causal: bool) -> None:
    world, n = 4, 6
    # one document per chunk a rank holds (contiguous: its shard; zigzag: chunks of n / 2): only a
    # rank's own block shares its documents, in one call (zigzag: two documents in that call)
    chunk = n if layout == "contiguous" else n // 2
    cu = documents([chunk] * (world * n // chunk))
    for r in range(world):
        plan = packed_ring_plan(cu, r, world, n, layout, causal, torch.device("cpu"))
        assert [len(step) for step in plan] == [1] + [0] * (world - 1)
        (own,) = plan[0]
        assert own.cu_seqlens_q.tolist() == own.cu_seqlens_k.tolist() == list(range(0, n + 1, chunk))


def test_call_span_skips_rows_of_documents_outside_the_block() -> None:
    # W=2 contiguous, n=6: rank 1 holds [6, 12); document [4, 8) is the only one shared with block 0
    cu = documents([4, 4, 4])
    (block,) = packed_step_blocks(cu, 1, 0, 2, 6, "contiguous", False)
    assert (block.q_rows, block.k_rows) == ((0, 2), (4, 6))
    assert block.cu_seqlens_q.tolist() == [0, 2] and block.cu_seqlens_k.tolist() == [0, 2]
    # zigzag W=2, n=6 (chunks of 3): rank 0 holds [0, 3) + [9, 12), rank 1 holds [3, 6) + [6, 9);
    # documents [0, 4) and [4, 12): both shared, one call over all rows
    (block,) = packed_step_blocks(documents([4, 8]), 0, 1, 2, 6, "zigzag", False)
    assert (block.q_rows, block.k_rows) == ((0, 6), (0, 6))
    assert block.cu_seqlens_q.tolist() == [0, 3, 6] and block.cu_seqlens_k.tolist() == [0, 1, 6]
    # documents [0, 4), [4, 5), [5, 10), [10, 12): rank 0 holds rows of the first, third and fourth,
    # block 1 of the first three; [4, 5) lies between two shared documents: a sequence with no queries
    (block,) = packed_step_blocks(documents([4, 1, 5, 2]), 0, 1, 2, 6, "zigzag", False)
    assert (block.q_rows, block.k_rows) == ((0, 4), (0, 6))
    assert block.cu_seqlens_q.tolist() == [0, 3, 3, 4] and block.cu_seqlens_k.tolist() == [0, 1, 2, 6]
    assert (block.max_seqlen_q, block.max_seqlen_k) == (3, 4)


def _inputs(
    N: int, H: int, Hkv: int, seed: int, dtype: torch.dtype = torch.float64
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, N, H, 8, generator=g, dtype=dtype, requires_grad=True)
    k = torch.randn(1, N, Hkv, 8, generator=g, dtype=dtype, requires_grad=True)
    v = torch.randn(1, N, Hkv, 8, generator=g, dtype=dtype, requires_grad=True)
    return q, k, v, torch.randn(1, N, H, 8, generator=g, dtype=dtype)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
def test_world_of_one_matches_reference(world1: None, causal: bool, layout: str) -> None:
    cu = documents([1, 0, 5, 1, 3, 0, 2, 0])
    q, k, v, dout = _inputs(12, 4, 2, seed=5)
    out = RingAttention(layout=layout)(q, k, v, is_causal=causal, cu_seqlens=cu)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    ref, _ = reference.dense_attention(q, k, v, is_causal=causal, cu_seqlens=cu)
    ref_grads = torch.autograd.grad(ref, (q, k, v), dout)
    assert_close_to_reference("out", out, ref)
    for name, a, b in zip(("dq", "dk", "dv"), grads, ref_grads):
        assert_close_to_reference(name, a, b)


def test_world_of_one_float32_within_tolerance(world1: None) -> None:
    cu = documents([3, 7, 1, 5])
    q, k, v, _ = _inputs(16, 2, 1, seed=6, dtype=torch.float32)
    out = ring_attention(q, k, v, is_causal=True, layout="zigzag", cu_seqlens=cu)
    ref, _ = reference.dense_attention(q, k, v, is_causal=True, cu_seqlens=cu)
    base, _ = reference.dense_attention(q, k, v, is_causal=True, cu_seqlens=cu, dtype=torch.float32)
    assert out.dtype == torch.float32
    assert_close_to_reference("out", out, ref, base)


def test_packed_calls_go_through_varlen_only(world1: None, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: dict[str, int] = {"varlen_forward": 0, "varlen_backward": 0, "block_forward": 0}

    def counting(name: str, fn: Any) -> Any:
        def wrapper(*a: Any, **kw: Any) -> Any:
            calls[name] += 1
            return fn(*a, **kw)

        return wrapper

    monkeypatch.setattr(packed_mod, "varlen_forward", counting("varlen_forward", packed_mod.varlen_forward))
    monkeypatch.setattr(packed_mod, "varlen_backward", counting("varlen_backward", packed_mod.varlen_backward))
    monkeypatch.setattr(ring_mod, "block_forward", counting("block_forward", ring_mod.block_forward))
    q, k, v, dout = _inputs(8, 2, 2, seed=7)
    out = ring_attention(q, k, v, is_causal=True, cu_seqlens=documents([3, 5]))
    out.backward(dout)
    # every document in one varlen call, no dense block call
    assert calls == {"varlen_forward": 1, "varlen_backward": 1, "block_forward": 0}


def _qkv(n: int = 8, batch: int = 1) -> list[torch.Tensor]:
    return [torch.randn(batch, n, 2, 4) for _ in range(3)]


@pytest.mark.parametrize(
    ("cu_seqlens", "exc", "match"),
    [
        ([0, 3, 8], TypeError, "torch.Tensor"),
        (torch.tensor([0, 3, 8]), ValueError, "int32"),
        (torch.tensor([0, 3, 7], dtype=torch.int32), ValueError, r"end at the sequence length N = 8, got cu_seqlens\[-1\] = 7"),
        (torch.tensor([0, 5, 3, 8], dtype=torch.int32), ValueError, r"cu_seqlens\[1\] = 5 > cu_seqlens\[2\] = 3"),
        (torch.tensor([1, 3, 8], dtype=torch.int32), ValueError, r"cu_seqlens\[0\] = 1"),
        (torch.tensor([[0, 8]], dtype=torch.int32), ValueError, "1-D"),
    ],
)  # fmt: skip
def test_bad_cu_seqlens(world1: None, cu_seqlens: Any, exc: type[Exception], match: str) -> None:
    with pytest.raises(exc, match=match):
        ring_attention(*_qkv(), cu_seqlens=cu_seqlens)


def test_cu_seqlens_needs_batch_one(world1: None) -> None:
    with pytest.raises(ValueError, match="B=2"):
        ring_attention(*_qkv(batch=2), cu_seqlens=documents([8]))


def test_dilated_ring_and_its_modules_take_packed_documents(world1: None) -> None:
    """World of one: ring dilated attention, its modules and hybrid_attention(attention='dilated')
    with cu_seqlens equal the packed reference (outputs and gradients)."""
    cu = documents([3, 0, 1, 2, 6])
    q, k, v, dout = _inputs(12, 4, 2, seed=11)
    segs, rates = [2, 4, 8], [1, 2, 4]
    ref, _ = reference.dilated_attention(q, k, v, segs, rates, is_causal=True, cu_seqlens=cu)
    ref_grads = torch.autograd.grad(ref, (q, k, v), dout)
    calls = {
        "function": lambda: ring_dilated_attention(q, k, v, segs, rates, is_causal=True, cu_seqlens=cu),
        "module": lambda: RingDilatedAttention(segs, rates)(q, k, v, is_causal=True, cu_seqlens=cu),
        "hybrid": lambda: hybrid_attention(
            q, k, v, a2a_group=None, ring_group=None, attention="dilated", segment_lengths=segs,
            dilation_rates=rates, is_causal=True, cu_seqlens=cu,
        ),
        "hybrid module": lambda: HybridAttention(
            a2a_group=None, ring_group=None, attention="dilated", segment_lengths=segs, dilation_rates=rates
        )(q, k, v, is_causal=True, cu_seqlens=cu),
    }  # fmt: skip
    for name, call in calls.items():
        out = call()
        grads = torch.autograd.grad(out, (q, k, v), dout)
        for what, got, want in zip(("out", "dq", "dk", "dv"), (out, *grads), (ref, *ref_grads)):
            assert_close_to_reference(f"{name} {what}", got, want, None)
    mha = RingMultiheadDilatedAttention(8, 2, segs, rates, dtype=torch.float64)
    ref_mha = MultiheadDilatedAttention(8, 2, segs, rates, dtype=torch.float64, backend="reference")
    ref_mha.load_state_dict(mha.state_dict())
    x = torch.randn(1, 12, 8, dtype=torch.float64)
    torch.testing.assert_close(mha(x, x, x, cu_seqlens=cu), ref_mha(x, x, x, cu_seqlens=cu))


@pytest.mark.parametrize(
    ("cu_seqlens", "exc", "match"),
    [
        ([0, 3, 8], TypeError, "torch.Tensor"),
        (torch.tensor([0, 3, 7], dtype=torch.int32), ValueError, r"cu_seqlens\[-1\] = 7"),
        (torch.tensor([0, 5, 3, 8], dtype=torch.int32), ValueError, r"cu_seqlens\[1\] = 5 > cu_seqlens\[2\] = 3"),
    ],
)  # fmt: skip
def test_dilated_ring_bad_cu_seqlens(world1: None, cu_seqlens: Any, exc: type[Exception], match: str) -> None:
    with pytest.raises(exc, match=match):
        ring_dilated_attention(*_qkv(), [4], [1], cu_seqlens=cu_seqlens)
    with pytest.raises(ValueError, match="B=2"):
        ring_dilated_attention(*_qkv(batch=2), [4], [1], cu_seqlens=documents([8]))


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
def test_hybrid_dense_world_of_one(world1: None, layout: str) -> None:
    cu = documents([2, 0, 7, 3])
    q, k, v, dout = _inputs(12, 4, 2, seed=8)
    module = HybridAttention(a2a_group=None, ring_group=None, layout=layout)
    out = module(q, k, v, is_causal=True, cu_seqlens=cu)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    ref, _ = reference.dense_attention(q, k, v, is_causal=True, cu_seqlens=cu)
    ref_grads = torch.autograd.grad(ref, (q, k, v), dout)
    assert_close_to_reference("hybrid out", out, ref)
    for name, a, b in zip(("dq", "dk", "dv"), grads, ref_grads):
        assert_close_to_reference(f"hybrid {name}", a, b)
    with pytest.raises(ValueError, match=r"cu_seqlens\[-1\] = 11"):
        module(q, k, v, cu_seqlens=documents([2, 9]))
