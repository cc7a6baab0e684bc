"""Single-process tests of Ulysses / hybrid attention: head-range geometry, GQA repetition, token
positions, validation, and a real 1-rank gloo group (multi-rank runs live in integration_tests)."""

from __future__ import annotations

import random
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

from attn_core import reference
from attn_core.config import DilatedConfig
from attn_core.testing import assert_close_to_reference
from attn_ring import (
    AllToAllComm,
    HybridAttention,
    UlyssesAttention,
    hybrid_attention,
    hybrid_mesh,
    hybrid_positions,
    hybrid_shard,
    shard_positions,
    ulysses_attention,
)
from attn_ring.alltoall import all_to_all_method
from attn_ring.head_range import HeadRangeConfig, head_range_config
from attn_ring.ulysses import InnerAttention, kv_heads_on_wire, repeat_kv_heads


def _random_geometry(seed: int) -> dict[str, Any]:
    rng = random.Random(seed)
    W = rng.choice([2, 3, 4])
    h = rng.randint(1, 3)
    H = h * W
    Hkv = rng.choice([d for d in range(1, H + 1) if H % d == 0])
    groups = rng.randint(1, 3)
    rates = [rng.choice([1, 2, 3, 4]) for _ in range(groups)]
    segs = [r * rng.randint(1, 5) for r in rates]
    return dict(W=W, H=H, Hkv=Hkv, segs=segs, rates=rates, mode=rng.choice(["all", "split"]), causal=rng.random() < 0.5)


@pytest.mark.parametrize("backend", ["sdpa", "reference"])
@pytest.mark.parametrize("seed", range(12))
def test_rank_heads_reproduce_the_global_heads(seed: int, backend: str) -> None:
    """Every rank's local heads, run on the whole sequence with the rank's config, equal the global heads."""

    geo = _random_geometry(seed)
    W, H, Hkv = geo["W"], geo["H"], geo["Hkv"]
    g = torch.Generator().manual_seed(seed)
    B, N, D = 2, 13, 4
    q = torch.randn(B, N, H, D, generator=g, dtype=torch.float64)
    k = torch.randn(B, N, Hkv, D, generator=g, dtype=torch.float64)
    v = torch.randn(B, N, Hkv, D, generator=g, dtype=torch.float64)
    mask = torch.rand(B, N, generator=g) < 0.2
    ref, _ = reference.dilated_attention(
        q, k, v, geo["segs"], geo["rates"], is_causal=geo["causal"], key_padding_mask=mask, head_mode=geo["mode"]
    )
    wire = kv_heads_on_wire(H, Hkv, W)
    kw, vw = repeat_kv_heads(k, v, wire)
    h, hk = H // W, wire // W
    inner = InnerAttention("dilated", config=DilatedConfig(geo["segs"], geo["rates"], geo["mode"]), backend=backend)
    for r in range(W):
        out = inner(
            q[:, :, r * h : (r + 1) * h],
            kw[:, :, r * hk : (r + 1) * hk],
            vw[:, :, r * hk : (r + 1) * hk],
            head_base=r * h,
            total_heads=H,
            is_causal=geo["causal"],
            key_padding_mask=mask,
            softmax_scale=D**-0.5,
        )
        assert_close_to_reference(f"{geo} rank {r}", out, ref[:, :, r * h : (r + 1) * h])


def test_plain_config_would_give_other_heads_offsets() -> None:
    """The head-range config matters: rank 1 of 2 with H=6, rate 4 starts at head 3 (offset 3, not 0)."""
    cfg = DilatedConfig((8,), (4,))
    local = head_range_config(cfg, 3, 3, 6)
    assert isinstance(local, HeadRangeConfig)
    assert [local.head_offset(0, j) for j in range(3)] == [3, 0, 1]
    assert [cfg.head_offset(0, j) for j in range(3)] == [0, 1, 2]
    # aligned ranks keep the plain config (and the public dilated_attention path)
    assert head_range_config(cfg, 4, 4, 8) is cfg
    split = DilatedConfig((4, 8), (1, 2), "split")  # global groups: heads [0, 3) and [3, 6)
    local = head_range_config(split, 2, 2, 6)  # heads 2, 3: one of each group
    assert (local.heads_for_group(0, 2), local.heads_for_group(1, 2)) == (range(0, 1), range(1, 2))
    assert head_range_config(split, 0, 6, 6) is split


