"""LSE merge and the per-block primitives: splitting the keys and merging is exact, forward and backward."""

from __future__ import annotations

import pytest
import torch

from attn_core import merge_into_, merge_partials, reference
from attn_core.blocks import block_backward, block_forward
from attn_core.testing import assert_close_to_reference, max_abs_error, tolerance


def _rand(B, N, H, D, Hkv=None, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    Hkv = Hkv or H
    return (
        torch.randn(B, N, H, D, generator=g, dtype=dtype),
        torch.randn(B, N, Hkv, D, generator=g, dtype=dtype),
        torch.randn(B, N, Hkv, D, generator=g, dtype=dtype),
    )


@pytest.mark.parametrize("split", [1, 4, 9])
def test_merging_key_chunks_equals_full_attention(split: int) -> None:
    q, k, v = _rand(2, 9, 4, 8, Hkv=2)
    full, full_lse = reference.dense_attention(q, k, v)
    parts = [reference.dense_attention(q, k[:, i : i + split], v[:, i : i + split]) for i in range(0, 9, split)]
    out, lse = merge_partials([p[0] for p in parts], [p[1] for p in parts])
    torch.testing.assert_close(out, full)
    torch.testing.assert_close(lse, full_lse)
    acc, acc_lse = torch.zeros_like(full), torch.full_like(full_lse, float("-inf"))
    for p_out, p_lse in parts:
        merge_into_(acc, acc_lse, p_out, p_lse)
    torch.testing.assert_close(acc, full)
    torch.testing.assert_close(acc_lse, full_lse)


def test_merge_of_empty_rows_is_zero_not_nan() -> None:
    out = torch.randn(1, 3, 1, 2, dtype=torch.float64)
    lse = torch.tensor([[[float("-inf"), 0.5, float("-inf")]]], dtype=torch.float64)
    empty = torch.full_like(lse, float("-inf"))
    merged, L = merge_partials([out, torch.zeros_like(out)], [lse, empty])
    assert torch.all(merged[:, 0] == 0) and torch.all(merged[:, 2] == 0)
    torch.testing.assert_close(merged[:, 1], out[:, 1])
    assert torch.isinf(L[..., 0]) and not torch.isnan(merged).any()


def test_merge_partials_validates_lengths() -> None:
    with pytest.raises(ValueError, match="as many outs as lses"):
        merge_partials([torch.zeros(1, 1, 1, 1)], [])


@pytest.mark.parametrize(("causal", "padded", "Hkv"), [(False, False, 4), (True, False, 2), (False, True, 1)])
def test_block_forward_backward_with_merged_stats_are_exact(causal: bool, padded: bool, Hkv: int) -> None:
    """Sum over key blocks of block_backward(final out, final lse) == autograd of dense attention."""
    q, k, v = (t.requires_grad_() for t in _rand(2, 10, 4, 8, Hkv=Hkv, seed=5))
    pad = None
    if padded:
        pad = torch.zeros(2, 10, dtype=torch.bool)
        pad[0, ::2] = True
        pad[1] = True
    full, _ = reference.dense_attention(q, k, v, is_causal=causal, key_padding_mask=pad)
    dout = torch.randn_like(full)
    full.backward(dout)

    qd, kd, vd = q.detach(), k.detach(), v.detach()
    outs, lses = [], []
    # Two key blocks, [0, 6) and [6, 10). Causal: queries [lo, N) against keys [lo, hi) is a top-left
    # aligned causal block (queries before lo see none of these keys), as in a causal ring step.
    bounds = [(0, 6), (6, 10)]
    for lo, hi in bounds:
        sub_pad = pad[:, lo:hi] if pad is not None else None
        if causal:
            o_blk, l_blk = block_forward(qd[:, lo:], kd[:, lo:hi], vd[:, lo:hi], is_causal=True, softmax_scale=8**-0.5)
            o = torch.zeros_like(qd)
            lse = torch.full((2, 4, 10), float("-inf"), dtype=torch.float64)
            o[:, lo:] = o_blk
            lse[:, :, lo:] = l_blk
        else:
            o, lse = block_forward(qd, kd[:, lo:hi], vd[:, lo:hi], softmax_scale=8**-0.5, key_padding_mask=sub_pad)
        outs.append(o)
        lses.append(lse)
    out, L = merge_partials(outs, lses)
    torch.testing.assert_close(out, full.detach())

    dq = torch.zeros_like(qd)
    dk = torch.zeros_like(kd)
    dv = torch.zeros_like(vd)
    for lo, hi in bounds:
        sub_pad = pad[:, lo:hi] if pad is not None else None
        qlo = lo if causal else 0
        gq, gk, gv = block_backward(
            dout[:, qlo:],
            qd[:, qlo:],
            kd[:, lo:hi],
            vd[:, lo:hi],
            out[:, qlo:],
            L[:, :, qlo:],
            is_causal=causal,
            softmax_scale=8**-0.5,
            key_padding_mask=sub_pad,
        )
        dq[:, qlo:] += gq
        dk[:, lo:hi] += gk
        dv[:, lo:hi] += gv
    torch.testing.assert_close(dq, q.grad)
    torch.testing.assert_close(dk, k.grad)
    torch.testing.assert_close(dv, v.grad)
    assert torch.isfinite(dq).all() and torch.isfinite(dk).all()


def test_block_forward_low_precision_within_tolerance_rule() -> None:
    q, k, v = _rand(1, 33, 2, 16, dtype=torch.float16, seed=9)
    out, lse = block_forward(q, k, v, is_causal=True, softmax_scale=0.25)
    ref, ref_lse = reference.dense_attention(q, k, v, is_causal=True, softmax_scale=0.25)
    base, _ = reference.dense_attention(q, k, v, is_causal=True, softmax_scale=0.25, dtype=torch.float16)
    assert out.dtype == torch.float16 and lse.dtype == torch.float32
    assert_close_to_reference("block_forward fp16", out, ref, base)
    assert max_abs_error(lse, ref_lse) < 1e-3


def test_tolerance_rule_rejects_nan_and_large_errors() -> None:
    ref = torch.ones(4, dtype=torch.float64)
    base = torch.full((4,), 1.001, dtype=torch.float16)
    assert_close_to_reference("ok", torch.full((4,), 1.0015, dtype=torch.float16), ref, base)
    with pytest.raises(AssertionError, match="exceeds"):
        assert_close_to_reference("too far", torch.full((4,), 1.01, dtype=torch.float16), ref, base)
    bad = torch.ones(4, dtype=torch.float16)
    bad[2] = float("nan")
    with pytest.raises(AssertionError, match="exceeds"):
        assert_close_to_reference("nan", bad, ref, base)


def test_tolerance_is_twice_the_baseline_error_above_the_floor() -> None:
    ref = torch.zeros(3, dtype=torch.float64)
    base = torch.tensor([0.0, 0.5, -0.25], dtype=torch.float16)
    assert tolerance(base, ref, base) == 1.0
    # an exact baseline leaves only the ulp floor
    assert 0 < tolerance(base, ref, torch.zeros(3, dtype=torch.float16)) < 1e-2


@pytest.mark.parametrize(("dtype", "ulps"), [(torch.float16, 8), (torch.bfloat16, 8), (torch.float32, 32)])
def test_ulp_floor_per_dtype(dtype: torch.dtype, ulps: int) -> None:
    # reference magnitude 4: the floor is ulps x eps x 4 when the baseline is exact
    ref = torch.tensor([4.0, -1.0], dtype=torch.float64)
    exact = ref.to(dtype)
    assert tolerance(exact, ref, exact) == ulps * torch.finfo(dtype).eps * 4.0
    # one ulp past the floor fails
    eps4 = torch.finfo(dtype).eps * 4.0
    with pytest.raises(AssertionError, match="exceeds"):
        assert_close_to_reference("x", exact + torch.tensor([0.0, (ulps + 2) * eps4], dtype=dtype), ref, exact)
