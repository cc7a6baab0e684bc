"""Large logits and large inputs: the reference backend and the adaptive module stay normalised and finite."""

from __future__ import annotations

import pytest
import torch

from attn_core.blocks import softmax_with_lse
from attn_core.reference import block_sparse_attention as reference_bsa
from attn_core.testing import assert_close_to_reference
from attn_sparse import AdaptiveBlockSparseAttention, BlockLayout, block_sparse_attention
from attn_sparse.backends.reference import gathered_attention
from attn_sparse.masks import TokenMask


@pytest.mark.parametrize(
    ("dtype", "value"), [(torch.float32, 1e3), (torch.float64, 1e3), (torch.float16, 60000.0), (torch.bfloat16, 1e4)]
)
def test_reference_backend_stays_normalised_at_large_logits(dtype: torch.dtype, value: float) -> None:
    # q = k constant, v = 1: every output is 1 (up to rounding of a float32 sum) whatever the
    # logit (1e6 and far beyond); exp(s - lse) gave 1.0228 at 1e6 and 16.0 for float16 60000
    q = torch.full((1, 40, 2, 16), value, dtype=dtype)
    v = torch.ones(1, 40, 2, 16, dtype=dtype)
    layout = BlockLayout.from_dense(torch.ones(1, 3, 3, dtype=torch.bool), 16)
    out, lse = gathered_attention(q, q, v, layout, mask=TokenMask.causal_only(True), softmax_scale=1.0)
    torch.testing.assert_close(out, torch.ones_like(out), rtol=0, atol=4 * torch.finfo(dtype).eps)
    assert torch.isfinite(lse).all()


def test_reference_backend_matches_float64_at_large_logits() -> None:
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 48, 2, 16, generator=g) * 300 for _ in range(3))
    mask = torch.rand(2, 3, 3, generator=g) < 0.6
    mask[0, 1] = False  # an empty row: out 0, lse -inf
    layout = BlockLayout.from_dense(mask, 16)
    out, lse = gathered_attention(q, k, v, layout, mask=TokenMask.causal_only(False), softmax_scale=0.25)
    ref, ref_lse = reference_bsa(q.double(), k.double(), v.double(), mask, (16, 16), softmax_scale=0.25)
    base, _ = reference_bsa(q, k, v, mask, (16, 16), softmax_scale=0.25, dtype=torch.float32)
    assert_close_to_reference("out", out, ref, base)
    assert_close_to_reference("lse", lse, ref_lse)  # float32 lse within a few ulps, -inf on the empty row
    assert bool((out[:, 16:32, 0] == 0).all()) and bool(torch.isneginf(lse[:, 0, 16:32]).all())
    assert not torch.isnan(lse).any()


def test_softmax_with_lse_empty_rows_and_gradients() -> None:
    s = torch.tensor([[1e6, 1e6 - 1.0, float("-inf")], [float("-inf")] * 3], dtype=torch.float64, requires_grad=True)
    p, lse = softmax_with_lse(s)
    want = torch.softmax(torch.tensor([0.0, -1.0], dtype=torch.float64), dim=0)
    torch.testing.assert_close(p[0, :2], want)
    assert torch.equal(p[1], torch.zeros(3, dtype=torch.float64)) and bool(torch.isneginf(lse[1]).all())
    (p[:, 0].sum() + lse[0].sum()).backward()
    assert s.grad is not None and torch.isfinite(s.grad).all()
    assert float(s.grad[0, 0] - s.grad[0, 1]) == pytest.approx(2 * float(want[0] * want[1]) + float(want[0] - want[1]))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("shared", [True, False])
