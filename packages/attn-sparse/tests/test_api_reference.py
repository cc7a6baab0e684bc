"""block_sparse_attention: the reference backend against attn_core.reference (outputs and all gradients),
validation errors, and the explainable backend choice."""

from __future__ import annotations

import pytest
import torch

from attn_core.reference import block_sparse_attention as reference_bsa
from attn_core.testing import assert_close_to_reference
from attn_sparse import BlockLayout, block_sparse_attention, explain, last_backend, local_window
from attn_sparse.backends import flex as flex_backend
from attn_sparse.backends import reference as reference_backend
from attn_sparse.masks import TokenMask

CASES = [
    # (B, Nq, Nk, H, Hkv, D, layout heads, block_size, causal)
    (2, 50, 50, 4, 2, 16, 1, (16, 16), True),  # GQA, shared layout, partial last block, causal
    (1, 50, 70, 4, 4, 8, 4, (16, 32), False),  # per-head layout, Nq != Nk, rectangular blocks
    (2, 33, 33, 3, 1, 16, 3, (32, 16), True),  # uneven heads, multi-query, per-head
    (1, 1, 1, 1, 1, 4, 1, (16, 16), True),  # single token
    (1, 64, 64, 2, 2, 16, 2, (16, 16), False),  # exact multiple of the block size
]


def _inputs(B: int, Nq: int, Nk: int, H: int, Hkv: int, D: int, dtype: torch.dtype, seed: int):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Nq, H, D, generator=g).to(dtype).requires_grad_()
    k = torch.randn(B, Nk, Hkv, D, generator=g).to(dtype).requires_grad_()
    v = torch.randn(B, Nk, Hkv, D, generator=g).to(dtype).requires_grad_()
    return q, k, v


