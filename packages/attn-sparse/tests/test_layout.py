"""BlockLayout: CSR invariants, conversions, algebra, validation, FlexAttention BlockMask round trips."""

from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from attn_core.reference import block_sparse_attention as reference_bsa
from attn_sparse import BlockLayout


def _random_mask(heads: int, nq: int, nk: int, p: float = 0.4, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(heads, nq, nk, generator=g) < p


def _check_invariants(layout: BlockLayout) -> None:
    crow, col = layout.crow_indices, layout.col_indices
    assert crow.dtype == col.dtype == torch.int32
    assert crow.numel() == layout.num_heads * layout.num_query_blocks + 1
    assert int(crow[0]) == 0 and int(crow[-1]) == col.numel() == layout.nnz
    assert bool((crow[1:] >= crow[:-1]).all())
    for r in range(crow.numel() - 1):
        row = col[int(crow[r]) : int(crow[r + 1])]
        assert bool((row[1:] > row[:-1]).all())
        assert bool(((row >= 0) & (row < layout.num_key_blocks)).all())


@pytest.mark.parametrize(
    ("heads", "nq", "nk", "bs"), [(1, 5, 7, (16, 32)), (3, 4, 4, (64, 64)), (2, 1, 1, 128), (1, 6, 3, (32, 16))]
)
def test_dense_round_trip_and_properties(heads: int, nq: int, nk: int, bs: object) -> None:
    m = _random_mask(heads, nq, nk, seed=heads * 100 + nq)
    layout = BlockLayout.from_dense(m, bs)
    _check_invariants(layout)
    assert torch.equal(layout.to_dense(), m)
    assert layout.shape == (heads, nq, nk)
    assert layout.nnz == int(m.sum())
    assert layout.density == pytest.approx(float(m.float().mean()))
    assert layout.max_blocks_per_row == int(m.sum(-1).max())
    assert layout.max_blocks_per_col == int(m.sum(-2).max())
    assert layout == BlockLayout.from_csr(
        layout.crow_indices.long(), layout.col_indices.long(), block_size=bs, num_key_blocks=nk, num_heads=heads
    )
    assert "nnz=" in repr(layout)


def test_two_dim_mask_is_shared_and_empty_layout_works() -> None:
    m = torch.zeros(3, 4, dtype=torch.bool)
    layout = BlockLayout.from_dense(m, 16)
    assert layout.num_heads == 1 and layout.nnz == 0 and layout.density == 0.0
    assert layout.max_blocks_per_row == 0
    assert layout.tile_rows().numel() == 0


def test_transposed_csr_matches_dense_transpose() -> None:
    m = _random_mask(2, 5, 6, seed=3)
    layout = BlockLayout.from_dense(m, (16, 32))
    ccol, rows = layout.transposed_csr()
    want = BlockLayout.from_dense(m.transpose(1, 2).contiguous(), (32, 16))
    assert torch.equal(ccol, want.crow_indices) and torch.equal(rows, want.col_indices)
    assert layout.transposed_csr()[0] is ccol  # cached


def test_tile_rows_follow_csr_order() -> None:
    m = _random_mask(2, 4, 9, seed=5)
    layout = BlockLayout.from_dense(m, 16)
    rows = layout.tile_rows()
    want = torch.nonzero(m.reshape(8, 9))
    assert torch.equal(rows, want[:, 0]) and torch.equal(layout.col_indices.long(), want[:, 1])


def test_union_intersection_and_broadcast_heads() -> None:
    a_m, b_m, s_m = _random_mask(3, 4, 5, seed=1), _random_mask(3, 4, 5, seed=2), _random_mask(1, 4, 5, seed=4)
    a, b, s = (BlockLayout.from_dense(x, 16) for x in (a_m, b_m, s_m))
    assert torch.equal((a | b).to_dense(), a_m | b_m)
    assert torch.equal((a & b).to_dense(), a_m & b_m)
    assert torch.equal(a.union(s).to_dense(), a_m | s_m)
    assert torch.equal(s.intersection(a).to_dense(), a_m & s_m)
    _check_invariants(a | b)
    _check_invariants(a & s)
    assert torch.equal(s.expand_heads(3).to_dense(), s_m.expand(3, -1, -1))
    assert s.expand_heads(1) is s


def test_algebra_rejects_other_geometry() -> None:
    a = BlockLayout.from_dense(_random_mask(1, 4, 5), 16)
    with pytest.raises(ValueError, match="same geometry"):
        a | BlockLayout.from_dense(_random_mask(1, 4, 6), 16)
    with pytest.raises(ValueError, match="same geometry"):
        a & BlockLayout.from_dense(_random_mask(1, 4, 5), 32)
    with pytest.raises(ValueError, match="num_heads"):
        BlockLayout.from_dense(_random_mask(2, 4, 5), 16) | BlockLayout.from_dense(_random_mask(3, 4, 5), 16)
    with pytest.raises(TypeError, match="BlockLayout"):
        a.union(torch.zeros(1))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="only a shared"):
        BlockLayout.from_dense(_random_mask(2, 4, 5), 16).expand_heads(4)


