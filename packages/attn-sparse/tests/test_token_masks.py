"""Token masks in block-sparse attention: causal, sliding windows (window_size) and packed documents
(cu_seqlens), with GQA, key padding, odd lengths, a given layout or layout=None (derived tiles).

Every result is checked against the float64 reference (attn_core.reference.block_sparse_attention)
for out, dq, dk and dv, both for backend="reference" and backend="triton" (Triton's CPU
interpreter, float32 and float16, under the project's 2x-of-plain-PyTorch rule). Query rows that
see no key must give exactly 0 output and 0 gradient. Also: the derived tiles, patterns.documents,
the FlexAttention BlockMask of a masked call (checked with flex's eager path on the CPU), the
pattern library's record of the masks, the modules, and every bad mask argument.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import warnings
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from attn_core import reference
from attn_core.testing import assert_close_to_reference
from attn_core.triton_env import interpret_mode, triton_installed
from attn_sparse import (
    BlockLayout,
    BlockSparseAttention,
    MultiheadBlockSparseAttention,
    PatternLibrary,
    block_sparse_attention,
    documents,
    explain,
    last_backend,
)
from attn_sparse import masks as token_masks
from attn_sparse.api import DERIVED_BLOCK_SIZE
from attn_sparse.backends import flex as flex_backend
from attn_sparse.flex_support import tile_mask_mod, token_terms
from attn_sparse.masks import TokenMask

try:
    from torch.nn.attention import flex_attention as flex
except ImportError:  # torch without FlexAttention: only the flex tests skip
    flex = None

needs_triton = pytest.mark.skipif(
    not (triton_installed() and interpret_mode()), reason="needs triton and TRITON_INTERPRET=1 (CPU interpreter)"
)
needs_flex = pytest.mark.skipif(flex is None, reason="torch.nn.attention.flex_attention unavailable")

D = 16


def _cu(*offsets: int) -> torch.Tensor:
    return torch.tensor(offsets, dtype=torch.int32)


def _random_tiles(hl: int, nq: int, nk: int, density: float, seed: int) -> torch.Tensor:
    """(hl, nq, nk) random tiles; the last query block row of head 0 is empty (rows that see nothing)."""
    m = torch.rand(hl, nq, nk, generator=torch.Generator().manual_seed(seed)) < density
    if nq > 1:
        m[0, -1] = False
    return m


def _visible(tiles: torch.Tensor, bs: tuple[int, int], nq: int, nk: int, masks: dict[str, Any]) -> torch.Tensor:
    """(Hl, Nq, Nk) bool: query i of layout head h sees key j (tiles AND token masks)."""
    keep = reference.block_sparse_weights(tiles, bs, nq, nk)
    return keep & reference.document_mask(nq, nk, **masks)


def _run_case(
    *,
    backend: str,
    dtype: torch.dtype,
    nq: int,
    nk: int,
    heads: int,
    kv_heads: int,
    masks: dict[str, Any],
    bs: tuple[int, int] | None,
    layout_heads: int = 1,
    density: float = 0.7,
    pad: bool = False,
    seed: int = 0,
) -> None:
    """One call of block_sparse_attention against the float64 reference: out, dq, dk, dv, empty rows.

    bs None: layout=None (the tiles derived from the masks, DERIVED_BLOCK_SIZE blocks).
    """
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, nq, heads, D, generator=g).to(dtype).requires_grad_()
    k = torch.randn(1, nk, kv_heads, D, generator=g).to(dtype).requires_grad_()
    v = torch.randn(1, nk, kv_heads, D, generator=g).to(dtype).requires_grad_()
    do = torch.randn(1, nq, heads, D, generator=g).to(dtype)
    padding = None
    if pad:
        padding = torch.rand(1, nk, generator=g) < 0.3
        padding[0, -1] = True  # the last key is padding in every padded case
    if bs is None:
        layout, block = None, DERIVED_BLOCK_SIZE
        tiles = torch.ones(1, -(-nq // block[0]), -(-nk // block[1]), dtype=torch.bool)
    else:
        block = bs
        tiles = _random_tiles(layout_heads, -(-nq // bs[0]), -(-nk // bs[1]), density, seed)
        layout = BlockLayout.from_dense(tiles, bs)
    out = block_sparse_attention(q, k, v, layout, key_padding_mask=padding, backend=backend, **masks)
    assert last_backend() == backend
    grads = torch.autograd.grad(out, (q, k, v), do)

    def ref(dt: torch.dtype) -> tuple[torch.Tensor, ...]:
        qr, kr, vr = (t.detach().to(dt).requires_grad_() for t in (q, k, v))
        o, _ = reference.block_sparse_attention(qr, kr, vr, tiles, block, key_padding_mask=padding, dtype=dt, **masks)
        return (o, *torch.autograd.grad(o, (qr, kr, vr), do.to(dt)))

    want = ref(torch.float64)
    base = ref(dtype) if dtype != torch.float64 else (None,) * 4
    for name, got, r, b in zip(("out", "dq", "dk", "dv"), (out, *grads), want, base):
        assert_close_to_reference(name, got, r, b)
    # rows that see no key: exactly 0 output and dq; keys no row sees: exactly 0 dk, dv
    seen = _visible(tiles, block, nq, nk, masks)  # (Hl, Nq, Nk)
    if padding is not None:
        seen = seen & ~padding[0]
    seen = seen.expand(heads, -1, -1) if seen.shape[0] == 1 else seen
    empty_rows = ~seen.any(-1)  # (H, Nq)
    unread_keys = ~seen.reshape(kv_heads, heads // kv_heads, nq, nk).any(-2).any(1)  # (Hkv, Nk)
    assert bool((out.transpose(1, 2)[0][empty_rows] == 0).all())
    assert bool((grads[0].transpose(1, 2)[0][empty_rows] == 0).all())
    for dkv in grads[1:]:
        assert bool((dkv.transpose(1, 2)[0][unread_keys] == 0).all())
    for t in (out, *grads):
        assert not bool(torch.isnan(t).any())


# ------------------------------------------------------------------ the reference itself


def test_reference_composes_the_tiles_with_document_mask() -> None:
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 45, 2, 8, generator=g, dtype=torch.float64) for _ in range(3))
    masks = {"is_causal": True, "window_size": (6, 2), "cu_seqlens": _cu(0, 1, 1, 30, 45)}
    full = torch.ones(1, 3, 3, dtype=torch.bool)
    got, lse = reference.block_sparse_attention(q, k, v, full, (16, 16), **masks)
    want, want_lse = reference.dense_attention(q, k, v, **masks)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(lse, want_lse)
    tiles = _random_tiles(2, 3, 3, 0.6, seed=1)
    w = reference.block_sparse_weights(tiles, (16, 16), 45, 45) & reference.document_mask(45, 45, **masks)
    got, _ = reference.block_sparse_attention(q, k, v, tiles, (16, 16), **masks)
    torch.testing.assert_close(got, reference.attention_from_weights(q, k, v, w[None])[0])
    with pytest.raises(ValueError, match="B == 1"):
        reference.block_sparse_attention(q.expand(2, -1, -1, -1), k, v, full, (16, 16), cu_seqlens=_cu(0, 45))


# ------------------------------------------------------------------ every combination, reference backend

WINDOWS = [None, (0, 0), (5, 3), (-1, 7), (20, -1)]  # (3, 40) and more in CASES
DOCS = {
    "none": None,
    # a 1-token document, an empty one, one longer than two 16-token tiles
    "short_empty_long": (0, 1, 1, 20, 53),
    "empty_first_and_last": (0, 0, 17, 18, 40, 53, 53),
}


def test_every_mask_combination_reference_backend_float64() -> None:
    # causal x window x documents x key padding x GQA group, N = 53 (odd), blocks (16, 32)
    n = 53
    seed = 0
    for causal in (False, True):
        for window in WINDOWS:
            for docs in DOCS.values():
                for pad in (False, True):
                    for group in (1, 2, 4):
                        masks = {"is_causal": causal, "window_size": window}
                        masks["cu_seqlens"] = None if docs is None else _cu(*docs)
                        seed += 1
                        _run_case(
                            backend="reference",
                            dtype=torch.float64,
                            nq=n,
                            nk=n,
                            heads=group,
                            kv_heads=1,
                            masks=masks,
                            bs=(16, 32),
                            pad=pad,
                            seed=seed,
                        )


# (nq, nk, heads, kv_heads, masks, block size or None for layout=None, layout heads, dtype, key padding)
CASES = [
    (53, 53, 2, 1, {"is_causal": True, "cu_seqlens": _cu(*DOCS["short_empty_long"])}, (16, 32), 1, torch.float32, True),
    (53, 53, 4, 1, {"window_size": (5, 3), "cu_seqlens": _cu(*DOCS["short_empty_long"])}, (16, 16), 1, torch.float16, False),
    (53, 53, 1, 1, {"is_causal": True, "window_size": (0, 0)}, (32, 16), 1, torch.float32, True),
    (53, 53, 2, 2, {"window_size": (-1, 7), "cu_seqlens": _cu(*DOCS["empty_first_and_last"])}, (16, 32), 2, torch.float32, False),
    (53, 53, 4, 2, {"is_causal": True, "window_size": (20, -1), "cu_seqlens": _cu(*DOCS["empty_first_and_last"])}, (32, 16), 1, torch.float16, True),
    (53, 53, 2, 1, {"window_size": (3, 40)}, (16, 16), 1, torch.float16, False),
    # Nq != Nk with windows: rows past Nk + left (or before -right) see no key
    (40, 70, 2, 1, {"window_size": (5, 10)}, (16, 32), 1, torch.float32, True),
    (70, 37, 2, 2, {"is_causal": True, "window_size": (9, -1)}, (16, 16), 2, torch.float16, False),
    # layout=None: the tiles derived from the masks (128 x 128 blocks)
    (150, 150, 2, 1, {"is_causal": True, "window_size": (40, 0), "cu_seqlens": _cu(0, 1, 1, 130, 150)}, None, 1, torch.float32, True),
    (150, 150, 1, 1, {"window_size": (8, 8)}, None, 1, torch.float16, False),
]  # fmt: skip


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=needs_triton)])
@pytest.mark.parametrize("case", CASES, ids=[f"case{i}" for i in range(len(CASES))])
def test_masked_calls_match_float64_reference(backend: str, case: tuple) -> None:
    nq, nk, heads, kv_heads, masks, bs, layout_heads, dtype, pad = case
    _run_case(
        backend=backend,
        dtype=dtype,
        nq=nq,
        nk=nk,
        heads=heads,
        kv_heads=kv_heads,
        masks=masks,
        bs=bs,
        layout_heads=layout_heads,
        pad=pad and backend == "reference",  # triton has no key_padding_mask
        seed=nq + heads,
    )


@st.composite
def _mask_space(draw: st.DrawFn) -> dict[str, Any]:
    nq = draw(st.integers(1, 70))
    docs = draw(st.booleans())
    nk = nq if docs else draw(st.integers(1, 70))
    group = draw(st.sampled_from([1, 2, 4]))
    kv_heads = draw(st.sampled_from([1, 2]))
    side = st.one_of(st.just(-1), st.integers(0, 80))
    window = draw(st.one_of(st.none(), st.tuples(side, side)))
    masks: dict[str, Any] = {"is_causal": draw(st.booleans()), "window_size": window, "cu_seqlens": None}
    if docs:
        cuts = sorted(draw(st.lists(st.integers(0, nq), max_size=5)))
        masks["cu_seqlens"] = _cu(0, *cuts, nq)
    banded = masks["is_causal"] or docs or window not in (None, (-1, -1))  # (-1, -1): no window at all
    derived = draw(st.booleans()) and banded
    bs = None if derived else (draw(st.sampled_from([16, 32])), draw(st.sampled_from([16, 32])))
    return {
        "nq": nq,
        "nk": nk,
        "heads": group * kv_heads,
        "kv_heads": kv_heads,
        "masks": masks,
        "bs": bs,
        "layout_heads": draw(st.sampled_from([1, group * kv_heads])),
        "density": draw(st.sampled_from([0.3, 0.8, 1.0])),
        "seed": draw(st.integers(0, 1000)),
    }


@needs_triton
@settings(max_examples=6, deadline=None, derandomize=True)
@given(_mask_space())
def test_property_random_masks_both_backends(case: dict[str, Any]) -> None:
    _run_case(backend="reference", dtype=torch.float64, pad=True, **case)
    _run_case(backend="triton", dtype=torch.float32, **case)


# ------------------------------------------------------------------ derived tiles, documents pattern


def _any_pair_tiles(tok: torch.Tensor, bs: tuple[int, int]) -> torch.Tensor:
    """(Nq, Nk) token mask -> (1, nq, nk) tiles holding at least one attended pair."""
    nq_t, nk_t = tok.shape
    nq, nk = -(-nq_t // bs[0]), -(-nk_t // bs[1])
    t = torch.zeros(nq * bs[0], nk * bs[1], dtype=torch.bool)
    t[:nq_t, :nk_t] = tok
    return t.reshape(nq, bs[0], nk, bs[1]).any(3).any(1)[None]


@pytest.mark.parametrize("bs", [(16, 16), (16, 32), (32, 16)])
def test_documents_pattern_is_the_tiles_holding_a_pair(bs: tuple[int, int]) -> None:
    n = 101
    for docs in ((0, 101), (0, 1, 1, 40, 41, 101), (0, 0, 64, 101, 101)):
        for causal in (False, True):
            for window in (None, (0, 0), (7, 3), (-1, 20), (33, -1)):
                tok = reference.document_mask(n, n, cu_seqlens=_cu(*docs), is_causal=causal, window_size=window)
                layout = documents(_cu(*docs), n, block_size=bs, is_causal=causal, window_size=window)
                assert torch.equal(layout.to_dense(), _any_pair_tiles(tok, bs)), (docs, causal, window)
                assert documents(list(docs), n, block_size=bs, is_causal=causal, window_size=window) == layout


def test_derived_layout_covers_the_masks_when_lengths_differ() -> None:
    for nq, nk, window in ((40, 300, (5, 10)), (300, 40, (9, -1)), (200, 200, (0, 0))):
        mask = TokenMask.build(window_size=window, batch=1, seq_len_q=nq, seq_len_k=nk, device=torch.device("cpu"))
        tiles = mask.layout(nq, nk, (32, 16), torch.device("cpu")).to_dense()
        need = _any_pair_tiles(mask.dense(nq, nk), (32, 16))
        assert bool((tiles | ~need).all())  # every tile holding a pair is there
        assert torch.equal(mask.dense(nq, nk), reference.document_mask(nq, nk, window_size=window))


def test_layout_none_equals_an_explicit_full_layout_and_is_cached() -> None:
    n = 150
    masks = {"is_causal": True, "window_size": (30, 0), "cu_seqlens": _cu(0, 70, 150)}
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, n, 2, D, generator=g, dtype=torch.float64) for _ in range(3))
    derived = block_sparse_attention(q, k, v, **masks)
    full = BlockLayout.from_dense(torch.ones(1, 2, 2, dtype=torch.bool), DERIVED_BLOCK_SIZE)
    explicit = block_sparse_attention(q, k, v, full, **masks)
    torch.testing.assert_close(derived, explicit, rtol=0, atol=1e-12)
    # one derived layout per (mask, lengths, block size, device), kept while fewer than DERIVED_LAYOUTS others come
    mask = TokenMask.build(**masks, batch=1, seq_len_q=n, seq_len_k=n, device=torch.device("cpu"))
    first = mask.layout(n, n, DERIVED_BLOCK_SIZE, torch.device("cpu"))
    assert mask.layout(n, n, DERIVED_BLOCK_SIZE, torch.device("cpu")) is first
    for w in range(token_masks.DERIVED_LAYOUTS):  # as many other masks as the cache holds: the first goes
        other = TokenMask.build(window_size=(w, w), batch=1, seq_len_q=n, seq_len_k=n, device=torch.device("cpu"))
        other.layout(n, n, DERIVED_BLOCK_SIZE, torch.device("cpu"))
    again = mask.layout(n, n, DERIVED_BLOCK_SIZE, torch.device("cpu"))
    assert again is not first and again == first
    token_masks.clear_derived_layouts()  # emptied: the next call derives anew
    assert mask.layout(n, n, DERIVED_BLOCK_SIZE, torch.device("cpu")) is not again


# ------------------------------------------------------------------ FlexAttention


def _flex_split(bm: Any, nq: int, nk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(full, partial) (Hl, nq, nk) bool tiles of a BlockMask."""

    def dense(num: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        hl = num.shape[1]
        out = torch.zeros(hl, nq, nk, dtype=torch.bool)
        for h in range(hl):
            for r in range(nq):
                out[h, r, idx[0, h, r, : num[0, h, r]].long()] = True
        return out

    return dense(bm.full_kv_num_blocks, bm.full_kv_indices), dense(bm.kv_num_blocks, bm.kv_indices)


@needs_flex
@pytest.mark.parametrize(
    ("nq", "nk", "masks"),
    [
        (100, 100, {"is_causal": True, "window_size": (20, 0), "cu_seqlens": _cu(0, 1, 1, 50, 100)}),
        (100, 100, {"window_size": (40, 5), "cu_seqlens": _cu(0, 64, 64, 100)}),
        (100, 100, {"cu_seqlens": _cu(0, 33, 100)}),
        (60, 100, {"window_size": (3, 50)}),
        (100, 60, {"is_causal": True, "window_size": (-1, -1)}),
    ],
)
def test_flex_block_mask_splits_tiles_exactly_and_attends_like_the_reference(nq: int, nk: int, masks: dict) -> None:
    bs = (16, 16)
    nqb, nkb = -(-nq // 16), -(-nk // 16)
    tiles = _random_tiles(2, nqb, nkb, 0.7, seed=nq + nk)
    layout = BlockLayout.from_dense(tiles, bs)
    bm = layout.to_flex_block_mask(nq, nk, **masks)
    full, partial = _flex_split(bm, nqb, nkb)
    tok = reference.document_mask(nq, nk, **masks)
    grid = torch.nn.functional.pad(tok, (0, nkb * 16 - nk, 0, nqb * 16 - nq)).reshape(nqb, 16, nkb, 16)
    real_q = (torch.arange(nqb * 16) < nq).reshape(nqb, 16, 1, 1)  # rows past Nq do not exist
    inside = (grid | ~real_q).all(3).all(1)  # every pair attends (keys past Nk never do: ragged tiles are partial)
    some = grid.any(3).any(1)
    assert torch.equal(full, tiles & inside)  # exactly the active tiles entirely inside the masks
    assert not bool((full & partial).any())
    assert bool(((full | partial) | ~(tiles & some)).all())  # no tile with an attended pair is lost
    assert not bool((partial & ~tiles).any())
    # flex's eager path evaluates the mask_mod everywhere: it must be tiles AND token masks
    g = torch.Generator().manual_seed(2)
    q = torch.randn(1, nq, 2, D, generator=g)  # per-head tiles, GQA (2 query heads, 1 kv head)
    k, v = (torch.randn(1, nk, 1, D, generator=g) for _ in range(2))
    mask = TokenMask.build(**masks, batch=1, seq_len_q=nq, seq_len_k=nk, device=torch.device("cpu"))
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # "flex_attention called without torch.compile"
        out = flex_backend.attention_with(flex.flex_attention, q, k, v, layout, mask, 0.25)
    ref, _ = reference.block_sparse_attention(q, k, v, tiles, bs, softmax_scale=0.25, **masks)
    assert not bool(torch.isnan(out).any())
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)


@needs_flex
def test_mask_mod_equals_the_dense_mask() -> None:
    for nq, nk, masks in (
        (70, 70, {"is_causal": True, "window_size": (9, 0), "cu_seqlens": _cu(0, 1, 1, 40, 70)}),
        (30, 80, {"window_size": (2, 30)}),
        (80, 30, {"is_causal": True}),
    ):
        mask = TokenMask.build(**masks, batch=1, seq_len_q=nq, seq_len_k=nk, device=torch.device("cpu"))
        got = flex.create_mask(mask.mask_mod(nq, nk), 1, 1, nq, nk, device="cpu")
        assert torch.equal(got[0, 0], mask.dense(nq, nk))
        # and the tile mask_mod is that AND the tiles
        tiles = _random_tiles(1, -(-nq // 16), -(-nk // 32), 0.5, seed=nq)
        mod = tile_mask_mod(tiles, (16, 32), mask.mask_mod(nq, nk))
        want = mask.dense(nq, nk) & reference.block_sparse_weights(tiles, (16, 32), nq, nk)[0]
        assert torch.equal(flex.create_mask(mod, 1, 1, nq, nk, device="cpu")[0, 0], want)


def test_flex_backend_takes_windows_and_documents() -> None:
    q = k = v = torch.randn(1, 256, 2, 64)
    layout = documents(_cu(0, 100, 256), 256, is_causal=True)
    mask = TokenMask.build(
        is_causal=True, window_size=(64, 0), cu_seqlens=_cu(0, 100, 256), batch=1, seq_len_q=256, seq_len_k=256,
        device=torch.device("cpu"),
    )  # fmt: skip
    reasons = flex_backend.unsupported_reasons(q, k, v, layout, mask)
    assert any("needs a CUDA device" in r for r in reasons)  # on this CPU; nothing about the masks
    assert not any("window" in r or "cu_seqlens" in r for r in reasons)
    choice = explain(q, k, v, layout, is_causal=True, window_size=(64, 0), cu_seqlens=_cu(0, 100, 256))
    assert not any("window" in r for r in choice.rejected.get("flex", []))


# ------------------------------------------------------------------ pattern library, modules


def test_pattern_library_records_the_masks_of_documents_layouts(tmp_path: Any) -> None:
    lib = PatternLibrary()
    cu = _cu(0, 1, 1, 90, 200)
    built = lib.add_pattern(
        "docs", "documents", cu_seqlens=cu, seq_len=200, block_size=32, is_causal=True, window_size=(50, 0)
    )
    assert built == documents(cu, 200, block_size=32, is_causal=True, window_size=(50, 0))
    lib.add_pattern("plain", "documents", cu_seqlens=[0, 200], seq_len=200, block_size=64)
    lib.add_pattern("win", "local_window", seq_len=200, window=16, block_size=32)
    path = tmp_path / "docs.safetensors"
    lib.save(path)
    for back in (PatternLibrary.load(path), PatternLibrary.load(path, verify="rebuild")):
        assert back == lib
        assert back["docs"] == built
        assert back.params("docs")["cu_seqlens"] == [0, 1, 1, 90, 200]  # the offsets, as a list
        assert back.masks("docs") == {"is_causal": True, "window_size": (50, 0), "documents": 4}
        assert back.masks("plain") == {"is_causal": False, "window_size": None, "documents": 1}
        assert back.masks("win") == {"is_causal": False, "window_size": None, "documents": None}
    lib.add("odd", built, params={"is_causal": "yes"})
    with pytest.raises(ValueError, match="is_causal must be a bool"):
        lib.masks("odd")


def test_modules_pass_the_masks_through() -> None:
    g = torch.Generator().manual_seed(7)
    q = torch.randn(1, 60, 4, 8, generator=g, dtype=torch.float64)
    k, v = (torch.randn(1, 60, 2, 8, generator=g, dtype=torch.float64) for _ in range(2))
    cu = _cu(0, 25, 60)
    mod = BlockSparseAttention(window_size=(6, 6))  # no layout: the tiles come from the masks
    want = block_sparse_attention(q, k, v, window_size=(6, 6), cu_seqlens=cu, is_causal=True)
    torch.testing.assert_close(mod(q, k, v, is_causal=True, cu_seqlens=cu), want)
    ref, _ = reference.dense_attention(q, k, v, window_size=(6, 6), cu_seqlens=cu, is_causal=True)
    torch.testing.assert_close(want, ref)
    # forward's window replaces the default; (-1, -1) is no window at all
    ref2, _ = reference.dense_attention(q, k, v, window_size=(2, 0), cu_seqlens=cu)
    torch.testing.assert_close(mod(q, k, v, window_size=(2, 0), cu_seqlens=cu), ref2)
    layout = documents(cu, 60, block_size=16)
    ref3, _ = reference.dense_attention(q, k, v, cu_seqlens=cu)
    torch.testing.assert_close(mod(q, k, v, layout=layout, window_size=(-1, -1), cu_seqlens=cu), ref3)
    with pytest.raises(TypeError, match="window_size"):
        BlockSparseAttention(window_size=4)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="window_size"):
        BlockSparseAttention(window_size=(-2, 0))
    mha = MultiheadBlockSparseAttention(32, 4, num_kv_heads=2, window_size=(5, 0), dtype=torch.float64)
    x = torch.randn(1, 60, 32, dtype=torch.float64, generator=g)
    out, _ = mha(x, x, x, cu_seqlens=cu)
    qh = mha.q_proj(x).reshape(1, 60, 4, 8)
    kh, vh = (p(x).reshape(1, 60, 2, 8) for p in (mha.k_proj, mha.v_proj))
    core, _ = reference.dense_attention(qh, kh, vh, window_size=(5, 0), cu_seqlens=cu)
    torch.testing.assert_close(out, mha.out_proj(core.reshape(1, 60, 32)))
    with pytest.raises(ValueError, match="B == 1"):
        mha(x.expand(2, -1, -1), x.expand(2, -1, -1), x.expand(2, -1, -1), cu_seqlens=cu)


# ------------------------------------------------------------------ bad arguments

BAD_MASKS = [
    ({"window_size": (3,)}, TypeError, r"window_size must be a pair \(left, right\) of ints >= -1, got \(3,\)"),
    ({"window_size": (1.5, 2)}, TypeError, r"window_size must be a pair .* got \(1.5, 2\)"),
    ({"window_size": "8"}, TypeError, r"got '8'"),
    ({"window_size": (True, 2)}, TypeError, r"got \(True, 2\)"),
    ({"window_size": (-2, 0)}, ValueError, r"window_size sides must be >= -1 \(-1 = unbounded\), got \(-2, 0\)"),
    ({"cu_seqlens": _cu(0, 30, 20, 48)}, ValueError, r"non-decreasing.*cu_seqlens\[1\] = 30 > cu_seqlens\[2\] = 20"),
    ({"cu_seqlens": torch.tensor([0, 48])}, ValueError, r"dtype torch.int32.*got torch.int64"),
    ({"cu_seqlens": _cu(0, 20, 40)}, ValueError, r"end at the sequence length N = 48, got cu_seqlens\[-1\] = 40"),
    ({"cu_seqlens": _cu(0, -4, 48)}, ValueError, r"non-negative, got cu_seqlens\[1\] = -4"),
    ({"cu_seqlens": _cu(3, 48)}, ValueError, r"start at 0, got cu_seqlens\[0\] = 3"),
    ({"cu_seqlens": [0, 48]}, TypeError, r"cu_seqlens must be a torch.Tensor.*got list"),
    ({"cu_seqlens": _cu(0, 48)[None]}, ValueError, r"1-D of shape \(num_docs \+ 1,\).*got shape \(1, 2\)"),
    ({"is_causal": 1}, TypeError, r"is_causal must be a bool, got 1"),
]


@pytest.mark.parametrize(("masks", "exc", "match"), BAD_MASKS)
def test_bad_masks_raise_naming_the_value(masks: dict, exc: type, match: str) -> None:
    q = k = v = torch.randn(1, 48, 2, D)
    layout = BlockLayout.from_dense(torch.ones(1, 3, 3, dtype=torch.bool), 16)
    with pytest.raises(exc, match=match):
        block_sparse_attention(q, k, v, layout, **masks)
    with pytest.raises(exc, match=match):
        block_sparse_attention(q, k, v, None, **masks)
    if "is_causal" not in masks:
        if flex is not None:
            with pytest.raises(exc, match=match):
                layout.to_flex_block_mask(48, 48, **masks)
        with pytest.raises(exc, match=match):
            token_terms(48, 48, **masks)
        docs = masks.get("cu_seqlens", _cu(0, 48))
        if isinstance(docs, list):  # a list is a recipe's form of the offsets: taken by the pattern
            return
        with pytest.raises(exc, match=match):
            documents(docs, 48, block_size=16, window_size=masks.get("window_size"))


def test_cu_seqlens_needs_one_packed_sequence() -> None:
    layout = BlockLayout.from_dense(torch.ones(1, 3, 3, dtype=torch.bool), 16)
    q = k = v = torch.randn(2, 48, 2, D)
    with pytest.raises(ValueError, match=r"B == 1.*got B=2"):
        block_sparse_attention(q, k, v, layout, cu_seqlens=_cu(0, 48))
    q = torch.randn(1, 40, 2, D)
    k = v = torch.randn(1, 48, 2, D)
    with pytest.raises(ValueError, match=r"one packed sequence.*Nq=40, Nk=48"):
        block_sparse_attention(q, k, v, None, cu_seqlens=_cu(0, 48))
    with pytest.raises(ValueError, match=r"one packed sequence.*Nq=40, Nk=48"):
        token_terms(40, 48, cu_seqlens=_cu(0, 48))
    q = k = v = torch.randn(1, 48, 2, D)
    for no_mask in ({}, {"window_size": (-1, -1)}, {"is_causal": False, "window_size": None}):
        with pytest.raises(ValueError, match=r"layout=None derives the tiles from the token masks, but none was given"):
            block_sparse_attention(q, k, v, **no_mask)
    with pytest.raises(TypeError, match="cu_seqlens must be an int32 tensor or a list of ints"):
        documents([0, 24.0, 48], 48)
    with pytest.raises(ValueError, match=r"offsets must be in \[0, 2147483647\], got 4294967296"):
        documents([0, 2**32, 48], 48)
    with pytest.raises(ValueError, match="seq_len must be in"):
        documents(_cu(0, 48), 0)
