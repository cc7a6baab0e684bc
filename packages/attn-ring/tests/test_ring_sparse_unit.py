"""Single-process tests of ring block-sparse attention: which key blocks travel (against a brute-force
minimum), skipped ring steps, bytes, validation, and a world of size 1 against the float64 reference.

attn-sparse is attn-ring's optional [sparse] extra (installed for these tests by `nox -s tests`)."""

from __future__ import annotations

import itertools
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from attn_core import reference
from attn_core.testing import assert_close_to_reference

pytest.importorskip("attn_sparse.layout", reason="attn-sparse (attn-ring[sparse]) is not installed")

from attn_ring.ring_sparse import plan_ring_sparse, ring_block_sparse_attention
from attn_sparse.layout import BlockLayout

BS = 16


def _random_mask(heads: int, nb: int, density: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(heads, nb, nb, generator=g) < density


def _band(nb: int, width: int) -> torch.Tensor:
    i = torch.arange(nb)
    d = i[:, None] - i[None, :]
    return ((d >= 0) & (d < width))[None]


@pytest.mark.parametrize(
    ("W", "per_rank", "heads", "density", "causal"),
    [(2, 2, 1, 0.3, False), (3, 2, 2, 0.25, True), (4, 1, 3, 0.4, False), (4, 3, 2, 0.15, True)],
)
def test_blocks_sent_are_exactly_the_needed_ones(W, per_rank, heads, density, causal) -> None:
    nb = W * per_rank
    mask = _random_mask(heads, nb, density, seed=W * 10 + per_rank)
    layout = BlockLayout.from_dense(mask, block_size=BS)
    plan = plan_ring_sparse(layout, nb * BS, W, is_causal=causal)
    for a, b in itertools.product(range(W), repeat=2):
        rows = mask[:, b * per_rank : (b + 1) * per_rank, a * per_rank : (a + 1) * per_rank]
        want = torch.nonzero(rows.any(dim=(0, 1))).flatten()
        if a == b or (causal and a > b):
            want = want[:0]
        got = plan.blocks.get((a, b))
        if want.numel() == 0:
            assert got is None
        else:
            assert got is not None and torch.equal(got, want)


def test_local_window_skips_steps_without_active_tiles() -> None:
    # window of 2 blocks, 2 blocks per rank: rank b needs only the last key block of rank b - 1
    W, per_rank = 4, 2
    layout = BlockLayout.from_dense(_band(W * per_rank, 2), block_size=BS)
    plan = plan_ring_sparse(layout, W * per_rank * BS, W, is_causal=True)
    assert [plan.skipped_steps(b) for b in range(W)] == [3, 2, 2, 2]
    assert {k: v.tolist() for k, v in plan.blocks.items()} == {(0, 1): [1], (1, 2): [1], (2, 3): [1]}
    # one key block of BS rows, K and V, B=2, Hkv=4, D=8, bf16
    assert plan.bytes_received(2, batch=2, num_kv_heads=4, head_dim=8, element_size=2) == BS * 2 * 2 * 4 * 8 * 2
    assert plan.bytes_received(0, batch=2, num_kv_heads=4, head_dim=8, element_size=2) == 0


def test_plan_validation() -> None:
    layout = BlockLayout.from_dense(_band(4, 2), block_size=BS)
    with pytest.raises(ValueError, match="multiple of the block sizes"):
        plan_ring_sparse(layout, 64, 8)  # 8 tokens per rank < one block
    with pytest.raises(ValueError, match="divisible by the world size"):
        plan_ring_sparse(layout, 64, 3)
    with pytest.raises(ValueError, match="blocks"):
        plan_ring_sparse(layout, 128, 2)  # the layout covers 64 tokens
    with pytest.raises(TypeError, match="BlockLayout"):
        plan_ring_sparse(torch.ones(1, 4, 4, dtype=torch.bool), 64, 2)  # type: ignore[arg-type]


@pytest.fixture
def world_of_one(tmp_path):
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1, timeout=timedelta(seconds=60))
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_call_validation(world_of_one) -> None:
    layout = BlockLayout.from_dense(_band(4, 2), block_size=BS)
    x = torch.randn(1, 64, 2, 8)
    with pytest.raises(TypeError, match="BlockLayout"):
        ring_block_sparse_attention(x, x, x, "dense")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="num_heads"):
        ring_block_sparse_attention(x, x, x, BlockLayout.from_dense(_random_mask(3, 4, 0.5, 0), block_size=BS))
    with pytest.raises(ValueError, match="timeout_s"):
        ring_block_sparse_attention(x, x, x, layout, timeout_s=0)
    with pytest.raises(ValueError, match="4 dims"):
        ring_block_sparse_attention(x[0], x, x, layout)