def _csr(crow: list[int], col: list[int], **kw: object) -> BlockLayout:
    args = {"block_size": 16, "num_key_blocks": 4, "num_heads": 1}
    args.update(kw)
    return BlockLayout.from_csr(torch.tensor(crow, dtype=torch.int32), torch.tensor(col, dtype=torch.int32), **args)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("crow", "col", "kw", "exc", "match"),
    [
        ([1, 2], [0], {}, ValueError, r"crow_indices\[0\]"),
        ([0, 2, 1], [0, 1], {}, ValueError, "non-decreasing"),
        ([0, 1, 3], [0, 1], {}, ValueError, "crow_indices\\[-1\\]"),
        ([0, 2], [1, 1], {}, ValueError, "strictly increasing"),
        ([0, 2], [2, 1], {}, ValueError, "strictly increasing"),
        ([0, 1], [4], {}, ValueError, "num_key_blocks"),
        ([0, 1], [-1], {}, ValueError, "num_key_blocks"),
        ([0, 1, 1, 1], [0], {"num_heads": 2}, ValueError, "num_heads"),
        ([0], [], {}, ValueError, "num_query_blocks >= 1"),
        ([0, 1], [0], {"block_size": 24}, ValueError, "powers of two"),
        ([0, 1], [0], {"block_size": 8}, ValueError, "powers of two"),
        ([0, 1], [0], {"block_size": (16, 16, 16)}, TypeError, "pair"),
        ([0, 1], [0], {"num_key_blocks": 0}, ValueError, "num_key_blocks must be >= 1"),
        ([0, 1], [0], {"num_heads": True}, TypeError, "num_heads"),
    ],
)
def test_from_csr_rejects_invalid(crow: list[int], col: list[int], kw: dict, exc: type, match: str) -> None:
    with pytest.raises(exc, match=match):
        _csr(crow, col, **kw)


def test_from_csr_rejects_bad_dtypes_and_shapes() -> None:
    with pytest.raises(TypeError, match="int32 or int64"):
        BlockLayout.from_csr(torch.tensor([0.0, 1.0]), torch.tensor([0]), block_size=16, num_key_blocks=2)
    with pytest.raises(ValueError, match="1-D"):
        BlockLayout.from_csr(torch.tensor([[0, 1]]), torch.tensor([0]), block_size=16, num_key_blocks=2)
    with pytest.raises(TypeError, match=r"torch\.Tensor"):
        BlockLayout.from_csr([0, 1], torch.tensor([0]), block_size=16, num_key_blocks=2)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="bool"):
        BlockLayout.from_dense(torch.ones(1, 2, 2), 16)
    with pytest.raises(ValueError, match="shape"):
        BlockLayout.from_dense(torch.ones(1, 1, 2, 2, dtype=torch.bool), 16)
    with pytest.raises(ValueError, match="shape"):
        BlockLayout.from_dense(torch.ones(1, 0, 2, dtype=torch.bool), 16)