@pytest.mark.parametrize(
    ("H", "Hkv", "W", "want"), [(8, 4, 2, 4), (8, 2, 4, 4), (8, 1, 8, 8), (12, 2, 3, 6), (12, 4, 6, 12)]
)
def test_kv_heads_on_wire_keep_the_gqa_mapping(H: int, Hkv: int, W: int, want: int) -> None:
    wire = kv_heads_on_wire(H, Hkv, W)
    assert wire == want and wire % W == 0 and H % wire == 0
    k = torch.arange(Hkv, dtype=torch.float64).view(1, 1, Hkv, 1)
    kw, _ = repeat_kv_heads(k, k, wire)
    for j in range(H):  # query head j reads the same original kv head through the repeated ones
        assert int(kw[0, 0, j // (H // wire), 0]) == j // (H // Hkv)


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
@pytest.mark.parametrize(("A", "R"), [(1, 1), (2, 2), (4, 2), (2, 3)])
def test_hybrid_positions(layout: str, A: int, R: int) -> None:
    N = 8 * A * R
    seen = []
    for rho in range(R):
        ring_shard = []
        for a in range(A):
            pos = hybrid_positions(N, A, R, a, rho, layout)
            seen.append(pos)
            if layout == "contiguous":
                assert torch.equal(pos, shard_positions(N, R * A, rho * A + a))
            ring_shard.append(pos.view(2 if layout == "zigzag" else 1, -1))
        # after the all-to-all (piece i of every a2a rank, in rank order) a ring rank holds its ring shard
        gathered = torch.cat(ring_shard, dim=1).reshape(-1)
        assert torch.equal(gathered, shard_positions(N, R, rho, layout))
    assert torch.equal(torch.cat(seen).sort().values, torch.arange(N))
    x = torch.arange(N).view(1, N)
    assert torch.equal(
        hybrid_shard(x, A, R, A - 1, R - 1, layout=layout)[0], hybrid_positions(N, A, R, A - 1, R - 1, layout)
    )


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (
            dict(seq_len=12, a2a_size=2, ring_size=2, a2a_rank=0, ring_rank=0, layout="zigzag"),
            "N % \\(2 \\* R \\* A\\)",
        ),
        (dict(seq_len=6, a2a_size=4, ring_size=1, a2a_rank=0, ring_rank=0), "N % \\(R \\* A\\)"),
        (dict(seq_len=8, a2a_size=2, ring_size=2, a2a_rank=2, ring_rank=0), "a2a_rank"),
        (dict(seq_len=8, a2a_size=0, ring_size=2, a2a_rank=0, ring_rank=0), "a2a_size"),
        (dict(seq_len=8, a2a_size=2, ring_size=2, a2a_rank=0, ring_rank=0, layout="ring"), "layout"),
    ],
)
def test_hybrid_positions_validation(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        hybrid_positions(**kwargs)


def test_all_to_all_method_by_capability() -> None:
    assert all_to_all_method("gloo")[0] == "collective"
    assert all_to_all_method("nccl")[0] == "collective"
    method, reason = all_to_all_method("ucc")
    assert method == "p2p" and "ucc" in reason
    assert all_to_all_method("gloo", "p2p")[0] == "p2p"
    with pytest.raises(ValueError, match="all_to_all_single"):
        all_to_all_method("ucc", "collective")
    with pytest.raises(ValueError, match="method must be one of"):
        all_to_all_method("gloo", "ring")


@pytest.fixture
def world_of_one(tmp_path: Path) -> Iterator[None]:
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1, timeout=timedelta(seconds=60))
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_all_to_all_comm_world_of_one(world_of_one: None) -> None:
    for method in ("collective", "p2p"):
        comm = AllToAllComm(method=method, timeout_s=10)
        x = torch.randn(1, 3, 2)
        y = comm.all_to_all(x).wait()
        assert torch.equal(x, y) and y.data_ptr() != x.data_ptr()
        comm.handshake({"a": 1})
        with pytest.raises(ValueError, match="W=1"):
            comm.all_to_all(torch.randn(2, 3))
    with pytest.raises(ValueError, match="timeout_s"):
        AllToAllComm(timeout_s=0)