@pytest.mark.parametrize(("causal", "heads"), [(False, 4), (True, 1)])
def test_world_of_one_matches_reference(world_of_one, causal: bool, heads: int) -> None:
    g = torch.Generator().manual_seed(3)
    N, H, Hkv, D = 64, 4, 2, 8
    mask = _random_mask(heads, N // BS, 0.5, seed=9)
    mask[:, 1] = False  # a query block with no key: output 0, zero gradients
    layout = BlockLayout.from_dense(mask, block_size=BS)
    q = torch.randn(2, N, H, D, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, N, Hkv, D, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, N, Hkv, D, generator=g, dtype=torch.float64, requires_grad=True)
    dout = torch.randn(2, N, H, D, generator=g, dtype=torch.float64)
    out = ring_block_sparse_attention(q, k, v, layout, is_causal=causal)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    ref, _ = reference.block_sparse_attention(q, k, v, mask, (BS, BS), is_causal=causal)
    ref_grads = torch.autograd.grad(ref, (q, k, v), dout)
    assert torch.all(out[:, BS : 2 * BS] == 0)
    assert_close_to_reference("out", out, ref)
    for name, a, b in zip(("dq", "dk", "dv"), grads, ref_grads):
        assert_close_to_reference(name, a, b)


@pytest.mark.parametrize(("causal", "heads"), [(False, 4), (True, 1)])
def test_world_of_one_triton_kernels(world_of_one, causal: bool, heads: int) -> None:
    """fp32 through attn_sparse's Triton kernels (CPU interpreter), 2x the plain fp32 error at most."""
    import attn_ring.ring_sparse as rs

    g = torch.Generator().manual_seed(4)
    N, H, Hkv, D = 64, 4, 2, 16
    mask = _random_mask(heads, N // BS, 0.5, seed=10)
    mask[:, 2] = False
    layout = BlockLayout.from_dense(mask, block_size=BS)
    q, k, v = (torch.randn(2, N, h, D, generator=g, dtype=torch.float64) for h in (H, Hkv, Hkv))
    dout = torch.randn(2, N, H, D, generator=g, dtype=torch.float64)
    q32, k32, v32 = (t.float().requires_grad_() for t in (q, k, v))
    if not rs._triton_available(q32, layout, causal):
        pytest.skip("attn_sparse's Triton kernels are not usable here (needs triton; TRITON_INTERPRET=1 on CPU)")
    out = ring_block_sparse_attention(q32, k32, v32, layout, is_causal=causal)
    grads = torch.autograd.grad(out, (q32, k32, v32), dout.float())
    results = {}
    for dt in (torch.float64, torch.float32):
        qr, kr, vr = (t.to(dt).requires_grad_() for t in (q, k, v))
        ref, _ = reference.block_sparse_attention(qr, kr, vr, mask, (BS, BS), is_causal=causal, dtype=dt)
        results[dt] = (ref, *torch.autograd.grad(ref, (qr, kr, vr), dout.to(dt)))
    for i, (name, actual) in enumerate(zip(("out", "dq", "dk", "dv"), (out, *grads))):
        assert_close_to_reference(name, actual, results[torch.float64][i], results[torch.float32][i])