def test_check_fits() -> None:
    layout = BlockLayout.from_dense(_random_mask(1, 3, 2), (16, 32))
    layout.check_fits(33, 64, 5)
    layout.check_fits(48, 33, 1)
    with pytest.raises(ValueError, match="ceil"):
        layout.check_fits(49, 64, 1)
    with pytest.raises(ValueError, match="ceil"):
        layout.check_fits(48, 65, 1)
    with pytest.raises(ValueError, match="num_heads"):
        BlockLayout.from_dense(_random_mask(2, 3, 2), (16, 32)).check_fits(48, 64, 3)


def test_to_device_and_equality() -> None:
    layout = BlockLayout.from_dense(_random_mask(1, 3, 3), 16)
    assert layout.to("cpu") is layout
    other = BlockLayout.from_dense(_random_mask(1, 3, 3, seed=9), 16)
    assert (layout == other) == torch.equal(layout.to_dense(), other.to_dense())
    assert layout != BlockLayout.from_dense(layout.to_dense(), 32)
    assert layout != "layout"


# ---------------------------------------------------------------- FlexAttention conversion
try:
    from torch.nn.attention import flex_attention as flex
except ImportError:  # torch without FlexAttention: only the flex tests skip
    flex = None
needs_flex = pytest.mark.skipif(flex is None, reason="torch.nn.attention.flex_attention unavailable")


@needs_flex
@pytest.mark.parametrize(("n", "heads", "is_causal"), [(64, 1, False), (77, 2, False), (64, 2, True), (50, 1, True)])
def test_flex_block_mask_round_trip_and_attention(n: int, heads: int, is_causal: bool) -> None:
    nb = -(-n // 16)
    m = _random_mask(heads, nb, nb, p=0.5, seed=n)
    m[0, 0, :] = False  # an empty query block row: output must be 0
    layout = BlockLayout.from_dense(m, 16)
    bm = layout.to_flex_block_mask(n, n, is_causal=is_causal)
    back = BlockLayout.from_flex_block_mask(bm)
    if is_causal:  # tiles entirely above the diagonal are dropped from the flex mask
        tri = torch.ones(nb, nb, dtype=torch.bool).tril()
        assert torch.equal(back.to_dense(), m & tri)
    else:
        assert back == layout
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, n, heads, 16, generator=g) for _ in range(3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "flex_attention called without torch.compile"
        out = flex.flex_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=bm).transpose(
            1, 2
        )
    ref, _ = reference_bsa(q, k, v, m, (16, 16), is_causal=is_causal)
    assert not torch.isnan(out).any()
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)


@needs_flex
def test_from_flex_block_mask_of_create_block_mask() -> None:
    def band(b: object, h: object, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        return (q_idx - kv_idx).abs() <= 20

    bm = flex.create_block_mask(band, 1, 1, 96, 96, device="cpu", BLOCK_SIZE=16)
    layout = BlockLayout.from_flex_block_mask(bm)
    assert torch.equal(layout.to_dense()[0], bm.to_dense()[0, 0].bool())
    with pytest.raises(TypeError, match="BlockMask"):
        BlockLayout.from_flex_block_mask(object())


@needs_flex
@pytest.mark.parametrize(("heads", "hkv", "per_head", "is_causal"), [(4, 2, False, True), (2, 1, True, False)])
def test_flex_backend_path_with_eager_flex(heads: int, hkv: int, per_head: bool, is_causal: bool) -> None:
    # the flex backend's own code (BlockMask caching, layout transposes, GQA, scale) with the
    # uncompiled flex_attention, which CPU CI can run forward
    from attn_sparse.backends import flex as flex_backend
    from attn_sparse.masks import TokenMask

    n = 72
    m = _random_mask(heads if per_head else 1, 5, 5, p=0.6, seed=heads)
    layout = BlockLayout.from_dense(m, 16)
    mask = TokenMask.causal_only(is_causal)
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, n, heads, 16, generator=g)
    k, v = (torch.randn(2, n, hkv, 16, generator=g) for _ in range(2))
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        out = flex_backend.attention_with(flex.flex_attention, q, k, v, layout, mask, 0.3)
        again = flex_backend.attention_with(flex.flex_attention, q, k, v, layout, mask, 0.3)
    ref, _ = reference_bsa(q, k, v, m, (16, 16), is_causal=is_causal, softmax_scale=0.3)
    assert out.shape == q.shape
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    assert torch.equal(out, again)


# ---------------------------------------------------------------- properties


