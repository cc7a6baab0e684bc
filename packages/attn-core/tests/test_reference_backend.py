"""backend="reference" of attn_core.dilated_attention against the float64 dense reference.

Outputs and q/k/v gradients on fresh random inputs: causal and not, both head modes, GQA,
key padding (including fully padded batch rows), N = 1, N not a multiple of any segment,
H not a multiple of the group count, positions selected by no group; float32 and float64
(plus one fp16/bf16 case each under the 2x-baseline rule), gradcheck, dropout.
"""

from __future__ import annotations

import zlib

import pytest
import torch

from attn_core import dilated_attention, reference
from attn_core.testing import assert_close_to_reference

# (segment_lengths, dilation_rates, B, N, H, Hkv, D)
CASES = {
    "classic": ([4, 8], [1, 2], 2, 16, 4, 4, 8),
    "odd_len_gqa": ([3, 6, 12], [1, 2, 4], 2, 13, 6, 3, 4),
    "unselected_positions": ([4, 8], [2, 4], 1, 11, 5, 5, 4),
    "h_not_multiple_of_groups": ([2, 4, 6, 8], [1, 1, 2, 2], 2, 10, 6, 2, 4),
    "single_token": ([16], [1], 2, 1, 2, 1, 4),
    "segment_longer_than_n": ([32, 64], [2, 4], 1, 9, 4, 2, 4),
}


def _inputs(B, N, H, Hkv, D, dtype, seed, padding):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, N, H, D, generator=g, dtype=torch.float64)
    k = torch.randn(B, N, Hkv, D, generator=g, dtype=torch.float64)
    v = torch.randn(B, N, Hkv, D, generator=g, dtype=torch.float64)
    dout = torch.randn(B, N, H, D, generator=g, dtype=torch.float64)
    mask = None
    if padding:
        mask = torch.rand(B, N, generator=g) < 0.3
        mask[0] = True  # a fully padded batch row: every output of it must be 0, not NaN
    return q.to(dtype), k.to(dtype), v.to(dtype), dout.to(dtype), mask