def _layout(hl: int, Nq: int, Nk: int, bs: tuple[int, int], seed: int) -> tuple[BlockLayout, torch.Tensor]:
    nq, nk = -(-Nq // bs[0]), -(-Nk // bs[1])
    g = torch.Generator().manual_seed(seed)
    m = torch.rand(hl, nq, nk, generator=g) < 0.5
    m[0, -1, :] = False  # an empty row: output 0, zero gradients
    if nq > 1:
        m[0, 0, :] = True
    return BlockLayout.from_dense(m, bs), m


def _grads(out: torch.Tensor, inputs: tuple[torch.Tensor, ...], g: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return torch.autograd.grad(out, inputs, g)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_reference_backend_matches_float64_reference(case: tuple, dtype: torch.dtype) -> None:
    B, Nq, Nk, H, Hkv, D, hl, bs, causal = case
    layout, mask = _layout(hl, Nq, Nk, bs, seed=Nq + H)
    q, k, v = _inputs(B, Nq, Nk, H, Hkv, D, dtype, seed=Nk)
    out = block_sparse_attention(q, k, v, layout, is_causal=causal, backend="reference")
    assert last_backend() == "reference"
    assert out.dtype == dtype and out.shape == q.shape
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref, _ = reference_bsa(q64, k64, v64, mask, bs, is_causal=causal)
    dout = torch.randn(ref.shape, generator=torch.Generator().manual_seed(99), dtype=ref.dtype)
    got = _grads(out, (q, k, v), dout.to(dtype))
    want = _grads(ref, (q64, k64, v64), dout)
    base = None
    if dtype != torch.float64:  # plain PyTorch in the same dtype: the tolerance baseline
        qb, kb, vb = (t.detach().requires_grad_() for t in (q, k, v))
        bout, _ = reference_bsa(qb, kb, vb, mask, bs, is_causal=causal, dtype=dtype)
        base = (bout, *_grads(bout, (qb, kb, vb), dout.to(dtype)))
    for i, (name, a, r) in enumerate(zip(("out", "dq", "dk", "dv"), (out, *got), (ref, *want))):
        assert_close_to_reference(name, a, r, None if base is None else base[i])
    # the empty last query block row of head 0 gets exactly zero output and gradient
    bq = bs[0]
    last = slice((mask.shape[1] - 1) * bq, Nq)
    heads = slice(0, H if hl == 1 else 1)
    assert bool((out[:, last, heads] == 0).all())
    assert bool((got[0][:, last, heads] == 0).all())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_within_twice_plain_pytorch(dtype: torch.dtype) -> None:
    B, Nq, Nk, H, Hkv, D, hl, bs, causal = CASES[0]
    layout, mask = _layout(hl, Nq, Nk, bs, seed=7)
    q, k, v = _inputs(B, Nq, Nk, H, Hkv, D, dtype, seed=8)
    out = block_sparse_attention(q, k, v, layout, is_causal=causal, backend="reference")
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    got = _grads(out, (q, k, v), dout.to(dtype))
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref, _ = reference_bsa(q64, k64, v64, mask, bs, is_causal=causal)
    want = _grads(ref, (q64, k64, v64), dout)
    qb, kb, vb = (t.detach().requires_grad_() for t in (q, k, v))
    bout, _ = reference_bsa(qb, kb, vb, mask, bs, is_causal=causal, dtype=dtype)
    base = (bout, *_grads(bout, (qb, kb, vb), dout.to(dtype)))
    for name, a, r, b in zip(("out", "dq", "dk", "dv"), (out, *got), (ref, *want), base):
        assert_close_to_reference(name, a, r, b)


def test_gradcheck_float64() -> None:
    layout, _ = _layout(2, 20, 20, (16, 16), seed=3)
    q, k, v = _inputs(1, 20, 20, 2, 1, 4, torch.float64, seed=4)
    assert torch.autograd.gradcheck(
        lambda a, b, c: block_sparse_attention(a, b, c, layout, is_causal=True, backend="reference"),
        (q, k, v),
        fast_mode=True,
    )


def test_lse_of_gathered_attention() -> None:
    layout, mask = _layout(1, 40, 40, (16, 16), seed=5)
    q, k, v = _inputs(1, 40, 40, 2, 2, 8, torch.float64, seed=6)
    _, lse = reference_backend.gathered_attention(q, k, v, layout, mask=TokenMask.causal_only(True), softmax_scale=0.3)
    _, ref_lse = reference_bsa(q, k, v, mask, (16, 16), is_causal=True, softmax_scale=0.3)
    torch.testing.assert_close(lse, ref_lse)  # -inf on empty rows on both sides


def test_softmax_scale_is_used() -> None:
    layout, mask = _layout(1, 32, 32, (16, 16), seed=1)
    q, k, v = _inputs(1, 32, 32, 1, 1, 8, torch.float64, seed=2)
    out = block_sparse_attention(q, k, v, layout, softmax_scale=0.7)
    ref, _ = reference_bsa(q, k, v, mask, (16, 16), softmax_scale=0.7)
    torch.testing.assert_close(out, ref)


def test_auto_explains_its_choice_on_cpu() -> None:
    q, k, v = _inputs(1, 32, 32, 2, 2, 16, torch.float32, seed=0)
    layout = local_window(32, 8, block_size=16)
    choice = explain(q, k, v, layout)
    assert choice.backend in ("triton", "reference")  # triton only under TRITON_INTERPRET=1
    assert set(choice.rejected) | {choice.backend} == {"sdpa", "triton", "flex", "reference"}
    assert any("CUDA" in r for r in choice.rejected["flex"])
    assert any("needs is_causal=True" in r for r in choice.rejected["sdpa"])
    text = str(choice)
    assert "not flex" in text
    with pytest.raises(ValueError, match="backend 'flex' cannot take this input"):
        block_sparse_attention(q, k, v, layout, backend="flex")
    reasons = flex_backend.unsupported_reasons(
        q.double(),
        k.double(),
        v.double(),
        BlockLayout.from_dense(torch.ones(1, 2, 2, dtype=torch.bool), 16),
        TokenMask.causal_only(False),
    )
    assert any("float64" in r for r in reasons) and any("multiples of 128" in r for r in reasons)


def _ok() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, BlockLayout]:
    q, k, v = (t.detach() for t in _inputs(1, 32, 32, 2, 2, 8, torch.float32, seed=0))
    return q, k, v, local_window(32, 4, block_size=16)


@pytest.mark.parametrize(
    ("mutate", "exc", "match"),
    [
        (lambda q, k, v, L: (q[0], k, v, L), ValueError, "4 dims"),
        (lambda q, k, v, L: (q, k.double(), v, L), TypeError, "one dtype"),
        (lambda q, k, v, L: (q.int(), k.int(), v.int(), L), TypeError, "floating"),
        (lambda q, k, v, L: (q, k[:, :, :1], v, L), ValueError, "k and v"),
        (lambda q, k, v, L: (q[:, :, :, :4], k, v, L), ValueError, "head dim"),
        (lambda q, k, v, L: (q[:, :, :1].expand(1, 32, 3, 8), k, v, L), ValueError, "multiple of kv heads"),
        (lambda q, k, v, L: (q, k, v, "local"), TypeError, "BlockLayout"),
        (lambda q, k, v, L: (q, k, v, local_window(48, 4, block_size=16)), ValueError, "ceil"),
        (
            lambda q, k, v, L: (q, k, v, BlockLayout.from_dense(torch.ones(3, 2, 2, dtype=torch.bool), 16)),
            ValueError,
            "num_heads",
        ),
    ],
)
def test_validation_errors(mutate, exc: type, match: str) -> None:
    q, k, v, layout = mutate(*_ok())
    with pytest.raises(exc, match=match):
        block_sparse_attention(q, k, v, layout)


def test_argument_errors() -> None:
    q, k, v, layout = _ok()
    with pytest.raises(TypeError, match="is_causal"):
        block_sparse_attention(q, k, v, layout, is_causal=1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="softmax_scale"):
        block_sparse_attention(q, k, v, layout, softmax_scale=-1.0)
    with pytest.raises(ValueError, match="unknown backend"):
        block_sparse_attention(q, k, v, layout, backend="cuda")
    with pytest.raises(TypeError, match="backend must be a str"):
        block_sparse_attention(q, k, v, layout, backend=None)  # type: ignore[arg-type]


@pytest.mark.parametrize("num_heads", [1, 4])
def test_unbalanced_rows_global_blocks(num_heads: int) -> None:
    # global rows read every key block while window rows read a few: several row buckets
    from attn_sparse import bigbird

    layout = bigbird(200, 16, 20, 2, seed=2, num_heads=num_heads, block_size=16)
    assert layout.max_blocks_per_row == layout.num_key_blocks
    q, k, v = _inputs(1, 200, 200, 4, 2, 8, torch.float64, seed=11)
    out = block_sparse_attention(q, k, v, layout, is_causal=True, backend="reference")
    ref, _ = reference_bsa(q, k, v, layout.to_dense(), (16, 16), is_causal=True)
    dout = torch.randn(ref.shape, generator=torch.Generator().manual_seed(99), dtype=ref.dtype)
    for name, a, r in zip(
        ("out", "dq", "dk", "dv"), (out, *_grads(out, (q, k, v), dout)), (ref, *_grads(ref, (q, k, v), dout))
    ):
        assert_close_to_reference(name, a, r)


def test_all_empty_layout_gives_zeros_and_zero_gradients() -> None:
    layout = BlockLayout.from_dense(torch.zeros(1, 2, 2, dtype=torch.bool), 16)
    q, k, v = _inputs(1, 20, 20, 2, 1, 8, torch.float32, seed=1)
    out = block_sparse_attention(q, k, v, layout, backend="reference")
    grads = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
    assert bool((out == 0).all()) and all(bool((g == 0).all()) for g in grads)


@pytest.mark.parametrize("hl", [1, 4])
def test_key_padding_mask_matches_reference(hl: int) -> None:
    layout, mask = _layout(hl, 50, 70, (16, 32), seed=21)
    q, k, v = _inputs(3, 50, 70, 4, 2, 8, torch.float64, seed=22)
    pad = torch.zeros(3, 70, dtype=torch.bool)
    pad[1, 40:] = True  # a padded tail
    pad[2, :] = True  # everything padded: all outputs 0, never NaN
    out = block_sparse_attention(q, k, v, layout, is_causal=True, key_padding_mask=pad)
    assert last_backend() == "reference"
    ref, _ = reference_bsa(q, k, v, mask, (16, 32), is_causal=True, key_padding_mask=pad)
    dout = torch.randn(ref.shape, generator=torch.Generator().manual_seed(99), dtype=ref.dtype)
    for name, a, r in zip(
        ("out", "dq", "dk", "dv"), (out, *_grads(out, (q, k, v), dout)), (ref, *_grads(ref, (q, k, v), dout))
    ):
        assert_close_to_reference(name, a, r)
    assert bool((out[2] == 0).all())


def test_key_padding_mask_is_validated_and_explained() -> None:
    q, k, v, layout = _ok()
    pad = torch.zeros(1, 32, dtype=torch.bool)
    choice = explain(q, k, v, layout, key_padding_mask=pad)
    assert choice.backend == "reference"
    assert "no key_padding_mask support" in choice.rejected["flex"]
    assert "no key_padding_mask support" in choice.rejected["triton"]
    with pytest.raises(ValueError, match="key_padding_mask must have shape"):
        block_sparse_attention(q, k, v, layout, key_padding_mask=pad[:, :16])
    with pytest.raises(TypeError, match=r"torch\.bool"):
        block_sparse_attention(q, k, v, layout, key_padding_mask=pad.int())


def test_empty_batch_and_empty_sequence_give_empty_outputs() -> None:
    from attn_sparse import block_sparse_attention
    from attn_sparse import patterns as P

    layout = P.causal(32, block_size=16)
    x = torch.randn(0, 32, 2, 16, requires_grad=True)
    out = block_sparse_attention(x, x, x, layout, backend="reference")
    assert out.shape == (0, 32, 2, 16)
    out.sum().backward()
    assert x.grad is not None
    assert x.grad.shape == x.shape


def test_layout_derived_cache_is_bounded() -> None:
    from attn_sparse import patterns as P
    from attn_sparse.layout import MAX_DERIVED_ENTRIES

    layout = P.local_window(256, 64, block_size=16)
    for n in range(MAX_DERIVED_ENTRIES * 2):
        layout.cached_derived(("probe", n), lambda n=n: torch.full((4,), n))
    assert len(layout._cache) <= MAX_DERIVED_ENTRIES
    assert ("probe", MAX_DERIVED_ENTRIES * 2 - 1) in layout._cache