@st.composite
def _masks(draw: st.DrawFn) -> tuple[torch.Tensor, torch.Tensor]:
    h = draw(st.integers(1, 3))
    nq, nk = draw(st.integers(1, 6)), draw(st.integers(1, 6))
    bits = st.lists(st.booleans(), min_size=h * nq * nk, max_size=h * nq * nk)
    a = torch.tensor(draw(bits)).reshape(h, nq, nk)
    b = torch.tensor(draw(bits)).reshape(h, nq, nk)
    return a, b


@needs_flex
@settings(max_examples=60, derandomize=True, deadline=None)
@given(_masks())
def test_property_layout_algebra_matches_dense(masks: tuple[torch.Tensor, torch.Tensor]) -> None:
    a_m, b_m = masks
    a, b = BlockLayout.from_dense(a_m, 16), BlockLayout.from_dense(b_m, 16)
    _check_invariants(a)
    assert torch.equal((a | b).to_dense(), a_m | b_m)
    assert torch.equal((a & b).to_dense(), a_m & b_m)
    ccol, rows = a.transposed_csr()
    t = BlockLayout.from_dense(a_m.transpose(1, 2).contiguous(), 16)
    assert torch.equal(ccol, t.crow_indices) and torch.equal(rows, t.col_indices)
    n = a.num_query_blocks * 16
    nk = a.num_key_blocks * 16 - 5  # partial last key block
    assert BlockLayout.from_flex_block_mask(a.to_flex_block_mask(n, nk)) == a


@settings(max_examples=60, derandomize=True, deadline=None)
@given(st.data())
def test_property_intervals_union(data: st.DataObject) -> None:
    rows, width, nk = data.draw(st.integers(1, 5)), data.draw(st.integers(1, 4)), data.draw(st.integers(1, 9))
    pairs = st.lists(
        st.tuples(st.integers(-2, nk + 2), st.integers(-2, nk + 2)), min_size=rows * width, max_size=rows * width
    )
    iv = torch.tensor(data.draw(pairs)).reshape(rows, width, 2)
    lay = BlockLayout.from_intervals(
        iv[..., 0], iv[..., 1], block_size=(16, 16), num_heads=1, num_query_blocks=rows, num_key_blocks=nk
    )
    want = torch.zeros(rows, nk, dtype=torch.bool)
    for r in range(rows):
        for lo, hi in iv[r].tolist():
            want[r, max(lo, 0) : max(min(hi, nk), 0)] = True
    _check_invariants(lay)
    assert torch.equal(lay.to_dense()[0], want)


def test_expand_intervals_strided_runs_and_known_size() -> None:
    from attn_sparse.csr import expand_intervals

    start = torch.tensor([[0, 9], [2, 0], [1, 4]])
    length = torch.tensor([[3, 1], [0, 0], [2, 3]])
    for step in (1, 3):
        want_rows = [
            [c for s, n in zip(start[r].tolist(), length[r].tolist()) for c in range(s, s + n * step, step)]
            for r in range(3)
        ]
        for kw in ({}, {"nnz": 9}, {"device": torch.device("cpu")}):
            crow, col = expand_intervals(start, length, 3, step=step, **kw)
            assert crow.dtype == col.dtype == torch.int32
            assert crow.tolist() == [0, 4, 4, 9]
            assert [col[crow[r] : crow[r + 1]].tolist() for r in range(3)] == want_rows


def test_to_device_carries_the_transposed_csr(monkeypatch: pytest.MonkeyPatch) -> None:
    from attn_sparse import layout as layout_module
    from attn_sparse import local_window

    lay = local_window(1000, 50, block_size=16)
    ccol, rows = lay.transposed_csr()
    # the meta device exists on every machine (CUDA copies take the same path); layouts refuse it
    # (their arrays must hold values), so the device check is lifted for this test of the copy
    monkeypatch.setattr(layout_module, "check_device", torch.device)
    moved = lay.to("meta")
    assert moved.device.type == "meta" and "transposed" in moved._cache
    mc, mr = moved._cache["transposed"]
    assert mc.device.type == mr.device.type == "meta" and mc.shape == ccol.shape and mr.shape == rows.shape
