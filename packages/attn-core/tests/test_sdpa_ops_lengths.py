"""sdpa_ops with fewer or more keys than queries, a key bias, and GQA (as ring steps call it)."""

from __future__ import annotations

import pytest
import torch

from attn_core import reference, sdpa_ops


@pytest.mark.parametrize(("nq", "nk"), [(5, 9), (9, 5), (1, 7)])
def test_unequal_lengths_with_key_bias_match_reference(nq: int, nk: int) -> None:
    g = torch.Generator().manual_seed(nq * 31 + nk)
    q = torch.randn(2, nq, 4, 8, generator=g, dtype=torch.float64)  # (B, N, H, D)
    k = torch.randn(2, nk, 2, 8, generator=g, dtype=torch.float64)
    v = torch.randn(2, nk, 2, 8, generator=g, dtype=torch.float64)
    pad = torch.zeros(2, nk, dtype=torch.bool)
    pad[0, ::2] = True
    pad[1] = True  # every key of batch 1 is padding: its rows are empty
    bias = torch.zeros(2, nk, dtype=torch.float64).masked_fill(pad, float("-inf"))
    out, lse = sdpa_ops.attention_forward(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=False, scale=8**-0.5, key_bias=bias
    )
    qr, kr, vr = (t.clone().requires_grad_() for t in (q, k, v))
    ref, ref_lse = reference.dense_attention(qr, kr, vr, key_padding_mask=pad)
    torch.testing.assert_close(out.transpose(1, 2), ref)
    torch.testing.assert_close(lse, ref_lse)
    dout = torch.randn(ref.shape, generator=g, dtype=torch.float64)
    ref.backward(dout)
    dq, dk, dv = sdpa_ops.attention_backward(
        dout.transpose(1, 2),
        q.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),
        out,
        lse,
        is_causal=False,
        scale=8**-0.5,
        key_bias=bias,
    )
    torch.testing.assert_close(dq.transpose(1, 2), qr.grad)
    torch.testing.assert_close(dk.transpose(1, 2), kr.grad)
    torch.testing.assert_close(dv.transpose(1, 2), vr.grad)


def test_bad_layouts_raise_value_errors() -> None:
    q = torch.zeros(1, 2, 4, 8)
    k = torch.zeros(1, 1, 6, 8)
    with pytest.raises(ValueError, match="is_causal needs as many queries as keys"):
        sdpa_ops.attention_forward(q, k, k, is_causal=True, scale=1.0)
    with pytest.raises(ValueError, match=r"key_bias must be \(1, 6\)"):
        sdpa_ops.attention_forward(q, k, k, is_causal=False, scale=1.0, key_bias=torch.zeros(1, 4))
    with pytest.raises(ValueError, match="multiple of kv heads"):
        sdpa_ops.attention_forward(
            torch.zeros(1, 3, 4, 8), k.expand(1, 2, 6, 8), k.expand(1, 2, 6, 8), is_causal=False, scale=1.0
        )
