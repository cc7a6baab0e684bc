"""Single-process tests of ring attention: the step schedule, validation, and a real 1-rank gloo ring."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

from attn_core import reference
from attn_core.testing import assert_close_to_reference
from attn_ring import RingAttention, ring_attention, shard_positions
from attn_ring.ring import ring_step_blocks


@pytest.fixture
def world1(tmp_path: Path) -> Iterator[None]:
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("world", [1, 2, 3, 4, 5])
def test_schedule_covers_each_attended_pair_exactly_once(layout: str, causal: bool, world: int) -> None:
    n = 6
    N = n * world
    count = torch.zeros(N, N, dtype=torch.int64)
    for r in range(world):
        qpos = shard_positions(N, world, r, layout)
        for src in range(world):
            kpos = shard_positions(N, world, src, layout)
            for (q0, q1), (k0, k1), c in ring_step_blocks(r, src, world, n, layout, causal):
                qi, ki = qpos[q0:q1], kpos[k0:k1]
                attend = torch.ones(len(qi), len(ki), dtype=torch.bool)
                if c:  # the piece's own top-left causal mask must agree with global positions
                    attend = attend.tril()
                    assert torch.equal(attend, qi[:, None] >= ki[None, :])
                count[qi[:, None], ki[None, :]] += attend.long()
    want = torch.ones(N, N, dtype=torch.int64)
    if causal:
        want = want.tril()
    assert torch.equal(count, want)


def test_zigzag_balances_causal_work() -> None:
    world, n = 4, 8
    work = [
        sum(
            (q1 - q0) * (k1 - k0) / (2 if c else 1)
            for src in range(world)
            for (q0, q1), (k0, k1), c in ring_step_blocks(r, src, world, n, "zigzag", True)
        )
        for r in range(world)
    ]
    assert max(work) == min(work)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
def test_world_of_one_matches_reference(world1: None, causal: bool, layout: str) -> None:
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, 6, 4, 8, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 6, 2, 8, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 6, 2, 8, generator=g, dtype=torch.float64, requires_grad=True)
    dout = torch.randn(2, 6, 4, 8, generator=g, dtype=torch.float64)
    out = RingAttention(layout=layout)(q, k, v, is_causal=causal)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    ref, _ = reference.dense_attention(q, k, v, is_causal=causal)
    ref_grads = torch.autograd.grad(ref, (q, k, v), dout)
    assert_close_to_reference("out", out, ref)
    for name, a, b in zip(("dq", "dk", "dv"), grads, ref_grads):
        assert_close_to_reference(name, a, b)


def test_world_of_one_float32_within_tolerance(world1: None) -> None:
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(1, 9, 2, 16, generator=g) for _ in range(3))
    out = ring_attention(q, k, v, is_causal=True)
    ref, _ = reference.dense_attention(q, k, v, is_causal=True)
    base, _ = reference.dense_attention(q, k, v, is_causal=True, dtype=torch.float32)
    assert out.dtype == torch.float32
    assert_close_to_reference("out", out, ref, base)


def _qkv(n: int = 4) -> list[torch.Tensor]:
    return [torch.randn(1, n, 2, 4) for _ in range(3)]


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"layout": "ring"}, ValueError, "layout must be one of"),
        ({"is_causal": 1}, TypeError, "is_causal must be a bool"),
        ({"overlap": "yes"}, TypeError, "overlap must be a bool"),
        ({"softmax_scale": -1.0}, ValueError, "softmax_scale must be finite and > 0"),
        ({"timeout_s": 0}, ValueError, "timeout_s must be a positive"),
        ({"group": "world"}, TypeError, "group must be"),
    ],
)
def test_bad_options(world1: None, kwargs: dict[str, Any], exc: type[Exception], match: str) -> None:
    with pytest.raises(exc, match=match):
        ring_attention(*_qkv(), **kwargs)


def test_bad_tensors(world1: None) -> None:
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="multiple of kv heads"):
        ring_attention(q, torch.randn(1, 4, 3, 4), torch.randn(1, 4, 3, 4))
    with pytest.raises(ValueError, match="sequence length of k/v"):
        ring_attention(q, torch.randn(1, 5, 2, 4), torch.randn(1, 5, 2, 4))
    with pytest.raises(TypeError, match="floating tensor"):
        ring_attention(q.long(), k.long(), v.long())
    with pytest.raises(ValueError, match=r"n=3 .*positive even"):
        ring_attention(*_qkv(3), layout="zigzag")
    with pytest.raises(ValueError, match="n=0"):
        ring_attention(*_qkv(0))


def test_module_validates_at_construction() -> None:
    with pytest.raises(ValueError, match="layout must be one of"):
        RingAttention(layout="striped")
    with pytest.raises(ValueError, match="softmax_scale"):
        RingAttention(softmax_scale=0.0)
    assert "zigzag" in repr(RingAttention(layout="zigzag"))


def test_needs_process_group() -> None:
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    with pytest.raises(ValueError, match="not initialised"):
        ring_attention(*_qkv())