def _qkv(H: int, Hkv: int, N: int = 32, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, N, h, 8, generator=g, dtype=torch.float64, requires_grad=True) for h in (H, Hkv, Hkv)]


@pytest.mark.parametrize("attention", ["dense", "dilated", "block_sparse"])
@pytest.mark.parametrize("causal", [False, True])
def test_world_of_one_matches_reference(world_of_one: None, attention: str, causal: bool) -> None:
    q, k, v = _qkv(4, 2)
    mask = torch.zeros(2, 32, dtype=torch.bool)
    mask[1, 5:9] = True
    opts: dict[str, Any] = {}
    if attention == "dilated":
        opts = dict(segment_lengths=(8, 16), dilation_rates=(1, 2))
        ref, _ = reference.dilated_attention(q, k, v, (8, 16), (1, 2), is_causal=causal, key_padding_mask=mask)
    elif attention == "block_sparse":
        from attn_sparse import BlockLayout

        block_mask = torch.tensor([[[True, False], [True, True]]]).expand(4, 2, 2).clone()
        block_mask[1, 0, 0] = False  # a query block that sees no key
        opts = dict(layout=BlockLayout.from_dense(block_mask, block_size=16))
        mask = None  # not every block-sparse backend takes a padding mask
        ref, _ = reference.block_sparse_attention(q, k, v, block_mask, (16, 16), is_causal=causal)
    else:
        ref, _ = reference.dense_attention(q, k, v, is_causal=causal, key_padding_mask=mask)
    dout = torch.randn_like(ref)
    out = ulysses_attention(q, k, v, attention=attention, is_causal=causal, key_padding_mask=mask, **opts)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    ref_grads = torch.autograd.grad(ref, (q, k, v), dout)
    assert_close_to_reference("out", out, ref)
    for name, a, b in zip(("dq", "dk", "dv"), grads, ref_grads):
        assert_close_to_reference(name, a, b)
    module = UlyssesAttention(attention, **opts)
    torch.testing.assert_close(module(q, k, v, is_causal=causal, key_padding_mask=mask), out, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        (dict(attention="ring"), ValueError, "attention must be one of"),
        (dict(attention="dense", segment_lengths=(8,)), ValueError, "belong to attention='dilated'"),
        (dict(attention="dense", layout=object()), ValueError, "belongs to attention='block_sparse'"),
        (dict(attention="dilated"), ValueError, "needs segment_lengths"),
        (dict(attention="dilated", segment_lengths=(6,), dilation_rates=(4,)), ValueError, "not divisible"),
        (dict(attention="block_sparse", layout=object()), TypeError, "BlockLayout or None"),
        (dict(attention="block_sparse"), ValueError, "none was given"),
        (dict(window_size=(2, 0)), ValueError, "window_size is supported with attention='block_sparse' only"),
        (dict(attention="dilated", segment_lengths=(8,), dilation_rates=(1,), window_size=(2, 0)), ValueError, "only"),
        (dict(attention="block_sparse", window_size=(-2, 0)), ValueError, "window_size sides"),
        (dict(window_size=3), TypeError, "window_size must be a pair"),
        (dict(cu_seqlens=[0, 32]), TypeError, "cu_seqlens must be a torch.Tensor"),
        (dict(cu_seqlens=torch.tensor([0, 32])), ValueError, "dtype torch.int32"),
        (dict(cu_seqlens=torch.tensor([0, 32], dtype=torch.int32)), ValueError, "B == 1"),
        (dict(is_causal=1), TypeError, "is_causal"),
        (dict(method="ring"), ValueError, "method must be one of"),
        (dict(timeout_s=-1), ValueError, "timeout_s"),
    ],
)
def test_call_validation(world_of_one: None, kwargs: dict[str, Any], exc: type, match: str) -> None:
    q, k, v = _qkv(2, 2)
    with pytest.raises(exc, match=match):
        ulysses_attention(q, k, v, **kwargs)