def test_reference_backend_never_reads_padded_keys(bad: float, shared: bool) -> None:
    # NaN / inf in the k and v rows of padded keys must not reach the output or any gradient:
    # the result equals the float64 reference on the same inputs with those rows zeroed
    g = torch.Generator().manual_seed(11)
    B, N, H, Hkv, D = 2, 40, 4, 2, 16
    q, k, v = (torch.randn(B, N, h, D, generator=g) for h in (H, Hkv, Hkv))
    pad = torch.rand(B, N, generator=g) < 0.3
    pad[:, 0] = False  # every causal row sees a key
    k_bad, v_bad = k.masked_fill(pad[:, :, None, None], bad), v.masked_fill(pad[:, :, None, None], bad)
    dense = torch.rand(1 if shared else H, 3, 3, generator=g) < 0.7
    dense |= torch.eye(3, dtype=torch.bool)  # every query block reads its own keys
    layout = BlockLayout.from_dense(dense, 16)
    leaves = [t.clone().requires_grad_(True) for t in (q, k_bad, v_bad)]
    out = block_sparse_attention(*leaves, layout=layout, is_causal=True, key_padding_mask=pad, backend="reference")
    dout = torch.randn(out.shape, generator=g)
    out.backward(dout)
    ref_leaves = [t.double().requires_grad_(True) for t in (q, k, v)]
    ref, _ = reference_bsa(
        *ref_leaves, dense.expand(H, 3, 3), (16, 16), is_causal=True, key_padding_mask=pad, softmax_scale=D**-0.5
    )
    ref.backward(dout.double())
    torch.testing.assert_close(out, ref.float(), rtol=1e-5, atol=1e-5)
    for name, got, want in zip("qkv", leaves, ref_leaves):
        assert got.grad is not None and want.grad is not None
        assert torch.isfinite(got.grad).all(), f"d{name} is not finite"
        torch.testing.assert_close(got.grad, want.grad.float(), rtol=1e-5, atol=1e-5)
    assert bool((leaves[1].grad[pad] == 0).all()) and bool((leaves[2].grad[pad] == 0).all())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("is_causal", [False, True])
def test_adaptive_low_precision_large_inputs_match_float64(dtype: torch.dtype, is_causal: bool) -> None:
    # inputs of magnitude 1e3: the pooled block scores (~1e5) overflowed float16 (NaN output) before
    from attn_core.reference import attention_from_weights

    g = torch.Generator().manual_seed(6)
    q, k = ((torch.randn(2, 64, 2, 16, generator=g) * 2e3).to(dtype) for _ in range(2))
    v = torch.randn(2, 64, 2, 16, generator=g).to(dtype)
    torch.manual_seed(4)
    default = AdaptiveBlockSparseAttention(16, top_k=2, block_size=16, scorer_dim=8).to(dtype)
    assert torch.isfinite(default(q, k, v, is_causal=is_causal)).all()  # logits ~1e6 at the default scale
    # a small softmax_scale keeps the attention logits O(1), so the output is well conditioned and
    # the 2x rule is meaningful; the block scores are still ~2e5
    low = AdaptiveBlockSparseAttention(16, top_k=2, block_size=16, scorer_dim=8, softmax_scale=1e-6)
    low.load_state_dict(default.state_dict())
    low = low.to(dtype)
    ref_mod = AdaptiveBlockSparseAttention(16, top_k=2, block_size=16, scorer_dim=8, softmax_scale=1e-6).double()
    ref_mod.load_state_dict({n: t.double() for n, t in low.state_dict().items()})  # the same (rounded) weights
    scores = low.block_scores(q, k)
    layouts, _ = low.select(q, k, is_causal=is_causal)
    ref_layouts, ref_scores = ref_mod.select(q.double(), k.double(), is_causal=is_causal)
    assert scores.dtype == torch.float32 and float(ref_scores.detach().abs().max()) > 65504  # beyond float16's range
    assert_close_to_reference("scores", scores, ref_scores)  # float32 result: a few float32 ulps
    assert all(a == b for a, b in zip(layouts, ref_layouts))
    out = low(q, k, v, is_causal=is_causal)
    ref = ref_mod(q.double(), k.double(), v.double(), is_causal=is_causal)
    # the dense formulation (tile (i, j)'s keys count w_ij times): float64 equals the float64 module;
    # the baseline is the same formulation in float32 (plain PyTorch; float16 logits would overflow), rounded to dtype
    selected = torch.stack([lay.to_dense() for lay in ref_layouts])
    tiles = torch.softmax(ref_scores.masked_fill(~selected, float("-inf")), dim=-1)
    weights = tiles.repeat_interleave(16, 2).repeat_interleave(16, 3)
    if is_causal:
        weights = weights * torch.ones(64, 64, dtype=torch.float64).tril()
    want, _ = attention_from_weights(q, k, v, weights, softmax_scale=1e-6)
    torch.testing.assert_close(ref, want)
    base, _ = attention_from_weights(q, k, v, weights, softmax_scale=1e-6, dtype=torch.float32)
    assert torch.isfinite(out).all()
    assert_close_to_reference("out", out, ref, base.to(dtype))
