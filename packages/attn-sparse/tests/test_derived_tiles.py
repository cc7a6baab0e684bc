"""The tiles derived from token masks (layout=None): exactly the per-token definition, both CSR
orientations, the caches (layouts, document bounds, the offsets read from a GPU), bad sizes.

The reference here is the definition itself, from the per-token intervals
(:meth:`TokenMask.key_intervals`, O(N)): query block r needs the key blocks from its first row's
``lo`` to its last row's ``hi``, built through :meth:`BlockLayout.from_intervals` and transposed
by sorting (:meth:`BlockLayout.transposed_csr` of a layout without an attached transpose).
"""

from __future__ import annotations

import random
import struct

import pytest
import torch

from attn_core.reference import document_mask
from attn_sparse import BlockLayout, masks
from attn_sparse.masks import TokenMask

CPU = torch.device("cpu")


def _mask(nq: int, nk: int, *, causal: bool = False, window: object = None, cu: object = None) -> TokenMask:
    return TokenMask.build(
        is_causal=causal, window_size=window, cu_seqlens=cu, batch=1, seq_len_q=nq, seq_len_k=nk, device=CPU
    )


def _defined_tiles(mask: TokenMask, nq: int, nk: int, bs: tuple[int, int]) -> BlockLayout:
    """The tiles by definition, from the per-token intervals (no attached transpose)."""
    bq, bk = bs
    lo, hi = mask.key_intervals(nq, nk)
    first = torch.arange(0, nq, bq)
    last = (first + bq).clamp(max=nq) - 1
    lo_first, hi_last = lo[first], hi[last]
    blk_lo = lo_first // bk
    blk_hi = torch.where(hi_last >= lo_first, hi_last // bk + 1, blk_lo)
    return BlockLayout.from_intervals(
        blk_lo[:, None],
        blk_hi[:, None],
        block_size=bs,
        num_heads=1,
        num_query_blocks=-(-nq // bq),
        num_key_blocks=-(-nk // bk),
    )


def _check_exact(mask: TokenMask, nq: int, nk: int, bs: tuple[int, int]) -> None:
    masks.clear_derived_layouts()
    got = mask.layout(nq, nk, bs, CPU)
    want = _defined_tiles(mask, nq, nk, bs)
    case = (nq, nk, bs, mask)
    assert got == want, case
    for t in (got.crow_indices, got.col_indices, *got.transposed_csr()):
        assert t.dtype == torch.int32 and t.is_contiguous(), case
    for a, b in zip(got.transposed_csr(), want.transposed_csr()):
        assert torch.equal(a, b), case
    # every tile holding a visible (query, key) pair is there
    dense = document_mask(nq, nk, is_causal=mask.causal, window_size=mask.window, cu_seqlens=mask.cu_seqlens)
    pad = torch.zeros(got.num_query_blocks * bs[0], got.num_key_blocks * bs[1], dtype=torch.bool)
    pad[:nq, :nk] = dense
    need = pad.reshape(got.num_query_blocks, bs[0], got.num_key_blocks, bs[1]).any(3).any(1)
    assert bool((got.to_dense()[0] | ~need).all()), case
    lo, hi = mask.block_intervals(nq, nk, bs)
    for bound in (lo, hi):
        assert bool((bound[1:] >= bound[:-1]).all()), case


def _random_offsets(rng: random.Random, n: int) -> torch.Tensor:
    """Offsets with 0..12 cuts anywhere, so 1-token and empty documents (repeated cuts) come up."""
    cuts = sorted(rng.choice([rng.randint(0, n), rng.randint(0, min(n, 3)), n]) for _ in range(rng.randint(0, 12)))
    return torch.tensor([0, *cuts, n], dtype=torch.int32)


def test_derived_tiles_equal_the_definition_on_random_masks() -> None:
    rng = random.Random(1234)
    windows = (None, (0, 0), (1, 0), (3, 2), (15, 0), (16, 0), (17, 5), (40, -1), (-1, 7), (100, 100), (1000, 0))
    for _ in range(400):
        bs = (rng.choice((16, 32, 64)), rng.choice((16, 32, 64)))
        docs = rng.random() < 0.5
        nq = rng.randint(1, 333)
        nk = nq if docs else rng.choice((nq, rng.randint(1, 333)))
        causal = rng.random() < 0.5
        window = rng.choice(windows)
        cu = _random_offsets(rng, nq) if docs else None
        if not (causal or window is not None or docs):
            causal = True
        _check_exact(_mask(nq, nk, causal=causal, window=window, cu=cu), nq, nk, bs)


@pytest.mark.parametrize(
    ("nq", "nk", "masks_kw"),
    [
        (1, 1, {"is_causal": True}),
        (129, 129, {"is_causal": True, "cu_seqlens": (0, 1, 1, 2, 64, 64, 65, 129, 129)}),  # 1-token, empty docs
        (257, 257, {"cu_seqlens": (0, 0, 0, 257)}),  # empty docs first, one document
        (255, 255, {"window_size": (2, 1), "cu_seqlens": (0, 127, 128, 255)}),  # window < a tile
        (300, 40, {"window_size": (9, -1)}),  # queries past the keys see nothing
        (300, 40, {"is_causal": True, "window_size": (0, 0)}),
        (40, 300, {"window_size": (5, 10)}),
        (101, 77, {"is_causal": True}),
        (77, 101, {"window_size": (-1, 3)}),
    ],
)
@pytest.mark.parametrize("bs", [(16, 16), (16, 64), (64, 16)])
def test_derived_tiles_equal_the_definition_at_the_edges(nq: int, nk: int, masks_kw: dict, bs: tuple[int, int]) -> None:
    cu = masks_kw.get("cu_seqlens")
    mask = _mask(
        nq,
        nk,
        causal=masks_kw.get("is_causal", False),
        window=masks_kw.get("window_size"),
        cu=None if cu is None else torch.tensor(cu, dtype=torch.int32),
    )
    _check_exact(mask, nq, nk, bs)


def test_window_layouts_are_cached_by_what_they_mask() -> None:
    masks.clear_derived_layouts()
    n = 1000
    first = _mask(n, n, causal=True, window=(100, 7)).layout(n, n, 64, CPU)
    # causal folds the right side to 0: the same tokens, the same layout object
    assert _mask(n, n, causal=True, window=(100, 0)).layout(n, n, 64, CPU) is first
    assert _mask(n, n, window=(100, 0)).layout(n, n, 64, CPU) is first
    assert _mask(n, n, causal=True, window=(101, 0)).layout(n, n, 64, CPU) is not first
    assert _mask(n, n, causal=True, window=(100, 0)).layout(n, n, (64, 32), CPU) is not first


def test_document_layouts_and_bounds_are_cached_by_the_offsets() -> None:
    masks.clear_derived_layouts()
    n = 500
    cu = torch.tensor([0, 1, 200, 200, 500], dtype=torch.int32)
    mask = _mask(n, n, causal=True, cu=cu)
    layout, bounds = mask.layout(n, n, 64, CPU), mask.document_bounds(n)
    assert bounds is not None
    doc = torch.searchsorted(cu[1:].long(), torch.arange(n), right=True)
    assert torch.equal(bounds, torch.stack([cu.long()[doc], cu.long()[doc + 1]]).int())
    same = _mask(n, n, causal=True, cu=cu.clone())  # equal offsets in another tensor
    assert same.layout(n, n, 64, CPU) is layout and same.document_bounds(n) is bounds
    other = _mask(n, n, causal=True, cu=torch.tensor([0, 2, 200, 200, 500], dtype=torch.int32))
    assert other.layout(n, n, 64, CPU) is not layout and other.document_bounds(n) is not bounds
    for step in range(masks.DOCUMENT_BOUNDS):  # as many other offsets as the bounds cache holds
        _mask(n, n, cu=torch.tensor([0, 3 + step, n], dtype=torch.int32)).document_bounds(n)
    again = mask.document_bounds(n)
    assert again is not bounds and torch.equal(again, bounds)  # type: ignore[arg-type]


def test_offsets_are_validated_once_per_unmodified_tensor(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = masks.check_cu_seqlens

    def counting(*args: object, **kwargs: object) -> torch.Tensor:
        calls.append(1)
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(masks, "check_cu_seqlens", counting)
    cu = torch.tensor([0, 10, 64], dtype=torch.int32)
    first = _mask(64, 64, cu=cu)
    for _ in range(3):  # the layers of one step: one read, and the cache key's bytes made once
        later = _mask(64, 64, cu=cu)
        assert torch.equal(later.host_cu_seqlens, cu)  # type: ignore[arg-type]
        assert later.offsets_key is first.offsets_key
    assert len(calls) == 1
    assert first.offsets_key == struct.pack("=3q", 0, 10, 64)  # int64 in host byte order
    _mask(32, 32, cu=torch.tensor([0, 10, 32], dtype=torch.int32))
    assert len(calls) == 2
    cu[1] = 70  # modified in place: read and validated again, so the bad offset is caught
    with pytest.raises(ValueError, match="non-decreasing"):
        _mask(64, 64, cu=cu)
    cu[1] = 20
    mask = _mask(64, 64, cu=cu)
    assert mask.host_cu_seqlens.tolist() == [0, 20, 64]  # type: ignore[union-attr]
    assert mask.cache_key() != first.cache_key()  # the key follows the new offsets
    assert len(calls) == 4


def test_cached_offsets_do_not_hide_a_wrong_length() -> None:
    cu = torch.tensor([0, 10, 64], dtype=torch.int32)
    _mask(64, 64, cu=cu)
    with pytest.raises(ValueError, match="end at the sequence length"):
        _mask(65, 65, cu=cu)


def test_derived_layout_of_too_many_blocks_raises() -> None:
    with pytest.raises(ValueError, match="num_query_blocks"):
        _mask(2**30, 2**30, causal=True).layout(2**30, 2**30, 16, CPU)