def test_call_without_process_group_is_a_clear_error() -> None:
    q, k, v = _qkv(2, 2)
    with pytest.raises(ValueError, match="not initialised"):
        ulysses_attention(q, k, v)


def test_modules_validate_at_construction() -> None:
    with pytest.raises(ValueError, match="needs segment_lengths"):
        UlyssesAttention("dilated")
    with pytest.raises(ValueError, match="belong to attention='dilated'"):
        UlyssesAttention("dense", dilation_rates=(1,))
    with pytest.raises(TypeError, match="group"):
        UlyssesAttention(group="world")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="hybrid attention must be one of"):
        HybridAttention(a2a_group=None, ring_group=None, attention="block_sparse")
    with pytest.raises(ValueError, match="layout"):
        HybridAttention(a2a_group=None, ring_group=None, layout="striped")
    mod = UlyssesAttention("dilated", segment_lengths=(4, 8), dilation_rates=(1, 2), head_mode="split")
    assert "head_mode='split'" in repr(mod)
    assert isinstance(mod.inner, InnerAttention) and mod.inner.kind == "dilated"


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
def test_hybrid_world_of_one_matches_reference(world_of_one: None, layout: str) -> None:
    q, k, v = _qkv(4, 1)
    dout = torch.randn_like(q)
    out = hybrid_attention(q, k, v, a2a_group=None, ring_group=None, is_causal=True, layout=layout)
    ref, _ = reference.dense_attention(q, k, v, is_causal=True)
    assert_close_to_reference("hybrid dense", out, ref)
    for name, a, b in zip(
        ("dq", "dk", "dv"), torch.autograd.grad(out, (q, k, v), dout), torch.autograd.grad(ref, (q, k, v), dout)
    ):
        assert_close_to_reference(name, a, b)
    mask = torch.zeros(2, 32, dtype=torch.bool)
    mask[0, :3] = True
    if layout == "contiguous":
        out = HybridAttention(
            a2a_group=None, ring_group=None, attention="dilated", segment_lengths=(8, 32), dilation_rates=(1, 4)
        )(q, k, v, key_padding_mask=mask)
        ref, _ = reference.dilated_attention(q, k, v, (8, 32), (1, 4), key_padding_mask=mask)
        assert_close_to_reference("hybrid dilated", out, ref)
    else:
        with pytest.raises(ValueError, match="layout must be 'contiguous'"):
            hybrid_attention(
                q, k, v, a2a_group=None, ring_group=None, attention="dilated", segment_lengths=(8,),
                dilation_rates=(1,), layout=layout,
            )  # fmt: skip
    with pytest.raises(ValueError, match="no key_padding_mask"):
        hybrid_attention(q, k, v, a2a_group=None, ring_group=None, key_padding_mask=mask)


def test_block_sparse_rows_of_a_rank_are_its_heads_and_cached() -> None:
    from attn_sparse import BlockLayout

    g = torch.Generator().manual_seed(5)
    block_mask = torch.rand(6, 3, 4, generator=g) < 0.5
    inner = InnerAttention("block_sparse", layout=BlockLayout.from_dense(block_mask, block_size=16))
    for base in (0, 2, 4):
        rows = inner.layout_rows(base, 2)
        assert torch.equal(rows.to_dense(), block_mask[base : base + 2])
        assert inner.layout_rows(base, 2) is rows  # kept: attn_sparse's per-layout caches stay warm
    shared = InnerAttention("block_sparse", layout=BlockLayout.from_dense(block_mask[:1], block_size=16))
    assert shared.layout_rows(4, 2) is shared.layout