def _run(fn, q, k, v, dout):
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    out = fn(*leaves)
    grads = torch.autograd.grad(out, leaves, dout.to(out.dtype))
    return out.detach(), [g.detach() for g in grads]


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("head_mode", ["all", "split"])
@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("padding", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_float64_reference(case, head_mode, is_causal, padding, dtype):
    seg, rates, B, N, H, Hkv, D = CASES[case]
    seed = zlib.crc32(f"{case}-{head_mode}-{is_causal}-{padding}-{dtype}".encode())
    q, k, v, dout, mask = _inputs(B, N, H, Hkv, D, dtype, seed, padding)
    kw = {"is_causal": is_causal, "key_padding_mask": mask, "head_mode": head_mode}

    out, grads = _run(lambda a, b, c: dilated_attention(a, b, c, seg, rates, backend="reference", **kw), q, k, v, dout)
    ref_out, ref_grads = _run(lambda a, b, c: reference.dilated_attention(a, b, c, seg, rates, **kw)[0], q, k, v, dout)
    assert out.dtype == dtype and out.shape == (B, N, H, D)
    if dtype == torch.float64:
        base_out, base_grads = None, [None, None, None]
    else:  # plain PyTorch in the same dtype: the baseline of the tolerance rule
        base_out, base_grads = _run(
            lambda a, b, c: reference.dilated_attention(a, b, c, seg, rates, dtype=dtype, **kw)[0], q, k, v, dout
        )
    assert_close_to_reference("out", out, ref_out, base_out)
    for name, got, ref, base in zip(("dq", "dk", "dv"), grads, ref_grads, base_grads):
        assert torch.isfinite(got).all(), f"{name} has non-finite entries"
        assert_close_to_reference(name, got, ref, base)
    if padding:
        assert torch.equal(out[0], torch.zeros_like(out[0])), "fully padded batch row must output exactly 0"
        assert torch.equal(grads[0][0], torch.zeros_like(grads[0][0])), "no key -> no gradient into q"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_within_twice_plain_pytorch(dtype):
    seg, rates, B, N, H, Hkv, D = CASES["odd_len_gqa"]
    q, k, v, dout, mask = _inputs(B, N, H, Hkv, D, dtype, 7, True)
    kw = {"is_causal": True, "key_padding_mask": mask}
    out, grads = _run(lambda a, b, c: dilated_attention(a, b, c, seg, rates, backend="reference", **kw), q, k, v, dout)
    ref_out, ref_grads = _run(lambda a, b, c: reference.dilated_attention(a, b, c, seg, rates, **kw)[0], q, k, v, dout)
    base_out, base_grads = _run(
        lambda a, b, c: reference.dilated_attention(a, b, c, seg, rates, dtype=dtype, **kw)[0].to(dtype), q, k, v, dout
    )
    assert out.dtype == dtype
    assert_close_to_reference("out", out, ref_out, base_out)
    for name, got, ref, base in zip(("dq", "dk", "dv"), grads, ref_grads, base_grads):
        assert_close_to_reference(name, got, ref, base)


def test_reference_backend_detects_a_wrong_answer():
    # The comparison above can fail: a perturbed output is rejected by the same rule.
    seg, rates, B, N, H, Hkv, D = CASES["classic"]
    q, k, v, _, _ = _inputs(B, N, H, Hkv, D, torch.float32, 3, False)
    out = dilated_attention(q, k, v, seg, rates, backend="reference")
    ref = reference.dilated_attention(q, k, v, seg, rates)[0]
    base = reference.dilated_attention(q, k, v, seg, rates, dtype=torch.float32)[0]
    bad = out.clone()
    bad[0, 3, 1, 2] += 1e-3
    with pytest.raises(AssertionError, match="exceeds"):
        assert_close_to_reference("out", bad, ref, base)


@pytest.mark.parametrize("head_mode", ["all", "split"])
@pytest.mark.parametrize("is_causal", [False, True])
def test_gradcheck_float64(head_mode, is_causal):
    g = torch.Generator().manual_seed(11)
    B, N, H, Hkv, D = 1, 7, 3, 1, 2
    q = torch.randn(B, N, H, D, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(B, N, Hkv, D, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(B, N, Hkv, D, generator=g, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[False, True, False, False, True, False, False]])

    def fn(a, b, c):
        return dilated_attention(
            a,
            b,
            c,
            [2, 4],
            [1, 2],
            is_causal=is_causal,
            key_padding_mask=mask,
            head_mode=head_mode,
            backend="reference",
        )

    assert torch.autograd.gradcheck(fn, (q, k, v), eps=1e-6, atol=1e-7, rtol=1e-5)


def test_empty_sequence():
    q = torch.randn(2, 0, 4, 8, requires_grad=True)
    k = torch.randn(2, 0, 2, 8, requires_grad=True)
    out = dilated_attention(q, k, k, [4, 8], [1, 2], is_causal=True, backend="reference")
    assert out.shape == (2, 0, 4, 8)
    out.sum().backward()
    assert q.grad is not None and q.grad.shape == q.shape


def test_noncontiguous_inputs_match():
    g = torch.Generator().manual_seed(5)
    base = torch.randn(2, 4, 12, 8, generator=g, dtype=torch.float64)  # (B, H, N, D), viewed as (B, N, H, D)
    q = base.transpose(1, 2)
    assert not q.is_contiguous()
    k, v = q[..., :2, :].flip(1), q[..., 2:4, :]
    out = dilated_attention(q, k, v, [4, 6], [1, 2], backend="reference")
    ref, _ = reference.dilated_attention(q, k, v, [4, 6], [1, 2])
    assert_close_to_reference("out", out, ref)


# --- dropout -------------------------------------------------------------------------------


def _dropout_inputs():
    g = torch.Generator().manual_seed(21)
    q = torch.randn(1, 8, 2, 4, generator=g, dtype=torch.float64)
    k = torch.randn(1, 8, 2, 4, generator=g, dtype=torch.float64)
    v = torch.randn(1, 8, 2, 4, generator=g, dtype=torch.float64)
    return q, k, v


def test_dropout_zero_is_exactly_no_dropout():
    q, k, v = _dropout_inputs()
    a = dilated_attention(q, k, v, [4, 8], [1, 2], is_causal=True, backend="reference")
    b = dilated_attention(q, k, v, [4, 8], [1, 2], is_causal=True, dropout_p=0.0, backend="reference")
    assert torch.equal(a, b)


def test_dropout_is_unbiased_and_seeded():
    q, k, v = _dropout_inputs()
    kw = {"is_causal": False, "backend": "reference"}
    clean = dilated_attention(q, k, v, [4, 8], [1, 2], **kw)
    p = 0.3
    torch.manual_seed(1234)
    first = dilated_attention(q, k, v, [4, 8], [1, 2], dropout_p=p, **kw)
    torch.manual_seed(1234)
    again = dilated_attention(q, k, v, [4, 8], [1, 2], dropout_p=p, **kw)
    assert torch.equal(first, again), "same seed must give the same dropout mask"
    assert not torch.allclose(first, clean), "dropout p=0.3 changed nothing"

    n = 1500
    torch.manual_seed(99)
    samples = torch.stack([dilated_attention(q, k, v, [4, 8], [1, 2], dropout_p=p, **kw) for _ in range(n)])
    assert not torch.equal(samples[0], samples[1]), "different draws should give different masks"
    mean, sem = samples.mean(0), samples.std(0) / n**0.5
    # Inverted dropout keeps the expectation: every element within 5 standard errors.
    z = (mean - clean).abs() / (sem + 1e-12)
    assert float(z.max()) < 5.0, f"dropout mean deviates from the undropped output by {float(z.max()):.1f} SE"
    # and the spread is real (p > 0 actually drops something in every output row)
    assert float(sem.min()) > 0


def test_segment_longer_than_sequence_costs_like_the_sequence() -> None:
    """w >> N selects the same positions as w = N rounded up to r; the backend must not pad to w."""
    q, k, v = (torch.randn(1, 37, 2, 8, dtype=torch.float64) for _ in range(3))
    out = dilated_attention(q, k, v, [3 * 2**20, 8], [3, 2], is_causal=True, backend="reference")
    ref, _ = reference.dilated_attention(q, k, v, [3 * 2**20, 8], [3, 2], is_causal=True)
    torch.testing.assert_close(out, ref)