@pytest.mark.parametrize("use_device_mesh", [True, False])
def test_hybrid_mesh_world_of_one(world_of_one: None, use_device_mesh: bool) -> None:
    mesh = hybrid_mesh(1, use_device_mesh=use_device_mesh)
    assert (mesh.a2a_size, mesh.ring_size, mesh.a2a_rank, mesh.ring_rank) == (1, 1, 0, 0)
    assert mesh.how == ("device_mesh" if use_device_mesh else "new_group")
    assert torch.equal(mesh.positions(8), torch.arange(8))
    with pytest.raises(ValueError, match="must divide the world size"):
        hybrid_mesh(2, use_device_mesh=use_device_mesh)


def _masked_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attention: str,
    *,
    causal: bool,
    cu_seqlens: torch.Tensor,
    window_size: tuple[int, int] | None = None,
    block_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """float64 reference of one packed sequence (B == 1) under the document, causal and window masks."""
    N = q.shape[1]
    if attention == "dilated":
        out, _ = reference.dilated_attention(q, k, v, (4, 8, 32), (1, 2, 4), is_causal=causal, cu_seqlens=cu_seqlens)
        return out
    allowed = reference.document_mask(N, N, cu_seqlens=cu_seqlens, is_causal=causal, window_size=window_size)
    if block_mask is not None:
        allowed = allowed & reference.block_sparse_weights(block_mask, (16, 16), N, N)
    out, _ = reference.attention_from_weights(q, k, v, allowed.expand(1, q.shape[2], N, N))
    return out


@pytest.mark.parametrize(
    ("attention", "causal", "window", "layout"),
    [
        ("dense", False, None, False),
        ("dense", True, None, False),
        ("dilated", True, None, False),
        ("block_sparse", False, (5, 2), True),
        ("block_sparse", True, None, False),
    ],
)
def test_world_of_one_packed_documents(
    world_of_one: None, attention: str, causal: bool, window: tuple[int, int] | None, layout: bool
) -> None:
    """cu_seqlens (and window_size for block_sparse) reach the inner attention: outputs and gradients
    equal the float64 reference under the same masks, also through the module."""
    g = torch.Generator().manual_seed(3)
    N, H, Hkv = 32, 4, 2
    q, k, v = (torch.randn(1, N, h, 8, generator=g, dtype=torch.float64, requires_grad=True) for h in (H, Hkv, Hkv))
    cu = torch.tensor([0, 5, 5, 19, 32], dtype=torch.int32)  # an empty document, a short last one
    opts: dict[str, Any] = {}
    block_mask = None
    if attention == "dilated":
        opts = dict(segment_lengths=(4, 8, 32), dilation_rates=(1, 2, 4))
    if layout:
        from attn_sparse import BlockLayout

        block_mask = torch.rand(H, 2, 2, generator=g) < 0.7
        block_mask[:, :, 0] = True
        opts = dict(layout=BlockLayout.from_dense(block_mask, block_size=16))
    ref = _masked_reference(q, k, v, attention, causal=causal, cu_seqlens=cu, window_size=window, block_mask=block_mask)
    out = ulysses_attention(q, k, v, attention=attention, is_causal=causal, cu_seqlens=cu, window_size=window, **opts)
    dout = torch.randn(ref.shape, generator=g, dtype=torch.float64)
    assert_close_to_reference("out", out, ref)
    for name, a, b in zip(
        ("dq", "dk", "dv"), torch.autograd.grad(out, (q, k, v), dout), torch.autograd.grad(ref, (q, k, v), dout)
    ):
        assert_close_to_reference(name, a, b)
    module = UlyssesAttention(attention, **opts)
    mod_out = module(q, k, v, is_causal=causal, cu_seqlens=cu, window_size=window or (-1, -1))
    torch.testing.assert_close(mod_out, out, rtol=0, atol=0)  # (-1, -1): unbounded, no window
    with pytest.raises(ValueError, match="must end at the sequence length N = 32"):
        ulysses_attention(q, k, v, attention=attention, is_causal=causal, cu_seqlens=cu[:-1], **opts)
